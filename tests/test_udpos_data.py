"""CoNLL-U reader, sub-token label alignment (including bare ▁ pieces) and windows."""

from __future__ import annotations

import copy
import logging

import pytest
from conftest import shared_data, write_conllu

from dlfa.data.features import (
    IGNORE_INDEX,
    TaggedSentence,
    piece_carries_characters,
    sentence_predictions,
    tokenize_tagged,
)
from dlfa.errors import DlfaInputError
from dlfa.tasks import get_task
from dlfa.tasks.udpos import UPOS_TAGS, read_conllu

TASK = get_task("udpos")
L2I = TASK.label_to_id


def test_reader_skips_ranges_and_empty_nodes(tmp_path):
    text = (
        "# sent_id = 1\n# text = Im Haus.\n"
        "1-2\tIm\t_\t_\t_\t_\t_\t_\t_\t_\n"
        "1\tIn\tin\tADP\t_\t_\t3\tcase\t_\t_\n"
        "2\tdem\tder\tDET\t_\t_\t3\tdet\t_\t_\n"
        "2.1\tist\tsein\tAUX\t_\t_\t_\t_\t_\t_\n"
        "3\tHaus\tHaus\tNOUN\t_\t_\t0\troot\t_\t_\n"
        "4\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_\n"
        "\n"
        "1\tJa\tja\tINTJ\t_\t_\t0\troot\t_\t_\n"
    )
    path = tmp_path / "de-test.conllu"
    path.write_text(text, encoding="utf-8")
    sentences = read_conllu(path)
    assert [s.words for s in sentences] == [["In", "dem", "Haus", "."], ["Ja"]]
    assert [s.tags for s in sentences] == [["ADP", "DET", "NOUN", "PUNCT"], ["INTJ"]]


