"""DLFA models in the Hugging Face ecosystem: Auto classes, remote code without dlfa, the Hub code path offline,
pipelines that agree with dlfa's evaluation, Trainer, the model card, and dlfa 0.1 folders.

One tiny UD-POS run (trained by the recipe, module-scoped) provides a real ``best/`` folder; the IOB (PAN-X) and
sentence-pair (XNLI) models are new models around the tiny encoder, saved the way the recipe saves ``best/``.
The dlfa-free checks run in one subprocess in which ``import dlfa`` fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CONLLU_SENTENCES, write_conllu

from dlfa.configs import EvaluateConfig
from dlfa.data.batching import Collator
from dlfa.data.features import piece_carries_characters, sentence_predictions
from dlfa.errors import DlfaInputError
from dlfa.evaluation.evaluate import predict
from dlfa.modeling import convert_legacy_folder, load_dlfa_model, save_dlfa_model
from dlfa.modeling.modeling_dlfa import (
    DLFAForSequenceClassification,
    DLFAForTokenClassification,
    DLFAModel,
)
from dlfa.modeling.pipelines import classify_pairs, is_iob, tag_words, word_tags_from_entities
from dlfa.tasks import get_task
from dlfa.tasks.base import SentencePair

# Target sentences with capitalised and CJK words: the tiny SentencePiece vocabulary splits them into a bare "▁"
# and pieces with characters, the case where dlfa's labelled sub-token is not the word's first.
TARGET_POS = {
    "de": CONLLU_SENTENCES["de"] + [
        [("Der", "DET"), ("Hund", "NOUN"), ("sitzt", "VERB"), ("auf", "ADP"), ("der", "DET"), ("Matte", "NOUN")],
        [("Die", "DET"), ("Katze", "NOUN"), ("und", "CCONJ"), ("der", "DET"), ("Hund", "NOUN"), (".", "PUNCT")],
    ],
    "ja": CONLLU_SENTENCES["ja"] + [[("犬", "NOUN"), ("は", "ADP"), ("猫", "NOUN"), ("が", "ADP"), ("座っ", "VERB"),
                                     ("た", "AUX"), ("。", "PUNCT")]],
}
NER_SENTENCES = [
    ["Anna", "Schmidt", "lives", "in", "Berlin", "."],
    ["the", "cat", "of", "Paris", "Saint", "Germain", "sat"],
    ["猫", "が", "東京", "に", "座っ", "た", "。"],
    ["EU", "and", "UN", "met", "in", "New", "York", "City"],
]
PAIRS = [("the cat sat on the mat", "a cat sat"), ("der Hund", "the dog is on a mat"), ("le chat", "el gato"),
         ("猫が座った", "the dog sat"), ("a dog is on the mat", "the mat is on a dog")]


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pos_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished UD-POS run (baseline-free: D_2) trained by the recipe, with a MANIFEST.tsv beside its data."""
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import FinetuneRecipe

    root = tmp_path_factory.mktemp("pos")
    data = root / "data" / "udpos"
    data.mkdir(parents=True)
    write_conllu(data / "en-train.conllu", CONLLU_SENTENCES["en"] * 8)
    write_conllu(data / "en-dev.conllu", CONLLU_SENTENCES["en"])
    for lang, sentences in TARGET_POS.items():
        write_conllu(data / f"{lang}-test.conllu", sentences)
    (root / "data" / "MANIFEST.tsv").write_text(
        "file\tsource\tlicense_as_stated\texamples\tbytes\tnotes\n"
        "udpos/en-train.conllu\ttest\tCC BY-SA 4.0\t24\t1\t\n"
        "udpos/de-test.conllu\ttest\tCC BY-NC-SA 3.0\t3\t1\t\n", encoding="utf-8")
    config = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(data), output_dir=str(root / "run"),
                         languages=["de", "ja"], epochs=2, batch_size=4, learning_rate=3e-3, fuse_layer=2, seed=3,
                         cpu=True)
    FinetuneRecipe(config, show_progress=False).run()
    return root / "run"


