"""The fine-tuning recipe: train on English, select on English dev, score every target language.

One class, built from a :class:`TrainConfig`, in three stages: ``setup`` (read and check every input before
anything is written), ``train`` (accelerate loop with English-dev checkpoint selection) and ``evaluate``
(zero-shot scores of the selected model). ``run`` does all three. The CLI only builds the config.

A run folder holds ``config.json`` (the resolved config), ``train.log``, ``best/`` (the selected model: one
Hugging Face model folder with its tokenizer, see ``dlfa.modeling.storage``; its model card ``README.md`` is
written from ``metrics.json``) and ``metrics.json``, which marks a finished run. Files are written atomically, so a folder never holds a
half-written file; a run whose ``metrics.json`` is missing did not finish.

Precision and optimizer (docs/training.md):

* ``--mixed-precision auto`` (default) is bf16 autocast on a CPU with native bf16 instructions and fp32 elsewhere
  (:mod:`dlfa.training.precision`); training and every evaluation autocast alike. Weights, gradients and AdamW
  moments stay fp32. The precision and the reason are logged, printed and kept in ``config.json``.
* The optimizer is AdamW (weight decay on every parameter of two or more dimensions, none on biases and norms),
  by default with torch's fused kernel (``--adamw-implementation``: the same update rule in one pass).
* ``--embedding-updates lazy`` (default) departs from AdamW for the word-embedding table only: its gradient is
  sparse (the batch's rows) and only those rows are updated, with AdamW's exact update at the global step; rows a
  batch does not touch get neither weight decay nor a momentum step, and their moments do not decay until the
  row is next seen ("lazy Adam", :mod:`dlfa.training.optim`, whose docstring tabulates every difference). Moments
  are kept for the rows seen so far only; checkpoints hold them in AdamW's layout, and resumption is exact.
  ``--embedding-updates dense --adamw-implementation for-loop --mixed-precision no`` is the optimizer and
  precision of dlfa before these options (torch's AdamW, fp32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
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
from dlfa.io import CHECKSUMS_NAME as CHECKPOINT_CHECKSUMS
from dlfa.io import atomic_path, check_new_output, recover_folder, write_json_atomic
from dlfa.modeling.modeling_dlfa import (
    HEAD_CLASSES,
    DLFAConfig,
    DLFAConfigError,
    DLFAWeightsError,
    encoder_num_layers,
)
from dlfa.modeling.storage import config_input_error, load_dlfa_model, save_dlfa_model
from dlfa.tasks import get_task
from dlfa.training.checkpoint import load_checkpoint, save_checkpoint
from dlfa.training.config import LOCATION_FIELDS, TrainConfig, method_family
from dlfa.training.optim import build_optimizer, clip_gradients, kernel_name, word_embeddings
from dlfa.training.precision import cpu_bf16_flags, precision_name, resolve_mixed_precision

logger = logging.getLogger("dlfa")

BEST_DIR = "best"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
LOG_FILE = "train.log"
CHECKPOINT_DIR = "checkpoint"
FAILED_FILE = "failed.json"
# What runs saved before these options existed did: torch's AdamW over the dense table (for-loop kernel on CPU; on
# GPUs torch's default, foreach, the same update).
LEGACY_VALUES = {"adamw_implementation": "for-loop", "embedding_updates": "dense"}
# Everything a run writes into its folder: --overwrite removes these (and nothing else) before it trains again.
RUN_ARTEFACTS = (BEST_DIR, METRICS_FILE, CONFIG_FILE, LOG_FILE, CHECKPOINT_DIR, FAILED_FILE)


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
        # The data folder is recorded absolute: evaluating or resuming from another directory reads the same files.
        self.config = dataclasses.replace(config.with_task_defaults(), data_dir=os.path.abspath(config.data_dir))
        self.overwrite = overwrite
        self.resume = resume
        self.resume_from: Path | None = None
        self.show_progress = show_progress
        self.output_dir = Path(self.config.output_dir)
        self._log_handler: logging.Handler | None = None

    # -- setup -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check every input; only then create the run folder, the model and the optimiser."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DataLoaderConfiguration, set_seed
        from transformers import AutoConfig

        cfg = self.config
        if cfg.method != self.training_method:
            raise DlfaInputError(f"{type(self).__name__} runs method {self.training_method!r}, not {cfg.method!r} "
                                 "(`dlfa train` picks the recipe of each method)", option="--method")
        check_tracker(cfg.report_to)
        # The processes of a data-parallel run meet here (no file is written by this): everything below is checked
        # by every process, and only the main process writes. The device decides what --mixed-precision auto means.
        on_cpu = cfg.cpu or _cpu_processes()
        process_state = PartialState(cpu=on_cpu)
        self.mixed_precision, self.precision_reason = self._resolve_precision(process_state.device)
        _release_accelerator_state(self.mixed_precision, process_state.num_processes)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            cpu=on_cpu,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # Each batch of the loader is split between the processes: a step sees the same global batch, and the
            # number of steps (hence the schedule) is the one of a single process.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=str(self.output_dir / TRACKING_DIR),
        )
        check_process_count(accelerator)
        micro_batch = cfg.batch_size // cfg.gradient_accumulation_steps
        if micro_batch % accelerator.num_processes:
            raise DlfaInputError(f"the batch of {cfg.batch_size} ({micro_batch} per accumulation step) cannot be split "
                                 f"evenly between {accelerator.num_processes} processes", option="--batch-size")
        self.task = task = get_task(cfg.task)
        # The named scorer (None: the task's default) and how UD text is read; both checked before writing.
        self.scorer = task.get_scorer(cfg.scorer)
        self.preprocessing = task.preprocessing_from(cfg)
        task.check_data_dir(cfg.data_dir)
        self.languages = task.resolve_languages(cfg.data_dir, cfg.languages, option="--languages")
        self.leaky_languages = check_honest_evaluation(
            task, cfg.data_dir, cfg.train_language, cfg.train_split, self.languages, task.eval_split,
            cfg.allow_leaky_evaluation,
        )
        self._check_output_dir()
        self._precision_warning: str | None = None
        if self.resume_from is not None:
            self._check_resumed_precision()

        # The encoder's depth decides which fused layers are valid: check before loading any weights.
        self.model_path = resolve_model(cfg.model)
        try:
            encoder_config = AutoConfig.from_pretrained(self.model_path)
        except (OSError, ValueError) as exc:
            raise DlfaInputError(f"cannot load model {cfg.model!r}: {str(exc).splitlines()[0]}", option="--model") from None
        self.num_layers = encoder_num_layers(encoder_config)
        cfg.check_against_encoder(encoder_config)
        check_safetensors_weights(self.model_path)
        self.model_settings = self._model_settings(task, encoder_config)

        self.tokenizer = load_tokenizer(self.model_path)
        train_examples, dev_examples = self._read_train_and_dev()
        self.eval_examples = self._read_eval_examples()

        # Inputs are good: from here on we write (the main process; the others wait for it).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._prepare_output_dir()
            self._start_logging()
        accelerator.wait_for_everyone()
        # Process 0 draws what a single process would; the others their own dropout (DDP copies process 0's weights).
        set_seed(cfg.seed, device_specific=True)
        self.collator = Collator(self.tokenizer, task.head)
        self.feature_cache = FeatureCache(enabled=cfg.feature_cache)
        holdout = self._holdout_tag()
        with accelerator.main_process_first():  # the main process tokenizes and caches; the others read the cache
            self.train_features = self._build_train_features(train_examples, holdout)
            self.dev_examples = dev_examples
            self.dev_features = self._features(dev_examples, cfg.train_language, cfg.dev_split,
                                               f"select:{holdout}:{cfg.max_dev_examples}")
            self.eval_features = {lang: self._features(self.eval_examples[lang], lang, task.eval_split,
                                                       f"eval:{cfg.max_eval_examples}") for lang in self.languages}
        logger.info(
            "task %s | model %s (%d layers) | fuse layer %s | %d train examples (%d features) | %d dev | targets %s",
            cfg.task, cfg.model, self.num_layers, cfg.fuse_layer, len(train_examples), len(self.train_features),
            len(dev_examples), ",".join(self.languages),
        )

        model = self._build_model(self.model_settings)
        optimizer = self._build_optimizer(model)
        self._log_precision()

        # The same order on every process (accelerate splits each batch between them).
        self.sampler_generator = torch.Generator().manual_seed(cfg.seed)
        loader = train_loader(self.train_features, self._train_collator(), micro_batch, self.sampler_generator,
                              cfg.group_by_length)
        steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self._write_config()
        if cfg.report_to != "none":
            accelerator.init_trackers(self.output_dir.name or "dlfa", config=_tracker_config(self.config.to_dict()))

    def _resolve_precision(self, device: torch.device) -> tuple[str, str]:
        """accelerate's mixed precision for ``--mixed-precision`` on ``device``, and why (see
        :mod:`dlfa.training.precision`)."""
        requested = self.config.mixed_precision
        precision, reason = resolve_mixed_precision(requested, device.type)
        if precision == "fp16" and device.type == "cpu":
            raise DlfaInputError("fp16 autocast needs a GPU; on a CPU use bf16 or auto", option="--mixed-precision")
        if precision == "bf16" and device.type == "cpu" and requested == "bf16" and not cpu_bf16_flags():
            reason += ", although this CPU has no native bf16 instructions (torch emulates them: slower than fp32)"
        return precision, reason

    def _check_resumed_precision(self) -> None:
        """A run resumed where ``auto`` resolves otherwise (another machine) continues in another precision: say so."""
        try:
            saved = json.loads((self.output_dir / CONFIG_FILE).read_text(encoding="utf-8"))["resolved"]
            before = saved["mixed_precision"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # a run from before precision was recorded
        if before != self.mixed_precision:
            self._precision_warning = (
                f"the run trained in {precision_name(before)} before the interruption and continues in "
                f"{precision_name(self.mixed_precision)} ({self.precision_reason}): the result is not the one an "
                "uninterrupted run would give")

    def _log_precision(self) -> None:
        """One line, in train.log and on the console: the precision of this run and why, and the optimizer."""
        lines = [f"precision {precision_name(self.mixed_precision)} ({self.precision_reason}) | optimizer "
                 f"{self.optimizer_description}"]
        logger.info(lines[0])
        if self._precision_warning:
            logger.warning(self._precision_warning)
            lines.append(f"warning: {self._precision_warning}")
        if self.show_progress and self.accelerator.is_main_process:
            for line in lines:
                tqdm.write(f"dlfa: {line}", file=sys.stderr)

    def _build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the decay / no-decay groups, with the kernel and embedding updates asked for
        (:mod:`dlfa.training.optim`: lazy embedding updates change AdamW for the embedding rows a batch does not
        touch)."""
        cfg = self.config
        lazy = cfg.embedding_updates == "lazy"
        if lazy and self.accelerator.num_processes > 1 and self.accelerator.device.type != "cpu":
            raise DlfaInputError("lazy embedding updates need sparse gradients, which data-parallel training "
                                 "reduces on CPU (gloo) only; use --embedding-updates dense", option="--embedding-updates")
        try:
            optimizer = build_optimizer(model, self._parameter_groups(model), cfg.learning_rate,
                                        cfg.adamw_implementation, cfg.embedding_updates)
        except ValueError as exc:
            raise DlfaInputError(str(exc), option="--embedding-updates") from None
        embeddings = word_embeddings(model)
        table = ("frozen word embeddings" if embeddings is None or not embeddings.weight.requires_grad
                 else f"{'lazy' if lazy else 'dense'} updates of the {embeddings.weight.shape[0]}-row word-embedding "
                      "table")
        self.optimizer_description = f"AdamW ({kernel_name(optimizer)} kernel), {table}"
        return optimizer

    # Hooks for recipes of other methods (X-Mixup): the training data, the model, the training loss.

    def _build_train_features(self, train_examples: list, holdout: str) -> list[dict]:
        cfg = self.config
        return self._features(train_examples, cfg.train_language, cfg.train_split,
                              f"train:{holdout}:{cfg.max_train_examples}")

    def _train_collator(self):
        return self.collator

    def _model_settings(self, task, encoder_config) -> dict[str, Any]:
        """The DLFA settings of this run (``from_encoder`` keyword arguments), checked against the encoder now,
        before anything is written."""
        cfg = self.config
        settings = {
            "fuse_layer": cfg.fuse_layer,
            "reduction": cfg.reduction,
            "aif_norm": cfg.aif_norm,
            # getattr: TrainConfigs from before these two options existed
            "aif_norm_placement": getattr(cfg, "aif_norm_placement", "bottleneck"),
            "gate_init": getattr(cfg, "gate_init", "average"),
            "id2label": list(task.labels),
            "encoder_name": cfg.model,
        }
        labels = dict(enumerate(task.labels))
        try:
            DLFAConfig(encoder=encoder_config, **{**settings, "id2label": labels})
        except DLFAConfigError as exc:
            raise config_input_error(exc) from None
        return settings

    def _build_model(self, model_settings: dict[str, Any]) -> torch.nn.Module:
        """A new DLFA model (the task's head) around the pretrained encoder."""
        model = load_pretrained(lambda: HEAD_CLASSES[self.task.head].from_encoder(self.model_path, **model_settings),
                                self.config.model)
        if self.config.freeze_embeddings:
            model.encoder.get_input_embeddings().weight.requires_grad_(False)
        return model

    def training_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The loss of one training batch; ``step`` is the number of optimizer steps done before it."""
        return self.model(**batch).loss

    def _method_fields(self) -> dict[str, Any]:
        """What metrics.json says about the method (reports make one row per method and fused layer)."""
        family = method_family(self.config, self.config.fuse_layer)
        return {"method": family or ("dlfa" if self.config.fuse_layer is not None else "baseline"),
                "fuse_layer": self.config.fuse_layer}

    def _check_output_dir(self) -> None:
        """A new run needs a new or empty folder; ``resume`` continues a run of the same config from its checkpoint.

        ``overwrite`` trains again in a folder that holds a dlfa run, never in another folder: the run's own files
        are removed (:data:`RUN_ARTEFACTS`), nothing else.
        """
        out = self.output_dir
        check_new_output(out, "--output", allow_existing_folder=True)
        self._created_output = not out.exists()
        if not (out.exists() and any(out.iterdir())):
            return
        saved = _saved_run(out)
        if saved is None:
            raise DlfaInputError(f"{out} is not empty and holds no dlfa run; choose a new or empty folder",
                                 option="--output")
        if self.resume:
            if saved != self.config.run_fields():
                raise DlfaInputError(f"{out} holds a run with another configuration "
                                     f"({_differences(saved, self.config.run_fields())}); cannot resume it",
                                     option="--output")
            recover_folder(out / CHECKPOINT_DIR, lambda p: (p / CHECKPOINT_CHECKSUMS).is_file())
            recover_folder(out / BEST_DIR, lambda p: (p / CHECKPOINT_CHECKSUMS).is_file())
            if (out / CHECKPOINT_DIR / "state.json").is_file():
                self.resume_from = out / CHECKPOINT_DIR
            return
        if not self.overwrite:
            state = "a failed run" if (out / FAILED_FILE).is_file() else "a dlfa run"
            raise DlfaInputError(f"{out} holds {state} (pass --resume to continue it, or --overwrite to train again)",
                                 option="--output")

    def _prepare_output_dir(self) -> None:
        out = self.output_dir
        if self.overwrite and not self.resume:
            for name in RUN_ARTEFACTS:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / FAILED_FILE).unlink(missing_ok=True)  # a resumed run is no longer a failed one

    def _holdout_tag(self) -> str:
        cfg = self.config
        same_file = cfg.train_split == cfg.dev_split
        return f"holdout{cfg.dev_holdout}-seed{cfg.seed}" if same_file else "none"

    def _read_train_and_dev(self) -> tuple[list, list]:
        """English train and selection examples; one file is split by seed when both name the same split."""
        cfg, task = self.config, self.task
        train = task.read(cfg.data_dir, cfg.train_language, cfg.train_split, self.preprocessing)
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
            dev = task.read(cfg.data_dir, cfg.train_language, cfg.dev_split, self.preprocessing)
        return _subset(train, cfg.max_train_examples), _subset(dev, cfg.max_dev_examples)

    def _read_eval_examples(self) -> dict[str, list]:
        """The examples scored zero-shot, per language."""
        cfg, task = self.config, self.task
        return {lang: _subset(task.read(cfg.data_dir, lang, task.eval_split, self.preprocessing), cfg.max_eval_examples)
                for lang in self.languages}

    def _features(self, examples: list, language: str, split: str, subset: str) -> list[dict]:
        cfg = self.config
        files = self.task.files(cfg.data_dir, language, split)
        key = cache_key(self.tokenizer, self.task.name, split, language, cfg.max_length, files, subset,
                        preprocessing=self.preprocessing)
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
            "config": {k: v for k, v in self.config.to_dict().items() if k not in LOCATION_FIELDS},
            "resolved": {
                "model_path": self.model_path,
                "num_layers": self.num_layers,
                "scorer": self.scorer.name,
                "preprocessing": self.preprocessing,
                "languages": self.languages,
                "total_steps": self.total_steps,
                "train_features": len(self.train_features),
                "num_processes": self.accelerator.num_processes,
                "device": str(self.accelerator.device),
                "mixed_precision": self.mixed_precision,
                "mixed_precision_reason": self.precision_reason,
                "optimizer": self.optimizer_description,
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
                                   self.scheduler, None, accelerator.process_index, accelerator.num_processes)
            loop.update(loop.pop("local", {}))  # this process's own running loss sums
            loop["loss_count"] = int(loop["loss_count"])
            resume_rng = torch.get_rng_state()
            logger.info("resumed from %s at step %d", self.resume_from, loop["step"])
        self.history, self.best = loop["history"], loop["best"]
        started = time.time() - loop["train_seconds"]
        steps_per_epoch = max(1, math.ceil(len(self.loader) / cfg.gradient_accumulation_steps))
        progress = tqdm(total=self.total_steps, initial=loop["step"], desc="train",
                        disable=not (self.show_progress and accelerator.is_main_process))
        meter = StepMeter(accelerator)
        try:
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
                        if not torch.isfinite(loss.detach()).all():
                            # Training on would only report the metrics of a broken model.
                            raise DlfaInputError(f"training diverged: the loss is {loss.item()} at step "
                                                 f"{loop['step'] + 1} (try a lower learning rate)",
                                                 option="--learning-rate")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm:
                            # accelerator.clip_grad_norm_, also for the sparse gradients of lazy embedding updates
                            meter.grad_norm = clip_gradients(accelerator, self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad()
                    loop["batches_done"] += 1
                    loop["running_loss"] += loss.detach().float().item()
                    loop["loss_count"] += 1
                    meter.add(batch, loss)
                    if not accelerator.sync_gradients:
                        continue
                    loop["step"] += 1
                    step = loop["step"]
                    progress.update(1)
                    progress.set_postfix(loss=f"{loop['running_loss'] / loop['loss_count']:.4f}", epoch=loop["epoch"])
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        self._log(meter.flush(self.scheduler.get_last_lr()[0], loop["epoch"]), step)
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
        finally:
            progress.close()  # before any error message: a bar left open would swallow its line
        self.train_seconds = time.time() - started
        logger.info("training done in %.1fs; best English dev %s %.2f at step %d", self.train_seconds,
                    self.scorer.metric, self.best["score"], self.best["step"])
        from dlfa.reporting.references import check_selected_score

        self.selection_warning = check_selected_score(self.task.name, self.scorer.metric, self.best["score"],
                                                      self.config.train_language)
        if self.selection_warning and accelerator.is_main_process:
            logger.warning(self.selection_warning)
            tqdm.write(f"dlfa: warning: {self.selection_warning}", file=sys.stderr)

    def _log(self, values: dict[str, float], step: int) -> None:
        """Training curves to the trackers (every process calls it; accelerate logs from the main one)."""
        if self.config.report_to != "none":
            self.accelerator.log(values, step=step)

    def _checkpoint(self, loop: dict[str, Any]) -> None:
        accelerator = self.accelerator
        save_checkpoint(self.output_dir / CHECKPOINT_DIR, accelerator.unwrap_model(self.model), self.optimizer,
                        self.scheduler, None, loop, accelerator.process_index, accelerator.num_processes,
                        accelerator.wait_for_everyone,
                        local={"running_loss": loop["running_loss"], "loss_count": loop["loss_count"]})

    # Hooks for recipes that score differently (X-Mixup's mixup inference): English dev, the best model, a language.

    def _dev_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """English-dev metrics of the model being trained (the selection signal)."""
        return self._predict_scores(model, self.dev_examples, self.dev_features, "dev")

    def _load_best(self) -> torch.nn.Module:
        return load_dlfa_model(self.output_dir / BEST_DIR, device=self.accelerator.device)

    def _language_metrics(self, model: torch.nn.Module, lang: str) -> dict[str, Any]:
        """Zero-shot metrics of the selected model on one target language."""
        return self._predict_scores(model, self.eval_examples[lang], self.eval_features[lang], f"eval {lang}")

    def _desc(self, desc: str) -> str | None:
        """A progress bar's label, or None for no bar (quiet runs, and processes other than the main one)."""
        return desc if self.show_progress and self.accelerator.is_main_process else None

    def _predict_scores(self, model, examples: list, features: list, desc: str | None) -> dict[str, Any]:
        """The task's metrics of ``model`` on examples, the batches shared between the processes (every process
        gets the same, complete result)."""
        return evaluate_examples(
            self.task, model, examples, features, self.collator, self.config.eval_batch_size, self.accelerator.device,
            desc=self._desc(desc),
            autocast_dtype=self._autocast_dtype(), scorer=self.scorer.name, accelerator=self.accelerator,
        )

    def _select(self, step: int, epoch: int, train_loss: float) -> None:
        """Score English dev; keep the model if it is the best so far (the only selection signal).

        Every process scores its share of the dev batches and receives all predictions, so every process reaches
        the same decision; only the main process writes ``best/``."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.model)
        metrics = self._dev_metrics(model)
        score = metrics[self.scorer.metric]
        train_loss = float(accelerator.reduce(torch.tensor(train_loss, device=accelerator.device), "mean"))
        record = {"step": step, "epoch": epoch, "train_loss": train_loss, "dev": metrics, "score": score}
        self.history.append(record)
        improved = self.best is None or score > self.best["score"]
        line = (f"step {step}/{self.total_steps} epoch {epoch} | loss {train_loss:.4f} | {self.config.train_language} "
                f"dev {self.scorer.metric} {score:.2f}{' (best)' if improved else ''}")
        logger.info(line)
        if self.show_progress and accelerator.is_main_process:
            tqdm.write(line, file=sys.stderr)
        self._log({f"dev/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
        if improved:
            self.best = record
            if accelerator.is_main_process:
                with atomic_path(self.output_dir / BEST_DIR, replace_folder=True) as tmp:
                    save_dlfa_model(model, tmp, self.tokenizer)
        accelerator.wait_for_everyone()

    def _autocast_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision)

    # -- evaluation ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Zero-shot scores of the selected model on every target language, the batches shared between the
        processes; the main process writes metrics.json. Every process returns the result."""
        accelerator = self.accelerator
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
            "scorer": self.scorer.name,
            "primary_metric": self.scorer.metric,
            "eval_split": self.task.eval_split,
            **({"preprocessing": self.preprocessing} if self.preprocessing else {}),
            "selection": {
                "language": self.config.train_language,
                "split": self.config.dev_split,
                "held_out_from_training_file": self.config.train_split == self.config.dev_split,
                "best_step": self.best["step"],
                "best_score": self.best["score"],
                "warning": self.selection_warning,
                "history": self.history,
            },
            "languages": per_language,
            "leaky_languages": self.leaky_languages,
            "average": {m: average(per_language, m) for m in metric_names},
            "average_zero_shot": {m: average(per_language, m, exclude=[self.config.train_language])
                                  for m in metric_names},
            "num_processes": accelerator.num_processes,
            "train_seconds": self.train_seconds,
        }
        self._log({f"{self.task.eval_split}/{lang}/{k}": v for lang, m in per_language.items()
                   for k, v in m.items() if isinstance(v, float)}
                  | {f"{self.task.eval_split}/average/{k}": v for k, v in result["average"].items() if v is not None},
                  self.best["step"])
        if accelerator.is_main_process:
            write_json_atomic(self.output_dir / METRICS_FILE, result)
            self._write_model_card()
        accelerator.wait_for_everyone()
        return result

    def _write_model_card(self) -> None:
        """best/README.md from metrics.json; a run is finished without it, so a disk error only warns."""
        from dlfa.modeling.card import write_model_card

        try:
            write_model_card(self.output_dir)
        except OSError as exc:
            logger.warning("could not write the model card %s: %s", self.output_dir / BEST_DIR / "README.md", exc)

    def finished_result(self) -> dict[str, Any] | None:
        """The metrics of an already finished run in the output folder (for resumable sweeps)."""
        path = self.output_dir / METRICS_FILE
        if not path.is_file():
            return None
        saved = _saved_run(self.output_dir)
        if saved is not None and saved != self.config.run_fields():
            raise DlfaInputError(f"{self.output_dir} holds a run with another configuration "
                                 f"({_differences(saved, self.config.run_fields())})", option="--output")
        return json.loads(path.read_text(encoding="utf-8"))

    def cleanup(self) -> None:
        if self._log_handler is not None:
            logger.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def run(self) -> dict[str, Any]:
        """setup, train, evaluate. A run that fails before it starts leaves no folder; one that fails (or is
        interrupted) after it started keeps its folder, marked with ``failed.json``, and ``--resume`` continues it."""
        if self.resume:
            done = self.finished_result()
            if done is not None:
                logger.info("%s already finished; skipping", self.output_dir)
                return done
        started = False
        try:
            self.setup()
            started = True
            self.train()
            result = self.evaluate()
            # Trackers end with the run. The process group is the process's, not the run's (a caller may run
            # more): the entry point ends it, see end_process_group().
            for tracker in self.accelerator.trackers:
                tracker.finish()
            if self.accelerator.is_main_process:
                # The run is complete: the resumption state (weights + optimizer moments) is no longer needed.
                shutil.rmtree(self.output_dir / CHECKPOINT_DIR, ignore_errors=True)
                if not self.config.keep_weights:
                    from dlfa.reporting.prune import prune_run

                    logger.info(prune_run(self.output_dir).summary())
            return result
        except BaseException as exc:
            main = getattr(self, "accelerator", None) is None or self.accelerator.is_main_process
            if not started and main and getattr(self, "_created_output", False):
                shutil.rmtree(self.output_dir, ignore_errors=True)  # ours, made in this call, holds no work yet
            elif started:
                self._mark_failed(exc)
            raise
        finally:
            self.cleanup()

    def _mark_failed(self, exc: BaseException) -> None:
        if not getattr(self, "accelerator", None) or not self.accelerator.is_main_process:
            return
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc).splitlines() or [""])[0]
        record = {"error": type(exc).__name__, "message": reason,
                  "resumable": (self.output_dir / CHECKPOINT_DIR / "state.json").is_file()}
        try:
            write_json_atomic(self.output_dir / FAILED_FILE, record)
        except OSError:  # a full disk may be why the run failed; the original error is what matters
            pass


