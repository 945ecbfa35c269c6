"""AIF gate and DLFA fusion: hand-computed values, padding invariance, gradients, baseline, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from dlfa.errors import DlfaInputError
from dlfa.modeling.modeling_dlfa import AIFGate, DLFAConfig, DLFAFusion, DLFAModel, load_encoder


def _identity_bottlenecks(module: AIFGate) -> None:
    """local(W) = relu(W), global(W) = relu(masked_mean(W)) for H = 2, r = 1, no norm."""
    for branch in (module.local_branch, module.global_branch):
        for linear in (branch.down, branch.up):
            with torch.no_grad():
                linear.weight.copy_(torch.eye(2))
                linear.bias.zero_()


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dlfa_fusion_matches_hand_computed_values():
    fusion = DLFAFusion(hidden_size=2, reduction=1, norm="none")
    _identity_bottlenecks(fusion.gate)
    last = torch.tensor([[[1.0, -1.0], [3.0, 1.0], [100.0, 100.0]]])  # third token is padding
    lower = torch.tensor([[[-1.0, 1.0], [1.0, 3.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # W = (L1 + L2)/2 = [[0, 0], [2, 2]]; masked mean over the 2 real tokens = [1, 1]
    # g(tok0) = sigmoid(relu(0) + relu(1)) = sigmoid(1); g(tok1) = sigmoid(2 + 1) = sigmoid(3)
    gate = fusion.gate((last + lower) / 2, mask)
    assert gate[0, 0].tolist() == pytest.approx([0.7310585786, 0.7310585786], abs=1e-7)
    assert gate[0, 1].tolist() == pytest.approx([0.9525741268, 0.9525741268], abs=1e-7)
    out = fusion(last, lower, mask)
    # L = L1*g + L2*(1-g): tok0 = [1*.7311 - 1*.2689, -1*.7311 + 1*.2689]; tok1 = [3*.9526 + .0474, .9526 + 3*.0474]
    assert out[0, 0].tolist() == pytest.approx([0.4621171573, -0.4621171573], abs=1e-6)
    assert out[0, 1].tolist() == pytest.approx([2.9051482536, 1.0948517464], abs=1e-6)


def test_aif_layernorm_bottleneck_matches_explicit_formula():
    torch.manual_seed(0)
    gate = AIFGate(hidden_size=8, reduction=2, norm="layernorm")
    w = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def bottleneck(branch, x):
        h = x @ branch.down.weight.T + branch.down.bias
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        h = h * branch.norm.weight + branch.norm.bias
        return torch.clamp(h, min=0) @ branch.up.weight.T + branch.up.bias

    pooled = torch.stack([w[0, :3].mean(0), w[1].mean(0)])
    expected = torch.sigmoid(bottleneck(gate.local_branch, w) + bottleneck(gate.global_branch, pooled)[:, None])
    torch.testing.assert_close(gate(w, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny_encoder(tiny_model_dir):
    return load_encoder(str(tiny_model_dir))


def _model(tiny_model_dir, fuse_layer, head="token", num_labels=5) -> DLFAModel:
    torch.manual_seed(1)
    config = DLFAConfig(head=head, num_labels=num_labels, fuse_layer=fuse_layer)
    return DLFAModel.from_encoder(config, str(tiny_model_dir)).eval()


@pytest.mark.parametrize("head", ["token", "sequence"])
def test_padding_does_not_change_real_tokens(tiny_model_dir, head):
    model = _model(tiny_model_dir, fuse_layer=2, head=head)
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.full((1, 6), 1)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids, mask).logits
        padded = model(padded_ids, padded_mask).logits
    if head == "token":
        padded = padded[:, : ids.size(1)]
    torch.testing.assert_close(plain, padded, atol=1e-5, rtol=1e-5)


def test_gradients_reach_both_fused_layers_and_the_gate(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=1).train()
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 14, 2, 1]])
    mask = (ids != 1).long()
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, 0, 4, -100, -100]])
    features, hidden = model.encode(ids, mask, output_hidden_states=True)
    loss = torch.nn.functional.cross_entropy(model.head(features).flatten(0, 1), labels.flatten())
    grad_last, grad_lower = torch.autograd.grad(loss, [hidden[-1], hidden[1]], retain_graph=True)
    assert grad_last.abs().sum() > 0 and grad_lower.abs().sum() > 0
    # The lower layer also gets gradient directly from the fusion, not only through the blocks above it:
    direct = torch.autograd.grad(features.sum(), hidden[1], retain_graph=True)[0]
    assert direct.abs().sum() > 0
    loss.backward()
    for name, param in model.fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.encoder.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0  # block 1 = layer x
    assert model.encoder.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0  # last block


def test_fusion_input_gradients_on_leaf_tensors():
    fusion = DLFAFusion(hidden_size=8, reduction=2)
    last = torch.randn(2, 3, 8, requires_grad=True)
    lower = torch.randn(2, 3, 8, requires_grad=True)
    fusion(last, lower, torch.ones(2, 3)).pow(2).sum().backward()
    assert last.grad.abs().sum() > 0 and lower.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["token", "sequence"])
def test_baseline_is_encoder_plus_head(tiny_model_dir, head):
    model = _model(tiny_model_dir, fuse_layer=None, head=head)
    assert model.fusion is None
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model.head(model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
        torch.testing.assert_close(model(ids, mask).logits, expected)


def test_dlfa_differs_from_baseline(tiny_model_dir):
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = _model(tiny_model_dir, None)(ids, mask).features
        fused = _model(tiny_model_dir, 2)(ids, mask).features
    assert not torch.allclose(base, fused)


@pytest.mark.parametrize("head,fuse_layer", [("token", 3), ("sequence", None), ("sequence", 1)])
def test_save_load_round_trip_is_identical(tiny_model_dir, tmp_path, head, fuse_layer):
    model = _model(tiny_model_dir, fuse_layer=fuse_layer, head=head)
    model.save_pretrained(tmp_path / "saved")
    loaded = DLFAModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config == model.config
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).logits, model(ids, mask).logits, atol=0, rtol=0)


def test_truncated_weights_are_rejected(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, fuse_layer=2)
    model.save_pretrained(tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DlfaInputError, match="model.safetensors"):
        DLFAModel.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("bad", [0, 4, -1, 12])
def test_invalid_fuse_layer(tiny_model_dir, bad):
    with pytest.raises(DlfaInputError, match=r"1\.\.3"):
        _model(tiny_model_dir, fuse_layer=bad)


def test_loss_ignores_unlabelled_positions(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2)
    ids = torch.tensor([[0, 10, 11, 2]])
    mask = torch.ones_like(ids)
    out = model(ids, mask, labels=torch.tensor([[-100, 3, -100, -100]]))
    expected = torch.nn.functional.cross_entropy(out.logits[0, 1:2], torch.tensor([3]))
    torch.testing.assert_close(out.loss, expected)
