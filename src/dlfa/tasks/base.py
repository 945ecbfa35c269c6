"""What every task module provides, and the shared code for tagging and sentence-pair tasks.

A task module (``udpos.py``, ...) holds its reader, label set, named scorers (``dlfa.tasks.scoring``),
default languages and default hyperparameters, and registers one :class:`Task` object in
``dlfa.tasks.TASKS``. Adding a task means adding one module.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.tasks.scoring import EXAMPLE_ACCURACY, Scorer, pick_scorer, scorer_registry

SPLITS = ("train", "dev", "test")
_LOOSE_LANGUAGE = r"[a-z]{2,3}(?:[_-][a-z0-9]+)*"


def _refuse_duplicates(paths: Sequence[Path]) -> None:
    """Files that are concatenated (UD treebanks of one language) must not be copies of each other."""
    from dlfa.io import sha256_file

    seen: dict[str, Path] = {}
    for path in paths:
        digest = sha256_file(path)
        if digest in seen:
            raise DlfaInputError(f"same content as {seen[digest].name}; the two would be read twice (keep one)",
                                 path=path)
        seen[digest] = path


@dataclass(frozen=True)
class Hyperparameters:
    """XTREME's mBERT fine-tuning defaults for a task."""

    learning_rate: float = 2e-5
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128