def recipe_class(method: str) -> type[FinetuneRecipe]:
    """The recipe that runs a TrainConfig.method (`dlfa train` and every sweep cell pick it here)."""
    if method == "xmixup":
        from dlfa.training.xmixup import XMixupRecipe

        return XMixupRecipe
    return FinetuneRecipe


def _saved_run(run_dir: Path) -> dict[str, Any] | None:
    """The run fields of the config saved in a run folder (older dlfa versions' too), or None if there is none."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))["config"]
        saved = {k: v for k, v in saved.items() if k not in LOCATION_FIELDS}
        # A run saved before an option existed ran with that option's old behaviour, not with today's default.
        return TrainConfig.from_dict({**LEGACY_VALUES, **saved, "output_dir": str(run_dir)}).run_fields()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DlfaInputError):
        return None


def _differences(saved: dict[str, Any], current: dict[str, Any], shown: int = 3) -> str:
    """Which run fields differ, e.g. "mixed_precision: no there, auto here" (runs saved before a default
    changed differ in that field: pass the saved value to continue them)."""
    names = [name for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
    text = "; ".join(f"{name}: {saved.get(name)!r} there, {current.get(name)!r} here" for name in names[:shown])
    return text + (f"; {len(names) - shown} more" if len(names) > shown else "")


def load_pretrained(load, name: str):
    """``load()``, with a damaged or unreadable encoder (truncated weights, a bad header) as one line on --model."""
    from safetensors import SafetensorError

    try:
        return load()
    except DlfaInputError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, DLFAWeightsError) as exc:
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DlfaInputError(f"cannot load the weights of {name!r} ({message})", option="--model") from None


def check_safetensors_weights(model_path: str) -> None:
    """A local encoder folder must hold safetensors weights: dlfa never unpickles a third party's file."""
    folder = Path(model_path)
    if not folder.is_dir():
        return  # a hub id: loaded with use_safetensors=True, which refuses pickle-only repositories
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        found = f"only {', '.join(pickles)} (pickle)" if pickles else "no weights"
        raise DlfaInputError(f"{folder} holds {found}; dlfa loads safetensors weights only (convert them with "
                             "transformers' save_pretrained(..., safe_serialization=True) in a trusted environment)",
                             option="--model")


