"""X-Mixup: the mixer's equations, the entropy, scheduled sampling, the loss terms, gradients, the parallel-data
readers, the honest-evaluation rules and tiny end-to-end runs through the CLI (also with DLFA fusion and resume)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dlfa.cli.main import main
from dlfa.data.parallel import (
    pair_parallel_files,
    read_parallel_tagging,
    read_parallel_tsv,
    read_translate_train,
)
from dlfa.errors import DlfaInputError
from dlfa.modeling import load_dlfa_model
from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAForSequenceClassification, DLFAForTokenClassification
from dlfa.modeling.modeling_xmixup import (
    CrossAttentionMixer,
    XMixupConfig,
    XMixupModel,
    masked_softmax_entropy,
)
from dlfa.tasks.xnli import LABEL_ALIASES, NLI_LABELS
from dlfa.training.config import TrainConfig
from dlfa.training.xmixup import (
    ParallelCollator,
    XMixupRecipe,
    auto_schedule_k,
    draw_mix,
    featurize_pairs,
    kl_consistency,
    mixing_probability,
    mse_consistency,
    xmixup_objective,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and two threads on a busy 2-core machine are 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the mixer -------------------------------------------------------------------------------------------------


def _identity_mixer(weight: float, bias: float) -> CrossAttentionMixer:
    mixer = CrossAttentionMixer(hidden_size=2, num_heads=1, lambda_max=0.5)
    with torch.no_grad():
        for linear in (mixer.query, mixer.key, mixer.value, mixer.output):
            linear.weight.copy_(torch.eye(2))
            linear.bias.zero_()
        mixer.entropy_dense.weight.fill_(weight)
        mixer.entropy_dense.bias.fill_(bias)
    return mixer


def test_mixing_equation_and_lambda_by_hand():
    t = [1.0, 0.5]
    s = [[2.0, 0.0], [0.0, 1.0]]
    mixer = _identity_mixer(weight=0.7, bias=-0.3)
    mixed, stats = mixer(torch.tensor([[t]]), torch.ones(1, 1), torch.tensor([s]), torch.ones(1, 2))

    scores = [(t[0] * k[0] + t[1] * k[1]) / math.sqrt(2) for k in s]
    z = sum(math.exp(x) for x in scores)
    p = [math.exp(x) / z for x in scores]
    attended = [p[0] * s[0][d] + p[1] * s[1][d] for d in range(2)]
    # target->source: one row over two keys; source->target: two rows over one key (entropy 0 each).
    entropy = -sum(pi * math.log(pi) for pi in p) + 0.0
    lam = 0.5 / (1 + math.exp(-(0.7 * entropy - 0.3)))
    expected = [lam * attended[d] + (1 - lam) * t[d] for d in range(2)]

    assert stats.entropy.item() == pytest.approx(entropy, rel=1e-5)
    assert stats.lam.item() == pytest.approx(lam, rel=1e-5)
    assert mixed[0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert stats.attention[0, 0, 0].tolist() == pytest.approx(p, rel=1e-5)


def test_lambda_starts_as_half_sigmoid_of_entropy_and_stays_below_lambda_max():
    mixer = CrossAttentionMixer(hidden_size=8, num_heads=2, lambda_max=0.5)  # authors' init: kernel 1, bias 0
    entropy = torch.tensor([0.0, 1.0, 3.0, 50.0])
    assert mixer.mixing_ratio(entropy).tolist() == pytest.approx((0.5 * torch.sigmoid(entropy)).tolist())
    assert mixer.mixing_ratio(entropy).max() <= 0.5


def test_entropy_excludes_padding_keys_and_padding_queries():
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 3, 4)  # (batch, heads, queries, keys)
    key_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    query_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    probs, entropy = masked_softmax_entropy(scores, key_mask, query_mask)

    for b in range(2):
        keys, queries = int(key_mask[b].sum()), int(query_mask[b].sum())
        rows = []
        for h in range(2):
            for q in range(queries):
                p = torch.softmax(scores[b, h, q, :keys].double(), dim=-1)
                rows.append(float(-(p * p.log()).sum()))
        assert entropy[b].item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
        assert probs[b, :, :, keys:].abs().max().item() < 1e-12  # no attention on padding keys

    # Whatever sits at padding positions changes nothing.
    noisy = scores.clone()
    noisy[0, :, :, 3] = 100.0
    noisy[0, :, 2, :] = -50.0
    assert masked_softmax_entropy(noisy, key_mask, query_mask)[1].tolist() == pytest.approx(entropy.tolist())


def test_mixer_keeps_padding_positions_and_is_batch_independent():
    torch.manual_seed(1)
    mixer = CrossAttentionMixer(hidden_size=8, num_heads=2)
    target, source = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    alone, stats = mixer(target, torch.ones(1, 3), source, torch.ones(1, 4))
    # The same sentence padded by two more positions on both sides.
    padded_t = torch.cat([target, torch.randn(1, 2, 8)], dim=1)
    padded_s = torch.cat([source, torch.randn(1, 2, 8)], dim=1)
    mixed, padded_stats = mixer(padded_t, torch.tensor([[1, 1, 1, 0, 0]]), padded_s, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert torch.allclose(mixed[:, :3], alone, atol=1e-6)
    assert torch.equal(mixed[:, 3:], padded_t[:, 3:])
    assert padded_stats.lam.item() == pytest.approx(stats.lam.item(), rel=1e-6)


# -- scheduled sampling ----------------------------------------------------------------------------------------


def test_schedule_values():
    k = 1000.0  # the authors' p_k
    assert mixing_probability(0, 10_000, "inverse_sigmoid", k) == pytest.approx(1000 / 1001)
    assert mixing_probability(round(k * math.log(k)), 10_000, "inverse_sigmoid", k) == pytest.approx(0.5, abs=1e-3)
    assert mixing_probability(20_000, 10_000, "inverse_sigmoid", k) == pytest.approx(k / (k + math.exp(20)))
    auto = auto_schedule_k(140)
    assert auto * math.log(auto) == pytest.approx(70, rel=1e-6)
    assert mixing_probability(70, 140, "inverse_sigmoid") == pytest.approx(0.5, abs=1e-6)
    values = [mixing_probability(s, 140, "inverse_sigmoid") for s in range(141)]
    assert values == sorted(values, reverse=True) and values[0] > 0.9 and values[-1] < 0.1
    assert [mixing_probability(s, 4, "linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert mixing_probability(99, 4, "constant") == 1.0
    assert mixing_probability(10**9, 10, "inverse_sigmoid", 2.0) == 0.0  # no overflow
    # Draws are a pure function of (seed, step, micro-batch) with the scheduled frequency.
    assert [draw_mix(3, s, 0, 0.5) for s in range(50)] == [draw_mix(3, s, 0, 0.5) for s in range(50)]
    assert sum(draw_mix(0, s, 0, 0.3) for s in range(4000)) / 4000 == pytest.approx(0.3, abs=0.03)


# -- the loss terms --------------------------------------------------------------------------------------------


def _fake_output(batch=4, length=5, hidden=6, labels=3, seed=0):
    from dlfa.modeling.modeling_xmixup import XMixupOutput

    g = torch.Generator().manual_seed(seed)
    src_logits, trg_logits = torch.randn(batch, labels, generator=g), torch.randn(batch, labels, generator=g)
    src_feat, trg_feat = torch.randn(batch, length, hidden, generator=g), torch.randn(batch, length, hidden, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0
    return XMixupOutput(logits=(src_logits + trg_logits) / 2, source_logits=src_logits, target_logits=trg_logits,
                        source_features=src_feat, target_features=trg_feat, source_attention_mask=mask,
                        target_attention_mask=mask, mixed=True)


def test_loss_terms_against_direct_computation():
    out = _fake_output()
    labels = torch.tensor([0, 2, 1, 1])
    losses = xmixup_objective(out, labels, labels, "sequence", alpha=0.4, kl_weight=0.5, mse_weight=2.0)

    def ce(logits):
        return sum(-torch.log_softmax(logits[i], -1)[labels[i]].item() for i in range(4)) / 4

    p, q = torch.softmax(out.source_logits, -1), torch.softmax(out.target_logits, -1)
    kl = sum(sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(3)).item() for i in range(4)) / 4
    cls_s, cls_t = out.source_features[:, 0], out.target_features[:, 0]
    mse = ((cls_s - cls_t) ** 2).mean(dim=1).mean().item()
    assert losses.source_task.item() == pytest.approx(ce(out.source_logits), rel=1e-5)
    assert losses.target_task.item() == pytest.approx(ce(out.target_logits), rel=1e-5)
    assert losses.task.item() == pytest.approx(0.4 * ce(out.source_logits) + 0.6 * ce(out.target_logits), rel=1e-5)
    assert losses.kl.item() == pytest.approx(kl, rel=1e-5)
    assert kl_consistency(out.source_logits, out.source_logits).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.mse.item() == pytest.approx(mse, rel=1e-5)
    assert mse_consistency(cls_s, cls_t).item() == pytest.approx(mse, rel=1e-5)
    assert losses.total.item() == pytest.approx(losses.task.item() + 0.5 * kl + 2.0 * mse, rel=1e-5)


def test_tagging_without_target_labels_uses_the_source_loss_only():
    out = _fake_output()
    out.source_logits = torch.randn(4, 5, 3)
    out.target_logits = torch.randn(4, 5, 3)
    src_labels = torch.tensor([[-100, 0, 1, -100, -100]] + [[-100, 2, 2, 1, -100]] * 3)
    trg_labels = torch.full((4, 5), -100)
    losses = xmixup_objective(out, trg_labels, src_labels, "token", alpha=0.8)
    active = src_labels != -100
    direct = torch.nn.functional.cross_entropy(out.source_logits[active], src_labels[active])
    assert losses.target_task is None
    assert losses.task.item() == pytest.approx(direct.item(), rel=1e-5)
    assert losses.kl.item() == 0.0
    mask = out.source_attention_mask.unsqueeze(-1).float()
    mean_s = (out.source_features * mask).sum(1) / mask.sum(1)
    mean_t = (out.target_features * mask).sum(1) / mask.sum(1)
    assert losses.mse.item() == pytest.approx(((mean_s - mean_t) ** 2).mean().item(), rel=1e-5)


# -- the model: hooks, gradients, fusion, persistence --------------------------------------------------------


@pytest.fixture
def tiny_xmixup(tiny_model_dir):
    torch.manual_seed(0)
    model = DLFAForSequenceClassification.from_encoder(str(tiny_model_dir), fuse_layer=2, id2label=["a", "b", "c"])
    return XMixupModel(model, XMixupConfig(layers=[1, 2]))


def _pair_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, 7), generator=g)
    src = torch.randint(5, 40, (3, 9), generator=g)
    mask, src_mask = torch.ones_like(ids), torch.ones_like(src)
    mask[0, 5:], src_mask[1, 6:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2]),
            "src_input_ids": src, "src_attention_mask": src_mask, "src_labels": torch.tensor([0, 1, 2])}


def test_mixers_start_from_the_encoder_attention(tiny_xmixup):
    layers = tiny_xmixup.model.encoder.encoder.layer
    assert tiny_xmixup.xmixup_config.init == {"1": "query/key of block 2", "2": "query/key of block 3"}
    assert torch.equal(tiny_xmixup.mixers["1"].query.weight, layers[1].attention.self.query.weight)
    assert torch.equal(tiny_xmixup.mixers["2"].key.bias, layers[2].attention.self.key.bias)
    assert torch.equal(tiny_xmixup.mixers["1"].value.weight, torch.eye(32))


def test_gradients_reach_encoder_mixer_and_lambda(tiny_xmixup):
    batch = _pair_batch()
    out = tiny_xmixup(**batch, mix=True)
    assert set(out.stats) == {1, 2} and out.mixed
    losses = xmixup_objective(out, batch["labels"], batch["src_labels"], "sequence", alpha=0.4)
    losses.total.backward()
    named = dict(tiny_xmixup.named_parameters())
    for name in ("model.dlfa.encoder.embeddings.word_embeddings.weight",
                 "model.dlfa.encoder.encoder.layer.0.output.dense.weight",
                 "model.dlfa.fusion.gate.local_branch.down.weight", "model.classifier.out_proj.weight",
                 "mixers.1.query.weight", "mixers.1.key.weight", "mixers.1.value.weight", "mixers.1.output.weight",
                 "mixers.1.entropy_dense.weight", "mixers.1.entropy_dense.bias", "mixers.2.entropy_dense.weight"):
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_plain_passes_match_the_wrapped_model_and_fusion_reads_the_mixed_states(tiny_xmixup):
    tiny_xmixup.eval()
    batch = _pair_batch(1)
    plain = tiny_xmixup.model(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(tiny_xmixup(batch["input_ids"], batch["attention_mask"]).logits, plain)
    unmixed = tiny_xmixup(**batch, mix=False)
    assert torch.allclose(unmixed.target_logits, plain, atol=1e-6) and not unmixed.stats

    seen = {}
    tiny_xmixup.mixers["2"].register_forward_hook(lambda m, a, out: seen.__setitem__("mixed", out[0]))
    tiny_xmixup.model.fusion.register_forward_hook(lambda m, args, out: seen.__setitem__("lower", args[1]))
    mixed = tiny_xmixup(**batch, mix=True)
    assert torch.equal(seen["lower"], seen["mixed"])  # D_2 fuses the mixed output of block 2
    assert not torch.allclose(mixed.target_logits, plain)
    # The hooks are idle again afterwards.
    assert torch.equal(tiny_xmixup(batch["input_ids"], batch["attention_mask"]).logits, plain)


@pytest.mark.parametrize("kind", ["distilbert", "xlm-roberta"])
def test_other_encoders(kind):
    from transformers import DistilBertConfig, DistilBertModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    if kind == "distilbert":
        encoder = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, hidden_dim=64))
    else:
        encoder = XLMRobertaModel(XLMRobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    model = XMixupModel(DLFAForSequenceClassification(DLFAConfig(encoder=encoder.config, num_labels=3, fuse_layer=1),
                                                      encoder=encoder),
                        XMixupConfig(layers=[1, 3])).eval()
    assert model.xmixup_config.init == {"1": "query/key of block 2", "3": "query/key of block 3"}
    ids, src = torch.randint(3, 50, (2, 6)), torch.randint(3, 50, (2, 8))
    pair = {"src_input_ids": src, "src_attention_mask": torch.ones_like(src)}
    mixed = model(ids, torch.ones_like(ids), **pair)
    plain = model(ids, torch.ones_like(ids), **pair, mix=False)
    assert sorted(mixed.stats) == [1, 3] and not torch.allclose(mixed.target_logits, plain.target_logits)
    assert torch.allclose(plain.target_logits, model(ids, torch.ones_like(ids)).logits, atol=1e-6)


def test_saved_mixer_weights_are_checksummed(tiny_xmixup, tmp_path):
    """A flipped bit in xmixup.safetensors' tensor data (safetensors checks only the header) is caught."""
    from dlfa.io import read_checksums

    tiny_xmixup.save_pretrained(tmp_path / "m")
    assert set(read_checksums(tmp_path / "m" / "checksums.json")) == {"model.safetensors", "xmixup.safetensors"}
    weights = tmp_path / "m" / "xmixup.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(DlfaInputError, match="does not match its sha256") as info:
        XMixupModel.from_pretrained(tmp_path / "m")
    assert info.value.path == str(weights)


