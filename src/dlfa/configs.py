"""The configurations of dlfa's other commands (training ones are in :mod:`dlfa.training.config`).

One validated dataclass per command; ``dlfa <command>`` options are generated from these fields
(:mod:`dlfa.cli.main`), and the Python API takes the same objects. Light imports only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dlfa.errors import DlfaInputError
from dlfa.options import Config, comma_list, int_list, option
from dlfa.training.config import (
    DEFAULT_MODEL,
    MIN_MAX_LENGTH,
    TASK_NAMES,
    TrainConfig,
    check_languages,
    check_task_name,
)


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
    translate_test: str | None = option(None, help="X-Mixup models: folder of translate-test files; those languages "
                                                   "are scored with mixup inference, the others on the target alone")
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


# Defaults of `dlfa rank-layers` that depend on its mode (a field left at None takes them). joint: the CPU
# reproduction's settings (benchmarks/reproduce_cpu.sh), so that the one joint fine-tuning trains as each sweep cell
# does; frozen: enough passes over the cached states for the heads to level off (docs/rank-layers.md).
RANK_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "joint": {"learning_rate": 1e-4, "batch_size": 16, "max_steps": 300, "epochs": None, "eval_every": 100,
              "max_train_examples": 0},
    "frozen": {"learning_rate": 3e-3, "batch_size": 32, "max_steps": None, "epochs": 4.0, "eval_every": None,
               "max_train_examples": 2000},
}


@dataclass(kw_only=True)
class RankLayersConfig(Config):
    """``dlfa rank-layers``: rank every fused layer x = 1..N-1 on English data at a fraction of a sweep's cost."""

    task: Literal["udpos", "panx", "xnli", "pawsx"] = option(help="the task")
    data_dir: str = option(help="the task's data folder; only the training language's files are read")
    output_dir: str = option(flag="--output", help="folder for ranking.json and ranking.md (new or empty)")
    mode: Literal["joint", "frozen"] = option(
        "joint", help="joint: fine-tune the encoder once, jointly with one gate and head per layer; frozen: train "
                      "gates and heads on cached hidden states of the pretrained encoder (cheaper, but it ranks the "
                      "pretrained layers; docs/rank-layers.md)")
    model: str = option(DEFAULT_MODEL, help="encoder: embedded:multilingual-e5-small, a Hugging Face id or a folder")
    layers: list[int] | None = option(None, low=1, parse=int_list,
                                      help="fused layers x to rank, e.g. 4,8,10 or 1-11; none = every layer 1..N-1")
    seeds: list[int] = option(default_factory=lambda: [1, 2, 3], low=0, high=2**32 - 1, parse=int_list,
                              help="seeds; the ranking uses the mean over seeds")
    train_language: str = option("en", help="the language trained and selected on")
    train_split: Literal["train", "dev", "test"] = option("train", help="split of the training-language file to "
                                                                        "train on")
    dev_split: Literal["train", "dev", "test"] = option("dev", help="split of the training-language file to score on")
    dev_holdout: float = option(0.1, low=0, high=1, low_open=True, high_open=True,
                                help="fraction held out for scoring when the train and dev split are one file")
    max_train_examples: int | None = option(None, low=0, help="first N training examples, 0 = all; none = all for "
                                                              "joint, 2000 for frozen (its cache is in memory)")
    max_dev_examples: int = option(1000, low=0, help="first N selection examples, 0 = all")
    max_length: int | None = option(None, low=MIN_MAX_LENGTH, high=65536,
                                    help="sub-tokens per window; none = the task's default")
    epochs: float | None = option(None, low=0, low_open=True, high=1000,
                                  help="passes over the training examples; none = frozen 4, joint uses --max-steps")
    max_steps: int | None = option(None, low=1, help="optimizer steps, overrides --epochs; none = joint 300")
    batch_size: int | None = option(None, low=1, high=65536, help="training batch; none = joint 16, frozen 32")
    learning_rate: float | None = option(None, low=0, high=1, low_open=True,
                                         help="AdamW learning rate; none = joint 1e-4, frozen 3e-3")
    weight_decay: float = option(0.01, low=0, high=1, help="AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = option(0.1, low=0, high=1, help="linear warm-up fraction, then linear decay")
    max_grad_norm: float = option(1.0, low=0, help="gradient clipping for each layer's gate and head and for the "
                                                   "encoder; 0 = none")
    eval_every: int | None = option(None, low=1, help="steps between selection scores (each layer keeps its best); "
                                                      "none = joint 100, frozen each epoch")
    freeze_embeddings: bool = option(True, help="joint: keep the word-embedding table frozen (as the CPU "
                                                "reproduction's sweeps)")
    reduction: int = option(4, low=1, help="AIF bottleneck ratio r")
    aif_norm: Literal["layernorm", "none"] = option("layernorm", help="normalisation in the AIF bottleneck")
    classifier_dropout: float = option(0.1, low=0, high=1, high_open=True, help="dropout of the task heads")
    include_baseline: bool = option(True, help="also train a head on the last layer alone (a reference row, not "
                                               "ranked)")
    eval_batch_size: int = option(64, low=1, high=65536, help="batch size of encoder passes without training")
    cpu: bool = option(False, help="stay on the CPU even when a GPU is present")
    overwrite: bool = option(False, help="write into a folder with an earlier ranking (replaces ranking.json and "
                                         "ranking.md only)")

    def check(self) -> None:
        check_languages([self.train_language], "--train-language")
        for name in ("seeds", "layers"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                raise DlfaInputError(f"names a {name[:-1]} twice: {values}", option=self.option_name(name))

    def resolved(self) -> dict[str, Any]:
        """The mode-dependent settings with their defaults filled in (max_steps None: epochs decide)."""
        defaults = RANK_MODE_DEFAULTS[self.mode]
        values = {name: defaults[name] if getattr(self, name) is None else getattr(self, name)
                  for name in ("learning_rate", "batch_size", "eval_every", "max_train_examples")}
        if self.max_steps is not None or self.epochs is not None:
            values.update(max_steps=self.max_steps, epochs=self.epochs)
        else:
            values.update(max_steps=defaults["max_steps"], epochs=defaults["epochs"])
        return values


__all__ = ["TASK_NAMES", "AblateConfig", "ConvertConfig", "DownloadConfig", "EvaluateConfig", "PruneConfig",
           "RankLayersConfig", "ReportConfig", "RunControl", "SimilarityConfig", "TasksConfig", "check_task_name"]
