"""PAN-X (WikiANN) named-entity recognition: IOB2 tags for persons, organisations and locations.

Two file forms are read, detected per file:

* XTREME's: ``token<TAB>tag`` per line, a blank line between sentences (``train-en.tsv``, ``dev-de.tsv``).
* WikiANN's original: the same, with a language prefix on every token (``en:Paris<TAB>B-LOC``); the prefix is
  stripped. A file is in this form when most token lines carry a prefix, and then every one must; a file
  where some sentences are prefixed and others are not is an error ("mixed formats"), since stripping some
  prefixes and keeping others would silently change tokens. (XTREME's own files hold a few tokens such as
  ``bar:7``; those are kept.)

XTREME withheld the PAN-X test labels, so target languages are scored on the labeled dev files
(``eval_split = "dev"``). The metric is XTREME's, the scorer ``seqeval-entity-f1``: entity-level F1 from
seqeval in its default (conlleval-like) mode, in which an ``I-`` tag after ``O`` starts an entity; such tags
are legal input. For these tags seqeval 0.0.12 (XTREME 2020) and 1.x give the same numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

from dlfa.data.features import TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks.base import Hyperparameters, TaggingTask, read_lines, shown
from dlfa.tasks.scoring import SEQEVAL_ENTITY_F1, entity_f1_seqeval, scorer_registry

NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")

# XTREME's PAN-X languages.
XTREME_LANGUAGES = (
    "af", "ar", "bg", "bn", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he", "hi", "hu", "id", "it",
    "ja", "jv", "ka", "kk", "ko", "ml", "mr", "ms", "my", "nl", "pt", "ru", "sw", "ta", "te", "th", "tl", "tr",
    "ur", "vi", "yo", "zh",
)  # fmt: skip

# WikiANN's language prefix: a Wikipedia language code (en, zh-yue, bat-smg, be-x-old) and a colon.
_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:(?=.)")


def read_panx(path: str | Path) -> list[TaggedSentence]:
    """Words and NER tags of a PAN-X file in XTREME's form or WikiANN's ``lang:token`` form (detected).

    A token such as ``bar:7`` looks prefixed, so the form is decided by the majority of token lines: when
    most carry a prefix, every one must (and all are stripped); otherwise a sentence whose tokens all carry
    a prefix is an error (two files in different forms were concatenated), and lone ``xx:`` tokens are kept.
    """
    known = set(NER_TAGS)
    sentences: list[list[tuple[int, str, str, bool]]] = []  # (line, token, tag, prefixed)
    current: list[tuple[int, str, str, bool]] = []
    for number, line in read_lines(path):
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        columns = line.split("\t")
        if len(columns) != 2:
            raise DlfaInputError(
                f"expected 2 tab-separated columns (token, tag), found {len(columns)}", path=path, line=number
            )
        token, tag = columns[0], columns[1].strip()
        if not token.strip():
            raise DlfaInputError("empty token", path=path, line=number)
        if tag not in known:
            raise DlfaInputError(
                f"unknown tag {shown(tag)} (expected one of: {', '.join(NER_TAGS)})", path=path, line=number
            )
        current.append((number, token, tag, _PREFIX.match(token) is not None))
    if current:
        sentences.append(current)
    if not sentences:
        raise DlfaInputError("no sentences in the file", path=path)

    total = sum(len(rows) for rows in sentences)
    prefixed = sum(row[3] for rows in sentences for row in rows)
    strip = 2 * prefixed > total
    for rows in sentences:
        if strip:
            bare = next((row[0] for row in rows if not row[3]), None)
            if bare is not None:
                raise DlfaInputError(
                    f"mixed formats: most token lines carry a WikiANN 'lang:' prefix ({prefixed} of {total}), "
                    "this one does not",
                    path=path,
                    line=bare,
                )
        elif len(rows) > 1 and all(row[3] for row in rows):
            raise DlfaInputError(
                f"mixed formats: every token of the sentence starting here carries a WikiANN 'lang:' prefix, "
                f"most token lines of the file do not ({total - prefixed} of {total})",
                path=path,
                line=rows[0][0],
            )
    return [
        TaggedSentence(
            [token[_PREFIX.match(token).end() :] if strip else token for _, token, _, _ in rows],
            [tag for _, _, tag, _ in rows],
        )
        for rows in sentences
    ]


def ner_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, default mode as in XTREME), in percent."""
    return entity_f1_seqeval(gold, predicted)


class PANX(TaggingTask):
    name = "panx"
    labels = NER_TAGS
    languages = XTREME_LANGUAGES
    scorers = scorer_registry(SEQEVAL_ENTITY_F1)
    default_scorer = "seqeval-entity-f1"
    eval_split = "dev"  # XTREME withheld the test labels
    fallback_label = "O"
    one_file_per_language = True
    defaults = Hyperparameters(learning_rate=2e-5, epochs=10, batch_size=32, max_length=128)
    # XTREME names (train-en.tsv, dev-de.tsv) and <lang>-<split>.tsv.
    file_patterns = (r"{split}-(?P<lang>[a-z]{2,3})\.tsv", r"(?P<lang>[a-z]{2,3})-{split}\.tsv")

    def read_file(self, path: str | Path) -> list[TaggedSentence]:
        return read_panx(path)


TASK = PANX()