def _saved_model(folder: Path, model, tokenizer) -> Path:
    save_dlfa_model(model, folder, tokenizer)
    return folder


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    torch.manual_seed(5)
    model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), fuse_layer=1,
                                                    id2label=list(get_task("panx").labels))
    with torch.no_grad():  # a new head is random: scale it so that labels differ clearly (no near-ties)
        model.classifier.weight.mul_(60.0)
    return _saved_model(tmp_path_factory.mktemp("ner") / "ner-best", model, tiny_tokenizer)


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    torch.manual_seed(6)
    task = get_task("xnli")
    model = DLFAForSequenceClassification.from_encoder(str(tiny_model_dir), fuse_layer=3, id2label=list(task.labels))
    # A random encoder gives every pair nearly the same first-token features: fit the pairs briefly, so that the
    # labels differ between pairs.
    features = task.featurize([SentencePair(a, b, task.labels[i % 3]) for i, (a, b) in enumerate(PAIRS)],
                              tiny_tokenizer, 64)
    batch = Collator(tiny_tokenizer, "sequence")(features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _saved_model(tmp_path_factory.mktemp("pair") / "pair-best", model, tiny_tokenizer)


# -- dlfa's own predictions ---------------------------------------------------------------------------------------


def _dlfa_word_tags(folder: Path, task_name: str, sentences: list[list[str]]) -> list[list[str]]:
    """Word tags as dlfa's evaluation computes them (featurize, predict in sorted batches, reassemble)."""
    from transformers import AutoTokenizer

    from dlfa.data.features import TaggedSentence

    task, tokenizer = get_task(task_name), AutoTokenizer.from_pretrained(folder)
    examples = [TaggedSentence(words, [task.labels[0]] * len(words)) for words in sentences]
    features = task.featurize(examples, tokenizer, 128)
    predicted = predict(load_dlfa_model(folder), features, Collator(tokenizer, "token"), batch_size=3)
    tags, unaligned = sentence_predictions(features, predicted, [len(s) for s in sentences], task.labels, "O")
    assert unaligned == 0
    return tags


def _dlfa_pair_labels(folder: Path, pairs) -> list[str]:
    from transformers import AutoTokenizer

    task, tokenizer = get_task("xnli"), AutoTokenizer.from_pretrained(folder)
    features = task.featurize([SentencePair(a, b, task.labels[0]) for a, b in pairs], tokenizer, 128)
    predicted = predict(load_dlfa_model(folder), features, Collator(tokenizer, "sequence"), batch_size=2)
    return [task.labels[i] for i in predicted]


def _bare_marker_tags(folder: Path, sentences: list[list[str]]) -> list[list[str | None]]:
    """Per word: the model's tag at its bare "▁" piece (a piece dlfa never scores), or None if it has none."""
    from transformers import AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), load_dlfa_model(folder)
    result = []
    for words in sentences:
        encoding = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**encoding).logits[0].argmax(-1).tolist()
        word_ids, tokens = encoding.word_ids(0), encoding.tokens(0)
        first = {w: p for p, w in reversed(list(enumerate(word_ids))) if w is not None}
        result.append([None if piece_carries_characters(tokens[first[i]]) else
                       model.config.id2label[predicted[first[i]]] for i in range(len(words))])
    return result


def _expected_pipeline_iob(dlfa_tags: list[str], bare: list[str | None]) -> list[str]:
    """The documented rule: the tag type is dlfa's; I-X only where the pipeline's group continues."""
    expected = []
    for i, tag in enumerate(dlfa_tags):
        if tag == "O":
            expected.append("O")
            continue
        kind = tag[2:]
        previous = dlfa_tags[i - 1][2:] if i and dlfa_tags[i - 1] != "O" else None
        continues = tag.startswith("I-") and previous == kind and bare[i] in (None, f"I-{kind}")
        expected.append(("I-" if continues else "B-") + kind)
    return expected


# -- Auto classes and loading -------------------------------------------------------------------------------------


