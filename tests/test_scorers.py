"""Named scorers, checked against the real package versions they claim; UD preprocessing; scorer plumbing.

The ``xtreme-2020`` scorer claims seqeval 0.0.12's numbers: a session fixture installs seqeval==0.0.12 into a
temporary folder (``pip install --no-deps --target``; the test skips when pip or PyPI is unavailable) and a
subprocess with that folder first on its path scores the same sequences. seqeval 0.0.12 is never a dlfa
dependency.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import shared_data, write_conllu

from dlfa.data.cache import cache_key
from dlfa.errors import DlfaInputError
from dlfa.tasks import TASKS, get_task
from dlfa.tasks.panx import NER_TAGS
from dlfa.tasks.scoring import xtreme2020_chunks, xtreme2020_f1
from dlfa.tasks.udpos import UPOS_TAGS, read_conllu, xtreme_word
from dlfa.training.config import TrainConfig

UDPOS = get_task("udpos")
PANX = get_task("panx")


# -- the cases -----------------------------------------------------------------------------------------------------


def _flip(sentences: list[list[str]], rate: float, tags: tuple[str, ...], seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(tags) if rng.random() < rate else tag for tag in sentence] for sentence in sentences]


def _random_sentences(tags: tuple[str, ...], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(count)]


def _upos_cases() -> list[tuple[str, list[list[str]], list[list[str]]]]:
    every = list(UPOS_TAGS)
    cases = [
        ("all 17 tags, perfect", [every], [every]),
        ("all 17 tags, reversed", [every], [every[::-1]]),
        ("SCONJ predicted CCONJ", [["SCONJ", "NOUN", "VERB"]], [["CCONJ", "NOUN", "VERB"]]),
        ("CCONJ predicted SCONJ", [["NOUN", "CCONJ", "NOUN"]], [["NOUN", "SCONJ", "NOUN"]]),
        ("CCONJ then SCONJ", [["CCONJ", "SCONJ", "NOUN"]], [["CCONJ", "CCONJ", "NOUN"]]),
        ("SCONJ then CCONJ run", [["SCONJ", "CCONJ", "CCONJ"]], [["SCONJ", "SCONJ", "CCONJ"]]),
        ("runs of equal tags", [["NOUN", "NOUN", "VERB", "VERB", "NOUN"]], [["NOUN", "VERB", "VERB", "VERB", "NOUN"]]),
        ("S tags end chunks", [["SYM", "SYM", "SCONJ", "SCONJ"]], [["SYM", "SCONJ", "SYM", "SCONJ"]]),
        ("X at sentence ends", [["NOUN", "X"], ["X", "VERB", "X"]], [["NOUN", "X"], ["X", "VERB", "NOUN"]]),
        ("INTJ is read as I-", [["INTJ", "INTJ", "PUNCT"]], [["INTJ", "PUNCT", "PUNCT"]]),
        ("one-word sentences", [["X"], ["SCONJ"], ["NOUN"]], [["X"], ["CCONJ"], ["PRON"]]),
        ("nothing right", [["NOUN", "VERB"]], [["VERB", "NOUN"]]),
    ]
    gold = _random_sentences(UPOS_TAGS, 300, seed=1)
    cases.append(("random, 10% flipped", gold, _flip(gold, 0.1, UPOS_TAGS, seed=2)))
    cases.append(("random, 60% flipped", gold, _flip(gold, 0.6, UPOS_TAGS, seed=3)))
    conj = [[t for t in s] for s in _random_sentences(("CCONJ", "SCONJ", "NOUN", "X"), 200, seed=4)]
    cases.append(("conjunction-heavy, swapped", conj,
                   [[{"CCONJ": "SCONJ", "SCONJ": "CCONJ"}.get(t, t) for t in s] for s in conj]))
    return cases


def _real_ud_cases() -> list[tuple[str, list[list[str]], list[list[str]]]]:
    """The issue's examples on the real en and ja test files: every gold SCONJ predicted CCONJ; and noise."""
    folder = shared_data("udpos")
    cases = []
    for lang in ("en", "ja"):
        gold = [s.tags for s in UDPOS.read(folder, lang, "test")]
        cases.append((f"{lang}: SCONJ -> CCONJ", gold, [[("CCONJ" if t == "SCONJ" else t) for t in s] for s in gold]))
        cases.append((f"{lang}: 3% noise", gold, _flip(gold, 0.03, UPOS_TAGS, seed=5)))
    return cases


