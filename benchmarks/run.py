#!/usr/bin/env python
"""dlfa benchmarks: one runner, every comparison made inside one process run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--steps N] [--output benchmarks/results/NAME.json]

Data: UD English-EWT (and, for evaluation, every UD test set) from ``../shared/data/udpos`` (``--data-dir``); when
it is absent the runner says so and exits 0. Model: ``embedded:multilingual-e5-small`` (``--model``: any local
folder or hub id). Sections (``--only a,b,...``):

"dlfa" below means dlfa's defaults: length-grouped batches padded to their longest member, the recipe's precision
(``--precision auto``: bf16 autocast on a CPU with native bf16, fp32 on other CPUs, bf16 on CUDA) and optimizer
(``--adamw-implementation auto``: fused AdamW; ``--embedding-updates lazy``: sparse embedding gradients, lazy
AdamW rows; see ``dlfa.training.optim``). Every variant clips gradients at 1.0 as the recipe does.

a. Training throughput in real (non-padding, special tokens included) tokens per second, three variants of one
   model alternating step by step (A B C, C B A, ...) after warm-up steps: ``dlfa``; ``fixed128``, XTREME's
   pipeline (``Collator(pad_to=128)``, random batches, fp32, ``torch.optim.AdamW`` with torch's CPU kernel over
   the dense table); ``dlfa-fp32-dense``, dlfa's batches with XTREME's precision and optimizer (dlfa before the
   precision and optimizer options). The dlfa batches are a seeded random sample of the batches of one full
   length-grouped epoch over EWT train (the recipe's loader); the fixed-128 batches hold exactly the same
   features, shuffled. Padding fractions are given for the timed batches and for a full EWT epoch.
b. DLFA (``--fuse-layer``, default D_8) step time / baseline step time on the same dlfa batches in the same
   order (``--overhead-steps`` batches, each trained ``--overhead-repeats`` times per model, A B B A); two
   models from the same encoder weights, dlfa's precision and optimizer; the ratio compares each batch's fastest
   step (see the function).
c. Zero-shot evaluation throughput: ``predict(sort_by_length=True)`` with dynamic padding against
   ``predict(sort_by_length=False)`` with ``Collator(pad_to=128)``, both in dlfa's precision (this section
   measures padding; f measures precision), over every UD test set in the data folder (a seeded sample of
   ``--eval-sentences`` sentences per treebank; on CPU the default is a sample because fixed-128 evaluation of
   all 20k sentences takes hours there), alternating which goes first per treebank.
d. Peak memory when training D_x at batch ``--batch-size`` on the longest batch of an epoch (padded length 128),
   ``--memory-steps`` steps (default 2: the second runs with the AdamW moments allocated, as every step of a
   run after the first): one fresh subprocess per variant (``MEMORY_VARIANTS``: dlfa before the options, dlfa
   in fp32, dlfa with dense embedding updates, dlfa, dlfa with frozen word embeddings) reporting the peak RSS
   (``VmHWM``, ``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
e. CUDA only (bf16 autocast): model FLOP utilisation of an mBERT-size encoder (random init: 12 layers, H 768,
   12 heads, FF 3072, vocab 119547) trained on the batches of (a), dynamic against fixed-128 padding.
f. bf16 autocast against fp32, everything else dlfa's: training tokens/s (one model and optimizer, the steps
   alternating between the precisions), evaluation tokens/s (``predict`` of section c's sample, sorted batches)
   with the share of equal predictions, and peak RSS (section d's ``dlfa`` against ``dlfa-fp32``).
g. One AdamW step of the model on one batch's gradients per kernel: torch's for-loop, foreach and fused kernels
   over the whole table, and lazy updates (fused kernel, the table's rows in the batch); alternating.

FLOPs (sections a and e), for a batch of sequences with real lengths T_i, N = non-embedding parameters
(encoder blocks, fusion, head), L layers, hidden size H::

    model FLOPs    = 6 * N * sum_i T_i + 12 * L * H * sum_i T_i**2     (useful work: real tokens only)
    executed FLOPs = the same with every T_i replaced by the padded length  (what the hardware computes)
    MFU            = model FLOPs per second / --peak-tflops (default 989, H100 SXM bf16 dense)

6N per token is the forward (2N) and backward (4N) matrix work; 12·L·H·T per token is the attention score and
value products (QKᵀ and AV: 4·T·H per token and layer forward, three times that with the backward).

CPU runs use one torch thread by default (``--threads``): on two cores shared with other jobs, two threads
were about 6x slower than one and far noisier (threads wait for each other whenever one is descheduled).
Process CPU time is recorded beside wall time, as it is less disturbed by other jobs on the machine.

Timings synchronise the device around each phase (forward+backward+clipping, optimizer step); batches are
collated before timing and moved to the device inside it. Results go to a JSON file written atomically.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "udpos"
DEFAULT_MODEL = "embedded:multilingual-e5-small"
PAD_TO = 128
MBERT = {"vocab_size": 119547, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072}
TINY_BERT = {"vocab_size": 119547, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128}
# Section d, D_x trained at batch 32. A setting left out is dlfa's (the run's --precision, --adamw-implementation,
# --embedding-updates); "before" is dlfa before these options (XTREME's fp32 and torch's AdamW).
MEMORY_VARIANTS = (
    {"name": "before", "precision": "fp32", "adamw_implementation": "for-loop", "embedding_updates": "dense"},
    {"name": "dlfa-fp32", "precision": "fp32"},
    {"name": "dlfa-dense", "embedding_updates": "dense"},
    {"name": "dlfa"},
    {"name": "dlfa-frozen-emb", "freeze_embeddings": True},
)


# ------------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything a run depends on (recorded in the JSON)."""

    device: str
    quick: bool
    model: str
    data_dir: str
    steps: int
    overhead_steps: int  # section b: batches
    overhead_repeats: int  # section b: steps per batch and model
    warmup: int
    batch_size: int
    eval_batch_size: int
    eval_sentences: int | None  # per treebank; None: all
    memory_steps: int
    mfu_steps: int
    fuse_layer: int
    bf16: bool  # dlfa's variants autocast in bf16 (--precision, resolved)
    precision_reason: str
    adamw_implementation: str  # dlfa's variants (the recipe's --adamw-implementation)
    embedding_updates: str  # dlfa's variants (the recipe's --embedding-updates)
    peak_tflops: float
    threads: int
    seed: int
    sections: tuple[str, ...]
    mfu_size: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def defaults(device: str, quick: bool) -> dict[str, Any]:
    """Per-device defaults, chosen so a CPU run fits in ~10 minutes (quick: ~2) on two busy cores."""
    if device == "cuda":
        return {"steps": 8 if quick else 40, "overhead_steps": 16 if quick else 60, "overhead_repeats": 2,
                "warmup": 2 if quick else 5, "batch_size": 32, "eval_batch_size": 64,
                "eval_sentences": 64 if quick else None, "memory_steps": 3, "mfu_steps": 8 if quick else 30}
    if quick:
        return {"steps": 2, "overhead_steps": 2, "overhead_repeats": 2, "warmup": 1, "batch_size": 8,
                "eval_batch_size": 8, "eval_sentences": 8, "memory_steps": 2, "mfu_steps": 2}
    # memory_steps 2: the second step runs with the AdamW moments allocated (the steady state of a run)
    return {"steps": 6, "overhead_steps": 8, "overhead_repeats": 3, "warmup": 1, "batch_size": 32,
            "eval_batch_size": 8, "eval_sentences": 48, "memory_steps": 2, "mfu_steps": 2}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (small batches, few steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, help="timed optimizer steps per variant in section a (CPU default 6)")
    p.add_argument("--overhead-steps", type=int, help="batches in section b (CPU default 8)")
    p.add_argument("--overhead-repeats", type=int, help="steps per batch and model in section b (CPU 3, CUDA 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant before timing")
    p.add_argument("--batch-size", type=int, help="training batch size (default 32; quick CPU: 8)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--eval-sentences", type=int, help="sentences sampled per UD test set; 0 = all (default: CPU 48, CUDA all)")
    p.add_argument("--memory-steps", type=int, help="training steps per memory subprocess")
    p.add_argument("--mfu-steps", type=int, help="timed steps per variant in section e")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded:multilingual-e5-small, a local folder or hub id")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="UD folder with en_ewt-ud-train.conllu and test sets")
    p.add_argument("--fuse-layer", type=int, default=8, help="the DLFA layer x of D_x (default 8)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast of dlfa's variants: auto = bf16 on CUDA and on CPUs with native bf16 (the "
                        "recipe's --mixed-precision auto on CPU), else fp32")
    p.add_argument("--no-bf16", action="store_true", help="the same as --precision fp32")
    p.add_argument("--adamw-implementation", choices=["auto", "for-loop", "foreach", "fused"], default="auto",
                   help="AdamW kernel of dlfa's variants (the recipe's option; default auto: fused)")
    p.add_argument("--embedding-updates", choices=["dense", "lazy"], default="lazy",
                   help="word-embedding updates of dlfa's variants (the recipe's option; default lazy)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: CPU 1, steadier and faster than 2 on busy shared cores; CUDA all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated sections among a-h (default: a-d, f, g, plus e on CUDA; "
                   "h, two data-parallel processes against one, runs only when named)")
    p.add_argument("--mfu-size", choices=["mbert", "tiny"], default="mbert", help=argparse.SUPPRESS)
    p.add_argument("--output", help="JSON path (default benchmarks/results/<device>[-quick].json)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    base = defaults(args.device, args.quick)
    if args.steps is not None:
        base["overhead_steps"] = args.steps
    given = {k: getattr(args, k) for k in base if getattr(args, k) is not None}
    values = {**base, **given}
    if values["eval_sentences"] == 0:
        values["eval_sentences"] = None  # every sentence of every test set
    default_sections = ("a", "b", "c", "d", "e", "f", "g") if args.device == "cuda" else ("a", "b", "c", "d", "f", "g")
    sections = tuple(args.only.split(",")) if args.only else default_sections
    unknown = sorted(set(sections) - set("abcdefgh"))
    if unknown:
        raise SystemExit(f"run.py: unknown section(s) {','.join(unknown)}; choose among a,b,c,d,e,f,g,h")
    threads = args.threads or (1 if args.device == "cpu" else os.cpu_count() or 1)
    bf16, reason = resolve_precision("fp32" if args.no_bf16 else args.precision, args.device)
    return Settings(device=args.device, quick=args.quick, model=args.model, data_dir=args.data_dir,
                    fuse_layer=args.fuse_layer, bf16=bf16, precision_reason=reason,
                    adamw_implementation=args.adamw_implementation, embedding_updates=args.embedding_updates,
                    peak_tflops=args.peak_tflops, threads=threads, seed=args.seed, sections=sections,
                    mfu_size=args.mfu_size, **values)


def resolve_precision(precision: str, device: str) -> tuple[bool, str]:
    """(bf16 autocast?, why) for dlfa's variants: on CPU the recipe's ``--mixed-precision auto`` rule."""
    from dlfa.training.precision import resolve_mixed_precision

    if precision != "auto":
        return precision == "bf16", f"--precision {precision}"
    if device == "cuda":
        return True, "auto: bf16 on CUDA (this benchmark's GPU default; the recipe's auto keeps fp32 on GPUs)"
    resolved, reason = resolve_mixed_precision("auto", device)
    return resolved == "bf16", reason


# ------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(settings: Settings, bf16: bool | None = None) -> Any:
    enabled = settings.bf16 if bf16 is None else bf16
    return torch.autocast(settings.torch_device.type, dtype=torch.bfloat16, enabled=enabled)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def real_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["attention_mask"].sum(dim=1).tolist()


def flops(lengths: Sequence[int], n_params: int, layers: int, hidden: int) -> float:
    """Training FLOPs of one step: 6·N·ΣT + 12·L·H·ΣT² (see the module docstring)."""
    return 6.0 * n_params * sum(lengths) + 12.0 * layers * hidden * sum(t * t for t in lengths)


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings." not in n)


def optimizer_for(model: torch.nn.Module, implementation: str = "for-loop", embedding_updates: str = "dense",
                  lr: float = 2e-5, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW with the recipe's parameter groups (no decay on 1-D parameters), built by the recipe's
    ``build_optimizer``. The defaults are plain ``torch.optim.AdamW`` with torch's CPU kernel (for-loop) and dense
    embedding updates: XTREME's optimizer, and dlfa's before ``--adamw-implementation``/``--embedding-updates``."""
    from dlfa.training.optim import build_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return build_optimizer(model, groups, lr, implementation, embedding_updates)


def dlfa_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """The optimizer of dlfa's variants: the recipe's --adamw-implementation and --embedding-updates."""
    return optimizer_for(model, settings.adamw_implementation, settings.embedding_updates)


Timing = tuple[float, float, float, float]  # wall fwd+bwd, wall optimizer, CPU fwd+bwd, CPU optimizer (seconds)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               settings: Settings, bf16: bool | None = None) -> Timing:
    """One full training step as the recipe makes it (autocast, clipping 1.0, AdamW); wall and process-CPU
    seconds of forward+backward+clipping and of the optimizer. ``bf16``: autocast (default: dlfa's precision).

    Variants of one model alternate: the word embeddings give sparse gradients for a lazy optimizer only."""
    from dlfa.training.optim import LazyAdamW, clip_gradients, word_embeddings

    embeddings = word_embeddings(model)
    if embeddings is not None:
        embeddings.sparse = isinstance(optimizer, LazyAdamW)
    device = settings.torch_device
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(settings, bf16):
        loss = model(**inputs).loss
    loss.backward()
    clip_gradients(None, model.parameters(), 1.0)
    sync(device)
    middle, cpu_middle = time.perf_counter(), time.process_time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return middle - start, time.perf_counter() - middle, cpu_middle - cpu_start, time.process_time() - cpu_middle


def alternate(runners: dict[str, Callable[[int], Timing]], count: int) -> dict[str, list[Timing]]:
    """Run ``runners[name](i)`` for i < count, alternating the order A B C, C B A, A B C... to cancel drift."""
    names = list(runners)
    times: dict[str, list[Timing]] = {name: [] for name in names}
    for i in range(count):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(runners[name](i))
    return times


def summary(times: list[Timing]) -> dict[str, Any]:
    """Wall-clock totals and medians, and the same in process CPU time (steadier on a shared CPU)."""
    totals = [t[0] + t[1] for t in times]
    cpu = [t[2] + t[3] for t in times]
    return {
        "total_s": sum(totals),
        "fwd_bwd_s": sum(t[0] for t in times),
        "optimizer_s": sum(t[1] for t in times),
        "median_step_s": statistics.median(totals),
        "min_step_s": min(totals),
        "max_step_s": max(totals),
        "cpu_total_s": sum(cpu),
        "cpu_median_step_s": statistics.median(cpu),
        "step_times_s": [round(x, 4) for x in totals],
        "cpu_step_times_s": [round(x, 4) for x in cpu],
    }


def free(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- context


class Context:
    """Model path, tokenizer, the EWT training features and the encoder weights, loaded once."""

    def __init__(self, settings: Settings) -> None:
        from dlfa.data.batching import Collator
        from dlfa.modeling.embedded import resolve_model_name
        from dlfa.tasks import get_task

        self.settings = settings
        self.task = get_task("udpos")
        self.model_path = resolve_model_name(settings.model)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.dynamic = Collator(self.tokenizer, "token")
        self.fixed = Collator(self.tokenizer, "token", pad_to=PAD_TO)
        started = time.perf_counter()
        train = self.task.read(settings.data_dir, "en", "train")
        self.train_features = self.task.featurize(train, self.tokenizer, PAD_TO)
        log(f"EWT train: {len(train)} sentences, {len(self.train_features)} features "
            f"({time.perf_counter() - started:.1f}s)")
        self._encoder: torch.nn.Module | None = None
        self._treebanks: tuple[list[tuple[str, list, list[dict]]], tuple[int, int, int]] | None = None
        self.train_batches()

    def encoder(self) -> torch.nn.Module:
        """A fresh copy of the pretrained encoder (read from disk once)."""
        if self._encoder is None:
            from dlfa.modeling.modeling_dlfa import load_encoder

            self._encoder = load_encoder(self.model_path)
        return copy.deepcopy(self._encoder)

    def model(self, fuse: bool) -> torch.nn.Module:
        from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAForTokenClassification

        torch.manual_seed(self.settings.seed)
        encoder = self.encoder()
        config = DLFAConfig(encoder=encoder.config, id2label=dict(enumerate(self.task.labels)),
                            fuse_layer=self.settings.fuse_layer if fuse else None, encoder_name=self.settings.model)
        return DLFAForTokenClassification(config, encoder=encoder).to(self.settings.torch_device).train()

    def train_batches(self) -> None:
        """The timed batches of sections a, b, e, and full-epoch padding figures."""
        from dlfa.data.batching import train_loader

        s = self.settings
        generator = torch.Generator().manual_seed(s.seed)
        loader = train_loader(self.train_features, self.dynamic, s.batch_size, generator, group_by_length=True)
        epoch = [list(batch) for batch in _batch_indices(loader)]
        lengths = [len(f["input_ids"]) for f in self.train_features]
        real = sum(lengths)
        self.epoch_padding = {
            "dlfa": 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in epoch),
            "fixed128": 1 - real / (PAD_TO * len(lengths)),
            "batches": len(epoch),
        }
        full = [i for i, b in enumerate(epoch) if len(b) == s.batch_size]
        count = max(s.steps, s.overhead_steps, s.warmup, s.mfu_steps, 1)
        self.chosen = [epoch[b] for b in random.Random(s.seed).sample(full, min(count, len(full)))]
        self.dynamic_batches = [self.dynamic([self.train_features[i] for i in b]) for b in self.chosen]

    def eval_treebanks(self) -> tuple[list[tuple[str, list, list[dict]]], tuple[int, int, int]]:
        """Sections c and f: (name, sentences, features) of each UD test set (a seeded sample of
        ``--eval-sentences`` each), and the real, sorted-batch and fixed-128 positions of all their sentences."""
        if self._treebanks is None:
            from dlfa.data.batching import sorted_batches

            s = self.settings
            treebanks: list[tuple[str, list, list[dict]]] = []
            full_real = full_dynamic = full_fixed = 0
            for lang in self.task.available_languages(s.data_dir, "test"):
                for path in self.task.files(s.data_dir, lang, "test"):
                    sentences = self.task.read_file(path)
                    features = self.task.featurize(sentences, self.tokenizer, PAD_TO)
                    full_real += sum(len(f["input_ids"]) for f in features)
                    full_fixed += PAD_TO * len(features)
                    full_dynamic += sum(max(len(features[i]["input_ids"]) for i in b) * len(b)
                                        for b in sorted_batches(features, s.eval_batch_size))
                    if s.eval_sentences is not None and s.eval_sentences < len(sentences):
                        keep = sorted(random.Random(s.seed).sample(range(len(sentences)), s.eval_sentences))
                        sentences = [sentences[i] for i in keep]
                        features = self.task.featurize(sentences, self.tokenizer, PAD_TO)
                    treebanks.append((path.name, sentences, features))
            self._treebanks = (treebanks, (full_real, full_dynamic, full_fixed))
        return self._treebanks

    def fixed_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Fixed-128 random batches holding exactly the features of the first ``count`` dlfa batches."""
        subset = [i for b in self.chosen[:count] for i in b]
        random.Random(self.settings.seed + 1).shuffle(subset)
        size = self.settings.batch_size
        return [self.fixed([self.train_features[i] for i in subset[k : k + size]]) for k in range(0, len(subset), size)]


def _batch_indices(loader: Any) -> list[list[int]]:
    """The feature indices of every batch of a DataLoader, without collating."""
    order = list(iter(loader.sampler))
    size = loader.batch_size
    return [order[k : k + size] for k in range(0, len(order), size)]


# ------------------------------------------------------------------------------------------------- a


def padding_of(batches: Sequence[dict[str, torch.Tensor]]) -> tuple[int, int]:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(b["attention_mask"].numel() for b in batches)
    return real, positions


def bench_training(ctx: Context) -> dict[str, Any]:
    """Section a: tokens/s of dlfa's training against XTREME's pad-everything-to-128 training.

    Three variants of one model (D_x), alternating step by step (A B C, C B A, ...):

    * ``dlfa``: dlfa's pipeline with its defaults: length-grouped batches padded to their longest member, the
      recipe's precision (``--mixed-precision auto``: bf16 on a CPU with native bf16) and optimizer
      (``--adamw-implementation``, ``--embedding-updates``; default fused kernel, lazy embedding updates);
    * ``fixed128``: XTREME's: the same features padded to 128 in random batches, fp32, ``torch.optim.AdamW``
      with torch's CPU kernel (for-loop) over the whole embedding table;
    * ``dlfa-fp32-dense``: dlfa's batches with XTREME's precision and optimizer (dlfa before the precision and
      optimizer options: what the earlier 3.97x/6.39x measured), to show where the gain comes from.

    ``fixed128`` and ``dlfa-fp32-dense`` share one AdamW (the same work whatever the batch).
    """
    s = ctx.settings
    steps = min(s.steps, len(ctx.dynamic_batches))
    batches = {"dlfa": ctx.dynamic_batches[:steps], "fixed128": ctx.fixed_batches(steps),
               "dlfa-fp32-dense": ctx.dynamic_batches[:steps]}
    model = ctx.model(fuse=True)
    reference = optimizer_for(model)
    optimizers = {"dlfa": dlfa_optimizer(model, s), "fixed128": reference, "dlfa-fp32-dense": reference}
    precision = {"dlfa": s.bf16, "fixed128": False, "dlfa-fp32-dense": False}
    n_params, layers, hidden = non_embedding_params(model), model.num_layers, model.encoder.config.hidden_size

    def runner(name: str, count: int) -> Callable[[int], Timing]:
        return lambda i: train_step(model, optimizers[name], batches[name][i % count], s, precision[name])

    log(f"a: warm-up ({s.warmup} step(s) per variant)")
    alternate({name: runner(name, steps) for name in batches}, s.warmup)
    log(f"a: timing {steps} steps per variant (alternating)")
    times = alternate({name: runner(name, steps) for name in batches}, steps)
    result: dict[str, Any] = {
        "steps": steps, "batch_size": s.batch_size, "model": s.model, "fuse_layer": s.fuse_layer,
        "non_embedding_params": n_params,
        "variants": {"dlfa": {"padding": "dynamic", "precision": "bf16" if s.bf16 else "fp32",
                              "adamw_implementation": s.adamw_implementation,
                              "embedding_updates": s.embedding_updates, "why_precision": s.precision_reason},
                     "fixed128": {"padding": "fixed 128", "precision": "fp32", "adamw_implementation": "for-loop",
                                  "embedding_updates": "dense"},
                     "dlfa-fp32-dense": {"padding": "dynamic", "precision": "fp32",
                                         "adamw_implementation": "for-loop", "embedding_updates": "dense"}},
    }
    for name, variant_batches in batches.items():
        real, positions = padding_of(variant_batches)
        stats = summary(times[name])
        model_flops = sum(flops(real_lengths(b), n_params, layers, hidden) for b in variant_batches)
        executed = sum(flops([b["input_ids"].shape[1]] * b["input_ids"].shape[0], n_params, layers, hidden)
                       for b in variant_batches)
        result[name] = {
            **stats,
            "real_tokens": real,
            "positions": positions,
            "padding_fraction": 1 - real / positions,
            "tokens_per_s": real / stats["total_s"],
            "tokens_per_s_fwd_bwd_only": real / stats["fwd_bwd_s"],
            "tokens_per_cpu_s": real / stats["cpu_total_s"],
            "optimizer_share": stats["optimizer_s"] / stats["total_s"],
            "model_tflops_per_s": model_flops / stats["total_s"] / 1e12,
            "executed_tflops_per_s": executed / stats["total_s"] / 1e12,
        }
        if s.device == "cuda":
            result[name]["mfu"] = result[name]["model_tflops_per_s"] / s.peak_tflops
    assert result["dlfa"]["real_tokens"] == result["fixed128"]["real_tokens"], "both variants train the same tokens"
    for name, base in (("ratio", "fixed128"), ("ratio_before", "fixed128"), ("speedup", "dlfa-fp32-dense")):
        top = "dlfa-fp32-dense" if name == "ratio_before" else "dlfa"
        result[f"{name}_tokens_per_s"] = result[top]["tokens_per_s"] / result[base]["tokens_per_s"]
        result[f"{name}_tokens_per_cpu_s"] = result[top]["tokens_per_cpu_s"] / result[base]["tokens_per_cpu_s"]
        result[f"{name}_fwd_bwd_only"] = (result[top]["tokens_per_s_fwd_bwd_only"]
                                          / result[base]["tokens_per_s_fwd_bwd_only"])
    result["epoch_padding_fraction"] = ctx.epoch_padding
    result["target_ratio"] = 9.0
    free(model, optimizers, reference)
    return result


# ------------------------------------------------------------------------------------------------- b


def bench_dlfa_overhead(ctx: Context) -> dict[str, Any]:
    """Section b: DLFA step time / baseline step time on the same batches in the same order.

    Each batch is trained ``--overhead-repeats`` times by each model, in the order A B B A (B A A B for the next
    batch). Other jobs on the machine only ever slow a step down, so the fastest repeat of a batch is its
    least disturbed time. The headline is the median over batches of (fastest DLFA step / fastest baseline
    step), with a 95% bootstrap interval over batches; the ratio of the sums of fastest steps, medians over
    all steps, and the ratio of the model FLOPs (what the fusion adds, analytically) are reported too.
    """
    s = ctx.settings
    batches = ctx.dynamic_batches[: s.overhead_steps]
    models = {"dlfa": ctx.model(fuse=True), "baseline": ctx.model(fuse=False)}
    optimizers = {name: dlfa_optimizer(model, s) for name, model in models.items()}

    def step(name: str, i: int) -> Timing:
        return train_step(models[name], optimizers[name], batches[i % len(batches)], s)

    log(f"b: warm-up ({s.warmup} step(s) per model)")
    alternate({name: lambda i, n=name: step(n, i) for name in models}, s.warmup)
    log(f"b: timing {len(batches)} batches x {s.overhead_repeats} repeats per model (A B B A ...)")
    names = list(models)
    times: dict[str, list[Timing]] = {name: [] for name in names}
    fastest: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # per batch: (wall, CPU)
    for i in range(len(batches)):
        first, second = names if i % 2 == 0 else names[::-1]
        order = [first, second, second, first] * (s.overhead_repeats // 2) + [first, second] * (s.overhead_repeats % 2)
        runs: dict[str, list[Timing]] = {name: [] for name in names}
        for name in order:
            runs[name].append(step(name, i))
        for name in names:
            assert len(runs[name]) == s.overhead_repeats
            times[name] += runs[name]
            fastest[name].append((min(t[0] + t[1] for t in runs[name]), min(t[2] + t[3] for t in runs[name])))
    per_batch = [a[0] / b[0] for a, b in zip(fastest["dlfa"], fastest["baseline"])]
    per_batch_cpu = [a[1] / b[1] for a, b in zip(fastest["dlfa"], fastest["baseline"])]
    result: dict[str, Any] = {"batches": len(batches), "repeats": s.overhead_repeats, "fuse_layer": s.fuse_layer,
                              "fusion_params": sum(p.numel() for p in models["dlfa"].fusion.parameters())}
    for name in names:
        result[name] = {**summary(times[name]), "fastest_per_batch_s": [round(w, 4) for w, _ in fastest[name]],
                        "fastest_total_s": sum(w for w, _ in fastest[name]),
                        "cpu_fastest_total_s": sum(c for _, c in fastest[name])}
    result["ratio"] = result["dlfa"]["fastest_total_s"] / result["baseline"]["fastest_total_s"]
    result["cpu_ratio"] = result["dlfa"]["cpu_fastest_total_s"] / result["baseline"]["cpu_fastest_total_s"]
    result["ratio_median_step"] = result["dlfa"]["median_step_s"] / result["baseline"]["median_step_s"]
    result["ratio_total"] = result["dlfa"]["total_s"] / result["baseline"]["total_s"]
    result["ratio_fwd_bwd"] = result["dlfa"]["fwd_bwd_s"] / result["baseline"]["fwd_bwd_s"]
    result["per_batch_ratio_median"] = statistics.median(per_batch)
    result["per_batch_ratio_quartiles"] = _quartiles(per_batch)
    result["per_batch_ratio_median_ci95"] = _bootstrap_median(per_batch, s.seed)
    result["cpu_per_batch_ratio_median"] = statistics.median(per_batch_cpu)
    result["cpu_per_batch_ratio_quartiles"] = _quartiles(per_batch_cpu)
    result["cpu_per_batch_ratio_median_ci95"] = _bootstrap_median(per_batch_cpu, s.seed)
    dims = {name: (non_embedding_params(model), model.num_layers, model.encoder.config.hidden_size)
            for name, model in models.items()}
    model_flops = {name: sum(flops(real_lengths(b), *dims[name]) for b in batches) for name in names}
    result["flop_ratio"] = model_flops["dlfa"] / model_flops["baseline"]
    result["target_ratio"] = 1.02
    free(models, optimizers)
    return result


def _bootstrap_median(values: list[float], seed: int, resamples: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


# ------------------------------------------------------------------------------------------------- c


def bench_evaluation(ctx: Context) -> dict[str, Any]:
    """Section c: sorted-length dynamic batching against fixed-128 over every UD test set."""
    from dlfa.data.batching import sorted_batches
    from dlfa.evaluation.evaluate import predict

    s = ctx.settings
    dtype = torch.bfloat16 if s.bf16 else None
    treebanks, (full_real, full_dynamic, full_fixed) = ctx.eval_treebanks()
    if not treebanks:
        return {"skipped": f"no UD test sets in {s.data_dir}"}
    model = ctx.model(fuse=True).eval()
    variants = {
        "sorted": lambda feats: predict(model, feats, ctx.dynamic, s.eval_batch_size, s.device, sort_by_length=True,
                                        autocast_dtype=dtype),
        "fixed128": lambda feats: predict(model, feats, ctx.fixed, s.eval_batch_size, s.device,
                                          sort_by_length=False, autocast_dtype=dtype),
    }
    log("c: warm-up")
    for run in variants.values():
        run(treebanks[0][2][: s.eval_batch_size])
    log(f"c: timing {len(treebanks)} treebanks (alternating)")
    totals = {name: 0.0 for name in variants}
    cpu_totals = {name: 0.0 for name in variants}
    per_treebank = []
    agree = labelled = 0
    for index, (name, sentences, features) in enumerate(treebanks):
        order = list(variants) if index % 2 == 0 else list(variants)[::-1]
        row: dict[str, Any] = {"treebank": name, "sentences": len(sentences),
                               "real_tokens": sum(len(f["input_ids"]) for f in features)}
        outputs = {}
        for variant in order:
            sync(s.torch_device)
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[variant] = variants[variant](features)
            sync(s.torch_device)
            row[f"{variant}_s"] = time.perf_counter() - start
            row[f"{variant}_cpu_s"] = time.process_time() - start_cpu  # less disturbed by other jobs than wall time
            totals[variant] += row[f"{variant}_s"]
            cpu_totals[variant] += row[f"{variant}_cpu_s"]
        for a, b in zip(outputs["sorted"], outputs["fixed128"]):
            agree += sum(x == y for x, y in zip(a, b))
            labelled += len(a)
        per_treebank.append(row)
    sentences = sum(r["sentences"] for r in per_treebank)
    real = sum(r["real_tokens"] for r in per_treebank)
    positions = {"sorted": 0, "fixed128": 0}
    for _, _, features in treebanks:
        positions["fixed128"] += PAD_TO * len(features)
        positions["sorted"] += sum(max(len(features[i]["input_ids"]) for i in b) * len(b)
                                   for b in sorted_batches(features, s.eval_batch_size))
    result: dict[str, Any] = {"treebanks": len(treebanks), "sentences": sentences, "real_tokens": real,
                              "sentences_per_treebank": s.eval_sentences or "all",
                              "precision": "bf16" if s.bf16 else "fp32",
                              "eval_batch_size": s.eval_batch_size, "per_treebank": per_treebank}
    for variant in variants:
        result[variant] = {"total_s": totals[variant], "tokens_per_s": real / totals[variant],
                           "cpu_s": cpu_totals[variant], "tokens_per_cpu_s": real / cpu_totals[variant],
                           "sentences_per_s": sentences / totals[variant],
                           "padding_fraction": 1 - real / positions[variant]}
    result["ratio_tokens_per_s"] = result["sorted"]["tokens_per_s"] / result["fixed128"]["tokens_per_s"]
    result["ratio_tokens_per_cpu_s"] = result["sorted"]["tokens_per_cpu_s"] / result["fixed128"]["tokens_per_cpu_s"]
    result["prediction_agreement"] = agree / max(labelled, 1)
    result["full_test_sets_padding_fraction"] = {"sorted": 1 - full_real / full_dynamic,
                                                 "fixed128": 1 - full_real / full_fixed}
    result["target_ratio"] = 4.0
    free(model)
    return result


# ------------------------------------------------------------------------------------------------- d


def bench_memory(ctx: Context) -> dict[str, Any]:
    """Section d: peak memory of a training run per variant, each in a fresh subprocess."""
    from safetensors.torch import save_file

    s = ctx.settings
    batch = ctx.dynamic_batches[0] if s.quick else _longest(ctx)
    results: dict[str, Any] = {"batch_size": int(batch["input_ids"].shape[0]),
                               "padded_length": int(batch["input_ids"].shape[1]), "steps": s.memory_steps}
    with tempfile.TemporaryDirectory(prefix="dlfa-bench-") as tmp:
        batch_file = Path(tmp) / "batch.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(batch_file))
        for variant in MEMORY_VARIANTS:
            spec = {**variant, "model_path": ctx.model_path, "batch": str(batch_file), "settings": asdict(s)}
            spec.pop("name")
            log(f"d: {variant['name']} in a fresh subprocess")
            results[variant["name"]] = _run_child(spec)
    return results


def _longest(ctx: Context) -> dict[str, torch.Tensor]:
    """A batch of the dlfa pipeline holding the longest training feature (the first batch of an epoch)."""
    from dlfa.data.batching import train_loader

    s = ctx.settings
    loader = train_loader(ctx.train_features, ctx.dynamic, s.batch_size, torch.Generator().manual_seed(s.seed))
    return next(iter(loader))


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def memory_child(spec_text: str) -> int:
    """Subprocess body of section d: load one variant, train, print the peaks as one JSON line."""
    from safetensors.torch import load_file

    from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAForTokenClassification, load_encoder

    spec = json.loads(spec_text)
    s = Settings(**{**spec["settings"], "sections": tuple(spec["settings"]["sections"])})
    torch.set_num_threads(s.threads)
    device = s.torch_device
    before = _status_mib("VmRSS")
    torch.manual_seed(s.seed)
    encoder = load_encoder(spec["model_path"])
    config = DLFAConfig(encoder=encoder.config, num_labels=17, fuse_layer=s.fuse_layer)
    model = DLFAForTokenClassification(config, encoder=encoder).to(device).train()
    if spec.get("freeze_embeddings"):
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    loaded = _status_mib("VmRSS")
    bf16 = s.bf16 if "precision" not in spec else spec["precision"] == "bf16"
    optimizer = optimizer_for(model, spec.get("adamw_implementation", s.adamw_implementation),
                              spec.get("embedding_updates", s.embedding_updates))
    batch = load_file(spec["batch"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    after_step = []
    for _ in range(s.memory_steps):
        train_step(model, optimizer, batch, s, bf16)
        after_step.append(_status_mib("VmHWM"))
    result = {
        "precision": "bf16" if bf16 else "fp32",
        "adamw_implementation": spec.get("adamw_implementation", s.adamw_implementation),
        "embedding_updates": spec.get("embedding_updates", s.embedding_updates),
        "peak_rss_after_each_step_mib": after_step,
        "peak_rss_mib": _status_mib("VmHWM"),
        "ru_maxrss_mib": _maxrss_mib(),
        "rss_at_start_mib": before,
        "rss_after_model_load_mib": loaded,
        "rss_after_training_mib": _status_mib("VmRSS"),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    from dlfa.training.optim import LazyAdamW, word_embeddings

    if isinstance(optimizer, LazyAdamW):
        result["embedding_rows_with_moments"] = optimizer.stored_rows(word_embeddings(model).weight)
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    print(json.dumps(result))
    return 0


def _maxrss_mib() -> float:
    """getrusage's ru_maxrss; Linux carries the parent's peak over fork+exec, so section d runs first."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (2**20 if sys.platform == "darwin" else 2**10)


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status in MiB (VmHWM: this process's peak RSS; NaN off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


# ------------------------------------------------------------------------------------------------- e


def bench_mfu(ctx: Context) -> dict[str, Any]:
    """Section e: MFU of an mBERT-size encoder (random init) trained with dynamic vs fixed-128 padding."""
    from transformers import BertConfig, BertModel

    from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAForTokenClassification

    s = ctx.settings
    shape = MBERT if s.mfu_size == "mbert" else TINY_BERT
    config = BertConfig(**shape, max_position_embeddings=512, type_vocab_size=2, pad_token_id=1)
    torch.manual_seed(s.seed)
    dlfa_config = DLFAConfig(encoder=config, num_labels=len(ctx.task.labels), fuse_layer=None)
    model = DLFAForTokenClassification(dlfa_config, encoder=BertModel(config, add_pooling_layer=False))
    model = model.to(s.torch_device).train()
    optimizer = optimizer_for(model)
    n_params = non_embedding_params(model)

    def fold(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The e5 (XLM-R) ids folded into mBERT's vocabulary: real EWT lengths, not mBERT's WordPiece lengths.
        return {**batch, "input_ids": batch["input_ids"] % config.vocab_size}

    steps = min(s.mfu_steps, len(ctx.dynamic_batches))
    variants = {"dlfa": [fold(b) for b in ctx.dynamic_batches[:steps]],
                "fixed128": [fold(b) for b in ctx.fixed_batches(steps)]}
    log(f"e: warm-up ({s.warmup} step(s) per variant)")
    alternate({n: lambda i, n=n: train_step(model, optimizer, variants[n][i % steps], s) for n in variants}, s.warmup)
    log(f"e: timing {steps} steps per variant")
    times = alternate({n: lambda i, n=n: train_step(model, optimizer, variants[n][i], s) for n in variants}, steps)
    result: dict[str, Any] = {
        "size": s.mfu_size, "config": {**shape, "bf16_autocast": s.bf16}, "non_embedding_params": n_params,
        "total_params": sum(p.numel() for p in model.parameters()), "peak_tflops": s.peak_tflops, "steps": steps,
        "formula": "model FLOPs/step = 6*N*sum(T_i) + 12*L*H*sum(T_i^2), T_i real lengths, N non-embedding params",
    }
    for name, batches in variants.items():
        stats = summary(times[name])
        model_flops = sum(flops(real_lengths(b), n_params, config.num_hidden_layers, config.hidden_size)
                          for b in batches)
        executed = sum(flops([b["input_ids"].shape[1]] * b["input_ids"].shape[0], n_params,
                             config.num_hidden_layers, config.hidden_size) for b in batches)
        six_n = sum(6.0 * n_params * sum(real_lengths(b)) for b in batches)
        result[name] = {
            **stats,
            "tokens_per_s": sum(sum(real_lengths(b)) for b in batches) / stats["total_s"],
            "model_tflops_per_s": model_flops / stats["total_s"] / 1e12,
            "executed_tflops_per_s": executed / stats["total_s"] / 1e12,
            "mfu": model_flops / stats["total_s"] / 1e12 / s.peak_tflops,
            "mfu_6n_only": six_n / stats["total_s"] / 1e12 / s.peak_tflops,
            "hardware_flops_utilisation": executed / stats["total_s"] / 1e12 / s.peak_tflops,
        }
    result["ratio_tokens_per_s"] = result["dlfa"]["tokens_per_s"] / result["fixed128"]["tokens_per_s"]
    if s.device != "cuda":
        result["note"] = "not a GPU run: the peak is a GPU figure, so these MFU values mean nothing"
    free(model, optimizer)
    return result


# ------------------------------------------------------------------------------------------------- f


def bench_precision(ctx: Context) -> dict[str, Any]:
    """Section f: bf16 autocast against fp32, everything else dlfa's (batches, optimizer, model D_x).

    Training: one model and one optimizer, steps alternating between bf16 and fp32 autocast (B F, F B, ...) on
    the batches of section a. Evaluation: ``predict`` (sorted, dynamic padding) of the sample of section c, the
    two precisions alternating which goes first per treebank; the share of predictions on which they agree.
    Peak RSS: from section d (``dlfa`` against ``dlfa-fp32``, each in a fresh process), when it ran."""
    from dlfa.evaluation.evaluate import predict
    from dlfa.training.precision import cpu_bf16_flags

    s = ctx.settings
    steps = min(s.steps, len(ctx.dynamic_batches))
    batches = ctx.dynamic_batches[:steps]
    model = ctx.model(fuse=True)
    optimizer = dlfa_optimizer(model, s)
    variants = {"bf16": True, "fp32": False}

    def runner(bf16: bool) -> Callable[[int], Timing]:
        return lambda i: train_step(model, optimizer, batches[i % steps], s, bf16)

    log(f"f: training warm-up ({s.warmup} step(s) per precision)")
    alternate({name: runner(bf16) for name, bf16 in variants.items()}, s.warmup)
    log(f"f: timing {steps} training steps per precision (alternating)")
    times = alternate({name: runner(bf16) for name, bf16 in variants.items()}, steps)
    real = sum(sum(real_lengths(b)) for b in batches)
    result: dict[str, Any] = {"steps": steps, "batch_size": s.batch_size, "cpu_bf16_flags": cpu_bf16_flags(),
                              "adamw_implementation": s.adamw_implementation,
                              "embedding_updates": s.embedding_updates, "training": {}, "evaluation": {}}
    for name in variants:
        stats = summary(times[name])
        result["training"][name] = {**stats, "tokens_per_s": real / stats["total_s"],
                                    "tokens_per_cpu_s": real / stats["cpu_total_s"],
                                    "tokens_per_s_fwd_bwd_only": real / stats["fwd_bwd_s"]}
    train = result["training"]
    train["ratio_tokens_per_s"] = train["bf16"]["tokens_per_s"] / train["fp32"]["tokens_per_s"]
    train["ratio_tokens_per_cpu_s"] = train["bf16"]["tokens_per_cpu_s"] / train["fp32"]["tokens_per_cpu_s"]
    train["ratio_fwd_bwd_only"] = train["bf16"]["tokens_per_s_fwd_bwd_only"] / train["fp32"]["tokens_per_s_fwd_bwd_only"]
    free(optimizer)

    treebanks, _ = ctx.eval_treebanks()
    if treebanks:
        model.eval()
        dtypes = {"bf16": torch.bfloat16, "fp32": None}
        log("f: evaluation warm-up")
        for dtype in dtypes.values():
            predict(model, treebanks[0][2][: s.eval_batch_size], ctx.dynamic, s.eval_batch_size, s.device,
                    autocast_dtype=dtype)
        log(f"f: timing evaluation of {len(treebanks)} treebanks per precision (alternating)")
        totals = {name: 0.0 for name in dtypes}
        cpu_totals = {name: 0.0 for name in dtypes}
        agree = labelled = tokens = 0
        for index, (_, _, features) in enumerate(treebanks):
            outputs = {}
            for name in (list(dtypes) if index % 2 == 0 else list(dtypes)[::-1]):
                sync(s.torch_device)
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = predict(model, features, ctx.dynamic, s.eval_batch_size, s.device,
                                        autocast_dtype=dtypes[name])
                sync(s.torch_device)
                totals[name] += time.perf_counter() - start
                cpu_totals[name] += time.process_time() - start_cpu
            tokens += sum(len(f["input_ids"]) for f in features)
            for a, b in zip(outputs["bf16"], outputs["fp32"]):
                agree += sum(x == y for x, y in zip(a, b))
                labelled += len(a)
        evaluation = result["evaluation"]
        for name in dtypes:
            evaluation[name] = {"total_s": totals[name], "cpu_s": cpu_totals[name],
                                "tokens_per_s": tokens / totals[name], "tokens_per_cpu_s": tokens / cpu_totals[name]}
        evaluation["ratio_tokens_per_s"] = evaluation["bf16"]["tokens_per_s"] / evaluation["fp32"]["tokens_per_s"]
        evaluation["ratio_tokens_per_cpu_s"] = (evaluation["bf16"]["tokens_per_cpu_s"]
                                                / evaluation["fp32"]["tokens_per_cpu_s"])
        evaluation["prediction_agreement"] = agree / max(labelled, 1)
        evaluation["treebanks"], evaluation["real_tokens"] = len(treebanks), tokens
    free(model)
    return result


# ------------------------------------------------------------------------------------------------- g


def bench_optimizer(ctx: Context) -> dict[str, Any]:
    """Section g: one AdamW step of the model D_x per kernel, on the gradients of one batch.

    The gradients of the longest batch of an epoch (section d's; the most table rows) are computed once; each variant (torch's for-loop, foreach and fused kernels
    over the dense table, and lazy updates with the fused kernel on the table's sparse gradient: the same
    gradient, its non-zero rows) has its own optimizer and state, and the variants alternate (A B C D, D C B A)
    after a warm-up step that allocates their state. Wall and process-CPU seconds of ``optimizer.step()``."""
    from dlfa.training.optim import word_embeddings

    s = ctx.settings
    model = ctx.model(fuse=True)
    table = word_embeddings(model).weight
    batch = ctx.dynamic_batches[0] if s.quick else _longest(ctx)
    inputs = {k: v.to(s.torch_device) for k, v in batch.items()}
    with autocast(s):
        model(**inputs).loss.backward()
    dense_grad = table.grad.detach().clone()
    rows = dense_grad.abs().sum(dim=1).nonzero().flatten()
    sparse_grad = torch.sparse_coo_tensor(rows.unsqueeze(0), dense_grad[rows], dense_grad.shape).coalesce()
    variants = {"for-loop": ("for-loop", "dense"), "foreach": ("foreach", "dense"), "fused": ("fused", "dense"),
                "lazy (fused)": ("fused", "lazy")}
    optimizers = {name: optimizer_for(model, kernel, updates) for name, (kernel, updates) in variants.items()}

    def step(name: str) -> Timing:
        table.grad = sparse_grad if variants[name][1] == "lazy" else dense_grad
        sync(s.torch_device)
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizers[name].step()
        sync(s.torch_device)
        return 0.0, time.perf_counter() - start, 0.0, time.process_time() - cpu_start

    repeats = 1 if s.quick else 3
    log("g: warm-up (one step per kernel: allocates the AdamW state)")
    alternate({name: lambda i, n=name: step(n) for name in variants}, 1)
    log(f"g: timing {repeats} optimizer steps per kernel (alternating)")
    times = alternate({name: lambda i, n=name: step(n) for name in variants}, repeats)
    distinct = sorted(len(torch.unique(b["input_ids"])) for b in ctx.dynamic_batches)
    result: dict[str, Any] = {"repeats": repeats, "table_rows": int(table.shape[0]), "rows_in_batch": len(rows),
                              "rows_per_timed_batch_of_a_median": statistics.median(distinct),
                              "rows_per_timed_batch_of_a_max": distinct[-1],
                              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for name in variants:
        walls = [t[1] for t in times[name]]
        result[name] = {"median_s": statistics.median(walls), "min_s": min(walls),
                        "cpu_median_s": statistics.median(t[3] for t in times[name]), "step_s": walls}
    free(model, optimizers)
    return result


def precision_memory(results: dict[str, Any]) -> dict[str, Any] | None:
    """Peak RSS bf16 / fp32 from section d (dlfa against dlfa-fp32), when both ran in bf16 and fp32."""
    d = results["sections"].get("d") or {}
    bf16, fp32 = d.get("dlfa", {}), d.get("dlfa-fp32", {})
    if "peak_rss_mib" not in bf16 or "peak_rss_mib" not in fp32 or bf16.get("precision") != "bf16":
        return None
    return {"bf16_mib": bf16["peak_rss_mib"], "fp32_mib": fp32["peak_rss_mib"],
            "ratio": bf16["peak_rss_mib"] / fp32["peak_rss_mib"]}


def bench_processes_section(ctx: Context) -> dict[str, Any]:
    """Section h: two data-parallel processes (torchrun) against one, same global batch (``processes.py``)."""
    from processes import bench_processes

    s = ctx.settings
    steps = 10 if s.quick else 40
    return bench_processes(s.data_dir, s.model, steps, s.batch_size, rounds=1 if s.quick else 2,
                           threads=os.cpu_count() or 1, log=log)


# ------------------------------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    """The headline figures as a Markdown table."""
    rows = [("measurement", "dlfa", "baseline", "ratio", "target")]
    a, b, c, d, e, f, g, h = (results["sections"].get(k) for k in "abcdefgh")
    if a:
        dlfa_name = "dlfa ({precision}, {adamw_implementation} AdamW, {embedding_updates} emb.)".format(
            **a["variants"]["dlfa"])
        rows.append((f"a. training, real tokens/s: {dlfa_name} vs XTREME (fixed-128, fp32, for-loop AdamW)",
                     f"{a['dlfa']['tokens_per_s']:.0f}", f"{a['fixed128']['tokens_per_s']:.0f} (fixed-128)",
                     f"{a['ratio_tokens_per_s']:.2f}x", ">= 9x"))
        rows.append(("a. same, real tokens per process CPU second", f"{a['dlfa']['tokens_per_cpu_s']:.0f}",
                     f"{a['fixed128']['tokens_per_cpu_s']:.0f}", f"{a['ratio_tokens_per_cpu_s']:.2f}x", ">= 9x"))
        rows.append(("a. same, forward+backward only", f"{a['dlfa']['tokens_per_s_fwd_bwd_only']:.0f}",
                     f"{a['fixed128']['tokens_per_s_fwd_bwd_only']:.0f}", f"{a['ratio_fwd_bwd_only']:.2f}x", ""))
        rows.append(("a. dlfa before (dynamic padding, fp32, for-loop AdamW, dense emb.) vs fixed-128",
                     f"{a['dlfa-fp32-dense']['tokens_per_s']:.0f}", f"{a['fixed128']['tokens_per_s']:.0f}",
                     f"{a['ratio_before_tokens_per_s']:.2f}x", ">= 4x"))
        rows.append(("a. dlfa vs dlfa before: precision + optimizer", f"{a['dlfa']['tokens_per_s']:.0f}",
                     f"{a['dlfa-fp32-dense']['tokens_per_s']:.0f}", f"{a['speedup_tokens_per_s']:.2f}x", ""))
        rows.append(("a. padding, timed batches", f"{a['dlfa']['padding_fraction']:.1%}",
                     f"{a['fixed128']['padding_fraction']:.1%}", "", ""))
        ep = a["epoch_padding_fraction"]
        rows.append(("a. padding, full EWT epoch", f"{ep['dlfa']:.1%}", f"{ep['fixed128']:.1%}", "", "~82% fixed"))
        rows.append(("a. optimizer share of step time (dlfa before: "
                     f"{a['dlfa-fp32-dense']['optimizer_share']:.0%})", f"{a['dlfa']['optimizer_share']:.0%}",
                     f"{a['fixed128']['optimizer_share']:.0%}", "", ""))
    if b:
        ci = b["per_batch_ratio_median_ci95"]
        rows.append((f"b. D_{b['fuse_layer']} / baseline step time: median over batches [95% CI]", "", "",
                     f"{b['per_batch_ratio_median']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", "<= 1.02"))
        if ctx_device(results) == "cpu":
            ci = b["cpu_per_batch_ratio_median_ci95"]
            rows.append(("b. same in process CPU time", "", "",
                         f"{b['cpu_per_batch_ratio_median']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", "<= 1.02"))
        rows.append((f"b. sum of fastest steps ({b['repeats']} per batch, {b['batches']} batches)",
                     f"{b['dlfa']['fastest_total_s']:.2f} s", f"{b['baseline']['fastest_total_s']:.2f} s",
                     f"{b['ratio']:.3f}", ""))
        rows.append(("b. median of all steps", f"{b['dlfa']['median_step_s']:.3f} s",
                     f"{b['baseline']['median_step_s']:.3f} s", f"{b['ratio_median_step']:.3f}", ""))
        rows.append(("b. model FLOPs, 6N counting (upper bound)", "", "", f"{b['flop_ratio']:.4f}", ""))
    if c and "skipped" not in c:
        rows.append(("c. evaluation, real tokens/s", f"{c['sorted']['tokens_per_s']:.0f}",
                     f"{c['fixed128']['tokens_per_s']:.0f} (fixed-128)", f"{c['ratio_tokens_per_s']:.2f}x", ">= 4x"))
        rows.append(("c. same, real tokens per process CPU second", f"{c['sorted']['tokens_per_cpu_s']:.0f}",
                     f"{c['fixed128']['tokens_per_cpu_s']:.0f} (fixed-128)", f"{c['ratio_tokens_per_cpu_s']:.2f}x",
                     ">= 4x"))
        rows.append(("c. evaluation, sentences/s", f"{c['sorted']['sentences_per_s']:.1f}",
                     f"{c['fixed128']['sentences_per_s']:.1f}", "", ""))
        rows.append(("c. padding, timed sample", f"{c['sorted']['padding_fraction']:.1%}",
                     f"{c['fixed128']['padding_fraction']:.1%}", "", ""))
        full = c["full_test_sets_padding_fraction"]
        rows.append(("c. padding, all test sentences (computed)", f"{full['sorted']:.1%}", f"{full['fixed128']:.1%}",
                     "", ""))
    if d:
        for variant in MEMORY_VARIANTS:
            item = d.get(variant["name"], {})
            if "error" in item:
                rows.append((f"d. peak memory, {variant['name']}", item["error"], "", "", ""))
                continue
            if not item:
                continue
            value = f"{item['peak_rss_mib']:.0f} MiB peak RSS"
            if "cuda_max_allocated_mib" in item:
                value += f", {item['cuda_max_allocated_mib']:.0f} MiB CUDA"
            what = (f"{item['precision']}, {item['adamw_implementation']} AdamW, {item['embedding_updates']} emb., "
                    f"{item['trainable_params'] / 1e6:.1f}M trainable")
            rows.append((f"d. peak memory, {variant['name']} ({what})", value, "", "",
                         "< 4096 MiB" if variant["name"] == "dlfa" else ""))
    if f:
        train, evaluation = f["training"], f.get("evaluation") or {}
        rows.append(("f. bf16 / fp32 training, real tokens/s (dlfa's batches and optimizer)",
                     f"{train['bf16']['tokens_per_s']:.0f} (bf16)", f"{train['fp32']['tokens_per_s']:.0f} (fp32)",
                     f"{train['ratio_tokens_per_s']:.2f}x", ""))
        rows.append(("f. same, per process CPU second", f"{train['bf16']['tokens_per_cpu_s']:.0f}",
                     f"{train['fp32']['tokens_per_cpu_s']:.0f}", f"{train['ratio_tokens_per_cpu_s']:.2f}x", ""))
        if evaluation:
            rows.append(("f. bf16 / fp32 evaluation, real tokens/s (sorted batches, section c's sample)",
                         f"{evaluation['bf16']['tokens_per_s']:.0f} (bf16)",
                         f"{evaluation['fp32']['tokens_per_s']:.0f} (fp32)",
                         f"{evaluation['ratio_tokens_per_s']:.2f}x", ""))
            rows.append(("f. same, per process CPU second", f"{evaluation['bf16']['tokens_per_cpu_s']:.0f}",
                         f"{evaluation['fp32']['tokens_per_cpu_s']:.0f}",
                         f"{evaluation['ratio_tokens_per_cpu_s']:.2f}x", ""))
            rows.append(("f. predictions equal in bf16 and fp32", f"{evaluation['prediction_agreement']:.2%}", "",
                         "", ""))
        memory = f.get("peak_rss")
        if memory:
            rows.append(("f. bf16 / fp32 peak RSS (section d: dlfa vs dlfa-fp32)", f"{memory['bf16_mib']:.0f} MiB",
                         f"{memory['fp32_mib']:.0f} MiB", f"{memory['ratio']:.2f}x", ""))
    if e:
        rows.append((f"e. {'mBERT' if e['size'] == 'mbert' else e['size']}-size training, real tokens/s", f"{e['dlfa']['tokens_per_s']:.0f}",
                     f"{e['fixed128']['tokens_per_s']:.0f} (fixed-128)", f"{e['ratio_tokens_per_s']:.2f}x", ""))
        rows.append(("e. model TFLOP/s (executed TFLOP/s)", *[
            f"{e[v]['model_tflops_per_s']:.1f} ({e[v]['executed_tflops_per_s']:.1f})" for v in ("dlfa", "fixed128")
        ], "", ""))
        rows.append((f"e. MFU vs {e['peak_tflops']:.0f} TFLOP/s peak", f"{e['dlfa']['mfu']:.1%}",
                     f"{e['fixed128']['mfu']:.1%}", "", ""))
    if g:
        for name in ("for-loop", "foreach", "fused", "lazy (fused)"):
            rows.append((f"g. AdamW step, {name}" + (f" ({g['rows_in_batch']} of {g['table_rows']} table rows; "
                                                      f"section a's batches: median "
                                                      f"{g['rows_per_timed_batch_of_a_median']:.0f})"
                                                      if name.startswith("lazy") else " (whole table)"),
                         f"{g[name]['median_s']:.3f} s (median of {g['repeats']})", "",
                         f"{g['for-loop']['median_s'] / g[name]['median_s']:.1f}x vs for-loop", ""))
    if h:
        rows.append((f"h. training, real tokens/s: 2 processes (torchrun, {h['threads_total'] // 2} thread each) vs 1 "
                     f"({h['threads_total']} threads), same global batch", f"{h['two_processes_tokens_per_second']:.0f}",
                     f"{h['one_process_tokens_per_second']:.0f}", f"{h['ratio']:.2f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _bf16_flags() -> list[str]:
    from dlfa.training.precision import cpu_bf16_flags

    return cpu_bf16_flags()


def ctx_device(results: dict[str, Any]) -> str:
    return results["settings"]["device"]


def environment(settings: Settings) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "load_average_start": load_average(),
        "cpu_model": _cpu_model(), "cpu_bf16_flags": _bf16_flags(),
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "a": bench_training, "b": bench_dlfa_overhead, "c": bench_evaluation, "d": bench_memory, "e": bench_mfu,
    "f": bench_precision, "g": bench_optimizer, "h": bench_processes_section,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    settings = build_settings(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(settings.threads)
    if settings.device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    from dlfa.errors import DlfaInputError
    from dlfa.io import write_json_atomic
    from dlfa.tasks import get_task

    if not get_task("udpos").files(settings.data_dir, "en", "train"):
        print(f"benchmarks skipped: no UD English training file in {settings.data_dir} "
              "(the shared data is absent; pass --data-dir)")
        return 0
    output = Path(args.output or REPO / "benchmarks" / "results" /
                  f"{settings.device}{'-quick' if settings.quick else ''}.json")
    results: dict[str, Any] = {"environment": environment(settings), "settings": asdict(settings), "sections": {}}
    started = time.perf_counter()
    try:
        ctx = Context(settings)
        # d first: its subprocesses must start while this process is small (ru_maxrss survives fork+exec).
        for name in sorted(settings.sections, key=lambda k: (k != "d", k)):
            section_start = time.perf_counter()
            results["sections"][name] = SECTIONS[name](ctx)
            results["sections"][name]["wall_s"] = time.perf_counter() - section_start
            log(f"section {name} done in {results['sections'][name]['wall_s']:.0f}s, load {load_average()}")
    except DlfaInputError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    if "f" in results["sections"]:
        results["sections"]["f"]["peak_rss"] = precision_memory(results)
    results["environment"]["load_average_end"] = load_average()
    results["environment"]["wall_s"] = time.perf_counter() - started
    write_json_atomic(output, results)
    print(table(results))
    env = results["environment"]
    print(f"\ndlfa's precision: {'bf16' if settings.bf16 else 'fp32'} ({settings.precision_reason}); AdamW "
          f"{settings.adamw_implementation}, {settings.embedding_updates} embedding updates")
    print(f"{env['date']}  device {settings.device}  threads {env['torch_threads']}  load average "
          f"{env['load_average_start']} -> {env['load_average_end']}  wall {env['wall_s']:.0f}s")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
