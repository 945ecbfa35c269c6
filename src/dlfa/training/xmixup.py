"""X-Mixup training and inference: the objective, scheduled sampling, pair data, mixup inference, ``XMixupRecipe``.

Follows the authors' code (github.com/yhy1117/X-Mixup); docs/xmixup.md has the point-by-point table.

**Every training batch is mixed.** Scheduled sampling chooses the batch's *source*: the gold English source with
probability ``p(step) = k / (k + exp(step / k))`` (k = 1000, the authors' ``p_k``; ``step`` = optimizer steps
done), otherwise the English back-translation of the target (their ``input_ids_back_trans``), which is what
mixup inference meets at test time (a machine translation of the target into English). Without back-translations
every batch uses the gold source. The draw of a batch is a pure function of (seed, step, micro-batch), so a resumed
run draws exactly what the first run drew (also under several processes: each process draws the same value).

**Objective, sentence-pair tasks** (their ``XMixupFor*SequenceClassification``), per example, then the batch mean::

    loss = alpha * CE(source) + (1 - alpha) * CE(mixed target)
         + w_kl * KL(p_source || p_target)         keras KLDivergence: probabilities clipped to [1e-7, 1]
         + w_mse * MSE(h_source[CLS], h_target[CLS])  mean over hidden units

A back-translated source keeps the pair's label. **Tagging** (their ``XMixupFor*TokenClassification``)::

    loss = alpha * CE(source, gold tags) + (1 - alpha) * SoftCE(mixed target, soft labels) + w_mse * MSE(r_s, r_t)

``SoftCE = mean over target words of -sum q log(softmax(z) + 1e-6)`` against the target's soft labels (the
authors' teacher distributions; one-hot when the file gives tags); with a back-translated source the task loss is
the target term alone (the back-translation has no tags). No KL. ``r`` is the pooled representation of
:meth:`XMixupModel.head_outputs`.

**Mixup inference** (their ``--mixup_inference``): each evaluation example is mixed with its English translation
from a translate-test file and, for pair tasks, the source and target logits are averaged; English is mixed with
itself. A language without a translate-test file is scored on the target alone, and ``metrics.json`` says so per
language (``"inference": "target-only"``).
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
from dlfa.data.features import IGNORE_INDEX, TaggedSentence, piece_carries_characters
from dlfa.data.parallel import (
    TAGGING_COLUMNS,
    ParallelPair,
    language_from_name,
    pair_parallel_files,
    read_sentence_translations,
    read_translate_train,
    task_labels,
    translate_test_file,
)
from dlfa.errors import DlfaInputError
from dlfa.evaluation.guard import check_honest_evaluation
from dlfa.io import write_json_atomic
from dlfa.modeling.modeling_xmixup import (
    XMixupConfig,
    XMixupModel,
    XMixupOutput,
    check_encoder_type,
    validate_xmixup_layers,
)
from dlfa.tasks import get_task
from dlfa.training.config import TrainConfig
from dlfa.training.recipe import BEST_DIR, CONFIG_FILE, FinetuneRecipe

logger = logging.getLogger("dlfa")

SOURCE_PREFIX = "src_"
BACK_PREFIX = "bt_"
# The authors' settings: XNLI/PAWS-X alpha 0.4, mixing 0 -> 1 (our block 1); UD-POS/PAN-X alpha 0.8, 3 -> 4 (block 4).
HEAD_DEFAULTS = {"sequence": {"xmixup_layers": [1], "xmixup_alpha": 0.4},
                 "token": {"xmixup_layers": [4], "xmixup_alpha": 0.8}}
COMMON_DEFAULTS = {"xmixup_schedule": "inverse_sigmoid", "xmixup_schedule_k": 1000.0, "xmixup_kl_weight": 1.0,
                   "xmixup_mse_weight": 1.0, "xmixup_lambda_max": 0.5, "xmixup_entropy": "authors"}
KERAS_EPSILON = 1e-7  # tf.keras.backend.epsilon(): KLDivergence clips both distributions to [eps, 1]
SOFT_LOG_EPSILON = 1e-6  # their soft-label loss: log(softmax + 1e-6)
_LANGUAGE = re.compile(r"[a-z]{2,3}")


def back_translation_files(config: TrainConfig) -> dict[str, str]:
    """``--xmixup-back-translation de=FILE,fr=FILE`` as {language: file}."""
    return dict(spec.split("=", 1) for spec in config.xmixup_back_translation or [])


def resolve_xmixup_defaults(config: TrainConfig, head: str) -> TrainConfig:
    """A copy with every unset X-Mixup option set to the authors' value for the task's head."""
    resolved = dataclasses.replace(config)
    for name, value in {**HEAD_DEFAULTS[head], **COMMON_DEFAULTS}.items():
        if getattr(resolved, name) is None:
            setattr(resolved, name, list(value) if isinstance(value, list) else value)
    return resolved


# -- scheduled sampling ----------------------------------------------------------------------------------------


def gold_probability(step: int, total_steps: int, schedule: str, k: float = 1000.0) -> float:
    """Probability that the batch after ``step`` optimizer steps uses the gold English source.

    ``inverse_sigmoid`` is the authors' ``k / (k + exp(step / k))``; ``linear`` is ``1 - step / total``;
    ``constant`` always takes the gold source.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - step / max(total_steps, 1))
    if schedule == "inverse_sigmoid":
        exponent = step / k
        return 0.0 if exponent > 700 else k / (k + math.exp(exponent))
    raise ValueError(f"unknown schedule {schedule!r}")


