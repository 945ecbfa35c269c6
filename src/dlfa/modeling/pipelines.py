"""transformers pipelines on DLFA models, and exactly how their answers relate to dlfa's own evaluation.

A saved model folder works with the stock pipelines (with dlfa installed, or without it and
``trust_remote_code=True``)::

    tagger = pipeline("token-classification", model="run/best", aggregation_strategy="first")
    classifier = pipeline("text-classification", model="run/best")
    classifier({"text": premise, "text_pair": hypothesis})

**Sentence pairs** (XNLI, PAWS-X): the pipeline's label is dlfa's prediction (argmax of the same logits of the
same encoding). dlfa truncates a pair to the run's ``max_length`` sub-tokens; pass the same ``truncation=True,
max_length=...`` to the pipeline for long pairs (:func:`classify_pairs` does).

**Tagging** (UD-POS, PAN-X): dlfa predicts one tag per word, on the word's first sub-token that carries characters
(never a bare SentencePiece ``▁``, see ``dlfa.data.features``). The pipeline answers with *entity groups*:
runs of adjacent words of the same tag type, with character offsets, ``O`` runs dropped unless
``ignore_labels=[]``. :func:`tag_words` gives the words pre-split (``is_split_into_words=True``, so the
tokenization is dlfa's) and expands the groups back into one tag per word. Then:

* the pipeline's ``"first"`` aggregation reads, for each word, the same sub-token as dlfa: WordPiece words
  start with a piece that carries characters (transformers groups WordPiece pieces by their ``##``, comparing a
  piece's length with its text, so a normalisation that changes a first piece's length, such as a ligature,
  could join it to the previous word); for SentencePiece vocabularies the pipeline starts a "word" of its own at
  a bare ``▁`` (it shares its character offset with the next piece) and the next piece, the one dlfa labels,
  starts the word proper. So every word gets dlfa's tag *type*, and tag sets without ``B-``/``I-`` prefixes
  (UD-POS) come back identical to dlfa's word predictions.
* ``B-``/``I-`` prefixes (PAN-X) are not in the groups: :func:`tag_words` writes ``B-`` on the first word of a
  group and ``I-`` on the others. A word whose dlfa tag is ``I-X`` is reported ``I-X`` exactly when it continues
  the group: the previous word's type is X and, if the word begins with a bare ``▁``, the model's tag at that
  ``▁`` is ``I-X`` too (a ``▁`` predicted otherwise closes the group). Otherwise it is reported ``B-X``; this
  is the IOB2 reading seqeval gives dlfa's own ``I-X`` at the start of an entity, except where a bare ``▁``
  splits an entity. tests/test_hf_integration.py checks this rule word by word (SentencePiece and WordPiece).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_iob(labels: Sequence[str]) -> bool:
    """True for IOB tag sets (every label but O starts with B- or I-)."""
    tagged = [label for label in labels if label != "O"]
    return bool(tagged) and all(label[:2] in ("B-", "I-") for label in tagged)


def word_tags_from_entities(entities: Sequence[dict[str, Any]], words: Sequence[str], iob: bool,
                            delimiter: str = " ") -> list[str | None]:
    """One tag per word from a token-classification pipeline's entity groups (words given pre-split,
    ``ignore_labels=[]``). A word no group covers (the tokenizer dropped it) gets None."""
    tags: list[str | None] = []
    start = 0
    for word in words:
        covering = [group for group in entities if group["start"] <= start < group["end"]]
        if not covering:
            tags.append(None)
        else:
            group = covering[-1]  # a bare "▁" may end the previous group on this word's first character
            kind = group["entity_group"]
            if iob and kind != "O":
                kind = ("B-" if group["start"] >= start else "I-") + kind
            tags.append(kind)
        start += len(word) + len(delimiter)
    return tags


def tag_words(pipe: Any, sentences: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Word-level tags of pre-split sentences from a ``token-classification`` pipeline (see the module doc)."""
    labels = [pipe.model.config.id2label[i] for i in sorted(pipe.model.config.id2label)]
    iob = is_iob(labels)
    if not sentences:
        return []
    # A list of word lists is a batch of pre-split sentences (one list of words alone would be one too).
    entities = pipe([list(words) for words in sentences], is_split_into_words=True, aggregation_strategy="first",
                    ignore_labels=[])
    return [word_tags_from_entities(groups, words, iob) for groups, words in zip(entities, sentences, strict=True)]


def classify_pairs(pipe: Any, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> list[str]:
    """Labels of sentence pairs from a ``text-classification`` pipeline, truncated as dlfa truncates them."""
    kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length else {}
    results = pipe([{"text": a, "text_pair": b} for a, b in pairs], **kwargs)
    return [(r[0] if isinstance(r, list) else r)["label"] for r in results]
