"""Fast CPU training: --mixed-precision auto, --adamw-implementation, --embedding-updates lazy.

The auto precision is tested with the CPU's flags mocked, so these tests hold on machines with and without bf16
instructions. Lazy AdamW is checked against a hand-computed update; checkpoints and resumption with it are exact.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dlfa.cli.main import EXIT_INTERRUPTED, main
from dlfa.training import precision
from dlfa.training.optim import LazyAdamW, adamw_kernel, build_optimizer, clip_gradients, kernel_name

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
KERNELS = ("for-loop", "foreach", "fused")


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one precision per process: reset its state around runs of another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_args(model_dir, data_dir, out, *extra):
    return ["train", "--task", "udpos", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(out),
            "--max-steps", "12", "--batch-size", "2", "--learning-rate", "5e-3", "--fuse-layer", "2", "--seed", "5",
            *extra]


# -- precision ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "device", "expected"), [
    (["avx512_bf16"], "cpu", "bf16"),
    (["amx_bf16", "avx512_bf16"], "cpu", "bf16"),
    (["bf16"], "cpu", "bf16"),  # Arm
    ([], "cpu", "no"),
    (["avx512_bf16"], "cuda", "no"),  # auto keeps fp32 on GPUs
    ([], "mps", "no"),
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, device, expected):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    resolved, reason = precision.resolve_mixed_precision("auto", device)
    assert resolved == expected
    assert reason.startswith("auto:")
    if expected == "bf16":
        assert all(flag in reason for flag in flags)


@pytest.mark.parametrize("asked", ["no", "bf16", "fp16"])
def test_explicit_precision_is_kept_whatever_the_cpu(monkeypatch, asked):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    assert precision.resolve_mixed_precision(asked, "cpu")[0] == asked
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert precision.resolve_mixed_precision(asked, "cpu")[0] == asked


def test_bf16_flags_are_read_from_torch_and_cpuinfo(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True,
                                                                "avx2": True}, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: ["fpu", "avx512f"])
    assert precision.cpu_bf16_flags() == ["amx_bf16"]
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: ["fp", "asimd", "bf16", "sve"])
    assert precision.cpu_bf16_flags() == ["bf16"]
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: ["fpu", "avx2", "avx512_vnni"])
    assert precision.cpu_bf16_flags() == []


@pytest.mark.parametrize(("flags", "expected", "shown"), [(["avx512_bf16"], "bf16", "precision bf16 (auto: "),
                                                          ([], "no", "precision fp32 (auto: ")])
def test_a_run_records_and_says_its_precision(fresh_accelerator, monkeypatch, tiny_model_dir, tiny_udpos_dir,
                                              tmp_path, capsys, flags, expected, shown):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--max-steps", "2")) == 0
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["mixed_precision"] == expected
    assert resolved["mixed_precision_reason"].startswith("auto:")
    assert shown in (out / "train.log").read_text()
    assert f"dlfa: {shown}" in capsys.readouterr().err


def test_fp16_on_cpu_is_refused_in_one_line(fresh_accelerator, tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--mixed-precision", "fp16")) == 2
    err = capsys.readouterr().err
    assert "--mixed-precision" in err and "fp16" in err and "Traceback" not in err
    assert not out.exists()


# -- lazy AdamW: the update rule -----------------------------------------------------------------------------------


class TinyTable(torch.nn.Module):
    """A word-embedding table and a layer on top, found by ``get_input_embeddings`` like an encoder's."""

    def __init__(self, rows: int = 5, width: int = 2) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding(rows, width)
        self.dense = torch.nn.Linear(width, 1)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.tanh(self.embeddings(ids))).pow(2).mean()


