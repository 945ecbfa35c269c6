"""PAWS-X: paraphrase identification (label 1: the two sentences are paraphrases, 0: they are not).

File forms, detected per file from its first line:

* XTREME's ``sentence1<TAB>sentence2<TAB>label``, three columns, no header (``test-de.tsv``,
  ``de-test.tsv``; a ``sentence1 sentence2 label`` header line is skipped).
* The PAWS-X release's ``id<TAB>sentence1<TAB>sentence2<TAB>label`` with that header line, in per-language
  folders: pass the release's ``x-final`` folder as the data folder, which holds ``<lang>/dev_2k.tsv``,
  ``<lang>/test_2k.tsv`` and ``<lang>/translated_train.tsv`` (English: ``en/train.tsv``).

The dev and test files of the languages are human translations of the English ones, with the same labels
(``parallel_splits``). In particular every ``dev-<lang>.tsv`` is a translation of ``dev-en.tsv``: a model
trained or selected on English dev must not be scored on another language's dev file.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

from dlfa.errors import DlfaInputError
from dlfa.tasks.base import Hyperparameters, PairClassificationTask, SentencePair, check_label, read_tsv_rows

PAWSX_LABELS = ("0", "1")
_LANGUAGE = re.compile(r"[a-z]{2,3}")

# XTREME's PAWS-X languages.
XTREME_LANGUAGES = ("de", "en", "es", "fr", "ja", "ko", "zh")

RELEASE_HEADER = ["id", "sentence1", "sentence2", "label"]
XTREME_HEADER = ["sentence1", "sentence2", "label"]

# The release's file names per split, inside a <lang>/ folder.
RELEASE_FILES = {"train": ("train.tsv", "translated_train.tsv"), "dev": ("dev_2k.tsv",), "test": ("test_2k.tsv",)}


def read_pawsx(path: str | Path) -> list[SentencePair]:
    """Sentence pairs of a PAWS-X file, in XTREME's 3-column form or the release's 4-column form."""
    rows = read_tsv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    header = [name.strip().lower() for name in first[1]]
    if header == RELEASE_HEADER:
        columns, text_a, text_b, label, described = 4, 1, 2, 3, "id, sentence1, sentence2, label"
        body: Iterator[tuple[int, list[str]]] = rows
    else:
        columns, text_a, text_b, label, described = 3, 0, 1, 2, "sentence1, sentence2, label"
        body = rows if header == XTREME_HEADER else itertools.chain([first], rows)
    pairs: list[SentencePair] = []
    for number, fields in body:
        if len(fields) != columns:
            raise DlfaInputError(
                f"expected {columns} tab-separated columns ({described}), found {len(fields)}", path=path, line=number
            )
        pairs.append(
            SentencePair(fields[text_a], fields[text_b], check_label(fields[label], PAWSX_LABELS, path, number))
        )
    if not pairs:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    return pairs


class PAWSX(PairClassificationTask):
    """PAWS-X. ``parallel_splits``: the dev (and test) files are translations of ``dev-en`` (``test-en``)."""

    name = "pawsx"
    labels = PAWSX_LABELS
    languages = XTREME_LANGUAGES
    eval_split = "test"
    parallel_splits = ("dev", "test")
    defaults = Hyperparameters(learning_rate=2e-5, epochs=5, batch_size=32, max_length=128)
    # XTREME names (test-de.tsv) and <lang>-<split>.tsv.
    file_patterns = (r"{split}-(?P<lang>[a-z]{2,3})\.tsv", r"(?P<lang>[a-z]{2,3})-{split}\.tsv")

    def _matches(self, data_dir: Path, split: str) -> Iterator[tuple[str, Path]]:
        yield from super()._matches(data_dir, split)
        if not data_dir.is_dir():
            return
        # The release's x-final/<lang>/<file> layout.
        for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and _LANGUAGE.fullmatch(p.name)):
            for name in RELEASE_FILES.get(split, ()):
                if (folder / name).is_file():
                    yield folder.name, folder / name

    def read_file(self, path: str | Path) -> list[SentencePair]:
        return read_pawsx(path)


TASK = PAWSX()