@pytest.mark.parametrize(
    "content,line,message",
    [
        ("1\tcat\t_\tNOUN\t_\t_\t_\t_\t_\n", 1, "expected 10 tab-separated"),
        ("1\tcat\t_\tNOUN\t_\t_\t_\t_\t_\t_\n2\tsat\t_\tVERBB\t_\t_\t_\t_\t_\t_\n", 2, "unknown UPOS tag 'VERBB'"),
        ("1\tcat\t_\tNOUN\t_\t_\t_\t_\t_\t_\n3\tsat\t_\tVERB\t_\t_\t_\t_\t_\t_\n", 2, "out of sequence"),
        ("x\tcat\t_\tNOUN\t_\t_\t_\t_\t_\t_\n", 1, "not a number"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.conllu"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DlfaInputError) as info:
        read_conllu(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert message in str(info.value)


def test_reader_empty_missing_and_bad_encoding(tmp_path):
    empty = tmp_path / "empty.conllu"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(DlfaInputError, match="no sentences"):
        read_conllu(empty)
    with pytest.raises(DlfaInputError, match="file not found"):
        read_conllu(tmp_path / "missing.conllu")
    latin = tmp_path / "latin1.conllu"
    latin.write_bytes("1\tcaf\xe9\t_\tNOUN\t_\t_\t_\t_\t_\t_\n".encode("latin-1"))
    with pytest.raises(DlfaInputError, match=r"latin1\.conllu:1: not valid UTF-8"):
        read_conllu(latin)


def test_piece_carries_characters():
    assert not piece_carries_characters("▁")
    assert piece_carries_characters("▁the")
    assert piece_carries_characters("猫")
    assert piece_carries_characters("##ing")
    assert not piece_carries_characters("##")


def test_label_goes_on_first_piece_with_characters(tiny_tokenizer):
    # The tiny tokenizer splits 猫 into a bare "▁" and "猫", like XLM-R does for most CJK words.
    sentence = TaggedSentence(["猫", "が", "座っ"], ["NOUN", "ADP", "VERB"])
    (feature,) = tokenize_tagged([sentence], tiny_tokenizer, L2I, max_length=64)
    tokens = tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["<s>", "▁", "猫", "▁", "が", "▁", "座", "っ", "</s>"]
    labelled = [(tok, UPOS_TAGS[lab]) for tok, lab in zip(tokens, feature["labels"]) if lab != IGNORE_INDEX]
    assert labelled == [("猫", "NOUN"), ("が", "ADP"), ("座", "VERB")]
    assert feature["word_indices"] == [0, 1, 2]


def test_label_on_first_piece_for_ordinary_words(tiny_tokenizer):
    sentence = TaggedSentence(["the", "cats"], ["DET", "NOUN"])
    (feature,) = tokenize_tagged([sentence], tiny_tokenizer, L2I, max_length=64)
    tokens = tiny_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    labelled = [tok for tok, lab in zip(tokens, feature["labels"]) if lab != IGNORE_INDEX]
    assert labelled == ["▁the", "▁cat"]  # "cats" = "▁cat" + "s": the label sits on the first piece


def test_long_sentences_are_split_into_windows_without_losing_labels(tiny_tokenizer):
    words = ["the", "cat", "sat", "on", "the", "mat"] * 10
    tags = ["DET", "NOUN", "VERB", "ADP", "DET", "NOUN"] * 10
    sentences = [TaggedSentence(["a"], ["DET"]), TaggedSentence(words, tags)]
    features = tokenize_tagged(sentences, tiny_tokenizer, L2I, max_length=16)
    long_windows = [f for f in features if f["sentence_index"] == 1]
    assert len(long_windows) == 5  # 60 one-piece words, 14 per window
    for f in long_windows:
        assert len(f["input_ids"]) <= 16
        assert f["input_ids"][0] == tiny_tokenizer.cls_token_id and f["input_ids"][-1] == tiny_tokenizer.sep_token_id
    flat = [w for f in long_windows for w in f["word_indices"]]
    assert flat == list(range(60))
    labels = [UPOS_TAGS[lab] for f in long_windows for lab in f["labels"] if lab != IGNORE_INDEX]
    assert labels == tags
    # Reassembly puts every window's predictions back on the right words.
    predictions = [[lab for lab in f["labels"] if lab != IGNORE_INDEX] for f in features]
    rebuilt, unaligned = sentence_predictions(features, predictions, [1, 60], UPOS_TAGS, "X")
    assert rebuilt == [["DET"], tags] and unaligned == 0


def test_words_without_pieces_are_counted_not_skipped():
    features = [{"sentence_index": 0, "word_indices": [0, 2]}]
    rebuilt, unaligned = sentence_predictions(features, [[7, 12]], [3], UPOS_TAGS, "X")
    assert rebuilt == [["NOUN", "X", "PUNCT"]] and unaligned == 1


def test_language_files_and_unknown_language(tmp_path):
    write_conllu(tmp_path / "en-train.conllu", [[("a", "DET")]])
    write_conllu(tmp_path / "de_gsd-ud-test.conllu", [[("a", "DET")]])
    write_conllu(tmp_path / "fr-test.conllu", [[("a", "DET")]])
    assert TASK.available_languages(tmp_path, "test") == ["de", "fr"]
    assert TASK.resolve_languages(tmp_path, None, "--languages") == ["de", "fr"]
    with pytest.raises(DlfaInputError, match="option --languages: unknown language 'xx'"):
        TASK.resolve_languages(tmp_path, ["de", "xx"], "--languages")


def test_xtreme_pos_metric():
    metrics = TASK.tag_metrics([["NOUN", "VERB", "PUNCT"]], [["NOUN", "NOUN", "PUNCT"]])
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert 0 < metrics["f1"] < 100


def test_real_udpos_files_parse():
    folder = shared_data("udpos")
    sentences = TASK.read(folder, "en", "dev")
    assert len(sentences) == 2001
    assert all(tag in UPOS_TAGS for s in sentences for tag in s.tags)
    assert len(TASK.available_languages(folder, "test")) >= 20


def test_a_sentence_longer_than_the_model_is_windowed_without_transformers_false_alarm(tiny_tokenizer, caplog):
    """transformers warns that a sequence over model_max_length "will result in indexing errors"; dlfa windows it
    instead, so it asks the tokenizer not to warn and logs the split itself."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.model_max_length = 20
    words = ["the", "cat", "sat", "on", "the", "mat"] * 10
    sentences = [TaggedSentence(["a"], ["DET"]), TaggedSentence(words, ["DET"] * 60)]
    with caplog.at_level(logging.INFO, logger="dlfa"):
        features = tokenize_tagged(sentences, tokenizer, L2I, max_length=16)
    assert len(features) == 6  # the short sentence, and 5 windows of the long one
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert [r.getMessage() for r in caplog.records if r.name == "dlfa"] == [
        "1 of 2 sentences are longer than the 16-sub-token window: split at word boundaries into 5 windows "
        "(no label dropped)"
    ]
