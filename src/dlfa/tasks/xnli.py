"""XNLI: natural language inference (entailment, neutral, contradiction) in 15 languages.

File forms, detected per file from its first line:

* XTREME's ``premise<TAB>hypothesis<TAB>label``, three columns, no header (``test-de.tsv``, ``de-test.tsv``).
  A first line whose label column is literally ``label`` is a header (XNLI-MT's ``multinli.train.<lang>.tsv``,
  whose ``contradictory`` label is read as ``contradiction``, as XTREME does).
* A header naming the columns, with at least ``sentence1``, ``sentence2`` and ``gold_label``: the XNLI 1.0
  release (``xnli.dev.tsv``, ``xnli.test.tsv``; one file for all languages, chosen by its ``language`` column)
  and MultiNLI (``multinli_1.0_train.txt``, English; rows whose gold label is ``-``, no annotator majority,
  are skipped).

The dev and test files of the languages are translations of the English ones, with the same labels
(``parallel_splits``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

from dlfa.errors import DlfaInputError
from dlfa.tasks.base import (
    Hyperparameters,
    PairClassificationTask,
    SentencePair,
    check_label,
    read_tsv_rows,
    shown,
)

NLI_LABELS = ("entailment", "neutral", "contradiction")
LABEL_ALIASES = MappingProxyType({"contradictory": "contradiction"})  # XNLI-MT's training files

_LANGUAGE = re.compile(r"[a-z]{2,3}")

# XTREME's XNLI languages.
XTREME_LANGUAGES = (
    "ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh",
)  # fmt: skip

NAMED_COLUMNS = ("sentence1", "sentence2", "gold_label")
NO_MAJORITY = "-"  # MultiNLI's gold label when the annotators did not agree


def _read_plain(path: str, rows: Iterator[tuple[int, list[str]]], first: tuple[int, list[str]]) -> list[SentencePair]:
    """Three columns, premise, hypothesis, label; an optional header line whose label column says ``label``."""
    header = len(first[1]) == 3 and first[1][2].strip().lower() == "label"
    pairs: list[SentencePair] = []
    for number, fields in rows if header else itertools.chain([first], rows):
        if len(fields) != 3:
            raise DlfaInputError(
                f"expected 3 tab-separated columns (premise, hypothesis, label), found {len(fields)}",
                path=path,
                line=number,
            )
        label = check_label(fields[2], NLI_LABELS, path, number, LABEL_ALIASES)
        pairs.append(SentencePair(fields[0], fields[1], label))
    return pairs


def _read_named(
    path: str, rows: Iterator[tuple[int, list[str]]], header: tuple[int, list[str]]
) -> dict[str, list[SentencePair]]:
    """Columns named by the header (XNLI 1.0, MultiNLI); by language when there is a ``language`` column."""
    header_line, names = header[0], [name.strip() for name in header[1]]
    index = {name: i for i, name in enumerate(names)}
    language_column = index.get("language")
    by_language: dict[str, list[SentencePair]] = {}
    for number, fields in rows:
        if len(fields) != len(names):
            raise DlfaInputError(
                f"expected {len(names)} tab-separated columns as named in the header (line {header_line}), "
                f"found {len(fields)}",
                path=path,
                line=number,
            )
        if fields[index["gold_label"]].strip() == NO_MAJORITY:
            continue
        label = check_label(fields[index["gold_label"]], NLI_LABELS, path, number, LABEL_ALIASES)
        language = "" if language_column is None else fields[language_column].strip()
        if language_column is not None and not _LANGUAGE.fullmatch(language):
            raise DlfaInputError(f"bad language code {shown(language)} in the language column", path=path, line=number)
        pair = SentencePair(fields[index["sentence1"]], fields[index["sentence2"]], label)
        by_language.setdefault(language, []).append(pair)
    return by_language


def _parse(path: str) -> dict[str, list[SentencePair]]:
    """Pairs of a file by language ("" for all rows of a file without a language column)."""
    rows = read_tsv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    if set(NAMED_COLUMNS) <= {name.strip() for name in first[1]}:
        by_language = _read_named(path, rows, first)
    else:
        by_language = {"": _read_plain(path, rows, first)}
    by_language = {lang: pairs for lang, pairs in by_language.items() if pairs}
    if not by_language:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    return by_language


# Parsed files with a language column (XNLI 1.0), by (path, mtime, size): listing the languages and reading
# one of them each read the whole file otherwise.
_MULTILINGUAL_CACHE: dict[tuple[str, int, int], dict[str, list[SentencePair]]] = {}


def _parsed(path: str | Path) -> dict[str, list[SentencePair]]:
    path = Path(path)
    if not path.is_file():
        raise DlfaInputError("not a regular file" if path.exists() else "file not found", path=path)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _MULTILINGUAL_CACHE:
        return _MULTILINGUAL_CACHE[key]
    parsed = _parse(str(path))
    if "" not in parsed:
        _MULTILINGUAL_CACHE.clear()  # keep one file: XNLI 1.0 dev and test are read one after the other
        _MULTILINGUAL_CACHE[key] = parsed
    return parsed


def read_xnli(path: str | Path, language: str | None = None) -> list[SentencePair]:
    """Sentence pairs of an XNLI / XNLI-MT / MultiNLI file (its form detected from the first line).

    For a file with a ``language`` column (XNLI 1.0), ``language`` picks its rows and ``None`` returns all
    of them; for other files ``language`` is not checked (the file name says it).
    """
    parsed = _parsed(path)
    if language is None or "" in parsed:
        return [pair for pairs in parsed.values() for pair in pairs]
    if language not in parsed:
        raise DlfaInputError(
            f"no rows for language {language!r} (languages in the file: {', '.join(sorted(parsed))})", path=path
        )
    return list(parsed[language])


def file_languages(path: str | Path) -> list[str]:
    """The languages in a file's ``language`` column; empty when it has none."""
    return sorted(lang for lang in _parsed(path) if lang)