def test_best_is_one_hugging_face_folder(pos_run):
    best = pos_run / "best"
    names = {p.name for p in best.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_dlfa.py", "checksums.json", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert "dlfa_config.json" not in names
    config = json.loads((best / "config.json").read_text())
    assert config["model_type"] == "dlfa" and config["architectures"] == ["DLFAForTokenClassification"]
    assert config["auto_map"] == {"AutoConfig": "modeling_dlfa.DLFAConfig", "AutoModel": "modeling_dlfa.DLFAModel",
                                  "AutoModelForTokenClassification": "modeling_dlfa.DLFAForTokenClassification"}
    assert config["encoder"]["model_type"] == "bert" and config["fuse_layer"] == 2
    assert list(config["id2label"].values()) == list(get_task("udpos").labels)
    from dlfa.io import read_checksums, sha256_file

    assert read_checksums(best / "checksums.json") == {"model.safetensors": sha256_file(best / "model.safetensors")}
    source = (Path(__file__).parents[1] / "src" / "dlfa" / "modeling" / "modeling_dlfa.py").read_text()
    assert (best / "modeling_dlfa.py").read_text() == source
    assert "import dlfa" not in source and "from dlfa" not in source


def test_auto_classes_read_the_folder_with_dlfa_installed(pos_run):
    from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification

    best = pos_run / "best"
    assert type(AutoConfig.from_pretrained(best)).__module__ == "dlfa.modeling.modeling_dlfa"
    model = AutoModelForTokenClassification.from_pretrained(best)  # registered: no trust_remote_code needed
    assert type(model) is DLFAForTokenClassification
    reference = load_dlfa_model(best)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    base = AutoModel.from_pretrained(best)
    assert type(base) is DLFAModel
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, reference(ids).features, atol=0, rtol=0)
        assert len(reference(ids, output_hidden_states=True).hidden_states) == 5  # embeddings + 4 blocks


def test_import_dlfa_registers_the_auto_classes_without_loading_torch(pos_run):
    """`import dlfa` alone: no torch (the CLI stays fast), yet the Auto classes know DLFA once they are imported."""
    code = ("import sys, dlfa; light = 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from transformers import AutoModelForTokenClassification as A; "
            f"m = A.from_pretrained({str(pos_run / 'best')!r}); print(light, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.split() == ["True", "DLFAForTokenClassification"], out.stderr[-2000:]


def test_dlfa_evaluate_reads_the_folder_and_reproduces_the_run(pos_run):
    from dlfa.evaluation.run_eval import evaluate_run

    metrics = json.loads((pos_run / "metrics.json").read_text())
    again = evaluate_run(EvaluateConfig(run=str(pos_run)))
    assert again["languages"] == metrics["languages"]
    again = evaluate_run(EvaluateConfig(run=str(pos_run / "best")))  # the model folder itself
    assert again["languages"] == metrics["languages"]


def test_a_bad_setting_is_one_line_naming_the_option(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import FinetuneRecipe

    config = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir),
                         output_dir=str(tmp_path / "run"), fuse_layer=2, reduction=64, cpu=True)
    with pytest.raises(DlfaInputError, match="option --reduction: must be at most the hidden size 32"):
        FinetuneRecipe(config, show_progress=False).setup()
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- pipelines ----------------------------------------------------------------------------------------------------


def test_tagging_pipeline_gives_dlfa_word_tags(pos_run):
    from transformers import pipeline

    best = pos_run / "best"
    sentences = [[w for w, _ in s] for lang in ("de", "ja") for s in TARGET_POS[lang]]
    expected = _dlfa_word_tags(best, "udpos", sentences)
    tagger = pipeline("token-classification", model=str(best), aggregation_strategy="first")
    assert type(tagger.model) is DLFAForTokenClassification
    assert tag_words(tagger, sentences) == expected
    # The check means something: several tags, neighbours that differ, and words that start with a bare "▁".
    assert len({t for s in expected for t in s}) >= 3
    assert any(a != b for s in expected for a, b in zip(s, s[1:]))
    assert any(tag is not None for s in _bare_marker_tags(best, sentences) for tag in s)


def test_tagging_pipeline_iob_prefixes_follow_the_documented_rule(ner_model):
    from transformers import pipeline

    expected_dlfa = _dlfa_word_tags(ner_model, "panx", NER_SENTENCES)
    bare = _bare_marker_tags(ner_model, NER_SENTENCES)
    tagger = pipeline("token-classification", model=str(ner_model), aggregation_strategy="first")
    got = tag_words(tagger, NER_SENTENCES)
    assert got == [_expected_pipeline_iob(t, b) for t, b in zip(expected_dlfa, bare)]
    # Tag types always agree; the cases the rule is about occur.
    assert [[t.split("-")[-1] for t in s] for s in got] == [[t.split("-")[-1] for t in s] for s in expected_dlfa]
    flat = [t for s in expected_dlfa for t in s]
    assert any(t.startswith("I-") for t in flat) and any(t.startswith("B-") for t in flat) and "O" in flat
    assert any(b is not None for s in bare for b in s)


