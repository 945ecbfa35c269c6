"""The configurations of dlfa's other commands (training ones are in :mod:`dlfa.training.config`).

One validated dataclass per command; ``dlfa <command>`` options are generated from these fields
(:mod:`dlfa.cli.main`), and the Python API takes the same objects. Light imports only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlfa.errors import DlfaInputError
from dlfa.options import Config, comma_list, int_list, option
from dlfa.training.config import TASK_NAMES, TrainConfig, check_languages, check_task_name


@dataclass(kw_only=True)
class RunControl(Config):
    """How ``train`` (and ``analyze ablate``) treat their output folder; not part of the run's configuration."""

    config: str | None = option(None, help="YAML or JSON file of config fields; options given here override it")
    overwrite: bool = option(False, help="train again into a folder that holds an earlier dlfa run of this kind")
    resume: bool = option(False, help="continue the run in --output from its last checkpoint (or skip it if it "
                                      "finished)")

    def check(self) -> None:
        if self.overwrite and self.resume:
            raise DlfaInputError("--overwrite and --resume exclude each other", option="--resume")


@dataclass(kw_only=True)
class EvaluateConfig(Config):
    """``dlfa evaluate``: score a trained run's selected model (or a saved model folder) again."""

    run: str = option(help="a run folder, or the model folder (best/) inside it")
    data_dir: str | None = option(None, help="task data folder; none = the run's own")
    languages: list[str] | None = option(None, parse=comma_list, help="comma-separated languages, or all")
    batch_size: int = option(64, low=1, high=65536, help="evaluation batch size")
    max_eval_examples: int | None = option(None, low=1, help="score the first N examples of each language only")
    scorer: str | None = option(None, help="scorer (UD-POS: xtreme-2020, seqeval, accuracy); none = the run's")
    ud_preprocessing: Literal["xtreme", "raw"] | None = option(None, help="UD-POS words: xtreme or raw; none = the "
                                                                          "run's")
    output: str | None = option(None, help="write the metrics JSON to this new file; none = print only")

    def check(self) -> None:
        check_languages(self.languages)


@dataclass(kw_only=True)
class TasksConfig(Config):
    """``dlfa tasks``: the tasks, their metrics and languages."""

    data_dir: str | None = option(None, help="also list the languages present in this data folder (or a folder of "
                                             "task folders)")


@dataclass(kw_only=True)
class DownloadConfig(Config):
    """``dlfa download``: fetch a task's official release, verify it, convert it for dlfa."""

    task: Literal["udpos", "panx", "xnli", "pawsx"] = option(positional=True, help="udpos, xnli, pawsx or panx")
    output: str = option("data", help="data folder; the task goes to OUTPUT/TASK")
    archive: list[str] | None = option(None, help="local archives instead of downloading (repeatable); panx: "
                                                  "AmazonPhotos.zip, panx_dataset.tar, <lang>.tar.gz or a folder")
    languages: list[str] | None = option(None, parse=comma_list,
                                         help="comma-separated languages, or all; none = XTREME's list")
    mirror: str | None = option(None, help="base URL serving the archives by file name (or $DLFA_DOWNLOAD_MIRROR)")
    syntactic_words: bool = option(False, help="udpos: keep UD's syntactic words instead of XTREME's fused tokens")
    remove_archives: bool = option(False, help="delete the downloaded archives afterwards")

    def check(self) -> None:
        check_languages(self.languages)


@dataclass(kw_only=True)
class ReportConfig(Config):
    """``dlfa report``: tables and figures from finished runs, over seeds."""

    runs: list[str] = option(positional=True, help="run or sweep folders (searched recursively for metrics.json)")
    output: str | None = option(None, help="folder to write (new, empty, or made by an earlier dlfa report); none = "
                                           "RUN_DIR/report for one folder that is not itself a run, SWEEP/report when "
                                           "every folder lies in one sweep, else report-<hash> here (printed)")
    groups: str | None = option(None, help='JSON file {"group": ["lang", ...]} for Table 2; none = built-in groups')
    published: Literal["auto", "mbert", "none"] = option(
        "auto", help="the paper's mBERT numbers beside ours: auto = beside bert-base-multilingual-cased rows only; "
                     "mbert = beside every model; none")


@dataclass(kw_only=True)
class PruneConfig(Config):
    """``dlfa prune``: delete the model weights of finished runs, keeping what ``dlfa report`` reads."""

    runs: list[str] = option(positional=True, help="run or sweep folders; every finished run under them is pruned")


@dataclass(kw_only=True)
class SimilarityConfig(Config):
    """``dlfa analyze similarity``: cosine and linear CKA between English and each language, per layer."""

    model: str = option(help="a run folder (its best/ model), a saved dlfa model, or an encoder name/folder")
    data_dir: str = option(help="folder of a line-parallel task (xnli, pawsx) or of UD PUD treebanks (udpos)")
    task: Literal["xnli", "pawsx", "udpos"] = option("xnli", help="which reader to use for the parallel sentences")
    languages: list[str] | None = option(None, parse=comma_list, help="targets; none = every parallel language")
    split: Literal["train", "dev", "test"] = option("test", help="split of the parallel files")
    max_sentences: int = option(500, low=2, help="first N parallel sentences")
    max_length: int = option(128, low=8, high=65536, help="longest input in sub-tokens")
    batch_size: int = option(32, low=1, high=65536, help="encoding batch size")
    cpu: bool = option(False, help="stay on the CPU even when a GPU is present")
    output: str = option("similarity", help="folder for CSVs, plots and similarity.md")

    def check(self) -> None:
        check_languages(self.languages)


@dataclass(kw_only=True)
class AblateConfig(TrainConfig):
    """``dlfa analyze ablate``: re-initialise encoder blocks before fine-tuning and compare the transfer gap."""

    reinit_layers: list[int] = option(low=1, parse=int_list,
                                      help="blocks to re-initialise, 1-based like hidden_states (e.g. 1-4 or 1,3,5-6)")

    def train_config(self) -> TrainConfig:
        data = self.to_dict()
        data.pop("reinit_layers")
        return TrainConfig(**data)


@dataclass(kw_only=True)
class ConvertConfig(Config):
    """``dlfa convert``: upgrade a model folder written by dlfa 0.1 into a Hugging Face model folder."""

    source: str = option(positional=True, help="the old model folder (e.g. RUN/best)")
    output: str = option(help="the new folder to write (must not exist)")


__all__ = ["TASK_NAMES", "AblateConfig", "ConvertConfig", "DownloadConfig", "EvaluateConfig", "PruneConfig",
           "ReportConfig", "RunControl", "SimilarityConfig", "TasksConfig", "check_task_name"]