class XNLI(PairClassificationTask):
    name = "xnli"
    labels = NLI_LABELS
    languages = XTREME_LANGUAGES
    eval_split = "test"
    parallel_splits = ("dev", "test")
    defaults = Hyperparameters(learning_rate=2e-5, epochs=5, batch_size=32, max_length=128)
    # Per-language files: the shared data's test-de.tsv, <lang>-<split>.tsv and XNLI-MT's
    # multinli.train.<lang>.tsv.
    file_patterns = (
        r"{split}-(?P<lang>[a-z]{2,3})\.tsv",
        r"(?P<lang>[a-z]{2,3})-{split}\.tsv",
        r"multinli\.{split}\.(?P<lang>[a-z]{2,3})\.tsv",
    )
    # Files of one language without a language in the name: MultiNLI's English training file.
    english_file_patterns = (r"multinli_1\.0_{split}\.(?:txt|tsv)",)
    # One file for every language, chosen by its language column: the XNLI 1.0 release.
    all_language_file_patterns = (r"xnli\.{split}\.tsv",)

    def _matches(self, data_dir: Path, split: str) -> Iterator[tuple[str, Path]]:
        yield from super()._matches(data_dir, split)
        if not data_dir.is_dir():
            return
        english = [re.compile(p.replace("{split}", re.escape(split))) for p in self.english_file_patterns]
        shared = [re.compile(p.replace("{split}", re.escape(split))) for p in self.all_language_file_patterns]
        for path in sorted(data_dir.iterdir()):
            if any(regex.fullmatch(path.name) for regex in english):
                yield "en", path
            elif any(regex.fullmatch(path.name) for regex in shared):
                for language in file_languages(path):
                    yield language, path

    def read_file(self, path: str | Path) -> list[SentencePair]:
        return read_xnli(path)

    def read_language_file(self, path: Path, language: str) -> list[SentencePair]:
        return read_xnli(path, language)


TASK = XNLI()