def draw_gold(seed: int, step: int, micro_batch: int, probability: float) -> bool:
    """The draw of one batch (the authors' ``random.random() <= p``), a pure function of (seed, step, micro-batch)."""
    return random.Random(f"xmixup:{seed}:{step}:{micro_batch}").random() <= probability


# -- the objective ---------------------------------------------------------------------------------------------


@dataclass
class XMixupLosses:
    total: torch.Tensor
    task: torch.Tensor
    source_task: torch.Tensor | None  # None: a back-translated tagging source (no tags)
    target_task: torch.Tensor
    kl: torch.Tensor
    mse: torch.Tensor


def keras_kl(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per example ``sum y log(y / p)`` with y = softmax(source), p = softmax(target), both clipped to [1e-7, 1]."""
    y = torch.softmax(source_logits.float(), dim=-1).clamp(KERAS_EPSILON, 1.0)
    p = torch.softmax(target_logits.float(), dim=-1).clamp(KERAS_EPSILON, 1.0)
    return (y * torch.log(y / p)).sum(dim=-1)


def mse_per_example(source_rep: torch.Tensor, target_rep: torch.Tensor) -> torch.Tensor:
    """keras MeanSquaredError without reduction: the mean over hidden units, one value per example."""
    return (source_rep.float() - target_rep.float()).pow(2).mean(dim=-1)


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """The authors' target term: rows whose soft labels sum to more than 0.5, mean of -sum q log(softmax + 1e-6)."""
    active = soft_labels.sum(dim=-1) > 0.5
    if not bool(active.any()):
        raise ValueError("a tagging batch without target soft labels")
    probs = torch.softmax(logits[active].float(), dim=-1)
    return -(soft_labels[active].float() * torch.log(probs + SOFT_LOG_EPSILON)).sum(dim=-1).mean()


def pair_objective(output: XMixupOutput, labels: torch.Tensor, alpha: float, kl_weight: float = 1.0,
                   mse_weight: float = 1.0) -> XMixupLosses:
    """Sentence-pair tasks: per example ``alpha CE_s + (1 - alpha) CE_t + KL + MSE``, averaged over the batch."""
    assert output.source_logits is not None and output.source_rep is not None
    ce_source = F.cross_entropy(output.source_logits.float(), labels, reduction="none")
    ce_target = F.cross_entropy(output.target_logits.float(), labels, reduction="none")
    task = alpha * ce_source + (1 - alpha) * ce_target
    kl = keras_kl(output.source_logits, output.target_logits)
    mse = mse_per_example(output.source_rep, output.target_rep)
    total = (task + kl_weight * kl + mse_weight * mse).mean()
    return XMixupLosses(total=total, task=task.mean(), source_task=ce_source.mean(), target_task=ce_target.mean(),
                        kl=kl.mean(), mse=mse.mean())


def tagging_objective(output: XMixupOutput, source_labels: torch.Tensor | None, soft_labels: torch.Tensor,
                      alpha: float, mse_weight: float = 1.0) -> XMixupLosses:
    """Tagging: ``alpha CE(source) + (1 - alpha) SoftCE(target) + MSE``; the target term alone without gold tags."""
    assert output.source_rep is not None
    target_task = soft_cross_entropy(output.target_logits, soft_labels)
    source_task = None
    if source_labels is not None:
        assert output.source_logits is not None
        flat = source_labels.reshape(-1)
        source_task = F.cross_entropy(output.source_logits.reshape(flat.numel(), -1).float(), flat,
                                      ignore_index=IGNORE_INDEX)
        task = alpha * source_task + (1 - alpha) * target_task
    else:
        task = target_task
    mse = mse_per_example(output.source_rep, output.target_rep).mean()
    total = task + mse_weight * mse
    return XMixupLosses(total=total, task=task, source_task=source_task, target_task=target_task,
                        kl=torch.zeros((), device=total.device), mse=mse)


# -- features --------------------------------------------------------------------------------------------------


def pooled_tagging_features(task, sentences: Sequence[TaggedSentence], tokenizer, max_length: int,
                            first_window: bool = False) -> list[dict]:
    """The task's tagging features plus ``pool_index``: per position, the position its word's states are summed
    into (the word's labelled sub-token), -1 for special tokens.

    ``first_window`` keeps one feature per sentence (a pair's sides are not aligned, so a window without its
    partner means nothing; the authors truncate at 128 sub-tokens).
    """
    features = task.featurize(sentences, tokenizer, max_length)
    if first_window:
        features = [f for i, f in enumerate(features)
                    if i == 0 or f["sentence_index"] != features[i - 1]["sentence_index"]]
    chunk = 1000
    encodings: dict[int, tuple[list[int], list[int | None], list[str]]] = {}
    for start in range(0, len(sentences), chunk):
        part = sentences[start:start + chunk]
        encoded = tokenizer([s.words for s in part], is_split_into_words=True, add_special_tokens=True,
                            truncation=False, verbose=False)  # windowed above (task.featurize), not truncated
        for offset in range(len(part)):
            ids = encoded["input_ids"][offset]
            tokens = (encoded.encodings[offset].tokens if encoded.encodings
                      else tokenizer.convert_ids_to_tokens(ids))
            encodings[start + offset] = (ids, encoded.word_ids(offset), tokens)
    for feature in features:
        ids, word_ids, tokens = encodings[feature["sentence_index"]]
        feature["pool_index"] = _pool_index(feature, ids, word_ids, tokens, max_length)
    return features


def _pool_index(feature: dict, ids: list[int], word_ids: list[int | None], tokens: list[str],
                max_length: int) -> list[int]:
    first = next((i for i, w in enumerate(word_ids) if w is not None), len(ids))
    last = max((i for i, w in enumerate(word_ids) if w is not None), default=first - 1)
    prefix, suffix = first, len(ids) - last - 1
    pieces: dict[int, list[int]] = {}
    for pos in range(first, last + 1):
        if word_ids[pos] is not None:
            pieces.setdefault(word_ids[pos], []).append(pos)
    budget = max(1, max_length - prefix - suffix)
    positions: list[int] = []
    for word in feature["word_indices"]:
        span = pieces[word]
        if len(span) > budget:  # as dlfa.data.features._windows: keep the labelled piece, cut the rest
            keep = [next((p for p in span if piece_carries_characters(tokens[p])), span[0])]
            span = sorted(keep + [p for p in span if p not in keep][: budget - 1])
        positions.extend(span)
    if [ids[p] for p in positions] != feature["input_ids"][prefix:len(feature["input_ids"]) - suffix]:
        raise RuntimeError("X-Mixup's sub-word pooling no longer matches dlfa.data.features' windows")
    labelled = {word_ids[p]: prefix + k for k, p in enumerate(positions)
                if feature["labels"][prefix + k] != IGNORE_INDEX}
    return [-1] * prefix + [labelled[word_ids[p]] for p in positions] + [-1] * suffix


def _placeholder(sentence: TaggedSentence, label: str) -> TaggedSentence:
    return sentence if sentence.tags else TaggedSentence(sentence.words, [label] * len(sentence.words))


def featurize_side(task, examples: Sequence, tokenizer, max_length: int, labelled: bool = True) -> list[dict]:
    """One feature per example: a sentence pair, or a tagged sentence's first window with ``pool_index``.

    ``labelled=False``: the side's labels take no part in the loss (tagging targets and back-translations).
    """
    if task.head == "sequence":
        features = task.featurize(list(examples), tokenizer, max_length)
        keep = MODEL_KEYS
    else:
        features = pooled_tagging_features(task, [_placeholder(e, task.labels[0]) for e in examples], tokenizer,
                                           max_length, first_window=True)
        keep = (*MODEL_KEYS, "pool_index", "word_indices")
        if not labelled:
            for feature in features:
                feature["labels"] = [IGNORE_INDEX] * len(feature["labels"])
    if len(features) != len(examples):
        raise ValueError("examples and features differ in number")
    return [{k: f[k] for k in keep if k in f} for f in features]


def featurize_pairs(task, pairs: Sequence[ParallelPair], tokenizer, max_length: int) -> list[dict]:
    """Target keys, the source's prefixed ``src_`` and, when every pair has one, the back-translation's ``bt_``."""
    sides = [("", [p.target for p in pairs], task.head == "sequence"), (SOURCE_PREFIX, [p.source for p in pairs], True)]
    if pairs and all(p.back_translation is not None for p in pairs):
        sides.append((BACK_PREFIX, [p.back_translation for p in pairs], task.head == "sequence"))
    merged: list[dict] = [{} for _ in pairs]
    for prefix, examples, labelled in sides:
        for row, feature in zip(merged, featurize_side(task, examples, tokenizer, max_length, labelled), strict=True):
            row.update({prefix + k: v for k, v in feature.items() if not (prefix and k == "word_indices")})
    return merged


def attach_soft_labels(features: list[dict], soft: Sequence[Sequence[Sequence[float]]], num_labels: int) -> None:
    """Each tagging target's soft labels on its words' labelled positions (zero vectors elsewhere)."""
    for feature, distributions in zip(features, soft, strict=True):
        rows = [[0.0] * num_labels for _ in feature["input_ids"]]
        labelled = [i for i, target in enumerate(feature["pool_index"]) if target == i]
        for position, word in zip(labelled, feature["word_indices"], strict=True):
            rows[position] = list(distributions[word])
        feature["soft_labels"] = rows


class ParallelCollator:
    """Pads the target (``input_ids``...), the source (``src_``) and the back-translation (``bt_``) separately;
    ``pool_index`` pads with -1 and ``soft_labels`` with zero vectors. ``pad_to`` pads every side to that length
    (the authors' fixed-length rows, for ``--xmixup-entropy authors``)."""

    def __init__(self, tokenizer, head: str, pad_to: int | None = None) -> None:
        self.inner = Collator(tokenizer, head, pad_to)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix in ("", SOURCE_PREFIX, BACK_PREFIX):
            if prefix:
                side = [{k[len(prefix):]: v for k, v in f.items() if k.startswith(prefix)} for f in features]
            else:
                side = [{k: v for k, v in f.items() if not k.startswith((SOURCE_PREFIX, BACK_PREFIX))}
                        for f in features]
            if "input_ids" not in side[0]:
                continue
            batch = self.inner(side)
            length = batch["input_ids"].shape[1]
            if "pool_index" in side[0]:
                batch["pool_index"] = torch.tensor([f["pool_index"] + [-1] * (length - len(f["pool_index"]))
                                                    for f in side], dtype=torch.long)
            if "soft_labels" in side[0]:
                width = len(side[0]["soft_labels"][0])
                batch["soft_labels"] = torch.tensor([f["soft_labels"] + [[0.0] * width] * (length - len(f["soft_labels"]))
                                                     for f in side], dtype=torch.float32)
            out.update({prefix + k: v for k, v in batch.items()})
        return out


def model_inputs(batch: dict[str, torch.Tensor], source_prefix: str | None) -> dict[str, torch.Tensor]:
    """The XMixupModel arguments of a collated batch; ``source_prefix`` picks the source side (None: target only)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pool_index") if k in batch}
    if source_prefix is not None:
        for key in ("input_ids", "attention_mask", "token_type_ids", "pool_index"):
            if source_prefix + key in batch:
                inputs[SOURCE_PREFIX + key] = batch[source_prefix + key]
    return inputs


def predict_xmixup(model: XMixupModel, features: Sequence[dict], collator: ParallelCollator, batch_size: int = 64,
                   device: torch.device | str = "cpu", desc: str | None = None,
                   autocast_dtype: torch.dtype | None = None, accelerator: Any = None) -> list:
    """Per-feature predictions, as :func:`dlfa.evaluation.evaluate.predict` (and shared between processes the same
    way): mixup inference for features that carry a source (``src_`` keys), the target alone otherwise."""
    from dlfa.evaluation.evaluate import predict

    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch, SOURCE_PREFIX if SOURCE_PREFIX + "input_ids" in batch else None)

    return predict(model, features, collator, batch_size, device, desc, autocast_dtype=autocast_dtype,
                   accelerator=accelerator, inputs=inputs)


def evaluation_features(task, examples: Sequence, translations: Sequence | None, tokenizer,
                        max_length: int) -> list[dict]:
    """Evaluation features of one language: the task's (with ``pool_index`` for tagging), each joined to its
    English translation's first window as ``src_`` keys when ``translations`` is given (mixup inference)."""
    if task.head == "sequence":
        features = task.featurize(list(examples), tokenizer, max_length)
    else:
        features = pooled_tagging_features(task, list(examples), tokenizer, max_length)
    if translations is None:
        return features
    sources = featurize_side(task, translations, tokenizer, max_length)
    joined = []
    for index, feature in enumerate(features):
        source = sources[feature["sentence_index"] if task.head == "token" else index]
        joined.append({**feature, **{SOURCE_PREFIX + k: v for k, v in source.items()
                                     if k in ("input_ids", "token_type_ids")}})
    return joined


# -- soft labels from a teacher ----------------------------------------------------------------------------------


@torch.no_grad()
def teacher_soft_labels(teacher_dir: str | Path, task, sentences: Sequence[TaggedSentence], max_length: int,
                        batch_size: int = 64) -> list[list[list[float]]]:
    """A fine-tuned tagging model's label distribution for every word (softmax of its logits at the word's
    labelled sub-token); a word the tokenizer drops gets the uniform distribution (it has no position anyway)."""
    from transformers import AutoTokenizer

    from dlfa.modeling.storage import load_dlfa_model

    folder = Path(teacher_dir)
    teacher = load_dlfa_model(folder)
    labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    if teacher.head_type != "token" or labels != list(task.labels):
        raise DlfaInputError(f"the teacher must be a {task.name} tagging model with labels {' '.join(task.labels)}",
                             option="--xmixup-teacher", path=folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    features = task.featurize([_placeholder(s, task.labels[0]) for s in sentences], tokenizer, max_length)
    collator = Collator(tokenizer, "token")
    uniform = [1.0 / len(task.labels)] * len(task.labels)
    soft = [[list(uniform) for _ in s.words] for s in sentences]
    teacher.eval()
    for indices in sorted_batches(features, batch_size):
        batch = collator([features[i] for i in indices])
        labels = batch.pop("labels")
        probs = torch.softmax(teacher(**batch).logits.float(), dim=-1)
        for row, index in enumerate(indices):
            feature = features[index]
            for word, distribution in zip(feature["word_indices"], probs[row][labels[row] != IGNORE_INDEX].tolist(),
                                          strict=True):
                soft[feature["sentence_index"]][word] = distribution
    return soft


# -- the recipe ------------------------------------------------------------------------------------------------


def _key(example) -> tuple[str, ...]:
    """What identifies an example's text: the two texts of a sentence pair, the words of a tagged sentence."""
    if isinstance(example, TaggedSentence):
        return tuple(example.words)
    return example.text_a, example.text_b


def _content(pair: ParallelPair) -> list:
    """Everything of a pair that its features depend on (for the feature-cache key)."""
    sides = [pair.source, pair.target] + ([pair.back_translation] if pair.back_translation is not None else [])
    return [[s.words, s.tags] if isinstance(s, TaggedSentence) else [s.text_a, s.text_b, s.label] for s in sides]


def parse_parallel_spec(spec: str) -> tuple[str, str | None]:
    """``de`` -> (de, None): pair the English training file with de's; ``de=FILE`` or ``FILE`` -> a parallel TSV."""
    spec = spec.strip()
    if _LANGUAGE.fullmatch(spec):
        return spec, None
    if "=" in spec and _LANGUAGE.fullmatch(spec.split("=", 1)[0]):
        language, path = spec.split("=", 1)
        return language, path
    return language_from_name(spec), spec


class XMixupRecipe(FinetuneRecipe):
    training_method = "xmixup"
    STAT_NAMES = ("loss", "task", "source_task", "target_task", "kl", "mse", "lambda", "entropy")

    def __init__(self, config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.config = resolve_xmixup_defaults(self.config, get_task(self.config.task).head)
        self._micro_step, self._micro_batch = -1, 0
        self._running = self._empty_stats()
        self._dev_cache: list[dict] | None = None

    # -- inputs ---------------------------------------------------------------------------------------------

    def _read_train_and_dev(self) -> tuple[list, list]:
        from transformers import AutoConfig

        cfg = self.config
        validate_xmixup_layers(cfg.xmixup_layers, self.num_layers)
        check_encoder_type(AutoConfig.from_pretrained(self.model_path))
        train, dev = super()._read_train_and_dev()
        self.pairs, self.pair_summary, self.pair_files = self._read_pairs(train, dev)
        self.translations = self._read_translate_test()
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
        back = back_translation_files(cfg)
        specs = [parse_parallel_spec(spec) for spec in cfg.xmixup_parallel]
        unknown = sorted(set(back) - {language for language, _ in specs} - {cfg.train_language})
        if unknown:
            raise DlfaInputError(f"{unknown[0]!r} is not a parallel language (--xmixup-parallel)",
                                 option="--xmixup-back-translation")
        missing = [language or spec for spec, (language, path) in zip(cfg.xmixup_parallel, specs, strict=True)
                   if back and language not in back and not (language == cfg.train_language and path is None)]
        if missing:
            raise DlfaInputError(f"no back-translation for {missing[0]!r}: give one for every parallel language, "
                                 "or none", option="--xmixup-back-translation")
        pairs: list[ParallelPair] = []
        summary: dict[str, dict] = {}
        files: list[Path] = []
        leaky = set(self.leaky_languages)
        for spec, (language, path) in zip(cfg.xmixup_parallel, specs, strict=True):
            self_pairs = language == cfg.train_language and path is None
            if self_pairs:
                # The authors train on every language of their list, English included: its pairs are the English
                # training examples with themselves (and their back-translation is the English itself).
                read = [ParallelPair(e, e, language, f"{cfg.train_split}:{i + 1}", back_translation=e if back else None)
                        for i, e in enumerate(train)]
                same_english_file = True
            elif path is None and task.head == "token":
                raise DlfaInputError(
                    f"{spec!r}: {task.name} files of different languages are not translations of each other, so "
                    f"they cannot be paired line by line; give a parallel tagging file {spec}=FILE "
                    f"({TAGGING_COLUMNS})", option="--xmixup-parallel")
            elif path is None:
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
            if back and not self_pairs:
                bt_file = Path(back[language])
                translated = read_sentence_translations(bt_file, task.name, [p.target for p in read])
                read = [dataclasses.replace(p, back_translation=b) for p, b in zip(read, translated, strict=True)]
                files.append(bt_file)
            kept, counts = [], {"read": len(read), "selection": 0, "not_in_training_examples": 0, "evaluation": 0}
            for pair in read:
                texts = [_key(pair.source), _key(pair.target)] + (
                    [_key(pair.back_translation)] if pair.back_translation is not None else [])
                if _key(pair.source) in selection:
                    counts["selection"] += 1  # a held-out English example, or its translation
                elif same_english_file and _key(pair.source) not in training:
                    counts["not_in_training_examples"] += 1  # e.g. beyond --max-train-examples
                elif any(text in evaluated for text in texts):
                    counts["evaluation"] += 1
                else:
                    kept.append(pair)
            if not same_english_file and cfg.max_train_examples is not None:
                kept = kept[: cfg.max_train_examples]
            if not kept:
                raise DlfaInputError(f"no X-Mixup training pairs left from {spec!r} (after removing selection and "
                                     f"evaluation examples: {counts})", option="--xmixup-parallel")
            counts["kept"] = len(kept)
            name = language or spec
            if name in summary:
                raise DlfaInputError(f"{name!r} given twice", option="--xmixup-parallel")
            if task.head == "token":
                kept, counts["target_labels"] = self._target_soft_labels(kept, spec)
            summary[name] = counts
            pairs.extend(kept)
        self.leaky_languages = [lang for lang in self.languages if lang in leaky]
        return pairs, summary, files

    def _target_soft_labels(self, pairs: list[ParallelPair], spec: str) -> tuple[list[ParallelPair], str]:
        """Every tagging target with soft labels: the file's, one-hot of its tags, or the teacher's."""
        labels = list(self.task.labels)
        if all(p.target_soft is not None for p in pairs):
            return pairs, "soft (file)"
        if all(p.target.tags for p in pairs):
            one_hot = [[[float(tag == label) for label in labels] for tag in p.target.tags] for p in pairs]
            return [dataclasses.replace(p, target_soft=s) for p, s in zip(pairs, one_hot, strict=True)], "tags (one-hot)"
        if self.config.xmixup_teacher is None:
            raise DlfaInputError(
                f"{spec!r}: the tagging target term trains against labels (the authors' teacher soft labels); give "
                f"target tags or soft labels in the file, or a teacher model", option="--xmixup-teacher")
        soft = teacher_soft_labels(self.config.xmixup_teacher, self.task, [p.target for p in pairs],
                                   self.config.max_length, self.config.eval_batch_size)
        return [dataclasses.replace(p, target_soft=s) for p, s in zip(pairs, soft, strict=True)], "soft (teacher)"

    def _line_parallel_files(self, language: str) -> tuple[Path, Path]:
        cfg, task = self.config, self.task
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

    def _read_translate_test(self) -> dict[str, list]:
        """Per evaluated language, the English translations of its evaluation examples (mixup inference)."""
        folder, cfg, task = self.config.xmixup_translate_test, self.config, self.task
        if folder is None:
            return {}
        if not Path(folder).is_dir():
            raise DlfaInputError("translate-test folder not found", option="--xmixup-translate-test", path=folder)
        translations: dict[str, list] = {}
        for lang in self.languages:
            if lang == cfg.train_language:
                continue  # mixed with itself, as the authors' English test
            path = translate_test_file(folder, lang, task.eval_split)
            if path is not None:
                originals = task.read(cfg.data_dir, lang, task.eval_split)
                translations[lang] = read_sentence_translations(path, task.name, originals)[: cfg.max_eval_examples]
        return translations

    # -- data, model and loss -------------------------------------------------------------------------------

    def _build_train_features(self, train_examples: list, holdout: str) -> list[dict]:
        cfg = self.config
        content = hashlib.sha256(json.dumps([_content(p) for p in self.pairs],
                                            ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
        key = cache_key(self.tokenizer, self.task.name, f"xmixup2:{cfg.train_split}", ",".join(self.pair_summary),
                        cfg.max_length, self.pair_files, f"xmixup:{holdout}:{content}")
        features = self.feature_cache.get_or_build(
            key, lambda: featurize_pairs(self.task, self.pairs, self.tokenizer, cfg.max_length))
        if self.task.head == "token":
            attach_soft_labels(features, [p.target_soft for p in self.pairs], len(self.task.labels))
        self.has_back_translation = BACK_PREFIX + "input_ids" in features[0]
        logger.info("X-Mixup: %d parallel pairs (%s) | blocks %s | alpha %s | sources: gold%s | entropy %s",
                    len(features), ", ".join(f"{k}: {v['kept']}" for k, v in self.pair_summary.items()),
                    cfg.xmixup_layers, cfg.xmixup_alpha,
                    f" or back-translated ({cfg.xmixup_schedule}, k={cfg.xmixup_schedule_k})"
                    if self.has_back_translation else " only (no back-translations given)",
                    self.config.xmixup_entropy)
        return features

    def _pad_to(self) -> int | None:
        return self.config.max_length if self.config.xmixup_entropy == "authors" else None

    def _train_collator(self):
        return ParallelCollator(self.tokenizer, self.task.head, self._pad_to())

    def _build_model(self, model_settings: dict[str, Any]) -> torch.nn.Module:
        cfg = self.config
        model = super()._build_model(model_settings)
        return XMixupModel(model, XMixupConfig(layers=list(cfg.xmixup_layers), lambda_max=cfg.xmixup_lambda_max,
                                               entropy=self.config.xmixup_entropy, max_length=cfg.max_length))

    def training_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        cfg = self.config
        if step != self._micro_step:
            self._micro_step, self._micro_batch = step, 0
        probability = gold_probability(step, self.total_steps, cfg.xmixup_schedule, cfg.xmixup_schedule_k)
        gold = not self.has_back_translation or draw_gold(cfg.seed, step, self._micro_batch, probability)
        self._micro_batch += 1
        output = self.model(**model_inputs(batch, SOURCE_PREFIX if gold else BACK_PREFIX))
        if self.task.head == "sequence":
            losses = pair_objective(output, batch["labels"], cfg.xmixup_alpha, cfg.xmixup_kl_weight,
                                    cfg.xmixup_mse_weight)
        else:
            losses = tagging_objective(output, batch[SOURCE_PREFIX + "labels"] if gold else None,
                                       batch["soft_labels"], cfg.xmixup_alpha, cfg.xmixup_mse_weight)
        self._record(losses, output, gold)
        return losses.total

    # -- selection and evaluation: mixup inference where a translation exists -------------------------------

    def _eval_collator(self, mixup: bool) -> ParallelCollator:
        # The target alone does not mix: its padding changes nothing, so it is dynamic.
        return ParallelCollator(self.tokenizer, self.task.head, self._pad_to() if mixup else None)

    def _dev_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """English dev: mixed with itself when mixup inference is on (a translate-test folder), else target-only."""
        mixup = self.config.xmixup_translate_test is not None
        if self._dev_cache is None:
            self._dev_cache = evaluation_features(self.task, self.dev_examples, self.dev_examples if mixup else None,
                                                  self.tokenizer, self.config.max_length)
        predictions = predict_xmixup(model, self._dev_cache, self._eval_collator(mixup), self.config.eval_batch_size,
                                     self.accelerator.device, self._desc("dev"), self._autocast_dtype(),
                                     self.accelerator)
        return self.task.score(self.dev_examples, self._dev_cache, predictions, scorer=self.scorer.name)

    def _load_best(self) -> torch.nn.Module:
        return XMixupModel.from_pretrained(self.output_dir / BEST_DIR, device=self.accelerator.device)

    def _translations(self, lang: str) -> list | None:
        """The English side of mixup inference for a language, or None (target-only)."""
        if self.config.xmixup_translate_test is None:
            return None
        if lang == self.config.train_language:
            return self.eval_examples[lang]  # mixed with itself, as the authors' English test
        return self.translations.get(lang)

    def _inference_mode(self, lang: str) -> str:
        return "target-only" if self._translations(lang) is None else "mixup"

    def _language_metrics(self, model: torch.nn.Module, lang: str) -> dict[str, Any]:
        examples, translations = self.eval_examples[lang], self._translations(lang)
        mode = "target-only" if translations is None else "mixup"
        features = evaluation_features(self.task, examples, translations, self.tokenizer, self.config.max_length)
        predictions = predict_xmixup(model, features, self._eval_collator(mode == "mixup"), self.config.eval_batch_size,
                                     self.accelerator.device, self._desc(f"eval {lang}"), self._autocast_dtype(),
                                     self.accelerator)
        return {**self.task.score(examples, features, predictions, scorer=self.scorer.name), "inference": mode}

    def evaluate(self) -> dict[str, Any]:
        target_only = [lang for lang in self.languages if self._inference_mode(lang) == "target-only"]
        if target_only:
            logger.warning("X-Mixup: %s scored on the target alone (no translate-test file); the authors score "
                           "with mixup inference", ", ".join(target_only))
        return super().evaluate()

    # -- diagnostics (logged at each selection, kept in the selection history, exact across --resume) --------

    def _empty_stats(self) -> dict[str, float]:
        return {**{name: 0.0 for name in self.STAT_NAMES}, "batches": 0.0, "gold_batches": 0.0,
                "source_task_batches": 0.0}

    def _record(self, losses: XMixupLosses, output: XMixupOutput, gold: bool) -> None:
        run = self._running
        run["batches"] += 1
        run["gold_batches"] += float(gold)
        for name in ("task", "target_task", "kl", "mse"):
            run[name] += float(getattr(losses, name).detach())
        run["loss"] += float(losses.total.detach())
        if losses.source_task is not None:
            run["source_task"] += float(losses.source_task.detach())
            run["source_task_batches"] += 1
        run["lambda"] += sum(float(s.lam.detach().mean()) for s in output.stats.values()) / len(output.stats)
        run["entropy"] += sum(float(s.entropy.detach().mean()) for s in output.stats.values()) / len(output.stats)

    def _interval_stats(self) -> dict[str, float | None]:
        run = self._running
        n = max(run["batches"], 1)
        return {
            "loss": run["loss"] / n, "task": run["task"] / n, "target_task": run["target_task"] / n,
            "source_task": run["source_task"] / run["source_task_batches"] if run["source_task_batches"] else None,
            "kl": run["kl"] / n, "mse": run["mse"] / n, "gold_fraction": run["gold_batches"] / n,
            "lambda": run["lambda"] / n, "entropy": run["entropy"] / n,
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
        logger.info("step %d X-Mixup | task %.4f (source %s, target %.4f) kl %.4f mse %.4f | gold sources %.0f%% | "
                    "lambda %.4f | H %.4f", step, stats["task"], _fmt(stats["source_task"]), stats["target_task"],
                    stats["kl"], stats["mse"], 100 * stats["gold_fraction"], stats["lambda"], stats["entropy"])
        count = len(self.history)
        super()._select(step, epoch, train_loss)
        if len(self.history) > count:
            self.history[-1]["xmixup"] = stats

    # -- records ---------------------------------------------------------------------------------------------

    def _xmixup_record(self) -> dict[str, Any]:
        cfg = self.config
        back = back_translation_files(cfg)
        mixup = [lang for lang in self.languages if self._inference_mode(lang) == "mixup"]
        return {
            "implementation": "authors' in-block operator (docs/xmixup.md)",
            "parallel": list(cfg.xmixup_parallel), "pairs": self.pair_summary, "layers": list(cfg.xmixup_layers),
            "alpha": cfg.xmixup_alpha, "kl_weight": cfg.xmixup_kl_weight, "mse_weight": cfg.xmixup_mse_weight,
            "lambda_max": cfg.xmixup_lambda_max, "entropy": cfg.xmixup_entropy,
            "scheduled_sampling": {
                "schedule": cfg.xmixup_schedule, "k": cfg.xmixup_schedule_k,
                "back_translation": back or None,
                "active": bool(back),
            },
            "teacher": cfg.xmixup_teacher,
            "inference": {
                "translate_test": cfg.xmixup_translate_test,
                "mixup": mixup,
                "target_only": [lang for lang in self.languages if lang not in mixup],
                "selection": "mixup (English with itself)" if cfg.xmixup_translate_test else "target-only",
            },
        }

    def _write_config(self) -> None:
        super()._write_config()
        if self.accelerator.is_main_process:
            path = self.output_dir / CONFIG_FILE
            data = json.loads(path.read_text(encoding="utf-8"))
            data["xmixup"] = self._xmixup_record()
            write_json_atomic(path, data)

    def _method_fields(self) -> dict[str, Any]:
        return {**super()._method_fields(), "xmixup": self._xmixup_record()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_folder(model_dir: str | Path, task, data_dir: str | Path, examples: dict[str, list], train_language: str,
                    max_length: int, batch_size: int = 64, translate_test: str | None = None,
                    scorer: str | None = None, preprocessing: str | None = None,
                    autocast_dtype: torch.dtype | None = None) -> tuple[XMixupModel, dict[str, dict[str, Any]]]:
    """Per-language metrics of a saved X-Mixup model (``dlfa evaluate``): mixup inference for the languages with a
    translate-test file (and English, mixed with itself), the target alone for the others (``"inference"``)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    model = XMixupModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if translate_test is not None and not Path(translate_test).is_dir():
        raise DlfaInputError("translate-test folder not found", option="--translate-test", path=translate_test)
    pad_to = max_length if model.xmixup_config.entropy == "authors" else None
    per_language: dict[str, dict[str, Any]] = {}
    for lang, rows in examples.items():
        translations = None
        if translate_test is not None and lang == train_language:
            translations = rows
        elif translate_test is not None:
            path = translate_test_file(translate_test, lang, task.eval_split)
            if path is not None:
                originals = task.read(data_dir, lang, task.eval_split, preprocessing)
                translations = read_sentence_translations(path, task.name, originals)[: len(rows)]
        features = evaluation_features(task, rows, translations, tokenizer, max_length)
        collator = ParallelCollator(tokenizer, task.head, pad_to if translations is not None else None)
        predictions = predict_xmixup(model, features, collator, batch_size, desc=f"eval {lang}",
                                     autocast_dtype=autocast_dtype)
        per_language[lang] = {**task.score(rows, features, predictions, scorer=scorer),
                              "inference": "mixup" if translations is not None else "target-only"}
    return model, per_language