def _ner_cases() -> list[tuple[str, list[list[str]], list[list[str]]]]:
    gold = _random_sentences(NER_TAGS + ("O",) * 6, 300, seed=6)
    return [
        ("I- after O", [["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]]),
        ("type change inside", [["B-PER", "I-LOC"]], [["B-PER", "I-PER"]]),
        ("random IOB2, 15% flipped", gold, _flip(gold, 0.15, NER_TAGS, seed=7)),
    ]


# -- seqeval 0.0.12 in a temporary folder --------------------------------------------------------------------------

_REFERENCE = """
import json, sys, warnings
from importlib.metadata import version
warnings.simplefilter("ignore")
import seqeval
from seqeval.metrics import f1_score
from seqeval.metrics.sequence_labeling import get_entities
cases = json.load(open(sys.argv[1], encoding="utf-8"))
out = {"version": version("seqeval"), "file": seqeval.__file__,
       "f1": [f1_score(c["gold"], c["pred"]) for c in cases],
       "chunks": [get_entities(c["gold"]) for c in cases]}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="session")
def seqeval_0012(tmp_path_factory) -> Path:
    """A folder holding seqeval 0.0.12, installed once per test session; skip when pip/PyPI is unavailable."""
    target = tmp_path_factory.mktemp("seqeval-0.0.12")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                               str(target), "seqeval==0.0.12"], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run pip to install seqeval 0.0.12 ({exc})")
    if done.returncode != 0 or not (target / "seqeval").is_dir():
        pytest.skip(f"seqeval 0.0.12 could not be installed (pip: {done.stderr.strip().splitlines()[-1:]})")
    return target


def _reference_scores(target: Path, cases, tmp_path: Path) -> dict:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([{"gold": g, "pred": p} for _, g, p in cases]), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", _REFERENCE, str(path)], capture_output=True, text=True,
                          timeout=300, env=env, check=True)
    result = json.loads(done.stdout)
    assert result["version"] == "0.0.12" and Path(result["file"]).is_relative_to(target)
    return result


def test_xtreme2020_matches_real_seqeval_0012(seqeval_0012, tmp_path):
    cases = _upos_cases()
    reference = _reference_scores(seqeval_0012, cases, tmp_path)
    for (name, gold, pred), f1, chunks in zip(cases, reference["f1"], reference["chunks"], strict=True):
        assert xtreme2020_chunks(gold) == [tuple(c) for c in chunks], name
        assert xtreme2020_f1(gold, pred) == pytest.approx(f1, abs=1e-12), name
        assert UDPOS.tag_metrics(gold, pred, "xtreme-2020")["f1"] == pytest.approx(100 * f1, abs=1e-10), name
    # The cases do tell the versions apart.
    assert any(abs(UDPOS.tag_metrics(g, p, "seqeval")["f1"] - 100 * f1) > 1 for (_, g, p), f1
               in zip(cases, reference["f1"], strict=True))


def test_xtreme2020_matches_seqeval_0012_on_real_ud_files(seqeval_0012, tmp_path):
    cases = _real_ud_cases()
    reference = _reference_scores(seqeval_0012, cases, tmp_path)
    for (name, gold, pred), f1 in zip(cases, reference["f1"], strict=True):
        assert UDPOS.tag_metrics(gold, pred, "xtreme-2020")["f1"] == pytest.approx(100 * f1, abs=1e-10), name
    # Every SCONJ read as CCONJ: an error for 0.0.12, correct for 1.x (the example).
    for name, gold, pred in cases[::2]:
        newer, older = (UDPOS.tag_metrics(gold, pred, scorer)["f1"] for scorer in ("seqeval", "xtreme-2020"))
        assert newer > older + 1, name


def test_panx_scorer_equals_seqeval_0012_on_iob2(seqeval_0012, tmp_path):
    cases = _ner_cases()
    reference = _reference_scores(seqeval_0012, cases, tmp_path)
    for (name, gold, pred), f1 in zip(cases, reference["f1"], strict=True):
        assert PANX.tag_metrics(gold, pred)["f1"] == pytest.approx(100 * f1, abs=1e-10), name


def test_seqeval_scorer_is_the_installed_seqeval_122():
    from importlib.metadata import version

    from seqeval.metrics import f1_score

    assert version("seqeval") == "1.2.2"
    for name, gold, pred in _upos_cases():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = 100 * f1_score(gold, pred)
        assert UDPOS.tag_metrics(gold, pred, "seqeval")["f1"] == pytest.approx(expected, abs=1e-10), name
    # 1.x semantics: SCONJ and CCONJ are one chunk type, so the confusion counts as correct.
    gold, pred = [["SCONJ", "NOUN", "VERB"]], [["CCONJ", "NOUN", "VERB"]]
    assert UDPOS.tag_metrics(gold, pred, "seqeval")["f1"] == pytest.approx(100.0)
    assert UDPOS.tag_metrics(gold, pred, "xtreme-2020")["f1"] == pytest.approx(100 * 2 / 3)


def test_task_modules_do_not_import_seqeval():
    # seqeval 1.x pulls in scikit-learn (about 1 s): options must be refused before that.
    code = "import sys, dlfa.tasks; print(sorted(m for m in ('seqeval', 'sklearn') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


# -- the registry --------------------------------------------------------------------------------------------------


def test_scorer_registry_defaults_and_names():
    assert list(UDPOS.scorers) == ["xtreme-2020", "seqeval", "accuracy"] and UDPOS.default_scorer == "xtreme-2020"
    assert list(PANX.scorers) == ["seqeval-entity-f1"]
    assert get_task("xnli").default_scorer == get_task("pawsx").default_scorer == "accuracy"
    for task in TASKS.values():
        assert task.default_scorer in task.scorers
        assert task.primary_metric == task.scorers[task.default_scorer].metric
    assert UDPOS.get_scorer().name == "xtreme-2020" and UDPOS.get_scorer("accuracy").metric == "accuracy"
    with pytest.raises(DlfaInputError, match=r"option --scorer: unknown scorer 'conll' for udpos \(choices: "
                                             r"xtreme-2020, seqeval, accuracy; default xtreme-2020\)"):
        UDPOS.get_scorer("conll")
    with pytest.raises(DlfaInputError, match="unknown scorer 'seqeval' for panx"):
        PANX.get_scorer("seqeval")


def test_every_metrics_dict_names_its_scorer(tiny_tokenizer):
    from dlfa.data.features import TaggedSentence
    from dlfa.tasks.base import SentencePair

    gold, pred = [["DET", "NOUN", "SCONJ"]], [["DET", "NOUN", "CCONJ"]]
    xtreme = UDPOS.tag_metrics(gold, pred)
    assert xtreme == {"scorer": "xtreme-2020", "f1": pytest.approx(100 * 2 / 3), "accuracy": pytest.approx(200 / 3),
                      "words": 3}
    assert UDPOS.tag_metrics(gold, pred, "accuracy") == {"scorer": "accuracy", "accuracy": pytest.approx(200 / 3),
                                                         "words": 3}
    sentences = [TaggedSentence(["the", "cat"], ["DET", "NOUN"])]
    features = UDPOS.featurize(sentences, tiny_tokenizer, 64)
    ids = [[UDPOS.label_to_id["DET"], UDPOS.label_to_id["VERB"]]]
    for name in UDPOS.scorers:
        metrics = UDPOS.score(sentences, features, ids, scorer=name)
        assert metrics["scorer"] == name and metrics["unaligned_words"] == 0
        assert metrics[UDPOS.get_scorer(name).metric] == pytest.approx(50.0)  # one of two words, one of two chunks
    pairs = [SentencePair("a", "b", "entailment"), SentencePair("a", "b", "neutral")]
    assert get_task("xnli").score(pairs, [{}, {}], [0, 0])["scorer"] == "accuracy"
    with pytest.raises(ValueError, match="outside"):
        get_task("xnli").score(pairs, [{}, {}], [0, 7])


# -- UD preprocessing ----------------------------------------------------------------------------------------------


def test_xtreme_preprocessing_removes_spaces_and_zwnj(tmp_path):
    path = write_conllu(tmp_path / "vi-test.conllu", [
        [("công ty", "NOUN"), ("lớn", "ADJ")],
        [("می\u200cخواهم", "VERB"), ("a b\u200cc ", "X"), ("\u00a0x\u00a0y\u00a0", "SYM")],
    ])
    xtreme, raw = read_conllu(path), read_conllu(path, "raw")
    assert [s.words for s in raw] == [["công ty", "lớn"], ["می\u200cخواهم", "a b\u200cc ", "\u00a0x\u00a0y\u00a0"]]
    # Stripped, then U+200C and spaces removed; a no-break space inside a word stays (XTREME splits on ' ' only).
    assert [s.words for s in xtreme] == [["côngty", "lớn"], ["میخواهم", "abc", "x\u00a0y"]]
    assert [s.tags for s in xtreme] == [s.tags for s in raw]
    assert xtreme_word(" a\u200c b ") == "ab"
    folder = tmp_path
    assert UDPOS.read(folder, "vi", "test")[0].words == ["côngty", "lớn"]
    assert UDPOS.read(folder, "vi", "test", "raw")[0].words == ["công ty", "lớn"]
    with pytest.raises(DlfaInputError, match="option --ud-preprocessing: must be one of xtreme, raw, got 'none'"):
        UDPOS.read(folder, "vi", "test", "none")
    with pytest.raises(DlfaInputError, match="option --ud-preprocessing"):
        read_conllu(path, "XTREME")
    with pytest.raises(DlfaInputError, match="panx data are read one way"):
        PANX.read(folder, "en", "train", "raw")


def test_xtreme_preprocessing_drops_sentences_without_text_and_refuses_empty_words(tmp_path, caplog):
    path = write_conllu(tmp_path / "xx-test.conllu", [
        [("_", "NOUN"), ("_", "VERB"), (".", "PUNCT")],  # all but one '_': XTREME drops it
        [("_", "SYM"), ("a", "DET"), ("b", "NOUN")],  # one '_' of three: kept
    ])
    assert len(read_conllu(path, "raw")) == 2
    kept = read_conllu(path)
    assert [s.words for s in kept] == [["_", "a", "b"]]
    assert "1 sentence(s) without their text" in caplog.text
    only = write_conllu(tmp_path / "yy-test.conllu", [[("_", "NOUN")]])
    with pytest.raises(DlfaInputError, match="no sentences with text"):
        read_conllu(only)
    empty = write_conllu(tmp_path / "zz-test.conllu", [[("a", "DET"), ("\u200c", "X")]])
    with pytest.raises(DlfaInputError, match=r"zz-test.conllu:3: word form is empty after XTREME's preprocessing"):
        read_conllu(empty)
    assert read_conllu(empty, "raw")[0].words == ["a", "\u200c"]


def test_preprocessing_from_a_run_config_and_the_cache_key(tiny_tokenizer, tmp_path):
    assert UDPOS.preprocessing_from({}) == "xtreme"
    assert UDPOS.preprocessing_from({"ud_preprocessing": "raw"}) == "raw"
    assert UDPOS.preprocessing_from(TrainConfig(task="udpos", data_dir="d", output_dir="o")) == "xtreme"  # the field's default, or (absent) the task's
    assert PANX.preprocessing_from({"ud_preprocessing": "raw"}) is None
    files = [write_conllu(tmp_path / "en-test.conllu", [[("a", "DET")]])]
    keys = {cache_key(tiny_tokenizer, "udpos", "test", "en", 128, files, "all", preprocessing=p)
            for p in ("xtreme", "raw", None)}
    assert len(keys) == 3
    # Tasks read one way keep the keys of earlier versions.
    assert cache_key(tiny_tokenizer, "panx", "dev", "en", 128, files) == cache_key(
        tiny_tokenizer, "panx", "dev", "en", 128, files, "all", preprocessing=None)


def test_real_ud_test_files_words_changed_by_xtreme_preprocessing():
    folder = shared_data("udpos")
    changed = {}
    for lang in UDPOS.available_languages(folder, "test"):
        raw, xtreme = UDPOS.read(folder, lang, "test", "raw"), UDPOS.read(folder, lang, "test", "xtreme")
        assert [len(s.words) for s in raw] == [len(s.words) for s in xtreme]  # words change, never vanish
        count = sum(a != b for r, x in zip(raw, xtreme, strict=True) for a, b in zip(r.words, x.words, strict=True))
        if count:
            changed[lang] = count
    # The counts: 2,079 Vietnamese (spaces) and 1,015 Persian (ZWNJ) test words; and 2 French words.
    assert changed == {"vi": 2079, "fa": 1015, "fr": 2}


# -- plumbing: recipe, metrics.json, dlfa evaluate, report -----------------------------------------------------------


def test_run_names_its_scorer_everywhere(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.configs import EvaluateConfig
    from dlfa.evaluation.run_eval import evaluate_run
    from dlfa.reporting.report import write_report
    from dlfa.training.recipe import FinetuneRecipe

    out = tmp_path / "runs" / "acc"
    config = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir), output_dir=str(out),
                     languages=["de"], max_steps=2, batch_size=4, seed=1, cpu=True, scorer="accuracy",
                     ud_preprocessing="raw")
    result = FinetuneRecipe(config, show_progress=False).run()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["scorer"] == "accuracy" and saved["primary_metric"] == "accuracy"
    assert saved["preprocessing"] == "raw" and result["languages"]["de"]["scorer"] == "accuracy"
    assert "f1" not in saved["languages"]["de"]
    assert all(record["dev"]["scorer"] == "accuracy" for record in saved["selection"]["history"])
    assert json.loads((out / "config.json").read_text())["resolved"]["scorer"] == "accuracy"

    # dlfa evaluate: the run's scorer by default, another one when asked.
    again = evaluate_run(EvaluateConfig(run=str(out), languages=["de"]))
    assert again["scorer"] == "accuracy" and again["primary_metric"] == "accuracy"
    assert again["languages"]["de"]["accuracy"] == pytest.approx(saved["languages"]["de"]["accuracy"])
    other = evaluate_run(EvaluateConfig(run=str(out), languages=["de"], scorer="xtreme-2020", ud_preprocessing="xtreme"))
    assert other["scorer"] == "xtreme-2020" and other["primary_metric"] == "f1" and other["preprocessing"] == "xtreme"
    with pytest.raises(DlfaInputError, match="option --scorer: unknown scorer"):
        evaluate_run(EvaluateConfig(run=str(out), scorer="f1"))

    # The report names the scorer in its headers and refuses to average runs of different scorers.
    report = write_report([tmp_path / "runs"], tmp_path / "report", command="dlfa report")
    assert "udpos (accuracy, accuracy, avg of" in report["table1"]
    assert "(scorer accuracy)" in (tmp_path / "report" / "table4.md").read_text()


def test_bad_scorer_is_refused_before_anything_is_written(tiny_model_dir, tiny_udpos_dir, tmp_path):

    out = tmp_path / "run"
    common = {"task": "udpos", "model": str(tiny_model_dir), "data_dir": str(tiny_udpos_dir), "output_dir": str(out),
              "max_steps": 1, "cpu": True}
    with pytest.raises(DlfaInputError, match="unknown scorer 'f1' for udpos"):
        TrainConfig(**common, scorer="f1")  # the config refuses it, before any recipe exists
    with pytest.raises(DlfaInputError, match="option --ud-preprocessing"):
        TrainConfig(**common, ud_preprocessing="none")
    with pytest.raises(DlfaInputError, match="option --ud-preprocessing: applies to udpos only"):
        TrainConfig(**{**common, "task": "panx"}, ud_preprocessing="raw")
    assert not out.exists()


def _metrics_file(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "task": "udpos", "model": "m", "primary_metric": "f1", "seed": 1, "average": {"f1": 50.0},
        "languages": {"de": {"f1": 50.0}}, **extra}), encoding="utf-8")
    return folder


def test_report_names_scorers_and_never_mixes_them(tmp_path):
    from dlfa.reporting.report import Report, load_run

    old = load_run(_metrics_file(tmp_path / "old"))  # written before dlfa named its scorers
    assert old.scorer == "seqeval" and old.scorer_inferred
    report = Report([old])
    assert any("name no scorer" in note and "'seqeval'" in note for note in report.notes())
    table, records = report.table1()
    assert table.headers[2].startswith("udpos (f1, seqeval, avg of") and records[0]["scorer"] == "seqeval"

    new = load_run(_metrics_file(tmp_path / "new", scorer="xtreme-2020"))
    assert new.scorer == "xtreme-2020" and not new.scorer_inferred
    with pytest.raises(DlfaInputError, match=r"new/metrics.json: scored by 'xtreme-2020', other udpos runs by "
                                             r"'seqeval'; their numbers are not comparable"):
        Report([old, new])
    with pytest.raises(DlfaInputError, match="'scorer' is not a string"):
        load_run(_metrics_file(tmp_path / "bad", scorer=3))
