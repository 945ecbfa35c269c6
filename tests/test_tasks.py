"""PAN-X, XNLI and PAWS-X: readers for every supported file form, bad input, pair features, metrics, real data
and a tiny end-to-end run per task."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

import pytest
from conftest import SHARED_DATA, shared_data

from dlfa.cli.main import main
from dlfa.data.batching import Collator
from dlfa.data.features import IGNORE_INDEX, TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks import TASKS, get_task
from dlfa.tasks.base import PairClassificationTask, SentencePair, TaggingTask
from dlfa.tasks.panx import NER_TAGS, ner_metrics, read_panx
from dlfa.tasks.pawsx import read_pawsx
from dlfa.tasks.xnli import file_languages, read_xnli

PANX, XNLI, PAWSX = get_task("panx"), get_task("xnli"), get_task("pawsx")


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def raises_at(path, line: int | None, message: str):
    """Expect a DlfaInputError naming ``path`` (and ``line``) whose text contains ``message``."""
    with pytest.raises(DlfaInputError) as info:
        yield
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: " if line is not None else f"{path}: "), text
    assert message in text, text


# -- registry ----------------------------------------------------------------------------------------------------


def test_all_four_tasks_are_registered_with_xtreme_settings():
    assert set(TASKS) == {"udpos", "panx", "xnli", "pawsx"}
    assert isinstance(PANX, TaggingTask) and PANX.head == "token"
    assert isinstance(XNLI, PairClassificationTask) and XNLI.head == "sequence"
    assert isinstance(PAWSX, PairClassificationTask) and PAWSX.head == "sequence"
    assert PANX.labels == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
    assert XNLI.labels == ("entailment", "neutral", "contradiction")
    assert PAWSX.labels == ("0", "1")
    assert (len(PANX.languages), len(XNLI.languages), len(PAWSX.languages)) == (40, 15, 7)
    assert (PANX.eval_split, XNLI.eval_split, PAWSX.eval_split) == ("dev", "test", "test")
    assert (PANX.primary_metric, XNLI.primary_metric, PAWSX.primary_metric) == ("f1", "accuracy", "accuracy")
    assert PANX.fallback_label == "O"
    assert (PANX.defaults.epochs, XNLI.defaults.epochs, PAWSX.defaults.epochs) == (10, 5, 5)
    for task in (PANX, XNLI, PAWSX):
        assert task.defaults.learning_rate == 2e-5
        assert task.defaults.batch_size == 32 and task.defaults.max_length == 128
    assert XNLI.parallel_splits == ("dev", "test") and PAWSX.parallel_splits == ("dev", "test")
    assert PANX.parallel_splits == () and get_task("udpos").parallel_splits == ()


# -- PAN-X ---------------------------------------------------------------------------------------------------------

PANX_VALID = "R.H.\tB-ORG\nSaunders\tI-ORG\n(\tO\nbar:7\tO\n\n\nAnders\tB-PER\nLindström\tI-PER\n"


def test_panx_reads_xtreme_form_keeping_colon_tokens(tmp_path):
    path = write(tmp_path / "train-en.tsv", PANX_VALID + "\n\n")
    sentences = read_panx(path)
    assert [s.words for s in sentences] == [["R.H.", "Saunders", "(", "bar:7"], ["Anders", "Lindström"]]
    assert [s.tags for s in sentences] == [["B-ORG", "I-ORG", "O", "O"], ["B-PER", "I-PER"]]


def test_panx_reads_wikiann_prefixed_form(tmp_path):
    path = write(tmp_path / "dev-de.tsv", "de:Angela\tB-PER\nde:Merkel\tI-PER\n\nzh-yue:bar:7\tO\nde:Berlin\tB-LOC\n")
    sentences = read_panx(path)
    assert [s.words for s in sentences] == [["Angela", "Merkel"], ["bar:7", "Berlin"]]
    assert [s.tags for s in sentences] == [["B-PER", "I-PER"], ["O", "B-LOC"]]


def test_panx_invalid_iob2_is_legal_input(tmp_path):
    path = write(tmp_path / "dev-en.tsv", "the\tO\nMerkel\tI-PER\n")
    assert read_panx(path)[0].tags == ["O", "I-PER"]


@pytest.mark.parametrize(
    "content,line,message",
    [
        ("EU\tB-ORG\nrejects\tO\tx\n", 2, "expected 2 tab-separated columns (token, tag), found 3"),
        ("EU\tB-ORG\nrejects O\n", 2, "expected 2 tab-separated columns (token, tag), found 1"),
        ("EU\tB-ORG\nGerman\tB-MISC\n", 2, "unknown tag 'B-MISC'"),
        ("EU\tB-ORG\n\tO\n", 2, "empty token"),
        # Prefixed majority, one bare line.
        ("en:EU\tB-ORG\nen:rejects\tO\ncalls\tO\n", 3, "mixed formats"),
        # Plain majority, then a whole sentence in WikiANN's form (two files concatenated).
        ("EU\tB-ORG\nrejects\tO\nGerman\tO\ncalls\tO\n\nen:Boycott\tO\nen:British\tB-LOC\n", 6, "mixed formats"),
    ],
)
def test_panx_bad_input_names_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path / "train-en.tsv", content)
    with raises_at(path, line, message):
        read_panx(path)


def test_panx_empty_file_bad_encoding_and_nul(tmp_path):
    empty = write(tmp_path / "empty.tsv", "\n\n")
    with raises_at(empty, None, "no sentences"):
        read_panx(empty)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("EU\tB-ORG\nK\xf6ln\tB-LOC\n".encode("latin-1"))
    with raises_at(latin, 2, "not valid UTF-8"):
        read_panx(latin)
    nul = tmp_path / "nul.tsv"
    nul.write_bytes(b"EU\tB-ORG\x00\n")
    with raises_at(nul, 1, "NUL byte"):
        read_panx(nul)


def test_panx_file_names_and_one_file_per_language(tmp_path):
    write(tmp_path / "train-en.tsv", PANX_VALID)
    write(tmp_path / "dev-en.tsv", PANX_VALID)
    write(tmp_path / "dev-de.tsv", PANX_VALID)
    write(tmp_path / "fr-dev.tsv", PANX_VALID)
    write(tmp_path / "notes.txt", "x")
    assert PANX.available_languages(tmp_path, "dev") == ["de", "en", "fr"]
    assert PANX.resolve_languages(tmp_path, None, "--languages") == ["de", "en", "fr"]
    assert len(PANX.read(tmp_path, "en", "train")) == 2
    write(tmp_path / "de-dev.tsv", PANX_VALID)
    with pytest.raises(DlfaInputError, match="several panx dev files for language 'de'"):
        PANX.read(tmp_path, "de", "dev")
    with pytest.raises(DlfaInputError, match="no panx test file for language 'en'"):
        PANX.read(tmp_path, "en", "test")


def test_seqeval_entity_metrics_hand_example():
    metrics = ner_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    assert metrics["precision"] == pytest.approx(100.0)
    assert metrics["recall"] == pytest.approx(50.0)
    assert metrics["f1"] == pytest.approx(200 / 3)
    assert metrics["words"] == 4 and isinstance(metrics["words"], int)
    # Default (conlleval-like) mode: I-PER after O starts a PER entity, equal to a B-PER one.
    assert ner_metrics([["O", "I-PER"]], [["O", "B-PER"]])["f1"] == pytest.approx(100.0)
    # No entity predicted at all: 0, without a warning turning into an error.
    assert ner_metrics([["B-LOC"]], [["O"]]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "words": 1}


def test_panx_score_from_features(tiny_tokenizer):
    sentences = [TaggedSentence(["the", "cat", "Merkel"], ["O", "O", "B-PER"]), TaggedSentence(["Paris"], ["B-LOC"])]
    features = PANX.featurize(sentences, tiny_tokenizer, 64)
    gold_ids = [[lab for lab in f["labels"] if lab != IGNORE_INDEX] for f in features]
    assert [[NER_TAGS[i] for i in ids] for ids in gold_ids] == [s.tags for s in sentences]
    perfect = PANX.score(sentences, features, gold_ids)
    assert perfect["f1"] == pytest.approx(100.0) and perfect["unaligned_words"] == 0
    miss = PANX.score(sentences, features, [gold_ids[0], [0]])  # Paris predicted O
    assert miss["precision"] == pytest.approx(100.0) and miss["recall"] == pytest.approx(50.0)



def test_token_predictions_are_read_at_the_labelled_sub_token(tiny_tokenizer):
    """predict() returns, per feature, the model's prediction at each labelled sub-token, in order, whatever the
    batching and padding: a model whose prediction at position t is t shows exactly which positions were read."""
    import torch

    from dlfa.evaluation.evaluate import predict

    class PositionModel(torch.nn.Module):
        head_type = "token"

        def forward(self, input_ids, attention_mask=None, **kwargs):
            positions = torch.arange(input_ids.size(1)).expand(input_ids.size(0), -1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(positions, 64).float()})()

    # Multi-piece words ("Merkel", "Katzen") and a bare-"▁" CJK word, so labelled positions are not every position.
    sentences = [TaggedSentence(["the", "Merkel", "cat"], ["O", "B-PER", "O"]), TaggedSentence(["Paris"], ["B-LOC"]),
                 TaggedSentence(["猫", "Katzen", "sat", "on", "der"], ["O"] * 5)]
    features = PANX.featurize(sentences, tiny_tokenizer, 64)
    labelled = [[i for i, label in enumerate(f["labels"]) if label != IGNORE_INDEX] for f in features]
    assert any(b - a > 1 for positions in labelled for a, b in zip(positions, positions[1:]))  # gaps exist
    for batch_size in (1, 2, 3):
        assert predict(PositionModel(), features, Collator(tiny_tokenizer, "token"), batch_size) == labelled

# -- XNLI ----------------------------------------------------------------------------------------------------------

XNLI_PLAIN = "A man sleeps.\tA person rests.\tentailment\nA man sleeps.\tA cat runs.\tneutral\nA\tB\tcontradiction\n"
XNLI_10_HEADER = (
    "language\tgold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
    "sentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\t"
    "sentence1_tokenized\tsentence2_tokenized\tmatch\n"
)


def xnli10_row(language: str, label: str, premise: str, hypothesis: str) -> str:
    fields = [language, label, "", "", "", "", premise, hypothesis, "1", "2", "facetoface", label, label, label,
              label, label, premise, hypothesis, "True"]
    return "\t".join(fields) + "\n"


def test_xnli_reads_xtreme_form(tmp_path):
    pairs = read_xnli(write(tmp_path / "test-de.tsv", XNLI_PLAIN))
    assert pairs[0] == SentencePair("A man sleeps.", "A person rests.", "entailment")
    assert [p.label for p in pairs] == ["entailment", "neutral", "contradiction"]


def test_xnli_reads_xnli_mt_header_and_contradictory(tmp_path):
    path = write(tmp_path / "multinli.train.en.tsv", "premise\thypo\tlabel\nA\tB\tcontradictory\nC\tD\tneutral\n")
    assert read_xnli(path) == [SentencePair("A", "B", "contradiction"), SentencePair("C", "D", "neutral")]
    assert XNLI.available_languages(tmp_path, "train") == ["en"]


def test_xnli_reads_the_xnli_1_0_file_by_language(tmp_path):
    text = XNLI_10_HEADER + "".join([
        xnli10_row("en", "neutral", "A man.", "A woman."),
        xnli10_row("de", "neutral", "Ein Mann.", "Eine Frau."),
        xnli10_row("en", "entailment", "Dogs bark.", "Animals make noise."),
        xnli10_row("fr", "contradiction", "Un chat.", "Pas de chat."),
    ])
    path = write(tmp_path / "xnli.test.tsv", text)
    assert file_languages(path) == ["de", "en", "fr"]
    assert [p.text_a for p in read_xnli(path, "en")] == ["A man.", "Dogs bark."]
    assert len(read_xnli(path)) == 4
    with raises_at(path, None, "no rows for language 'zh'"):
        read_xnli(path, "zh")
    # As a task data folder: the one file serves every language, with per-language files beside it.
    write(tmp_path / "test-zh.tsv", XNLI_PLAIN)
    assert XNLI.available_languages(tmp_path, "test") == ["de", "en", "fr", "zh"]
    assert XNLI.files(tmp_path, "de", "test") == [path]
    assert XNLI.read(tmp_path, "fr", "test") == [SentencePair("Un chat.", "Pas de chat.", "contradiction")]
    assert len(XNLI.read(tmp_path, "zh", "test")) == 3
    assert XNLI.resolve_languages(tmp_path, ["fr", "en"], "--languages") == ["fr", "en"]


def test_xnli_reads_multinli_train_skipping_no_majority(tmp_path):
    header = "gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t" \
             "sentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1\n"
    rows = ["neutral\t\t\t\t\tA\tB\t1\t1n\tgov\tneutral\n", "-\t\t\t\t\tC\tD\t2\t2n\tgov\tneutral\n",
            "entailment\t\t\t\t\tE\tF\t3\t3e\tgov\tentailment\n"]
    path = write(tmp_path / "multinli_1.0_train.txt", header + "".join(rows))
    assert read_xnli(path) == [SentencePair("A", "B", "neutral"), SentencePair("E", "F", "entailment")]
    assert XNLI.available_languages(tmp_path, "train") == ["en"]
    assert len(XNLI.read(tmp_path, "en", "train")) == 2


@pytest.mark.parametrize(
    "name,content,line,message",
    [
        ("test-de.tsv", "A\tB\tneutral\nA\tB\n", 2, "expected 3 tab-separated columns (premise, hypothesis, label), found 2"),
        ("test-de.tsv", "A\tB\tneutral\nA\tB\tneutral\tx\n", 2, "found 4"),
        ("test-de.tsv", "A\tB\tneutral\nA\tB\tcontradicts\n", 2, "unknown label 'contradicts'"),
        ("test-de.tsv", "A\tB\t1\n", 1, "unknown label '1'"),
        ("xnli.test.tsv", XNLI_10_HEADER + "en\tneutral\tx\n", 2, "expected 19 tab-separated columns as named in the header"),
        ("xnli.test.tsv", XNLI_10_HEADER + xnli10_row("en", "neutrall", "A", "B"), 2, "unknown label 'neutrall'"),
        ("xnli.test.tsv", XNLI_10_HEADER + xnli10_row("English", "neutral", "A", "B"), 2, "bad language code"),
    ],
)
def test_xnli_bad_input_names_file_and_line(tmp_path, name, content, line, message):
    path = write(tmp_path / name, content)
    with raises_at(path, line, message):
        read_xnli(path)


def test_xnli_empty_header_only_and_bad_encoding(tmp_path):
    for name, text in (("empty.tsv", ""), ("blank.tsv", "\n \n"), ("header.tsv", "premise\thypo\tlabel\n"),
                       ("xnli.dev.tsv", XNLI_10_HEADER)):
        path = write(tmp_path / name, text)
        with raises_at(path, None, "no sentence pairs"):
            read_xnli(path)
    latin = tmp_path / "data" / "dev-fr.tsv"
    latin.parent.mkdir()
    latin.write_bytes("Caf\xe9\tB\tneutral\n".encode("latin-1"))
    with raises_at(latin, 1, "not valid UTF-8"):
        XNLI.read(latin.parent, "fr", "dev")
    with raises_at(tmp_path / "missing.tsv", None, "file not found"):
        read_xnli(tmp_path / "missing.tsv")


def test_xnli_file_names(tmp_path):
    write(tmp_path / "dev-en.tsv", XNLI_PLAIN)
    write(tmp_path / "de-dev.tsv", XNLI_PLAIN)
    write(tmp_path / "test-en.tsv", XNLI_PLAIN)
    assert XNLI.available_languages(tmp_path, "dev") == ["de", "en"]
    assert XNLI.resolve_languages(tmp_path, None, "--languages") == ["en"]
    write(tmp_path / "en-dev.tsv", XNLI_PLAIN)
    with pytest.raises(DlfaInputError, match="several xnli dev files for language 'en'"):
        XNLI.read(tmp_path, "en", "dev")


# -- PAWS-X --------------------------------------------------------------------------------------------------------

PAWSX_PLAIN = "The cat sat .\tThe cat was sitting .\t1\nThe cat sat .\tThe mat sat .\t0\n"
PAWSX_RELEASE = "id\tsentence1\tsentence2\tlabel\n1\tDer Hund .\tDer Hund .\t1\n2\tA\tB\t0\n32035\t\t\t0\n"


def test_pawsx_reads_xtreme_form_and_its_header(tmp_path):
    assert read_pawsx(write(tmp_path / "test-de.tsv", PAWSX_PLAIN)) == [
        SentencePair("The cat sat .", "The cat was sitting .", "1"), SentencePair("The cat sat .", "The mat sat .", "0")
    ]
    headed = write(tmp_path / "h.tsv", "sentence1\tsentence2\tlabel\n" + PAWSX_PLAIN)
    assert len(read_pawsx(headed)) == 2


def test_pawsx_reads_the_release_layout(tmp_path):
    final = tmp_path / "x-final"
    write(final / "de" / "test_2k.tsv", PAWSX_RELEASE)
    write(final / "de" / "dev_2k.tsv", PAWSX_RELEASE)
    write(final / "de" / "translated_train.tsv", PAWSX_RELEASE)
    write(final / "en" / "train.tsv", PAWSX_RELEASE)
    write(final / "en" / "dev_2k.tsv", PAWSX_RELEASE)
    pairs = read_pawsx(final / "de" / "test_2k.tsv")
    # The release's untranslated rows (empty sentences) are kept, as XTREME does.
    assert pairs == [SentencePair("Der Hund .", "Der Hund .", "1"), SentencePair("A", "B", "0"), SentencePair("", "", "0")]
    assert PAWSX.available_languages(final, "test") == ["de"]
    assert PAWSX.available_languages(final, "dev") == ["de", "en"]
    assert PAWSX.available_languages(final, "train") == ["de", "en"]
    assert len(PAWSX.read(final, "en", "train")) == 3


@pytest.mark.parametrize(
    "content,line,message",
    [
        (PAWSX_PLAIN + "1\tA\tB\t0\n", 3, "expected 3 tab-separated columns (sentence1, sentence2, label), found 4"),
        (PAWSX_RELEASE + "A\tB\t0\n", 5, "expected 4 tab-separated columns (id, sentence1, sentence2, label), found 3"),
        (PAWSX_PLAIN + "A\tB\t2\n", 3, "unknown label '2'"),
        ("A\tB\tparaphrase\n", 1, "unknown label 'paraphrase'"),
    ],
)
def test_pawsx_bad_input_names_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path / "test-de.tsv", content)
    with raises_at(path, line, message):
        read_pawsx(path)


def test_pawsx_empty_and_bad_encoding(tmp_path):
    for name, text in (("empty.tsv", ""), ("header.tsv", "id\tsentence1\tsentence2\tlabel\n")):
        path = write(tmp_path / name, text)
        with raises_at(path, None, "no sentence pairs"):
            read_pawsx(path)
    bad = tmp_path / "dev-de.tsv"
    bad.write_bytes(b"A\tB\t1\n\xff\xfe\tB\t0\n")
    with raises_at(bad, 2, "not valid UTF-8"):
        read_pawsx(bad)


# -- pair features, padding, accuracy ------------------------------------------------------------------------------


def test_pair_features_hold_both_sentences_between_special_tokens(tiny_tokenizer):
    pairs = [SentencePair("the cat sat", "der dog", "entailment"), SentencePair("a mat", "le chat", "contradiction")]
    features = XNLI.featurize(pairs, tiny_tokenizer, 64)
    assert [f["label"] for f in features] == [0, 2]
    tokens = tiny_tokenizer.convert_ids_to_tokens(features[0]["input_ids"])
    assert tokens == ["<s>", "▁the", "▁cat", "▁sat", "</s>", "</s>", "▁der", "▁dog", "</s>"]
    # This (XLM-R-like) tokenizer makes no token type ids; the feature then has none.
    assert "token_type_ids" not in features[0]
    assert set(features[0]) == {"input_ids", "label"}


def test_pair_features_truncate_to_max_length(tiny_tokenizer):
    long = " ".join(["the cat sat on the mat"] * 10)
    (feature,) = PAWSX.featurize([SentencePair(long, long, "1")], tiny_tokenizer, 16)
    assert len(feature["input_ids"]) == 16
    tokens = tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 3  # both sentences kept


@pytest.fixture(scope="module")
def bert_style_tokenizer():
    """A tokenizer that makes token type ids (0 for the first sentence, 1 for the second), like mBERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "der", "hund"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def test_pair_features_keep_token_type_ids_when_the_tokenizer_makes_them(bert_style_tokenizer):
    (feature,) = XNLI.featurize([SentencePair("the cat", "der hund", "neutral")], bert_style_tokenizer, 64)
    assert feature["input_ids"] == [2, 4, 5, 3, 6, 7, 3]
    assert feature["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert feature["label"] == 1
    batch = Collator(bert_style_tokenizer, "sequence")([feature, {**feature, "input_ids": [2, 4, 3, 6, 3],
                                                                   "token_type_ids": [0, 0, 0, 1, 1]}])
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]