def _groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _sparse(rows: list[int], values: list[list[float]], shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(values), shape, check_invariants=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_lazy_adamw_matches_a_hand_computed_update(kernel):
    """Touched rows get AdamW's update at the global step; untouched rows, even with momentum, do not move."""
    torch.manual_seed(0)
    model = TinyTable()
    table = model.embeddings.weight
    start = table.detach().clone().double()
    lr, wd = 0.1, 0.01
    optimizer = build_optimizer(model, _groups(model, wd), lr, kernel, "lazy")
    assert isinstance(optimizer, LazyAdamW) and model.embeddings.sparse
    # Step 1: rows 0 and 2 (row 2 twice, uncoalesced: its gradients add up); step 2: rows 2 and 3.
    steps = [([0, 2, 2], [[0.5, -1.0], [0.25, 0.5], [0.25, -1.5]]), ([2, 3], [[-2.0, 0.1], [3.0, 0.0]])]
    expected = start.clone()
    m, v = torch.zeros_like(start), torch.zeros_like(start)
    for t, (rows, values) in enumerate(steps, start=1):
        table.grad = _sparse(rows, values, tuple(table.shape))
        optimizer.step()
        optimizer.zero_grad()
        grad = torch.zeros_like(start)
        for row, value in zip(rows, values):
            grad[row] += torch.tensor(value, dtype=torch.float64)
        for row in sorted(set(rows)):  # AdamW, decoupled weight decay first, bias correction at step t
            m[row] = BETA1 * m[row] + (1 - BETA1) * grad[row]
            v[row] = BETA2 * v[row] + (1 - BETA2) * grad[row] ** 2
            expected[row] *= 1 - lr * wd
            expected[row] -= lr * (m[row] / (1 - BETA1**t)) / ((v[row] / (1 - BETA2**t)).sqrt() + EPS)
    assert torch.allclose(table.detach().double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(table.detach()[[1, 4]], start[[1, 4]].float())  # never touched
    assert optimizer.stored_rows(table) == 3  # moments kept for rows 0, 2 and 3 only
    # Dense AdamW moves row 0 at step 2 (momentum, weight decay); lazy AdamW leaves it where step 1 put it.
    assert expected[0].tolist() != start[0].tolist()
    row0_after_step1 = start[0] * (1 - lr * wd) - lr * torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(table.detach()[0].double(), row0_after_step1, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_lazy_equals_dense_adamw_when_every_row_is_in_every_batch(kernel):
    torch.manual_seed(1)
    lazy_model = TinyTable(6, 3)
    dense_model = copy.deepcopy(lazy_model)
    lazy = build_optimizer(lazy_model, _groups(lazy_model), 1e-2, kernel, "lazy")
    dense = build_optimizer(dense_model, _groups(dense_model), 1e-2, kernel, "dense")
    assert type(dense) is torch.optim.AdamW
    for step in range(4):
        ids = torch.arange(6).repeat(2).roll(step)
        for model, optimizer in ((lazy_model, lazy), (dense_model, dense)):
            model(ids).backward()
            clip_gradients(None, model.parameters(), 0.05)  # clips: the gradient norm is above 0.05
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(lazy_model.parameters(), dense_model.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)


def test_sparse_gradient_clipping_equals_dense_clipping():
    torch.manual_seed(2)
    sparse_model = TinyTable(8, 4)
    dense_model = copy.deepcopy(sparse_model)
    sparse_model.embeddings.sparse = True
    ids = torch.tensor([1, 3, 3, 5, 1, 1])
    for model in (sparse_model, dense_model):
        model(ids).backward()
    total_sparse = clip_gradients(None, sparse_model.parameters(), 0.01)
    total_dense = torch.nn.utils.clip_grad_norm_(dense_model.parameters(), 0.01)
    assert float(total_dense) > 0.01  # clipping happened
    assert torch.allclose(total_sparse, total_dense, rtol=1e-6)
    assert torch.allclose(sparse_model.embeddings.weight.grad.to_dense(), dense_model.embeddings.weight.grad,
                          atol=1e-8)
    assert torch.allclose(sparse_model.dense.weight.grad, dense_model.dense.weight.grad, atol=1e-8)


def test_options_off_give_torch_adamw_exactly():
    """for-loop + dense is ``torch.optim.AdamW(groups, lr)``, dlfa's optimizer before these options, bit for bit."""
    torch.manual_seed(3)
    model = TinyTable(7, 3)
    reference_model = copy.deepcopy(model)
    optimizer = build_optimizer(model, _groups(model), 1e-2, "for-loop", "dense")
    reference = torch.optim.AdamW(_groups(reference_model), lr=1e-2)
    assert type(optimizer) is torch.optim.AdamW and not model.embeddings.sparse
    assert kernel_name(optimizer) == "for-loop" and optimizer.defaults["fused"] is None
    for step in range(3):
        ids = torch.tensor([0, 2, 2, 4]) + step
        for m, opt in ((model, optimizer), (reference_model, reference)):
            m(ids).backward()
            clip_gradients(None, m.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_adamw_kernels():
    assert adamw_kernel("auto", "cpu") == {"fused": True}  # torch has a fused CPU kernel
    assert adamw_kernel("for-loop", "cpu") == {"foreach": False}
    assert adamw_kernel("foreach", "cpu") == {"foreach": True}
    assert adamw_kernel("auto", "meta") == {}  # no fused kernel there: torch's default


def test_frozen_or_dense_embeddings_get_no_lazy_group():
    model = TinyTable()
    model.embeddings.weight.requires_grad_(False)
    optimizer = build_optimizer(model, _groups(model), 1e-3, "fused", "lazy")
    assert type(optimizer) is torch.optim.AdamW and not model.embeddings.sparse


def test_a_tied_table_is_refused():
    model = TinyTable(5, 2)
    model.tied = torch.nn.Linear(2, 5, bias=False)
    model.tied.weight = model.embeddings.weight
    with pytest.raises(ValueError, match="shared"):
        build_optimizer(model, _groups(model), 1e-3, "fused", "lazy")


# -- lazy AdamW: checkpoints and resumption ------------------------------------------------------------------------


def _train(model, optimizer, scheduler, batches):
    for ids in batches:
        model(ids).backward()
        clip_gradients(None, model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_lazy_adamw_checkpoint_round_trip_is_exact(tmp_path):
    from dlfa.training.checkpoint import load_checkpoint, save_checkpoint

    def build(model):
        optimizer = build_optimizer(model, _groups(model), 1e-2, "fused", "lazy")
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))

    batches = [torch.tensor(ids) for ids in ([0, 1, 1], [4, 1], [6, 2, 0], [1, 9], [4, 4, 3])]
    torch.manual_seed(4)
    model = TinyTable(12, 3)
    fresh = copy.deepcopy(model)
    optimizer, scheduler = build(model)
    _train(model, optimizer, scheduler, batches[:2])
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, None, {"step": 2})
    saved = load_file(str(tmp_path / "checkpoint" / "optimizer.safetensors"))
    table_state = [name for name in saved if saved[name].shape == model.embeddings.weight.shape]
    assert sorted(name.split(".", 1)[1] for name in table_state) == ["exp_avg", "exp_avg_sq"]  # AdamW's layout
    seen_rows = saved[table_state[0]].ne(0).any(dim=1).nonzero().flatten().tolist()
    assert seen_rows == [0, 1, 4]  # zero rows: never in a batch
    _train(model, optimizer, scheduler, batches[2:])

    restored_optimizer, restored_scheduler = build(fresh)
    load_checkpoint(tmp_path / "checkpoint", fresh, restored_optimizer, restored_scheduler, None)
    assert restored_optimizer.stored_rows(fresh.embeddings.weight) == 3  # the compact store, rebuilt
    _train(fresh, restored_optimizer, restored_scheduler, batches[2:])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert optimizer.stored_rows(model.embeddings.weight) == restored_optimizer.stored_rows(fresh.embeddings.weight)


def _comparable(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def test_interrupted_run_with_lazy_updates_resumes_exactly(monkeypatch, tiny_model_dir, tiny_udpos_dir, tmp_path):
    """The defaults (auto precision, fused AdamW, lazy embedding updates): stop at step 7, resume from the
    checkpoint of step 6, end exactly as an uninterrupted run."""
    from dlfa.training.recipe import FinetuneRecipe

    args = ("--checkpoint-every", "3", "--eval-every", "4")
    reference = tmp_path / "reference"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, reference, *args)) == 0
    config = json.loads((reference / "config.json").read_text())
    assert config["config"]["embedding_updates"] == "lazy"
    assert "lazy updates of the" in config["resolved"]["optimizer"]
    assert "fused" in config["resolved"]["optimizer"]

    interrupted = tmp_path / "interrupted"
    original = FinetuneRecipe.training_loss

    def stop_at_step_7(self, batch, step):
        if step == 7:
            raise KeyboardInterrupt
        return original(self, batch, step)

    monkeypatch.setattr(FinetuneRecipe, "training_loss", stop_at_step_7)
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, interrupted, *args)) == EXIT_INTERRUPTED
    assert json.loads((interrupted / "checkpoint" / "state.json").read_text())["progress"]["step"] == 6
    monkeypatch.setattr(FinetuneRecipe, "training_loss", original)
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, interrupted, *args, "--resume")) == 0
    assert _comparable(interrupted) == _comparable(reference)
    reference_weights = load_file(str(reference / "best" / "model.safetensors"))
    resumed_weights = load_file(str(interrupted / "best" / "model.safetensors"))
    assert all(torch.equal(reference_weights[name], resumed_weights[name]) for name in reference_weights)