def test_word_tags_from_entities_handles_groups_and_bare_markers():
    words = ["Anna", "Schmidt", "lebt", "in", "Köln"]  # starts: 0, 5, 13, 18, 21
    entities = [  # a bare "▁" of "Köln" (O) ends an O group on its first character; "Köln" starts at 21 too
        {"entity_group": "PER", "start": 0, "end": 12}, {"entity_group": "O", "start": 13, "end": 22},
        {"entity_group": "LOC", "start": 21, "end": 25},
    ]
    assert word_tags_from_entities(entities, words, iob=True) == ["B-PER", "I-PER", "O", "O", "B-LOC"]
    assert word_tags_from_entities(entities, words, iob=False) == ["PER", "PER", "O", "O", "LOC"]
    assert word_tags_from_entities(entities[:1], words, iob=True)[2:] == [None, None, None]
    assert is_iob(get_task("panx").labels) and not is_iob(get_task("udpos").labels)


def test_pair_pipeline_gives_dlfa_labels(pair_model):
    from transformers import pipeline

    classifier = pipeline("text-classification", model=str(pair_model))
    assert type(classifier.model) is DLFAForSequenceClassification
    expected = _dlfa_pair_labels(pair_model, PAIRS)
    assert classify_pairs(classifier, PAIRS, max_length=128) == expected
    assert len(set(expected)) >= 2


# -- without dlfa: remote code, the Hub code path offline ---------------------------------------------------------

