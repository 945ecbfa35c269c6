"""Parallel (translate-train) sentence pairs for X-Mixup: an English example and its translation, one label.

Three input forms, all tab-separated, UTF-8, blank lines skipped:

* **Parallel TSV** (XTREME's XNLI translate-train files ``en-<lang>-translated.tsv`` and the plain form dlfa
  documents for PAWS-X and any other pair task)::

      source text a <TAB> source text b <TAB> target text a <TAB> target text b <TAB> label

  An optional first line whose last column is ``label`` / ``gold_label`` is a header. XNLI-MT's
  ``contradictory`` is read as ``contradiction``, as everywhere in dlfa.
* **Two line-parallel files** in XTREME's 3-column form (``text a <TAB> text b <TAB> label``, optional header),
  e.g. the shared data's ``dev-en.tsv`` with ``dev-de.tsv``: row i of one is the translation of row i of the
  other. The rows must be as many, and their labels must agree row by row (an error names both lines).
* **The PAWS-X release** (``id <TAB> sentence1 <TAB> sentence2 <TAB> label`` with that header line; English
  ``en/train.tsv`` with ``<lang>/translated_train.tsv``): rows are paired by ``id``; English rows without a
  translation are left out, a translation without an English row is an error.

Every problem is a :class:`dlfa.errors.DlfaInputError` naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlfa.errors import DlfaInputError
from dlfa.tasks.base import SentencePair, check_label, read_tsv_rows

PARALLEL_COLUMNS = 5
HEADER_LABELS = ("label", "gold_label")
RELEASE_HEADER = ["id", "sentence1", "sentence2", "label"]
_TRANSLATED_NAME = re.compile(r"(?:en-)?(?P<lang>[a-z]{2,3})-translated\.tsv")


@dataclass(frozen=True)
class ParallelPair:
    """An English (source) example, its translation (target) and where the pair came from."""

    source: SentencePair
    target: SentencePair
    language: str  # the target language ("" when unknown)
    origin: str  # "path:line" of the target side, for messages


def task_labels(task_name: str) -> tuple[tuple[str, ...], Mapping[str, str] | None]:
    """The label set and label aliases of a sentence-pair task (xnli, pawsx)."""
    if task_name == "xnli":
        from dlfa.tasks.xnli import LABEL_ALIASES, NLI_LABELS

        return NLI_LABELS, LABEL_ALIASES
    if task_name == "pawsx":
        from dlfa.tasks.pawsx import PAWSX_LABELS

        return PAWSX_LABELS, None
    raise DlfaInputError(f"no parallel-data reader for task {task_name!r} (X-Mixup pairs: xnli, pawsx)",
                         option="--task")


def language_from_name(path: str | Path) -> str:
    """``en-de-translated.tsv`` -> ``de``; ``""`` when the name does not say."""
    match = _TRANSLATED_NAME.fullmatch(Path(path).name)
    return match.group("lang") if match else ""


def _is_header(fields: list[str], columns: int) -> bool:
    return len(fields) == columns and fields[-1].strip().lower() in HEADER_LABELS


def read_parallel_tsv(
    path: str | Path, labels: Sequence[str], aliases: Mapping[str, str] | None = None, language: str | None = None
) -> list[ParallelPair]:
    """Pairs of a 5-column parallel TSV (source a, source b, target a, target b, label)."""
    language = language_from_name(path) if language is None else language
    pairs: list[ParallelPair] = []
    for number, fields in read_tsv_rows(path):
        if number == 1 and _is_header(fields, PARALLEL_COLUMNS):
            continue
        if len(fields) != PARALLEL_COLUMNS:
            raise DlfaInputError(
                f"expected {PARALLEL_COLUMNS} tab-separated columns (source a, source b, target a, target b, label), "
                f"found {len(fields)}", path=path, line=number,
            )
        label = check_label(fields[4], labels, path, number, aliases)
        for column in (0, 2):
            if not fields[column].strip():
                raise DlfaInputError(f"empty text in column {column + 1}", path=path, line=number)
        pairs.append(ParallelPair(SentencePair(fields[0], fields[1], label), SentencePair(fields[2], fields[3], label),
                                  language, f"{path}:{number}"))
    if not pairs:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    return pairs


def read_translate_train(path: str | Path, task_name: str, language: str | None = None) -> list[ParallelPair]:
    """XTREME's translate-train file of XNLI or PAWS-X (the 5-column parallel form)."""
    labels, aliases = task_labels(task_name)
    return read_parallel_tsv(path, labels, aliases, language)


