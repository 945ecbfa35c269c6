"""X-Mixup training: the objective, scheduled sampling, parallel-pair data, and ``XMixupRecipe``.

``XMixupRecipe`` is :class:`FinetuneRecipe` with three things replaced: the training data (parallel pairs:
an English example and its translation, same label; for tagging, a tagged English sentence and its translation,
tagged or not), the model (a :class:`XMixupModel` around the usual DLFA model, so ``--fuse-layer`` composes)
and the loss of a training batch. Checkpoint selection on English dev, the zero-shot evaluation of ``best/`` on
the target languages, checkpoints and ``--resume`` are the recipe's own.

**Objective** (per batch, as in the authors' ``XMixupForSequenceClassification``)::

    loss = alpha * CE(source) + (1 - alpha) * CE(target)          task loss, mean over the batch
         + w_kl  * KL(p_source || p_target)                          sum over labels, mean over the batch
         + w_mse * MSE(r_source, r_target)                            mean over hidden units, mean over the batch

``r`` is the representation the head reads at the first token ([CLS]/<s>) for sentence-pair tasks (the
authors' ``sequence_output[:, 0]``); for tagging, the mean over non-padding tokens. Gradients flow into both
sides of KL and MSE (the authors use no stop-gradient). For tagging, the target side has no labels unless
projected labels are given: its task term is then left out (the task loss is the source loss alone) and there
is no KL (tokens are not aligned); the authors' tagging model has MSE only as well.

**Scheduled sampling.** With probability ``p(step)`` a batch's target pass is mixed with the source; otherwise
it runs plain (the source pass and all loss terms stay). At inference dlfa scores the target language alone, so
moving from mixed towards plain target passes makes training end where inference is. Schedules:
``inverse_sigmoid`` (the authors' ``p = k / (k + exp(step / k))``; their scripts use k = 1000, we default to
the k with p = 0.5 at half of training, so the decay fits short runs), ``linear`` (``p = 1 - step / total``)
and ``constant`` (always mixed). The authors' alternative to a gold-source batch is a *back-translated* source
(their inference mixes with a translate-test source); the shared data has no back-translations and dlfa's
evaluation has no source side, so our alternative is the plain target pass. The draw for a batch is a hash of
(seed, step, micro-batch), not a random generator, so a resumed run draws exactly what the first run drew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dlfa.data.batching import MODEL_KEYS, Collator, sorted_batches
from dlfa.data.cache import cache_key
from dlfa.data.features import IGNORE_INDEX, TaggedSentence
from dlfa.data.parallel import (
    TAGGING_COLUMNS,
    ParallelPair,
    language_from_name,
    pair_parallel_files,
    read_translate_train,
    task_labels,
)
from dlfa.errors import DlfaInputError
from dlfa.evaluation.guard import check_honest_evaluation
from dlfa.io import write_json_atomic
from dlfa.modeling.modeling_dlfa import masked_mean
from dlfa.modeling.modeling_xmixup import XMixupConfig, XMixupModel, XMixupOutput, validate_xmixup_layers
from dlfa.tasks import get_task
from dlfa.training.config import TrainConfig
from dlfa.training.recipe import CONFIG_FILE, FinetuneRecipe

logger = logging.getLogger("dlfa")

SOURCE_PREFIX = "src_"
# The authors' settings: XNLI/PAWS-X alpha 0.4, mixing 0 -> 1 (our block 1); UD-POS/PAN-X alpha 0.8, 3 -> 4 (block 4).
HEAD_DEFAULTS = {"sequence": {"xmixup_layers": [1], "xmixup_alpha": 0.4},
                 "token": {"xmixup_layers": [4], "xmixup_alpha": 0.8}}
COMMON_DEFAULTS = {"xmixup_schedule": "inverse_sigmoid", "xmixup_kl_weight": 1.0, "xmixup_mse_weight": 1.0,
                   "xmixup_lambda_max": 0.5}
_LANGUAGE = re.compile(r"[a-z]{2,3}")


def resolve_xmixup_defaults(config: TrainConfig, head: str) -> TrainConfig:
    """A copy with every unset X-Mixup option (but the schedule's k, which depends on the run's length) set."""
    resolved = dataclasses.replace(config)
    for name, value in {**HEAD_DEFAULTS[head], **COMMON_DEFAULTS}.items():
        if getattr(resolved, name) is None:
            setattr(resolved, name, list(value) if isinstance(value, list) else value)
    return resolved


# -- scheduled sampling ----------------------------------------------------------------------------------------


def auto_schedule_k(total_steps: int) -> float:
    """The inverse-sigmoid k with p = 0.5 at half of training: k ln k = total / 2 (k > 1)."""
    target = max(total_steps, 1) / 2
    low, high = 1.0, max(2.0, target + 2.0)
    for _ in range(100):
        mid = (low + high) / 2
        if mid * math.log(mid) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mixing_probability(step: int, total_steps: int, schedule: str, k: float | None = None) -> float:
    """Probability that the batch after ``step`` optimizer steps is mixed."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / max(total_steps, 1))
    if schedule == "inverse_sigmoid":
        k = auto_schedule_k(total_steps) if k is None else k
        exponent = step / k
        return 0.0 if exponent > 700 else k / (k + math.exp(exponent))
    raise ValueError(f"unknown schedule {schedule!r}")