DLFA_FREE = textwrap.dedent('''
    import importlib.abc, json, os, sys

    class NoDlfa(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dlfa" or name.startswith("dlfa."):
                raise ImportError("dlfa is not installed here")
            return None

    sys.meta_path.insert(0, NoDlfa())
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "dlfa"))]
    spec = json.loads(sys.argv[1])
    out = {}
    try:
        import dlfa  # noqa: F401
        out["dlfa_importable"] = True
    except ImportError:
        out["dlfa_importable"] = False

    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification, pipeline

    def groups(entities):
        return [[{k: g[k] for k in ("entity_group", "start", "end")} for g in sentence] for sentence in entities]

    def tag(model_id, sentences, **kwargs):
        pipe = pipeline("token-classification", model=model_id, trust_remote_code=True,
                        aggregation_strategy="first", **kwargs)
        return type(pipe.model).__module__, groups(pipe(sentences, is_split_into_words=True, ignore_labels=[]))

    model = AutoModelForTokenClassification.from_pretrained(spec["pos"], trust_remote_code=True)
    out["token_class"] = [type(model).__module__, type(model).__name__]
    out["pos_module"], out["pos"] = tag(spec["pos"], spec["pos_sentences"])
    out["ner_module"], out["ner"] = tag(spec["ner"], spec["ner_sentences"])
    base = AutoModel.from_pretrained(spec["pos"], trust_remote_code=True)
    out["base_class"] = type(base).__name__
    pair = AutoModelForSequenceClassification.from_pretrained(spec["pair"], trust_remote_code=True)
    out["pair_class"] = type(pair).__name__
    classifier = pipeline("text-classification", model=spec["pair"], trust_remote_code=True)
    out["pairs"] = [r["label"] for r in classifier([{"text": a, "text_pair": b} for a, b in spec["pairs"]],
                                                   truncation=True, max_length=128)]
    # The Hub code path: a repository id, resolved from the cache with HF_HUB_OFFLINE=1.
    out["hub_module"], out["hub"] = tag(spec["hub_id"], spec["pos_sentences"])
    try:
        AutoModelForTokenClassification.from_pretrained(spec["broken"], trust_remote_code=True)
        out["broken"] = "loaded"
    except Exception as exc:
        out["broken"] = f"{type(exc).__name__}: {exc}"
    out["dlfa_modules"] = sorted(m for m in sys.modules if m == "dlfa" or m.startswith("dlfa."))
    print("RESULT " + json.dumps(out))
''')


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face cache holding ``folder`` as the main revision of ``repo_id`` (what a download leaves)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def dlfa_free(pos_run, ner_model, pair_model, tmp_path_factory) -> dict:
    """Everything the dlfa-free subprocess saw (one subprocess for all checks)."""
    from safetensors.torch import load_file, save_file

    work = tmp_path_factory.mktemp("dlfa-free")
    _hub_cache(work / "hub", "dlfa-test/tiny-pos", pos_run / "best")
    broken = work / "broken-best"
    broken.mkdir()
    for path in (pos_run / "best").iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("classifier.bias")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    spec = {"pos": str(pos_run / "best"), "ner": str(ner_model), "pair": str(pair_model), "broken": str(broken),
            "hub_id": "dlfa-test/tiny-pos", "pairs": PAIRS, "ner_sentences": NER_SENTENCES,
            "pos_sentences": [[w for w, _ in s] for lang in ("de", "ja") for s in TARGET_POS[lang]]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hub"), HF_MODULES_CACHE=str(work / "modules"),
               HF_HOME=str(work / "home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-I", "-c", DLFA_FREE, json.dumps(spec)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_dlfa_free_environment_cannot_import_dlfa(dlfa_free):
    assert dlfa_free["dlfa_importable"] is False and dlfa_free["dlfa_modules"] == []
    for key in ("token_class", "pos_module", "ner_module", "hub_module"):
        module = dlfa_free[key][0] if isinstance(dlfa_free[key], list) else dlfa_free[key]
        assert module.startswith("transformers_modules.") and module.endswith("modeling_dlfa"), (key, module)
    assert dlfa_free["token_class"][1] == "DLFAForTokenClassification"
    assert dlfa_free["base_class"] == "DLFAModel" and dlfa_free["pair_class"] == "DLFAForSequenceClassification"


def test_dlfa_free_pipelines_agree_with_dlfa_evaluation(dlfa_free, pos_run, ner_model, pair_model):
    sentences = [[w for w, _ in s] for lang in ("de", "ja") for s in TARGET_POS[lang]]
    pos = [word_tags_from_entities(e, s, iob=False) for e, s in zip(dlfa_free["pos"], sentences)]
    assert pos == _dlfa_word_tags(pos_run / "best", "udpos", sentences)
    ner = [word_tags_from_entities(e, s, iob=True) for e, s in zip(dlfa_free["ner"], NER_SENTENCES)]
    bare = _bare_marker_tags(ner_model, NER_SENTENCES)
    assert ner == [_expected_pipeline_iob(t, b) for t, b in
                   zip(_dlfa_word_tags(ner_model, "panx", NER_SENTENCES), bare)]
    assert dlfa_free["pairs"] == _dlfa_pair_labels(pair_model, PAIRS)


def test_hub_ids_load_offline_from_the_cache(dlfa_free):
    assert dlfa_free["hub"] == dlfa_free["pos"]  # the same model, read as a repository id


def test_remote_code_loading_is_strict(dlfa_free):
    assert dlfa_free["broken"].startswith("DLFAWeightsError") and "missing classifier.bias" in dlfa_free["broken"]


# -- Trainer ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["token", "sequence"])
def test_trainer_trains_a_dlfa_model(head, tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    from dlfa.data.features import TaggedSentence

    torch.manual_seed(0)
    if head == "token":
        task = get_task("udpos")
        model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), fuse_layer=2, id2label=list(task.labels))
        examples = [TaggedSentence([w for w, _ in s], [t for _, t in s]) for s in CONLLU_SENTENCES["en"]] * 4
    else:
        task = get_task("xnli")
        model = DLFAForSequenceClassification.from_encoder(str(tiny_model_dir), fuse_layer=2,
                                                           id2label=list(task.labels))
        examples = [SentencePair(a, b, task.labels[i % 3]) for i, (a, b) in enumerate(PAIRS)] * 2
    features = [{k: v for k, v in f.items() if k in ("input_ids", "labels", "label", "token_type_ids")}
                for f in task.featurize(examples, tiny_tokenizer, 64)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             eval_strategy="no", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=features, eval_dataset=features,
                      data_collator=Collator(tiny_tokenizer, head).inner)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("dlfa.fusion.") for k in changed) and any(k.startswith("classifier") for k in changed)
    assert any(k.startswith("dlfa.encoder.") for k in changed)
    output = trainer.predict(features)  # features and hidden states are left out of what Trainer gathers
    assert output.predictions.shape[0] == len(features) and output.predictions.shape[-1] == len(task.labels)
    assert "test_loss" in output.metrics


# -- the model card -----------------------------------------------------------------------------------------------


