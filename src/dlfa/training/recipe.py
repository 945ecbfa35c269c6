"""The fine-tuning recipe: train on English, select on English dev, score every target language.

One class, built from a :class:`TrainConfig`, in three stages: ``setup`` (read and check every input before
anything is written), ``train`` (accelerate loop with English-dev checkpoint selection) and ``evaluate``
(zero-shot scores of the selected model). ``run`` does all three. The CLI only builds the config.

A run folder holds ``config.json`` (the resolved config), ``train.log``, ``best/`` (the selected model and
its tokenizer) and, written last, ``metrics.json``. Files are written atomically, so a folder never holds a
half-written file; a run whose ``metrics.json`` is missing did not finish.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dlfa import __version__
from dlfa.data.batching import Collator, train_loader
from dlfa.data.cache import FeatureCache, cache_key
from dlfa.errors import DlfaInputError
from dlfa.evaluation.evaluate import average, evaluate_examples
from dlfa.evaluation.guard import check_honest_evaluation
from dlfa.io import atomic_path, write_json_atomic
from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAModel, encoder_num_layers, validate_fuse_layer
from dlfa.tasks import get_task
from dlfa.training.checkpoint import load_checkpoint, save_checkpoint
from dlfa.training.config import TrainConfig

logger = logging.getLogger("dlfa")

BEST_DIR = "best"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
LOG_FILE = "train.log"
CHECKPOINT_DIR = "checkpoint"


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def resolve_model(name: str) -> str:
    """An embedded model name becomes its cached folder (converted on first use); others pass through."""
    from dlfa.modeling.embedded import resolve_model_name

    return resolve_model_name(name)


def _subset(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


class FinetuneRecipe:
    # The TrainConfig.method this class runs (subclasses for other methods override it; see ``setup``).
    training_method = "finetune"

    def __init__(
        self, config: TrainConfig, overwrite: bool = False, show_progress: bool = True, resume: bool = False
    ) -> None:
        self.config = config.with_task_defaults()
        self.overwrite = overwrite
        self.resume = resume
        self.resume_from: Path | None = None
        self.show_progress = show_progress
        self.output_dir = Path(self.config.output_dir)
        self._log_handler: logging.Handler | None = None

    # -- setup -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check every input; only then create the run folder, the model and the optimiser."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoConfig

        cfg = self.config
        if cfg.method != self.training_method:
            raise DlfaInputError(f"{type(self).__name__} runs method {self.training_method!r}, not {cfg.method!r} "
                                 "(`dlfa train` picks the recipe of each method)", option="--method")
        self.task = task = get_task(cfg.task)
        if not cfg.data_dir:
            raise DlfaInputError("a data folder is required", option="--data-dir")
        self.languages = task.resolve_languages(cfg.data_dir, cfg.languages, option="--languages")
        self.leaky_languages = check_honest_evaluation(
            task, cfg.data_dir, cfg.train_language, cfg.train_split, self.languages, task.eval_split,
            cfg.allow_leaky_evaluation,
        )
        self._check_output_dir()

        # The encoder's depth decides which fused layers are valid: check before loading any weights.
        self.model_path = resolve_model(cfg.model)
        try:
            encoder_config = AutoConfig.from_pretrained(self.model_path)
        except OSError as exc:
            raise DlfaInputError(f"cannot load model {cfg.model!r}: {str(exc).splitlines()[0]}", option="--model") from None
        self.num_layers = encoder_num_layers(encoder_config)
        validate_fuse_layer(cfg.fuse_layer, self.num_layers)

        self.tokenizer = load_tokenizer(self.model_path)
        train_examples, dev_examples = self._read_train_and_dev()
        self.eval_examples = {
            lang: _subset(task.read(cfg.data_dir, lang, task.eval_split), cfg.max_eval_examples)
            for lang in self.languages
        }

        # Inputs are good: from here on we write.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._start_logging()
        set_seed(cfg.seed)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            cpu=cfg.cpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        )
        self.collator = Collator(self.tokenizer, task.head)
        self.feature_cache = FeatureCache(enabled=cfg.feature_cache)
        holdout = self._holdout_tag()
        self.train_features = self._build_train_features(train_examples, holdout)
        self.dev_examples = dev_examples
        self.dev_features = self._features(dev_examples, cfg.train_language, cfg.dev_split,
                                           f"select:{holdout}:{cfg.max_dev_examples}")
        logger.info(
            "task %s | model %s (%d layers) | fuse layer %s | %d train examples (%d features) | %d dev | targets %s",
            cfg.task, cfg.model, self.num_layers, cfg.fuse_layer, len(train_examples), len(self.train_features),
            len(dev_examples), ",".join(self.languages),
        )

        dlfa_config = DLFAConfig(
            head=task.head,
            num_labels=len(task.labels),
            labels=list(task.labels),
            fuse_layer=cfg.fuse_layer,
            reduction=cfg.reduction,
            aif_norm=cfg.aif_norm,
            encoder_name=cfg.model,
        )
        model = self._build_model(dlfa_config)
        optimizer = torch.optim.AdamW(self._parameter_groups(model), lr=cfg.learning_rate)

        self.sampler_generator = torch.Generator().manual_seed(cfg.seed)
        loader = train_loader(self.train_features, self._train_collator(), cfg.batch_size, self.sampler_generator,
                              cfg.group_by_length)
        steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self._write_config()

    # Hooks for recipes of other methods (X-Mixup): the training data, the model, the training loss.

    def _build_train_features(self, train_examples: list, holdout: str) -> list[dict]:
        cfg = self.config
        return self._features(train_examples, cfg.train_language, cfg.train_split,
                              f"train:{holdout}:{cfg.max_train_examples}")

    def _train_collator(self):
        return self.collator

    def _build_model(self, dlfa_config: DLFAConfig) -> torch.nn.Module:
        model = DLFAModel.from_encoder(dlfa_config, self.model_path)
        if self.config.freeze_embeddings:
            model.encoder.get_input_embeddings().weight.requires_grad_(False)
        return model

    def training_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The loss of one training batch; ``step`` is the number of optimizer steps done before it."""
        return self.model(**batch).loss

    def _method_fields(self) -> dict[str, Any]:
        """What metrics.json says about the method (reports make one row per method and fused layer)."""
        return {"method": "dlfa" if self.config.fuse_layer is not None else "baseline",
                "fuse_layer": self.config.fuse_layer}

    def _check_output_dir(self) -> None:
        """A new run needs an empty folder; ``resume`` continues a run of the same config from its checkpoint."""
        out = self.output_dir
        if not (out.exists() and any(out.iterdir())):
            return
        if self.resume:
            saved = _saved_config(out)
            if saved is not None and saved != self.config.to_dict():
                raise DlfaInputError(f"{out} holds a run with another configuration; cannot resume it", option="--output")
            if (out / CHECKPOINT_DIR / "state.json").is_file():
                self.resume_from = out / CHECKPOINT_DIR
            return
        if not self.overwrite:
            raise DlfaInputError(f"{out} exists and is not empty (pass --overwrite, or --resume)", option="--output")

    def _holdout_tag(self) -> str:
        cfg = self.config
        same_file = cfg.train_split == cfg.dev_split
        return f"holdout{cfg.dev_holdout}-seed{cfg.seed}" if same_file else "none"

    def _read_train_and_dev(self) -> tuple[list, list]:
        """English train and selection examples; one file is split by seed when both name the same split."""
        cfg, task = self.config, self.task
        train = task.read(cfg.data_dir, cfg.train_language, cfg.train_split)
        if cfg.train_split == cfg.dev_split:
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            cut = max(1, int(round(cfg.dev_holdout * len(train))))
            if cut >= len(train):
                raise DlfaInputError(f"{len(train)} examples are too few to hold out a selection set",
                                     option="--dev-holdout")
            dev = [train[i] for i in sorted(order[:cut])]
            train = [train[i] for i in sorted(order[cut:])]
        else:
            dev = task.read(cfg.data_dir, cfg.train_language, cfg.dev_split)
        return _subset(train, cfg.max_train_examples), _subset(dev, cfg.max_dev_examples)

    def _features(self, examples: list, language: str, split: str, subset: str) -> list[dict]:
        cfg = self.config
        files = self.task.files(cfg.data_dir, language, split)
        key = cache_key(self.tokenizer, self.task.name, split, language, cfg.max_length, files, subset)
        return self.feature_cache.get_or_build(
            key, lambda: self.task.featurize(examples, self.tokenizer, cfg.max_length)
        )

    def _parameter_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for param in model.parameters():
            if not param.requires_grad:
                continue
            # Biases and normalization weights are the 1-D parameters; they get no weight decay.
            (no_decay if param.ndim < 2 else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _start_logging(self) -> None:
        handler = logging.FileHandler(self.output_dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self._log_handler = handler

    def _write_config(self) -> None:
        import accelerate
        import transformers

        resolved = {
            "config": self.config.to_dict(),
            "resolved": {
                "model_path": self.model_path,
                "num_layers": self.num_layers,
                "languages": self.languages,
                "total_steps": self.total_steps,
                "train_features": len(self.train_features),
                "num_processes": self.accelerator.num_processes,
                "device": str(self.accelerator.device),
            },
            "versions": {
                "dlfa": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
            "command": " ".join(sys.argv),
        }
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / CONFIG_FILE, resolved)

    # -- training --------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The training loop; with ``resume`` it continues exactly where the last checkpoint left off."""
        cfg, accelerator = self.config, self.accelerator
        loop = {"step": 0, "epoch": 0, "batches_done": 0, "running_loss": 0.0, "loss_count": 0,
                "history": [], "best": None, "train_seconds": 0.0, "epoch_sampler_state": None}
        resume_rng = None
        if self.resume_from is not None:
            loop = load_checkpoint(self.resume_from, accelerator.unwrap_model(self.model), self.optimizer,
                                   self.scheduler, None)
            resume_rng = torch.get_rng_state()
            logger.info("resumed from %s at step %d", self.resume_from, loop["step"])
        self.history, self.best = loop["history"], loop["best"]
        started = time.time() - loop["train_seconds"]
        steps_per_epoch = max(1, math.ceil(len(self.loader) / cfg.gradient_accumulation_steps))
        progress = tqdm(total=self.total_steps, initial=loop["step"], desc="train",
                        disable=not (self.show_progress and accelerator.is_main_process))
        self.model.train()
        while loop["step"] < self.total_steps:
            skip = 0
            if resume_rng is not None and loop["batches_done"]:
                # Same epoch as the checkpoint: replay its batch order and skip what was trained on.
                self.sampler_generator.set_state(torch.tensor(loop["epoch_sampler_state"], dtype=torch.uint8))
                skip = loop["batches_done"]
            else:
                loop["epoch"] += 1
                loop["batches_done"] = 0
                loop["epoch_sampler_state"] = self.sampler_generator.get_state().tolist()
            batches = iter(self.loader)
            for _ in range(skip):
                next(batches)
            if resume_rng is not None:
                torch.set_rng_state(resume_rng)  # creating the iterator may draw from the global generator
                resume_rng = None
            for batch in batches:
                with accelerator.accumulate(self.model):
                    loss = self.training_loss(batch, loop["step"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                loop["batches_done"] += 1
                loop["running_loss"] += loss.detach().float().item()
                loop["loss_count"] += 1
                if not accelerator.sync_gradients:
                    continue
                loop["step"] += 1
                step = loop["step"]
                progress.update(1)
                progress.set_postfix(loss=f"{loop['running_loss'] / loop['loss_count']:.4f}", epoch=loop["epoch"])
                end_of_epoch = step % steps_per_epoch == 0
                select = (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch)
                if select or step == self.total_steps:
                    self._select(step, loop["epoch"], loop["running_loss"] / max(loop["loss_count"], 1))
                    loop["running_loss"], loop["loss_count"] = 0.0, 0
                    loop["best"] = self.best
                if step < self.total_steps and (
                    (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (select and not cfg.checkpoint_every)
                ):
                    loop["train_seconds"] = time.time() - started
                    self._checkpoint(loop)
                if step >= self.total_steps:
                    break
            else:
                loop["batches_done"] = 0
        progress.close()
        self.train_seconds = time.time() - started
        logger.info("training done in %.1fs; best English dev %s %.2f at step %d", self.train_seconds,
                    self.task.primary_metric, self.best["score"], self.best["step"])

    def _checkpoint(self, loop: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.output_dir / CHECKPOINT_DIR, self.accelerator.unwrap_model(self.model),
                            self.optimizer, self.scheduler, None, loop)
        self.accelerator.wait_for_everyone()

    def _select(self, step: int, epoch: int, train_loss: float) -> None:
        """Score English dev; keep the model if it is the best so far (the only selection signal)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model)
            metrics = self._dev_metrics(model)
            score = metrics[self.task.primary_metric]
            record = {"step": step, "epoch": epoch, "train_loss": train_loss, "dev": metrics, "score": score}
            self.history.append(record)
            improved = self.best is None or score > self.best["score"]
            logger.info("step %d epoch %d loss %.4f | %s dev %s %.2f%s", step, epoch, train_loss,
                        self.config.train_language, self.task.primary_metric, score, " (best)" if improved else "")
            if improved:
                self.best = record
                with atomic_path(self.output_dir / BEST_DIR) as tmp:
                    model.save_pretrained(tmp)
                    self.tokenizer.save_pretrained(tmp)
        accelerator.wait_for_everyone()

    def _dev_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """English-dev metrics of the model being trained (the selection signal)."""
        return evaluate_examples(
            self.task, model, self.dev_examples, self.dev_features, self.collator, self.config.eval_batch_size,
            self.accelerator.device, desc="dev" if self.show_progress else None, autocast_dtype=self._autocast_dtype(),
        )

    def _load_best(self) -> torch.nn.Module:
        return DLFAModel.from_pretrained(self.output_dir / BEST_DIR, device=self.accelerator.device)

    def _language_metrics(self, model: torch.nn.Module, lang: str) -> dict[str, Any]:
        """Zero-shot metrics of the selected model on one target language."""
        features = self._features(self.eval_examples[lang], lang, self.task.eval_split,
                                  f"eval:{self.config.max_eval_examples}")
        return evaluate_examples(
            self.task, model, self.eval_examples[lang], features, self.collator, self.config.eval_batch_size,
            self.accelerator.device, desc=f"eval {lang}" if self.show_progress else None,
            autocast_dtype=self._autocast_dtype(),
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)

    # -- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Zero-shot scores of the selected model on every target language; writes metrics.json."""
        accelerator = self.accelerator
        result: dict[str, Any] = {}
        if accelerator.is_main_process:
            model = self._load_best()
            per_language = {}
            for lang in self.languages:
                per_language[lang] = self._language_metrics(model, lang)
                if lang in self.leaky_languages:
                    per_language[lang]["leaky"] = True
                logger.info("%s %s: %s", self.task.eval_split, lang,
                            " ".join(f"{k}={v:.2f}" for k, v in per_language[lang].items() if isinstance(v, float)))
            metric_names = [k for k, v in next(iter(per_language.values())).items() if isinstance(v, float)]
            result = {
                "task": self.task.name,
                "model": self.config.model,
                **self._method_fields(),
                "seed": self.config.seed,
                "primary_metric": self.task.primary_metric,
                "eval_split": self.task.eval_split,
                "selection": {
                    "language": self.config.train_language,
                    "split": self.config.dev_split,
                    "held_out_from_training_file": self.config.train_split == self.config.dev_split,
                    "best_step": self.best["step"],
                    "best_score": self.best["score"],
                    "history": self.history,
                },
                "languages": per_language,
                "leaky_languages": self.leaky_languages,
                "average": {m: average(per_language, m) for m in metric_names},
                "average_zero_shot": {m: average(per_language, m, exclude=[self.config.train_language])
                                      for m in metric_names},
                "train_seconds": self.train_seconds,
            }
            write_json_atomic(self.output_dir / METRICS_FILE, result)
        accelerator.wait_for_everyone()
        return result

    def finished_result(self) -> dict[str, Any] | None:
        """The metrics of an already finished run in the output folder (for resumable sweeps)."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return None
        saved = _saved_config(self.output_dir)
        if saved is not None and saved != self.config.to_dict():
            raise DlfaInputError(f"{self.output_dir} holds a run with another configuration", option="--output")
        return json.loads(path.read_text(encoding="utf-8"))

    def cleanup(self) -> None:
        if self._log_handler is not None:
            logger.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def run(self) -> dict[str, Any]:
        if self.resume:
            done = self.finished_result()
            if done is not None:
                logger.info("%s already finished; skipping", self.output_dir)
                return done
        try:
            self.setup()
            self.train()
            result = self.evaluate()
            if self.accelerator.is_main_process:
                # The run is complete: the resumption state (weights + optimizer moments) is no longer needed.
                shutil.rmtree(self.output_dir / CHECKPOINT_DIR, ignore_errors=True)
            return result
        finally:
            self.cleanup()


def recipe_class(method: str) -> type[FinetuneRecipe]:
    """The recipe that runs a TrainConfig.method (`dlfa train` and every sweep cell pick it here)."""
    if method == "xmixup":
        from dlfa.training.xmixup import XMixupRecipe

        return XMixupRecipe
    return FinetuneRecipe


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None

