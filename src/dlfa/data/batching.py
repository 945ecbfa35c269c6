"""Batches: dynamic padding, length-grouped training batches, length-sorted evaluation batches.

XTREME's reference scripts pad every example to 128 tokens; on UD English-EWT that makes 82% of a batch
padding. Padding each batch only to its longest member, and putting examples of similar length together,
removes most of that work without changing what the model computes for the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

MODEL_KEYS = ("input_ids", "token_type_ids", "labels", "label")


class Collator:
    """Pads the model inputs of a list of features; bookkeeping keys (sentence index...) are dropped."""

    def __init__(self, tokenizer, head: str, pad_to: int | None = None) -> None:
        padding = "max_length" if pad_to else True
        if head == "token":
            self.inner = DataCollatorForTokenClassification(tokenizer, padding=padding, max_length=pad_to)
        else:
            self.inner = DataCollatorWithPadding(tokenizer, padding=padding, max_length=pad_to)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return self.inner([{k: f[k] for k in MODEL_KEYS if k in f} for f in features])


def train_loader(
    features: Sequence[dict],
    collator: Collator,
    batch_size: int,
    generator: torch.Generator,
    group_by_length: bool = True,
) -> DataLoader:
    """Shuffled training batches; with ``group_by_length`` examples of similar length share a batch.

    The order comes from ``generator`` alone, so saving its state at an epoch's start lets a resumed run
    replay that epoch's batches exactly.
    """
    if group_by_length:
        lengths = [len(f["input_ids"]) for f in features]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        return DataLoader(list(features), batch_size=batch_size, sampler=sampler, collate_fn=collator)
    return DataLoader(list(features), batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collator)


def sorted_batches(features: Sequence[dict], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Evaluation batches of feature indices, longest first when ``sort`` (order is restored by the caller)."""
    order = list(range(len(features)))
    if sort:
        order.sort(key=lambda i: len(features[i]["input_ids"]), reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