def test_model_card_is_written_from_metrics(pos_run):
    card = (pos_run / "best" / "README.md").read_text()
    metrics = json.loads((pos_run / "metrics.json").read_text())
    run = json.loads((pos_run / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: token-classification\n")
    assert "language: [en, de, ja]" in card
    assert "# DLFA D_2 on" in card and "| fused layer | 2 of 4 |" in card and "(bert, 4 layers, hidden size 32)" in card
    assert "udpos" in card and "trained on en `train`" in card
    assert f"**{metrics['selection']['best_score']:.2f}**" in card
    for lang, scores in metrics["languages"].items():
        assert f"| {lang} | {scores['f1']:.2f} |" in card
    assert f"| **average, zero-shot languages** | {metrics['average_zero_shot']['f1']:.2f} |" in card
    assert "seed 3" in card and run["command"] in card and f"dlfa {run['versions']['dlfa']}" in card
    assert "* CC BY-NC-SA 3.0: de-test.conllu" in card and "* CC BY-SA 4.0: en-train.conllu" in card
    assert "not listed in MANIFEST.tsv: " in card and "Universal Dependencies v2.5" in card
    assert "no target-language" in card
    steps = run["resolved"]["total_steps"]
    assert f"* Optimisation: 2.0 epochs ({steps} optimizer steps), learning rate 0.003, batch size 4, seed 3." in card
    assert "(scorer `xtreme-2020`, dlfa's udpos f1, in percent)" in card


def test_model_card_names_a_variant_row_with_its_layer(pos_run, tmp_path):
    import shutil

    from dlfa.modeling.card import model_card

    copy = tmp_path / "run"
    shutil.copytree(pos_run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "method": "gate-baseline"}))
    card = model_card(copy)
    assert "| method | gate-baseline+D_2 |" in card and "# gate-baseline+D_2 on" in card


def test_model_card_names_the_steps_of_a_max_steps_run():
    from dlfa.modeling.card import _length

    assert _length({"epochs": 10.0, "max_steps": 200}, {"total_steps": 200}) == "200 optimizer steps (--max-steps)"
    assert _length({"epochs": 3.0}, {}) == "3.0 epochs"


def test_model_card_can_be_rewritten_and_needs_a_finished_run(pos_run, tmp_path):
    from dlfa.modeling.card import write_model_card

    path = write_model_card(pos_run)
    assert path == pos_run / "best" / "README.md"
    with pytest.raises(DlfaInputError, match="metrics.json"):
        (tmp_path / "best").mkdir()
        write_model_card(tmp_path)


# -- dlfa 0.1 folders ---------------------------------------------------------------------------------------------


@pytest.fixture
def legacy_folder(tiny_model_dir, tiny_tokenizer, tmp_path) -> tuple[Path, torch.nn.Module]:
    from dlfa01_modeling import DLFAConfig as LegacyConfig
    from dlfa01_modeling import DLFAModel as LegacyModel

    torch.manual_seed(2)
    labels = list(get_task("xnli").labels)
    model = LegacyModel.from_encoder(LegacyConfig(head="sequence", num_labels=3, labels=labels, fuse_layer=2,
                                                  reduction=2), str(tiny_model_dir)).eval()
    with torch.no_grad():
        model.head.classifier.weight.mul_(60.0)
    model.save_pretrained(tmp_path / "old")
    tiny_tokenizer.save_pretrained(tmp_path / "old")
    return tmp_path / "old", model


