"""Parallel (translate-train) data for X-Mixup: an English example and its translation.

Sentence-pair tasks (XNLI, PAWS-X): the pair shares one label. Three input forms, all tab-separated, UTF-8, blank
lines skipped:

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

Tagging tasks (UD-POS, PAN-X): a **parallel tagging TSV**, one sentence pair per line, tokens and tags separated by
spaces::

    source tokens <TAB> source tags <TAB> target tokens [<TAB> target labels]

The source (English) side is tagged. The target labels are optional per file (every row has them or none does)
and come in one of two forms, fixed by the file's first row: tags (labels projected onto the translation), or
**soft labels**, one distribution per target word written ``p1;p2;...;pK`` in the task's label order (the
authors' ``translate-train-logits`` files: a teacher's label distribution for each translated word). Tags come
from the task's label set (UPOS, IOB2 PER/ORG/LOC); a side's label count must equal its token count. There is no
line-by-line pairing of tagging files: the treebanks and WikiANN files of different languages are not
translations of each other.

**Translations of single sentences** (back-translated sources for X-Mixup's scheduled sampling, translate-test
sources for its mixup inference), row i being the English translation of example i of the file it goes with:
for pair tasks ``text a <TAB> text b [<TAB> label]`` (XTREME's translate-test form; a label, when given, must be
the example's, which checks the alignment; an optional header line ends in ``label``), for tagging tasks one
sentence per line, tokens separated by spaces.

Every problem is a :class:`dlfa.errors.DlfaInputError` naming the file and line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlfa.data.features import TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks import get_task
from dlfa.tasks.base import SentencePair, check_label, read_tsv_rows, shown

PARALLEL_COLUMNS = 5
HEADER_LABELS = ("label", "gold_label")
RELEASE_HEADER = ["id", "sentence1", "sentence2", "label"]
TAGGING_COLUMNS = "source tokens, source tags, target tokens[, target tags or soft labels]"
_TRANSLATED_NAME = re.compile(r"(?:en-)?(?P<lang>[a-z]{2,3})-translated\.tsv")


@dataclass(frozen=True)
class ParallelPair:
    """An English (source) example, its translation (target) and where the pair came from.

    Tagging pairs hold :class:`TaggedSentence` sides; a target with empty ``tags`` has no labels.
    """

    source: SentencePair | TaggedSentence
    target: SentencePair | TaggedSentence
    language: str  # the target language ("" when unknown)
    origin: str  # "path:line" of the target side, for messages
    # A tagging target's soft labels: one distribution (task label order) per target word.
    target_soft: list[list[float]] | None = None
    # The English back-translation of the target (scheduled sampling's alternative source); untagged for tagging.
    back_translation: SentencePair | TaggedSentence | None = None

    @property
    def target_labelled(self) -> bool:
        return not isinstance(self.target, TaggedSentence) or bool(self.target.tags) or self.target_soft is not None


def task_labels(task_name: str) -> tuple[tuple[str, ...], Mapping[str, str] | None]:
    """The label set and label aliases of a task with a parallel-data reader (xnli, pawsx, udpos, panx)."""
    if task_name == "xnli":
        from dlfa.tasks.xnli import LABEL_ALIASES, NLI_LABELS

        return NLI_LABELS, LABEL_ALIASES
    if task_name == "pawsx":
        from dlfa.tasks.pawsx import PAWSX_LABELS

        return PAWSX_LABELS, None
    if task_name == "udpos":
        from dlfa.tasks.udpos import UPOS_TAGS

        return UPOS_TAGS, None
    if task_name == "panx":
        from dlfa.tasks.panx import NER_TAGS

        return NER_TAGS, None
    raise DlfaInputError(f"no parallel-data reader for task {task_name!r} (X-Mixup: xnli, pawsx, udpos, panx)",
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


def _tokens(field: str, side: str, path: str | Path, line: int) -> list[str]:
    tokens = field.split()
    if not tokens:
        raise DlfaInputError(f"no {side} tokens", path=path, line=line)
    return tokens


def _tags(field: str, tokens: list[str], side: str, labels: Sequence[str], path: str | Path, line: int) -> list[str]:
    tags = [check_label(tag, labels, path, line) for tag in field.split()]
    if len(tags) != len(tokens):
        raise DlfaInputError(f"{len(tags)} {side} tags for {len(tokens)} {side} tokens", path=path, line=line)
    return tags


def _soft_labels(field: str, tokens: list[str], labels: Sequence[str], path: str | Path, line: int) -> list[list[float]]:
    distributions = []
    for number, word in enumerate(field.split(), start=1):
        try:
            values = [float(x) for x in word.split(";")]
        except ValueError:
            raise DlfaInputError(f"target word {number}: soft labels must be numbers joined by ';', got {shown(word)}",
                                 path=path, line=line) from None
        if len(values) != len(labels):
            raise DlfaInputError(f"target word {number}: {len(values)} soft labels for {len(labels)} labels "
                                 f"({' '.join(labels)})", path=path, line=line)
        if not all(math.isfinite(x) and x >= 0 for x in values) or abs(sum(values) - 1) > 0.01:
            raise DlfaInputError(f"target word {number}: soft labels must be non-negative and sum to 1, got "
                                 f"{shown(word)}", path=path, line=line)
        distributions.append(values)
    if len(distributions) != len(tokens):
        raise DlfaInputError(f"{len(distributions)} target soft labels for {len(tokens)} target tokens", path=path,
                             line=line)
    return distributions


def read_parallel_tagging(path: str | Path, labels: Sequence[str], language: str | None = None) -> list[ParallelPair]:
    """Pairs of a parallel tagging TSV (source tokens, source tags, target tokens[, target tags or soft labels])."""
    language = language_from_name(path) if language is None else language
    pairs: list[ParallelPair] = []
    columns: int | None = None  # the file's form, fixed by its first row: with target labels (4) or without (3)
    soft = False  # with target labels: tags, or soft labels (a ';' in the first row's first target label)
    for number, fields in read_tsv_rows(path):
        if len(fields) not in (3, 4):
            raise DlfaInputError(f"expected 3 or 4 tab-separated columns ({TAGGING_COLUMNS}), found {len(fields)}",
                                 path=path, line=number)
        if columns is None:
            columns = len(fields)
            soft = columns == 4 and ";" in (fields[3].split() or [""])[0]
        elif len(fields) != columns:
            raise DlfaInputError(f"{len(fields)} columns where the first row has {columns}: target labels are given "
                                 "for every row of a file or for none", path=path, line=number)
        source_tokens = _tokens(fields[0], "source", path, number)
        source = TaggedSentence(source_tokens, _tags(fields[1], source_tokens, "source", labels, path, number))
        target_tokens = _tokens(fields[2], "target", path, number)
        target_tags, target_soft = [], None
        if columns == 4 and soft:
            target_soft = _soft_labels(fields[3], target_tokens, labels, path, number)
        elif columns == 4:
            target_tags = _tags(fields[3], target_tokens, "target", labels, path, number)
        pairs.append(ParallelPair(source, TaggedSentence(target_tokens, target_tags), language, f"{path}:{number}",
                                  target_soft=target_soft))
    if not pairs:
        raise DlfaInputError("no sentence pairs in the file", path=path)
    return pairs


def read_sentence_translations(path: str | Path, task_name: str, originals: Sequence) -> list:
    """English translations of ``originals`` (line i translates originals[i]): SentencePairs or TaggedSentences.

    Pair tasks: ``text a <TAB> text b [<TAB> label]`` (optional header line ending in ``label``); a translation
    takes its original's label, and a label column must agree with it. Tagging tasks: tokens separated by spaces;
    the translation gets placeholder tags (it is never scored). The counts must be equal.
    """
    labels, aliases = task_labels(task_name)
    tagging = get_task(task_name).head == "token"
    rows = list(read_tsv_rows(path))
    if rows and not tagging and _is_header(rows[0][1], 3) and rows[0][0] == 1:
        rows = rows[1:]
    translations: list = []
    for (number, fields), original in zip(rows, originals, strict=False):
        if tagging:
            if len(fields) != 1:
                raise DlfaInputError(f"expected one sentence per line (tokens separated by spaces), found "
                                     f"{len(fields)} tab-separated columns", path=path, line=number)
            tokens = _tokens(fields[0], "translated", path, number)
            translations.append(TaggedSentence(tokens, [labels[0]] * len(tokens)))
            continue
        if len(fields) not in (2, 3):
            raise DlfaInputError(f"expected 2 or 3 tab-separated columns (text a, text b[, label]), found "
                                 f"{len(fields)}", path=path, line=number)
        if len(fields) == 3 and check_label(fields[2], labels, path, number, aliases) != original.label:
            raise DlfaInputError(f"label {fields[2].strip()!r} differs from the original's {original.label!r}: the "
                                 "file is not aligned with the examples it translates", path=path, line=number)
        if not fields[0].strip():
            raise DlfaInputError("empty text in column 1", path=path, line=number)
        translations.append(SentencePair(fields[0], fields[1], original.label))
    if len(rows) != len(originals):
        raise DlfaInputError(f"{len(rows)} translations for {len(originals)} examples: line i must translate "
                             "example i", path=path)
    return translations


def translate_test_file(folder: str | Path, language: str, split: str) -> Path | None:
    """A language's translate-test file in ``folder``: ``<split>-<lang>-en-translated.tsv`` (XTREME's name),
    ``<lang>.tsv`` or ``<lang>.txt``; None when there is none, an error when there are several."""
    folder = Path(folder)
    found = [folder / name for name in (f"{split}-{language}-en-translated.tsv", f"{language}.tsv", f"{language}.txt")
             if (folder / name).is_file()]
    if len(found) > 1:
        raise DlfaInputError(f"several translate-test files for {language!r} ({', '.join(p.name for p in found)}); "
                             "keep one", path=folder)
    return found[0] if found else None


def read_translate_train(path: str | Path, task_name: str, language: str | None = None) -> list[ParallelPair]:
    """A task's parallel file: the 5-column pair form (xnli, pawsx; XTREME's translate-train) or the tagging form."""
    labels, aliases = task_labels(task_name)
    if get_task(task_name).head == "token":
        return read_parallel_tagging(path, labels, language)
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
