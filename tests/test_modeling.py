"""AIF gate and DLFA fusion: hand-computed values, padding invariance, gradients, baseline, persistence, and the
transformers classes' configuration, initialization and strict loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlfa.errors import DlfaInputError
from dlfa.modeling import load_dlfa_model
from dlfa.modeling.modeling_dlfa import (
    BASELINE_GATE_BIAS,
    HEAD_CLASSES,
    AIFGate,
    DLFAConfig,
    DLFAConfigError,
    DLFAForSequenceClassification,
    DLFAForTokenClassification,
    DLFAFusion,
    DLFAPreTrainedModel,
    DLFAWeightsError,
    load_encoder,
)


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


def _model(tiny_model_dir, fuse_layer, head="token", num_labels=5, **settings) -> DLFAPreTrainedModel:
    torch.manual_seed(1)
    return HEAD_CLASSES[head].from_encoder(str(tiny_model_dir), fuse_layer=fuse_layer,
                                           id2label=[f"L{i}" for i in range(num_labels)], **settings).eval()


def _make_differences_visible(model: DLFAPreTrainedModel) -> None:
    """Redraw the encoder blocks' weight matrices from N(0, 0.1) and every gate parameter from N(0, 0.5).

    At initialisation the tiny random encoder's layers lie about 0.02 apart and g stays within a few hundredths of
    0.5 whatever it reads, so the wrong layer or a gate that pools over padding moves the output by 1e-3 or less;
    with these weights the layers lie about 0.5 apart and such mistakes move real tokens' features by 0.02 to 0.8
    (thousands of times the tests' tolerance of 1e-5).
    """
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.encoder.encoder.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for param in model.fusion.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("head", ["token", "sequence"])
def test_padding_does_not_change_real_tokens(tiny_model_dir, head):
    model = _model(tiny_model_dir, fuse_layer=2, head=head)
    _make_differences_visible(model)  # a gate that pooled over padding would change the logits by > 0.02
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


def _reference_fusion(gate: AIFGate, last: torch.Tensor, lower: torch.Tensor, mask: torch.Tensor,
                      pool_padding: bool = False) -> torch.Tensor:
    """L = L1 g + L2 (1 - g), g = sigmoid(local(W) + global(W)), W = (L1 + L2) / 2, written out independently of
    the model's modules (default placement: Linear -> LayerNorm -> ReLU -> Linear). The global branch pools W over
    the real tokens, counted one by one (``pool_padding``: over every position, the wrong way)."""

    def bottleneck(branch, x):
        h = x @ branch.down.weight.T + branch.down.bias
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + branch.norm.eps)
        h = torch.clamp(h * branch.norm.weight + branch.norm.bias, min=0)
        return h @ branch.up.weight.T + branch.up.bias

    w = (last + lower) / 2
    pooled = []
    for b in range(w.size(0)):
        rows = [w[b, t] for t in range(w.size(1)) if pool_padding or mask[b, t]]
        pooled.append(sum(rows) / len(rows))
    g = torch.sigmoid(bottleneck(gate.local_branch, w) + bottleneck(gate.global_branch, torch.stack(pooled))[:, None])
    return last * g + lower * (1 - g)


@pytest.mark.parametrize("fuse_layer", [1, 2, 3])
def test_model_fuses_the_last_layer_with_layer_x_exactly(tiny_model_dir, fuse_layer):
    """The head reads L computed from hidden_states[N] (L1) and hidden_states[x] (L2), with the global branch
    pooling over real tokens only: checked against the written-out equations on a padded batch."""
    model = _model(tiny_model_dir, fuse_layer=fuse_layer)
    _make_differences_visible(model)
    ids = torch.tensor([[0, 10, 11, 12, 13, 2], [0, 14, 15, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
        hidden = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hidden) == 5  # embeddings + 4 blocks: L1 = hidden[4]
        for mine, theirs in zip(out.hidden_states, hidden, strict=True):
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
        expected = _reference_fusion(model.fusion.gate, hidden[4], hidden[fuse_layer], mask)
        torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logits, model.classifier(expected), atol=1e-5, rtol=1e-5)
        # The test has the power to tell: a neighbouring L2, another L1 or a mean over padding moves the real
        # tokens' features by more than 1000 times the tolerance.
        real = mask.bool()
        wrong = {f"L2 = hidden[{x}]": _reference_fusion(model.fusion.gate, hidden[4], hidden[x], mask)
                 for x in (fuse_layer - 1, fuse_layer + 1)}
        wrong["L1 = hidden[3]"] = _reference_fusion(model.fusion.gate, hidden[3], hidden[fuse_layer], mask)
        wrong["padding pooled"] = _reference_fusion(model.fusion.gate, hidden[4], hidden[fuse_layer], mask,
                                                    pool_padding=True)
        for name, features in wrong.items():
            assert (features[real] - expected[real]).abs().max() > 0.01, name


def test_sequence_head_reads_the_first_token_through_dense_and_tanh(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2, head="sequence", num_labels=3)
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]])
    mask = (ids != 1).long()
    head = model.classifier
    with torch.no_grad():
        for linear in (head.dense, head.out_proj):
            linear.weight.normal_(0.0, 0.5)
        out = model(ids, mask)
        first = out.features[:, 0]
        expected = torch.tanh(first @ head.dense.weight.T + head.dense.bias) @ head.out_proj.weight.T + head.out_proj.bias
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
        # Power: the mean over tokens, or no tanh, gives other logits.
        mean = out.features.mean(dim=1)
        assert (head.out_proj(torch.tanh(head.dense(mean))) - expected).abs().max() > 0.05
        assert (head.out_proj(head.dense(first)) - expected).abs().max() > 0.05


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


@pytest.mark.parametrize("head,fuse_layer,settings", [
    ("token", 3, {}), ("sequence", None, {}), ("sequence", 1, {}),
    ("token", 2, {"aif_norm_placement": "mscam", "gate_init": "baseline", "reduction": 2}),
])
def test_save_load_round_trip_is_identical(tiny_model_dir, tmp_path, head, fuse_layer, settings):
    model = _model(tiny_model_dir, fuse_layer=fuse_layer, head=head, **settings)
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    assert loaded.config.fuse_layer == fuse_layer and loaded.config.id2label == model.config.id2label
    for name, value in settings.items():
        assert getattr(loaded.config, name) == value
    assert loaded.state_dict().keys() == model.state_dict().keys()
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
        load_dlfa_model(tmp_path / "saved")
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error type; dlfa's loader names the file
        DLFAForTokenClassification.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("bad", [0, 4, -1, 12, 2.0, True])
def test_invalid_fuse_layer(tiny_model_dir, bad):
    with pytest.raises(DLFAConfigError, match=r"1\.\.3") as info:
        _model(tiny_model_dir, fuse_layer=bad)
    assert info.value.field == "fuse_layer" and isinstance(info.value, ValueError)


def test_loss_ignores_unlabelled_positions(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2)
    ids = torch.tensor([[0, 10, 11, 2]])
    mask = torch.ones_like(ids)
    out = model(ids, mask, labels=torch.tensor([[-100, 3, -100, -100]]))
    expected = torch.nn.functional.cross_entropy(out.logits[0, 1:2], torch.tensor([3]))
    torch.testing.assert_close(out.loss, expected)


def test_sequence_loss_is_float32_cross_entropy_over_the_batch(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=1, head="sequence", num_labels=3)
    ids = torch.tensor([[0, 10, 11, 2], [0, 12, 2, 1]])
    mask = (ids != 1).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, labels=torch.tensor([2, 0]))
    assert out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits.float(), torch.tensor([2, 0]))
    torch.testing.assert_close(out.loss, expected)
    assert out.features.shape == (2, 4, 32) and out[0] is out.loss  # indexable, as Trainer reads it



def test_loss_is_float32_for_a_half_precision_model(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2).to(torch.bfloat16)
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    labels = torch.tensor([[-100, 3, 0, 4, -100]])
    out = model(ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits[0].float(), labels[0], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=0, rtol=0)

# -- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("reduction", 0), ("reduction", 33), ("reduction", 2.5), ("aif_norm", "batchnorm"),
    ("aif_norm_placement", "after"), ("gate_init", "zeros"), ("classifier_dropout", 1.0),
    ("classifier_dropout", float("nan")), ("initializer_range", 0.0), ("fuse_layer", 4), ("encoder_name", 3),
])
def test_config_refuses_bad_values(tiny_encoder, field, value):
    with pytest.raises(DLFAConfigError) as info:
        DLFAConfig(encoder=tiny_encoder.config, **{"fuse_layer": 2, field: value})
    assert info.value.field == field and field in str(info.value)


def test_config_refuses_a_norm_placement_without_a_norm(tiny_encoder):
    with pytest.raises(DLFAConfigError, match="aif_norm_placement"):
        DLFAConfig(encoder=tiny_encoder.config, fuse_layer=2, aif_norm="none", aif_norm_placement="mscam")
    DLFAConfig(encoder=tiny_encoder.config, fuse_layer=2, aif_norm="none")  # the default placement is fine


def test_config_json_round_trip_rebuilds_the_encoder_config(tiny_encoder, tmp_path):
    config = DLFAConfig(encoder=tiny_encoder.config, fuse_layer=2, reduction=8, gate_init="baseline",
                        id2label={0: "NOUN", 1: "VERB"}, encoder_name="tiny")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "dlfa" and isinstance(data["encoder"], dict)
    assert data["encoder"]["model_type"] == "bert" and data["encoder"]["num_hidden_layers"] == 4
    again = DLFAConfig.from_pretrained(tmp_path)
    assert type(again.encoder).__name__ == "BertConfig" and again.encoder.hidden_size == 32
    assert (again.fuse_layer, again.reduction, again.gate_init, again.aif_norm_placement) == (2, 8, "baseline",
                                                                                              "bottleneck")
    assert again.id2label == {0: "NOUN", 1: "VERB"} and again.label2id == {"NOUN": 0, "VERB": 1}
    assert again.num_labels == 2 and again.encoder_name == "tiny"
    assert DLFAConfig().encoder is None  # transformers builds configs without arguments
    with pytest.raises(DLFAConfigError, match="encoder"):
        DLFAConfig(encoder={"hidden_size": 8})


# -- initialization -----------------------------------------------------------------------------------------------


def test_from_encoder_keeps_the_pretrained_encoder_weights(tiny_model_dir):
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(tiny_model_dir, add_pooling_layer=False).state_dict()
    for fuse_layer in (None, 2):
        model = _model(tiny_model_dir, fuse_layer=fuse_layer)
        encoder = model.encoder.state_dict()
        assert encoder.keys() == reference.keys()
        assert all(torch.equal(encoder[k], reference[k]) for k in reference)


def _gate_values(model, ids):
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return model.fusion.gate((hidden[-1] + hidden[model.config.fuse_layer]) / 2, mask)


def test_new_modules_are_initialised_as_documented(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2, reduction=1)
    linears = [m for m in [*model.fusion.modules(), model.classifier] if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)  # N(0, initializer_range)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    norms = [m for m in model.fusion.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    gate = _gate_values(model, torch.tensor([[0, 10, 11, 12, 2]]))
    assert (gate - 0.5).abs().max() < 0.1  # gate_init="average": the plain average of the two layers


@pytest.mark.parametrize("placement", ["bottleneck", "mscam"])
def test_gate_init_baseline_starts_near_the_baseline(tiny_model_dir, placement):
    model = _model(tiny_model_dir, fuse_layer=2, gate_init="baseline", aif_norm_placement=placement)
    for branch in (model.fusion.gate.local_branch, model.fusion.gate.global_branch):
        last = branch.out_norm if placement == "mscam" else branch.up
        assert torch.all(last.bias == BASELINE_GATE_BIAS / 2)
        if placement == "mscam":  # the linear bias before the final LayerNorm would be normalised away
            assert torch.count_nonzero(branch.up.bias) == 0
    gate = _gate_values(model, torch.tensor([[0, 10, 11, 12, 2], [0, 13, 14, 15, 2]]))
    centre = 1 / (1 + math.exp(-BASELINE_GATE_BIAS))
    if placement == "bottleneck":
        assert abs(gate.mean().item() - centre) < 0.02 and gate.min().item() > 0.9
    else:  # the final LayerNorm spreads the pre-activation (std about sqrt(2)) around the bias
        assert abs(gate.mean().item() - centre) < 0.06 and gate.median().item() > 0.9


def test_mscam_placement_normalises_after_both_linear_layers():
    torch.manual_seed(0)
    gate = AIFGate(hidden_size=8, reduction=2, norm="layernorm", placement="mscam")
    w = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def layer_norm(h, norm):
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return h * norm.weight + norm.bias

    def bottleneck(branch, x):
        h = torch.clamp(layer_norm(x @ branch.down.weight.T + branch.down.bias, branch.norm), min=0)
        return layer_norm(h @ branch.up.weight.T + branch.up.bias, branch.out_norm)

    pooled = torch.stack([w[0, :3].mean(0), w[1].mean(0)])
    expected = torch.sigmoid(bottleneck(gate.local_branch, w) + bottleneck(gate.global_branch, pooled)[:, None])
    torch.testing.assert_close(gate(w, mask), expected, atol=1e-5, rtol=1e-5)


# -- strict loading -----------------------------------------------------------------------------------------------


def _rewrite_weights(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("dlfa.fusion.gate.local_branch.up.bias"), "missing dlfa.fusion.gate.local_branch.up.bias"),
    (lambda t: t.__setitem__("dlfa.extra.weight", torch.zeros(2)), "unexpected dlfa.extra.weight"),
    (lambda t: t.__setitem__("classifier.weight", torch.zeros(3, 32)), "of another shape classifier.weight"),
])
def test_a_load_that_misses_weights_is_an_error(tiny_model_dir, tmp_path, damage, message):
    _model(tiny_model_dir, fuse_layer=2).save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, damage)
    with pytest.raises(DLFAWeightsError, match=message):
        DLFAForTokenClassification.from_pretrained(tmp_path)
    with pytest.raises(DlfaInputError, match="model.safetensors: weights do not match the model") as info:
        load_dlfa_model(tmp_path)
    assert "\n" not in str(info.value)


def test_a_head_of_the_other_kind_is_an_error(tiny_model_dir, tmp_path):
    _model(tiny_model_dir, fuse_layer=2, head="token").save_pretrained(tmp_path)
    with pytest.raises(DLFAWeightsError, match="missing classifier"):
        DLFAForSequenceClassification.from_pretrained(tmp_path)


def test_encoder_pooler_weights_are_accepted(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import BertModel

    # An encoder checkpoint with a pooler (what a plain AutoModel/BertModel saves) builds a DLFA model...
    torch.manual_seed(0)
    BertModel(load_encoder(str(tiny_model_dir)).config).save_pretrained(tmp_path / "with-pooler")
    model = DLFAForTokenClassification.from_encoder(str(tmp_path / "with-pooler"), fuse_layer=1, id2label=["a", "b"])
    assert not any("pooler" in name for name in model.state_dict())
    # ...and a DLFA checkpoint that carries pooler weights loads, the pooler ignored.
    model.save_pretrained(tmp_path / "dlfa")
    _rewrite_weights(tmp_path / "dlfa", lambda t: t.update({"dlfa.encoder.pooler.dense.weight": torch.zeros(32, 32),
                                                            "dlfa.encoder.pooler.dense.bias": torch.zeros(32)}))
    again = DLFAForTokenClassification.from_pretrained(tmp_path / "dlfa")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_weights_load_from_safetensors_only(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, fuse_layer=2)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        DLFAForTokenClassification.from_pretrained(tmp_path, use_safetensors=False)
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    torch.save({}, tmp_path / "pytorch_model.bin")  # a pickle beside the config is never read
    with pytest.raises(OSError):
        DLFAForTokenClassification.from_pretrained(tmp_path)


def test_encoder_export_is_one_call(tiny_model_dir, tmp_path):
    from transformers import AutoModel

    model = _model(tiny_model_dir, fuse_layer=2)
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.add_(1.0)  # as after fine-tuning
    model.save_encoder(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert type(encoder).__name__ == "BertModel"
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in model.encoder.state_dict().items())


def test_activation_checkpointing_reaches_the_encoder_and_keeps_the_gradients(tiny_model_dir):
    model = _model(tiny_model_dir, fuse_layer=2).train()
    ids, labels = torch.tensor([[0, 10, 11, 12, 2]]), torch.tensor([[-100, 1, 2, 0, -100]])

    def gradients():
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state)
        model(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.encoder.encoder.layer)
    checkpointed = gradients()
    assert all(torch.allclose(checkpointed[n], plain[n], atol=1e-6) for n in plain)