def test_legacy_folder_loads_with_a_warning(legacy_folder, caplog):
    folder, old = legacy_folder
    with caplog.at_level("WARNING", logger="dlfa"):
        model = load_dlfa_model(folder)
    assert "dlfa 0.1 model folder" in caplog.text and "dlfa convert" in caplog.text
    assert type(model) is DLFAForSequenceClassification and model.config.fuse_layer == 2
    assert model.config.reduction == 2 and model.config.id2label == dict(enumerate(get_task("xnli").labels))
    ids = torch.tensor([[0, 10, 11, 12, 2], [0, 13, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, old(ids, mask).logits, atol=0, rtol=0)


def test_convert_legacy_folder_writes_a_new_folder(legacy_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    folder, old = legacy_folder
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = convert_legacy_folder(folder, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the source is untouched
    assert "converted" in str(result) and "config.json" in result.files and "modeling_dlfa.py" in result.files
    assert "tokenizer.json" in result.files and "dlfa_config.json" not in result.files
    new = AutoModelForSequenceClassification.from_pretrained(tmp_path / "new")
    assert all(torch.equal(new.state_dict()[k], v) for k, v in load_dlfa_model(folder).state_dict().items())
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    with torch.no_grad():  # rounding may differ in the last bit (weights in another memory layout)
        torch.testing.assert_close(new(ids).logits, old(ids, torch.ones_like(ids)).logits)
    labels = classify_pairs(pipeline("text-classification", model=str(tmp_path / "new")), PAIRS)
    assert labels == _dlfa_pair_labels(folder, PAIRS)  # dlfa's evaluation of the old folder
    assert load_dlfa_model(tmp_path / "new").config.architectures == ["DLFAForSequenceClassification"]


def test_convert_refuses_what_it_must_not_touch(legacy_folder, pos_run, tmp_path):
    folder, _ = legacy_folder
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(DlfaInputError, match="option --output: .* not an empty folder"):
        convert_legacy_folder(folder, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(DlfaInputError, match="already a Hugging Face model folder"):
        convert_legacy_folder(pos_run / "best", tmp_path / "x")
    with pytest.raises(DlfaInputError, match="not a dlfa 0.1 model folder"):
        convert_legacy_folder(tmp_path, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dlfa_evaluate_reads_a_legacy_run(legacy_folder, pos_run, tmp_path, tiny_model_dir, tiny_tokenizer):
    from dlfa01_modeling import DLFAConfig as LegacyConfig
    from dlfa01_modeling import DLFAModel as LegacyModel

    from dlfa.evaluation.run_eval import evaluate_run

    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.json").write_bytes((pos_run / "config.json").read_bytes())
    torch.manual_seed(1)
    LegacyModel.from_encoder(LegacyConfig(num_labels=17, labels=list(get_task("udpos").labels), fuse_layer=2),
                             str(tiny_model_dir)).save_pretrained(run / "best")
    tiny_tokenizer.save_pretrained(run / "best")
    result = evaluate_run(EvaluateConfig(run=str(run), languages=["de"]))
    assert result["fuse_layer"] == 2 and result["languages"]["de"]["words"] > 0


# -- the README's lines -------------------------------------------------------------------------------------------


def _readme_blocks() -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using a trained model with transformers", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_transformers_lines_run(pos_run, pair_model):
    load, publish = _readme_blocks()
    code = load.replace("runs/udpos-d8/best", str(pos_run / "best")).replace("runs/xnli-d11/best", str(pair_model))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert type(scope["model"]).__name__ == "DLFAForTokenClassification"
    words = ["Der", "Hund", "sitzt", "auf", "der", "Matte"]
    assert scope["tag_words"](scope["tagger"], [words]) == _dlfa_word_tags(pos_run / "best", "udpos", [words])
    # Publishing needs the network: check that the calls exist with these arguments.
    import inspect

    from huggingface_hub import HfApi

    compile(publish, "README.md", "exec")
    assert {"repo_id", "folder_path"} <= set(inspect.signature(HfApi.upload_folder).parameters)
    assert "exist_ok" in inspect.signature(HfApi.create_repo).parameters and hasattr(scope["model"], "push_to_hub")


def test_tagging_pipeline_with_a_wordpiece_vocabulary(tiny_model_dir, tmp_path):
    """mBERT-style WordPiece: every word starts with a piece that carries characters, so the rule above reduces to
    IOB2 repair (no bare markers); transformers groups the pieces by their "##" prefix."""
    import string

    from transformers import BertConfig, BertModel, BertTokenizerFast, pipeline

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_letters, *string.punctuation,
             *(f"##{c}" for c in string.ascii_letters), "the", "cat", "in", "Berlin", "##in", "猫", "が", "東", "京"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=False)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False
              ).save_pretrained(tmp_path / "encoder")
    model = DLFAForTokenClassification.from_encoder(str(tmp_path / "encoder"), fuse_layer=1,
                                                    id2label=list(get_task("panx").labels))
    with torch.no_grad():
        model.classifier.weight.mul_(60.0)
    folder = _saved_model(tmp_path / "wp-best", model, tokenizer)
    expected = _dlfa_word_tags(folder, "panx", NER_SENTENCES)
    bare = _bare_marker_tags(folder, NER_SENTENCES)
    assert all(b is None for s in bare for b in s)
    got = tag_words(pipeline("token-classification", model=str(folder)), NER_SENTENCES)
    assert got == [_expected_pipeline_iob(t, b) for t, b in zip(expected, bare)]
    assert any(len(tokenizer.tokenize(w)) > 1 for s in NER_SENTENCES for w in s)  # words of several pieces
    assert len({t for s in expected for t in s}) >= 3
