"""Section h of ``benchmarks/run.py``: training throughput of two data-parallel processes against one.

Both variants train the same model on the same data with the same global batch through ``dlfa train``: one
process with two threads, and ``torchrun --nproc_per_node 2`` with one thread per process (gloo on the CPU,
NCCL on a GPU machine with ``--device cuda``). The throughput is the real (non-padding) tokens per second that the
trackers log (``train/tokens_per_second``, summed over the processes), median over the logged intervals after the
first (warm-up); the runs alternate (1, 2, 2, 1, ...) so that drift in the machine's load hits both.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _scalars(run: Path, tag: str) -> list[float]:
    from dlfa.training.tracking import tensorboard_scalars

    return [v for _, v in sorted(tensorboard_scalars(run).get(tag, []))]


def _train(processes: int, args: list[str], out: Path, threads_total: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads_total // processes)), "HF_HUB_OFFLINE": "1"}
    launcher = ([sys.executable, "-m", "dlfa"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "dlfa"])
    done = subprocess.run([*launcher, *args, "--output", str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process training failed: {done.stderr.strip().splitlines()[-1:]}")
    rates = _scalars(out, "train/tokens_per_second")[1:]  # the first interval holds the warm-up
    return {"tokens_per_second": statistics.median(rates), "intervals": len(rates),
            "train_seconds": json.loads((out / "metrics.json").read_text())["train_seconds"]}


def bench_processes(data_dir: str, model: str, steps: int, batch_size: int, rounds: int, threads: int,
                    log: Any = print) -> dict[str, Any]:
    args = ["train", "--task", "udpos", "--model", model, "--data-dir", data_dir, "--languages", "en",
            "--max-steps", str(steps), "--batch-size", str(batch_size), "--learning-rate", "1e-4",
            "--freeze-embeddings", "--max-dev-examples", "32", "--max-eval-examples", "32",
            "--checkpoint-every", str(steps), "--report-to", "tensorboard", "--log-every", "5", "--seed", "1"]
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="dlfa-processes-") as tmp:
        order = [p for r in range(rounds) for p in ((1, 2) if r % 2 == 0 else (2, 1))]
        for i, processes in enumerate(order):
            result = _train(processes, args, Path(tmp) / f"run-{i}-{processes}", threads)
            results[processes].append(result)
            log(f"  h. {processes} process(es): {result['tokens_per_second']:.0f} real tokens/s")
    one = statistics.median(r["tokens_per_second"] for r in results[1])
    two = statistics.median(r["tokens_per_second"] for r in results[2])
    return {"one_process_tokens_per_second": one, "two_processes_tokens_per_second": two, "ratio": two / one,
            "runs": {str(k): v for k, v in results.items()}, "steps": steps, "batch_size": batch_size,
            "threads_total": threads}