class Task(ABC):
    """One task: its files, reader, label set, featurization and metric.

    ``parallel_splits`` names the splits whose files in different languages are translations of each other
    (the same examples, in the same order, in every language: XNLI dev/test, PAWS-X dev/test). Training or
    selecting a model on one language's file of such a split and scoring another language's file of the
    same split measures memorised content, not transfer; the honest-evaluation checks use this to refuse it.
    """

    name: str
    head: str  # "token" or "sequence" (see DLFAConfig.head)
    labels: tuple[str, ...]
    languages: tuple[str, ...]  # XTREME's language list for this task
    # The named scorers (dlfa.tasks.scoring) a run may pick (TrainConfig.scorer, --scorer), and the default.
    scorers: Mapping[str, Scorer] = {}
    default_scorer: str = ""
    # Ways of reading the data files' text (the first is the default); empty: one way. ``preprocessing_field``
    # names the TrainConfig field that chooses it, ``preprocessing_option`` the command-line flag.
    preprocessings: tuple[str, ...] = ()
    preprocessing_field: str | None = None
    preprocessing_option: str = "--preprocessing"
    eval_split: str = "test"  # where target languages are scored
    train_language: str = "en"
    defaults: Hyperparameters = Hyperparameters()
    # Regexes over file names with a named group "lang"; the split is substituted for {split}.
    file_patterns: tuple[str, ...] = ()
    # Splits whose per-language files are translations of one another (see the class docstring).
    parallel_splits: tuple[str, ...] = ()
    # True: a language must have exactly one file per split (several are an error, not concatenated).
    one_file_per_language: bool = False

    @property
    def label_to_id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    # -- scorers -------------------------------------------------------------------------------------------

    def get_scorer(self, name: str | None = None, option: str = "--scorer") -> Scorer:
        """The scorer called ``name``; ``None`` is the task's default. An unknown name is a DlfaInputError."""
        return pick_scorer(self.scorers, name, self.default_scorer, self.name, option)

    @property
    def primary_metric(self) -> str:
        """The headline metric of the default scorer (``get_scorer(name).metric`` for another one)."""
        return self.scorers[self.default_scorer].metric

    # -- preprocessing -------------------------------------------------------------------------------------

    def resolve_preprocessing(self, preprocessing: str | None) -> str | None:
        """``None`` becomes the default; tasks read one way accept only ``None``."""
        if not self.preprocessings:
            if preprocessing is not None:
                raise DlfaInputError(f"{self.name} data are read one way; there is no preprocessing to choose "
                                     f"(got {preprocessing!r})", option=self.preprocessing_option)
            return None
        if preprocessing is None:
            return self.preprocessings[0]
        if preprocessing not in self.preprocessings:
            raise DlfaInputError(f"must be one of {', '.join(self.preprocessings)}, got {preprocessing!r}",
                                 option=self.preprocessing_option)
        return preprocessing

    def preprocessing_from(self, config: Any) -> str | None:
        """The preprocessing a run config (a TrainConfig or its dict) asks for; ``None`` for one-way tasks."""
        if self.preprocessing_field is None:
            return None
        if isinstance(config, Mapping):
            value = config.get(self.preprocessing_field)
        else:
            value = getattr(config, self.preprocessing_field, None)
        return self.resolve_preprocessing(value)

    # -- files ---------------------------------------------------------------------------------------------

    def _matches(self, data_dir: Path, split: str) -> Iterator[tuple[str, Path]]:
        if not data_dir.is_dir():
            return
        regexes = [re.compile(p.replace("{split}", re.escape(split))) for p in self.file_patterns]
        # The same names with any-case, regional language codes: a file that only these match is a misnamed data
        # file (DE-test.conllu, dev-de_CH.tsv), which must not be skipped without a word.
        loose = [re.compile(p.replace("{split}", re.escape(split)).replace("[a-z]{2,3}", _LOOSE_LANGUAGE),
                            re.IGNORECASE) for p in self.file_patterns]
        for path in sorted(data_dir.iterdir()):
            for regex in regexes:
                match = regex.fullmatch(path.name)
                if match:
                    yield match.group("lang"), path
                    break
            else:
                if any(regex.fullmatch(path.name) for regex in loose):
                    raise DlfaInputError(
                        f"file name not understood as a {self.name} {split} file: the language must be a lower-case "
                        "code such as de or zh (regional variants like de_CH are not told apart); rename it",
                        path=path)

    def files(self, data_dir: str | Path, language: str, split: str) -> list[Path]:
        return [path for lang, path in self._matches(Path(data_dir), split) if lang == language]

    def available_languages(self, data_dir: str | Path, split: str) -> list[str]:
        return sorted({lang for lang, _ in self._matches(Path(data_dir), split)})

    def check_data_dir(self, data_dir: str | Path, option: str = "--data-dir") -> None:
        """The folder exists and holds this task's files; otherwise say what it holds instead."""
        data_dir = Path(data_dir)
        if not data_dir.exists():
            raise DlfaInputError(f"folder not found: {data_dir}", option=option)
        if not data_dir.is_dir():
            raise DlfaInputError(f"not a folder: {data_dir}", option=option)
        if any(self.available_languages(data_dir, split) for split in SPLITS):
            return
        from dlfa.tasks import TASKS

        others = [t.name for t in TASKS.values() if t.name != self.name
                  and any(t.available_languages(data_dir, split) for split in SPLITS)]
        if others:
            raise DlfaInputError(f"{data_dir} holds {others[0]} files, not {self.name} files (use --task {others[0]})",
                                 option="--task")
        raise DlfaInputError(f"no {self.name} files in {data_dir} (expected names like {self.example_names}; "
                             "`dlfa download " + self.name + "` fetches them)", option=option)

    @property
    def example_names(self) -> str:
        """Two file names this task reads, e.g. "en-train.conllu, de-test.conllu", for messages."""
        for pattern in self.file_patterns:
            names = [pattern.replace("{split}", split).replace("(?P<lang>[a-z]{2,3})", lang).replace("\\.", ".")
                     for split, lang in (("train", "en"), (self.eval_split, "de"))]
            if not any(c in name for name in names for c in "[](){}?*+\\"):
                return ", ".join(names)
        return ", ".join(self.file_patterns)

    def read(self, data_dir: str | Path, language: str, split: str, preprocessing: str | None = None) -> list:
        """All examples of one language and split (several files, e.g. UD treebanks, are concatenated).

        ``preprocessing``: one of ``preprocessings`` (``None``: the default); only for tasks that have some.
        """
        preprocessing = self.resolve_preprocessing(preprocessing)
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DlfaInputError("data folder not found", path=data_dir)
        paths = self.files(data_dir, language, split)
        if not paths:
            found = ", ".join(self.available_languages(data_dir, split)) or "none"
            hint = ""
            other = [s for s in SPLITS if s != split and language in self.available_languages(data_dir, s)]
            if split == "train" and other:
                hint = f"; it has a {other[0]} file for {language!r}: train on it with --train-split {other[0]}"
            raise DlfaInputError(
                f"no {self.name} {split} file for language {language!r} (languages with {split} files: {found}){hint}",
                path=data_dir,
            )
        if self.one_file_per_language and len(paths) > 1:
            names = ", ".join(str(p) for p in paths)
            raise DlfaInputError(
                f"several {self.name} {split} files for language {language!r} ({names}); keep one", path=data_dir
            )
        if len(paths) > 1:
            _refuse_duplicates(paths)
        # Tasks read one way keep their two-argument read_language_file / one-argument read_file.
        kwargs = {} if preprocessing is None else {"preprocessing": preprocessing}
        examples: list = []
        for path in paths:
            examples.extend(self.read_language_file(path, language, **kwargs))
        return examples

    def read_language_file(self, path: Path, language: str, **kwargs: Any) -> list:
        """The examples of ``language`` in one file; files holding several languages override this."""
        return self.read_file(path, **kwargs)

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
    def score(self, examples: Sequence, features: Sequence[dict], predictions: Sequence,
              scorer: str | None = None) -> dict[str, Any]:
        """Metrics (in percent) from per-feature predictions (see ``dlfa.evaluation``), by the named scorer
        (``None``: the default); the dict carries the scorer's name under ``"scorer"``."""