def test_save_and_load_round_trip(tiny_xmixup, tmp_path):
    from dlfa.training.xmixup import predict_with_translation

    with torch.no_grad():
        tiny_xmixup.mixers["1"].entropy_dense.bias.fill_(0.25)
    tiny_xmixup.save_pretrained(tmp_path / "m")
    again = XMixupModel.from_pretrained(tmp_path / "m")
    for name, tensor in tiny_xmixup.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert again.xmixup_config.init == tiny_xmixup.xmixup_config.init
    plain = load_dlfa_model(tmp_path / "m")  # the recipe's evaluation reads the folder as before
    assert plain.config.fuse_layer == 2

    # Inference with a source translation: the pair is mixed and the two logits averaged.
    from conftest import build_tiny_tokenizer

    from dlfa.data.parallel import ParallelPair
    from dlfa.tasks import get_task
    from dlfa.tasks.base import SentencePair

    task = get_task("xnli")
    pairs = [ParallelPair(SentencePair("the cat", "a cat", "entailment"), SentencePair("le chat", "el gato",
                                                                                          "entailment"), "fr", "x:1")]
    tokenizer = build_tiny_tokenizer()
    features = featurize_pairs(task, pairs * 3, tokenizer, 32)
    predicted = predict_with_translation(again, features, ParallelCollator(tokenizer, "sequence"), batch_size=2)
    batch = ParallelCollator(tokenizer, "sequence")(features[:1])
    batch.pop("labels"), batch.pop("src_labels")
    again.eval()
    expected = int(again(**batch).logits.argmax(-1))
    assert predicted == [expected] * 3