def _read_rows(path: str | Path, labels: Sequence[str], aliases: Mapping[str, str] | None):
    """(line, id or None, SentencePair) of a 3-column XTREME file or a 4-column PAWS-X release file."""
    rows = read_tsv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    release = [name.strip().lower() for name in first[1]] == RELEASE_HEADER
    columns = 4 if release else 3
    described = "id, sentence1, sentence2, label" if release else "text a, text b, label"
    body = [] if release or _is_header(first[1], 3) else [first]
    out: list[tuple[int, str | None, SentencePair]] = []
    for number, fields in [*body, *rows]:
        if len(fields) != columns:
            raise DlfaInputError(f"expected {columns} tab-separated columns ({described}), found {len(fields)}",
                                 path=path, line=number)
        offset = 1 if release else 0
        label = check_label(fields[offset + 2], labels, path, number, aliases)
        out.append((number, fields[0].strip() if release else None,
                    SentencePair(fields[offset], fields[offset + 1], label)))
    if not out:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    return release, out


def pair_parallel_files(
    source_path: str | Path,
    target_path: str | Path,
    labels: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    language: str = "",
) -> list[ParallelPair]:
    """Pairs from two line-parallel files (XTREME 3-column form), or two PAWS-X release files joined by id."""
    source_release, source_rows = _read_rows(source_path, labels, aliases)
    target_release, target_rows = _read_rows(target_path, labels, aliases)
    if source_release != target_release:
        raise DlfaInputError(f"{source_path} and {target_path} are in different forms (one has the PAWS-X release "
                             "header 'id sentence1 sentence2 label', the other not)", path=target_path, line=1)
    pairs: list[ParallelPair] = []
    if source_release:
        by_id: dict[str, tuple[int, SentencePair]] = {}
        for number, key, example in source_rows:
            if key in by_id:
                raise DlfaInputError(f"id {key!r} repeated (first at line {by_id[key][0]})", path=source_path,
                                     line=number)
            by_id[key] = (number, example)
        matched = []
        for number, key, target in target_rows:
            if key not in by_id:
                raise DlfaInputError(f"id {key!r} has no row in {source_path}", path=target_path, line=number)
            matched.append((by_id[key][0], by_id[key][1], number, target))
    else:
        if len(source_rows) != len(target_rows):
            shorter, longer = ((source_path, target_path) if len(source_rows) < len(target_rows)
                               else (target_path, source_path))
            extra = (target_rows if len(source_rows) < len(target_rows) else source_rows)[min(len(source_rows),
                                                                                             len(target_rows))]
            raise DlfaInputError(
                f"the files are not line-parallel: {len(source_rows)} rows in {source_path}, {len(target_rows)} in "
                f"{target_path}; this row has no counterpart in {shorter}", path=longer, line=extra[0],
            )
        matched = [(s[0], s[2], t[0], t[2]) for s, t in zip(source_rows, target_rows, strict=True)]
    for source_line, source, target_line, target in matched:
        if source.label != target.label:
            raise DlfaInputError(
                f"label {target.label!r} differs from {source.label!r} at {source_path}:{source_line}; "
                "the files are not translations of each other", path=target_path, line=target_line,
            )
        pairs.append(ParallelPair(source, target, language, f"{target_path}:{target_line}"))
    return pairs
