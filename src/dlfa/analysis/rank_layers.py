"""``dlfa rank-layers``: rank every fused layer x = 1..N-1 of DLFA at a fraction of a sweep's cost.

The sweep that picks DLFA's layer fine-tunes the whole model once per layer and seed (11 fine-tunings for a
12-layer encoder, where the baseline needs one). This proxy reads the training-language (English) training and
selection (dev) files and nothing else (no target-language file is opened, so no target label can take part),
and per seed trains one fusion (``DLFAFusion``: the model's AIF gate) and one task head per layer x, all layers
in one pass: their parameters are stacked and the modules' own code is vmapped over them (``torch.func``), so
each layer has its own initialisation, AdamW moments and gradient clipping, as if trained alone. Each layer is
scored on the selection set with the task's metric every ``eval_every`` steps and keeps its best score (the
recipe's checkpoint selection); layers are ranked by the mean over seeds. Two modes:

* ``joint`` (default): the encoder is fine-tuned once per seed, jointly with all the gates and heads, learning
  from the mean of their losses, with a sweep cell's settings and data order;
* ``frozen``: the pretrained encoder runs once; the hidden states of the ranked layers and the last layer are
  cached (bfloat16, in memory) and the gates and heads train on them. Cheaper, but it ranks the *pretrained*
  layers (on UD-POS with e5-small it orders them backwards; ``docs/rank-layers.md``).

``docs/rank-layers.md`` has the method, its assumptions and departures from the sweep, and the validation
against a full sweep (``benchmarks/validate_rank_layers.py``). The config (:class:`RankLayersConfig`) and
:func:`run_rank_layers` are the command; ``python -m dlfa.analysis.rank_layers --help`` runs it stand-alone.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlfa.analysis.rank_compare import RANKING_FILE, RANKING_FORMAT
from dlfa.configs import RANK_MODE_DEFAULTS, RankLayersConfig
from dlfa.errors import DlfaInputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("dlfa")

RANKING_MD = "ranking.md"
# The recipe holds out part of the training file for selection when both name the same split (XNLI/PAWS-X
# here); the proxy makes one such split for all seeds, so that the encoder runs once.
HOLDOUT_SPLIT_SEED = 0
METHODS = {
    "joint": "one fine-tuning of the encoder per seed, jointly with an AIF gate (DLFAFusion) and a task head per "
             "fused layer, the encoder learning from the mean of their losses; training-language data only",
    "frozen": "frozen pretrained encoder; per fused layer an AIF gate (DLFAFusion) and a task head trained on "
              "cached hidden states of the training-language training set; training-language data only",
}
INITIALIZER_RANGE = 0.02  # DLFAConfig.initializer_range: N(0, 0.02) Linear weights, as the model's new modules


MODE_DEFAULTS = RANK_MODE_DEFAULTS


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


# -- the gates and heads of all layers -------------------------------------------------------------------------------


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
    cpu_seconds_select: float = 0.0  # process CPU time of the selection-set passes and scoring


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


def _token_head(hidden: int, num_labels: int, dropout: float):
    """DLFAForTokenClassification's head (dropout, then a linear layer on every sub-token) as one module."""
    from torch import nn

    return nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_labels))


def _layer_seed(seed: int, layer: int) -> int:
    return (seed * 1_000_003 + layer) % (2**63)