# -- parallel-data readers -------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_parallel_tsv_reader(tmp_path):
    path = _write(tmp_path / "en-de-translated.tsv", [
        ["sentence1", "sentence2", "t1", "t2", "label"],
        ["the cat", "a cat", "die Katze", "eine Katze", "entailment"],
        ["the dog", "no dog", "der Hund", "kein Hund", "contradictory"],
    ])
    pairs = read_translate_train(path, "xnli")
    assert [p.source.label for p in pairs] == ["entailment", "contradiction"]
    assert pairs[0].target.text_a == "die Katze" and pairs[0].language == "de"
    assert pairs[1].origin.endswith("en-de-translated.tsv:3")
    pawsx = read_translate_train(_write(tmp_path / "p.tsv", [["a", "b", "c", "d", "1"]]), "pawsx", "fr")
    assert pawsx[0].target.label == "1" and pawsx[0].language == "fr"


@pytest.mark.parametrize("rows,expected", [
    ([["a", "b", "c", "d"]], "bad.tsv:1: expected 5 tab-separated columns"),
    ([["a", "b", "c", "d", "entailment"], ["a", "b", "c", "d", "maybe"]], "bad.tsv:2: unknown label 'maybe'"),
    ([["", "b", "c", "d", "neutral"]], "bad.tsv:1: empty text in column 1"),
    ([], "bad.tsv: no sentence pairs"),
])
def test_parallel_tsv_bad_input(tmp_path, rows, expected):
    with pytest.raises(DlfaInputError, match=expected):
        read_parallel_tsv(_write(tmp_path / "bad.tsv", rows), NLI_LABELS, LABEL_ALIASES)


