"""X-Mixup as in the authors' code: the in-block mixing operator, lambda and both entropy directions (hand-computed
with an independent loop implementation), sub-word pooling, scheduled sampling, the loss terms, mixup inference,
the data readers, the honest-evaluation rules and tiny end-to-end runs (also with DLFA fusion and resume)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from conftest import build_tiny_tokenizer

from dlfa.cli.main import main
from dlfa.data.parallel import (
    pair_parallel_files,
    read_parallel_tagging,
    read_parallel_tsv,
    read_sentence_translations,
    read_translate_train,
    translate_test_file,
)
from dlfa.errors import DlfaInputError
from dlfa.modeling import load_dlfa_model
from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAForSequenceClassification, DLFAForTokenClassification
from dlfa.modeling.modeling_xmixup import (
    MixingRatio,
    XMixupConfig,
    XMixupModel,
    authors_entropy,
    masked_entropy,
    mix_in_block,
    pair_entropy,
    subword_pool,
)
from dlfa.tasks.xnli import LABEL_ALIASES, NLI_LABELS
from dlfa.training.config import TrainConfig
from dlfa.training.xmixup import (
    ParallelCollator,
    XMixupRecipe,
    attach_soft_labels,
    draw_gold,
    evaluation_features,
    featurize_pairs,
    gold_probability,
    keras_kl,
    model_inputs,
    pair_objective,
    pooled_tagging_features,
    predict_xmixup,
    tagging_objective,
    teacher_soft_labels,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and two threads on a busy 2-core machine are 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- an independent reference: the authors' operator written out with Python loops -----------------------------


def _linear(weight, bias, x):
    return [sum(w * xi for w, xi in zip(row, x, strict=True)) + b for row, b in zip(weight, bias, strict=True)]


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def _layer_norm(x, gamma, beta, eps):
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + eps) * g + b for v, g, b in zip(x, gamma, beta, strict=True)]


def _tolist(linear):
    return linear.weight.tolist(), linear.bias.tolist()


def reference_mix(block, target, source, source_mask, w, b, lambda_0=0.5, mode="masked", target_mask=None):
    """lambda, H and the mixed states of one sentence by the equations of docs/xmixup.md, with loops."""
    attention = block.attention
    heads, size = attention.self.num_attention_heads, attention.self.attention_head_size
    target_mask = target_mask or [1] * len(target)
    q = [_linear(*_tolist(attention.self.query), x) for x in target]
    k = [_linear(*_tolist(attention.self.key), x) for x in source]
    v = [_linear(*_tolist(attention.self.value), x) for x in source]
    real_s = [j for j, m in enumerate(source_mask) if m]
    real_t = [i for i, m in enumerate(target_mask) if m]
    context = [[0.0] * (heads * size) for _ in target]
    h_ts, h_st = [], []
    for h in range(heads):
        cols = range(h * size, (h + 1) * size)
        scores = [[sum(q[i][c] * k[j][c] for c in cols) / math.sqrt(size) for j in range(len(source))]
                  for i in range(len(target))]
        for i in range(len(target)):
            p = _softmax([scores[i][j] for j in real_s])
            for jj, j in enumerate(real_s):
                for c in cols:
                    context[i][c] += p[jj] * v[j][c]
        if mode == "masked":
            h_ts += [_entropy(_softmax([scores[i][j] for j in real_s])) for i in real_t]
            h_st += [_entropy(_softmax([scores[i][j] for i in real_t])) for j in real_s]
        else:  # CE(masked softmax, softmax(scores * mask)) over every row, padding rows included
            for i in range(len(target)):
                p = _softmax([scores[i][j] if source_mask[j] else scores[i][j] - 10000 for j in range(len(source))])
                logq = [math.log(x) for x in _softmax([scores[i][j] * source_mask[j] for j in range(len(source))])]
                h_ts.append(-sum(a * c for a, c in zip(p, logq, strict=True)))
            for j in range(len(source)):
                p = _softmax([scores[i][j] if target_mask[i] else scores[i][j] - 10000 for i in range(len(target))])
                logq = [math.log(x) for x in _softmax([scores[i][j] * target_mask[i] for i in range(len(target))])]
                h_st.append(-sum(a * c for a, c in zip(p, logq, strict=True)))
    entropy_ts, entropy_st = sum(h_ts) / len(h_ts), sum(h_st) / len(h_st)
    entropy = entropy_ts + entropy_st
    lam = lambda_0 / (1 + math.exp(-(w * entropy + b)))
    out = attention.output
    mixed = []
    for i, x in enumerate(target):
        o = _linear(*_tolist(out.dense), context[i])
        mixed.append(_layer_norm([lam * a + (1 - lam) * t for a, t in zip(o, x, strict=True)],
                                 out.LayerNorm.weight.tolist(), out.LayerNorm.bias.tolist(), out.LayerNorm.eps))
    return {"lambda": lam, "entropy": entropy, "entropy_ts": entropy_ts, "entropy_st": entropy_st, "mixed": mixed}


def _bert_block(hidden=4, heads=2, seed=3):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(seed)
    block = BertLayer(BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=8,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.7)  # far from uniform attention, so that every term matters
    return block


def test_in_block_operator_lambda_and_entropy_by_hand():
    block = _bert_block()
    torch.manual_seed(4)
    target, source = torch.randn(1, 3, 4), torch.randn(1, 4, 4)
    source_mask = [1, 1, 1, 0]  # a padding key must take no attention
    ratio = MixingRatio(0.5)
    with torch.no_grad():
        ratio.entropy_dense.weight.fill_(0.7)
        ratio.entropy_dense.bias.fill_(-0.3)
    mixed, stats = mix_in_block(block.attention, target, torch.ones(1, 3), source, torch.tensor([source_mask]), ratio)
    expected = reference_mix(block, target[0].tolist(), source[0].tolist(), source_mask, 0.7, -0.3)

    assert stats.entropy.item() == pytest.approx(expected["entropy"], rel=1e-5)
    assert stats.lam.item() == pytest.approx(expected["lambda"], rel=1e-5)
    for row, want in zip(mixed[0].tolist(), expected["mixed"], strict=True):
        assert row == pytest.approx(want, rel=1e-4, abs=1e-5)
    # The two directions differ here, so dropping either would change H (and lambda) by a visible amount.
    assert abs(expected["entropy_ts"] - expected["entropy_st"]) > 0.05 and expected["entropy_st"] > 0.05


def test_authors_entropy_by_hand_including_padding_rows():
    block = _bert_block(seed=5)
    torch.manual_seed(6)
    target, source = torch.randn(1, 3, 4), torch.randn(1, 4, 4)
    target_mask, source_mask = [1, 1, 0], [1, 1, 1, 0]
    ratio = MixingRatio(0.5)
    _, stats = mix_in_block(block.attention, target, torch.tensor([target_mask]), source,
                            torch.tensor([source_mask]), ratio, entropy_mode="authors")
    expected = reference_mix(block, target[0].tolist(), source[0].tolist(), source_mask, 1.0, 0.0, mode="authors",
                             target_mask=target_mask)
    assert stats.entropy.item() == pytest.approx(expected["entropy"], rel=1e-5)
    assert stats.lam.item() == pytest.approx(0.5 / (1 + math.exp(-expected["entropy"])), rel=1e-6)
    masked = reference_mix(block, target[0].tolist(), source[0].tolist(), source_mask, 1.0, 0.0,
                           target_mask=target_mask)
    assert abs(masked["entropy"] - expected["entropy"]) > 1e-3  # the padding rows and keys do count in theirs


def test_pair_entropy_adds_both_directions():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 5) * 2  # (batch, heads, target, source)
    t_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for mode in ("masked", "authors"):
        one = masked_entropy(scores, s_mask, t_mask) if mode == "masked" else authors_entropy(scores, s_mask)
        two = (masked_entropy(scores.transpose(-1, -2), t_mask, s_mask) if mode == "masked"
               else authors_entropy(scores.transpose(-1, -2), t_mask))
        assert torch.allclose(pair_entropy(scores, t_mask, s_mask, mode), one + two)
        assert (two > 0.1).all() and (one - two).abs().min() > 1e-3


def test_masked_entropy_by_hand_and_padding_invariant():
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 3, 4)
    key_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    query_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    entropy = masked_entropy(scores, key_mask, query_mask)
    for b in range(2):
        keys, queries = int(key_mask[b].sum()), int(query_mask[b].sum())
        rows = [_entropy(_softmax(scores[b, h, q, :keys].tolist())) for h in range(2) for q in range(queries)]
        assert entropy[b].item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    noisy = scores.clone()
    noisy[0, :, :, 3] = 100.0
    noisy[0, :, 2, :] = -50.0
    assert masked_entropy(noisy, key_mask, query_mask).tolist() == pytest.approx(entropy.tolist())


def test_lambda_is_half_sigmoid_of_entropy_at_the_start():
    ratio = MixingRatio(0.5)  # the authors' Dense(1): kernel 1, bias 0
    entropy = torch.tensor([0.0, 1.0, 3.0, 50.0])
    assert ratio(entropy).tolist() == pytest.approx([0.25, 0.5 / (1 + math.exp(-1)), 0.5 / (1 + math.exp(-3)), 0.5])


# -- the operator inside the encoder ---------------------------------------------------------------------------


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
    return {"input_ids": ids, "attention_mask": mask, "src_input_ids": src, "src_attention_mask": src_mask}


def test_mixing_happens_inside_the_block_before_its_feed_forward(tiny_xmixup):
    """Block 1's output in the target pass is FFN(mix(a_t, a_s)) with a_s the source's attention sub-layer output."""
    tiny_xmixup.eval()
    batch = _pair_batch()
    encoder = tiny_xmixup.model.encoder
    block = encoder.encoder.layer[0]
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.setdefault("outputs", []).append(out))
    out = tiny_xmixup(**batch)
    handle.remove()
    source_out, target_out = seen["outputs"]
    mask = batch["attention_mask"]
    with torch.no_grad():
        embed_t = encoder.embeddings(input_ids=batch["input_ids"])
        embed_s = encoder.embeddings(input_ids=batch["src_input_ids"])
        add_t = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        add_s = (1.0 - batch["src_attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        a_t = block.attention(embed_t, add_t)[0]
        a_s = block.attention(embed_s, add_s)[0]
        mixed, stats = mix_in_block(block.attention, a_t, mask, a_s, batch["src_attention_mask"],
                                    tiny_xmixup.ratios["1"], tiny_xmixup.xmixup_config.entropy)
        expected = block.feed_forward_chunk(mixed)
    real = mask.bool()
    assert torch.allclose(target_out[real], expected[real], atol=1e-5)
    assert torch.allclose(source_out, block.feed_forward_chunk(a_s), atol=1e-5)  # the source block runs plain
    assert torch.allclose(out.stats[1].lam, stats.lam)


def test_plain_passes_gradients_and_fusion(tiny_xmixup):
    batch = _pair_batch(1)
    out = tiny_xmixup(**batch)
    assert set(out.stats) == {1, 2}
    losses = pair_objective(out, torch.tensor([0, 1, 2]), alpha=0.4)
    losses.total.backward()
    named = dict(tiny_xmixup.named_parameters())
    for name in ("model.dlfa.encoder.embeddings.word_embeddings.weight",
                 "model.dlfa.encoder.encoder.layer.0.output.dense.weight",
                 "model.dlfa.encoder.encoder.layer.0.attention.self.key.weight",
                 "model.dlfa.fusion.gate.local_branch.down.weight", "model.classifier.out_proj.weight",
                 "ratios.1.entropy_dense.weight", "ratios.2.entropy_dense.bias"):
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    tiny_xmixup.eval()
    plain = tiny_xmixup.model(batch["input_ids"], batch["attention_mask"]).logits
    alone = tiny_xmixup(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(alone.logits, plain) and not alone.stats  # the target alone is the DLFA model
    features, _ = tiny_xmixup.model.encode(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(alone.target_rep, features[:, 0])  # the MSE term reads [CLS] (sequence_output[:, 0])
    seen = {}
    tiny_xmixup.model.encoder.encoder.layer[1].register_forward_hook(lambda m, a, o: seen.__setitem__("block2", o))
    tiny_xmixup.model.fusion.register_forward_hook(lambda m, args, o: seen.__setitem__("lower", args[1]))
    mixed = tiny_xmixup(**batch)
    assert torch.equal(seen["lower"], seen["block2"])  # D_2 fuses block 2's mixed output
    assert not torch.allclose(mixed.target_logits, plain)
    # A pair's prediction averages the two logits (the authors' mixup inference).
    assert torch.allclose(mixed.logits, (mixed.source_logits + mixed.target_logits) / 2)
    assert torch.equal(tiny_xmixup(batch["input_ids"], batch["attention_mask"]).logits, plain)  # hooks idle again


def test_predict_mixes_features_that_carry_a_source(tiny_xmixup, monkeypatch):
    tiny_xmixup.eval()
    features = [{"input_ids": [0, 7, 8, 2], "label": 1, "src_input_ids": [0, 9, 10, 11, 2]},
                {"input_ids": [0, 12, 2], "label": 0, "src_input_ids": [0, 13, 2]}]
    collator = ParallelCollator(build_tiny_tokenizer(), "sequence")
    seen = []
    original = XMixupModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("src_input_ids"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(XMixupModel, "forward", spy)
    predicted = predict_xmixup(tiny_xmixup, features, collator)
    assert len(seen) == 1 and seen[0].tolist() == [[0, 9, 10, 11, 2], [0, 13, 2, 1, 1]]
    batch = collator(features)
    with torch.no_grad():
        assert predicted == original(tiny_xmixup, **model_inputs(batch, "src_")).logits.argmax(-1).tolist()
    predict_xmixup(tiny_xmixup, [{k: v for k, v in f.items() if not k.startswith("src_")} for f in features],
                   collator)
    assert seen[-1] is None  # no source: the target alone


def test_other_blocks_are_refused_in_one_line():
    from transformers import DistilBertConfig, DistilBertModel, XLMRobertaConfig, XLMRobertaModel

    encoder = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    with pytest.raises(DlfaInputError, match=r"X-Mixup mixes inside BERT-style encoder blocks .*block 1 of this "
                                             r"encoder is a TransformerBlock") as info:
        XMixupModel(DLFAForSequenceClassification(DLFAConfig(encoder=encoder.config, num_labels=3), encoder),
                    XMixupConfig(layers=[1]))
    assert info.value.option == "--model"
    from dlfa.modeling.modeling_xmixup import check_encoder_type

    with pytest.raises(DlfaInputError, match="this model is a distilbert"):
        check_encoder_type(encoder.config)  # the recipe's check, before the run folder exists
    check_encoder_type(XLMRobertaConfig())
    xlmr = XLMRobertaModel(XLMRobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64), add_pooling_layer=False)
    model = XMixupModel(DLFAForSequenceClassification(DLFAConfig(encoder=xlmr.config, num_labels=3), xlmr),
                        XMixupConfig(layers=[2])).eval()
    ids = torch.randint(3, 50, (2, 6))
    out = model(ids, torch.ones_like(ids), src_input_ids=ids, src_attention_mask=torch.ones_like(ids))
    assert set(out.stats) == {2}


# -- sub-word pooling (tagging) --------------------------------------------------------------------------------


def test_subword_pool_by_hand():
    features = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    pool_index = torch.tensor([[-1, 1, 1, 3, -1], [-1, 2, 2, 2, -1]])
    pooled = subword_pool(features, pool_index)
    expected = torch.zeros_like(features)
    expected[0, 1] = features[0, 1] + features[0, 2]
    expected[0, 3] = features[0, 3]
    expected[1, 2] = features[1, 1] + features[1, 2] + features[1, 3]
    assert torch.equal(pooled, expected)


def test_pooled_tagging_features_match_the_task_and_pool_words(tiny_tokenizer):
    from dlfa.data.features import TaggedSentence
    from dlfa.tasks import get_task

    task = get_task("udpos")
    sentences = [TaggedSentence(["the", "Katzen", "sat", "猫が"], ["DET", "NOUN", "VERB", "NOUN"]),
                 TaggedSentence(["Hund"] * 9, ["NOUN"] * 9)]
    for max_length in (64, 10):  # 10: the second sentence is split into windows
        plain = task.featurize(sentences, tiny_tokenizer, max_length)
        pooled = pooled_tagging_features(task, sentences, tiny_tokenizer, max_length)
        assert [f["input_ids"] for f in pooled] == [f["input_ids"] for f in plain]
        assert [f["labels"] for f in pooled] == [f["labels"] for f in plain]
        for feature in pooled:
            encoded = tiny_tokenizer(sentences[feature["sentence_index"]].words, is_split_into_words=True)
            word_of = {}  # window position -> word, by matching the window's pieces in order
            body = [p for p, w in enumerate(encoded.word_ids()) if w in set(feature["word_indices"])]
            for offset, p in enumerate(body, start=1):
                word_of[offset] = encoded.word_ids()[p]
            for position, target in enumerate(feature["pool_index"]):
                if position not in word_of:
                    assert target == -1  # special tokens are not pooled
                else:
                    assert word_of[target] == word_of[position] and feature["labels"][target] != -100
    first = pooled_tagging_features(task, sentences, tiny_tokenizer, 10, first_window=True)
    assert [f["sentence_index"] for f in first] == [0, 1]


def test_tagging_head_pools_drops_once_and_scales_the_representation(tiny_model_dir):
    torch.manual_seed(0)
    model = XMixupModel(DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=["a", "b", "c", "d", "e"]),
                        XMixupConfig(layers=[4], max_length=20)).eval()
    features = torch.randn(1, 6, 32)
    pool_index = torch.tensor([[-1, 1, 1, 3, 4, -1]])
    logits, rep = model.head_outputs(features, pool_index)
    pooled = torch.zeros_like(features)
    pooled[0, 1] = features[0, 1] + features[0, 2]
    pooled[0, 3], pooled[0, 4] = features[0, 3], features[0, 4]
    assert torch.allclose(logits, model.model.classifier(pooled), atol=1e-6)
    assert torch.allclose(rep, features[0, 1:5].sum(0, keepdim=True) / 18, atol=1e-6)  # / (max_length - 2)
    with pytest.raises(ValueError, match="pool_index"):
        model.head_outputs(features, None)


# -- scheduled sampling ----------------------------------------------------------------------------------------


def test_schedule_values_and_draws():
    k = 1000.0  # the authors' p_k
    assert gold_probability(0, 10_000, "inverse_sigmoid", k) == pytest.approx(1000 / 1001)
    assert gold_probability(round(k * math.log(k)), 10_000, "inverse_sigmoid", k) == pytest.approx(0.5, abs=1e-3)
    assert gold_probability(20_000, 10_000, "inverse_sigmoid", k) == pytest.approx(k / (k + math.exp(20)))
    values = [gold_probability(s, 140, "inverse_sigmoid", 10.0) for s in range(141)]
    assert values == sorted(values, reverse=True) and values[0] > 0.9 and values[-1] < 0.01  # gold first, then BT
    assert [gold_probability(s, 4, "linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert gold_probability(99, 4, "constant") == 1.0
    assert gold_probability(10**9, 10, "inverse_sigmoid", 2.0) == 0.0  # no overflow
    assert [draw_gold(3, s, 0, 0.5) for s in range(50)] == [draw_gold(3, s, 0, 0.5) for s in range(50)]
    assert sum(draw_gold(0, s, 0, 0.3) for s in range(4000)) / 4000 == pytest.approx(0.3, abs=0.03)
    assert all(draw_gold(1, s, 0, 1.0) for s in range(100)) and not any(draw_gold(1, s, 0, 0.0) for s in range(100))


# -- the loss terms --------------------------------------------------------------------------------------------


def _output(source_logits, target_logits, source_rep, target_rep):
    from dlfa.modeling.modeling_xmixup import XMixupOutput

    return XMixupOutput(logits=target_logits, target_logits=target_logits, target_rep=target_rep,
                        source_logits=source_logits, source_rep=source_rep)


def test_pair_objective_by_hand():
    source = torch.tensor([[3.0, 0.0, 0.0], [0.2, -0.1, 0.4]])
    target = torch.tensor([[-30.0, 0.0, 1.0], [1.0, 0.5, -0.5]])  # p_target(0) ~ 1e-13: keras' clipping matters
    rep_s, rep_t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, 2.5], [1.0, 1.0]])
    labels = torch.tensor([0, 2])
    losses = pair_objective(_output(source, target, rep_s, rep_t), labels, alpha=0.4, kl_weight=0.5, mse_weight=2.0)

    def ce(row, label):
        return -math.log(_softmax(row)[label])

    def kl(y, p):
        y = [min(max(x, 1e-7), 1.0) for x in _softmax(y)]
        p = [min(max(x, 1e-7), 1.0) for x in _softmax(p)]
        return sum(a * math.log(a / b) for a, b in zip(y, p, strict=True))

    per_example = []
    for i in range(2):
        task = 0.4 * ce(source[i].tolist(), int(labels[i])) + 0.6 * ce(target[i].tolist(), int(labels[i]))
        mse = sum((a - b) ** 2 for a, b in zip(rep_s[i].tolist(), rep_t[i].tolist(), strict=True)) / 2
        per_example.append(task + 0.5 * kl(source[i].tolist(), target[i].tolist()) + 2.0 * mse)
    assert losses.total.item() == pytest.approx(sum(per_example) / 2, rel=1e-5)
    assert losses.kl.item() == pytest.approx(sum(kl(source[i].tolist(), target[i].tolist()) for i in range(2)) / 2,
                                             rel=1e-5)
    assert keras_kl(source, source).abs().max().item() < 1e-6
    # Both distributions are clipped: y = (1, 9e-14, 9e-14) and p = (1, 9e-14, 9e-27) give exactly 0, not 3e-12.
    assert keras_kl(torch.tensor([[30.0, 0.0, 0.0]]), torch.tensor([[30.0, 0.0, -30.0]])).item() == 0.0
    # KL(source || target), not the reverse.
    assert keras_kl(source, target).tolist() != pytest.approx(keras_kl(target, source).tolist(), rel=1e-3)


def test_tagging_objective_by_hand():
    torch.manual_seed(0)
    target_logits, source_logits = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    target_logits[1, 2] = torch.tensor([10.0, 0.0, -20.0])  # p(2) ~ 1e-13: the authors' + 1e-6 matters
    soft = torch.zeros(2, 4, 3)
    soft[0, 1] = torch.tensor([0.7, 0.2, 0.1])
    soft[1, 2] = torch.tensor([0.0, 0.0, 1.0])
    soft[1, 3] = torch.tensor([0.1, 0.1, 0.1])  # sums to 0.3: not an active row (the authors' > 0.5)
    source_labels = torch.tensor([[-100, 2, 0, -100], [-100, 1, -100, -100]])
    rep_s, rep_t = torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    out = _output(source_logits, target_logits, rep_s, rep_t)
    losses = tagging_objective(out, source_labels, soft, alpha=0.8, mse_weight=1.0)

    soft_terms = []
    for b, t in ((0, 1), (1, 2)):
        p = _softmax(target_logits[b, t].tolist())
        soft_terms.append(-sum(q * math.log(x + 1e-6) for q, x in zip(soft[b, t].tolist(), p, strict=True)))
    target_task = sum(soft_terms) / 2
    source_terms = [-math.log(_softmax(source_logits[b, t].tolist())[int(source_labels[b, t])])
                    for b in range(2) for t in range(4) if source_labels[b, t] != -100]
    source_task = sum(source_terms) / len(source_terms)
    mse = ((1.0 + 0.0) / 2 + (1.0 + 1.0) / 2) / 2
    assert losses.target_task.item() == pytest.approx(target_task, rel=1e-5)
    assert losses.source_task.item() == pytest.approx(source_task, rel=1e-5)
    assert losses.total.item() == pytest.approx(0.8 * source_task + 0.2 * target_task + mse, rel=1e-5)
    assert losses.kl.item() == 0.0
    back = tagging_objective(out, None, soft, alpha=0.8)  # a back-translated source: the target term alone
    assert back.source_task is None and back.total.item() == pytest.approx(target_task + mse, rel=1e-5)


# -- persistence -------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_and_refusals(tiny_xmixup, tmp_path):
    from dlfa.io import read_checksums

    with torch.no_grad():
        tiny_xmixup.ratios["1"].entropy_dense.bias.fill_(0.25)
    tiny_xmixup.save_pretrained(tmp_path / "m")
    again = XMixupModel.from_pretrained(tmp_path / "m")
    for name, tensor in tiny_xmixup.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert again.xmixup_config == tiny_xmixup.xmixup_config
    assert load_dlfa_model(tmp_path / "m").config.fuse_layer == 2
    assert set(read_checksums(tmp_path / "m" / "checksums.json")) == {"model.safetensors", "xmixup.safetensors"}

    weights = tmp_path / "m" / "xmixup.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(DlfaInputError, match="does not match its sha256"):
        XMixupModel.from_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "xmixup_config.json"
    config.write_text(json.dumps({"layers": [1], "num_heads": 4}))  # a folder of the earlier variant
    with pytest.raises(DlfaInputError, match="earlier X-Mixup variant"):
        XMixupModel.from_pretrained(tmp_path / "m")


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
    with pytest.raises(DlfaInputError, match=r"dev-de.tsv:2: label 'neutral' differs from 'contradiction'"):
        pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES)
    _write(de, [["die Katze", "eine Katze", "entailment"]])
    with pytest.raises(DlfaInputError, match=r"dev-en.tsv:2: the files are not line-parallel: 2 rows"):
        pair_parallel_files(en, de, NLI_LABELS, LABEL_ALIASES)


def test_sentence_translations_and_translate_test_lookup(tmp_path):
    from dlfa.data.features import TaggedSentence
    from dlfa.tasks.base import SentencePair

    originals = [SentencePair("a", "b", "entailment"), SentencePair("c", "d", "neutral")]
    path = _write(tmp_path / "test-de-en-translated.tsv", [["A", "B", "entailment"], ["C", "D", "neutral"]])
    assert read_sentence_translations(path, "xnli", originals) == [SentencePair("A", "B", "entailment"),
                                                                   SentencePair("C", "D", "neutral")]
    two = _write(tmp_path / "two.tsv", [["A", "B"], ["C", "D"]])
    assert [t.label for t in read_sentence_translations(two, "xnli", originals)] == ["entailment", "neutral"]
    _write(path, [["A", "B", "entailment"], ["C", "D", "contradiction"]])
    with pytest.raises(DlfaInputError, match=r"test-de-en-translated.tsv:2: label 'contradiction' differs"):
        read_sentence_translations(path, "xnli", originals)
    with pytest.raises(DlfaInputError, match="1 translations for 2 examples"):
        read_sentence_translations(_write(tmp_path / "one.tsv", [["A", "B"]]), "xnli", originals)
    tagged = _write(tmp_path / "tagged.txt", [["the cat sat"]])
    (sentence,) = read_sentence_translations(tagged, "udpos", [TaggedSentence(["x"], ["NOUN"])])
    assert sentence.words == ["the", "cat", "sat"]
    assert translate_test_file(tmp_path, "de", "test").name == "test-de-en-translated.tsv"
    _write(tmp_path / "de.tsv", [["x", "y"]])
    with pytest.raises(DlfaInputError, match="several translate-test files for 'de'"):
        translate_test_file(tmp_path, "de", "test")
    assert translate_test_file(tmp_path, "fr", "test") is None


def test_options_validation(tmp_path):
    base = {"task": "xnli", "data_dir": "d", "output_dir": "o", "method": "xmixup", "xmixup_parallel": ["de"]}
    from dlfa.training.xmixup import back_translation_files, resolve_xmixup_defaults

    config = TrainConfig(**base, xmixup_back_translation=["de=a.tsv"])
    assert resolve_xmixup_defaults(config, "sequence").xmixup_entropy == "authors"

    assert back_translation_files(config) == {"de": "a.tsv"}
    for kwargs, option in [({"xmixup_entropy": "exact"}, "--xmixup-entropy"),
                           ({"xmixup_back_translation": ["a.tsv"]}, "--xmixup-back-translation"),
                           ({"xmixup_back_translation": ["de=a", "de=b"]}, "--xmixup-back-translation"),
                           ({"xmixup_translate_test": " "}, "--xmixup-translate-test")]:
        with pytest.raises(DlfaInputError, match=option):
            TrainConfig(**base, **kwargs)
    with pytest.raises(DlfaInputError, match="--xmixup-teacher: is an X-Mixup option"):
        TrainConfig(task="udpos", data_dir="d", output_dir="o", xmixup_teacher="t")


# -- end to end: XNLI-shaped pairs --------------------------------------------------------------------------------

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


def _config(model_dir, data_dir, out, **extra):
    return TrainConfig.from_dict({"task": "xnli", "model": str(model_dir), "data_dir": str(data_dir),
                                  "output_dir": str(out), "train_split": "dev", "dev_split": "dev", "epochs": 1,
                                  "batch_size": 8, "learning_rate": 1e-3, "languages": ["de", "en", "fr"],
                                  "seed": 5, "method": "xmixup", "xmixup_parallel": ["de", "fr"], **extra})


def _comparable(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def test_train_and_evaluate_end_to_end_target_only(tiny_model_dir, tiny_xnli_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_xmixup_args(tiny_model_dir, tiny_xnli_dir, out, "--eval-every", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "xmixup" and metrics["fuse_layer"] is None
    record = metrics["xmixup"]
    assert record["pairs"]["de"] == {"read": 20, "selection": 2, "not_in_training_examples": 0, "evaluation": 0,
                                     "kept": 18}
    assert record["layers"] == [1] and record["alpha"] == 0.4 and record["scheduled_sampling"]["k"] == 1000.0
    assert record["scheduled_sampling"]["active"] is False  # no back-translations: every batch uses the gold source
    assert record["inference"] == {"translate_test": None, "mixup": [], "target_only": ["de", "en"],
                                   "selection": "target-only"}
    assert {metrics["languages"][lang]["inference"] for lang in ("de", "en")} == {"target-only"}
    history = metrics["selection"]["history"]
    assert [h["step"] for h in history] == [2, 4, 5]  # 36 pairs / 8 per batch
    assert all(h["xmixup"]["gold_fraction"] == 1.0 and 0 < h["xmixup"]["lambda"] < 0.5 for h in history)
    for name in ("best/model.safetensors", "best/xmixup.safetensors", "best/xmixup_config.json", "config.json"):
        assert (out / name).is_file(), name
    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    for lang in ("de", "en"):
        assert again["languages"][lang]["accuracy"] == pytest.approx(metrics["languages"][lang]["accuracy"])
        assert again["languages"][lang]["inference"] == "target-only"


def _record_training_sources(monkeypatch) -> list:
    """The ``src_input_ids`` of every training forward of an X-Mixup model, in order (the batch's source)."""
    sources = []
    original = XMixupModel.forward

    def spy(self, *args, **kwargs):
        if self.training:
            sources.append(kwargs.get("src_input_ids"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(XMixupModel, "forward", spy)
    return sources


def test_back_translations_scheduled_sampling_and_mixup_inference(tiny_model_dir, tiny_xnli_dir, tmp_path,
                                                                  monkeypatch):
    """Every batch is mixed; the source is gold or back-translated by the schedule's draws; languages with a
    translate-test file are scored by mixing with it and averaging the pair's logits."""
    en_rows = (tiny_xnli_dir / "dev-en.tsv").read_text().splitlines()
    # Back-translations are the English rows marked with the word "gato", so a batch shows which source it used.
    back = {lang: _write(tmp_path / f"bt-{lang}.tsv", [["gato " + r.split("\t")[0], r.split("\t")[1]]
                                                       for r in en_rows]) for lang in ("de", "fr")}
    folder = tmp_path / "translate-test"
    folder.mkdir()
    _write(folder / "test-de-en-translated.tsv", [r.split("\t") for r in
                                                  (tiny_xnli_dir / "test-en.tsv").read_text().splitlines()])
    options = {"xmixup_back_translation": [f"{k}={v}" for k, v in back.items()], "xmixup_translate_test": str(folder)}
    original = XMixupModel.forward
    sources = _record_training_sources(monkeypatch)
    out = tmp_path / "run"
    recipe = XMixupRecipe(_config(tiny_model_dir, tiny_xnli_dir, out, xmixup_schedule_k=2.0, **options),
                          show_progress=False)
    metrics = recipe.run()
    assert len(sources) == recipe.total_steps == 5 and all(s is not None for s in sources)  # every batch mixed
    expected = [draw_gold(5, step, 0, gold_probability(step, 5, "inverse_sigmoid", 2.0)) for step in range(5)]
    assert 0 < sum(expected) < 5  # both kinds occur, so a swapped or inverted choice is visible
    gato = recipe.tokenizer.convert_tokens_to_ids("▁gato")
    assert [not bool((s == gato).any(dim=1).all()) for s in sources] == expected  # gold where drawn, else BT
    record = metrics["xmixup"]
    assert record["scheduled_sampling"]["active"] is True
    (selection,) = metrics["selection"]["history"]
    assert selection["xmixup"]["gold_fraction"] == pytest.approx(sum(expected) / 5)
    assert record["inference"]["mixup"] == ["de", "en"] and record["inference"]["target_only"] == ["fr"]
    assert record["inference"]["selection"] == "mixup (English with itself)"
    assert [metrics["languages"][lang]["inference"] for lang in ("de", "en", "fr")] == ["mixup", "mixup", "target-only"]

    # The scores are those of mixing each German test pair with its English translation and averaging logits.
    monkeypatch.setattr(XMixupModel, "forward", original)
    model = XMixupModel.from_pretrained(out / "best").eval()
    from dlfa.tasks import get_task

    task = get_task("xnli")
    de = task.read(tiny_xnli_dir, "de", "test")
    en = task.read(tiny_xnli_dir, "en", "test")
    features = evaluation_features(task, de, en, recipe.tokenizer, 128)
    collator = ParallelCollator(recipe.tokenizer, "sequence", pad_to=128)  # the authors' entropy: 128-token rows
    batch = collator(features)
    with torch.no_grad():
        both = model(**model_inputs(batch, "src_"))
        alone = model(**model_inputs(batch, None))
    expected_accuracy = 100 * sum(int(p) == task.label_to_id[e.label] for p, e in
                                  zip(both.logits.argmax(-1).tolist(), de, strict=True)) / len(de)
    assert metrics["languages"]["de"]["accuracy"] == pytest.approx(expected_accuracy)
    assert torch.allclose(both.logits, (both.source_logits + both.target_logits) / 2)
    # English is mixed with itself (the authors' English test).
    en_features = evaluation_features(task, en, en, recipe.tokenizer, 128)
    with torch.no_grad():
        en_logits = model(**model_inputs(collator(en_features), "src_")).logits
    en_accuracy = 100 * sum(int(p) == task.label_to_id[e.label] for p, e in
                            zip(en_logits.argmax(-1).tolist(), en, strict=True)) / len(en)
    assert metrics["languages"]["en"]["accuracy"] == pytest.approx(en_accuracy)
    assert not torch.allclose(both.target_logits, alone.logits)
    assert predict_xmixup(model, features, collator) == both.logits.argmax(-1).tolist()

    assert main(["evaluate", "--run", str(out), "--languages", "de", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["languages"]["de"]["inference"] == "target-only"
    from dlfa.configs import EvaluateConfig
    from dlfa.evaluation.run_eval import evaluate_run

    mixed = evaluate_run(EvaluateConfig(run=str(out), languages=["de", "fr"], translate_test=str(folder)))
    assert mixed["languages"]["de"]["accuracy"] == pytest.approx(metrics["languages"]["de"]["accuracy"])
    assert [mixed["languages"][x]["inference"] for x in ("de", "fr")] == ["mixup", "target-only"]



def test_without_back_translations_every_batch_mixes_with_the_gold_source(tiny_model_dir, tiny_xnli_dir, tmp_path,
                                                                         monkeypatch):
    """The schedule only chooses between gold and back-translated sources: without back-translations every batch
    is mixed with its gold source, however low the schedule's p has fallen (k = 0.5: p < 0.1 after two steps)."""
    sources = _record_training_sources(monkeypatch)
    recipe = XMixupRecipe(_config(tiny_model_dir, tiny_xnli_dir, tmp_path / "r", languages=["de"],
                                  xmixup_schedule_k=0.5), show_progress=False)
    metrics = recipe.run()
    assert len(sources) == recipe.total_steps == 5 and all(s is not None for s in sources)
    assert gold_probability(4, 5, "inverse_sigmoid", 0.5) < 0.01
    assert metrics["selection"]["history"][-1]["xmixup"]["gold_fraction"] == 1.0

@pytest.mark.parametrize("entropy", ["authors", "masked"])
def test_authors_entropy_pads_every_row_to_max_length(tiny_model_dir, tiny_xnli_dir, tmp_path, entropy):
    recipe = XMixupRecipe(_config(tiny_model_dir, tiny_xnli_dir, tmp_path / "r", max_length=40, xmixup_entropy=entropy),
                          show_progress=False)
    try:
        recipe.setup()
        batch = next(iter(recipe.loader))
        lengths = {batch["input_ids"].shape[1], batch["src_input_ids"].shape[1]}
        assert lengths == {40} if entropy == "authors" else max(lengths) < 40  # masked: dynamic padding
        model = recipe.accelerator.unwrap_model(recipe.model)
        assert model.xmixup_config.entropy == entropy
    finally:
        recipe.cleanup()


def test_english_self_pairs_and_held_out_examples(tiny_model_dir, tiny_xnli_dir, tmp_path):
    config = _config(tiny_model_dir, tiny_xnli_dir, tmp_path / "r", xmixup_parallel=["en", "de"], languages=["de"])
    recipe = XMixupRecipe(config, show_progress=False)
    try:
        recipe.setup()
        english = [(e.text_a, e.text_b) for e in recipe.task.read(tiny_xnli_dir, "en", "dev")]
        german = [(e.text_a, e.text_b) for e in recipe.task.read(tiny_xnli_dir, "de", "dev")]
        held_out = {english.index((e.text_a, e.text_b)) for e in recipe.dev_examples}
        de_pairs = [p for p in recipe.pairs if p.language == "de"]
        en_pairs = [p for p in recipe.pairs if p.language == "en"]
        assert len(held_out) == 2 and all(p.source == p.target for p in en_pairs)  # the authors' en -> en pairs
        assert {english.index((p.source.text_a, p.source.text_b)) for p in en_pairs} == set(range(20)) - held_out
        assert {german.index((p.target.text_a, p.target.text_b)) for p in de_pairs} == set(range(20)) - held_out
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
    (["--xmixup-parallel", "ja"], "need exactly one xnli dev file for 'ja'"),
])
def test_bad_xmixup_options(tiny_model_dir, tiny_xnli_dir, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    assert main([*_xmixup_args(tiny_model_dir, tiny_xnli_dir, out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_bad_back_translation_and_translate_test_stop_before_writing(tiny_model_dir, tiny_xnli_dir, tmp_path):
    short = _write(tmp_path / "bt.tsv", [["only", "one"]])
    for options, message in [
        ({"xmixup_back_translation": [f"de={short}"]}, "no back-translation for 'fr'"),
        ({"xmixup_back_translation": [f"de={short}", f"fr={short}"]}, "1 translations for 20 examples"),
        ({"xmixup_back_translation": [f"ja={short}"]}, "'ja' is not a parallel language"),
        ({"xmixup_translate_test": str(tmp_path / "missing")}, "translate-test folder not found"),
    ]:
        out = tmp_path / "run"
        with pytest.raises(DlfaInputError, match=message):
            XMixupRecipe(_config(tiny_model_dir, tiny_xnli_dir, out, **options), show_progress=False).run()
        assert not out.exists()


def test_xmixup_with_dlfa_fusion_and_exact_resume(tiny_model_dir, tiny_xnli_dir, tmp_path, monkeypatch):
    extra = ("--fuse-layer", "2", "--xmixup-layers", "1-2", "--epochs", "2", "--checkpoint-every", "2",
             "--eval-every", "3")
    reference = tmp_path / "reference"
    assert main(_xmixup_args(tiny_model_dir, tiny_xnli_dir, reference, *extra)) == 0
    metrics = _comparable(reference)
    assert metrics["method"] == "xmixup" and metrics["fuse_layer"] == 2 and metrics["xmixup"]["layers"] == [1, 2]
    model = XMixupModel.from_pretrained(reference / "best")
    assert model.model.fusion is not None and set(model.ratios) == {"1", "2"}

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
    saved = json.loads((killed / "config.json").read_text())["config"]
    config = TrainConfig.from_dict({**saved, "output_dir": str(killed), "xmixup_entropy": "masked"})
    with pytest.raises(DlfaInputError, match="holds a run with another configuration"):
        XMixupRecipe(config, resume=True).setup()
    assert main([*_xmixup_args(tiny_model_dir, tiny_xnli_dir, killed, *extra), "--resume"]) == 0
    assert _comparable(killed) == metrics


# -- tagging (UD-POS, PAN-X) -----------------------------------------------------------------------------------

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


def _soft(tags: str) -> str:
    from dlfa.tasks.udpos import UPOS_TAGS

    rows = []
    for tag in tags.split():
        values = [0.05 if label == tag else 0.0 for label in UPOS_TAGS]
        values[UPOS_TAGS.index(tag)] = 0.9
        values[UPOS_TAGS.index("X")] += 0.1 if tag != "X" else 0.0
        rows.append(";".join(f"{v:g}" for v in values))
    return " ".join(rows)


def _tagging_file(path, target: str):
    """target: 'tags', 'soft' or 'none'."""
    rows = [row if target == "tags" else row[:3] + ((_soft(row[3]),) if target == "soft" else ()) for row in TAGGED]
    return _write(path, rows)


def test_parallel_tagging_reader_with_tags_soft_labels_or_none(tmp_path):
    from dlfa.tasks.udpos import UPOS_TAGS

    pairs = read_parallel_tagging(_tagging_file(tmp_path / "en-de-translated.tsv", "tags"), UPOS_TAGS)
    assert len(pairs) == len(TAGGED) and pairs[0].language == "de" and pairs[0].target_labelled
    assert pairs[1].target.tags == ["DET", "NOUN", "AUX", "ADP", "DET", "NOUN"] and pairs[1].target_soft is None
    soft = read_parallel_tagging(_tagging_file(tmp_path / "soft.tsv", "soft"), UPOS_TAGS)
    assert soft[0].target.tags == [] and soft[0].target_labelled and len(soft[0].target_soft) == 3
    assert soft[0].target_soft[1][UPOS_TAGS.index("NOUN")] == 0.9 and sum(soft[0].target_soft[1]) == pytest.approx(1)
    plain = read_translate_train(_tagging_file(tmp_path / "plain.tsv", "none"), "udpos", "fr")
    assert not any(p.target_labelled for p in plain) and plain[0].source.tags == ["DET", "NOUN", "VERB"]


@pytest.mark.parametrize("rows,expected", [
    ([["a cat", "DET NOUN", "eine Katze", "DET NOUNS"]], "bad.tsv:1: unknown label 'NOUNS'"),
    ([["a cat", "DET", "eine Katze"]], "bad.tsv:1: 1 source tags for 2 source tokens"),
    ([["a cat", "DET NOUN"]], "bad.tsv:1: expected 3 or 4 tab-separated columns"),
    ([["a cat", "DET NOUN", "eine Katze"], ["a cat", "DET NOUN", "eine Katze", "DET NOUN"]],
     "bad.tsv:2: 4 columns where the first row has 3"),
    ([["a", "DET", "eine", "0.5;0.5"]], "bad.tsv:1: target word 1: 2 soft labels for 17 labels"),
    ([["a", "DET", "eine Katze", ";".join(["0.1"] * 17)]], "bad.tsv:1: target word 1: soft labels must be "
                                                           "non-negative and sum to 1"),
    ([["a", "DET", "eine Katze", ";".join(["1"] + ["0"] * 16)]], "bad.tsv:1: 1 target soft labels for 2 target"),
    ([["a", "DET", "eine", ";".join(["x"] * 17)]], "bad.tsv:1: target word 1: soft labels must be numbers"),
    ([], "bad.tsv: no sentence pairs"),
])
def test_parallel_tagging_bad_input(tmp_path, rows, expected):
    from dlfa.tasks.udpos import UPOS_TAGS

    with pytest.raises(DlfaInputError, match=re.escape(expected)):
        read_parallel_tagging(_write(tmp_path / "bad.tsv", rows), UPOS_TAGS)


def test_tagging_pair_features_soft_labels_and_losses(tiny_model_dir, tiny_tokenizer, tmp_path):
    from dlfa.tasks import get_task

    task = get_task("udpos")
    pairs = read_translate_train(_tagging_file(tmp_path / "s.tsv", "soft"), "udpos", "de")[:4]
    features = featurize_pairs(task, pairs, tiny_tokenizer, 64)
    sources = task.featurize([p.source for p in pairs], tiny_tokenizer, 64)
    assert [f["src_labels"] for f in features] == [f["labels"] for f in sources]
    assert all(set(f["labels"]) == {-100} for f in features)  # the target trains against soft labels only
    attach_soft_labels(features, [p.target_soft for p in pairs], len(task.labels))
    for feature, pair in zip(features, pairs, strict=True):
        placed = [row for row in feature["soft_labels"] if sum(row) > 0.5]
        assert placed == pair.target_soft  # one distribution per word, on its labelled (pooling) position
    cut = featurize_pairs(task, pairs, tiny_tokenizer, 12)  # one (first) window per side
    assert len(cut) == 4 and all(len(f["input_ids"]) <= 12 and len(f["src_input_ids"]) <= 12 for f in cut)

    torch.manual_seed(0)
    model = XMixupModel(DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=list(task.labels)),
                        XMixupConfig(layers=[4]))
    batch = ParallelCollator(tiny_tokenizer, "token")(features)
    assert batch["soft_labels"].shape == (*batch["input_ids"].shape, len(task.labels))
    out = model(**model_inputs(batch, "src_"))
    assert torch.equal(out.logits, out.target_logits) and out.source_logits is not None
    losses = tagging_objective(out, batch["src_labels"], batch["soft_labels"], alpha=0.8)
    grad = torch.autograd.grad(losses.total, out.target_logits, retain_graph=True)[0]
    assert grad.abs().sum() > 0 and losses.kl.item() == 0.0
    assert losses.total.item() == pytest.approx(0.8 * losses.source_task.item() + 0.2 * losses.target_task.item()
                                                + losses.mse.item(), rel=1e-5)


def test_teacher_soft_labels(tiny_model_dir, tiny_tokenizer, tmp_path):
    from dlfa.data.features import TaggedSentence
    from dlfa.tasks import get_task

    task = get_task("udpos")
    torch.manual_seed(1)
    teacher = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=list(task.labels)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    sentences = [TaggedSentence(["der", "Hund", "sass"], []), TaggedSentence(["eine", "Katze"], [])]
    soft = teacher_soft_labels(tmp_path / "teacher", task, sentences, 64)
    features = task.featurize([TaggedSentence(s.words, ["X"] * len(s.words)) for s in sentences], tiny_tokenizer, 64)
    for feature, distributions in zip(features, soft, strict=True):
        ids = torch.tensor([feature["input_ids"]])
        with torch.no_grad():
            logits = teacher(ids, torch.ones_like(ids)).logits[0]
        at = [i for i, label in enumerate(feature["labels"]) if label != -100]
        expected = torch.softmax(logits[at], dim=-1)
        assert torch.allclose(torch.tensor(distributions), expected, atol=1e-6)
    wrong = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=["a", "b", "c"])
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(DlfaInputError, match="the teacher must be a udpos tagging model"):
        teacher_soft_labels(tmp_path / "wrong", task, sentences, 64)


@pytest.mark.parametrize("target,fuse_layer", [("tags", None), ("soft", "2")])
def test_tagging_end_to_end(tiny_model_dir, tiny_udpos_dir, tmp_path, target, fuse_layer):
    parallel = _tagging_file(tmp_path / "en-de.tsv", target)
    out = tmp_path / "run"
    args = ["train", "--method", "xmixup", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
            str(tiny_udpos_dir), "--output", str(out), "--xmixup-parallel", f"de={parallel}", "--languages", "de",
            "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--seed", "3"]
    assert main([*args, *(["--fuse-layer", fuse_layer] if fuse_layer else [])]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["xmixup"]
    assert record["layers"] == [4] and record["alpha"] == 0.8  # the authors' tagging settings
    assert record["pairs"]["de"] == {"read": 9, "selection": 0, "not_in_training_examples": 0, "evaluation": 1,
                                     "kept": 8, "target_labels": "tags (one-hot)" if target == "tags" else "soft (file)"}
    (selection,) = metrics["selection"]["history"]
    assert selection["step"] == 2 and selection["xmixup"]["kl"] == 0.0 and selection["xmixup"]["mse"] > 0
    assert metrics["languages"]["de"]["inference"] == "target-only" and "f1" in metrics["languages"]["de"]
    # dlfa evaluate scores the folder the same way (pooled sub-words, not the plain DLFA head).
    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["languages"]["de"]
    assert again["accuracy"] == pytest.approx(metrics["languages"]["de"]["accuracy"])


def test_tagging_without_target_labels_needs_a_teacher(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    parallel = _tagging_file(tmp_path / "en-de.tsv", "none")
    out = tmp_path / "run"
    base = ["train", "--method", "xmixup", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
            str(tiny_udpos_dir), "--output", str(out), "--languages", "de"]
    assert main([*base, "--xmixup-parallel", f"de={parallel}"]) == 2
    assert "option --xmixup-teacher:" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--xmixup-parallel", "de"]) == 2
    assert "udpos files of different languages are not translations of each other" in capsys.readouterr().err


def test_tagging_mixup_inference_with_a_translate_test_file(tiny_model_dir, tiny_udpos_dir, tmp_path):
    parallel = _tagging_file(tmp_path / "en-de.tsv", "tags")
    folder = tmp_path / "tt"
    folder.mkdir()
    _write(folder / "de.txt", [["the dog and the cat ."]])
    _write(folder / "ja.txt", [["a cat sat"], ["one too many"]])
    config = TrainConfig.from_dict({
        "task": "udpos", "model": str(tiny_model_dir), "data_dir": str(tiny_udpos_dir), "output_dir": str(tmp_path / "r"),
        "languages": ["de", "en"], "epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "seed": 3, "method": "xmixup",
        "xmixup_parallel": [f"de={parallel}"], "xmixup_translate_test": str(folder)})
    metrics = XMixupRecipe(config, show_progress=False).run()
    assert [metrics["languages"][lang]["inference"] for lang in ("de", "en")] == ["mixup", "mixup"]
    config = dataclasses.replace(config, languages=["ja"], output_dir=str(tmp_path / "r2"))
    with pytest.raises(DlfaInputError, match=r"ja.txt: 2 translations for 1 examples"):
        XMixupRecipe(config, show_progress=False).run()



def test_tagging_back_translations_train_the_target_term_alone(tiny_model_dir, tiny_udpos_dir, tmp_path, monkeypatch):
    """Tagging with back-translations: a batch whose source is gold trains alpha CE(source tags) + (1 - alpha)
    SoftCE(target); a back-translated source has no tags, so its batch trains the target term alone, even where
    the rows are padded to one length (the authors' entropy) and the gold tags would fit the back-translation."""
    import dlfa.training.xmixup as xmixup_training

    parallel = _tagging_file(tmp_path / "en-de.tsv", "tags")
    # Back-translations: the English sources with the word "gato" in front, so a batch shows which source it used.
    back = _write(tmp_path / "bt-de.txt", [["gato " + row[0]] for row in TAGGED])
    config = TrainConfig.from_dict({
        "task": "udpos", "model": str(tiny_model_dir), "data_dir": str(tiny_udpos_dir),
        "output_dir": str(tmp_path / "r"), "languages": ["de"], "epochs": 2, "batch_size": 4, "learning_rate": 1e-3,
        "seed": 3, "max_length": 32, "method": "xmixup", "xmixup_parallel": [f"de={parallel}"],
        "xmixup_back_translation": [f"de={back}"], "xmixup_schedule_k": 2.0})
    calls, sources = [], []
    objective, forward = xmixup_training.tagging_objective, XMixupModel.forward

    def spy_objective(output, source_labels, soft_labels, alpha, mse_weight=1.0):
        calls.append(source_labels)
        return objective(output, source_labels, soft_labels, alpha, mse_weight)

    def spy_forward(self, *args, **kwargs):
        if self.training:
            sources.append(kwargs.get("src_input_ids"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(xmixup_training, "tagging_objective", spy_objective)
    monkeypatch.setattr(XMixupModel, "forward", spy_forward)
    recipe = XMixupRecipe(config, show_progress=False)
    metrics = recipe.run()
    steps = recipe.total_steps
    expected = [draw_gold(3, step, 0, gold_probability(step, steps, "inverse_sigmoid", 2.0)) for step in range(steps)]
    assert steps == 4 and 0 < sum(expected) < steps  # both kinds of batch occur
    gato = recipe.tokenizer.convert_tokens_to_ids("▁gato")
    assert [not bool((s == gato).any(dim=1).all()) for s in sources] == expected
    assert all(s.shape[1] == 32 for s in sources)  # padded to max_length: gold tags would fit any source
    assert [labels is not None for labels in calls] == expected  # tags only for the gold English sources
    assert metrics["xmixup"]["scheduled_sampling"]["active"] is True

def test_finetune_recipe_refuses_an_xmixup_config(tiny_udpos_dir, tmp_path):
    from dlfa.training.recipe import FinetuneRecipe

    config = TrainConfig(task="udpos", data_dir=str(tiny_udpos_dir), output_dir=str(tmp_path / "r"), method="xmixup",
                         xmixup_parallel=["de"])
    with pytest.raises(DlfaInputError, match="runs method 'finetune', not 'xmixup'"):
        FinetuneRecipe(config).setup()