class ProbeStack:
    """One ``DLFAFusion`` + task head per ranked layer, and optionally a head on the last layer alone.

    The layers' parameters are stacked (``torch.func.stack_module_state``) and the modules' own code runs
    vmapped over them, so K layers cost one batched pass and each still trains as if alone: its own
    initialisation (seeded by seed and layer), its own AdamW moments (AdamW is elementwise), its own
    gradient-norm clipping (:meth:`clip`). Only dropout masks are drawn for all layers at once.
    """

    def __init__(self, layers: Sequence[int], hidden: int, settings: ProbeSettings, seed: int,
                 device: torch.device | str = "cpu") -> None:
        import copy

        import torch
        from torch.func import functional_call, stack_module_state, vmap

        from dlfa.modeling.modeling_dlfa import DLFAClassificationHead, DLFAFusion

        self.settings = settings
        head_cls = _token_head if settings.head == "token" else DLFAClassificationHead
        fusions, heads = [], []
        for x in layers:
            generator = torch.Generator().manual_seed(_layer_seed(seed, x))
            fusion = DLFAFusion(hidden, settings.reduction, settings.aif_norm)
            head = head_cls(hidden, settings.num_labels, settings.classifier_dropout)
            _init_like_dlfa(fusion, generator)
            _init_like_dlfa(head, generator)
            fusions.append(fusion.to(device))
            heads.append(head.to(device))
        self.baseline = None
        if settings.include_baseline:
            self.baseline = head_cls(hidden, settings.num_labels, settings.classifier_dropout)
            _init_like_dlfa(self.baseline, torch.Generator().manual_seed(_layer_seed(seed, 0)))
            self.baseline.to(device)
        self.fusion_params, fusion_buffers = stack_module_state(fusions)
        self.head_params, head_buffers = stack_module_state(heads)
        if fusion_buffers or head_buffers:
            raise RuntimeError("the gate and head are expected to hold no buffers")
        # Skeletons without storage: functional_call runs their code with the stacked parameters.
        self._fusion, self._head = copy.deepcopy(fusions[0]).to("meta"), copy.deepcopy(heads[0]).to("meta")

        def probe(fp: dict, hp: dict, last: torch.Tensor, lower: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return functional_call(self._head, hp, (functional_call(self._fusion, fp, (last, lower, mask)),))

        self._train_fn = vmap(probe, in_dims=(0, 0, None, 2, None), randomness="different")
        self._eval_fn = vmap(probe, in_dims=(0, 0, None, 2, None))
        self.keys: list[int | str] = [*layers, *(["baseline"] if self.baseline is not None else [])]
        self.stacked = [*self.fusion_params.values(), *self.head_params.values()]

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay as the recipe: not on biases and normalization weights (1-D per layer, 2-D stacked)."""
        base = list(self.baseline.parameters()) if self.baseline is not None else []
        decay = [p for p in self.stacked if p.ndim > 2] + [p for p in base if p.ndim > 1]
        no_decay = [p for p in self.stacked if p.ndim <= 2] + [p for p in base if p.ndim <= 1]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def train(self, mode: bool = True) -> None:
        for module in (self._fusion, self._head, self.baseline):
            if module is not None:
                module.train(mode)

    def logits(self, states: torch.Tensor, mask: torch.Tensor, training: bool) -> list[torch.Tensor]:
        """Per key, the logits from ``states`` (B, T, K + 1, H): the K ranked layers, then the last layer."""
        last, lowers = states[:, :, -1], states[:, :, :-1]
        fn = self._train_fn if training else self._eval_fn
        fused = fn(self.fusion_params, self.head_params, last, lowers, mask)  # (K, B, T, C) or (K, B, C)
        return [*fused.unbind(0), *([self.baseline(last)] if self.baseline is not None else [])]

    def losses(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Each key's mean cross-entropy over the labelled positions, shape (keys,)."""
        import torch
        import torch.nn.functional as F

        flat = labels.reshape(-1)
        return torch.stack([F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), flat, ignore_index=-100)
                            for out in logits])

    def clip(self, max_norm: float) -> None:
        """clip_grad_norm_ for each layer's gate + head (and the baseline head) separately."""
        import torch

        grads = [t.grad for t in self.stacked if t.grad is not None]
        if grads:
            squared = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)
            coef = (max_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
        if self.baseline is not None:
            torch.nn.utils.clip_grad_norm_(self.baseline.parameters(), max_norm)

    def predictions(self, logits: list[torch.Tensor], labels: torch.Tensor) -> list[list]:
        """Per key, per row: label ids at the labelled positions (token heads) or one label id (sequence)."""
        out = []
        for item in logits:
            predicted = item.argmax(-1).cpu()
            if self.settings.head == "token":
                keep = labels.cpu() != -100
                out.append([predicted[row][keep[row]].tolist() for row in range(predicted.shape[0])])
            else:
                out.append([int(v) for v in predicted])
        return out


class _Selection:
    """Scores every key on the selection set at each evaluation and keeps each key's best (the recipe's rule)."""

    def __init__(self, keys: Sequence[int | str], score: Callable[[list], float], size: int) -> None:
        self.keys, self.score, self.size = list(keys), score, size
        self.best: dict[int | str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.cpu_seconds = 0.0

    def record(self, step: int, epoch: int, predictions: dict[int | str, list]) -> None:
        entry: dict[str, Any] = {"step": step, "epoch": epoch, "scores": {}}
        for key in self.keys:
            value = float(self.score(predictions[key]))
            entry["scores"][str(key)] = value
            if key not in self.best or value > self.best[key]:
                self.best[key] = value
        self.history.append(entry)


def _evaluation_due(step: int, steps_per_epoch: int, total: int, eval_every: int | None) -> bool:
    if step == total:
        return True
    return step % eval_every == 0 if eval_every else step % steps_per_epoch == 0


def _optimizer_and_schedule(groups: list[dict[str, Any]], settings: ProbeSettings):
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.total_steps),
                                               settings.total_steps)
    return optimizer, schedule