def test_line_parallel_files(tmp_path):
    en = _write(tmp_path / "dev-en.tsv", [["the cat", "a cat", "entailment"], ["the dog", "a cat", "contradiction"]])
    de = _write(tmp_path / "dev-de.tsv", [["die Katze", "eine Katze", "entailment"], ["der Hund", "x", "contradiction"]])
    pairs = pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES, "de")
    assert [(p.source.text_a, p.target.text_a) for p in pairs] == [("the cat", "die Katze"), ("the dog", "der Hund")]

    _write(de, [["die Katze", "eine Katze", "entailment"], ["der Hund", "x", "neutral"]])
    with pytest.raises(DlfaInputError, match=r"dev-de.tsv:2: label 'neutral' differs from 'contradiction' at .*dev-en.tsv:2"):
        pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES)
    _write(de, [["die Katze", "eine Katze", "entailment"]])
    with pytest.raises(DlfaInputError, match=r"dev-en.tsv:2: the files are not line-parallel: 2 rows"):
        pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES)
    _write(de, [["die Katze", "entailment"]])
    with pytest.raises(DlfaInputError, match=r"dev-de.tsv:1: expected 3 tab-separated columns"):
        pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES)


def test_pawsx_release_files_are_joined_by_id(tmp_path):
    from dlfa.tasks.pawsx import PAWSX_LABELS

    header = ["id", "sentence1", "sentence2", "label"]
    en = _write(tmp_path / "train.tsv", [header, ["1", "a", "b", "0"], ["2", "c", "d", "1"], ["3", "e", "f", "1"]])
    de = _write(tmp_path / "translated_train.tsv", [header, ["3", "E", "F", "1"], ["1", "A", "B", "0"]])
    pairs = pair_parallel_files(en, de, PAWSX_LABELS, None, "de")
    assert [(p.source.text_a, p.target.text_a) for p in pairs] == [("e", "E"), ("a", "A")]
    _write(de, [header, ["9", "X", "Y", "1"]])
    with pytest.raises(DlfaInputError, match=r"translated_train.tsv:2: id '9' has no row"):
        pair_parallel_files(en, de, PAWSX_LABELS)