def draw_mix(seed: int, step: int, micro_batch: int, probability: float) -> bool:
    """The scheduled-sampling draw of one batch: a pure function of (seed, step, micro-batch)."""
    return random.Random(f"xmixup:{seed}:{step}:{micro_batch}").random() < probability


# -- the objective ---------------------------------------------------------------------------------------------


@dataclass
class XMixupLosses:
    total: torch.Tensor
    task: torch.Tensor
    source_task: torch.Tensor
    target_task: torch.Tensor | None  # None: no labelled target token in the batch (tagging without projection)
    kl: torch.Tensor
    mse: torch.Tensor


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy over the labelled positions (label != -100), mean; None when nothing is labelled."""
    flat = labels.reshape(-1)
    if not bool((flat != -100).any()):
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=-100)


def kl_consistency(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_source || p_target) summed over labels, mean over examples (keras' KLDivergence(src, trg))."""
    log_p = F.log_softmax(source_logits.float(), dim=-1)
    log_q = F.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def mse_consistency(source_rep: torch.Tensor, target_rep: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over hidden units, then over examples (keras' MeanSquaredError)."""
    return (source_rep.float() - target_rep.float()).pow(2).mean(dim=-1).mean()


def sentence_representation(features: torch.Tensor, attention_mask: torch.Tensor, head: str) -> torch.Tensor:
    """[CLS] for sentence(-pair) heads; mean over non-padding tokens for tagging heads."""
    return features[:, 0] if head == "sequence" else masked_mean(features, attention_mask)


def xmixup_objective(
    output: XMixupOutput,
    target_labels: torch.Tensor,
    source_labels: torch.Tensor,
    head: str,
    alpha: float,
    kl_weight: float = 1.0,
    mse_weight: float = 1.0,
) -> XMixupLosses:
    source_task = task_loss(output.source_logits, source_labels)
    if source_task is None:
        raise ValueError("a training batch without source labels")
    target_task = task_loss(output.target_logits, target_labels)
    task = source_task if target_task is None else alpha * source_task + (1 - alpha) * target_task
    if head == "sequence":
        kl = kl_consistency(output.source_logits, output.target_logits)
    else:
        kl = torch.zeros((), device=source_task.device)  # tokens of a pair are not aligned
    mse = mse_consistency(
        sentence_representation(output.source_features, output.source_attention_mask, head),
        sentence_representation(output.target_features, output.target_attention_mask, head),
    )
    total = task + kl_weight * kl + mse_weight * mse
    return XMixupLosses(total=total, task=task, source_task=source_task, target_task=target_task, kl=kl, mse=mse)


# -- data ------------------------------------------------------------------------------------------------------


class ParallelCollator:
    """Pads the target side (``input_ids``, ``labels``...) and the source side (``src_input_ids``...) separately."""

    def __init__(self, tokenizer, head: str) -> None:
        self.inner = Collator(tokenizer, head)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        target = self.inner(features)  # the Collator keeps only the unprefixed model keys
        source = self.inner([{k[len(SOURCE_PREFIX):]: v for k, v in f.items() if k.startswith(SOURCE_PREFIX)}
                             for f in features])
        return {**target, **{SOURCE_PREFIX + k: v for k, v in source.items()}}


def _first_windows(features: list[dict]) -> tuple[list[dict], int]:
    """The first window of each sentence (tagging features of a sentence are consecutive) and how many were cut."""
    first = [f for i, f in enumerate(features) if i == 0 or f["sentence_index"] != features[i - 1]["sentence_index"]]
    return first, len(features) - len(first)


def featurize_pairs(task, pairs: Sequence[ParallelPair], tokenizer, max_length: int) -> list[dict]:
    """One feature per pair: the target's model keys plus the source's, prefixed ``src_``.

    Tagging sides go through the task's own featurization (label on the first sub-token that carries characters).
    A target without tags is featurized with placeholder tags whose labels are then all ignored. The two sides of a
    pair are not aligned, so a sentence longer than ``max_length`` sub-tokens is cut to its first window (as the
    authors' 128-token truncation) instead of being split into windows that would have no partner.
    """
    sources = task.featurize([p.source for p in pairs], tokenizer, max_length)
    targets = task.featurize([p.target if p.target_labelled else
                              TaggedSentence(p.target.words, [task.labels[0]] * len(p.target.words)) for p in pairs],
                             tokenizer, max_length)
    if task.head == "token":
        (sources, cut_sources), (targets, cut_targets) = _first_windows(sources), _first_windows(targets)
        if cut_sources or cut_targets:
            logger.info("X-Mixup: %d source and %d target windows beyond --max-length %d left out", cut_sources,
                        cut_targets, max_length)
        for pair, target in zip(pairs, targets, strict=True):
            if not pair.target_labelled:
                target["labels"] = [IGNORE_INDEX] * len(target["labels"])
    if len(sources) != len(targets):
        raise ValueError("source and target featurize to different numbers of features")
    # Only the model inputs: bookkeeping keys (sentence_index...) mean nothing for a pair.
    return [{**{k: t[k] for k in MODEL_KEYS if k in t}, **{SOURCE_PREFIX + k: s[k] for k in MODEL_KEYS if k in s}}
            for s, t in zip(sources, targets, strict=True)]


def parse_parallel_spec(spec: str) -> tuple[str, str | None]:
    """``de`` -> (de, None): pair the English training file with de's; ``de=FILE`` or ``FILE`` -> a parallel TSV."""
    spec = spec.strip()
    if _LANGUAGE.fullmatch(spec):
        return spec, None
    if "=" in spec and _LANGUAGE.fullmatch(spec.split("=", 1)[0]):
        language, path = spec.split("=", 1)
        return language, path
    return language_from_name(spec), spec


@torch.no_grad()
def predict_with_translation(model: XMixupModel, features: Sequence[dict], collator: ParallelCollator,
                             batch_size: int = 64, device: torch.device | str = "cpu") -> list[int]:
    """Sentence-pair predictions for targets given with their source translation (``featurize_pairs``).

    The pair is mixed and the source and target logits are averaged (the authors' ``mixup_inference``).
    """
    was_training = model.training
    model.eval()
    results: list[int] = [0] * len(features)
    for indices in sorted_batches(features, batch_size):
        batch = {k: v.to(device) for k, v in collator([features[i] for i in indices]).items()}
        batch.pop("labels", None)
        batch.pop(SOURCE_PREFIX + "labels", None)
        predicted = model(**batch, mix=True).logits.argmax(dim=-1).cpu().tolist()
        for index, label in zip(indices, predicted, strict=True):
            results[index] = int(label)
    model.train(was_training)
    return results


# -- the recipe ------------------------------------------------------------------------------------------------


def _key(example) -> tuple[str, ...]:
    """What identifies an example's text: the two texts of a sentence pair, the words of a tagged sentence."""
    if isinstance(example, TaggedSentence):
        return tuple(example.words)
    return example.text_a, example.text_b


def _content(pair: ParallelPair) -> list:
    """Everything of a pair that its features depend on (for the feature-cache key)."""
    if isinstance(pair.source, TaggedSentence):
        return [pair.source.words, pair.source.tags, pair.target.words, pair.target.tags]
    return [pair.source.text_a, pair.source.text_b, pair.target.text_a, pair.target.text_b, pair.source.label]


class XMixupRecipe(FinetuneRecipe):
    training_method = "xmixup"
    STAT_NAMES = ("loss", "task", "source_task", "target_task", "kl", "mse", "lambda", "entropy")

    def __init__(self, config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.config = resolve_xmixup_defaults(self.config, get_task(self.config.task).head)
        self._micro_step, self._micro_batch = -1, 0
        self._running = self._empty_stats()

    # -- inputs ---------------------------------------------------------------------------------------------

    def _read_train_and_dev(self) -> tuple[list, list]:
        cfg = self.config
        validate_xmixup_layers(cfg.xmixup_layers, self.num_layers)
        train, dev = super()._read_train_and_dev()
        self.pairs, self.pair_summary, self.pair_files = self._read_pairs(train, dev)
        return train, dev

    def _read_pairs(self, train: list, dev: list) -> tuple[list[ParallelPair], dict[str, dict], list[Path]]:
        """Every parallel pair, minus the selection examples and anything that appears in an evaluation file."""
        cfg, task = self.config, self.task
        labels, aliases = task_labels(task.name)
        selection = {_key(e) for e in dev}
        training = {_key(e) for e in train}
        evaluated: set[tuple[str, ...]] = set()
        eval_files: set[Path] = set()
        for lang in self.languages:
            evaluated.update(_key(e) for e in task.read(cfg.data_dir, lang, task.eval_split))
            eval_files.update(p.resolve() for p in task.files(cfg.data_dir, lang, task.eval_split))
        pairs: list[ParallelPair] = []
        summary: dict[str, dict] = {}
        files: list[Path] = []
        leaky = set(self.leaky_languages)
        for spec in cfg.xmixup_parallel:
            language, path = parse_parallel_spec(spec)
            if path is None and task.head == "token":
                raise DlfaInputError(
                    f"{spec!r}: {task.name} files of different languages are not translations of each other, so "
                    f"they cannot be paired line by line; give a parallel tagging file {spec}=FILE "
                    f"({TAGGING_COLUMNS})", option="--xmixup-parallel")
            if path is None:
                source_file, target_file = self._line_parallel_files(language)
                read = pair_parallel_files(source_file, target_file, labels, aliases, language)
                # The translations are training data too: scoring on their split's translations leaks.
                leaky.update(check_honest_evaluation(task, cfg.data_dir, language, cfg.train_split, self.languages,
                                                     task.eval_split, cfg.allow_leaky_evaluation))
                files += [source_file, target_file]
                same_english_file = True
            else:
                file = Path(path)
                if not file.is_file():
                    raise DlfaInputError("parallel file not found" if not file.exists() else "not a regular file",
                                         path=file)
                if file.resolve() in eval_files:
                    raise DlfaInputError("is an evaluation file; X-Mixup cannot train on it", path=file)
                read = read_translate_train(file, task.name, language)
                files.append(file)
                same_english_file = False
            kept, counts = [], {"read": len(read), "selection": 0, "not_in_training_examples": 0, "evaluation": 0}
            for pair in read:
                if _key(pair.source) in selection:
                    counts["selection"] += 1  # a held-out English example, or its translation
                elif same_english_file and _key(pair.source) not in training:
                    counts["not_in_training_examples"] += 1  # e.g. beyond --max-train-examples
                elif _key(pair.source) in evaluated or _key(pair.target) in evaluated:
                    counts["evaluation"] += 1
                else:
                    kept.append(pair)
            if not same_english_file and cfg.max_train_examples is not None:
                kept = kept[: cfg.max_train_examples]
            if not kept:
                raise DlfaInputError(f"no X-Mixup training pairs left from {spec!r} (after removing selection and "
                                     f"evaluation examples: {counts})", option="--xmixup-parallel")
            counts["kept"] = len(kept)
            if task.head == "token":
                counts["labelled_targets"] = sum(p.target_labelled for p in kept)
            name = language or spec
            if name in summary:
                raise DlfaInputError(f"{name!r} given twice", option="--xmixup-parallel")
            summary[name] = counts
            pairs.extend(kept)
        self.leaky_languages = [lang for lang in self.languages if lang in leaky]
        return pairs, summary, files

    def _line_parallel_files(self, language: str) -> tuple[Path, Path]:
        cfg, task = self.config, self.task
        if language == cfg.train_language:
            raise DlfaInputError(f"{language!r} is the training language; give target languages",
                                 option="--xmixup-parallel")
        found = []
        for lang in (cfg.train_language, language):
            paths = task.files(cfg.data_dir, lang, cfg.train_split)
            if len(paths) != 1:
                raise DlfaInputError(
                    f"need exactly one {task.name} {cfg.train_split} file for {lang!r} to pair line by line, found "
                    f"{len(paths)}", option="--xmixup-parallel")
            found.append(paths[0])
        if found[0].resolve() == found[1].resolve():
            raise DlfaInputError(f"{found[0]} holds several languages; give X-Mixup pairs as a parallel file "
                                 "(source a, source b, target a, target b, label)", option="--xmixup-parallel")
        return found[0], found[1]

    # -- data, model and loss -------------------------------------------------------------------------------

    def _build_train_features(self, train_examples: list, holdout: str) -> list[dict]:
        cfg = self.config
        content = hashlib.sha256(json.dumps([_content(p) for p in self.pairs],
                                            ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
        key = cache_key(self.tokenizer, self.task.name, f"xmixup:{cfg.train_split}", ",".join(self.pair_summary),
                        cfg.max_length, self.pair_files, f"xmixup:{holdout}:{content}")
        features = self.feature_cache.get_or_build(
            key, lambda: featurize_pairs(self.task, self.pairs, self.tokenizer, cfg.max_length))
        logger.info("X-Mixup: %d parallel pairs (%s) | blocks %s | alpha %s | schedule %s",
                    len(features), ", ".join(f"{k}: {v['kept']}" for k, v in self.pair_summary.items()),
                    cfg.xmixup_layers, cfg.xmixup_alpha, cfg.xmixup_schedule)
        return features

    def _train_collator(self):
        return ParallelCollator(self.tokenizer, self.task.head)

    def _build_model(self, model_settings: dict[str, Any]) -> torch.nn.Module:
        cfg = self.config
        model = super()._build_model(model_settings)
        return XMixupModel(model, XMixupConfig(layers=list(cfg.xmixup_layers), lambda_max=cfg.xmixup_lambda_max))

    @property
    def schedule_k(self) -> float | None:
        cfg = self.config
        if cfg.xmixup_schedule != "inverse_sigmoid":
            return None
        return cfg.xmixup_schedule_k if cfg.xmixup_schedule_k is not None else auto_schedule_k(self.total_steps)

    def training_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        cfg = self.config
        if step != self._micro_step:
            self._micro_step, self._micro_batch = step, 0
        probability = mixing_probability(step, self.total_steps, cfg.xmixup_schedule, self.schedule_k)
        mix = draw_mix(cfg.seed, step, self._micro_batch, probability)
        self._micro_batch += 1
        output = self.model(**batch, mix=mix)
        losses = xmixup_objective(output, batch["labels"], batch[SOURCE_PREFIX + "labels"], self.task.head,
                                  cfg.xmixup_alpha, cfg.xmixup_kl_weight, cfg.xmixup_mse_weight)
        loss = losses.total
        if not mix and self.accelerator.num_processes > 1:
            # Distributed data parallel expects a gradient for every parameter; the mixers rest in a plain batch.
            mixers = self.accelerator.unwrap_model(self.model).mixers
            loss = loss + 0.0 * sum(p.sum() for p in mixers.parameters())
        self._record(losses, output)
        return loss

    # -- diagnostics (logged at each selection, kept in the selection history, exact across --resume) --------

    def _empty_stats(self) -> dict[str, float]:
        return {**{name: 0.0 for name in self.STAT_NAMES}, "batches": 0.0, "mixed_batches": 0.0,
                "target_task_batches": 0.0}

    def _record(self, losses: XMixupLosses, output: XMixupOutput) -> None:
        run = self._running
        run["batches"] += 1
        for name in ("task", "source_task", "kl", "mse"):
            run[name] += float(getattr(losses, name).detach())
        run["loss"] += float(losses.total.detach())
        if losses.target_task is not None:
            run["target_task"] += float(losses.target_task.detach())
            run["target_task_batches"] += 1
        if output.mixed and output.stats:
            run["mixed_batches"] += 1
            run["lambda"] += sum(float(s.lam.detach().mean()) for s in output.stats.values()) / len(output.stats)
            run["entropy"] += sum(float(s.entropy.detach().mean()) for s in output.stats.values()) / len(output.stats)

    def _interval_stats(self) -> dict[str, float | None]:
        run = self._running
        n, mixed = max(run["batches"], 1), run["mixed_batches"]
        return {
            "loss": run["loss"] / n, "task": run["task"] / n, "source_task": run["source_task"] / n,
            "target_task": run["target_task"] / run["target_task_batches"] if run["target_task_batches"] else None,
            "kl": run["kl"] / n, "mse": run["mse"] / n, "mixed_fraction": mixed / n,
            "lambda": run["lambda"] / mixed if mixed else None, "entropy": run["entropy"] / mixed if mixed else None,
        }

    def train(self) -> None:
        if self.resume_from is not None:
            try:
                state = json.loads((self.resume_from / "state.json").read_text(encoding="utf-8"))
                self._running = {**self._empty_stats(), **state["progress"].get("xmixup_running", {})}
            except (OSError, ValueError, KeyError, TypeError):
                pass  # load_checkpoint in train() reports a damaged checkpoint
        super().train()

    def _checkpoint(self, loop: dict[str, Any]) -> None:
        loop["xmixup_running"] = dict(self._running)
        super()._checkpoint(loop)

    def _select(self, step: int, epoch: int, train_loss: float) -> None:
        stats = self._interval_stats()
        self._running = self._empty_stats()
        logger.info("step %d X-Mixup | task %.4f (source %.4f, target %s) kl %.4f mse %.4f | mixed %.0f%% | "
                    "lambda %s | H(A) %s", step, stats["task"], stats["source_task"], _fmt(stats["target_task"]),
                    stats["kl"], stats["mse"], 100 * stats["mixed_fraction"], _fmt(stats["lambda"]),
                    _fmt(stats["entropy"]))
        count = len(self.history)
        super()._select(step, epoch, train_loss)
        if len(self.history) > count:
            self.history[-1]["xmixup"] = stats

    # -- records ---------------------------------------------------------------------------------------------

    def _xmixup_record(self) -> dict[str, Any]:
        cfg = self.config
        model = self.accelerator.unwrap_model(self.model)
        return {
            "parallel": list(cfg.xmixup_parallel), "pairs": self.pair_summary, "layers": list(cfg.xmixup_layers),
            "alpha": cfg.xmixup_alpha, "schedule": cfg.xmixup_schedule, "schedule_k": self.schedule_k,
            "kl_weight": cfg.xmixup_kl_weight, "mse_weight": cfg.xmixup_mse_weight,
            "lambda_max": cfg.xmixup_lambda_max, "mixer_init": dict(model.xmixup_config.init),
        }

    def _write_config(self) -> None:
        super()._write_config()
        if self.accelerator.is_main_process:
            path = self.output_dir / CONFIG_FILE
            data = json.loads(path.read_text(encoding="utf-8"))
            data["xmixup"] = self._xmixup_record()
            write_json_atomic(path, data)

    def _method_fields(self) -> dict[str, Any]:
        return {"method": "xmixup", "fuse_layer": self.config.fuse_layer, "xmixup": self._xmixup_record()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
