"""What every task module provides, and the shared code for tagging tasks.

A task module (``udpos.py``, ...) holds its reader, label set, metric, default languages and default
hyperparameters, and registers one :class:`Task` object in ``dlfa.tasks.TASKS``. Adding a task means
adding one module.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlfa.errors import DlfaInputError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Hyperparameters:
    """XTREME's mBERT fine-tuning defaults for a task."""

    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128


class Task(ABC):
    name: str
    head: str  # "token" or "sequence" (see DLFAConfig.head)
    labels: tuple[str, ...]
    languages: tuple[str, ...]  # XTREME's language list for this task
    primary_metric: str
    eval_split: str = "test"  # where target languages are scored
    train_language: str = "en"
    defaults: Hyperparameters = Hyperparameters()
    # Regexes over file names with a named group "lang"; the split is substituted for {split}.
    file_patterns: tuple[str, ...] = ()

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    # -- files ---------------------------------------------------------------------------------------------

    def _matches(self, data_dir: Path, split: str) -> Iterator[tuple[str, Path]]:
        if not data_dir.is_dir():
            return
        regexes = [re.compile(p.replace("{split}", re.escape(split))) for p in self.file_patterns]
        for path in sorted(data_dir.iterdir()):
            for regex in regexes:
                match = regex.fullmatch(path.name)
                if match:
                    yield match.group("lang"), path
                    break

    def files(self, data_dir: str | Path, language: str, split: str) -> list[Path]:
        return [path for lang, path in self._matches(Path(data_dir), split) if lang == language]

    def available_languages(self, data_dir: str | Path, split: str) -> list[str]:
        return sorted({lang for lang, _ in self._matches(Path(data_dir), split)})

    def read(self, data_dir: str | Path, language: str, split: str) -> list:
        """All examples of one language and split (several files, e.g. UD treebanks, are concatenated)."""
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DlfaInputError("data folder not found", path=data_dir)
        paths = self.files(data_dir, language, split)
        if not paths:
            found = ", ".join(self.available_languages(data_dir, split)) or "none"
            raise DlfaInputError(
                f"no {self.name} {split} file for language {language!r} (languages with {split} files: {found})",
                path=data_dir,
            )
        examples: list = []
        for path in paths:
            examples.extend(self.read_file(path))
        return examples

    def resolve_languages(self, data_dir: str | Path, requested: Sequence[str] | None, option: str) -> list[str]:
        """Expand ``None``/``all`` to every language with an evaluation file; check the others exist."""
        available = self.available_languages(data_dir, self.eval_split)
        if not requested or list(requested) == ["all"]:
            if not available:
                raise DlfaInputError(f"no {self.name} {self.eval_split} files found", path=data_dir)
            return available
        unknown = [lang for lang in requested if lang not in available]
        if unknown:
            known = ", ".join(available) or "none"
            raise DlfaInputError(
                f"unknown language {unknown[0]!r} for {self.name} in {data_dir} (available: {known})",
                option=option,
            )
        return list(dict.fromkeys(requested))

    # -- per-task parts ------------------------------------------------------------------------------------

    @abstractmethod
    def read_file(self, path: str | Path) -> list:
        """Parse one data file; bad input raises DlfaInputError naming the file and line."""

    @abstractmethod
    def featurize(self, examples: Sequence, tokenizer, max_length: int) -> list[dict]:
        """Model features for the examples."""

    @abstractmethod
    def score(self, examples: Sequence, features: Sequence[dict], predictions: Sequence) -> dict[str, float]:
        """Metrics (in percent) from per-feature predictions (see ``dlfa.evaluation``)."""


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line without newline) of a UTF-8 text file, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise DlfaInputError("file not found", path=path)
    if not path.is_file():
        raise DlfaInputError("not a regular file", path=path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DlfaInputError(f"not valid UTF-8 (byte {exc.start})", path=path, line=number) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if "\x00" in line:
                raise DlfaInputError("NUL byte in a text file", path=path, line=number)
            yield number, line.rstrip("\r\n")


class TaggingTask(Task):
    """Word-level tagging (UD-POS, PAN-X): a label on one sub-token of each word."""

    head = "token"
    fallback_label = "O"  # for words the tokenizer drops entirely; they count as errors

    def featurize(self, examples: Sequence, tokenizer, max_length: int) -> list[dict]:
        from dlfa.data.features import tokenize_tagged

        return tokenize_tagged(examples, tokenizer, self.label_to_id, max_length)

    def score(self, examples: Sequence, features: Sequence[dict], predictions: Sequence) -> dict[str, float]:
        from dlfa.data.features import sentence_predictions

        predicted, unaligned = sentence_predictions(
            features, predictions, [len(s.words) for s in examples], self.labels, self.fallback_label
        )
        metrics = self.tag_metrics([s.tags for s in examples], predicted)
        metrics["unaligned_words"] = unaligned
        return metrics

    @abstractmethod
    def tag_metrics(self, gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
        """Metrics over per-sentence tag sequences."""
