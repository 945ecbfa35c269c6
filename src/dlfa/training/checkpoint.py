"""Training checkpoints for exact resumption, in safetensors and JSON only (no pickle anywhere).

A checkpoint folder holds:

* ``model.safetensors``: the model weights;
* ``optimizer.safetensors``: every per-parameter optimizer tensor (AdamW's moments and step counts), named
  ``<param index>.<state key>``;
* ``rng.safetensors``: the torch CPU (and CUDA) generator states and the training sampler's generator state of
  process 0; ``rng-<k>.safetensors`` the same for process k of a multi-process run (each process saves its own);
* ``state.json``: optimizer hyperparameters (and the names of its tensors), the scheduler's state, Python's and
  NumPy's RNG states, the number of processes and the loop position (step, epoch, batches consumed in the epoch,
  selection history);
* ``checksums.json``, written last: the sha256 of each file above. safetensors checks a file's header, not its
  tensor data, so a flipped bit would otherwise be loaded silently; every file is verified before anything is used.

The folder is staged under a hidden temporary name and renamed into place, so a kill at any moment leaves either
the previous checkpoint or the new one (:func:`dlfa.io.recover_folder` finishes an interrupted replacement), never
a mixture. With several processes, every process writes its RNG file into the staging folder, then process 0
writes the rest and renames; the others wait at barriers. Model and optimizer are the same on every process
(data parallel), so process 0 saves them once.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from dlfa.errors import DlfaInputError
from dlfa.io import CHECKSUMS_NAME, TMP_SUFFIX, fsync_path, read_checksums, sha256_file, write_checksums

STATE_FILE = "state.json"
CHECKSUMS_FILE = CHECKSUMS_NAME
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE)
"""The files whose sha256 ``checksums.json`` records (itself not included)."""


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
    # The names are recorded so that a renamed tensor cannot restore its state onto another parameter.
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "tensors": sorted(tensors)}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    expected = meta["tensors"]
    if not isinstance(expected, list) or not all(isinstance(name, str) for name in expected):
        raise ValueError(f"{STATE_FILE}'s optimizer tensor names are not a list of names")
    if set(tensors) != set(expected):
        unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ValueError(f"optimizer.safetensors does not hold the recorded tensors (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not key:
            raise ValueError(f"optimizer tensor {name!r} names no parameter of the model")
        shape = params[int(index)].shape
        # Per-parameter state (moments) has the parameter's shape; only AdamW's step count is a scalar.
        if value.shape != shape and not (key == "step" and value.dim() == 0):
            raise ValueError(f"optimizer tensor {name!r} has shape {list(value.shape)}, its parameter {list(shape)}")
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_file(process_index: int) -> str:
    return "rng.safetensors" if process_index == 0 else f"rng-{process_index}.safetensors"


def checkpoint_files(num_processes: int) -> tuple[str, ...]:
    """The files whose sha256 checksums.json records, for a checkpoint of ``num_processes`` processes."""
    return (*FILES, *(rng_file(k) for k in range(1, num_processes)))


def _rng_tensors(sampler_generator: torch.Generator | None, local: dict[str, float] | None = None
                 ) -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    for key, value in (local or {}).items():  # this process's own running sums (its share of each batch)
        rng[f"local.{key}"] = torch.tensor(value, dtype=torch.float64)
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = cuda_state
    if sampler_generator is not None:
        rng["sampler"] = sampler_generator.get_state()
    return rng


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler_generator: torch.Generator | None,
    progress: dict[str, Any],
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] = lambda: None,
    local: dict[str, float] | None = None,
) -> None:
    """Write a checkpoint; with several processes every one calls this (``barrier`` is the accelerator's).

    ``local``: numbers that differ between processes (running loss sums), saved beside each process's RNG state;
    :func:`load_checkpoint` returns them under ``progress["local"]``."""
    folder = Path(folder)
    root = folder.parent / f".{folder.name}.step-{progress.get('step', 0)}{TMP_SUFFIX}"  # one name for all processes
    staged = root / folder.name
    if process_index == 0:
        shutil.rmtree(root, ignore_errors=True)
        staged.mkdir(parents=True)
    barrier()
    save_file(_rng_tensors(sampler_generator, local), str(staged / rng_file(process_index)))
    barrier()
    if process_index == 0:
        optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
        np_state = np.random.get_state()
        state = {
            "progress": progress,
            "num_processes": num_processes,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
            "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        save_model(model, str(staged / "model.safetensors"))
        save_file(optimizer_tensors, str(staged / "optimizer.safetensors"))
        (staged / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        write_checksums(staged, checkpoint_files(num_processes))  # last: it vouches for the files above
        if folder.is_dir():
            os.replace(folder, root / (folder.name + ".old"))
        os.replace(staged, folder)
        fsync_path(folder.parent)
        shutil.rmtree(root, ignore_errors=True)
    barrier()


def _verify_checksums(folder: Path) -> int:
    """Compare every file with its sha256 in checksums.json; ValueError naming the first that differs.

    Returns the number of processes that wrote the checkpoint (one RNG file each)."""
    digests = read_checksums(folder / CHECKSUMS_FILE)
    num_processes = 1 + sum(1 for name in digests if re.fullmatch(r"rng-[1-9][0-9]*\.safetensors", name))
    expected = checkpoint_files(num_processes)
    if set(digests) != set(expected):
        raise ValueError(f"{CHECKSUMS_FILE} does not list exactly {', '.join(expected)}")
    for name in expected:
        if sha256_file(folder / name) != digests[name]:
            raise ValueError(f"{name} does not match its sha256 in {CHECKSUMS_FILE}")
    return num_processes


def _require(mapping: Any, key: str, where: str) -> Any:
    """``mapping[key]``, or a ValueError saying what is missing (a bare KeyError message is just the key)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} is not a JSON object")
    if key not in mapping:
        raise ValueError(f"{where} has no {key!r}")
    return mapping[key]


