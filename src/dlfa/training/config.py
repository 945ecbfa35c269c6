"""The configurations of training entry points: one run (``TrainConfig``), a sweep and the demo.

Each is a dataclass that validates itself on construction (see :mod:`dlfa.options`), whatever builds it: the
command line (generated from these fields), a ``--config`` YAML/JSON file, a sweep or the Python API. Fields left
as ``None`` in ``TrainConfig`` take the task's XTREME defaults. Checks that need the encoder's own configuration
(the fused layer against its depth, the length against its positions, the reduction against its width) live in
:meth:`TrainConfig.check_against_encoder`, which every entry point calls before it writes anything.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from dlfa.errors import DlfaInputError
from dlfa.options import Config, comma_list, int_list, option, optional_int

DEFAULT_MODEL = "embedded:multilingual-e5-small"
METHODS = ("finetune", "xmixup")
TASK_NAMES = ("udpos", "panx", "xnli", "pawsx")  # dlfa.tasks.TASKS; kept here so that checking needs no import
XMIXUP_SCHEDULES = ("inverse_sigmoid", "linear", "constant")
# X-Mixup options (None: the method's defaults, see dlfa.training.xmixup); only valid with method "xmixup".
XMIXUP_FIELDS = ("xmixup_parallel", "xmixup_layers", "xmixup_alpha", "xmixup_schedule", "xmixup_schedule_k",
                 "xmixup_kl_weight", "xmixup_mse_weight", "xmixup_lambda_max", "xmixup_back_translation",
                 "xmixup_translate_test", "xmixup_teacher", "xmixup_entropy")
_LANGUAGE_FILE = re.compile(r"(?P<lang>[a-z]{2,3})=(?P<path>.+)")
# Where a run is, not what it is: two configs that differ only here describe the same run (a moved run resumes).
LOCATION_FIELDS = ("output_dir",)
MIN_MAX_LENGTH = 8  # room for the special tokens ([CLS] ... [SEP] [SEP] ... [SEP]) and some text
_LANGUAGE = re.compile(r"[a-z]{2,3}([_-][A-Za-z0-9]+)*")
_SPLITS = Literal["train", "dev", "test"]


# DLFA settings that make a run a variant of DLFA rather than the paper's D_x: its own row in sweeps and reports.
DLFA_VARIANTS: dict[str, dict[str, str]] = {"gate_init": {"baseline": "gate-baseline"},
                                            "aif_norm_placement": {"mscam": "mscam"}, "aif_norm": {"none": "no-norm"}}
VARIANT_NAMES = frozenset(name for names in DLFA_VARIANTS.values() for name in names.values())


def method_family(config: TrainOptions | TrainConfig, fuse_layer: int | None) -> str:
    """The report row family of a run: "" for the paper's baseline and D_x, else the training method and the DLFA
    variants joined by "+" (e.g. "gate-baseline", "xmixup+mscam"); the row label adds "+D_x"."""
    parts = [] if config.method == "finetune" else [config.method]
    if fuse_layer is not None:
        parts += [names[getattr(config, field)] for field, names in DLFA_VARIANTS.items()
                  if getattr(config, field) in names]
    return "+".join(parts)


def check_task_name(task: str, option_name: str = "--task") -> None:
    if task not in TASK_NAMES:
        raise DlfaInputError(f"unknown task {task!r} (known: {', '.join(sorted(TASK_NAMES))})", option=option_name)


def check_languages(languages: list[str] | None, option_name: str = "--languages") -> None:
    for lang in languages or ():
        if not _LANGUAGE.fullmatch(lang):
            raise DlfaInputError(f"not a language code: {lang!r} (expected e.g. de or zh)", option=option_name)


@dataclass(kw_only=True)
class TrainOptions(Config):
    """Everything of one run that a sweep shares between its cells (the sweep sets task, layer, seed, output)."""

    model: str = option(DEFAULT_MODEL, help="encoder: embedded:multilingual-e5-small, a Hugging Face id, or a local "
                                            "folder (safetensors weights only)")
    method: Literal["finetune", "xmixup"] = option(
        "finetune", help="finetune (English fine-tuning: baseline or DLFA) or xmixup (X-Mixup on parallel pairs, "
                         "docs/xmixup.md)")
    reduction: int = option(4, low=1, help="AIF bottleneck ratio r: the gate's branches are H -> H/r -> H")
    aif_norm: Literal["layernorm", "none"] = option("layernorm", help="normalisation inside the AIF gate's branches")
    aif_norm_placement: Literal["bottleneck", "mscam"] = option(
        "bottleneck", help="bottleneck: normalise after the first linear layer of each gate branch; mscam: after both, "
                           "as MS-CAM does (docs: modeling_dlfa.py)")
    gate_init: Literal["average", "baseline"] = option(
        "average", help="AIF gate at the start: average (g = 0.5, the paper) or baseline (g near 1: D_x starts as "
                        "the baseline and moves toward layer x only where that helps)")
    train_language: str = option("en", help="the one language trained on and selected on")
    train_split: _SPLITS = option("train", help="split of the training language's file to train on "
                                                "(XNLI and PAWS-X in ../shared/data have only dev: use dev)")
    dev_split: _SPLITS = option("dev", help="split used for checkpoint selection (training language only)")
    languages: list[str] | None = option(None, parse=comma_list,
                                         help="comma-separated target languages to score, or all")
    dev_holdout: float = option(0.1, low=0, high=1, low_open=True, high_open=True,
                                help="fraction held out for selection when the train and dev split are one file")
    allow_leaky_evaluation: bool = option(False, help="score the training file's translations anyway; the scores are "
                                                      "marked leaky in metrics.json and reports")
    feature_cache: bool = option(True, help="reuse tokenized features cached by an earlier run")
    scorer: str | None = option(None, help="how predictions are scored (UD-POS: xtreme-2020, seqeval or "
                                           "accuracy); none = the task's default (`dlfa tasks`)")
    ud_preprocessing: Literal["xtreme", "raw"] = option(
        "xtreme", help="UD-POS words: xtreme (XTREME's clean-up: no spaces or zero-width non-joiners inside words) or "
                       "raw")
    # Optimisation (None: the task's defaults).
    epochs: float | None = option(None, low=0, low_open=True, high=1000,
                                  help="passes over the training data; none = the task's default")
    max_steps: int | None = option(None, low=1, help="stop after this many optimizer steps (overrides --epochs)")
    batch_size: int | None = option(None, low=1, high=65536,
                                    help="global training batch (all processes together); none = the task's default")
    learning_rate: float | None = option(None, low=0, high=1, low_open=True,
                                         help="peak learning rate of AdamW; none = the task's default")
    max_length: int | None = option(None, low=MIN_MAX_LENGTH, high=65536,
                                    help="longest input in sub-tokens (longer sentences are split into windows); "
                                         "none = the task's default")
    eval_batch_size: int = option(64, low=1, high=65536, help="batch size of English-dev and zero-shot evaluation")
    weight_decay: float = option(0.01, low=0, high=1, help="AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = option(0.1, low=0, high=1, help="share of the steps with a linear learning-rate warm-up")
    max_grad_norm: float = option(1.0, low=0, help="gradient clipping norm; 0 = no clipping")
    gradient_accumulation_steps: int = option(1, low=1, high=4096,
                                              help="micro-batches per optimizer step (the batch size is split)")
    eval_every: int | None = option(None, low=1, help="optimizer steps between English-dev evaluations; none = each "
                                                      "epoch")
    checkpoint_every: int | None = option(None, low=1, help="steps between resumable checkpoints; none = at each "
                                                            "evaluation")
    freeze_embeddings: bool = option(False, help="freeze the word-embedding table (fast on CPU; common for transfer)")
    group_by_length: bool = option(True, help="batch sentences of similar length together (less padding)")
    max_train_examples: int | None = option(None, low=1, help="train on the first N examples only")
    max_dev_examples: int | None = option(None, low=1, help="select on the first N English dev examples only")
    max_eval_examples: int | None = option(None, low=1, help="score the first N examples of each language only")
    keep_weights: bool = option(True, help="keep the selected model's weights after the run; off: delete them once "
                                           "scored (about 17 MB left per run instead of 490 MB for the embedded "
                                           "model; dlfa report still works, dlfa evaluate does not)")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = option(
        "none", help="tracker for the training curves (accelerate's trackers; files in RUN/logs): per-step loss, "
                     "learning rate, gradient norm and tokens/s, dev metrics at each evaluation, final scores")
    log_every: int = option(10, low=1, help="optimizer steps between tracker logs of the training curves")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", help="autocast precision of training and evaluation (accelerate's mixed precision; weights and "
                     "optimizer stay fp32): auto = bf16 on a CPU with native bf16 instructions (avx512_bf16, "
                     "amx_bf16, Arm bf16), fp32 on other CPUs and on GPUs; no = fp32")
    adamw_implementation: Literal["auto", "for-loop", "foreach", "fused"] = option(
        "auto", help="AdamW kernel (same update rule, rounding may differ): auto = fused where torch has a fused "
                     "kernel for the device (CPU, CUDA), else torch's default")
    embedding_updates: Literal["dense", "lazy"] = option(
        "lazy", help="word-embedding table: lazy = sparse gradients, AdamW updates only the rows of the batch's "
                     "tokens and keeps moments only for rows ever seen (lazy Adam: untouched rows get no weight "
                     "decay and no momentum step; docs/training.md); dense = AdamW over the whole table")
    cpu: bool = option(False, help="stay on the CPU even when an accelerator is present")
    # X-Mixup (docs/xmixup.md: the authors' method); None: their defaults. Only with --method xmixup.
    xmixup_parallel: list[str] | None = option(
        None, parse=comma_list, help="X-Mixup pairs: target languages paired line by line with the English training "
                                     "file (xnli, pawsx; en pairs English with itself), and/or parallel TSV files "
                                     "(LANG=FILE or FILE; tagging: target tags, soft labels or --xmixup-teacher)")
    xmixup_layers: list[int] | None = option(None, low=1, parse=int_list,
                                             help="X-Mixup mixing blocks 1..N, e.g. 1 or 3-4 (none: 1; tagging 4)")
    xmixup_alpha: float | None = option(None, low=0, high=1, help="X-Mixup source task-loss weight (none: 0.4; "
                                                                  "tagging 0.8)")
    xmixup_schedule: Literal["inverse_sigmoid", "linear", "constant"] | None = option(
        None, help="X-Mixup scheduled sampling: the probability of the gold English source against the "
                   "back-translated one (none: inverse_sigmoid)")
    xmixup_schedule_k: float | None = option(None, low=0, low_open=True,
                                             help="inverse-sigmoid k, p = k / (k + exp(step / k)) (none: 1000)")
    xmixup_kl_weight: float | None = option(None, low=0, help="X-Mixup consistency KL weight (none: 1)")
    xmixup_mse_weight: float | None = option(None, low=0, help="X-Mixup consistency MSE weight (none: 1)")
    xmixup_lambda_max: float | None = option(None, low=0, high=1, low_open=True,
                                             help="X-Mixup lambda_0, the largest mixing ratio (none: 0.5)")
    xmixup_back_translation: list[str] | None = option(
        None, parse=comma_list, help="English back-translations of the targets, LANG=FILE per parallel language: "
                                     "scheduled sampling trains on them instead of the gold source with probability "
                                     "1 - p(step); without them every batch uses the gold source")
    xmixup_translate_test: str | None = option(
        None, help="folder of translate-test files (<split>-<lang>-en-translated.tsv, <lang>.tsv or <lang>.txt): "
                   "those languages are scored with mixup inference, the others target-only (metrics.json says which)")
    xmixup_teacher: str | None = option(None, help="tagging: a fine-tuned dlfa model whose label distributions become "
                                                   "the soft labels of target sentences given without labels")
    xmixup_entropy: Literal["authors", "masked"] | None = option(
        None, help="entropy behind lambda: authors (their formula over rows padded to --max-length) or masked (exact, "
                   "over real tokens only) (none: authors)")

    def check(self) -> None:
        check_languages(self.languages)
        check_languages([self.train_language], "--train-language")
        if self.aif_norm == "none" and self.aif_norm_placement == "mscam":
            raise DlfaInputError("mscam places a normalisation, so it needs --aif-norm layernorm",
                                 option="--aif-norm-placement")
        if self.method != "xmixup":
            given = [name for name in XMIXUP_FIELDS if getattr(self, name) is not None]
            if given:
                raise DlfaInputError("is an X-Mixup option; add --method xmixup", option=self.option_name(given[0]))
        elif not self.xmixup_parallel:
            raise DlfaInputError("X-Mixup needs parallel data: target languages (paired line by line with the "
                                 "English training file) or parallel files", option="--xmixup-parallel")
        seen: set[str] = set()
        for spec in self.xmixup_back_translation or []:
            match = _LANGUAGE_FILE.fullmatch(spec.strip())
            if match is None:
                raise DlfaInputError(f"expected LANG=FILE, got {spec!r}", option="--xmixup-back-translation")
            if match["lang"] in seen:
                raise DlfaInputError(f"{match['lang']!r} given twice", option="--xmixup-back-translation")
            seen.add(match["lang"])
        if self.batch_size is not None and self.batch_size % self.gradient_accumulation_steps:
            raise DlfaInputError(f"the batch size {self.batch_size} is not a multiple of the "
                                 f"{self.gradient_accumulation_steps} accumulation steps",
                                 option="--gradient-accumulation-steps")


@dataclass(kw_only=True)
class TrainConfig(TrainOptions):
    """One fine-tuning run: train on one language, select on its dev set, score the target languages."""

    task: Literal["udpos", "panx", "xnli", "pawsx"] = option(help="the task (`dlfa tasks` lists them)")
    data_dir: str = option(help="folder with the task's files (e.g. data/udpos; `dlfa download`)")
    output_dir: str = option(flag="--output", help="run folder to create (new or empty)")
    fuse_layer: int | None = option(None, low=1, parse=optional_int,
                                    help="DLFA: fuse the last layer with layer x, 1..N-1; none = the baseline")
    seed: int = option(42, low=0, high=2**32 - 1, help="random seed (data order, initialisation, dropout)")

    def check(self) -> None:
        super().check()
        if self.scorer is not None:
            from dlfa.tasks import get_task  # light: the task modules import their scorers lazily

            get_task(self.task).get_scorer(self.scorer)
        if self.ud_preprocessing != "xtreme" and self.task != "udpos":
            raise DlfaInputError(f"applies to udpos only, not {self.task}", option="--ud-preprocessing")

    def with_task_defaults(self) -> TrainConfig:
        """A copy where every unset optimisation field holds the task's default."""
        from dlfa.tasks import get_task

        defaults = get_task(self.task).defaults
        return dataclasses.replace(self, **{name: getattr(defaults, name)
                                            for name in ("epochs", "batch_size", "learning_rate", "max_length")
                                            if getattr(self, name) is None})

    def check_against_encoder(self, encoder_config: Any) -> None:
        """The rules that need the encoder: fused layer < N, length within its positions, r within its width."""
        from dlfa.modeling.modeling_dlfa import encoder_hidden_size, encoder_num_layers, validate_fuse_layer

        validate_fuse_layer(self.fuse_layer, encoder_num_layers(encoder_config))
        hidden = encoder_hidden_size(encoder_config)
        if self.reduction > hidden:
            raise DlfaInputError(f"must be at most the hidden size {hidden} of {self.model}, got {self.reduction}",
                                 option="--reduction")
        positions = getattr(encoder_config, "max_position_embeddings", None)
        # XLM-R-style encoders reserve padding_idx + 1 positions; BERT-style ones none.
        usable = positions - (getattr(encoder_config, "pad_token_id", 0) + 1
                              if getattr(encoder_config, "model_type", "") in ("xlm-roberta", "roberta", "camembert")
                              else 0) if isinstance(positions, int) else None
        if self.max_length is not None and usable is not None and self.max_length > usable:
            raise DlfaInputError(f"must be at most {usable}, the positions of {self.model}, got {self.max_length}",
                                 option="--max-length")

    def check_paths(self) -> None:
        """The rules about files: the data folder holds this task's files, the output can be written. Cheap and
        light (no torch), so the command line runs them before any heavy import; the recipe runs them again."""
        from dlfa.io import check_new_output
        from dlfa.tasks import get_task

        get_task(self.task).check_data_dir(self.data_dir)
        check_new_output(self.output_dir, "--output", allow_existing_folder=True)

    def run_fields(self) -> dict[str, Any]:
        """What makes two configs the same run (everything but where the run folder is)."""
        data = self.to_dict()
        for name in LOCATION_FIELDS:
            data.pop(name, None)
        return data


