#!/usr/bin/env python
"""Validate ``dlfa rank-layers`` against the real thing: a full x = 1..11 sweep at CPU scale.

For each task (UD-POS, PAN-X), with the settings of ``benchmarks/reproduce_cpu.sh`` (docs/results.md):

1. ``dlfa sweep --layers 1-11 --seeds 1,2 --no-baseline`` (22 fine-tunings per task; resumable: run this script
   again after an interruption and finished cells are skipped);
2. ``dlfa rank-layers`` on the same English train/dev files, same seeds, the command's defaults otherwise, in
   both modes (``joint``, the default, with the sweep's number of steps; and ``frozen``);
3. the comparison: Spearman ρ, top-1 and top-3 agreement and regret of the proxy's ranking against the sweep's
   English-dev ranking (its selection signal) and against its zero-shot ranking (average over the target
   languages), and, as a reference ceiling for any English-only signal, the sweep's own English-dev ranking
   against its zero-shot ranking; the CPU-time ratio (process CPU time of rank-layers / of the sweep, both
   measured as this script's waited-for children, all their processes and threads included).

Writes ``OUTPUT/validation.json`` and ``OUTPUT/validation.md``; the CPU and wall times of every step go to
``OUTPUT/costs.json`` as it runs (an interrupted and resumed sweep adds up its invocations; the CPU time of an
invocation that was killed is lost, and the table then says so).

    python benchmarks/validate_rank_layers.py [--output validate-rank] [--tasks udpos,panx] [--seeds 1,2]
                                              [--modes joint,frozen]
    python benchmarks/validate_rank_layers.py --compare-only        # tables from existing outputs

Run from the repository root with ``../shared/data`` beside it (or ``--data-root``). Expected time on the
2-core machine: see docs/rank-layers.md ("Validation").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dlfa.analysis.rank_compare import (
    compare_rankings,
    load_ranking,
    mean_over_seeds,
    proxy_scores,
    sweep_layer_scores,
)

# benchmarks/reproduce_cpu.sh: both tasks, then per task the steps and evaluation sample.
COMMON = ["--batch-size", "16", "--learning-rate", "1e-4", "--freeze-embeddings", "--eval-every", "100",
          "--max-dev-examples", "1000"]
PER_TASK = {"udpos": ["--max-steps", "300", "--max-eval-examples", "500"],
            "panx": ["--max-steps", "200", "--max-eval-examples", "300"]}
# rank-layers: joint mode trains for the sweep's number of steps (its other defaults are the sweep's settings).
RANK_PER_TASK = {"joint": {"udpos": ["--max-steps", "300"], "panx": ["--max-steps", "200"]}}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(command: list[str], costs_path: Path, task: str, step: str,
                 env: dict[str, str] | None = None) -> None:
    """Run ``command``, adding its CPU (user + system, all its processes) and wall time to costs.json."""
    print("+", shlex.join(command), flush=True)
    cpu, wall = children_cpu(), time.time()
    completed = True
    try:
        subprocess.run(command, check=True, env=env)
    except BaseException:
        completed = False
        raise
    finally:
        costs = json.loads(costs_path.read_text()) if costs_path.is_file() else {}
        entry = costs.setdefault(task, {}).setdefault(step, {"cpu_seconds": 0.0, "wall_seconds": 0.0,
                                                             "invocations": []})
        spent = {"cpu_seconds": children_cpu() - cpu, "wall_seconds": time.time() - wall, "completed": completed,
                 "command": shlex.join(command), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        entry["cpu_seconds"] += spent["cpu_seconds"]
        entry["wall_seconds"] += spent["wall_seconds"]
        entry["invocations"].append(spent)
        costs_path.write_text(json.dumps(costs, indent=2) + "\n")


MODES = ("joint", "frozen")


def summarize(output: Path, tasks: list[str], costs: dict[str, Any], modes: tuple[str, ...] = MODES
              ) -> dict[str, Any]:
    """The comparison of every (task, mode) whose sweep and ranking exist under ``output``."""
    summary: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        sweep = sweep_layer_scores(output / "sweep", task)
        for mode in modes:
            ranking_path = output / "rank" / task / mode / "ranking.json"
            if not sweep["layers"] or not ranking_path.is_file():
                print(f"{task} ({mode}): sweep or ranking missing; left out", file=sys.stderr)
                continue
            summary["tasks"][f"{task} {mode}"] = _compare(load_ranking(ranking_path), sweep, costs.get(task, {}),
                                                          f"rank-{mode}")
    return summary


def _compare(ranking: dict[str, Any], sweep: dict[str, Any], cost: dict[str, Any], step: str) -> dict[str, Any]:
    proxy = proxy_scores(ranking)
    dev = mean_over_seeds({x: v["dev"] for x, v in sweep["layers"].items()})
    zero = mean_over_seeds({x: v["zero_shot"] for x, v in sweep["layers"].items()})
    sweep_cpu = cost.get("sweep", {}).get("cpu_seconds")
    rank_cpu = cost.get(step, {}).get("cpu_seconds")
    complete = all(i.get("completed", True) for name in ("sweep", step)
                   for i in cost.get(name, {}).get("invocations", [{}]))
    return {
        "metric": sweep["metric"], "model": sweep["model"], "sweep_seeds": sweep["seeds"],
        "cells_per_layer": {x: len(v["dev"]) for x, v in sweep["layers"].items()},
        "proxy_seeds": ranking["seeds"], "proxy": proxy, "sweep_dev": dev, "sweep_zero_shot": zero,
        "proxy_baseline": (ranking.get("baseline") or {}).get("mean"),
        "vs_sweep_dev": compare_rankings(proxy, dev), "vs_sweep_zero_shot": compare_rankings(proxy, zero),
        "sweep_dev_vs_zero_shot": compare_rankings(dev, zero),
        "sweep_cpu_seconds": sweep_cpu, "rank_cpu_seconds": rank_cpu,
        "sweep_wall_seconds": cost.get("sweep", {}).get("wall_seconds"),
        "rank_wall_seconds": cost.get(step, {}).get("wall_seconds"),
        "cpu_ratio": rank_cpu / sweep_cpu if sweep_cpu and rank_cpu is not None else None,
        "costs_complete": complete,
        "rank_mode": ranking.get("mode"),
        "rank_settings": ranking["settings"] if "settings" in ranking else None,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def validation_markdown(summary: dict[str, Any]) -> str:
    lines = ["## Ranking agreement", "",
             "| task | comparison | layers | Spearman ρ | top-1 | top-3 overlap | best in proxy top-3 | regret | "
             "proxy top-3 | reference top-3 |",
             "|---|---|---:|---:|---|---:|---|---:|---|---|"]
    names = (("vs_sweep_dev", "proxy vs sweep en dev"), ("vs_sweep_zero_shot", "proxy vs sweep zero-shot"),
             ("sweep_dev_vs_zero_shot", "sweep en dev vs sweep zero-shot (reference)"))
    for task, t in summary["tasks"].items():
        for key, name in names:
            c = t[key]
            lines.append(f"| {task} | {name} | {c['n']} | {_fmt(c['spearman_rho'])} | "
                         f"{'yes' if c['top1_match'] else 'no'} | {c['topk_overlap']}/{c['k']} | "
                         f"{'yes' if c['reference_best_in_proxy_topk'] else 'no'} | {_fmt(c['regret'])} | "
                         f"{', '.join(f'D_{x}' for x in c['proxy_order'][:3])} | "
                         f"{', '.join(f'D_{x}' for x in c['reference_order'][:3])} |")
    lines += ["", "## Cost (process CPU time)", "",
              "| task | sweep CPU s | rank-layers CPU s | ratio | sweep wall s | rank-layers wall s |",
              "|---|---:|---:|---|---:|---:|"]
    for task, t in summary["tasks"].items():
        ratio = t["cpu_ratio"]
        ratio_text = "–" if ratio is None else f"{ratio:.3f} (1/{1 / ratio:.1f})" if ratio > 0 else "0"
        lines.append(f"| {task} | {_fmt(t['sweep_cpu_seconds'], 0)} | {_fmt(t['rank_cpu_seconds'], 0)} | "
                     f"{ratio_text} | {_fmt(t['sweep_wall_seconds'], 0)} | {_fmt(t['rank_wall_seconds'], 0)} |")
    lines += ["", "## Scores per layer (mean over seeds)", ""]
    for task, t in summary["tasks"].items():
        lines += [f"### {task} ({t['metric']})", "",
                  "| layer | proxy en dev | sweep en dev | sweep zero-shot |", "|---|---:|---:|---:|"]
        for x in sorted(set(t["proxy"]) | set(t["sweep_dev"])):
            lines.append(f"| D_{x} | {_fmt(t['proxy'].get(x))} | {_fmt(t['sweep_dev'].get(x))} | "
                         f"{_fmt(t['sweep_zero_shot'].get(x))} |")
        lines.append(f"| last layer alone | {_fmt(t['proxy_baseline'])} | | |")
        lines.append("")
    notes = [f"{task}: a step was interrupted; its CPU time is under-counted" for task, t in summary["tasks"].items()
             if not t["costs_complete"]]
    lines += [f"* {note}" for note in notes]
    lines += ["* Spearman ρ over the layers both rankings hold (average ranks for ties); top-1: the proxy's best "
              "layer is the reference's best; top-3 overlap: shared layers among the two top-3 sets; best in proxy "
              "top-3: the reference's best layer is among the proxy's three best; regret: the reference's best "
              "score minus its score of the proxy's best layer.",
              "* Sweep en dev: mean over seeds of each cell's `selection.best_score`; sweep zero-shot: mean of "
              "`average_zero_shot` (the target languages, English left out). The proxy reads English only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("DLFA_SHARED_DATA", "../shared/data"))
    parser.add_argument("--output", default="validate-rank")
    parser.add_argument("--tasks", default="udpos,panx")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--layers", default="1-11")
    parser.add_argument("--parallel", default="2", help="sweep cells at once (default 2, as reproduce_cpu.sh)")
    parser.add_argument("--dlfa", default=os.environ.get("DLFA", "dlfa"), help="the dlfa command, e.g. 'python -m dlfa' (for sweep)")
    parser.add_argument("--rank-command", default=f"{shlex.quote(sys.executable)} -m dlfa rank-layers",
                        help="the rank-layers command")
    parser.add_argument("--model", default="embedded:multilingual-e5-small", help="the encoder, for both sides")
    parser.add_argument("--sweep-options", default="",
                        help="extra sweep options, after the fixed ones (the last of a repeated option wins), e.g. "
                             "--sweep-options='--max-steps 100'")
    parser.add_argument("--rank-options", default="",
                        help="extra rank-layers options, after the fixed ones, e.g. "
                             "--rank-options='--max-train-examples 4000'")
    parser.add_argument("--modes", default=",".join(MODES), help="rank-layers modes to validate (default joint,frozen)")
    parser.add_argument("--compare-only", action="store_true", help="only compare existing outputs")
    args = parser.parse_args(argv)
    output, tasks = Path(args.output), [t for t in args.tasks.split(",") if t]
    output.mkdir(parents=True, exist_ok=True)
    costs_path = output / "costs.json"
    if not args.compare_only:
        for task in tasks:
            if not (Path(args.data_root) / task).is_dir():
                print(f"validate_rank_layers: no {args.data_root}/{task}; nothing to do", file=sys.stderr)
                return 0
        for task in tasks:
            sweep = [*shlex.split(args.dlfa), "sweep", "--tasks", task, "--data-root", args.data_root, "--output",
                     str(output / "sweep"), "--model", args.model, "--layers", args.layers, "--seeds", args.seeds,
                     "--no-baseline", "--parallel", args.parallel, *COMMON, *PER_TASK.get(task, []),
                     *shlex.split(args.sweep_options)]
            run_measured(sweep, costs_path, task, "sweep")
            for mode in args.modes.split(","):
                rank_dir = output / "rank" / task / mode
                if (rank_dir / "ranking.json").is_file():
                    print(f"{rank_dir}/ranking.json exists; not ranking again")
                    continue
                rank = [*shlex.split(args.rank_command), "--task", task, "--mode", mode, "--model", args.model,
                        "--data-dir", str(Path(args.data_root) / task), "--output", str(rank_dir), "--seeds", args.seeds,
                        "--layers", args.layers, "--overwrite", *RANK_PER_TASK.get(mode, {}).get(task, []),
                        *shlex.split(args.rank_options)]
                # One thread, as each sweep cell has with --parallel 2 on two cores.
                run_measured(rank, costs_path, task, f"rank-{mode}", env={**os.environ, "OMP_NUM_THREADS": "1"})
    costs = json.loads(costs_path.read_text()) if costs_path.is_file() else {}
    summary = summarize(output, tasks, costs, tuple(args.modes.split(",")))
    (output / "validation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    markdown = validation_markdown(summary)
    (output / "validation.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
