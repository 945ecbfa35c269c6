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

import fcntl
import logging
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.training.config import SweepConfig, TrainConfig, method_family

logger = logging.getLogger("dlfa")

__all__ = ["SweepConfig", "cell_dir", "plan_cells", "run_cell", "run_sweep"]


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.rstrip("/").split("/")[-1] if "/" in model else model)


def row_name(family: str, fuse_layer: int | None) -> str:
    """``baseline`` / ``D_x`` for the paper's rows, ``<family>`` / ``<family>+D_x`` otherwise (``method_family``):
    the report's row label."""
    from dlfa.reporting.report import Row

    return Row("" if family == "finetune" else family, fuse_layer).label


def cell_dir(output: str | Path, task: str, model: str, fuse_layer: int | None, seed: int,
             family: str = "") -> Path:
    return Path(output) / task / model_slug(model) / row_name(family, fuse_layer) / f"seed-{seed}"


def plan_cells(sweep: SweepConfig) -> list[TrainConfig]:
    """Every cell's TrainConfig, checked up front (data folders, languages, layers against the encoder), so that
    a bad grid fails before any cell runs."""
    from transformers import AutoConfig

    from dlfa.modeling.modeling_dlfa import encoder_num_layers
    from dlfa.modeling.modeling_xmixup import validate_xmixup_layers
    from dlfa.tasks import get_task
    from dlfa.training.recipe import resolve_model
    from dlfa.training.xmixup import resolve_xmixup_defaults

    options = sweep.train_options()
    try:
        encoder_config = AutoConfig.from_pretrained(resolve_model(options.model))
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"cannot load model {options.model!r}: {str(exc).splitlines()[0]}", option="--model") from None
    num_layers = encoder_num_layers(encoder_config)
    layers = sweep.layers if sweep.layers is not None else list(range(1, num_layers))
    rows: list[int | None] = ([None] if sweep.baseline else []) + list(layers)
    if not rows:
        raise DlfaInputError("the sweep has no rows (no layers and no baseline)", option="--layers")
    data_dirs = sweep.data_dirs()
    cells = []
    for task_name in sweep.tasks:
        task = get_task(task_name, option="--tasks")
        task.check_data_dir(data_dirs[task_name], option="--data-root" if sweep.data_root else "--data-dir")
        task.resolve_languages(data_dirs[task_name], options.languages, option="--languages")
        for fuse_layer in rows:
            for seed in sweep.seeds:
                out = cell_dir(sweep.output_dir, task_name, options.model, fuse_layer, seed,
                               method_family(options, fuse_layer))
                try:
                    cell = TrainConfig(**sweep.train, task=task_name, data_dir=data_dirs[task_name],
                                       fuse_layer=fuse_layer, seed=seed, output_dir=str(out))
                    cell.with_task_defaults().check_against_encoder(encoder_config)
                except DlfaInputError as exc:
                    if exc.option == "--fuse-layer":
                        raise DlfaInputError(exc.message, option="--layers") from None
                    raise
                cells.append(cell)
                if options.method == "xmixup":  # the mixing blocks (given or the task's default) must fit the encoder
                    validate_xmixup_layers(resolve_xmixup_defaults(cell, task.head).xmixup_layers, num_layers)
    return cells


