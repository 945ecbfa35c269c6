"""Sweeps: the grid, skipping finished cells, two processes on one folder, and a real local Ray instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlfa.cli.main import main
from dlfa.errors import DlfaInputError
from dlfa.reporting.report import Report, collect_runs
from dlfa.training.sweep import SweepConfig, cell_dir, plan_cells, run_sweep


def _sweep(model_dir, data_dir, out, **kw) -> SweepConfig:
    return SweepConfig(
        tasks=["udpos"], data_dir=str(data_dir), output_dir=str(out),
        layers=kw.pop("layers", [1, 3]), seeds=kw.pop("seeds", [1, 2]),
        train={"model": str(model_dir), "epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "languages": ["de"]},
        **kw,
    )


def test_grid_covers_baseline_every_layer_and_seed(tiny_model_dir, tiny_udpos_dir, tmp_path):
    cells = plan_cells(_sweep(tiny_model_dir, tiny_udpos_dir, tmp_path, layers=None, seeds=[5, 6]))
    assert sorted((c.fuse_layer or 0, c.seed) for c in cells) == [(x, s) for x in range(4) for s in (5, 6)]
    assert cells[0].output_dir.endswith(str(Path("udpos") / tiny_model_dir.name / "baseline" / "seed-5"))


def test_bad_layer_fails_before_any_run(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    args = ["sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir), "--model", str(tiny_model_dir),
            "--layers", "2,4", "--output", str(tmp_path / "sweep")]
    assert main(args) == 2
    assert "option --layers: fused layer must be an integer in 1..3" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_local_sweep_then_rerun_skips_everything(tiny_model_dir, tiny_udpos_dir, tmp_path):
    config = _sweep(tiny_model_dir, tiny_udpos_dir, tmp_path / "sweep")
    first = run_sweep(config)["cells"]
    assert [r["status"] for r in first] == ["trained"] * 6
    for fuse_layer in (None, 1, 3):
        for seed in (1, 2):
            metrics = json.loads((cell_dir(tmp_path / "sweep", "udpos", str(tiny_model_dir), fuse_layer, seed)
                                  / "metrics.json").read_text())
            assert metrics["fuse_layer"] == fuse_layer and metrics["seed"] == seed
    assert [r["status"] for r in run_sweep(config)["cells"]] == ["finished before"] * 6


def test_two_sweep_processes_never_run_a_cell_twice(tiny_model_dir, tiny_udpos_dir, tmp_path):
    args = [sys.executable, "-m", "dlfa", "sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir),
            "--model", str(tiny_model_dir), "--layers", "1,2,3", "--seeds", "1,2", "--epochs", "1",
            "--batch-size", "4", "--languages", "de", "--output", str(tmp_path / "sweep")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    cells = [line.split() for out in outputs for line in out.splitlines() if line.startswith("[") and "/" in line[:8]]
    trained = [words[2] for words in cells if words[1] == "trained"]
    assert len(trained) == len(set(trained)) == 8  # every cell trained exactly once across both processes
    for words in cells:
        assert words[1] in ("trained", "busy", "finished"), words


def test_ray_sweep_on_a_local_ray_instance(tiny_model_dir, tiny_udpos_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DLFA_FEATURE_CACHE_DIR": os.environ["DLFA_FEATURE_CACHE_DIR"]}})
    try:
        results = run_sweep(_sweep(tiny_model_dir, tiny_udpos_dir, tmp_path / "sweep", seeds=[1],
                                   ray_address="auto"))["cells"]
    finally:
        ray.shutdown()
    assert sorted(r["status"] for r in results) == ["trained"] * 3
    local = run_sweep(_sweep(tiny_model_dir, tiny_udpos_dir, tmp_path / "local", seeds=[1]))["cells"]
    # The same cells give the same scores whether Ray or this process ran them (Ray reports them as they finish).
    def by_cell(records, root):
        return {str(Path(r["run_dir"]).relative_to(root)): r["score"] for r in records}

    assert by_cell(results, tmp_path / "sweep") == pytest.approx(by_cell(local, tmp_path / "local"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and two threads on a busy 2-core machine are much slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_xmixup_sweep_rows_sit_next_to_finetuning_rows_in_the_report(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    parallel = tmp_path / "en-de.tsv"
    # X-Mixup trains the tagging target against labels: projected tags here (or soft labels, or a teacher).
    parallel.write_text("a cat sat\tDET NOUN VERB\teine Katze sass\tDET NOUN VERB\n"
                        "the dog is on the mat\tDET NOUN AUX ADP DET NOUN\tder Hund ist auf der Matte\t"
                        "DET NOUN AUX ADP DET NOUN\n"
                        "a mat\tDET NOUN\teine Matte\tDET NOUN\n"
                        "the cat is a cat\tDET NOUN AUX DET NOUN\tdie Katze ist eine Katze\tDET NOUN AUX DET NOUN\n",
                        encoding="utf-8")
    out = tmp_path / "sweep"
    common = ["sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir), "--model", str(tiny_model_dir),
              "--layers", "2", "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--languages", "de",
              "--output", str(out)]
    xmixup = [*common, "--method", "xmixup", "--xmixup-parallel", f"de={parallel}"]
    # Mixing blocks that do not fit the encoder stop the sweep before any cell runs.
    assert main([*xmixup, "--xmixup-layers", "5"]) == 2
    assert "option --xmixup-layers: mixing blocks must be integers in 1..4" in capsys.readouterr().err
    assert not out.exists()

    assert main(xmixup) == 0 and main(common) == 0
    rows = out / "udpos" / tiny_model_dir.name
    assert sorted(p.name for p in rows.iterdir() if p.is_dir()) == ["D_2", "baseline", "xmixup", "xmixup+D_2"]
    assert cell_dir(out, "udpos", str(tiny_model_dir), 2, 1, "xmixup") == rows / "xmixup+D_2" / "seed-1"
    for row, method, fuse_layer in (("xmixup", "xmixup", None), ("xmixup+D_2", "xmixup", 2), ("D_2", "dlfa", 2)):
        metrics = json.loads((rows / row / "seed-1" / "metrics.json").read_text())
        assert (metrics["method"], metrics["fuse_layer"]) == (method, fuse_layer), row
    capsys.readouterr()
    assert main(xmixup) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(again) == 2 and all("finished before" in line for line in again)  # a second run skips

    # dlfa report: X-Mixup rows are model rows of Table 1 beside baseline and D_2, mean over the seeds.
    table, records = Report(collect_runs([out]).runs).table1()
    assert [row[1] for row in table.rows] == ["baseline", "D_2", "xmixup", "xmixup+D_2"]
    # One epoch of a random tiny model: every run is far below the UD-POS English-dev floor, and its cell says so.
    assert all(row[2].endswith("(n=1) (!)") for row in table.rows)
    assert [(r["row"], r["n"]) for r in records] == [("baseline", 1), ("D_2", 1), ("xmixup", 1), ("xmixup+D_2", 1)]


@pytest.mark.usefixtures("one_thread")
def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys,
                                                         monkeypatch):
    from dlfa.training.recipe import FinetuneRecipe

    real = FinetuneRecipe.train

    def train(self):
        if self.config.fuse_layer == 1:
            raise DlfaInputError("training diverged (injected)", option="--learning-rate")
        return real(self)

    monkeypatch.setattr(FinetuneRecipe, "train", train)
    out = tmp_path / "sweep"
    args = ["sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir), "--model", str(tiny_model_dir),
            "--layers", "1,2", "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--languages", "de",
            "--output", str(out)]
    assert main(args) == 1  # the sweep ran to its end, and says that a cell failed
    printed = capsys.readouterr().out.splitlines()
    finished = [line for line in printed if line.startswith("[") and "/3]" in line]
    assert [line.split()[1] for line in finished] == ["trained", "failed", "trained"]
    assert "ETA" in finished[0] and "elapsed" in finished[-1]
    assert "training diverged (injected)" in finished[1]
    assert printed[-1].startswith("sweep done: 2 trained, 1 failed; failed cells")
    assert json.loads((cell_dir(out, "udpos", str(tiny_model_dir), 1, 1) / "failed.json").read_text())
    assert (cell_dir(out, "udpos", str(tiny_model_dir), 2, 1) / "metrics.json").is_file()


def test_killing_the_sweep_stops_its_workers(tiny_model_dir, tiny_udpos_dir, tmp_path):
    args = [sys.executable, "-m", "dlfa", "sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir),
            "--model", str(tiny_model_dir), "--layers", "1,2,3", "--seeds", "1,2", "--epochs", "200",
            "--batch-size", "4", "--languages", "de", "--parallel", "2", "--output", str(tmp_path / "sweep")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().startswith("sweep: 8 cells")
    assert proc.stdout.readline().startswith("disk: about 0.0 GB for the models of 8 cells")
    line = proc.stdout.readline()  # a worker says it started a cell: the pool is up
    assert line.startswith("[started]"), line
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
               and _parent_of(int(p.name)) == proc.pid]
    assert workers
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "workers outlived the killed sweep"


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_unreachable_ray_cluster_is_one_line(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "sweep"
    args = ["sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir), "--model", str(tiny_model_dir),
            "--layers", "1", "--seeds", "1", "--output", str(out), "--ray-address", "auto"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlfa: error: option --ray-address: cannot reach a Ray cluster at 'auto'")
    assert not out.exists()


@pytest.mark.usefixtures("one_thread")
def test_gate_init_variant_has_rows_of_its_own(tiny_model_dir, tiny_udpos_dir, tmp_path):
    """A DLFA variant (--gate-init baseline) sits beside the paper's D_x, compared with the same baseline."""
    out = tmp_path / "sweep"
    common = ["sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir), "--model", str(tiny_model_dir),
              "--layers", "2", "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--languages", "de",
              "--output", str(out)]
    assert main(common) == 0 and main([*common, "--gate-init", "baseline", "--no-baseline"]) == 0
    rows = out / "udpos" / tiny_model_dir.name
    assert sorted(p.name for p in rows.iterdir() if p.is_dir()) == ["D_2", "baseline", "gate-baseline+D_2"]
    metrics = json.loads((rows / "gate-baseline+D_2" / "seed-1" / "metrics.json").read_text())
    assert (metrics["method"], metrics["fuse_layer"]) == ("gate-baseline", 2)
    report = Report(collect_runs([out]).runs)
    table, _ = report.table1()
    assert [row[1] for row in table.rows] == ["baseline", "D_2", "gate-baseline+D_2"]
    variant = next(r.row for r in report.runs if r.row.family == "gate-baseline")
    assert variant.base.label == "baseline"


def test_disk_estimate_counts_kept_models_only(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.training.config import TrainConfig
    from dlfa.training.sweep import disk_estimate

    weights = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    cell = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir),
                       output_dir=str(tmp_path / "cell"))
    lean = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir),
                       output_dir=str(tmp_path / "lean"), keep_weights=False)
    assert disk_estimate([cell, cell, lean]).startswith(f"disk: about {2 * weights / 1e9:.1f} GB for the models of 2 cells")
    assert disk_estimate([lean, lean]).startswith("disk: no model kept (--no-keep-weights")


def test_parallel_sweep_finishes_cleanly_and_a_rerun_skips_every_cell(tiny_model_dir, tiny_udpos_dir, tmp_path):
    args = [sys.executable, "-m", "dlfa", "sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir),
            "--model", str(tiny_model_dir), "--layers", "2", "--seeds", "1", "--epochs", "1", "--batch-size", "4",
            "--languages", "de", "--parallel", "2", "--no-keep-weights", "--output", str(tmp_path / "sweep")]
    for expected in ("trained", "finished before"):
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
        assert sum(expected in line for line in lines) == 2, done.stdout