def load_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler_generator: torch.Generator | None,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the loop position. Each process restores the
    shared model and optimizer state and its own RNG states.

    Every file is checked against checksums.json first, and every read of the saved state happens inside one
    ``try``: a damaged checkpoint is one clear :class:`DlfaInputError` naming the folder and the problem.
    """
    folder = Path(folder)
    for name in (*FILES, CHECKSUMS_FILE):
        if not (folder / name).is_file():
            raise DlfaInputError(f"incomplete checkpoint ({name} missing)", path=folder)
    try:
        written_by = _verify_checksums(folder)
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"corrupt checkpoint ({(str(exc).splitlines() or [''])[0]})", path=folder) from None
    if written_by != num_processes:
        # Another process count shards the data differently: the resumed run would not be the interrupted one.
        raise DlfaInputError(f"the checkpoint was written by {written_by} process(es); resume it with "
                             f"{written_by} (e.g. torchrun --nproc_per_node {written_by}), not {num_processes}",
                             path=folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        progress = _require(state, "progress", STATE_FILE)
        if not isinstance(progress, dict):
            raise ValueError(f"{STATE_FILE}'s 'progress' is not a JSON object")
        scheduler_state = _require(state, "scheduler", STATE_FILE)
        python_random = _tuples(_require(state, "python_random", STATE_FILE))
        np_state = _require(state, "numpy_random", STATE_FILE)
        np_state = (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the model ({len(missing)} missing, {len(unexpected)} unexpected)")
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")),
                           _require(state, "optimizer", STATE_FILE))
        rng_name = rng_file(process_index)
        rng = load_file(str(folder / rng_name))
        torch_cpu = _require(rng, "torch_cpu", rng_name)
        # A sampler that silently kept its fresh state would replay other batches than the interrupted run.
        sampler_state = None if sampler_generator is None else _require(rng, "sampler", rng_name)
        local = {key.removeprefix("local."): float(value) for key, value in rng.items() if key.startswith("local.")}
        scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(torch_cpu)
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        if sampler_generator is not None:
            sampler_generator.set_state(sampler_state)
        random.setstate(python_random)
        np.random.set_state(np_state)
        if local:
            progress = {**progress, "local": local}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
            RuntimeError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        # A KeyError's text is just the key; any other message is kept to its first line.
        message = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else (
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise DlfaInputError(f"corrupt checkpoint ({message})", path=folder) from None
    return progress


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
