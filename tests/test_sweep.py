"""Sweeps: the grid, skipping finished cells, two processes on one folder, and a real local Ray instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlfa.cli.main import main
from dlfa.reporting.report import Report, collect_runs
from dlfa.training.sweep import SweepConfig, cell_dir, plan_cells, run_sweep


def _sweep(model_dir, data_dir, out, **kw) -> SweepConfig:
    return SweepConfig(
        tasks=["udpos"], data_dirs={"udpos": str(data_dir)}, output_dir=str(out), model=str(model_dir),
        layers=kw.pop("layers", [1, 3]), seeds=kw.pop("seeds", [1, 2]),
        train_overrides={"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "languages": ["de"]}, **kw,
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
    first = run_sweep(config)
    assert [r["status"] for r in first] == ["trained"] * 6
    for fuse_layer in (None, 1, 3):
        for seed in (1, 2):
            metrics = json.loads((cell_dir(tmp_path / "sweep", "udpos", str(tiny_model_dir), fuse_layer, seed)
                                  / "metrics.json").read_text())
            assert metrics["fuse_layer"] == fuse_layer and metrics["seed"] == seed
    assert [r["status"] for r in run_sweep(config)] == ["finished before"] * 6


def test_two_sweep_processes_never_run_a_cell_twice(tiny_model_dir, tiny_udpos_dir, tmp_path):
    args = [sys.executable, "-m", "dlfa", "sweep", "--tasks", "udpos", "--data-dir", str(tiny_udpos_dir),
            "--model", str(tiny_model_dir), "--layers", "1,2,3", "--seeds", "1,2", "--epochs", "1",
            "--batch-size", "4", "--languages", "de", "--output", str(tmp_path / "sweep")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    trained = [line.split()[-2] for out in outputs for line in out.splitlines() if line.strip().startswith("trained")]
    assert len(trained) == len(set(trained)) == 8  # every cell trained exactly once across both processes
    for out in outputs:
        for line in out.splitlines():
            assert line.split()[0] in ("trained", "busy", "finished"), line


def test_ray_sweep_on_a_local_ray_instance(tiny_model_dir, tiny_udpos_dir, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DLFA_FEATURE_CACHE_DIR": os.environ["DLFA_FEATURE_CACHE_DIR"]}})
    try:
        results = run_sweep(_sweep(tiny_model_dir, tiny_udpos_dir, tmp_path / "sweep", seeds=[1],
                                   ray_address="auto"))
    finally:
        ray.shutdown()
    assert sorted(r["status"] for r in results) == ["trained"] * 3
    local = run_sweep(_sweep(tiny_model_dir, tiny_udpos_dir, tmp_path / "local", seeds=[1]))
    # The same cells give the same scores whether Ray or this process ran them.
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in local])


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
    assert main(xmixup) == 0 and capsys.readouterr().out.split().count("finished") == 2  # a second run skips

    # dlfa report: X-Mixup rows are model rows of Table 1 beside baseline and D_2, mean over the seeds.
    table, records = Report(collect_runs([out]).runs).table1()
    assert [row[1] for row in table.rows] == ["baseline", "D_2", "xmixup", "xmixup+D_2"]
    assert all(row[2].endswith("(n=1)") for row in table.rows)
    assert [(r["row"], r["n"]) for r in records] == [("baseline", 1), ("D_2", 1), ("xmixup", 1), ("xmixup+D_2", 1)]
