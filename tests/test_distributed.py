"""Data-parallel training with two CPU processes (torchrun, gloo), against one process with the same global batch.

What must be equal: the optimizer steps, epochs and learning-rate trace, the dev scores that selection sees, and
the sharded zero-shot evaluation (to the last digit, against one process scoring the same model). What may
differ, within the tolerance stated below: the training loss, because each process averages the loss over its
own half of a batch's tokens and the halves hold different numbers of tokens. A 2-process run killed with
kill -9 and resumed ends exactly as an uninterrupted 2-process run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import CONLLU_SENTENCES, write_conllu

from dlfa.training.tracking import tensorboard_scalars

pytest.importorskip("tensorboardX")

LOSS_TOLERANCE = 0.05  # relative: the per-step training loss of 2 processes against 1 (see the module docstring)


def _env() -> dict[str, str]:
    # One thread per process, for both runs: float sums depend on the thread count. faulthandler: a process that
    # hangs prints its threads' stacks when _run aborts it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONFAULTHANDLER": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dlfa",
            *args]


def _single(*args: str) -> list[str]:
    return [sys.executable, "-m", "dlfa", *args]


def _train_args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["train", "--task", "udpos", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(out),
            "--batch-size", "4", "--learning-rate", "1e-3", "--eval-batch-size", "1", *extra]


def _attempt(command: list[str], timeout: int) -> tuple[subprocess.Popen, str, str, bool]:
    """One run (each command here takes well under a minute). One that hangs is sent SIGABRT, which faulthandler
    answers with every thread's Python stack on stderr, then killed; returns (process, stdout, stderr, hung)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc, out, err, False
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(3)
        kill_9(proc)
        out, err = proc.communicate()
        return proc, out, err, True


def _crashed(err: str, hung: bool) -> bool:
    """A worker that hung, or died of a signal (torchrun: "exitcode  : -6"): the intermittent 2-process fault of
    issue 10, not a wrong result."""
    return hung or "exitcode  : -" in err