def _train_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of length-grouped shuffled batches, as the recipe's train_loader makes them."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_probes(train: HiddenCache, dev: HiddenCache, settings: ProbeSettings, seed: int,
                 score: Callable[[list], float], device: torch.device | str = "cpu",
                 desc: str | None = None) -> ProbeResult:
    """Frozen mode: train the gates and heads of every cached lower layer on cached hidden states, and score them.

    ``train.layers[-1]`` is the last layer; every other cached layer is ranked. ``score(predictions)`` turns
    per-feature predictions of the selection set (as ``dlfa.evaluation.evaluate.predict`` returns them) into
    the selection metric.
    """
    import torch
    from tqdm.auto import tqdm

    stack = ProbeStack(train.layers[:-1], train.states.shape[-1], settings, seed, device)
    optimizer, schedule = _optimizer_and_schedule(stack.parameter_groups(settings.weight_decay), settings)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # data order
    selection = _Selection(stack.keys, score, len(dev))
    lengths, dev_lengths = train.lengths(), dev.lengths()
    dev_order = sorted(range(len(dev)), key=lambda i: -dev_lengths[i])  # longest first: little padding
    dev_batches = [dev_order[i : i + 128] for i in range(0, len(dev_order), 128)]

    def evaluate(step: int, epoch: int) -> None:
        started = time.process_time()
        stack.train(False)
        predictions: dict[int | str, list] = {key: [None] * len(dev) for key in stack.keys}
        with torch.no_grad():
            for indices in dev_batches:
                states, mask, labels = dev.batch(indices, device)
                for key, rows in zip(stack.keys, stack.predictions(stack.logits(states, mask, False), labels)):
                    for index, value in zip(indices, rows):
                        predictions[key][index] = value
        selection.record(step, epoch, predictions)
        stack.train(True)
        selection.cpu_seconds += time.process_time() - started

    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    step, epoch = 0, 0
    progress = tqdm(total=settings.total_steps, desc=desc, leave=False, disable=desc is None)
    stack.train(True)
    while step < settings.total_steps:
        epoch += 1
        for indices in _train_order(lengths, settings.batch_size, generator):
            states, mask, labels = train.batch(indices, device)
            # The sum keeps each layer's gradient its own (each gate and head sees only its own loss).
            stack.losses(stack.logits(states, mask, True), labels).sum().backward()
            if settings.max_grad_norm:
                stack.clip(settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if _evaluation_due(step, steps_per_epoch, settings.total_steps, settings.eval_every):
                evaluate(step, epoch)
            if step >= settings.total_steps:
                break
    progress.close()
    return ProbeResult(best=selection.best, history=selection.history, steps=step,
                       cpu_seconds_select=selection.cpu_seconds)


def train_joint(encoder: Any, layers: Sequence[int], train_features: Sequence[dict], dev_features: Sequence[dict],
                collator: Any, settings: ProbeSettings, seed: int, score: Callable[[list], float],
                eval_batch_size: int = 64, freeze_embeddings: bool = True, cpu: bool = False,
                desc: str | None = None) -> ProbeResult:
    """Joint mode: fine-tune ``encoder`` once, jointly with a gate and head per layer, and score each layer.

    Every step runs the encoder once; each layer's gate and head read its hidden states, and the encoder
    learns from the mean of all the heads' losses (AdamW hardly depends on the loss scale, so the encoder
    moves about as fast as in one sweep cell). The encoder's gradient norm is clipped on its own, each layer's
    gate and head on theirs. ``encoder`` is trained in place.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from dlfa.data.batching import sorted_batches, train_loader

    accelerator = Accelerator(cpu=cpu)
    device = accelerator.device
    torch.manual_seed(seed)
    encoder.to(device)
    if freeze_embeddings:
        encoder.get_input_embeddings().weight.requires_grad_(False)
    stored = [*layers, _num_layers(encoder.config)]
    stack = ProbeStack(layers, encoder.config.hidden_size, settings, seed, device)
    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    groups = stack.parameter_groups(settings.weight_decay) + [
        {"params": [p for p in encoder_params if p.ndim > 1], "weight_decay": settings.weight_decay},
        {"params": [p for p in encoder_params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer, schedule = _optimizer_and_schedule(groups, settings)
    loader = train_loader(train_features, collator, settings.batch_size, torch.Generator().manual_seed(seed))
    use_types = _accepts_token_type_ids(encoder.config)
    selection = _Selection(stack.keys, score, len(dev_features))

    def forward(batch: dict[str, torch.Tensor], training: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        labels = batch["labels"].to(device)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if use_types and "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"].to(device)
        out = encoder(**inputs, output_hidden_states=True, return_dict=True)
        states = torch.stack([out.hidden_states[x] for x in stored], dim=2)
        return stack.logits(states, inputs["attention_mask"], training), labels

    def evaluate(step: int, epoch: int) -> None:
        started = time.process_time()
        encoder.eval()
        stack.train(False)
        predictions: dict[int | str, list] = {key: [None] * len(dev_features) for key in stack.keys}
        with torch.no_grad():
            for indices in sorted_batches(dev_features, eval_batch_size):
                logits, labels = forward(collator([dev_features[i] for i in indices]), False)
                for key, rows in zip(stack.keys, stack.predictions(logits, labels)):
                    for index, value in zip(indices, rows):
                        predictions[key][index] = value
        selection.record(step, epoch, predictions)
        encoder.train()
        stack.train(True)
        selection.cpu_seconds += time.process_time() - started

    steps_per_epoch = len(loader)
    step, epoch = 0, 0
    progress = tqdm(total=settings.total_steps, desc=desc, leave=False, disable=desc is None)
    encoder.train()
    stack.train(True)
    while step < settings.total_steps:
        epoch += 1
        for batch in loader:
            logits, labels = forward(batch, True)
            accelerator.backward(stack.losses(logits, labels).mean())
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(encoder_params, settings.max_grad_norm)
                # The mean over K + 1 heads scaled each one's own gradient by 1 / (K + 1); clipping is per head.
                stack.clip(settings.max_grad_norm / len(stack.keys))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if _evaluation_due(step, steps_per_epoch, settings.total_steps, settings.eval_every):
                evaluate(step, epoch)
            if step >= settings.total_steps:
                break
    progress.close()
    return ProbeResult(best=selection.best, history=selection.history, steps=step,
                       cpu_seconds_select=selection.cpu_seconds)


# -- the command -----------------------------------------------------------------------------------------------------


def _read_english(task: Any, config: RankLayersConfig, max_train_examples: int) -> tuple[list, list]:
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
    return train[: max_train_examples or None], dev[: config.max_dev_examples or None]


def _check_output(config: RankLayersConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise DlfaInputError(f"{out} exists and is not a folder", option="--output")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise DlfaInputError(f"{out} exists and is not empty (pass --overwrite to replace its ranking files)",
                             option="--output")
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


def _num_layers(encoder_config: Any) -> int | None:
    from dlfa.modeling.modeling_dlfa import encoder_num_layers

    try:
        return encoder_num_layers(encoder_config)
    except ValueError:
        return None


def run_rank_layers(config: RankLayersConfig, show_progress: bool = True, command: str | None = None
                    ) -> dict[str, Any]:
    """Rank the fused layers; write ``ranking.json`` and ``ranking.md`` into ``config.output_dir``."""
    cpu_start, wall_start = time.process_time(), time.time()
    from dlfa.tasks import get_task

    task = get_task(config.task)
    out = _check_output(config)
    if not Path(config.data_dir).is_dir():
        raise DlfaInputError("data folder not found", path=config.data_dir)
    resolved = config.resolved()

    import copy

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
    num_layers = _num_layers(encoder_config)
    if num_layers is None or num_layers < 2:
        raise DlfaInputError(f"cannot rank the layers of a {type(encoder_config).__name__} ({num_layers} layers)",
                             option="--model")
    layers = sorted(config.layers) if config.layers is not None else list(range(1, num_layers))
    if max(layers) >= num_layers:
        raise DlfaInputError(f"fused layers must be in 1..{num_layers - 1} for a {num_layers}-layer encoder, got "
                             f"{max(layers)}", option="--layers")
    max_length = config.max_length or task.defaults.max_length
    train_examples, dev_examples = _read_english(task, config, resolved["max_train_examples"])
    if not train_examples or not dev_examples:
        raise DlfaInputError("no training or selection examples", path=config.data_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_features = task.featurize(train_examples, tokenizer, max_length)
    dev_features = task.featurize(dev_examples, tokenizer, max_length)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    encoder = _load_encoder(model_path)
    logger.info("rank-layers %s (%s) | model %s (%d layers) | layers %s | %d train (%d features) | %d dev | "
                "seeds %s", config.task, config.mode, config.model, num_layers, ",".join(map(str, layers)),
                len(train_examples), len(train_features), len(dev_examples), ",".join(map(str, config.seeds)))
    collator = Collator(tokenizer, task.head)
    steps_per_epoch = math.ceil(len(train_features) / resolved["batch_size"])
    total_steps = resolved["max_steps"] or max(1, math.ceil(resolved["epochs"] * steps_per_epoch))
    settings = ProbeSettings(
        head=task.head, num_labels=len(task.labels), reduction=config.reduction, aif_norm=config.aif_norm,
        classifier_dropout=config.classifier_dropout, batch_size=resolved["batch_size"],
        learning_rate=resolved["learning_rate"], weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, total_steps=total_steps, eval_every=resolved["eval_every"],
        include_baseline=config.include_baseline)

    def score(predictions: list) -> float:
        return task.score(dev_examples, dev_features, predictions)[task.primary_metric]

    details: dict[str, Any] = {}
    cpu_prepared = time.process_time()
    per_seed: dict[int, ProbeResult] = {}
    if config.mode == "frozen":
        encoder.to(device)
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        stored = [*layers, num_layers]
        train_cache = encode_features(encoder, train_features, collator, task.head, stored, config.eval_batch_size,
                                      device, desc="encode train" if show_progress else None)
        dev_cache = encode_features(encoder, dev_features, collator, task.head, stored, config.eval_batch_size,
                                    device, desc="encode dev" if show_progress else None)
        del encoder
        details.update(cached_tokens=int(train_cache.offsets[-1] + dev_cache.offsets[-1]),
                       cache_bytes=int((train_cache.states.numel() + dev_cache.states.numel()) * 2),
                       cpu_seconds_encode=time.process_time() - cpu_prepared)
        for seed in config.seeds:
            per_seed[seed] = train_probes(train_cache, dev_cache, settings, seed, score, device,
                                          desc=f"train seed {seed}" if show_progress else None)
    else:
        for seed in config.seeds:
            per_seed[seed] = train_joint(copy.deepcopy(encoder), layers, train_features, dev_features, collator,
                                         settings, seed, score, config.eval_batch_size, config.freeze_embeddings,
                                         config.cpu, desc=f"train seed {seed}" if show_progress else None)
    cpu_end, wall_end = time.process_time(), time.time()

    result = _result(config, task, model_path, num_layers, layers, per_seed, {
        **resolved, "max_length": max_length, "train_examples": len(train_examples),
        "train_features": len(train_features), "dev_examples": len(dev_examples), "dev_features": len(dev_features),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "selection_held_out_from_training_file": config.train_split == config.dev_split,
        **{k: v for k, v in details.items() if not k.startswith("cpu_")},
    }, {
        "cpu_seconds": cpu_end - cpu_start, "cpu_seconds_prepare": cpu_prepared - cpu_start,
        **{k: v for k, v in details.items() if k.startswith("cpu_")},
        "cpu_seconds_train": cpu_end - cpu_prepared - details.get("cpu_seconds_encode", 0.0),
        "cpu_seconds_select": sum(r.cpu_seconds_select for r in per_seed.values()),
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
        "mode": config.mode,
        "method": METHODS[config.mode],
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
    parts = [f"{cost['cpu_seconds']:.1f} s process CPU time (prepare {cost['cpu_seconds_prepare']:.1f}"]
    if "cpu_seconds_encode" in cost:
        parts.append(f"encode {cost['cpu_seconds_encode']:.1f}")
    parts.append(f"train and score {cost['cpu_seconds_train']:.1f}, of which scoring the selection set "
                 f"{cost['cpu_seconds_select']:.1f})")
    cache = (f"; {resolved['cached_tokens']} cached tokens x {len(result['layers']) + 1} layers "
             f"({resolved['cache_bytes'] / 2**20:.0f} MiB)" if "cache_bytes" in resolved else "")
    lines = [
        f"# Layer ranking (proxy, {result['mode']} mode): {result['task']}, {result['model']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Method: {result['method']}.  ",
        f"Training: {resolved['train_examples']} {result['selection']['language']} examples "
        f"({resolved['train_features']} features), {resolved['total_steps']} steps of batch {resolved['batch_size']}, "
        f"lr {resolved['learning_rate']:g}, max length {resolved['max_length']}"
        + (", word embeddings frozen" if result["mode"] == "joint" and config["freeze_embeddings"] else "") + ".  ",
        f"Score: {metric} ({result['task']}'s metric) on the first {resolved['dev_examples']} "
        f"{result['selection']['language']} selection examples ({selection}), the best over each run's "
        f"evaluations; mean ± sample std over seeds {', '.join(map(str, seeds))}. No target-language file was read.",
        "",
        markdown_table(headers, rows, align_right_from=2),
        "",
        f"Cost: {', '.join(parts)}, {cost['wall_seconds']:.1f} s wall, {resolved['torch_threads']} torch threads on "
        f"{resolved['device']}{cache}; peak RSS {cost['peak_rss_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any]) -> None:
    from dlfa.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RANKING_MD, ranking_markdown(result))
    write_json_atomic(out / RANKING_FILE, result)  # last: its presence marks a finished ranking


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dlfa.analysis.rank_layers ...`` is ``dlfa rank-layers ...``."""
    from dlfa.cli.main import main as dlfa_main

    return dlfa_main(["rank-layers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
