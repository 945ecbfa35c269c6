"""Turn examples into model features: sub-token alignment for tagging, windows for long sentences.

A tagged sentence is a list of words with one label each. The encoder sees sub-tokens, so each word's label
is placed on exactly one of its sub-tokens and every other position gets -100 (ignored by the loss and
the metrics). Which sub-token matters for SentencePiece vocabularies (XLM-R, e5): a word is often split
into a bare ``▁`` piece followed by the pieces with its characters (most Chinese and Japanese words). The
bare ``▁`` sees none of the word, so the label goes on the word's first sub-token that carries characters.

Sentences longer than the model's window are split at word boundaries into several features, each with
its own special tokens; no label is dropped or truncated.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger("dlfa")

IGNORE_INDEX = -100
_SUBWORD_MARKERS = ("▁", "##", "Ġ")


def piece_carries_characters(piece: str) -> bool:
    """True unless the sub-token is only a word-start/continuation marker (e.g. a bare ``▁``)."""
    stripped = piece
    for marker in _SUBWORD_MARKERS:
        stripped = stripped.replace(marker, "")
    return bool(stripped.strip())


@dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]


def tokenize_tagged(
    sentences: Sequence[TaggedSentence],
    tokenizer,
    label_to_id: dict[str, int],
    max_length: int,
    batch_size: int = 1000,
) -> list[dict]:
    """Featurize tagged sentences: one or more windows of at most ``max_length`` sub-tokens each.

    Every feature holds ``input_ids``, ``labels`` (label id on one sub-token per word, -100 elsewhere),
    ``sentence_index`` (windows of one sentence are consecutive and in order) and ``word_indices`` (the word
    each labelled position belongs to, in order).
    """
    features: list[dict] = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        # verbose=False: transformers would warn that a sentence longer than the model "will result in indexing
        # errors", which is not so here: _windows splits it. The log line below says what happened instead.
        encoded = tokenizer(
            [s.words for s in chunk], is_split_into_words=True, add_special_tokens=True, truncation=False,
            verbose=False,
        )
        for offset, sentence in enumerate(chunk):
            encoding = encoded.encodings[offset] if encoded.encodings else None
            ids = encoded["input_ids"][offset]
            word_ids = encoded.word_ids(offset)
            tokens = encoding.tokens if encoding is not None else tokenizer.convert_ids_to_tokens(ids)
            features.extend(
                _windows(ids, word_ids, tokens, sentence, label_to_id, max_length, start + offset)
            )
    windows = Counter(f["sentence_index"] for f in features)
    if longer := [n for n in windows.values() if n > 1]:
        logger.info("%d of %d sentences are longer than the %d-sub-token window: split at word boundaries into "
                    "%d windows (no label dropped)", len(longer), len(sentences), max_length, sum(longer))
    return features


def _windows(
    ids: list[int],
    word_ids: list[int | None],
    tokens: list[str],
    sentence: TaggedSentence,
    label_to_id: dict[str, int],
    max_length: int,
    sentence_index: int,
) -> list[dict]:
    # Leading and trailing special tokens (word id None) frame every window.
    first = next((i for i, w in enumerate(word_ids) if w is not None), len(ids))
    last = max((i for i, w in enumerate(word_ids) if w is not None), default=first - 1)
    prefix, suffix = ids[:first], ids[last + 1 :]
    body = range(first, last + 1)

    # Group the body's positions by word. A word can have no sub-token at all (a tokenizer may drop a
    # control or zero-width character entirely); it then has no position, and evaluation counts it as
    # unpredicted instead of silently skipping it (see ``sentence_predictions``).
    pieces_by_word: dict[int, list[int]] = {}
    for pos in body:
        word = word_ids[pos]
        if word is not None:
            pieces_by_word.setdefault(word, []).append(pos)

    labels_by_pos: dict[int, int] = {}
    word_by_pos: dict[int, int] = {}
    for word, positions in pieces_by_word.items():
        chosen = next((p for p in positions if piece_carries_characters(tokens[p])), positions[0])
        labels_by_pos[chosen] = label_to_id[sentence.tags[word]]
        word_by_pos[chosen] = word

    budget = max(1, max_length - len(prefix) - len(suffix))
    windows: list[dict] = []
    current: list[int] = []
    words_in_order = sorted(pieces_by_word)
    for word in words_in_order:
        positions = pieces_by_word[word]
        if len(positions) > budget:
            # A single word longer than a window: keep its labelled piece, cut the rest.
            keep = [p for p in positions if p in labels_by_pos] or positions[:1]
            rest = [p for p in positions if p not in keep][: budget - len(keep)]
            positions = sorted(keep + rest)
        if current and len(current) + len(positions) > budget:
            windows.append(_feature(current, ids, prefix, suffix, labels_by_pos, word_by_pos, sentence_index))
            current = []
        current.extend(positions)
    if current or not windows:
        windows.append(_feature(current, ids, prefix, suffix, labels_by_pos, word_by_pos, sentence_index))
    return windows


def _feature(
    positions: list[int],
    ids: list[int],
    prefix: list[int],
    suffix: list[int],
    labels_by_pos: dict[int, int],
    word_by_pos: dict[int, int],
    sentence_index: int,
) -> dict:
    input_ids = prefix + [ids[p] for p in positions] + suffix
    labels = (
        [IGNORE_INDEX] * len(prefix)
        + [labels_by_pos.get(p, IGNORE_INDEX) for p in positions]
        + [IGNORE_INDEX] * len(suffix)
    )
    words = [word_by_pos[p] for p in positions if p in word_by_pos]
    return {"input_ids": input_ids, "labels": labels, "sentence_index": sentence_index, "word_indices": words}


def sentence_predictions(
    features: Sequence[dict],
    predicted_ids: Sequence[Sequence[int]],
    sentence_lengths: Sequence[int],
    id_to_label: Sequence[str],
    fallback_label: str,
) -> tuple[list[list[str]], int]:
    """Reassemble per-feature predictions (one per labelled position) into per-sentence tag lists.

    Words that got no sub-token are filled with ``fallback_label`` and counted; the count is returned so that
    a report can show it.
    """
    sentences: list[list[str | None]] = [[None] * n for n in sentence_lengths]
    for feature, predicted in zip(features, predicted_ids, strict=True):
        row = sentences[feature["sentence_index"]]
        for word, label_id in zip(feature["word_indices"], predicted, strict=True):
            row[word] = id_to_label[label_id]
    unaligned = sum(tag is None for row in sentences for tag in row)
    filled = [[fallback_label if tag is None else tag for tag in row] for row in sentences]
    return filled, unaligned