def test_lazy_updates_leave_unseen_rows_alone_and_dense_ones_do_not(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from safetensors import safe_open

    def table(path):
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(next(k for k in f.keys() if "word_embeddings" in k))

    pretrained = table(next(tiny_model_dir.glob("*.safetensors")))
    moved = {}
    for updates in ("lazy", "dense"):
        out = tmp_path / updates
        assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--embedding-updates", updates)) == 0
        moved[updates] = int((table(out / "best" / "model.safetensors") != pretrained).any(dim=1).sum())
    rows = pretrained.shape[0]
    assert 0 < moved["lazy"] < rows // 2  # the rows of the training sentences' tokens
    assert moved["dense"] >= rows - 2  # every row but the padding row (weight decay, momentum)


def test_resuming_with_another_option_names_it(fresh_accelerator, tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--max-steps", "2", "--mixed-precision", "no")) == 0
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--max-steps", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "mixed_precision: 'no' there, 'auto' here" in err


def test_a_run_from_before_the_options_resumes_only_with_their_old_values(fresh_accelerator, tiny_model_dir,
                                                                          tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    old = ("--mixed-precision", "no", "--embedding-updates", "dense", "--adamw-implementation", "for-loop")
    args = ("--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "2")
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, *args, *old)) == 0
    saved = json.loads((out / "config.json").read_text())
    for name in ("embedding_updates", "adamw_implementation"):  # as an older dlfa wrote it
        del saved["config"][name]
    (out / "config.json").write_text(json.dumps(saved))
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, *args, "--resume")) == 2
    err = capsys.readouterr().err
    assert "adamw_implementation: 'for-loop' there, 'auto' here" in err
    assert "embedding_updates: 'dense' there, 'lazy' here" in err and "mixed_precision: 'no' there" in err
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, *args, *old, "--resume")) == 0


def test_a_run_resumed_in_another_precision_is_warned(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import FinetuneRecipe

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"resolved": {"mixed_precision": "no"}}))
    recipe = FinetuneRecipe(TrainConfig(task="udpos", data_dir=str(tiny_udpos_dir), output_dir=str(out),
                                        model=str(tiny_model_dir)), resume=True)
    recipe.mixed_precision, recipe.precision_reason = "bf16", "auto: mocked"
    recipe._check_resumed_precision()
    assert "trained in fp32 before the interruption and continues in bf16" in recipe._precision_warning
    recipe.mixed_precision = "no"
    recipe._precision_warning = None
    recipe._check_resumed_precision()
    assert recipe._precision_warning is None


def test_lazy_moments_grow_with_the_rows_seen():
    model = TinyTable(1000, 4)
    optimizer = build_optimizer(model, _groups(model), 1e-3, "fused", "lazy")
    seen: set[int] = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 1000, (16,), generator=generator)
        seen |= set(ids.tolist())
        model(ids).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.stored_rows(model.embeddings.weight) == len(seen)
    state = optimizer.state[model.embeddings.weight]
    assert state["exp_avg"].shape[0] < 1000 and math.isclose(float(state["step"]), 20)