def shown(value: str, limit: int = 80) -> str:
    """``repr(value)`` for an error message, shortened: a 5 MB field must not make a 5 MB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"


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

    def score(self, examples: Sequence, features: Sequence[dict], predictions: Sequence,
              scorer: str | None = None) -> dict[str, Any]:
        from dlfa.data.features import sentence_predictions

        chosen = self.get_scorer(scorer)  # before the work: an unknown name fails fast
        predicted, unaligned = sentence_predictions(
            features, predictions, [len(s.words) for s in examples], self.labels, self.fallback_label
        )
        metrics = chosen([s.tags for s in examples], predicted)
        metrics["unaligned_words"] = unaligned
        return metrics

    def tag_metrics(self, gold: list[list[str]], predicted: list[list[str]], scorer: str | None = None) -> dict:
        """Metrics over per-sentence tag sequences, by the named scorer (``None``: the default)."""
        return self.get_scorer(scorer)(gold, predicted)


# -- sentence-pair classification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePair:
    """Two texts and a label name (XNLI: premise, hypothesis; PAWS-X: two sentences)."""

    text_a: str
    text_b: str
    label: str


def read_tsv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of a TSV file without quoting; blank lines are skipped."""
    for number, line in read_lines(path):
        if line.strip():
            yield number, line.split("\t")


def check_label(
    label: str, labels: Sequence[str], path: str | Path, line: int, aliases: Mapping[str, str] | None = None
) -> str:
    """The label name for a label field (``aliases`` maps other released spellings), or a file:line error."""
    label = label.strip()
    label = aliases.get(label, label) if aliases else label
    if label not in labels:
        raise DlfaInputError(f"unknown label {shown(label)} (expected one of: {', '.join(labels)})", path=path, line=line)
    return label


class PairClassificationTask(Task):
    """Sentence-pair classification (XNLI, PAWS-X): one label per pair, scored by accuracy."""

    head = "sequence"
    scorers = scorer_registry(EXAMPLE_ACCURACY)
    default_scorer = "accuracy"
    one_file_per_language = True

    def featurize(self, examples: Sequence[SentencePair], tokenizer, max_length: int) -> list[dict]:
        """One feature per pair: both texts encoded as a pair, truncated to ``max_length`` sub-tokens.

        Features hold ``input_ids``, ``token_type_ids`` when the tokenizer makes them (BERT does, XLM-R does
        not) and ``label`` (the label id), the keys ``dlfa.data.batching.Collator(tokenizer, "sequence")`` pads.
        """
        label_to_id = self.label_to_id
        features: list[dict] = []
        chunk_size = 1000
        for start in range(0, len(examples), chunk_size):
            chunk = examples[start : start + chunk_size]
            encoded = tokenizer(
                [e.text_a for e in chunk], [e.text_b for e in chunk], truncation=True, max_length=max_length
            )
            type_ids = encoded.get("token_type_ids")
            for offset, example in enumerate(chunk):
                feature = {"input_ids": encoded["input_ids"][offset], "label": label_to_id[example.label]}
                if type_ids is not None:
                    feature["token_type_ids"] = type_ids[offset]
                features.append(feature)
        return features

    def score(self, examples: Sequence[SentencePair], features: Sequence[dict], predictions: Sequence,
              scorer: str | None = None) -> dict[str, Any]:
        """Accuracy in percent from one predicted label id per feature (features and examples are 1:1)."""
        chosen = self.get_scorer(scorer)
        gold = [example.label for example in examples]
        if len(gold) != len(predictions):
            raise ValueError(f"{len(gold)} examples but {len(predictions)} predictions")
        if any(not 0 <= int(p) < len(self.labels) for p in predictions):
            raise ValueError(f"a predicted label id is outside 0..{len(self.labels) - 1}")
        return chosen(gold, [self.labels[int(p)] for p in predictions])