@dataclass(kw_only=True)
class SweepConfig(Config):
    """``dlfa sweep``: tasks x {baseline, D_x} x seeds, each cell an ordinary run folder."""

    tasks: list[str] = option(parse=comma_list, help="comma-separated tasks, e.g. udpos,panx")
    output_dir: str = option(flag="--output", help="sweep folder; cells are <task>/<model>/<row>/seed-<s>")
    data_dir: str | None = option(None, help="the task's data folder (one task)")
    data_root: str | None = option(None, help="folder with one subfolder per task (udpos/, panx/, xnli/, pawsx/)")
    layers: list[int] | None = option(None, low=1, parse=int_list,
                                      help="fused layers, e.g. 4,8,11 or 1-11; none = every layer 1..N-1")
    seeds: list[int] = option(default_factory=lambda: [1, 2, 3], low=0, high=2**32 - 1, parse=int_list,
                              help="seeds, e.g. 1,2,3 or 1-5")
    baseline: bool = option(True, help="include the baseline row")
    parallel: int = option(1, low=1, high=256, help="cells run at once on this machine (separate processes)")
    ray_address: str | None = option(None, help="run each cell as a Ray task on this cluster ('auto', "
                                                "'ray://host:10001'); see docs/cluster.md")
    cpus_per_run: float = option(1.0, low=0, low_open=True, help="CPUs a cell needs (Ray; local: torch threads)")
    gpus_per_run: float = option(0.0, low=0, help="GPUs a cell needs (Ray)")
    train: dict[str, Any] = option(default_factory=dict, cli=False, help="TrainOptions fields shared by every cell")

    def check(self) -> None:
        for task in self.tasks:
            check_task_name(task, "--tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise DlfaInputError("names a task twice", option="--tasks")
        if len(set(self.seeds)) != len(self.seeds):
            raise DlfaInputError("names a seed twice", option="--seeds")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise DlfaInputError("names a layer twice", option="--layers")
        if (self.data_dir is None) == (self.data_root is None):
            raise DlfaInputError("give --data-dir for one task or --data-root for several", option="--data-dir")
        if self.data_dir is not None and len(self.tasks) != 1:
            raise DlfaInputError("--data-dir is for one task; give --data-root for several", option="--data-dir")
        if not self.baseline and self.layers is not None and not self.layers:
            raise DlfaInputError("the sweep has no rows (no layers and no baseline)", option="--layers")
        unknown = sorted(set(self.train) - TrainOptions.field_names())
        if unknown:
            raise DlfaInputError(f"not a per-run option of a sweep: {unknown[0]!r}", option=unknown[0])
        self.train_options()  # validates the shared options now, not in the first cell

    def train_options(self) -> TrainOptions:
        return TrainOptions(**self.train)

    def data_dirs(self) -> dict[str, str]:
        from pathlib import Path

        if self.data_root is not None:
            return {task: str(Path(self.data_root) / task) for task in self.tasks}
        return {self.tasks[0]: str(self.data_dir)}


@dataclass(kw_only=True)
class DemoConfig(Config):
    """``dlfa demo``: baseline against DLFA on the shipped POS sample, on the embedded model."""

    output_dir: str = option("demo-output", flag="--output", help="folder for the demo's runs, table and plot")
    model: str = option(DEFAULT_MODEL, help="encoder (the embedded model by default)")
    fuse_layer: int = option(8, low=1, help="the DLFA layer x compared with the baseline (1..N-1)")
    seeds: list[int] = option(default_factory=lambda: [1, 2], low=0, high=2**32 - 1, parse=int_list,
                              help="seeds; each trains a baseline and a DLFA model, the table shows the spread")
    epochs: float = option(6, low=0, low_open=True, high=1000, help="passes over the ~320 training sentences")
    batch_size: int = option(16, low=1, high=65536, help="training batch")
    learning_rate: float = option(1e-4, low=0, high=1, low_open=True, help="peak learning rate")
    freeze_embeddings: bool = option(True, help="freeze the 96M-parameter word-embedding table (fast on CPU)")
    keep_weights: bool = option(False, help="keep each run's model weights (490 MB per run for the embedded "
                                            "model); off: the demo leaves its tables, plot and metrics only")
    overwrite: bool = option(False, help="replace an earlier demo output (only a folder made by dlfa demo)")

    def check(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise DlfaInputError("names a seed twice", option="--seeds")