# -- configuration ---------------------------------------------------------------------------------------------


def test_config_validation():
    required = {"task": "udpos", "data_dir": "d", "output_dir": "o"}
    assert TrainConfig.from_dict(required).method == "finetune"  # configs saved before methods existed read as before
    assert TrainConfig(**required, method="xmixup", xmixup_parallel=["de"]).to_dict()["xmixup_parallel"] == ["de"]
    for kwargs, option in [
        ({"xmixup_alpha": 0.5}, "--xmixup-alpha: is an X-Mixup option"),
        ({"method": "xmixup"}, "--xmixup-parallel"),
        ({"method": "mixup"}, "--method"),
        ({"method": "xmixup", "xmixup_parallel": ["de"], "xmixup_alpha": 1.5}, "--xmixup-alpha"),
        ({"method": "xmixup", "xmixup_parallel": ["de"], "xmixup_layers": [0]}, "--xmixup-layers"),
        ({"method": "xmixup", "xmixup_parallel": ["de"], "xmixup_schedule": "cosine"}, "--xmixup-schedule"),
        ({"method": "xmixup", "xmixup_parallel": ["de"], "xmixup_lambda_max": 0}, "--xmixup-lambda-max"),
    ]:
        with pytest.raises(DlfaInputError, match=option):
            TrainConfig(**required, **kwargs)


# -- end to end ------------------------------------------------------------------------------------------------

EN = [("the cat sat on the mat", "a cat is on a mat", "entailment"),
      ("the dog sat on the mat", "a cat is on a mat", "contradiction"),
      ("a dog is on a mat", "the dog sat", "neutral"),
      ("the cat is a cat", "a dog", "contradiction")]
DE = [("die Katze sass", "eine Katze", "entailment"), ("der Hund sass", "eine Katze", "contradiction"),
      ("ein Hund", "der Hund sass", "neutral"), ("die Katze", "ein Hund", "contradiction")]
FR = [("le chat", "un chat", "entailment"), ("le chien", "un chat", "contradiction"),
      ("un chien", "le chien", "neutral"), ("le chat est", "un chien", "contradiction")]


@pytest.fixture
def tiny_xnli_dir(tmp_path):
    folder = tmp_path / "xnli"
    folder.mkdir()
    for lang, rows in (("en", EN), ("de", DE), ("fr", FR)):
        numbered = [(f"{a} {i}", f"{b} {i}", label) for i in range(5) for a, b, label in rows]  # 20 pairs
        _write(folder / f"dev-{lang}.tsv", numbered)
        _write(folder / f"test-{lang}.tsv", [(a + " x", b, label) for a, b, label in rows])
    return folder


def _xmixup_args(model_dir, data_dir, out, *extra):
    return ["train", "--method", "xmixup", "--task", "xnli", "--model", str(model_dir), "--data-dir", str(data_dir),
            "--output", str(out), "--train-split", "dev", "--dev-split", "dev", "--xmixup-parallel", "de,fr",
            "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-3", "--languages", "de,en", "--seed", "5",
            *extra]