TRACKING_DIR = "logs"  # trackers' files (TensorBoard event files) inside the run folder
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_tracker(report_to: str) -> None:
    """A tracker whose package is missing is refused before anything is written (not a crash at the first log)."""
    import importlib.util

    packages = TRACKER_PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise DlfaInputError(f"{report_to} is not installed (pip install {packages[-1]})", option="--report-to")


def _tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers take them: numbers, strings and booleans (lists as text, None as "none")."""
    return {k: v if isinstance(v, (int, float, str, bool)) else ("none" if v is None else str(v))
            for k, v in config.items()}


class StepMeter:
    """What the trackers get every ``log_every`` steps: mean loss, learning rate, gradient norm, tokens/s (summed
    over the processes, reduced once per interval rather than every step)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.loss, self.batches, self.tokens = 0.0, 0, 0
        self.grad_norm: torch.Tensor | float | None = None
        self.since = time.time()

    def add(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.loss += loss.detach().float().item()
        self.batches += 1
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def flush(self, learning_rate: float, epoch: int) -> dict[str, float]:
        accelerator = self.accelerator
        totals = accelerator.reduce(torch.tensor([self.loss, self.batches, self.tokens], dtype=torch.float64,
                                                 device=accelerator.device), "sum").tolist()
        seconds = max(time.time() - self.since, 1e-9)
        values = {"train/loss": totals[0] / max(totals[1], 1), "train/learning_rate": learning_rate,
                  "train/tokens_per_second": totals[2] / seconds, "train/epoch": float(epoch)}
        if self.grad_norm is not None:
            values["train/grad_norm"] = float(self.grad_norm)
        self.loss, self.batches, self.tokens, self.since = 0.0, 0, 0, time.time()
        return values


def _release_accelerator_state(mixed_precision: str, num_processes: int) -> None:
    """accelerate keeps one mixed precision per process and refuses another one: a run in a (single) process that
    ran a run of another precision before (the Python API, a notebook) starts from a fresh accelerator state."""
    from accelerate.state import AcceleratorState, GradientState

    before = AcceleratorState._shared_state.get("_mixed_precision")
    if before is not None and before != mixed_precision and num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def end_process_group() -> None:
    """End torch.distributed in this process (no-op without it), in one order on every process: let go of what
    holds the group (the DDP wrapper and its reducer: the caller drops the recipe), meet the other processes, then
    destroy the group. Destroying it inside the run and leaving the wrapper to Python's exit, after a peer may
    have gone, preceded runs that never ended (issue 10; pytorch/pytorch#75097 reports the same kind of hang).
    Call it after a run that succeeded on every process: after a failure, a barrier would wait for a process
    that is gone."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _cpu_processes() -> bool:
    """Several processes (torchrun, mpirun) on a machine without a GPU: accelerate runs them as one-process runs
    unless told that this is the CPU, then it joins them with the gloo backend."""
    world = max(int(os.environ.get(name, "1") or 1) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return world > 1 and not torch.cuda.is_available()


def check_process_count(accelerator) -> None:
    """``accelerate launch --cpu --num_processes 2`` starts one process (accelerate's --cpu launcher ignores the
    count): refuse to train on fewer processes than the launcher was asked for, instead of a silent 1-process run."""
    asked = _launcher_process_count(os.getppid())
    if asked is not None and asked != accelerator.num_processes:
        raise DlfaInputError(
            f"the launcher was asked for {asked} processes but started {accelerator.num_processes} (accelerate launch "
            f"--cpu runs one process); for {asked} CPU processes use: torchrun --nproc_per_node {asked} -m dlfa train "
            "...", option="--num_processes")


def _launcher_process_count(pid: int) -> int | None:
    """``--num_processes N`` of an ``accelerate launch`` parent process, read from /proc (Linux); None otherwise."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in Path(a).name for a in args[:3]):  # accelerate launch, python -m accelerate...
        return None
    for i, arg in enumerate(args):
        if arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--num_processes", "--num-processes") and i + 1 < len(args):
            value = args[i + 1]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None