def _abort_lines(err: str) -> str:
    """The lines that say why a worker died (a C++ exception's what(), gloo's enforce, Python's fatal error), which
    a tail of the interleaved stderr of two workers can cut off, as it did in CI at 3cbedd0."""
    keys = ("terminate called", "what():", "enforce fail", "Fatal Python error", "exitcode", "Signal ", "Error")
    return "\n".join(line for line in err.splitlines() if any(key in line for key in keys))[-4000:]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command to a clean exit. A 2-process run that crashes or hangs (issue 10: about 1 in 100 launches,
    cause not yet known) is reported as a warning with its stderr and run once more, as a user would: ``--resume``
    commands as they are, others into a fresh folder (the test's own). A second crash, and every other failure,
    fails the test."""
    proc, out, err, hung = _attempt(command, timeout)
    if proc.returncode != 0 and "torch.distributed.run" in command and _crashed(err, hung):
        warnings.warn(f"2-process run crashed or hung (issue 10), running it once more. Why:\n{_abort_lines(err)}\n"
                      f"Its stderr's end:\n{err[-8000:]}", stacklevel=2)
        if "--resume" not in command:
            shutil.rmtree(command[command.index("--output") + 1], ignore_errors=True)
        proc, out, err, hung = _attempt(command, timeout)
    if hung:
        pytest.fail(f"no exit after {timeout} s: {' '.join(command[2:6])} ...; its stacks:\n{err[-12000:]}")
    assert proc.returncode == 0, f"{_abort_lines(err)}\n---\n{err[-12000:]}"
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            parents[int(Path(stat).parent.name)] = int(Path(stat).read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it (its workers run in sessions of their own, so killing its group
    is not enough), and wait until they are gone before anything else touches the run folder."""
    victims = [*_descendants(proc.pid), proc.pid]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 60
    while not all(_dead(pid) for pid in victims) and time.time() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp-data") / "udpos"
    folder.mkdir()
    write_conllu(folder / "en-train.conllu", CONLLU_SENTENCES["en"] * 8)  # 24 sentences: 6 batches of 4
    write_conllu(folder / "en-dev.conllu", CONLLU_SENTENCES["en"])
    write_conllu(folder / "de-test.conllu", CONLLU_SENTENCES["de"] * 3)
    write_conllu(folder / "ja-test.conllu", CONLLU_SENTENCES["ja"] * 3)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-runs")
    extra = ("--epochs", "2", "--report-to", "tensorboard", "--log-every", "1")
    one = _run(_single(*_train_args(tiny_model_dir, data_dir, root / "one", *extra)))
    two = _run(_torchrun(*_train_args(tiny_model_dir, data_dir, root / "two", *extra)))
    return {"one": root / "one", "two": root / "two", "one_err": one.stderr, "two_err": two.stderr,
            "two_out": two.stdout}


def test_two_processes_take_the_steps_epochs_and_schedule_of_one(runs):
    one, two = json.loads((runs["one"] / "config.json").read_text()), json.loads((runs["two"] / "config.json").read_text())
    assert (one["resolved"]["num_processes"], two["resolved"]["num_processes"]) == (1, 2)
    assert one["resolved"]["total_steps"] == two["resolved"]["total_steps"] == 12  # 2 epochs of 6 global batches
    a, b = tensorboard_scalars(runs["one"]), tensorboard_scalars(runs["two"])
    assert [s for s, _ in a["train/learning_rate"]] == list(range(1, 13))
    assert a["train/learning_rate"] == b["train/learning_rate"]  # the whole schedule, to the last bit
    assert a["train/epoch"] == b["train/epoch"] and a["train/epoch"][-1] == (12, 2.0)
    for (step_a, loss_a), (step_b, loss_b) in zip(a["train/loss"], b["train/loss"], strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) <= LOSS_TOLERANCE * loss_a
    metrics = [json.loads((runs[k] / "metrics.json").read_text()) for k in ("one", "two")]
    assert [h["step"] for h in metrics[0]["selection"]["history"]] == [h["step"] for h in metrics[1]["selection"]["history"]]
    assert metrics[1]["num_processes"] == 2


def test_trackers_log_the_training_curves_dev_metrics_and_final_scores(runs):
    values = tensorboard_scalars(runs["two"])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/epoch"):
        assert len(values[tag]) == 12, tag  # --log-every 1
    assert all(v > 0 for _, v in values["train/tokens_per_second"])
    assert [s for s, _ in values["dev/f1"]] == [6, 12]
    assert {"test/de/f1", "test/ja/accuracy", "test/average/f1"} <= set(values)
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert values["test/de/f1"][0][1] == pytest.approx(metrics["languages"]["de"]["f1"])


def test_console_shows_one_line_per_dev_evaluation_from_the_main_process(runs):
    for key in ("one_err", "two_err"):
        lines = [line for line in runs[key].replace("\r", "\n").splitlines() if " en dev f1 " in line]
        assert len(lines) == 2, lines  # two evaluations, printed once even with two processes
    assert runs["two_out"].count("| average") == 1  # the result table, once


def test_sharded_evaluation_equals_one_process_evaluation(runs, tmp_path):
    """The 2-process run scored each language on half the batches each; one process scores the same model again."""
    out = tmp_path / "again.json"
    _run(_single("evaluate", "--run", str(runs["two"]), "--batch-size", "1", "--output", str(out)))
    again = json.loads(out.read_text())
    assert again["languages"] == json.loads((runs["two"] / "metrics.json").read_text())["languages"]


def test_kill_9_of_two_processes_then_resume_is_exact(tiny_model_dir, data_dir, tmp_path):
    args = ("--epochs", "12", "--checkpoint-every", "4", "--fuse-layer", "2", "--seed", "3")
    reference = tmp_path / "reference"
    _run(_torchrun(*_train_args(tiny_model_dir, data_dir, reference, *args)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*_train_args(tiny_model_dir, data_dir, killed, *args)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # past the first checkpoint
    kill_9(proc)
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    saved = json.loads(state.read_text())
    assert saved["num_processes"] == 2 and 0 < saved["progress"]["step"] < 72
    assert (killed / "checkpoint" / "rng-1.safetensors").is_file()  # the second process's RNG state

    _run(_torchrun(*_train_args(tiny_model_dir, data_dir, killed, *args, "--resume")))

    def comparable(run):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("train_seconds")
        return metrics

    assert comparable(killed) == comparable(reference)


def test_resume_with_another_process_count_is_refused(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    args = _train_args(tiny_model_dir, data_dir, out, "--epochs", "8", "--checkpoint-every", "2")
    proc = subprocess.Popen(_torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while not (out / "checkpoint" / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_9(proc)
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed")
    done = subprocess.run(_single(*args, "--resume"), capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 2
    assert "written by 2 process(es); resume it with 2" in done.stderr.strip().splitlines()[-1]


def test_accelerate_launch_that_starts_fewer_processes_than_asked_is_refused(tiny_model_dir, data_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs one process; dlfa says so instead of training alone."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "dlfa",
               *_train_args(tiny_model_dir, data_dir, out, "--epochs", "1")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("dlfa: error:")]
    assert lines == ["dlfa: error: option --num_processes: the launcher was asked for 2 processes but started 1 "
                     "(accelerate launch --cpu runs one process); for 2 CPU processes use: torchrun "
                     "--nproc_per_node 2 -m dlfa train ..."]
    assert not out.exists()


def test_missing_tracker_package_is_one_line(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    from dlfa.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, data_dir, out, "--report-to", "wandb")) == 2
    assert capsys.readouterr().err.strip() == "dlfa: error: option --report-to: wandb is not installed (pip install wandb)"
    assert not out.exists()


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    """XNLI-shaped English dev file with its German translation (X-Mixup pairs), and test files."""
    folder = tmp_path_factory.mktemp("ddp-xnli") / "xnli"
    folder.mkdir()
    rows = [("the cat sat on the mat", "a cat is on a mat", "entailment"),
            ("the dog sat on the mat", "a cat is on a mat", "contradiction"),
            ("a dog is on a mat", "the dog sat", "neutral"), ("the cat is a cat", "a dog is a dog", "neutral")]
    for lang, prefix in (("en", ""), ("de", "der ")):
        lines = [f"{prefix}{a} {i}\t{prefix}{b} {i}\t{label}" for i in range(6) for a, b, label in rows]  # 24 pairs
        (folder / f"dev-{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (folder / f"test-{lang}.tsv").write_text("\n".join(f"{prefix}{a} x\t{b}\t{label}" for a, b, label in rows)
                                                 + "\n", encoding="utf-8")
    return folder


def test_xmixup_with_two_processes_matches_one_and_resumes_exactly(tiny_model_dir, pair_dir, tmp_path):
    """X-Mixup: the same steps and schedule as one process, sharded evaluation, exact kill -9 and resume."""
    def args(out, *extra):
        return ["train", "--method", "xmixup", "--task", "xnli", "--model", str(tiny_model_dir), "--data-dir",
                str(pair_dir), "--output", str(out), "--train-split", "dev", "--dev-split", "dev", "--xmixup-parallel",
                "de", "--batch-size", "4", "--learning-rate", "1e-3", "--languages", "de,en", "--seed", "5",
                "--eval-batch-size", "1", "--report-to", "tensorboard", "--log-every", "1", *extra]

    extra = ("--epochs", "6", "--checkpoint-every", "5")
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_single(*args(one, *extra)))
    _run(_torchrun(*args(two, *extra)))
    a, b = tensorboard_scalars(one), tensorboard_scalars(two)
    assert len(a["train/learning_rate"]) == json.loads((one / "config.json").read_text())["resolved"]["total_steps"]
    assert a["train/learning_rate"] == b["train/learning_rate"] and a["train/epoch"] == b["train/epoch"]
    out = tmp_path / "again.json"
    _run(_single("evaluate", "--run", str(two), "--batch-size", "1", "--output", str(out)))
    assert json.loads(out.read_text())["languages"] == json.loads((two / "metrics.json").read_text())["languages"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*args(killed, *extra)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env())
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    kill_9(proc)
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    _run(_torchrun(*args(killed, *extra, "--resume")))

    def comparable(run):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("train_seconds")
        return metrics

    assert comparable(killed) == comparable(two), (killed, two)


def test_end_process_group_ends_it_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from dlfa.training.recipe import end_process_group

    end_process_group()  # none yet
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