def _comparable(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def test_train_and_evaluate_end_to_end(tiny_model_dir, tiny_xnli_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_xmixup_args(tiny_model_dir, tiny_xnli_dir, out, "--eval-every", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "xmixup" and metrics["fuse_layer"] is None
    record = metrics["xmixup"]
    # 20 English dev examples: 2 held out for selection, their translations left out of the pairs.
    assert record["pairs"]["de"] == {"read": 20, "selection": 2, "not_in_training_examples": 0, "evaluation": 0,
                                     "kept": 18}
    assert record["pairs"]["fr"]["kept"] == 18
    assert record["layers"] == [1] and record["alpha"] == 0.4 and record["schedule"] == "inverse_sigmoid"
    history = metrics["selection"]["history"]
    assert [h["step"] for h in history] == [2, 4, 5]  # 36 pairs / 8 per batch
    assert all(0 <= h["xmixup"]["mixed_fraction"] <= 1 for h in history)
    assert metrics["selection"]["held_out_from_training_file"] is True
    for name in ("best/model.safetensors", "best/xmixup.safetensors", "best/xmixup_config.json", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["xmixup"]["pairs"]["de"]["kept"] == 18
    assert not (out / "checkpoint").exists()

    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    for lang in ("de", "en"):
        assert again["languages"][lang]["accuracy"] == pytest.approx(metrics["languages"][lang]["accuracy"])


def test_held_out_examples_and_their_translations_are_not_trained_on(tiny_model_dir, tiny_xnli_dir, tmp_path):
    config = TrainConfig.from_dict({"task": "xnli", "model": str(tiny_model_dir), "data_dir": str(tiny_xnli_dir),
                                    "output_dir": str(tmp_path / "r"), "train_split": "dev", "dev_split": "dev",
                                    "method": "xmixup", "xmixup_parallel": ["de"], "languages": ["de"]})
    recipe = XMixupRecipe(config, show_progress=False)
    try:
        recipe.setup()
        english = [(e.text_a, e.text_b) for e in recipe.task.read(tiny_xnli_dir, "en", "dev")]
        german = [(e.text_a, e.text_b) for e in recipe.task.read(tiny_xnli_dir, "de", "dev")]
        held_out = {english.index((e.text_a, e.text_b)) for e in recipe.dev_examples}
        trained_sources = {english.index((p.source.text_a, p.source.text_b)) for p in recipe.pairs}
        trained_targets = {german.index((p.target.text_a, p.target.text_b)) for p in recipe.pairs}
        assert len(held_out) == 2 and not held_out & trained_sources and not held_out & trained_targets
        assert trained_sources == trained_targets == set(range(20)) - held_out
    finally:
        recipe.cleanup()


def test_pairs_overlapping_evaluation_data_are_dropped_and_eval_files_refused(tiny_model_dir, tiny_xnli_dir,
                                                                              tmp_path, capsys):
    test_de = (tiny_xnli_dir / "test-de.tsv").read_text().splitlines()[0].split("\t")
    parallel = _write(tmp_path / "en-de-translated.tsv", [
        ["new english", "text", "neue", "Texte", "neutral"],
        ["other english", "text", test_de[0], test_de[1], test_de[2]],  # a translation that is a test example
    ])
    out = tmp_path / "run"
    args = _xmixup_args(tiny_model_dir, tiny_xnli_dir, out)
    args[args.index("de,fr")] = f"de={parallel}"
    assert main(args) == 0
    pairs = json.loads((out / "metrics.json").read_text())["xmixup"]["pairs"]["de"]
    assert pairs["evaluation"] == 1 and pairs["kept"] == 1

    args[args.index(f"de={parallel}")] = str(tiny_xnli_dir / "test-de.tsv")
    assert main([*args, "--overwrite"]) == 2
    assert "test-de.tsv: is an evaluation file" in capsys.readouterr().err


@pytest.mark.parametrize("extra,expected", [
    (["--xmixup-layers", "5"], "option --xmixup-layers: mixing blocks must be integers in 1..4"),
    (["--xmixup-parallel", "en"], "'en' is the training language"),
    (["--xmixup-parallel", "ja"], "need exactly one xnli dev file for 'ja'"),
])
def test_bad_xmixup_options(tiny_model_dir, tiny_xnli_dir, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    assert main([*_xmixup_args(tiny_model_dir, tiny_xnli_dir, out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_tagging_line_pairing_and_other_recipes_refuse_xmixup(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "xmixup", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
            str(tiny_udpos_dir), "--output", str(out), "--xmixup-parallel", "de"]
    assert main(args) == 2
    assert ("option --xmixup-parallel: 'de': udpos files of different languages are not translations of each other"
            in capsys.readouterr().err)
    assert not out.exists()
    from dlfa.training.recipe import FinetuneRecipe

    config = TrainConfig(task="udpos", data_dir=str(tiny_udpos_dir), output_dir=str(tmp_path / "run"), method="xmixup",
                         xmixup_parallel=["de"])
    with pytest.raises(DlfaInputError, match="runs method 'finetune', not 'xmixup'"):
        FinetuneRecipe(config).setup()


def test_xmixup_with_dlfa_fusion_and_exact_resume(tiny_model_dir, tiny_xnli_dir, tmp_path, monkeypatch):
    extra = ("--fuse-layer", "2", "--xmixup-layers", "1-2", "--epochs", "2", "--checkpoint-every", "2",
             "--eval-every", "3")
    reference = tmp_path / "reference"
    assert main(_xmixup_args(tiny_model_dir, tiny_xnli_dir, reference, *extra)) == 0
    metrics = _comparable(reference)
    assert metrics["method"] == "xmixup" and metrics["fuse_layer"] == 2 and metrics["xmixup"]["layers"] == [1, 2]
    model = XMixupModel.from_pretrained(reference / "best")
    assert model.model.fusion is not None and set(model.mixers) == {"1", "2"}
    plain = load_dlfa_model(reference / "best")  # best/ of an X-Mixup run is a DLFA model folder too
    assert type(plain).__name__ == "DLFAForSequenceClassification" and plain.config.fuse_layer == 2
    card = (reference / "best" / "README.md").read_text()
    assert "X-Mixup + DLFA D_2" in card and "mixing blocks [1, 2]" in card and "xmixup.safetensors" in card

    # Interrupt right after the second checkpoint (step 4 of 10), then resume.
    original, calls = XMixupRecipe._checkpoint, []

    def interrupt(self, loop):
        original(self, loop)
        calls.append(loop["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(XMixupRecipe, "_checkpoint", interrupt)
    killed = tmp_path / "killed"
    assert main(_xmixup_args(tiny_model_dir, tiny_xnli_dir, killed, *extra)) == 130
    assert calls == [2, 4] and not (killed / "metrics.json").exists()
    monkeypatch.setattr(XMixupRecipe, "_checkpoint", original)
    assert main([*_xmixup_args(tiny_model_dir, tiny_xnli_dir, killed, *extra), "--resume"]) == 0
    assert _comparable(killed) == metrics


# -- tagging (UD-POS, PAN-X): parallel tagging files ---------------------------------------------------------

# English source with UPOS tags, German target with projected tags. The English sentences are not in the tiny
# English dev file (selection) and no side is in de-test.conllu, except the last pair's target.
TAGGED = [
    ("a cat sat", "DET NOUN VERB", "eine Katze sass", "DET NOUN VERB"),
    ("the dog is on the mat", "DET NOUN AUX ADP DET NOUN", "der Hund ist auf der Matte", "DET NOUN AUX ADP DET NOUN"),
    ("a dog sat on a mat .", "DET NOUN VERB ADP DET NOUN PUNCT", "ein Hund sass auf einer Matte .",
     "DET NOUN VERB ADP DET NOUN PUNCT"),
    ("the cat is a cat", "DET NOUN AUX DET NOUN", "die Katze ist eine Katze", "DET NOUN AUX DET NOUN"),
    ("a mat", "DET NOUN", "eine Matte", "DET NOUN"),
    ("the dog sat on a cat", "DET NOUN VERB ADP DET NOUN", "der Hund sass auf einer Katze",
     "DET NOUN VERB ADP DET NOUN"),
    ("a cat and a dog", "DET NOUN CCONJ DET NOUN", "eine Katze und ein Hund", "DET NOUN CCONJ DET NOUN"),
    ("the mat .", "DET NOUN PUNCT", "die Matte .", "DET NOUN PUNCT"),
    ("the dog and the cat .", "DET NOUN CCONJ DET NOUN PUNCT", "der Hund und die Katze .",  # = de-test
     "DET NOUN CCONJ DET NOUN PUNCT"),
]


def _tagging_file(path, target_tags: bool):
    return _write(path, [row if target_tags else row[:3] for row in TAGGED])


def test_parallel_tagging_reader(tmp_path):
    from dlfa.tasks.panx import NER_TAGS
    from dlfa.tasks.udpos import UPOS_TAGS

    pairs = read_parallel_tagging(_tagging_file(tmp_path / "en-de-translated.tsv", True), UPOS_TAGS)
    assert len(pairs) == len(TAGGED) and pairs[0].language == "de" and pairs[0].target_labelled
    assert pairs[1].source.words == ["the", "dog", "is", "on", "the", "mat"]
    assert pairs[1].target.tags == ["DET", "NOUN", "AUX", "ADP", "DET", "NOUN"]
    assert pairs[2].origin.endswith("en-de-translated.tsv:3")

    plain = read_translate_train(_tagging_file(tmp_path / "plain.tsv", False), "udpos", "fr")
    assert plain[0].language == "fr" and plain[0].target.words == ["eine", "Katze", "sass"]
    assert not any(p.target_labelled for p in plain) and plain[0].source.tags == ["DET", "NOUN", "VERB"]

    ner = read_translate_train(_write(tmp_path / "ner.tsv", [["Paris is big", "B-LOC O O", "Paris ist gross"]]),
                               "panx", "de")
    assert ner[0].source.tags == ["B-LOC", "O", "O"] and set(ner[0].source.tags) <= set(NER_TAGS)


@pytest.mark.parametrize("rows,expected", [
    ([["a cat", "DET NOUN", "eine Katze", "DET NOUNS"]], "bad.tsv:1: unknown label 'NOUNS'"),
    ([["a cat", "DET NOUN", "x"], ["a cat", "DET B-LOC", "x"]], "bad.tsv:2: unknown label 'B-LOC'"),
    ([["a cat", "DET", "eine Katze"]], "bad.tsv:1: 1 source tags for 2 source tokens"),
    ([["a cat", "DET NOUN", "eine Katze", "DET NOUN ADJ"]], "bad.tsv:1: 3 target tags for 2 target tokens"),
    ([["a cat", "DET NOUN"]], "bad.tsv:1: expected 3 or 4 tab-separated columns (source tokens, source tags, "
                              "target tokens[, target tags]), found 2"),
    ([["a cat", "DET NOUN", "eine Katze"], ["a cat", "DET NOUN", "eine Katze", "DET NOUN"]],
     "bad.tsv:2: 4 columns where the first row has 3: target tags are given for every row of a file or for none"),
    ([["a cat", "DET NOUN", " "]], "bad.tsv:1: no target tokens"),
    ([], "bad.tsv: no sentence pairs"),
])
def test_parallel_tagging_bad_input(tmp_path, rows, expected):
    from dlfa.tasks.udpos import UPOS_TAGS

    with pytest.raises(DlfaInputError, match=re.escape(expected)):
        read_parallel_tagging(_write(tmp_path / "bad.tsv", rows), UPOS_TAGS)


def test_tagging_pair_features_and_no_target_task_term_without_target_tags(tiny_model_dir, tiny_tokenizer, tmp_path):
    from dlfa.tasks import get_task

    task = get_task("udpos")
    tagged = read_translate_train(_tagging_file(tmp_path / "t.tsv", True), "udpos", "de")[:4]
    untagged = read_translate_train(_tagging_file(tmp_path / "u.tsv", False), "udpos", "de")[:4]
    features = featurize_pairs(task, tagged, tiny_tokenizer, 64)
    # Both sides carry the task's own first-sub-token labels.
    assert [f["labels"] for f in features] == [f["labels"] for f in task.featurize([p.target for p in tagged],
                                                                                  tiny_tokenizer, 64)]
    assert [f["src_labels"] for f in features] == [f["labels"] for f in task.featurize([p.source for p in tagged],
                                                                                      tiny_tokenizer, 64)]
    bare = featurize_pairs(task, untagged, tiny_tokenizer, 64)
    assert [f["input_ids"] for f in bare] == [f["input_ids"] for f in features]
    assert all(set(f["labels"]) == {-100} for f in bare) and bare[0]["src_labels"] == features[0]["src_labels"]
    # A sentence longer than the window keeps its first window on each side, one feature per pair.
    assert len(task.featurize([p.target for p in tagged], tiny_tokenizer, 12)) > 4
    cut = featurize_pairs(task, tagged, tiny_tokenizer, 12)
    assert len(cut) == 4 and all(len(f["input_ids"]) <= 12 and len(f["src_input_ids"]) <= 12 for f in cut)
    assert [f["labels"] for f in cut] == [f["labels"] for f in task.featurize([p.target for p in tagged],
                                                                              tiny_tokenizer, 12)
                                          if f["word_indices"][:1] == [0]]

    torch.manual_seed(0)
    model = XMixupModel(DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=list(task.labels)),
                        XMixupConfig(layers=[4]))
    collator = ParallelCollator(tiny_tokenizer, "token")

    def loss_and_grad(feats):
        batch = collator(feats)
        out = model(**batch, mix=True)
        assert torch.equal(out.logits, out.target_logits)  # unaligned tokens: a pair's prediction is the target's
        losses = xmixup_objective(out, batch["labels"], batch["src_labels"], "token", alpha=0.8)
        grad = torch.autograd.grad(losses.total, out.target_logits, retain_graph=True, allow_unused=True)[0]
        return losses, grad

    losses, grad = loss_and_grad(bare)
    assert losses.target_task is None and losses.kl.item() == 0.0
    assert losses.total.item() == pytest.approx(losses.source_task.item() + losses.mse.item(), rel=1e-6)
    assert grad is None or grad.abs().max().item() == 0.0  # the target's logits take no part in the loss
    labelled, grad = loss_and_grad(features)
    assert labelled.target_task is not None and grad.abs().sum().item() > 0
    assert labelled.task.item() == pytest.approx(0.8 * labelled.source_task.item()
                                                 + 0.2 * labelled.target_task.item(), rel=1e-5)


@pytest.mark.parametrize("target_tags,fuse_layer", [(True, None), (False, None), (False, "2")])
def test_tagging_end_to_end(tiny_model_dir, tiny_udpos_dir, tmp_path, target_tags, fuse_layer):
    parallel = _tagging_file(tmp_path / "en-de.tsv", target_tags)
    out = tmp_path / "run"
    args = ["train", "--method", "xmixup", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
            str(tiny_udpos_dir), "--output", str(out), "--xmixup-parallel", f"de={parallel}", "--languages", "de",
            "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--seed", "3"]
    assert main([*args, *(["--fuse-layer", fuse_layer] if fuse_layer else [])]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "xmixup" and metrics["fuse_layer"] == (int(fuse_layer) if fuse_layer else None)
    record = metrics["xmixup"]
    assert record["layers"] == [4] and record["alpha"] == 0.8  # the authors' tagging settings
    assert record["pairs"]["de"] == {"read": 9, "selection": 0, "not_in_training_examples": 0, "evaluation": 1,
                                     "kept": 8, "labelled_targets": 8 if target_tags else 0}
    (selection,) = metrics["selection"]["history"]  # 8 pairs / 4 per batch: one epoch, one selection
    assert selection["step"] == 2 and (selection["xmixup"]["target_task"] is not None) == target_tags
    assert selection["xmixup"]["kl"] == 0.0 and selection["xmixup"]["mse"] > 0
    assert "f1" in metrics["languages"]["de"] and (out / "best" / "xmixup.safetensors").is_file()


def test_tagging_bad_parallel_file_is_one_line_before_anything_is_written(tiny_model_dir, tiny_udpos_dir, tmp_path,
                                                                          capsys):
    bad = _write(tmp_path / "bad.tsv", [TAGGED[0], ("a cat", "DET", "eine Katze", "DET NOUN")])
    out = tmp_path / "run"
    assert main(["train", "--method", "xmixup", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
                 str(tiny_udpos_dir), "--output", str(out), "--xmixup-parallel", f"de={bad}"]) == 2
    err = capsys.readouterr().err
    assert err == f"dlfa: error: {bad}:2: 1 source tags for 2 source tokens\n" and not out.exists()
