"""Zero-shot evaluation: predict with length-sorted batches, then score with one of the task's named scorers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dlfa.data.batching import Collator, sorted_batches
from dlfa.tasks.base import Task


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    features: Sequence[dict],
    collator: Collator,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    sort_by_length: bool = True,
    autocast_dtype: torch.dtype | None = None,
    accelerator: Any = None,
    inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> list:
    """Per-feature predictions in the original feature order.

    Token heads give, per feature, the predicted label ids at its labelled positions; sequence heads give
    one label id per feature. ``model`` is a DLFA model (or X-Mixup around one): its ``head_type`` says which.

    With an ``accelerator`` of several processes, process k predicts batches k, k + n, ... of the very batches one
    process makes, and every process receives all predictions: the one-process result exactly (same batches,
    same padding), in a 1/n of the time. ``inputs`` maps a collated batch to the model's keyword arguments.
    """
    was_training = model.training
    model.eval()
    results: list = [None] * len(features)
    batches = sorted_batches(features, batch_size, sort=sort_by_length)
    shards = accelerator.num_processes if accelerator is not None else 1
    if shards > 1:
        batches = batches[accelerator.process_index::shards]
    device = torch.device(device)
    for indices in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        batch = collator([features[i] for i in indices])
        labels = batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**(inputs(batch) if inputs is not None else batch)).logits
        predicted = logits.argmax(dim=-1).cpu()
        if model.head_type == "token":
            assert labels is not None, "token features carry labels that mark the scored positions"
            for row, index in enumerate(indices):
                results[index] = predicted[row][labels[row] != -100].tolist()
        else:
            for row, index in enumerate(indices):
                results[index] = int(predicted[row])
    model.train(was_training)
    if shards > 1:
        from accelerate.utils import gather_object

        mine = [(i, results[i]) for indices in batches for i in indices]
        for part in gather_object([mine]):  # one list per process, on every process
            for index, prediction in part:
                results[index] = prediction
    return results


def evaluate_examples(
    task: Task,
    model: torch.nn.Module,
    examples: Sequence,
    features: Sequence[dict],
    collator: Collator,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    scorer: str | None = None,
    accelerator: Any = None,
) -> dict[str, Any]:
    """The task's metrics for the model's predictions; ``scorer`` names one of ``task.scorers`` (``None``: the
    task's default) and the returned dict carries that name under ``"scorer"``. ``accelerator``: see ``predict``."""
    chosen = task.get_scorer(scorer)  # an unknown name fails before the model runs
    predictions = predict(model, features, collator, batch_size, device, desc, autocast_dtype=autocast_dtype,
                          accelerator=accelerator)
    return task.score(examples, features, predictions, scorer=chosen.name)


def average(per_language: dict[str, dict[str, Any]], metric: str, exclude: Sequence[str] = ()) -> float | None:
    values = [m[metric] for lang, m in per_language.items() if lang not in exclude]
    return sum(values) / len(values) if values else None
