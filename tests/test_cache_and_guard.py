"""Feature cache (hits, invalidation, damaged entries) and the honest-evaluation guard."""

from __future__ import annotations

import json

import pytest
from conftest import CONLLU_SENTENCES, write_conllu

from dlfa.cli.main import main
from dlfa.data.cache import FeatureCache, cache_key
from dlfa.errors import DlfaInputError
from dlfa.evaluation.guard import check_honest_evaluation
from dlfa.tasks import get_task

UDPOS = get_task("udpos")


def _featurize_counting(tokenizer, path, cache, max_length=64, calls=None):
    examples = UDPOS.read_file(path)
    key = cache_key(tokenizer, "udpos", "test", "de", max_length, [path])

    def build():
        calls.append(1)
        return UDPOS.featurize(examples, tokenizer, max_length)

    return key, cache.get_or_build(key, build)


def test_second_run_hits_the_cache_and_gives_identical_features(tiny_tokenizer, tmp_path):
    path = write_conllu(tmp_path / "de-test.conllu", CONLLU_SENTENCES["en"])
    cache, calls = FeatureCache(tmp_path / "cache"), []
    _, first = _featurize_counting(tiny_tokenizer, path, cache, calls=calls)
    _, second = _featurize_counting(tiny_tokenizer, path, cache, calls=calls)
    assert calls == [1] and cache.hits == 1
    assert second == first


def test_key_changes_with_every_input(tiny_tokenizer, tmp_path):
    path = write_conllu(tmp_path / "de-test.conllu", CONLLU_SENTENCES["en"])
    base = cache_key(tiny_tokenizer, "udpos", "test", "de", 64, [path])
    assert cache_key(tiny_tokenizer, "udpos", "test", "de", 32, [path]) != base
    assert cache_key(tiny_tokenizer, "udpos", "dev", "de", 64, [path]) != base
    assert cache_key(tiny_tokenizer, "udpos", "test", "fr", 64, [path]) != base
    assert cache_key(tiny_tokenizer, "panx", "test", "de", 64, [path]) != base
    assert cache_key(tiny_tokenizer, "udpos", "test", "de", 64, [path], subset="10") != base
    from conftest import build_tiny_tokenizer

    other = build_tiny_tokenizer()
    other.add_tokens(["newword"])
    assert cache_key(other, "udpos", "test", "de", 64, [path]) != base
    write_conllu(path, CONLLU_SENTENCES["de"])  # the data file changed
    assert cache_key(tiny_tokenizer, "udpos", "test", "de", 64, [path]) != base


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_entry_is_rebuilt_not_used(tiny_tokenizer, tmp_path, damage, caplog):
    path = write_conllu(tmp_path / "de-test.conllu", CONLLU_SENTENCES["en"])
    cache, calls = FeatureCache(tmp_path / "cache"), []
    key, first = _featurize_counting(tiny_tokenizer, path, cache, calls=calls)
    entry = tmp_path / "cache" / f"{key}.safetensors"
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-3] ^= 0xFF  # a flipped bit in the last array's payload
        entry.write_bytes(bytes(data))
    _, again = _featurize_counting(tiny_tokenizer, path, cache, calls=calls)
    assert calls == [1, 1] and again == first
    assert "damaged" in caplog.text


def test_guard_refuses_translations_of_the_training_file(tmp_path):
    class ParallelDev(type(UDPOS)):
        parallel_splits = ("dev",)

    task = ParallelDev()
    for lang in ("en", "de"):
        write_conllu(tmp_path / f"{lang}-dev.conllu", CONLLU_SENTENCES["en"])
    with pytest.raises(DlfaInputError, match="translations of it"):
        check_honest_evaluation(task, tmp_path, "en", "dev", ["de"], "dev", allow_leaky=False)
    assert check_honest_evaluation(task, tmp_path, "en", "dev", ["de"], "dev", allow_leaky=True) == ["de"]
    assert check_honest_evaluation(task, tmp_path, "en", "train", ["de"], "dev", allow_leaky=False) == []


def test_training_file_itself_is_never_a_silent_target(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    args = ["train", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir", str(tiny_udpos_dir),
            "--train-split", "test", "--languages", "en,de", "--epochs", "1", "--output", str(tmp_path / "run")]
    assert main(args) == 2
    assert "leaks the training data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(args + ["--allow-leaky-evaluation"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["leaky_languages"] == ["en"] and metrics["languages"]["en"]["leaky"] is True
    assert "leaky" not in metrics["languages"]["de"]
    assert metrics["selection"]["held_out_from_training_file"] is False


def test_training_and_selection_on_one_file_hold_out_a_part(tiny_model_dir, tiny_udpos_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir", str(tiny_udpos_dir),
            "--train-split", "dev", "--dev-split", "dev", "--dev-holdout", "0.34", "--languages", "de",
            "--epochs", "1", "--batch-size", "1", "--output", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert metrics["selection"]["held_out_from_training_file"] is True
    assert config["resolved"]["train_features"] == 2  # 3 dev sentences: 1 held out for selection, 2 trained on
    assert metrics["selection"]["history"][-1]["dev"]["words"] in {6, 7, 4}  # one whole sentence


def test_dev_holdout_is_disjoint_from_training_and_covers_the_file(tiny_model_dir, tmp_path, monkeypatch):
    """With one file for training and selection, the held-out selection examples are never trained on, and the
    two parts together are the whole file."""
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import FinetuneRecipe

    folder = tmp_path / "udpos"
    folder.mkdir()
    # Ten sentences told apart by their words.
    words = ["the", "cat", "dog", "sat", "on", "mat", "a", "is", "der", "die"]
    sentences = [[(words[(i + k) % 10], "NOUN") for k in range(i % 3 + 2)] + [(str(i), "NUM")] for i in range(10)]
    write_conllu(folder / "en-dev.conllu", sentences)
    write_conllu(folder / "de-test.conllu", CONLLU_SENTENCES["de"])
    trained = []
    original = FinetuneRecipe._build_train_features

    def spy(self, train_examples, holdout):
        trained.extend(train_examples)
        return original(self, train_examples, holdout)

    monkeypatch.setattr(FinetuneRecipe, "_build_train_features", spy)
    recipe = FinetuneRecipe(TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(folder),
                                        output_dir=str(tmp_path / "run"), train_split="dev", dev_split="dev",
                                        dev_holdout=0.3, languages=["de"], max_steps=1, seed=4, cpu=True),
                            show_progress=False)
    try:
        recipe.setup()
    finally:
        recipe.cleanup()
    selection = {tuple(s.words) for s in recipe.dev_examples}
    training = {tuple(s.words) for s in trained}
    assert len(selection) == 3 and len(training) == len(trained) == 7
    assert not selection & training
    assert selection | training == {tuple(w for w, _ in s) for s in sentences}
