"""The configuration of one fine-tuning run. Fields left as ``None`` take the task's XTREME defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError

DEFAULT_MODEL = "embedded:multilingual-e5-small"
MIXED_PRECISION = ("no", "fp16", "bf16")
METHODS = ("finetune", "xmixup")
XMIXUP_SCHEDULES = ("inverse_sigmoid", "linear", "constant")
# X-Mixup options (None: the method's defaults, see dlfa.training.xmixup); only valid with method "xmixup".
XMIXUP_FIELDS = ("xmixup_parallel", "xmixup_layers", "xmixup_alpha", "xmixup_schedule", "xmixup_schedule_k",
                 "xmixup_kl_weight", "xmixup_mse_weight", "xmixup_lambda_max")


@dataclass
class TrainConfig:
    task: str = "udpos"
    model: str = DEFAULT_MODEL
    data_dir: str = ""
    output_dir: str = "runs/run"
    # DLFA: fuse the last layer with this layer (1..N-1); None is the baseline.
    fuse_layer: int | None = None
    reduction: int = 4
    aif_norm: str = "layernorm"
    # Zero-shot protocol: train and select on train_language; score the target languages.
    train_language: str = "en"
    train_split: str = "train"
    dev_split: str = "dev"
    languages: list[str] | None = None  # None: every language with an evaluation file
    # When training and selection read the same file (XNLI/PAWS-X here: English dev), this fraction of it is
    # held out, by seed, for checkpoint selection and never trained on.
    dev_holdout: float = 0.1
    allow_leaky_evaluation: bool = False  # score on the training file's translations anyway (marked)
    feature_cache: bool = True
    # Optimisation (None: the task's defaults).
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    max_length: int | None = None
    eval_batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    eval_every: int | None = None  # optimizer steps between English-dev evaluations; None: every epoch
    checkpoint_every: int | None = None  # steps between resumable checkpoints; None: at each evaluation
    freeze_embeddings: bool = False  # freeze the (large, multilingual) word-embedding table
    group_by_length: bool = True
    # Subsets for quick runs.
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 42
    mixed_precision: str = "no"
    cpu: bool = False  # force the CPU even when an accelerator is present
    # Training method: "finetune" (English fine-tuning, the baseline/DLFA recipe) or "xmixup" (X-Mixup on
    # parallel pairs, dlfa.training.xmixup). The X-Mixup fields below stay None for "finetune".
    method: str = "finetune"
    xmixup_parallel: list[str] | None = None  # target languages (paired line by line with English) or files
    xmixup_layers: list[int] | None = None  # mixing blocks 1..N (default: 1 for pair tasks, 4 for tagging)
    xmixup_alpha: float | None = None  # source task-loss weight (default 0.4 pair tasks, 0.8 tagging)
    xmixup_schedule: str | None = None  # scheduled sampling: inverse_sigmoid (default), linear or constant
    xmixup_schedule_k: float | None = None  # inverse-sigmoid k (default: p = 0.5 at half of training)
    xmixup_kl_weight: float | None = None  # consistency KL weight (default 1)
    xmixup_mse_weight: float | None = None  # consistency MSE weight (default 1)
    xmixup_lambda_max: float | None = None  # lambda_0 (default 0.5)

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise DlfaInputError(
                f"must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}", option="--mixed-precision"
            )
        for name in ("batch_size", "max_length", "max_steps", "eval_every", "checkpoint_every", "max_train_examples",
                     "max_dev_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DlfaInputError(f"must be a positive integer, got {value}", option="--" + name.replace("_", "-"))
        if self.epochs is not None and self.epochs <= 0:
            raise DlfaInputError(f"must be positive, got {self.epochs}", option="--epochs")
        if not 0 < self.dev_holdout < 1:
            raise DlfaInputError(f"must be between 0 and 1, got {self.dev_holdout}", option="--dev-holdout")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise DlfaInputError(f"must be positive, got {self.learning_rate}", option="--learning-rate")
        self._check_method()

    def _check_method(self) -> None:
        def option(name: str) -> str:
            return "--" + name.replace("_", "-")

        if self.method not in METHODS:
            raise DlfaInputError(f"must be one of {', '.join(METHODS)}, got {self.method!r}", option="--method")
        if self.method != "xmixup":
            given = [name for name in XMIXUP_FIELDS if getattr(self, name) is not None]
            if given:
                raise DlfaInputError("is an X-Mixup option; add --method xmixup", option=option(given[0]))
            return
        if not self.xmixup_parallel or not all(isinstance(p, str) and p.strip() for p in self.xmixup_parallel):
            raise DlfaInputError("X-Mixup needs parallel data: target languages (paired line by line with the "
                                 "English training file) or parallel files", option="--xmixup-parallel")
        if self.xmixup_layers is not None and (
            not self.xmixup_layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                          for x in self.xmixup_layers)):
            raise DlfaInputError(f"must be block numbers >= 1, got {self.xmixup_layers!r}", option="--xmixup-layers")
        if self.xmixup_alpha is not None and not 0 <= self.xmixup_alpha <= 1:
            raise DlfaInputError(f"must be between 0 and 1, got {self.xmixup_alpha}", option="--xmixup-alpha")
        if self.xmixup_schedule is not None and self.xmixup_schedule not in XMIXUP_SCHEDULES:
            raise DlfaInputError(f"must be one of {', '.join(XMIXUP_SCHEDULES)}, got {self.xmixup_schedule!r}",
                                 option="--xmixup-schedule")
        if self.xmixup_schedule_k is not None and self.xmixup_schedule_k <= 0:
            raise DlfaInputError(f"must be positive, got {self.xmixup_schedule_k}", option="--xmixup-schedule-k")
        for name in ("xmixup_kl_weight", "xmixup_mse_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DlfaInputError(f"must be >= 0, got {value}", option=option(name))
        if self.xmixup_lambda_max is not None and not 0 < self.xmixup_lambda_max <= 1:
            raise DlfaInputError(f"must be in (0, 1], got {self.xmixup_lambda_max}", option="--xmixup-lambda-max")

    def with_task_defaults(self) -> TrainConfig:
        """A copy where every unset optimisation field holds the task's default."""
        from dlfa.tasks import get_task

        defaults = get_task(self.task).defaults
        resolved = dataclasses.replace(self)
        for name in ("epochs", "batch_size", "learning_rate", "max_length"):
            if getattr(resolved, name) is None:
                setattr(resolved, name, getattr(defaults, name))
        return resolved

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.method == "finetune":
            # Fine-tuning configs read exactly as before the method fields existed, so that earlier run folders
            # still match their config on --resume and in sweeps (a missing field takes its default).
            for name in ("method", *XMIXUP_FIELDS):
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DlfaInputError(f"unknown config field {unknown[0]!r}", path=source)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DlfaInputError("config file not found", path=path) from None
        except json.JSONDecodeError as exc:
            raise DlfaInputError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
        if not isinstance(data, dict):
            raise DlfaInputError("a config file holds one JSON object", path=path)
        return cls.from_dict(data, source=path)
