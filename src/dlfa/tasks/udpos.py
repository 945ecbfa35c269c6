"""UD-POS: universal part-of-speech tagging on Universal Dependencies treebanks (CoNLL-U, UPOS column).

Reading (``preprocessing``, TrainConfig ``ud_preprocessing``, ``--ud-preprocessing``):

* ``"xtreme"`` (default): XTREME's ``utils_preprocess.py`` (``udpos_preprocess``): each word form is stripped
  of surrounding whitespace, then its zero-width non-joiners (U+200C) and spaces are removed, so that a
  word never holds a space (UD allows them: Vietnamese ``công ty``; Persian writes ZWNJ inside words); and
  a sentence whose forms are all, or all but one, ``_`` (a treebank distributed without its text) is
  dropped. In the UD test files of ``shared/data`` this changes 2,079 Vietnamese, 1,015 Persian and 2
  French words and drops no sentence.
* ``"raw"``: the forms as the CoNLL-U file has them.

XTREME also replaced the syntactic words of each multi-word token (Spanish ``del`` = ``de el``) by the
fused form, tagged with the UPOS of the span's head in the dependency tree (``conllu_to_conll.py
--replace_subtokens_with_fused_forms``). dlfa does not: it scores UD's syntactic words (see
docs/experiments.md, "UD-POS preprocessing").

Scorers: ``xtreme-2020`` (default), ``seqeval``, ``accuracy``; see :mod:`dlfa.tasks.scoring`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dlfa.data.features import TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks.base import Hyperparameters, TaggingTask, read_lines, shown
from dlfa.tasks.scoring import SEQEVAL, WORD_ACCURACY, XTREME_2020, scorer_registry

logger = logging.getLogger("dlfa")

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
UD_PREPROCESSINGS = ("xtreme", "raw")  # the first is the default


def xtreme_word(form: str) -> str:
    """XTREME's preprocessing of one UD word form: strip, remove zero-width non-joiners, remove spaces.

    ``''.join(w.replace('\\u200c', '').split(' '))`` on the stripped form, as utils_preprocess.py does.
    """
    return "".join(form.strip().replace("\u200c", "").split(" "))


def _text_withheld(words: list[str]) -> bool:
    """XTREME's test for a sentence without its text: all its forms, or all but one, are ``_``."""
    missing = sum(word == "_" for word in words)
    return missing > 0 and missing >= len(words) - 1


def read_conllu(path: str | Path, preprocessing: str = "xtreme") -> list[TaggedSentence]:
    """Words and UPOS tags of a CoNLL-U file; multi-word ranges (``1-2``) and empty nodes (``1.1``) skipped.

    ``preprocessing`` is ``"xtreme"`` (XTREME's, see the module docstring) or ``"raw"``.
    """
    if preprocessing not in UD_PREPROCESSINGS:
        raise DlfaInputError(f"must be one of {', '.join(UD_PREPROCESSINGS)}, got {preprocessing!r}",
                             option="--ud-preprocessing")
    xtreme = preprocessing == "xtreme"
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    withheld = 0
    known = set(UPOS_TAGS)

    def finish() -> None:
        nonlocal withheld
        if xtreme and _text_withheld(words):
            withheld += 1
        else:
            sentences.append(TaggedSentence(words, tags))

    for number, line in read_lines(path):
        if not line.strip():
            if words:
                finish()
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
        if xtreme:
            form = xtreme_word(form)
            if not form:  # XTREME would write an empty word here; refuse rather than guess
                raise DlfaInputError("word form is empty after XTREME's preprocessing (spaces and zero-width "
                                     "non-joiners removed); read the file with --ud-preprocessing raw",
                                     path=path, line=number)
        words.append(form)
        tags.append(upos)
    if words:
        finish()
    if withheld:
        logger.warning("%s: %d sentence(s) without their text (forms '_') dropped, as XTREME's preprocessing "
                       "does", path, withheld)
    if not sentences:
        raise DlfaInputError("no sentences in the file" if not withheld else
                             "no sentences with text in the file (all forms are '_')", path=path)
    return sentences


class UDPOS(TaggingTask):
    name = "udpos"
    labels = UPOS_TAGS
    languages = XTREME_LANGUAGES
    # Default xtreme-2020: XTREME's definition of the score, all 17 UPOS tags distinct (see docs/experiments.md).
    scorers = scorer_registry(XTREME_2020, SEQEVAL, WORD_ACCURACY)
    default_scorer = "xtreme-2020"
    preprocessings = UD_PREPROCESSINGS
    preprocessing_field = "ud_preprocessing"
    preprocessing_option = "--ud-preprocessing"
    eval_split = "test"
    fallback_label = "X"
    defaults = Hyperparameters(learning_rate=2e-5, epochs=10, batch_size=32, max_length=128)
    # UD release names (en_ewt-ud-train.conllu) and plain ones (en-train.conllu, the demo sample).
    file_patterns = (r"(?P<lang>[a-z]{2,3})_[a-z0-9]+-ud-{split}\.conllu", r"(?P<lang>[a-z]{2,3})-{split}\.conllu")

    def read_file(self, path: str | Path, preprocessing: str | None = None) -> list[TaggedSentence]:
        return read_conllu(path, self.resolve_preprocessing(preprocessing))


TASK = UDPOS()
