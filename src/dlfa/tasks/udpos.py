"""UD-POS: universal part-of-speech tagging on Universal Dependencies treebanks (CoNLL-U, UPOS column)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from seqeval.metrics import f1_score

from dlfa.data.features import TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks.base import Hyperparameters, TaggingTask, read_lines, shown

UPOS_TAGS = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM",
    "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X",
)  # fmt: skip

# XTREME's UD-POS languages.
XTREME_LANGUAGES = (
    "af", "ar", "bg", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he", "hi", "hu", "id", "it",
    "ja", "kk", "ko", "mr", "nl", "pt", "ru", "ta", "te", "th", "tl", "tr", "ur", "vi", "wo", "yo", "zh",
)  # fmt: skip

CONLLU_COLUMNS = 10
_TOKEN_ID = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() rejects


def read_conllu(path: str | Path) -> list[TaggedSentence]:
    """Words and UPOS tags of a CoNLL-U file; multi-word ranges (``1-2``) and empty nodes (``1.1``) skipped."""
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    known = set(UPOS_TAGS)
    for number, line in read_lines(path):
        if not line.strip():
            if words:
                sentences.append(TaggedSentence(words, tags))
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != CONLLU_COLUMNS:
            raise DlfaInputError(
                f"expected {CONLLU_COLUMNS} tab-separated CoNLL-U columns, found {len(columns)}", path=path, line=number
            )
        token_id, form, upos = columns[0], columns[1], columns[3]
        if "-" in token_id or "." in token_id:
            continue
        if not _TOKEN_ID.fullmatch(token_id):
            raise DlfaInputError(f"token id {shown(token_id)} is not a number", path=path, line=number)
        # Compared as text: int() of a 5000-digit id raises ValueError (Python's integer-string limit).
        if token_id.lstrip("0") != str(len(words) + 1):
            short_id = token_id if len(token_id) <= 20 else token_id[:20] + "..."
            raise DlfaInputError(
                f"token id {short_id} out of sequence (expected {len(words) + 1}; missing blank line between "
                "sentences?)",
                path=path,
                line=number,
            )
        if upos not in known:
            raise DlfaInputError(f"unknown UPOS tag {shown(upos)}", path=path, line=number)
        if not form.strip():
            raise DlfaInputError("empty word form", path=path, line=number)
        words.append(form)
        tags.append(upos)
    if words:
        sentences.append(TaggedSentence(words, tags))
    if not sentences:
        raise DlfaInputError("no sentences in the file", path=path)
    return sentences


def pos_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """XTREME's UD-POS score (seqeval F1 over the raw tag sequences, as its run_tag.py does) and accuracy."""
    total = sum(len(tags) for tags in gold)
    correct = sum(g == p for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns that UPOS tags are not IOB tags; XTREME ignores that
        f1 = f1_score(gold, predicted)
    return {
        "f1": 100.0 * float(f1),
        "accuracy": 100.0 * correct / max(total, 1),
        "words": total,
    }


class UDPOS(TaggingTask):
    name = "udpos"
    labels = UPOS_TAGS
    languages = XTREME_LANGUAGES
    primary_metric = "f1"
    eval_split = "test"
    fallback_label = "X"
    defaults = Hyperparameters(learning_rate=2e-5, epochs=10, batch_size=32, max_length=128)
    # UD release names (en_ewt-ud-train.conllu) and plain ones (en-train.conllu, the demo sample).
    file_patterns = (r"(?P<lang>[a-z]{2,3})_[a-z0-9]+-ud-{split}\.conllu", r"(?P<lang>[a-z]{2,3})-{split}\.conllu")

    def read_file(self, path: str | Path) -> list[TaggedSentence]:
        return read_conllu(path)

    def tag_metrics(self, gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
        return pos_metrics(gold, predicted)


TASK = UDPOS()
