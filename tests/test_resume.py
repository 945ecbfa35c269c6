"""kill -9 in the middle of training, resume, and get exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONLLU_SENTENCES, write_conllu

from dlfa.cli.main import main
from dlfa.errors import DlfaInputError
from dlfa.training.checkpoint import load_checkpoint


def _args(model_dir, data_dir, out, *extra):
    return ["train", "--task", "udpos", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(out),
            "--epochs", "40", "--batch-size", "2", "--learning-rate", "5e-4", "--checkpoint-every", "3",
            "--fuse-layer", "2", "--seed", "3", *extra]


def _comparable(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


@pytest.fixture
def longer_udpos_dir(tiny_udpos_dir):
    write_conllu(tiny_udpos_dir / "en-train.conllu", (CONLLU_SENTENCES["en"] * 3)[:7])  # odd: a short last batch
    return tiny_udpos_dir


def test_kill_9_then_resume_matches_uninterrupted_run(tiny_model_dir, longer_udpos_dir, tmp_path):
    reference = tmp_path / "reference"
    assert main(_args(tiny_model_dir, longer_udpos_dir, reference)) == 0
    assert not (reference / "checkpoint").exists()  # removed once the run is complete

    killed = tmp_path / "killed"
    # The same number of threads as this process (conftest sets it), whatever OMP_NUM_THREADS says: float sums, and
    # so the losses, depend on it.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "dlfa", *_args(tiny_model_dir, longer_udpos_dir, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # let it train past the first checkpoint
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    step = json.loads(state.read_text())["progress"]["step"]
    assert 0 < step < 160

    assert main(_args(tiny_model_dir, longer_udpos_dir, killed, "--resume")) == 0
    assert _comparable(killed) == _comparable(reference)
    # A finished run is skipped, not retrained.
    mtime = (killed / "metrics.json").stat().st_mtime_ns
    assert main(_args(tiny_model_dir, longer_udpos_dir, killed, "--resume")) == 0
    assert (killed / "metrics.json").stat().st_mtime_ns == mtime


def test_resume_refuses_another_configuration(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, tiny_udpos_dir, out, "--epochs", "1")) == 0
    assert main(_args(tiny_model_dir, tiny_udpos_dir, out, "--epochs", "2", "--resume")) == 2
    assert "another configuration" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    from dlfa.modeling.modeling_dlfa import DLFAForTokenClassification
    from dlfa.training.checkpoint import save_checkpoint

    model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), fuse_layer=1, id2label=["a", "b", "c"])
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.tensor([[0, 5, 2]]), torch.ones(1, 3, dtype=torch.long), labels=torch.tensor([[0, 1, 2]])).loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, None, {"step": 1})
    assert load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, None) == {"step": 1}
    weights = tmp_path / "ckpt" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(DlfaInputError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, None)
    (tmp_path / "ckpt" / "state.json").unlink()
    with pytest.raises(DlfaInputError, match="incomplete checkpoint"):
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, None)
