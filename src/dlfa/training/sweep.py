"""``dlfa sweep``: the grid of the paper's Table 1, tasks x {baseline, D_1 .. D_(N-1)} x seeds.

Every cell is an ordinary run folder, ``<output>/<task>/<model>/<row>/seed-<s>``, so anything that reads runs
(``dlfa report``) reads a sweep. The row is ``baseline`` / ``D_x`` for fine-tuning and ``xmixup`` /
``xmixup+D_x`` with ``--method xmixup`` (each cell then runs ``XMixupRecipe``): the names ``dlfa report`` gives
the rows. A sweep is resumable and safe to run twice at once:

* a finished cell (``metrics.json`` present) is skipped;
* a cell killed midway continues from its last checkpoint (``resume=True`` of the method's recipe);
* each cell is run under an exclusive ``flock`` on ``<cell>.lock``, taken without waiting: a second sweep
  process (or Ray worker) pointed at the same folder skips a cell that is in progress. The kernel drops the
  lock when its holder dies, so a kill -9 never leaves a cell blocked.

Cells run one after another by default, ``--parallel K`` runs K at once in separate processes, and
``--ray-address`` sends each cell to a Ray cluster as a task with its own CPU/GPU resources.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.training.config import TrainConfig

logger = logging.getLogger("dlfa")


@dataclass
class SweepConfig:
    tasks: list[str]
    data_dirs: dict[str, str]  # task -> data folder
    output_dir: str
    model: str
    layers: list[int] | None = None  # None: every valid layer 1..N-1
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    include_baseline: bool = True
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # any TrainConfig field
    parallel: int = 1
    ray_address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.rstrip("/").split("/")[-1] if "/" in model else model)


def row_name(method: str, fuse_layer: int | None) -> str:
    """``baseline`` / ``D_x`` for fine-tuning, ``<method>`` / ``<method>+D_x`` otherwise: the report's row label."""
    from dlfa.reporting.report import Row

    return Row("" if method == "finetune" else method, fuse_layer).label


def cell_dir(output: str | Path, task: str, model: str, fuse_layer: int | None, seed: int,
             method: str = "finetune") -> Path:
    return Path(output) / task / model_slug(model) / row_name(method, fuse_layer) / f"seed-{seed}"


def plan_cells(sweep: SweepConfig) -> list[TrainConfig]:
    """Every cell's TrainConfig, checked up front so that a bad grid fails before any run starts."""
    from transformers import AutoConfig

    from dlfa.modeling.modeling_dlfa import encoder_num_layers, validate_fuse_layer
    from dlfa.modeling.modeling_xmixup import validate_xmixup_layers
    from dlfa.tasks import get_task
    from dlfa.training.recipe import resolve_model
    from dlfa.training.xmixup import resolve_xmixup_defaults

    num_layers = encoder_num_layers(AutoConfig.from_pretrained(resolve_model(sweep.model)))
    layers = sweep.layers if sweep.layers is not None else list(range(1, num_layers))
    for layer in layers:
        validate_fuse_layer(layer, num_layers, option="--layers")
    rows: list[int | None] = ([None] if sweep.include_baseline else []) + list(layers)
    if not rows:
        raise DlfaInputError("the sweep has no rows (no layers and no baseline)", option="--layers")
    method = sweep.train_overrides.get("method") or "finetune"
    cells = []
    for task in sweep.tasks:
        head = get_task(task).head
        if task not in sweep.data_dirs:
            raise DlfaInputError(f"no data folder for task {task!r}", option="--data-dir")
        for fuse_layer in rows:
            for seed in sweep.seeds:
                fields = {**sweep.train_overrides, "task": task, "model": sweep.model,
                          "data_dir": sweep.data_dirs[task], "fuse_layer": fuse_layer, "seed": seed,
                          "output_dir": str(cell_dir(sweep.output_dir, task, sweep.model, fuse_layer, seed, method))}
                cells.append(TrainConfig.from_dict(fields))
                if method == "xmixup":  # the mixing blocks (given or the task's default) must fit the encoder
                    validate_xmixup_layers(resolve_xmixup_defaults(cells[-1], head).xmixup_layers, num_layers)
    return cells


def run_cell(config: dict[str, Any], show_progress: bool = False, torch_threads: int | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one cell under its lock. Returns a status record."""
    from dlfa.training.recipe import recipe_class

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    cfg = TrainConfig.from_dict(config)
    run_dir = Path(cfg.output_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f"{run_dir.name}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"run_dir": str(run_dir), "status": "busy"}
        recipe = recipe_class(cfg.method)(cfg, show_progress=show_progress, resume=True)
        if recipe.finished_result() is not None:
            return {"run_dir": str(run_dir), "status": "finished before"}
        resumed = (run_dir / "checkpoint" / "state.json").is_file()
        result = recipe.run()
        score = result["average"][result["primary_metric"]]
        return {"run_dir": str(run_dir), "status": "resumed" if resumed else "trained", "score": score,
                "scorer": result.get("scorer")}


def _run_local(cells: Sequence[TrainConfig], parallel: int) -> list[dict[str, Any]]:
    configs = [c.to_dict() for c in cells]
    if parallel <= 1:
        return [run_cell(c, show_progress=True) for c in configs]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_cell, c, False, threads) for c in configs]
        return [f.result() for f in futures]


def _run_ray(cells: Sequence[TrainConfig], address: str, cpus: float, gpus: float) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise DlfaInputError("Ray is not installed (pip install 'dlfa[ray]')", option="--ray-address") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_cell)
    threads = max(1, int(cpus))
    return ray.get([remote.remote(c.to_dict(), False, threads) for c in cells])


def run_sweep(sweep: SweepConfig) -> list[dict[str, Any]]:
    cells = plan_cells(sweep)
    logger.info("sweep: %d cells into %s", len(cells), sweep.output_dir)
    if sweep.ray_address:
        return _run_ray(cells, sweep.ray_address, sweep.cpus_per_run, sweep.gpus_per_run)
    return _run_local(cells, sweep.parallel)
