"""`dlfa analyze ablate`: the English score of the transfer gap comes from data that took no part in selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlfa.analysis.ablate import EnglishHoldoutRecipe, english_selection_overlap, run_ablation
from dlfa.errors import DlfaInputError
from dlfa.tasks import get_task
from dlfa.training.config import TrainConfig

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "is"]


def _panx_sentence(n: int) -> list[tuple[str, str]]:
    """A sentence told apart from the others by its length: n + 2 words, one PER entity."""
    words = [WORDS[(n + i) % len(WORDS)] for i in range(n + 1)]
    return [(w, "O") for w in words] + [("Merkel", "B-PER")]


def _write_panx(path: Path, sentences: list[list[tuple[str, str]]]) -> None:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n", encoding="utf-8")


@pytest.fixture
def tiny_panx_dir(tmp_path) -> Path:
    folder = tmp_path / "panx"
    folder.mkdir()
    _write_panx(folder / "train-en.tsv", [_panx_sentence(n % 4) for n in range(12)])
    _write_panx(folder / "dev-en.tsv", [_panx_sentence(n) for n in range(10)])  # selection AND evaluation file
    _write_panx(folder / "dev-de.tsv", [[("der", "O"), ("Hund", "O"), ("Merkel", "B-PER")]])
    return folder


def _config(model: Path, data: Path, out: Path, **kwargs) -> TrainConfig:
    return TrainConfig(task="panx", model=str(model), data_dir=str(data), output_dir=str(out), max_steps=2,
                       batch_size=4, seed=3, cpu=True, **kwargs)


def _keys(sentences) -> set[tuple[str, ...]]:
    return {tuple(s.words) for s in sentences}


def test_english_holdout_is_disjoint_from_selection(tiny_model_dir, tiny_panx_dir, tmp_path):
    config = _config(tiny_model_dir, tiny_panx_dir, tmp_path / "run")
    panx = get_task("panx")
    assert [p.name for p in english_selection_overlap(panx, config)] == ["dev-en.tsv"]
    recipe = EnglishHoldoutRecipe(config, 0.4, show_progress=False)
    try:
        recipe.setup()
    finally:
        recipe.cleanup()
    selection, english = recipe.dev_examples, recipe.eval_examples["en"]
    everything = _keys(panx.read(tiny_panx_dir, "en", "dev"))
    assert len(english) == 4 and len(selection) == 6
    assert not _keys(selection) & _keys(english) and _keys(selection) | _keys(english) == everything
    assert recipe.english_score["source"] == "held-out" and "held out by seed" in recipe.english_score["text"]
    assert len(recipe.dev_features) == 6  # selection features are built from the reduced set, not a cached full one

    # With --max-dev-examples the pool is the first examples; the held-out part still never meets selection.
    limited = EnglishHoldoutRecipe(_config(tiny_model_dir, tiny_panx_dir, tmp_path / "run2", max_dev_examples=6),
                                   0.5, show_progress=False)
    try:
        limited.setup()
    finally:
        limited.cleanup()
    assert len(limited.eval_examples["en"]) == 3 and len(limited.dev_examples) == 3
    assert not _keys(limited.dev_examples) & _keys(limited.eval_examples["en"])

    for bad in (0, 1, 1.5, True):
        with pytest.raises(DlfaInputError, match="option --english-holdout: must be a fraction"):
            EnglishHoldoutRecipe(config, bad)


def test_english_test_file_is_used_as_is_when_it_is_not_the_selection_file(tiny_model_dir, tiny_udpos_dir, tmp_path):
    config = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir),
                         output_dir=str(tmp_path / "run"), languages=["en", "de"], max_steps=1, cpu=True)
    assert english_selection_overlap(get_task("udpos"), config) == []
    recipe = EnglishHoldoutRecipe(config, show_progress=False)
    try:
        recipe.setup()
    finally:
        recipe.cleanup()
    assert recipe.english_score["source"] == "eval-split" and "en-test.conllu" in recipe.english_score["text"]
    assert len(recipe.eval_examples["en"]) == 2 and len(recipe.dev_examples) == 3


def test_panx_ablation_scores_english_on_held_out_examples(tiny_model_dir, tiny_panx_dir, tmp_path):
    out = tmp_path / "ablation"
    config = _config(tiny_model_dir, tiny_panx_dir, out, languages=["de"])
    data = run_ablation(config, [1, 2], out, command="dlfa analyze ablate", show_progress=False,
                        english_holdout=0.5)
    assert data["english_score"]["source"] == "held-out" and data["english_score"]["examples"] == 5
    assert data["scorer"] == "seqeval-entity-f1"
    assert "held out by seed from checkpoint selection" in data["markdown"] and "Scorer: seqeval-entity-f1" in data["markdown"]
    en_words = {}
    for arm in ("unablated", "reinit-1-2"):
        metrics = json.loads((out / arm / "metrics.json").read_text())
        assert metrics["english_score"] == data["english_score"]
        en_words[arm] = metrics["languages"]["en"]["words"]
        dev_words = metrics["selection"]["history"][-1]["dev"]["words"]
        # dev-en.tsv holds 10 sentences of 2..11 words (65 in all): selection and English score split them.
        assert en_words[arm] + dev_words == sum(n + 2 for n in range(10))
    assert en_words["unablated"] == en_words["reinit-1-2"]
