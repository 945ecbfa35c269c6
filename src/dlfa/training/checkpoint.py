"""Training checkpoints for exact resumption, in safetensors and JSON only (no pickle anywhere).

A checkpoint folder holds:

* ``model.safetensors``: the model weights;
* ``optimizer.safetensors``: every per-parameter optimizer tensor (AdamW's moments and step counts), named
  ``<param index>.<state key>``;
* ``rng.safetensors``: the torch CPU (and CUDA) generator states and the training sampler's generator state;
* ``state.json``: optimizer hyperparameters, the scheduler's state, Python's and NumPy's RNG states and the
  loop position (step, epoch, batches consumed in the epoch, selection history).

The folder is written to a temporary name and renamed into place, so a kill at any moment leaves either the
previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from dlfa.errors import DlfaInputError
from dlfa.io import atomic_path

STATE_FILE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler_generator: torch.Generator | None,
    progress: dict[str, Any],
) -> None:
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = cuda_state
    if sampler_generator is not None:
        rng["sampler"] = sampler_generator.get_state()
    np_state = np.random.get_state()
    state = {
        "progress": progress,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "python_random": _jsonable(random.getstate()),
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler_generator: torch.Generator | None,
) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the loop position."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise DlfaInputError(f"incomplete checkpoint ({name} missing)", path=folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the model ({len(missing)} missing, {len(unexpected)} unexpected)")
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
        rng = load_file(str(folder / "rng.safetensors"))
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError, RuntimeError) as exc:
        raise DlfaInputError(f"corrupt checkpoint ({str(exc).splitlines()[0]})", path=folder) from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if sampler_generator is not None and "sampler" in rng:
        sampler_generator.set_state(rng["sampler"])
    random.setstate(_tuples(state["python_random"]))
    np_state = state["numpy_random"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state["progress"]


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