def run_cell(config: dict[str, Any], show_progress: bool = False, torch_threads: int | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one cell under its lock. Returns a status record; a failure is recorded, not raised,
    so that one bad cell does not stop the sweep."""
    started = time.time()
    cfg = TrainConfig.from_dict(config)
    run_dir = Path(cfg.output_dir)
    record: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        from dlfa.training.recipe import recipe_class

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = run_dir.parent / f"{run_dir.name}.lock"
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return {**record, "status": "busy"}
            recipe = recipe_class(cfg.method)(cfg, show_progress=show_progress, resume=True)
            if recipe.finished_result() is not None:
                return {**record, "status": "finished before"}
            resumed = (run_dir / "checkpoint" / "state.json").is_file()
            print(f"[started] {run_dir}" + (" (resuming)" if resumed else ""), flush=True)
            result = recipe.run()
            record.update(status="resumed" if resumed else "trained", score=result["average"][result["primary_metric"]],
                          scorer=result.get("scorer"))
    except (DlfaInputError, OSError, RuntimeError, ValueError, MemoryError) as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    record["seconds"] = time.time() - started
    return record


def _exit_with_parent(parent: int) -> None:
    """In a worker process: stop when the sweep's parent process is gone (even after a kill -9)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_local(cells: Sequence[TrainConfig], parallel: int, threads: int) -> Iterator[dict[str, Any]]:
    configs = [c.to_dict() for c in cells]
    if parallel <= 1:
        for config in configs:
            yield run_cell(config, show_progress=True)
        return
    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(run_cell, c, False, threads) for c in configs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # The workers, taken before shutdown() forgets them: an interrupted sweep stops its running cells now.
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            if process.is_alive():
                process.terminate()


def _connect_ray(address: str):
    try:
        import ray
    except ImportError:
        raise DlfaInputError("Ray is not installed (pip install 'dlfa[ray]')", option="--ray-address") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            message = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DlfaInputError(f"cannot reach a Ray cluster at {address!r} ({message}); start one with `ray start "
                                 "--head` (docs/cluster.md)", option="--ray-address") from None
    return ray


def _run_ray(cells: Sequence[TrainConfig], ray, cpus: float, gpus: float) -> Iterator[dict[str, Any]]:
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_cell)
    threads = max(1, int(cpus))
    pending = [remote.remote(c.to_dict(), False, threads) for c in cells]
    try:
        while pending:  # results as they finish, not in submission order
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def disk_estimate(cells: Sequence[TrainConfig]) -> str:
    """What the finished sweep will hold on disk: each kept model is a copy of the encoder's weights."""
    from dlfa.training.recipe import resolve_model

    folder = Path(resolve_model(cells[0].model)) if cells else None
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder and folder.is_dir() else 0
    if not weights:
        return "disk: each cell keeps a copy of the encoder's weights (--no-keep-weights: only what reports need)"
    kept = sum(cell.keep_weights for cell in cells)
    if not kept:
        return (f"disk: no model kept (--no-keep-weights: each cell's {weights / 1e6:.0f} MB of weights is deleted "
                "once it is scored; metrics and logs stay)")
    return (f"disk: about {kept * weights / 1e9:.1f} GB for the models of {kept} cells ({weights / 1e6:.0f} MB "
            f"each, --no-keep-weights deletes them once a cell is scored)")


class SweepProgress:
    """One line per cell: i/N, its status, its score or error, and an ETA from the cells trained so far."""

    def __init__(self, total: int, parallel: int, output: str, echo: Callable[[str], None]) -> None:
        self.total, self.parallel, self.output, self.echo = total, max(parallel, 1), Path(output), echo
        self.done, self.started = 0, time.time()
        self.durations: list[float] = []

    def report(self, record: dict[str, Any]) -> None:
        self.done += 1
        if record["status"] in ("trained", "resumed"):
            self.durations.append(record["seconds"])
        remaining = self.total - self.done
        eta = ""
        if remaining and self.durations:
            eta = f" | ETA {_duration(statistics.fmean(self.durations) * remaining / self.parallel)}"
        try:
            cell = str(Path(record["run_dir"]).relative_to(self.output))
        except ValueError:
            cell = record["run_dir"]
        detail = f" {record['score']:.2f}" if "score" in record else ""
        if record["status"] == "failed":
            detail = f" {record['error']}"
        self.echo(f"[{self.done}/{self.total}] {record['status']:<15} {cell}{detail}"
                  f" | {_duration(time.time() - self.started)} elapsed{eta}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_sweep(sweep: SweepConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell (skipping finished ones); a failed cell is recorded and the sweep goes on.

    Returns ``{"cells": [records], "failed": [records], "counts": {status: n}}``."""
    cells = plan_cells(sweep)
    ray = _connect_ray(sweep.ray_address) if sweep.ray_address else None
    echo(f"sweep: {len(cells)} cells into {sweep.output_dir}" + (f" on Ray at {sweep.ray_address}" if ray else
                                                                   f", {sweep.parallel} at a time"))
    echo(disk_estimate(cells))
    progress = SweepProgress(len(cells), sweep.parallel if ray is None else len(cells), sweep.output_dir, echo)
    threads = max(1, (os.cpu_count() or 1) // sweep.parallel)  # the machine's cores shared by the cells at once
    records = []
    stream = (_run_ray(cells, ray, sweep.cpus_per_run, sweep.gpus_per_run) if ray is not None
              else _run_local(cells, sweep.parallel, threads))
    for record in stream:
        records.append(record)
        progress.report(record)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    failed = [r for r in records if r["status"] == "failed"]
    echo("sweep done: " + ", ".join(f"{n} {status}" for status, n in counts.items())
         + ("; failed cells (their folders keep failed.json; run the sweep again to retry): "
            + "; ".join(r["run_dir"] for r in failed) if failed else ""))
    return {"cells": records, "failed": failed, "counts": counts}