def test_collator_pads_pair_features(tiny_tokenizer):
    pairs = [SentencePair("the cat sat on the mat", "a dog", "1"), SentencePair("a", "le", "0")]
    features = PAWSX.featurize(pairs, tiny_tokenizer, 64)
    batch = Collator(tiny_tokenizer, "sequence")(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][1, lengths[1]:].tolist() == [tiny_tokenizer.pad_token_id] * (max(lengths) - lengths[1])
    assert batch["labels"].tolist() == [1, 0]


def test_pair_accuracy():
    pairs = [SentencePair("a", "b", label) for label in ("entailment", "neutral", "contradiction", "neutral")]
    metrics = XNLI.score(pairs, [{}] * 4, [0, 1, 1, 0])
    assert metrics == {"scorer": "accuracy", "accuracy": 50.0, "examples": 4}
    assert isinstance(metrics["examples"], int)
    with pytest.raises(ValueError):
        XNLI.score(pairs, [{}] * 4, [0, 1])


# -- real data (skipped when ../shared/data is absent) ------------------------------------------------------------


def manifest_counts(task: str) -> dict[str, int]:
    with open(SHARED_DATA / "MANIFEST.tsv", encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {row["file"].split("/", 1)[1]: int(row["examples"]) for row in rows if row["file"].startswith(task + "/")}


def test_real_panx_files_parse_with_manifest_counts():
    folder = shared_data("panx")
    counts = manifest_counts("panx")
    train = PANX.read(folder, "en", "train")
    assert len(train) == counts["train-en.tsv"] == 20000
    assert {tag for s in train for tag in s.tags} == set(NER_TAGS)
    for lang in ("en", "de", "zh", "jv"):
        assert len(PANX.read(folder, lang, "dev")) == counts[f"dev-{lang}.tsv"]
    assert len(PANX.available_languages(folder, "dev")) == sum(name.startswith("dev-") for name in counts)


def test_real_xnli_files_parse_with_manifest_counts():
    folder = shared_data("xnli")
    counts = manifest_counts("xnli")
    for split in ("dev", "test"):
        languages = XNLI.available_languages(folder, split)
        assert len(languages) == sum(name.startswith(split + "-") for name in counts) == 13
        for lang in languages:
            pairs = XNLI.read(folder, lang, split)
            assert len(pairs) == counts[f"{split}-{lang}.tsv"]
    # Parallel files share their labels row by row.
    assert [p.label for p in XNLI.read(folder, "de", "test")] == [p.label for p in XNLI.read(folder, "en", "test")]


def test_real_pawsx_files_parse_with_manifest_counts():
    folder = shared_data("pawsx")
    counts = manifest_counts("pawsx")
    for split in ("dev", "test"):
        for lang in PAWSX.available_languages(folder, split):
            assert len(PAWSX.read(folder, lang, split)) == counts[f"{split}-{lang}.tsv"]
    assert PAWSX.resolve_languages(folder, None, "--languages") == ["de", "zh"]


# -- end to end through the CLI ------------------------------------------------------------------------------------

E2E_DATA = {
    "panx": (
        ["the\tO\ncat\tO\nMerkel\tB-PER\nsat\tO\n", "Paris\tB-LOC\nis\tO\na\tO\nmat\tO\n",
         "der\tO\nEU\tB-ORG\nund\tO\nMerkel\tB-PER\n"],
        "\n",
    ),
    "xnli": (
        ["the cat sat\tthe cat sat\tentailment\n", "the cat sat\ta dog sat\tneutral\n", "the cat sat\tno cat\tcontradiction\n"],
        "",
    ),
    "pawsx": (["the cat sat on the mat\tthe mat sat on the cat\t0\n", "the cat sat\tthe cat sat\t1\n"], ""),
}


@pytest.mark.parametrize("task", ["panx", "xnli", "pawsx"])
def test_train_and_evaluate_end_to_end(tiny_model_dir, tmp_path, task):
    examples, sep = E2E_DATA[task]
    body = sep.join(examples)
    data = tmp_path / task
    eval_split = get_task(task).eval_split
    write(data / "train-en.tsv", sep.join(examples * 4))
    write(data / "dev-en.tsv", body)
    if eval_split != "dev":
        write(data / f"{eval_split}-en.tsv", body)
    write(data / f"{eval_split}-de.tsv", body)
    out = tmp_path / "run"
    args = ["train", "--task", task, "--model", str(tiny_model_dir), "--data-dir", str(data), "--output", str(out),
            "--epochs", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--fuse-layer", "2"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["eval_split"] == eval_split
    assert set(metrics["languages"]) == {"de", "en"}
    primary = get_task(task).primary_metric
    for lang_metrics in metrics["languages"].values():
        assert 0.0 <= lang_metrics[primary] <= 100.0
    if task == "panx":
        assert {"precision", "recall"} <= set(metrics["languages"]["de"])
    else:
        assert metrics["languages"]["de"]["examples"] == len(examples)
        assert primary in metrics["average"] and "examples" not in metrics["average"]
    # Re-scoring the saved model gives the numbers the run reported.
    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["languages"]["de"][primary] == pytest.approx(metrics["languages"]["de"][primary])


def test_bad_pair_file_stops_the_run_with_one_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "xnli"
    write(data / "train-en.tsv", XNLI_PLAIN)
    write(data / "dev-en.tsv", XNLI_PLAIN)
    write(data / "test-de.tsv", XNLI_PLAIN + "A\tB\tmaybe\n")
    out = tmp_path / "run"
    assert main(["train", "--task", "xnli", "--model", str(tiny_model_dir), "--data-dir", str(data),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test-de.tsv:4: unknown label 'maybe'" in err[0]
    assert not out.exists()
