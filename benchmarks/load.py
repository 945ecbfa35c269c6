"""The demo (and training) on idle cores and beside busy processes: wall time, slowdown, and the thread policy.

On a machine that runs other jobs, OpenMP threads that spin while they wait for a descheduled sibling waste the
share of the CPU a process gets; the demo then runs many times slower than its lost CPU share explains. This
runner measures, in one run:

* ``policy``: a short training probe (``dlfa demo --seeds 1 --epochs 1``) under each thread policy, idle and
  beside ``--busy`` processes that spin (``sh -c 'while :; do :; done'``), to compare the policies;
* ``demo``: the README's demo (``dlfa demo``, dlfa's default policy), idle and beside the busy processes.

It prints a table and writes JSON (``benchmarks/results/load.json``). The busy processes are this runner's own
children and are stopped when it ends. Idle means: nothing else of note runs on the machine (the load average at
the start of each measurement is recorded, so that a run on a busy machine can be recognised and discarded).

    python benchmarks/load.py                      # both parts (about 25 minutes on 2 cores)
    python benchmarks/load.py --only demo          # the demo, idle and loaded
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {
    # name: environment for the dlfa process
    "dlfa default": {},
    "2 threads, spinning waits": {"DLFA_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads, passive waits": {"DLFA_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"DLFA_THREADS": "1"},
}


def load_average() -> float:
    return os.getloadavg()[0]


def timed(command: list[str], env: dict[str, str]) -> dict[str, float]:
    started, load = time.time(), load_average()
    before = os.times()
    done = subprocess.run(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"load.py: {' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": time.time() - started, "cpu_s": (after.children_user - before.children_user)
            + (after.children_system - before.children_system), "load_at_start": load}


class Busy:
    """``count`` processes that spin on the CPU while the block runs."""

    def __init__(self, count: int) -> None:
        self.count, self.procs = count, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(self.count)]
        time.sleep(2)  # let the scheduler see them
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def demo_command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dlfa", "demo", "--output", str(output), *extra]


def measure(name: str, command_for, env: dict[str, str], busy: int, work: Path) -> dict[str, dict[str, float]]:
    result = {}
    for condition, count in (("idle", 0), (f"{busy} busy", busy)):
        out = work / f"{name}-{condition}".replace(" ", "_").replace(",", "")
        with Busy(count):
            result[condition] = timed(command_for(out), env)
        shutil.rmtree(out, ignore_errors=True)
        print(f"  {name:<28} {condition:<7} {result[condition]['wall_s']:7.1f} s wall "
              f"{result[condition]['cpu_s']:7.1f} s CPU (load {result[condition]['load_at_start']:.1f})", flush=True)
    result["slowdown"] = result[f"{busy} busy"]["wall_s"] / result["idle"]["wall_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["policy", "demo"], help="one part only")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside dlfa (default 2)")
    parser.add_argument("--output", default="benchmarks/results/load.json")
    args = parser.parse_args(argv)
    results: dict = {"cores": len(os.sched_getaffinity(0)), "busy": args.busy, "started": time.strftime("%F %T")}
    with tempfile.TemporaryDirectory(prefix="dlfa-load-") as tmp:
        work = Path(tmp)
        # The embedded model is converted once beforehand, so no measurement includes the conversion.
        subprocess.run([sys.executable, "-c", "from dlfa.modeling.embedded import resolve_model_name as r; "
                        "r('embedded:multilingual-e5-small')"], check=True)
        if args.only in (None, "policy"):
            print("policy: dlfa demo --seeds 1 --epochs 1 (one fine-tuning)", flush=True)
            results["policy"] = {name: measure(name, lambda out: demo_command(out, "--seeds", "1", "--epochs", "1"),
                                               env, args.busy, work) for name, env in POLICIES.items()}
        if args.only in (None, "demo"):
            print("demo: dlfa demo (the README's first command, the model already converted)", flush=True)
            results["demo"] = measure("dlfa demo", demo_command, {}, args.busy, work)
    results["finished"] = time.strftime("%F %T")
    print(table(results))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"written {path}")
    return 0


def table(results: dict) -> str:
    busy = f"{results['busy']} busy"
    rows = [("what", "idle wall s", f"{busy} wall s", "slowdown", "idle CPU s")]
    for name, r in results.get("policy", {}).items():
        rows.append((f"probe, {name}", f"{r['idle']['wall_s']:.1f}", f"{r[busy]['wall_s']:.1f}",
                     f"{r['slowdown']:.2f}x", f"{r['idle']['cpu_s']:.1f}"))
    if "demo" in results:
        r = results["demo"]
        rows.append(("dlfa demo", f"{r['idle']['wall_s']:.1f}", f"{r[busy]['wall_s']:.1f}", f"{r['slowdown']:.2f}x",
                     f"{r['idle']['cpu_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
