"""``dlfa rank-layers``: rank every fused layer x = 1..N-1 of DLFA at a fraction of a sweep's cost.

The sweep that picks DLFA's layer fine-tunes the whole model once per layer and seed (11 fine-tunings for a
12-layer encoder, where the baseline needs one). This proxy freezes the encoder instead:

1. read the training-language (English) training file and selection (dev) file, and nothing else: no
   target-language file is opened, so no target label can take part;
2. run the frozen encoder once over both and keep, per token, the hidden states of every ranked layer and of
   the last layer (bfloat16, in memory);
3. per seed, train one fusion (``DLFAFusion``: the AIF gate of the model) and one task head per layer x on
   the cached states. All layers train in one pass: their parameters are stacked and the same module code is
   vmapped over them (``torch.func``), so each layer trains exactly as it would alone, with its own AdamW
   moments and its own gradient clipping; only the dropout masks are drawn for all layers at once;
4. score each layer on the selection set with the task's metric every ``eval_every`` steps (default: each
   epoch) and keep its best score, like the recipe's checkpoint selection; rank layers by the mean over seeds.

What it assumes: that how much layer x adds to the last layer, read by a gate and head on frozen features,
orders the layers as fine-tuning does. It measures the layers of the *pretrained* encoder; the sweep measures
them while the encoder adapts. ``docs/rank-layers.md`` has the method, its departures from the sweep and the
validation against a full sweep.

The config (:class:`RankLayersConfig`) and :func:`run_rank_layers` are the command; ``python -m
dlfa.analysis.rank_layers --help`` runs it stand-alone. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dlfa.analysis.rank_compare import RANKING_FILE, RANKING_FORMAT
from dlfa.errors import DlfaInputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("dlfa")

DEFAULT_MODEL = "embedded:multilingual-e5-small"
RANKING_MD = "ranking.md"
# The recipe holds out part of the training file for selection when both name the same split (XNLI/PAWS-X
# here); the proxy makes one such split for all seeds, so that the encoder runs once.
HOLDOUT_SPLIT_SEED = 0
INITIALIZER_RANGE = 0.02  # DLFAConfig.initializer_range: N(0, 0.02) Linear weights, as the model's new modules


@dataclass
class RankLayersConfig:
    """Options of ``dlfa rank-layers`` (one field per command-line flag)."""

    task: str = field(metadata={"help": "udpos, panx, xnli or pawsx"})
    data_dir: str = field(metadata={"help": "the task's data folder; only the training language's files are read"})
    output_dir: str = field(metadata={"help": "folder for ranking.json and ranking.md (must be empty or new)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "encoder: embedded:multilingual-e5-small (default), a Hugging Face id or a local folder"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "fused layers x to rank, e.g. 4 8 10 (default: every layer 1..N-1)"})
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={
        "help": "seeds (gate/head initialisation, data order, dropout); the ranking uses their mean"})
    train_language: str = field(default="en", metadata={"help": "the language trained and selected on"})
    train_split: str = field(default="train", metadata={"help": "split of the training-language file to train on"})
    dev_split: str = field(default="dev", metadata={"help": "split of the training-language file to score on"})
    dev_holdout: float = field(default=0.1, metadata={
        "help": "fraction held out for scoring when train and dev split are the same file (XNLI/PAWS-X here)"})
    max_train_examples: int = field(default=2000, metadata={
        "help": "first N training examples (0: all); the cache holds their hidden states in memory"})
    max_dev_examples: int = field(default=1000, metadata={"help": "first N selection examples (0: all)"})
    max_length: int | None = field(default=None, metadata={"help": "sub-tokens per window (default: the task's)"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the cached training examples"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides --epochs"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the gates and heads"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up fraction, then linear decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping per layer (0: none)"})
    eval_every: int | None = field(default=None, metadata={
        "help": "optimizer steps between selection-set scores (default: each epoch); the best is kept"})
    reduction: int = field(default=4, metadata={"help": "AIF bottleneck reduction ratio r"})
    aif_norm: Literal["layernorm", "none"] = field(default="layernorm", metadata={
        "help": "normalization in the AIF bottleneck"})
    classifier_dropout: float = field(default=0.1, metadata={"help": "dropout of the task head"})
    include_baseline: bool = field(default=True, metadata={
        "help": "also train a head on the last layer alone (shown for reference, not ranked)"})
    encode_batch_size: int = field(default=64, metadata={"help": "batch size of the frozen encoder's pass"})
    cpu: bool = field(default=False, metadata={"help": "stay on the CPU even when a GPU is present"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into a non-empty output folder (replaces ranking.json and ranking.md only)"})

    def __post_init__(self) -> None:
        def bad(option: str, message: str) -> DlfaInputError:
            return DlfaInputError(message, option=option)

        for name in ("task", "data_dir", "output_dir", "model", "train_language", "train_split", "dev_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise bad(_flag(name), f"must be a non-empty string, got {value!r}")
        if self.task not in ("udpos", "panx", "xnli", "pawsx"):  # the registry imports seqeval: checked lazily too
            raise bad("--task", f"unknown task {self.task!r} (known: panx, pawsx, udpos, xnli)")
        for name, low in (("max_train_examples", 0), ("max_dev_examples", 0), ("batch_size", 1),
                          ("reduction", 1), ("encode_batch_size", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise bad(_flag(name), f"must be an integer >= {low}, got {value!r}")
        for name in ("max_length", "max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise bad(_flag(name), f"must be a positive integer, got {value!r}")
        # (name, lowest, highest, lowest allowed, highest allowed)
        for name, low, high, low_ok, high_ok in (
            ("epochs", 0.0, math.inf, False, False), ("learning_rate", 0.0, math.inf, False, False),
            ("weight_decay", 0.0, math.inf, True, False), ("max_grad_norm", 0.0, math.inf, True, False),
            ("warmup_ratio", 0.0, 1.0, True, True), ("classifier_dropout", 0.0, 1.0, True, False),
            ("dev_holdout", 0.0, 1.0, False, False),
        ):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise bad(_flag(name), f"must be a finite number, got {value!r}")
            if value < low or value > high or (value == low and not low_ok) or (value == high and not high_ok):
                span = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
                raise bad(_flag(name), f"must be in {span}, got {value!r}")
        if self.aif_norm not in ("layernorm", "none"):
            raise bad("--aif-norm", f"must be layernorm or none, got {self.aif_norm!r}")
        if not isinstance(self.seeds, list) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise bad("--seeds", f"must be one or more integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise bad("--seeds", f"a seed is given twice: {self.seeds!r}")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not self.layers or not all(_is_int(x) for x in self.layers):
                raise bad("--layers", f"must be one or more layer numbers, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise bad("--layers", f"a layer is given twice: {self.layers!r}")
            if min(self.layers) < 1:
                raise bad("--layers", f"layers are numbered from 1 (0 is the embedding output), got {min(self.layers)}")
        for name in ("include_baseline", "cpu", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad(_flag(name), f"must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the cache of hidden states --------------------------------------------------------------------------------------


@dataclass
class HiddenCache:
    """Hidden states of a set of features, every token of every feature, for a few layers.

    ``states[offsets[i]:offsets[i + 1]]`` are feature i's tokens, shape ``(tokens, len(layers), H)`` (bfloat16);
    ``layers`` are hidden-state indices (the last one is the encoder's last layer). ``labels`` are per token
    (token tasks: label id or -100, aligned with ``states``) or per feature (sequence tasks).
    """

    states: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    layers: list[int]
    head: str

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states (B, T, L, H) float32, attention mask (B, T), labels (B, T) or (B,)), right-padded."""
        import torch

        starts = self.offsets[list(indices)].tolist()
        ends = self.offsets[[i + 1 for i in indices]].tolist()
        longest = max(e - s for s, e in zip(starts, ends))
        _, num_layers, hidden = self.states.shape
        states = torch.zeros(len(indices), longest, num_layers, hidden)
        mask = torch.zeros(len(indices), longest, dtype=torch.long)
        token_labels = torch.full((len(indices), longest), -100, dtype=torch.long)
        for row, (start, end) in enumerate(zip(starts, ends)):
            states[row, : end - start] = self.states[start:end]
            mask[row, : end - start] = 1
            if self.head == "token":
                token_labels[row, : end - start] = self.labels[start:end]
        labels = token_labels if self.head == "token" else self.labels[list(indices)]
        return states.to(device), mask.to(device), labels.to(device)


def _accepts_token_type_ids(encoder_config: Any) -> bool:
    # DistilBERT has no segment embeddings; BERT-like models do (as DLFAModel decides).
    return getattr(encoder_config, "type_vocab_size", 0) > 0 and encoder_config.model_type != "distilbert"


def encode_features(encoder: Any, features: Sequence[dict], collator: Any, head: str, layers: Sequence[int],
                    batch_size: int, device: torch.device | str = "cpu", desc: str | None = None) -> HiddenCache:
    """Run the frozen ``encoder`` once over ``features``; keep hidden states ``layers`` of every real token."""
    import torch
    from tqdm.auto import tqdm

    from dlfa.data.batching import sorted_batches

    lengths = [len(f["input_ids"]) for f in features]
    offsets = torch.zeros(len(features) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    total = int(offsets[-1])
    hidden = encoder.config.hidden_size
    states = torch.empty(total, len(layers), hidden, dtype=torch.bfloat16)
    labels = torch.full((total,) if head == "token" else (len(features),), -100, dtype=torch.long)
    use_types = _accepts_token_type_ids(encoder.config)
    encoder.eval()
    with torch.inference_mode():
        for indices in tqdm(sorted_batches(features, batch_size), desc=desc, leave=False, disable=desc is None):
            batch = collator([features[i] for i in indices])
            batch_labels = batch.pop("labels")
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            if use_types and "token_type_ids" in batch:
                inputs["token_type_ids"] = batch["token_type_ids"].to(device)
            out = encoder(**inputs, output_hidden_states=True, return_dict=True)
            stacked = torch.stack([out.hidden_states[x] for x in layers], dim=2).to("cpu", torch.bfloat16)
            keep = batch["attention_mask"].bool()
            for row, index in enumerate(indices):
                start, end = int(offsets[index]), int(offsets[index + 1])
                tokens = stacked[row][keep[row]]  # the real tokens, in order, whatever the padding side
                if tokens.shape[0] != end - start:
                    raise RuntimeError(f"feature {index}: {tokens.shape[0]} encoded tokens for {end - start} ids")
                states[start:end] = tokens
                if head == "token":
                    labels[start:end] = batch_labels[row][keep[row]]
                else:
                    labels[index] = batch_labels[row]
    return HiddenCache(states=states, offsets=offsets, labels=labels, layers=list(layers), head=head)


# -- training the gates and heads ------------------------------------------------------------------------------------


@dataclass
class ProbeSettings:
    head: str
    num_labels: int
    reduction: int = 4
    aif_norm: str = "layernorm"
    classifier_dropout: float = 0.1
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    total_steps: int = 100
    eval_every: int | None = None  # None: at the end of each pass over the training set
    include_baseline: bool = True


@dataclass
class ProbeResult:
    """Per ranked layer (and ``"baseline"``): the best selection score and its history, for one seed."""

    best: dict[int | str, float]
    history: list[dict[str, Any]]
    steps: int


def _init_like_dlfa(module: Any, generator: torch.Generator, std: float = INITIALIZER_RANGE) -> None:
    """The model's initialisation of its new modules: N(0, std) Linear weights, zero biases, LayerNorm (1, 0)."""
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std, generator=generator)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def _layer_seed(seed: int, layer: int) -> int:
    return (seed * 1_000_003 + layer) % (2**63)


def _head_class(head: str):
    from dlfa.modeling.modeling_dlfa import SequenceClassificationHead, TokenClassificationHead

    return TokenClassificationHead if head == "token" else SequenceClassificationHead


def _clip_stacked(tensors: Sequence[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ for each probe of stacked parameters (dim 0 = probe), as if each were its own model."""
    import torch

    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return
    squared = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    coef = (max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))


def _train_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of length-grouped shuffled batches, as the recipe's train_loader makes them."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_probes(train: HiddenCache, dev: HiddenCache, settings: ProbeSettings, seed: int,
                 score: Callable[[list], float], device: torch.device | str = "cpu",
                 desc: str | None = None) -> ProbeResult:
    """Train a fusion + head per cached lower layer (and a head on the last layer alone) and score them.

    ``train.layers[-1]`` is the last layer; every other cached layer is ranked. ``score(predictions)`` turns
    per-feature predictions of the selection set (as ``dlfa.evaluation.evaluate.predict`` returns them) into
    the selection metric.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from dlfa.modeling.modeling_dlfa import DLFAFusion

    ranked = train.layers[:-1]
    hidden = train.states.shape[-1]
    head_cls = _head_class(settings.head)
    fusions, heads = [], []
    for x in ranked:
        # Each layer's initial weights depend on (seed, x) alone, not on which other layers are ranked.
        generator = torch.Generator().manual_seed(_layer_seed(seed, x))
        fusion = DLFAFusion(hidden, settings.reduction, settings.aif_norm)
        head = head_cls(hidden, settings.num_labels, settings.classifier_dropout)
        _init_like_dlfa(fusion, generator)
        _init_like_dlfa(head, generator)
        fusions.append(fusion.to(device))
        heads.append(head.to(device))
    baseline = None
    if settings.include_baseline:
        baseline = head_cls(hidden, settings.num_labels, settings.classifier_dropout)
        _init_like_dlfa(baseline, torch.Generator().manual_seed(_layer_seed(seed, 0)))
        baseline = baseline.to(device)
    torch.manual_seed(seed)  # dropout
    fusion_params, fusion_buffers = stack_module_state(fusions)
    head_params, head_buffers = stack_module_state(heads)
    if fusion_buffers or head_buffers:
        raise RuntimeError("the gate and head are expected to hold no buffers")
    # Module skeletons without storage: functional_call runs their code with the stacked parameters.
    fusion_base, head_base = copy.deepcopy(fusions[0]).to("meta"), copy.deepcopy(heads[0]).to("meta")
    del fusions, heads

    def probe(fp: dict, hp: dict, last: torch.Tensor, lower: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return functional_call(head_base, hp, (functional_call(fusion_base, fp, (last, lower, mask)),))

    train_all = vmap(probe, in_dims=(0, 0, None, 2, None), randomness="different")
    eval_all = vmap(probe, in_dims=(0, 0, None, 2, None))

    stacked = [*fusion_params.values(), *head_params.values()]
    # Weight decay as the recipe: not on biases and normalization weights (1-D per probe, 2-D when stacked).
    decay = [p for p in stacked if p.ndim > 2] + [p for p in (baseline.parameters() if baseline else []) if p.ndim > 1]
    no_decay = [p for p in stacked if p.ndim <= 2] + [p for p in (baseline.parameters() if baseline else [])
                                                      if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.total_steps),
                                                settings.total_steps)
    generator = torch.Generator().manual_seed(seed)
    lengths = train.lengths()
    dev_lengths = dev.lengths()
    dev_order = sorted(range(len(dev)), key=lambda i: -dev_lengths[i])  # longest first: little padding
    dev_batches = [dev_order[i : i + 128] for i in range(0, len(dev_order), 128)]
    keys: list[int | str] = [*ranked, *(["baseline"] if baseline is not None else [])]
    best: dict[int | str, float] = {}
    history: list[dict[str, Any]] = []

    def logits_of(states: torch.Tensor, mask: torch.Tensor, evaluate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        last, lowers = states[:, :, -1], states[:, :, :-1]
        fn = eval_all if evaluate else train_all
        fused = fn(fusion_params, head_params, last, lowers, mask)  # (K, B, T, C) or (K, B, C)
        return fused, (baseline(last) if baseline is not None else None)

    def evaluate(step: int, epoch: int) -> None:
        fusion_base.eval(), head_base.eval()
        if baseline is not None:
            baseline.eval()
        predictions: dict[int | str, list] = {key: [None] * len(dev) for key in keys}
        with torch.no_grad():
            for indices in dev_batches:
                states, mask, labels = dev.batch(indices, device)
                fused, base = logits_of(states, mask, evaluate=True)
                outputs = [*fused.argmax(-1).cpu()] + ([base.argmax(-1).cpu()] if base is not None else [])
                for key, predicted in zip(keys, outputs):
                    for row, index in enumerate(indices):
                        if settings.head == "token":
                            predictions[key][index] = predicted[row][labels[row].cpu() != -100].tolist()
                        else:
                            predictions[key][index] = int(predicted[row])
        record: dict[str, Any] = {"step": step, "epoch": epoch, "scores": {}}
        for key in keys:
            value = float(score(predictions[key]))
            record["scores"][str(key)] = value
            if key not in best or value > best[key]:
                best[key] = value
        history.append(record)
        fusion_base.train(), head_base.train()
        if baseline is not None:
            baseline.train()

    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    step, epoch = 0, 0
    progress = tqdm(total=settings.total_steps, desc=desc, leave=False, disable=desc is None)
    fusion_base.train(), head_base.train()
    if baseline is not None:
        baseline.train()
    while step < settings.total_steps:
        epoch += 1
        for indices in _train_order(lengths, settings.batch_size, generator):
            states, mask, labels = train.batch(indices, device)
            fused, base = logits_of(states, mask, evaluate=False)
            k = fused.shape[0]
            per_probe = F.cross_entropy(fused.reshape(-1, fused.shape[-1]), labels.reshape(-1).repeat(k),
                                        ignore_index=-100, reduction="none").view(k, -1)
            valid = (labels.reshape(-1) != -100).float()
            # Each probe's mean loss over the labelled positions; the sum keeps their gradients apart.
            loss = (per_probe * valid).sum(1).div(valid.sum().clamp_min(1.0)).sum()
            if base is not None:
                loss = loss + F.cross_entropy(base.reshape(-1, base.shape[-1]), labels.reshape(-1), ignore_index=-100)
            loss.backward()
            if settings.max_grad_norm:
                _clip_stacked(stacked, settings.max_grad_norm)
                if baseline is not None:
                    torch.nn.utils.clip_grad_norm_(baseline.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            end_of_epoch = step % steps_per_epoch == 0
            due = (settings.eval_every and step % settings.eval_every == 0) or (
                not settings.eval_every and end_of_epoch)
            if due or step == settings.total_steps:
                evaluate(step, epoch)
            if step >= settings.total_steps:
                break
    progress.close()
    return ProbeResult(best=best, history=history, steps=step)


# -- the command -----------------------------------------------------------------------------------------------------


def _read_english(task: Any, config: RankLayersConfig) -> tuple[list, list]:
    """Training and selection examples of the training language (held out from one file when needed)."""
    train = task.read(config.data_dir, config.train_language, config.train_split)
    if config.train_split == config.dev_split:
        order = list(range(len(train)))
        random.Random(HOLDOUT_SPLIT_SEED).shuffle(order)
        cut = max(1, int(round(config.dev_holdout * len(train))))
        if cut >= len(train):
            raise DlfaInputError(f"{len(train)} examples are too few to hold out a selection set",
                                 option="--dev-holdout")
        dev = [train[i] for i in sorted(order[:cut])]
        train = [train[i] for i in sorted(order[cut:])]
    else:
        dev = task.read(config.data_dir, config.train_language, config.dev_split)
    return (train[: config.max_train_examples or None], dev[: config.max_dev_examples or None])


def _check_output(config: RankLayersConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise DlfaInputError(f"{out} exists and is not a folder", option="--output-dir")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise DlfaInputError(f"{out} exists and is not empty (pass --overwrite to replace its ranking files)",
                             option="--output-dir")
    return out


def _load_encoder(model_path: str) -> Any:
    """The pretrained encoder without a pooler; a checkpoint that misses weights is an error, not random init."""
    from transformers import AutoConfig, AutoModel

    encoder_config = AutoConfig.from_pretrained(model_path)
    kwargs = {"add_pooling_layer": False} if encoder_config.model_type in (
        "bert", "xlm-roberta", "roberta", "camembert") else {}
    encoder, info = AutoModel.from_pretrained(model_path, config=encoder_config, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise DlfaInputError(f"the model lacks weights for {len(missing)} tensors (e.g. {missing[0]})",
                             option="--model")
    return encoder


def run_rank_layers(config: RankLayersConfig, show_progress: bool = True, command: str | None = None
                    ) -> dict[str, Any]:
    """Rank the fused layers; write ``ranking.json`` and ``ranking.md`` into ``config.output_dir``."""
    cpu_start, wall_start = time.process_time(), time.time()
    from dlfa.tasks import get_task

    task = get_task(config.task)
    out = _check_output(config)
    if not Path(config.data_dir).is_dir():
        raise DlfaInputError("data folder not found", path=config.data_dir)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from dlfa.data.batching import Collator
    from dlfa.modeling.embedded import resolve_model_name

    model_path = resolve_model_name(config.model)
    try:
        encoder_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"cannot load model {config.model!r}: {str(exc).splitlines()[0]}",
                             option="--model") from None
    num_layers = getattr(encoder_config, "num_hidden_layers", None)
    if not _is_int(num_layers) or num_layers < 2:
        raise DlfaInputError(f"cannot rank the layers of a {type(encoder_config).__name__} ({num_layers} layers)",
                             option="--model")
    layers = sorted(config.layers) if config.layers is not None else list(range(1, num_layers))
    if max(layers) >= num_layers:
        raise DlfaInputError(f"fused layers must be in 1..{num_layers - 1} for a {num_layers}-layer encoder, got "
                             f"{max(layers)}", option="--layers")
    max_length = config.max_length or task.defaults.max_length
    train_examples, dev_examples = _read_english(task, config)
    if not train_examples or not dev_examples:
        raise DlfaInputError("no training or selection examples", path=config.data_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_features = task.featurize(train_examples, tokenizer, max_length)
    dev_features = task.featurize(dev_examples, tokenizer, max_length)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    encoder = _load_encoder(model_path).to(device)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    logger.info("rank-layers %s | model %s (%d layers) | layers %s | %d train (%d features) | %d dev | seeds %s",
                config.task, config.model, num_layers, ",".join(map(str, layers)), len(train_examples),
                len(train_features), len(dev_examples), ",".join(map(str, config.seeds)))
    cpu_loaded = time.process_time()

    collator = Collator(tokenizer, task.head)
    stored = [*layers, num_layers]
    train_cache = encode_features(encoder, train_features, collator, task.head, stored, config.encode_batch_size,
                                  device, desc="encode train" if show_progress else None)
    dev_cache = encode_features(encoder, dev_features, collator, task.head, stored, config.encode_batch_size,
                                device, desc="encode dev" if show_progress else None)
    del encoder
    cpu_encoded = time.process_time()

    steps_per_epoch = math.ceil(len(train_features) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    settings = ProbeSettings(
        head=task.head, num_labels=len(task.labels), reduction=config.reduction, aif_norm=config.aif_norm,
        classifier_dropout=config.classifier_dropout, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, total_steps=total_steps, eval_every=config.eval_every,
        include_baseline=config.include_baseline)

    def score(predictions: list) -> float:
        return task.score(dev_examples, dev_features, predictions)[task.primary_metric]

    per_seed: dict[int, ProbeResult] = {}
    for seed in config.seeds:
        per_seed[seed] = train_probes(train_cache, dev_cache, settings, seed, score, device,
                                      desc=f"train seed {seed}" if show_progress else None)
    cpu_end, wall_end = time.process_time(), time.time()

    result = _result(config, task, model_path, num_layers, layers, per_seed, {
        "max_length": max_length, "train_examples": len(train_examples), "train_features": len(train_features),
        "dev_examples": len(dev_examples), "dev_features": len(dev_features), "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "cached_tokens": int(train_cache.offsets[-1] + dev_cache.offsets[-1]),
        "cache_bytes": int((train_cache.states.numel() + dev_cache.states.numel()) * 2), "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "selection_held_out_from_training_file": config.train_split == config.dev_split,
    }, {
        "cpu_seconds": cpu_end - cpu_start, "cpu_seconds_load": cpu_loaded - cpu_start,
        "cpu_seconds_encode": cpu_encoded - cpu_loaded, "cpu_seconds_train": cpu_end - cpu_encoded,
        "wall_seconds": wall_end - wall_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, command)
    _write(out, result)
    return result


def _result(config: RankLayersConfig, task: Any, model_path: str, num_layers: int, layers: list[int],
            per_seed: dict[int, ProbeResult], resolved: dict[str, Any], cost: dict[str, Any],
            command: str | None) -> dict[str, Any]:
    import torch
    import transformers

    from dlfa import __version__

    def summary(key: int | str) -> dict[str, Any]:
        scores = {str(seed): r.best[key] for seed, r in per_seed.items()}
        values = list(scores.values())
        return {"scores": scores, "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None}

    entries = [{"layer": x, "row": f"D_{x}", **summary(x)} for x in layers]
    ranked = sorted(entries, key=lambda e: (-e["mean"], e["layer"]))
    for rank, entry in enumerate(ranked, start=1):
        entry["rank"] = rank
    return {
        "format": RANKING_FORMAT,
        "version": 1,
        "task": task.name,
        "model": config.model,
        "num_layers": num_layers,
        "primary_metric": task.primary_metric,
        "seeds": list(config.seeds),
        "selection": {"language": config.train_language, "split": config.dev_split,
                      "examples": resolved["dev_examples"],
                      "score": f"best {task.primary_metric} on the selection set over the evaluations of each run"},
        "method": "frozen encoder; per fused layer an AIF gate (DLFAFusion) and a task head trained on cached "
                  "hidden states of the training-language training set; no target-language data",
        "ranking": [e["layer"] for e in ranked],
        "layers": entries,
        "baseline": summary("baseline") if config.include_baseline else None,
        "history": {str(seed): r.history for seed, r in per_seed.items()},
        "cost": cost,
        "settings": {"config": config.to_dict(), "resolved": {"model_path": model_path, **resolved}},
        "versions": {"dlfa": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": command if command is not None else " ".join(sys.argv),
    }


def ranking_markdown(result: dict[str, Any]) -> str:
    """ranking.md: the ranked layers with their English-dev scores per seed, the settings and the cost."""
    from dlfa.reporting.tables import markdown_table

    metric, seeds = result["primary_metric"], result["seeds"]
    resolved, cost = result["settings"]["resolved"], result["cost"]
    config = result["settings"]["config"]

    def cell(entry: dict[str, Any]) -> str:
        return f"{entry['mean']:.2f}" + ("" if entry["std"] is None else f" ± {entry['std']:.2f}")

    rows = [[str(e["rank"]), e["row"], cell(e)] + [f"{e['scores'][str(s)]:.2f}" for s in seeds]
            for e in sorted(result["layers"], key=lambda e: e["rank"])]
    if result.get("baseline"):
        b = result["baseline"]
        rows.append(["–", "last layer alone (not ranked)", cell(b)] + [f"{b['scores'][str(s)]:.2f}" for s in seeds])
    headers = ["rank", "row", f"{result['selection']['language']} dev {metric} (mean ± std)"] + [
        f"seed {s}" for s in seeds]
    selection = "held out from the training file" if resolved["selection_held_out_from_training_file"] else (
        f"`{result['selection']['split']}` split")
    lines = [
        f"# Layer ranking (proxy): {result['task']}, {result['model']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Method: {result['method']}.  ",
        f"Training: {resolved['train_examples']} {result['selection']['language']} examples "
        f"({resolved['train_features']} features), {resolved['total_steps']} steps of batch {config['batch_size']}, "
        f"lr {config['learning_rate']:g}, max length {resolved['max_length']}.  ",
        f"Score: {metric} ({result['task']}'s metric) on the first {resolved['dev_examples']} "
        f"{result['selection']['language']} selection examples ({selection}), the best over each run's "
        f"evaluations; mean ± sample std over seeds {', '.join(map(str, seeds))}. No target-language file was read.",
        "",
        markdown_table(headers, rows, align_right_from=2),
        "",
        f"Cost: {cost['cpu_seconds']:.1f} s process CPU time (load {cost['cpu_seconds_load']:.1f}, encode "
        f"{cost['cpu_seconds_encode']:.1f}, train and score {cost['cpu_seconds_train']:.1f}), "
        f"{cost['wall_seconds']:.1f} s wall, {resolved['torch_threads']} torch threads on {resolved['device']}; "
        f"{resolved['cached_tokens']} cached tokens x {len(result['layers']) + 1} layers "
        f"({resolved['cache_bytes'] / 2**20:.0f} MiB); peak RSS {cost['peak_rss_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any]) -> None:
    from dlfa.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RANKING_MD, ranking_markdown(result))
    write_json_atomic(out / RANKING_FILE, result)  # last: its presence marks a finished ranking


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone command line (``python -m dlfa.analysis.rank_layers``), flags as HfArgumentParser makes them."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers import HfArgumentParser

        parser = HfArgumentParser((RankLayersConfig,), prog="dlfa rank-layers",
                                  description="Rank DLFA's fused layers on a frozen encoder (English data only).")
        args = list(sys.argv[1:] if argv is None else argv)
        try:
            (config,) = parser.parse_args_into_dataclasses(args=args)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
            return int(exc.code or 0)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        from dlfa.reporting.report import command_line

        result = run_rank_layers(config, command=command_line())
        print(ranking_markdown(result))
        return 0
    except DlfaInputError as exc:
        print(f"dlfa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
