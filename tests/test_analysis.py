"""Analyses: linear CKA and cosine, the similarity command on tiny parallel files, the re-init ablation."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_conllu

from dlfa.analysis.ablate import arm_name, parse_layer_range, reinitialize_layers
from dlfa.analysis.similarity import (
    linear_cka,
    load_analysis_model,
    mean_cosine,
    read_parallel,
    read_pud_sentences,
    sentence_representations,
)
from dlfa.cli.main import main
from dlfa.errors import DlfaInputError
from dlfa.modeling import save_dlfa_model
from dlfa.modeling.modeling_dlfa import DLFAForSequenceClassification, DLFAForTokenClassification

# -- CKA and cosine ----------------------------------------------------------------------------------------------


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("n,d", [(50, 8), (6, 20)])  # feature form (n > d) and Gram form (n < d)
def test_cka_self_is_one_and_invariant_to_rotation_and_scale(n, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, d)) + 0.5 * rng.normal(size=(n, d))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.7 * x @ _orthogonal(d, 1)) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x, 0.2 * y @ _orthogonal(d, 2)) == pytest.approx(base)
    assert linear_cka(x + 5.0, y - 3.0) == pytest.approx(base)  # centring: a shift changes nothing
    assert linear_cka(y, x) == pytest.approx(base)


def test_cka_hand_checked():
    # 1-D: CKA is the squared Pearson correlation. x_c = (-1, 0, 1), y_c = (-2, -1, 3): (5^2) / (2 * 14).
    assert linear_cka(np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [1.0], [5.0]])) == pytest.approx(25 / 28)
    # X = (e1, e2, -e1, -e2), Y = X with its second column dropped: X^T X = 2I, Y^T Y = diag(2, 0),
    # Y^T X = diag(2, 0) -> 4 / (sqrt(8) * 2) = 1 / sqrt(2).
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    y = x.copy()
    y[:, 1] = 0.0
    assert linear_cka(x, y) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(linear_cka(x, np.ones((4, 3))))  # a constant matrix has no geometry


def test_cosine():
    x = np.random.default_rng(0).normal(size=(5, 7))
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert mean_cosine(x, 2.0 * x) == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)
    assert mean_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]])) == pytest.approx(0.0)


# -- parallel data and the similarity command ----------------------------------------------------------------------

PARALLEL = {
    "en": ["the cat sat on the mat", "a dog is on a mat", "the dog sat", "a cat", "the mat"],
    "de": ["der Hund und die Katze", "die Katze", "der Hund", "und die", "der"],
    "fr": ["le chat", "le chat sat", "le", "chat", "le mat"],
}


@pytest.fixture
def tiny_xnli_dir(tmp_path) -> Path:
    folder = tmp_path / "xnli"
    folder.mkdir()
    for lang, sentences in PARALLEL.items():
        lines = [f"{s}\thypothesis {i}\tentailment" for i, s in enumerate(sentences)]
        (folder / f"test-{lang}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _table(path: Path) -> dict[str, dict[str, float]]:
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    return {r.pop("layer"): {k: float(v) for k, v in r.items()} for r in rows}


def test_read_parallel_xnli_and_pud(tiny_xnli_dir, tmp_path):
    texts = read_parallel("xnli", tiny_xnli_dir, ["de", "fr"], "test", max_sentences=3)
    assert texts["en"] == PARALLEL["en"][:3] and texts["de"] == PARALLEL["de"][:3]

    pud = tmp_path / "ud"
    pud.mkdir()
    write_conllu(pud / "en_pud-ud-test.conllu", [[("the", "DET"), ("cat", "NOUN")], [("a", "DET"), ("dog", "NOUN")]])
    (pud / "de_pud-ud-test.conllu").write_text(
        "# text = Die Katze.\n1\tDie\t_\tDET\t_\t_\t_\t_\t_\t_\n2\tKatze\t_\tNOUN\t_\t_\t_\t_\t_\t_\n"
        "3\t.\t_\tPUNCT\t_\t_\t_\t_\t_\t_\n\n# text = Ein Hund\n1\tEin\t_\tDET\t_\t_\t_\t_\t_\t_\n"
        "2\tHund\t_\tNOUN\t_\t_\t_\t_\t_\t_\n", encoding="utf-8")
    assert read_pud_sentences(pud / "en_pud-ud-test.conllu") == ["the cat", "a dog"]
    assert read_parallel("udpos", pud, ["de"])["de"] == ["Die Katze.", "Ein Hund"]
    with pytest.raises(DlfaInputError, match=r"no parallel UD file fr_pud-ud-test.conllu \(PUD languages here: de, en\)"):
        read_parallel("udpos", pud, ["fr"])
    with pytest.raises(DlfaInputError, match="no parallel data for task 'panx'"):
        read_parallel("panx", pud, ["de"])


def test_representations_do_not_depend_on_batching(tiny_model_dir):
    loaded = load_analysis_model(str(tiny_model_dir))
    one = sentence_representations(loaded, PARALLEL["en"], batch_size=1)
    many = sentence_representations(loaded, PARALLEL["en"], batch_size=4)
    assert list(one) == ["0", "1", "2", "3", "4"]
    for layer in one:
        assert one[layer].shape == (5, 32)
        np.testing.assert_allclose(one[layer], many[layer], atol=1e-5)


def test_similarity_command_on_tiny_parallel_files(tiny_model_dir, tiny_xnli_dir, tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["analyze", "similarity", "--model", str(tiny_model_dir), "--task", "xnli", "--data-dir",
            str(tiny_xnli_dir), "--languages", "de,fr", "--max-sentences", "4", "--output", str(out)]
    assert main(args) == 0
    for name in ("cosine.csv", "cka.csv", "similarity.md", "similarity.json"):
        assert (out / name).is_file(), name
    for name in ("cosine.png", "cka.png"):
        assert (out / name).stat().st_size > 1000, name
    cosine, cka = _table(out / "cosine.csv"), _table(out / "cka.csv")
    assert list(cosine) == ["0", "1", "2", "3", "4"] and list(cosine["0"]) == ["de", "fr", "average"]
    for table in (cosine, cka):
        for row in table.values():
            assert row["average"] == pytest.approx((row["de"] + row["fr"]) / 2)
    assert all(-1.0 <= v <= 1.0 for row in cosine.values() for v in row.values())
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in cka.values() for v in row.values())
    summary = json.loads((out / "similarity.json").read_text())
    assert summary["sentences"] == 4 and summary["languages"] == ["de", "fr"]
    assert set(summary["cosine_mismatched_control"]) == set(cosine)
    md = (out / "similarity.md").read_text()
    assert "Command: `" in md and "Seeds: none" in md and "4 parallel sentences" in md
    assert "linear CKA" in capsys.readouterr().out

    # English against itself is the identity: cosine and CKA 1 at every layer.
    en_dir = tmp_path / "same"
    en_dir.mkdir()
    for lang in ("en", "de"):
        (en_dir / f"test-{lang}.tsv").write_text((tiny_xnli_dir / "test-en.tsv").read_text(), encoding="utf-8")
    assert main(["analyze", "similarity", "--model", str(tiny_model_dir), "--data-dir", str(en_dir),
                 "--languages", "de", "--output", str(tmp_path / "same-out")]) == 0
    for table in (_table(tmp_path / "same-out" / "cosine.csv"), _table(tmp_path / "same-out" / "cka.csv")):
        assert all(row["de"] == pytest.approx(1.0, abs=1e-5) for row in table.values())


def test_similarity_of_a_dlfa_model_has_a_fused_row(tiny_model_dir, tiny_xnli_dir, tmp_path):
    from transformers import AutoTokenizer

    model = DLFAForSequenceClassification.from_encoder(str(tiny_model_dir), fuse_layer=2, id2label=["a", "b", "c"])
    saved = tmp_path / "run" / "best"
    save_dlfa_model(model, saved, AutoTokenizer.from_pretrained(tiny_model_dir))
    out = tmp_path / "sim"
    assert main(["analyze", "similarity", "--model", str(tmp_path / "run"), "--data-dir", str(tiny_xnli_dir),
                 "--languages", "de", "--output", str(out)]) == 0
    assert list(_table(out / "cka.csv")) == ["0", "1", "2", "3", "4", "fused"]


def test_similarity_bad_inputs(tiny_model_dir, tiny_xnli_dir, tmp_path, capsys):
    (tiny_xnli_dir / "test-fr.tsv").write_text("le chat\th\tentailment\n", encoding="utf-8")
    base = ["analyze", "similarity", "--model", str(tiny_model_dir), "--data-dir", str(tiny_xnli_dir),
            "--output", str(tmp_path / "o")]
    assert main([*base, "--languages", "de,fr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not parallel: fr has 1 sentences, en has 5" in err[0]
    assert main([*base, "--languages", "xx"]) == 2
    assert "no xnli test file for language 'xx'" in capsys.readouterr().err
    assert main([*base, "--languages", "en"]) == 2
    assert "other than en" in capsys.readouterr().err
    assert main(["analyze", "similarity", "--model", str(tmp_path / "nope"), "--data-dir", str(tiny_xnli_dir),
                 "--languages", "de", "--output", str(tmp_path / "o")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- layer re-initialisation ---------------------------------------------------------------------------------------


def test_parse_layer_range():
    assert parse_layer_range("1-4") == [1, 2, 3, 4]
    assert parse_layer_range("5,1-2,2") == [1, 2, 5]
    assert arm_name([1, 2, 3, 4]) == "reinit-1-4" and arm_name([3]) == "reinit-3" and arm_name([1, 3]) == "reinit-1_3"
    for bad in ("", "a-b", "4-1", "1-"):
        with pytest.raises(DlfaInputError, match="--reinit-layers"):
            parse_layer_range(bad)


def test_reinit_changes_only_the_chosen_blocks(tiny_model_dir):
    model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=["a", "b", "c"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = reinitialize_layers(model.encoder, [2, 3], seed=0)
    assert count > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was re-initialised"
    assert all(k.startswith(("dlfa.encoder.encoder.layer.1.", "dlfa.encoder.encoder.layer.2.")) for k in changed), changed
    for block in (1, 2):  # 0-based indices of blocks 2 and 3
        for part in ("attention.self.query", "attention.self.key", "intermediate.dense", "output.dense"):
            assert f"dlfa.encoder.encoder.layer.{block}.{part}.weight" in changed
    std = float(after["dlfa.encoder.encoder.layer.1.attention.self.query.weight"].std())
    assert std == pytest.approx(0.02, rel=0.2)  # BERT's initializer_range
    # Deterministic for a seed.
    again = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), id2label=["a", "b", "c"])
    reinitialize_layers(again.encoder, [2, 3], seed=0)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in changed)
    with pytest.raises(DlfaInputError, match="block numbers must be in 1..4"):
        reinitialize_layers(again.encoder, [5], seed=0)


def test_ablate_command_runs_both_arms_and_writes_the_table(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["analyze", "ablate", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir", str(tiny_udpos_dir),
            "--output", str(out), "--reinit-layers", "1-2", "--epochs", "1", "--batch-size", "4",
            "--learning-rate", "1e-3", "--seed", "5", "--languages", "de,ja"]
    assert main(args) == 0
    data = json.loads((out / "ablation.json").read_text())
    assert set(data["arms"]) == {"unablated", "reinit-1-2"} and data["seed"] == 5 and data["reinit_layers"] == [1, 2]
    for arm in data["arms"].values():
        assert set(arm["languages"]) == {"en", "de", "ja"}  # en added: the gap needs it
        assert arm["gap"] == pytest.approx(arm["en"] - (arm["languages"]["de"] + arm["languages"]["ja"]) / 2)
    assert data["delta"]["gap"] == pytest.approx(data["arms"]["reinit-1-2"]["gap"] - data["arms"]["unablated"]["gap"])
    md = (out / "ablation.md").read_text()
    assert "gap (en − targets)" in md and "seed 5" in md and "Command: `" in md and "n = 1" in md
    assert "reinit-1-2" in capsys.readouterr().out

    ablated = json.loads((out / "reinit-1-2" / "metrics.json").read_text())
    assert ablated["method"] == "reinit-1-2" and ablated["reinit_layers"] == [1, 2]
    assert json.loads((out / "reinit-1-2" / "config.json").read_text())["ablation"]["reinit_layers"] == [1, 2]
    assert (out / "reinit-1-2" / "train.log").read_text().count("re-initialised encoder blocks 1,2") == 1
    assert "re-initialised" not in (out / "unablated" / "train.log").read_text()
    assert json.loads((out / "unablated" / "metrics.json").read_text())["method"] == "baseline"

    # The ablated arm's block 1 left its pretrained weights; block 3 was never re-initialised, only fine-tuned.
    from safetensors.torch import load_file

    pretrained = load_file(str(tiny_model_dir / "model.safetensors"))
    key = next(k for k in pretrained if k.endswith("layer.0.attention.self.query.weight"))
    ablated_weights = load_file(str(out / "reinit-1-2" / "best" / "model.safetensors"))
    unablated_weights = load_file(str(out / "unablated" / "best" / "model.safetensors"))
    name = "dlfa.encoder.encoder.layer.0.attention.self.query.weight"
    drift_ablated = float((ablated_weights[name] - pretrained[key]).abs().max())
    drift_unablated = float((unablated_weights[name] - pretrained[key]).abs().max())
    assert drift_ablated > 10 * drift_unablated

    # `dlfa report` keeps the arms apart.
    assert main(["report", str(out)]) == 0
    rows = [line for line in (out / "report" / "table1.md").read_text().splitlines() if "(n=1)" in line]
    assert len(rows) == 2 and any("reinit-1-2" in r for r in rows) and any("baseline" in r for r in rows)


def test_ablate_bad_layers_write_nothing(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["analyze", "ablate", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir",
                 str(tiny_udpos_dir), "--output", str(out), "--reinit-layers", "3-5"]) == 2
    assert "option --reinit-layers: block numbers must be in 1..4" in capsys.readouterr().err
    assert not out.exists()
