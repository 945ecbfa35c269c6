"""``dlfa report``: the paper's tables and figures from finished run folders, aggregated over seeds.

A run folder is finished when it holds ``metrics.json`` (written last by the recipe). Every finished run under
the given folders is collected (recursively: a sweep's ``<task>/<model>/<row>/seed-<s>`` cells, hand-made runs,
or both), grouped by (task, model, row) and aggregated over its seeds:

* the row is ``baseline`` or ``D_x`` for the recipe's own methods, and ``<method>`` / ``<method>+D_x`` for any
  other ``method`` a run records (e.g. ``xmixup+D_8``, or ``reinit-1-4`` from ``dlfa analyze ablate``), so
  that different methods never share a cell;
* a cell is ``mean ± std (n)``: the mean over seeds, the *sample* standard deviation (n - 1 in the
  denominator; "–" when n = 1) and the number of seeds;
* the score of one run is ``metrics.json["average"][primary_metric]``: the primary metric averaged over
  **every** evaluated language, English included, as XTREME and the paper average. The zero-shot average
  without English is in each run's ``average_zero_shot`` and in Table 4's per-language columns.
* every table names the scorer behind its numbers (``metrics.json["scorer"]``, see ``dlfa.tasks.scoring``);
  runs of one task scored by different scorers are refused, never averaged together. A metrics.json written
  before dlfa named its scorers is read as the scorer dlfa used then (``LEGACY_SCORERS``), and a note says so.

Outputs (Markdown, CSV and LaTeX, each written atomically): Table 1 (task x row, best per column marked),
Table 2 (averages over language groups), Table 4 (per-language scores), ``seeds`` (seeds and spread of every
cell), the figures, and ``report.md`` that puts it all together with the command that produced it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.io import write_text_atomic
from dlfa.reporting.published import PUBLISHED, SOURCES, is_mbert, published_value
from dlfa.reporting.tables import markdown_table

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
TASK_ORDER = ("xnli", "pawsx", "panx", "udpos")
# What dlfa scored with before metrics.json named a scorer (seqeval >= 1.2 for both tagging tasks).
LEGACY_SCORERS = {"udpos": "seqeval", "panx": "seqeval-entity-f1", "xnli": "accuracy", "pawsx": "accuracy"}

# Language groups of Table 2. "enf" is the paper's group (English and German); the others group the XTREME
# languages by script and by family, so that a reader can see where fusion helps. A group is averaged over
# the languages of it that a task was evaluated on (the tables say how many).
LATIN_SCRIPT = (
    "af", "az", "de", "en", "es", "et", "eu", "fi", "fr", "hu", "id", "it", "jv", "lt", "ms", "nl", "pl", "pt",
    "qu", "ro", "sw", "tl", "tr", "vi", "wo", "yo",
)  # fmt: skip
NON_LATIN_SCRIPT = (
    "ar", "bg", "bn", "el", "fa", "gu", "he", "hi", "ja", "ka", "kk", "ko", "ml", "mr", "my", "pa", "ru", "ta",
    "te", "th", "uk", "ur", "zh",
)  # fmt: skip
DEFAULT_GROUPS: Mapping[str, tuple[str, ...]] = {
    "enf": ("en", "de"),
    "latin": LATIN_SCRIPT,
    "non-latin": NON_LATIN_SCRIPT,
    "germanic": ("af", "de", "en", "nl"),
    "romance": ("es", "fr", "it", "pt", "ro"),
    "slavic": ("bg", "pl", "ru", "uk"),
    "indo-aryan": ("bn", "gu", "hi", "mr", "pa", "ur"),
    "east-asian": ("ja", "ko", "zh"),
    "dravidian": ("ml", "ta", "te"),
    "turkic": ("az", "kk", "tr"),
    "uralic": ("et", "fi", "hu"),
    "austronesian": ("id", "jv", "ms", "tl"),
    "semitic": ("ar", "he"),
}


# -- reading runs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A table row: a method family ("" for the recipe's baseline/DLFA) and an optional fused layer."""

    family: str
    fuse_layer: int | None

    @property
    def label(self) -> str:
        if not self.family:
            return "baseline" if self.fuse_layer is None else f"D_{self.fuse_layer}"
        return self.family if self.fuse_layer is None else f"{self.family}+D_{self.fuse_layer}"

    @property
    def base(self) -> Row:
        """The same method without fusion: what a D_x row is compared with."""
        return Row(self.family, None)

    def sort_key(self) -> tuple:
        return (self.family != "", self.family, self.fuse_layer is not None, self.fuse_layer or 0)


def row_for(method: str, fuse_layer: int | None) -> Row:
    family = "" if method in ("baseline", "dlfa") else method
    return Row(family, fuse_layer)


@dataclass(frozen=True)
class RunResult:
    path: Path
    task: str
    model: str
    row: Row
    seed: int | None
    metric: str
    score: float  # metrics["average"][metric]: over all evaluated languages, English included
    languages: Mapping[str, float]  # the primary metric per language
    num_layers: int | None
    leaky: tuple[str, ...] = ()
    dev_score: float | None = None  # metrics["selection"]["best_score"]: English dev, the only selection signal
    scorer: str = ""  # metrics["scorer"], or LEGACY_SCORERS[task] for a metrics.json that names none
    scorer_inferred: bool = False  # True when the scorer came from LEGACY_SCORERS


@dataclass
class Collected:
    runs: list[RunResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(folder: str | Path) -> RunResult:
    """One finished run; a malformed metrics.json is one DlfaInputError naming the file."""
    folder = Path(folder)
    path = folder / METRICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DlfaInputError(f"malformed metrics file: {exc.msg} (column {exc.colno})", path=path,
                             line=exc.lineno) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DlfaInputError(f"unreadable metrics file ({type(exc).__name__})", path=path) from None

    def bad(what: str) -> DlfaInputError:
        return DlfaInputError(f"malformed metrics file: {what}", path=path)

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    for key in ("task", "model", "primary_metric"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise bad(f"'{key}' missing or not a string")
    metric = data["primary_metric"]
    scorer = data.get("scorer")
    if scorer is not None and (not isinstance(scorer, str) or not scorer):
        raise bad("'scorer' is not a string")
    inferred = scorer is None
    if inferred:
        scorer = LEGACY_SCORERS.get(data["task"], "unnamed")
    method = data.get("method", "dlfa" if data.get("fuse_layer") is not None else "baseline")
    if not isinstance(method, str) or not method:
        raise bad("'method' is not a string")
    fuse_layer = data.get("fuse_layer")
    if fuse_layer is not None and (not isinstance(fuse_layer, int) or isinstance(fuse_layer, bool)):
        raise bad(f"'fuse_layer' must be an integer or null, got {fuse_layer!r}")
    if method == "dlfa" and fuse_layer is None:
        raise bad("method 'dlfa' without a fuse_layer")
    avg = data.get("average")
    if not isinstance(avg, dict) or not _number(avg.get(metric)):
        raise bad(f"'average' has no number for the primary metric {metric!r}")
    langs = data.get("languages")
    if not isinstance(langs, dict) or not langs:
        raise bad("'languages' missing or empty")
    per_language: dict[str, float] = {}
    for lang, scores in langs.items():
        if not isinstance(scores, dict) or not _number(scores.get(metric)):
            raise bad(f"language {lang!r} has no number for {metric!r}")
        per_language[lang] = float(scores[metric])
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"'seed' must be an integer, got {seed!r}")
    leaky = data.get("leaky_languages") or []
    selection = data.get("selection")
    dev_score = selection.get("best_score") if isinstance(selection, dict) else None
    return RunResult(
        path=folder, task=data["task"], model=data["model"], row=row_for(method, fuse_layer), seed=seed,
        metric=metric, score=float(avg[metric]), languages=per_language, num_layers=_num_layers(folder),
        leaky=tuple(str(x) for x in leaky) if isinstance(leaky, list) else (),
        dev_score=float(dev_score) if _number(dev_score) else None, scorer=scorer, scorer_inferred=inferred,
    )


def _num_layers(folder: Path) -> int | None:
    """The encoder depth the run recorded (config.json "resolved"), for the x axis of the layer plot."""
    try:
        value = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["resolved"]["num_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def _is_unfinished_run(folder: Path, names: Sequence[str]) -> bool:
    """A run folder without metrics.json: it has the recipe's train.log or its config.json layout."""
    if "train.log" in names or "checkpoint" in names:
        return True
    if CONFIG_FILE in names:
        try:
            return "config" in json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    return False


def collect_runs(roots: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> Collected:
    """Every finished run under ``roots`` (recursive); unfinished run folders are listed as skipped."""
    collected = Collected()
    seen: set[Path] = set()
    excluded = {Path(p).resolve() for p in exclude}
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == METRICS_FILE:
            root = root.parent
        if not root.is_dir():
            raise DlfaInputError("run folder not found", path=root)
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            resolved = folder.resolve()
            if resolved in excluded:
                dirnames[:] = []
                continue
            dirnames.sort()
            names = filenames + dirnames
            if METRICS_FILE in filenames:
                dirnames[:] = []  # a run folder's best/ and checkpoint/ hold no other runs
                if resolved not in seen:
                    seen.add(resolved)
                    collected.runs.append(load_run(folder))
            elif _is_unfinished_run(folder, names):
                dirnames[:] = []
                if resolved not in seen:
                    seen.add(resolved)
                    collected.skipped.append((folder, "unfinished (no metrics.json)"))
    return collected


# -- aggregation -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds."""

    values: tuple[float, ...]
    seeds: tuple[int | None, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def spread(self) -> float:
        """max - min over seeds."""
        return max(self.values) - min(self.values)

    def text(self, show_n: bool = True) -> str:
        core = f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"
        return f"{core} (n={self.n})" if show_n else core


def _stat(values: Sequence[float], seeds: Sequence[int | None] = ()) -> Stat:
    return Stat(tuple(values), tuple(seeds))


Key = tuple[str, str, Row]  # task, model, row


def group_runs(runs: Iterable[RunResult]) -> dict[Key, list[RunResult]]:
    groups: dict[Key, list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.task, run.model, run.row), []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
    return groups


def task_sort_key(task: str) -> tuple:
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def model_label(model: str) -> str:
    return model.rstrip("/").split("/")[-1] if "/" in model and not model.startswith("embedded:") else model


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_label(text)).strip("_") or "model"


# -- tables ------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """One rendered table: plain-text cells, which of them are the best of their column, and CSV records."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) indices to bold
    notes: list[str] = field(default_factory=list)
    label_columns: int = 2


def _mark_best(table: Table, means: list[list[float | None]], columns: Iterable[int]) -> None:
    """Bold the highest mean of each column (ties: all of them)."""
    for col in columns:
        values = [row[col] for row in means if row[col] is not None]
        if len(values) < 2:
            continue
        top = max(values)
        for r, row in enumerate(means):
            if row[col] is not None and math.isclose(row[col], top, abs_tol=1e-9):
                table.best.add((r, col))


def table_markdown(table: Table) -> str:
    rows = [[f"**{cell}**" if (r, c) in table.best else cell for c, cell in enumerate(row)]
            for r, row in enumerate(table.rows)]
    parts = [f"### {table.title}", "", markdown_table(table.headers, rows, align_right_from=table.label_columns)]
    parts += [""] + [f"{note}  " for note in table.notes] if table.notes else []
    return "\n".join(parts).rstrip() + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    out = "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("–", "--").replace("Δ", r"$\Delta$").replace("−", "-")


def table_latex(table: Table) -> str:
    spec = "l" * table.label_columns + "r" * (len(table.headers) - table.label_columns)
    lines = [f"% {table.title}", r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}",
             r"\hline", " & ".join(tex_escape(h) for h in table.headers) + r" \\", r"\hline"]
    for r, row in enumerate(table.rows):
        cells = [rf"\textbf{{{tex_escape(c)}}}" if (r, i) in table.best else tex_escape(c) for i, c in enumerate(row)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", rf"\caption{{{tex_escape(table.title)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def records_csv(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    fields = list(dict.fromkeys(k for record in records for k in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_value(v) for k, v in record.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "" if value is None else value


@dataclass
class ReportOptions:
    published: str = "auto"  # "auto": beside mBERT rows only; "mbert": beside every model; "none"
    groups: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_GROUPS))
    groups_source: str = "built-in default groups"


def _published_for(model: str, options: ReportOptions) -> str | None:
    if options.published == "none":
        return None
    if options.published == "auto":
        return "mbert" if is_mbert(model) else None
    return options.published


class Report:
    """The aggregated view of a set of runs, and everything rendered from it."""

    def __init__(self, runs: Sequence[RunResult], options: ReportOptions | None = None) -> None:
        if not runs:
            raise DlfaInputError("no finished runs (folders with metrics.json) found")
        self.options = options or ReportOptions()
        self.runs = list(runs)
        self.groups = group_runs(self.runs)
        self.tasks = sorted({r.task for r in self.runs}, key=task_sort_key)
        self.metric = {task: next(r.metric for r in self.runs if r.task == task) for task in self.tasks}
        self.scorer = {task: next(r.scorer for r in self.runs if r.task == task) for task in self.tasks}
        for run in self.runs:
            if run.metric != self.metric[run.task]:
                raise DlfaInputError(f"primary metric {run.metric!r} differs from {self.metric[run.task]!r} of "
                                     f"other {run.task} runs", path=run.path / METRICS_FILE)
            if run.scorer != self.scorer[run.task]:
                raise DlfaInputError(f"scored by {run.scorer!r}, other {run.task} runs by "
                                     f"{self.scorer[run.task]!r}; their numbers are not comparable (re-score with "
                                     "`dlfa evaluate --scorer`, or report them separately)",
                                     path=run.path / METRICS_FILE)
        self.row_keys = sorted({(r.model, r.row) for r in self.runs},
                               key=lambda mr: (model_label(mr[0]), mr[0], mr[1].sort_key()))

    def measure(self, task: str) -> str:
        """The metric and the scorer that made it, for table headers and captions: ``f1, xtreme-2020``."""
        return f"{self.metric[task]}, {self.scorer[task]}"

    def cell(self, task: str, model: str, row: Row) -> Stat | None:
        members = self.groups.get((task, model, row))
        return _stat([r.score for r in members], [r.seed for r in members]) if members else None

    def language_cell(self, task: str, model: str, row: Row, lang: str) -> Stat | None:
        members = [r for r in self.groups.get((task, model, row), []) if lang in r.languages]
        return _stat([r.languages[lang] for r in members], [r.seed for r in members]) if members else None

    def task_languages(self, task: str) -> list[str]:
        """Every language any run of the task was scored on; English first."""
        langs = {lang for r in self.runs if r.task == task for lang in r.languages}
        return sorted(langs, key=lambda lang: (lang != "en", lang))

    def common_languages(self, task: str) -> list[str]:
        """The languages every run of the task was scored on (what Table 2 averages over)."""
        sets = [set(r.languages) for r in self.runs if r.task == task]
        common = set.intersection(*sets) if sets else set()
        return sorted(common, key=lambda lang: (lang != "en", lang))

    # Table 1 ---------------------------------------------------------------------------------------------------

    def table1(self) -> tuple[Table, list[dict[str, Any]]]:
        paper_tasks = [t for t in self.tasks if any(
            (src := _published_for(m, self.options)) and published_value(src, row.label, t) is not None
            for m, row in self.row_keys)]
        headers = ["model", "row"]
        columns: list[tuple[str, str]] = []  # (kind, task)
        for task in self.tasks:
            columns.append(("ours", task))
            headers.append(f"{task} ({self.measure(task)})")
            if task in paper_tasks:
                columns.append(("paper", task))
                headers.append(f"{task} paper")
        table = Table("Table 1: average score over all evaluated languages (incl. en), mean ± sample std over "
                      "seeds (n = seeds)", headers, [])
        means: list[list[float | None]] = []
        records: list[dict[str, Any]] = []
        for model, row in self.row_keys:
            source = _published_for(model, self.options)
            cells, row_means = [model_label(model), row.label], [None, None]
            for kind, task in columns:
                if kind == "paper":
                    value = published_value(source, row.label, task) if source else None
                    cells.append("–" if value is None else f"{value:.2f}")
                    row_means.append(None)
                    continue
                stat = self.cell(task, model, row)
                cells.append("–" if stat is None else stat.text())
                row_means.append(None if stat is None else stat.mean)
            table.rows.append(cells)
            means.append(row_means)
        _mark_best(table, means, [i + 2 for i, (kind, _) in enumerate(columns) if kind == "ours"])
        for r, (model, row) in enumerate(self.row_keys):
            source = _published_for(model, self.options)
            for i, (kind, task) in enumerate(columns):
                if kind != "ours":
                    continue
                stat = self.cell(task, model, row)
                if stat is None:
                    continue
                records.append({
                    "task": task, "model": model, "row": row.label, "metric": self.metric[task],
                    "scorer": self.scorer[task],
                    "mean": stat.mean, "std": stat.std, "n": stat.n, "seeds": list(stat.seeds),
                    "best": "*" if (r, i + 2) in table.best else "",
                    "published": published_value(source, row.label, task) if source else None,
                })
        table.notes.append("Bold: best mean of the column. Each run's score is metrics.json `average` (the primary "
                           "metric over every evaluated language, English included, as in XTREME). Headers: "
                           "task (metric, scorer).")
        if paper_tasks:
            sources = sorted({s for m, _ in self.row_keys if (s := _published_for(m, self.options))})
            table.notes.append("'paper' columns: " + "; ".join(SOURCES[s] for s in sources) + " (single runs, "
                               "other data versions; not marked as best).")
            if "udpos" in paper_tasks:
                table.notes.append("The paper does not say which seqeval made its UD-POS F1 (most likely 1.x, dlfa's "
                                   f"scorer `seqeval`); ours here: `{self.scorer['udpos']}`.")
        return table, records

    # Table 2 ---------------------------------------------------------------------------------------------------

    def table2(self) -> tuple[list[Table], list[dict[str, Any]]]:
        tables, records = [], []
        for task in self.tasks:
            common = set(self.common_languages(task))
            present = {g: [lang for lang in langs if lang in common] for g, langs in self.options.groups.items()}
            used = [g for g, langs in present.items() if langs]
            headers = ["model", "row", "n seeds"] + [f"{g} ({len(present[g])}/{len(self.options.groups[g])})" for g in used]
            table = Table(f"Table 2 ({task}): {self.metric[task]} (scorer {self.scorer[task]}) averaged over "
                          "language groups, mean ± std over seeds", headers, [], label_columns=2)
            means: list[list[float | None]] = []
            for model, row in self.row_keys:
                members = self.groups.get((task, model, row))
                if not members:
                    continue
                cells, row_means = [model_label(model), row.label, str(len(members))], [None, None, None]
                for g in used:
                    per_seed = [statistics.fmean(r.languages[lang] for lang in present[g]) for r in members]
                    stat = _stat(per_seed, [r.seed for r in members])
                    cells.append(stat.text(show_n=False))
                    row_means.append(stat.mean)
                    records.append({"task": task, "model": model, "row": row.label, "group": g,
                                    "languages": present[g], "mean": stat.mean, "std": stat.std, "n": stat.n,
                                    "seeds": list(stat.seeds)})
                table.rows.append(cells)
                means.append(row_means)
            _mark_best(table, means, range(3, len(headers)))
            table.notes.append("Header `group (k/m)`: k of the group's m languages were evaluated in every run of "
                               f"this task and are averaged. Languages used: {', '.join(sorted(common))}.")
            missing = [g for g in self.options.groups if g not in used]
            if missing:
                table.notes.append(f"Groups with no evaluated language: {', '.join(missing)}.")
            extra = sorted(set(self.task_languages(task)) - common)
            if extra:
                table.notes.append(f"Left out (not evaluated in every run): {', '.join(extra)}.")
            tables.append(table)
        return tables, records

    # Table 4 ---------------------------------------------------------------------------------------------------

    def table4(self) -> tuple[list[Table], list[dict[str, Any]]]:
        tables, records = [], []
        for task in self.tasks:
            langs = self.task_languages(task)
            table = Table(f"Table 4 ({task}): {self.metric[task]} (scorer {self.scorer[task]}) per language, "
                          "mean ± std over seeds",
                          ["model", "row", "n seeds"] + langs, [], label_columns=2)
            means: list[list[float | None]] = []
            for model, row in self.row_keys:
                members = self.groups.get((task, model, row))
                if not members:
                    continue
                cells, row_means = [model_label(model), row.label, str(len(members))], [None, None, None]
                for lang in langs:
                    stat = self.language_cell(task, model, row, lang)
                    if stat is None:
                        cells.append("–")
                        row_means.append(None)
                        continue
                    cells.append(stat.text(show_n=stat.n != len(members)))
                    row_means.append(stat.mean)
                    records.append({"task": task, "model": model, "row": row.label, "language": lang,
                                    "mean": stat.mean, "std": stat.std, "n": stat.n, "seeds": list(stat.seeds)})
                table.rows.append(cells)
                means.append(row_means)
            _mark_best(table, means, range(3, len(langs) + 3))
            table.notes.append("n seeds: runs of the row; a cell shows its own (n=...) where fewer runs scored the language.")
            tables.append(table)
        return tables, records

    def table4_by_language(self) -> list[Table]:
        """Table 4 turned around (a language per line, a column per model row): readable with 40 languages."""
        tables = []
        for task in self.tasks:
            keys = [(m, row) for m, row in self.row_keys if (task, m, row) in self.groups]
            models = {m for m, _ in keys}
            names = [row.label if len(models) == 1 else f"{model_label(m)} {row.label}" for m, row in keys]
            table = Table(f"Table 4 ({task}) by language: {self.metric[task]} (scorer {self.scorer[task]}), "
                          "mean ± std over seeds",
                          ["language"] + names, [], label_columns=1)
            means: list[list[float | None]] = []
            for lang in self.task_languages(task) + ["average"]:
                cells, line = [lang], [None]
                for m, row in keys:
                    stat = self.cell(task, m, row) if lang == "average" else self.language_cell(task, m, row, lang)
                    cells.append("–" if stat is None else stat.text(show_n=False))
                    line.append(None if stat is None else stat.mean)
                table.rows.append(cells)
                means.append(line)
            for r, line in enumerate(means):  # best of each language (line), not of each column
                values = [v for v in line if v is not None]
                if len(values) > 1:
                    table.best.update((r, c) for c, v in enumerate(line)
                                      if v is not None and math.isclose(v, max(values), abs_tol=1e-9))
            table.notes.append("Bold: best mean of the line. average: metrics.json `average` (all evaluated "
                               "languages, English included), as in Table 1.")
            tables.append(table)
        return tables

    # Layer selection on English dev ------------------------------------------------------------------------------

    def dev_cell(self, task: str, model: str, row: Row) -> Stat | None:
        members = [r for r in self.groups.get((task, model, row), []) if r.dev_score is not None]
        return _stat([r.dev_score for r in members], [r.seed for r in members]) if members else None

    def selected_rows(self) -> dict[tuple[str, str, str], Row]:
        """(task, model, family) -> the fused row with the best mean English-dev score: the honest pick of x."""
        chosen: dict[tuple[str, str, str], tuple[float, Row]] = {}
        for (task, model, row) in self.groups:
            stat = self.dev_cell(task, model, row) if row.fuse_layer is not None else None
            key = (task, model, row.family)
            if stat is not None and (key not in chosen or stat.mean > chosen[key][0]):
                chosen[key] = (stat.mean, row)
        return {key: row for key, (_, row) in chosen.items()}

    def paired_delta(self, task: str, model: str, row: Row) -> Stat | None:
        """Score of ``row`` minus its base row, seed by seed (only seeds both rows ran)."""
        base = {r.seed: r.score for r in self.groups.get((task, model, row.base), []) if r.seed is not None}
        pairs = [(r.seed, r.score - base[r.seed]) for r in self.groups.get((task, model, row), []) if r.seed in base]
        return _stat([d for _, d in pairs], [s for s, _ in pairs]) if pairs else None

    def selection_table(self) -> tuple[Table, list[dict[str, Any]]]:
        table = Table("Layer selection on English dev (the only selection signal): dev score of each row, its "
                      "zero-shot average, and the paired difference to its base row over the same seeds",
                      ["task", "model", "row", "en dev", "average (Table 1)", "Δ vs base (paired)", "selected"], [],
                      label_columns=3)
        selected = self.selected_rows()
        records = []
        for task in self.tasks:
            for model, row in self.row_keys:
                dev, score = self.dev_cell(task, model, row), self.cell(task, model, row)
                if dev is None or score is None:
                    continue
                delta = self.paired_delta(task, model, row) if row.fuse_layer is not None else None
                is_selected = selected.get((task, model, row.family)) == row
                table.rows.append([task, model_label(model), row.label, dev.text(), score.text(),
                                   "–" if delta is None else delta.text(),
                                   "✓ (best en dev)" if is_selected else ""])
                records.append({"task": task, "model": model, "row": row.label, "dev_mean": dev.mean,
                                "dev_std": dev.std, "mean": score.mean, "std": score.std, "n": score.n,
                                "delta_mean": None if delta is None else delta.mean,
                                "delta_std": None if delta is None else delta.std, "selected": is_selected})
        table.notes.append("en dev: metrics.json `selection.best_score`, the English-dev score of the checkpoint "
                           "each run kept. The selected row of each method is the fused layer with the best mean "
                           "English-dev score; target-language scores play no part in the choice.")
        return table, records

    # Seeds and spread --------------------------------------------------------------------------------------------

    def seeds_table(self) -> tuple[Table, list[dict[str, Any]]]:
        table = Table("Seeds and spread of every cell (score = average over all evaluated languages)",
                      ["task", "model", "row", "n", "seeds", "mean", "std", "min", "max", "max-min"], [],
                      label_columns=3)
        records = []
        for task in self.tasks:
            for model, row in self.row_keys:
                members = self.groups.get((task, model, row))
                if not members:
                    continue
                stat = self.cell(task, model, row)
                assert stat is not None
                seeds = [("?" if s is None else str(s)) for s in stat.seeds]
                table.rows.append([task, model_label(model), row.label, str(stat.n), ",".join(seeds),
                                   f"{stat.mean:.2f}", "–" if stat.std is None else f"{stat.std:.2f}",
                                   f"{min(stat.values):.2f}", f"{max(stat.values):.2f}", f"{stat.spread:.2f}"])
                records.append({"task": task, "model": model, "row": row.label, "n": stat.n, "seeds": seeds,
                                "mean": stat.mean, "std": stat.std, "min": min(stat.values),
                                "max": max(stat.values), "runs": [str(r.path) for r in members]})
        return table, records

    def published_table(self) -> Table | None:
        sources = sorted({s for m, _ in self.row_keys if (s := _published_for(m, self.options))})
        if not sources:
            return None
        source = sources[0]
        rows_data = PUBLISHED[source]
        tasks = [t for t in TASK_ORDER if any(t in v for v in rows_data.values())]
        table = Table(f"Published: {SOURCES[source]}", ["row"] + tasks, [], label_columns=1)
        for row, values in rows_data.items():
            table.rows.append([row] + [f"{values[t]:.2f}" if t in values else "–" for t in tasks])
        return table

    # Notes -------------------------------------------------------------------------------------------------------

    def notes(self) -> list[str]:
        notes = []
        for task in self.tasks:
            sets = {frozenset(r.languages) for r in self.runs if r.task == task}
            if len(sets) > 1:
                notes.append(f"{task}: runs were scored on different language sets, so their averages (Table 1) "
                             "are over different languages; Table 2 uses only the languages common to all runs.")
            ns = {stat.n for m, row in self.row_keys if (stat := self.cell(task, m, row)) is not None}
            if len(ns) > 1:
                notes.append(f"{task}: cells have different numbers of seeds ({', '.join(map(str, sorted(ns)))}); "
                             "see the seeds table.")
        for key, members in self.groups.items():
            seeds = [r.seed for r in members]
            if len(set(seeds)) < len(seeds):
                notes.append(f"{key[0]} {model_label(key[1])} {key[2].label}: the same seed appears in several "
                             f"runs ({', '.join(str(r.path) for r in members)}); all are counted.")
        for task in self.tasks:
            inferred = [r for r in self.runs if r.task == task and r.scorer_inferred]
            if inferred:
                notes.append(f"{task}: {len(inferred)} run(s) name no scorer in metrics.json (written before dlfa "
                             f"named its scorers); read as {self.scorer[task]!r}, what dlfa scored with then.")
        leaky = sorted({f"{r.task}:{lang}" for r in self.runs for lang in r.leaky})
        if leaky:
            notes.append(f"Leaky evaluations (scored on translations of the training file): {', '.join(leaky)}.")
        return notes

    # Figures -----------------------------------------------------------------------------------------------------

    def plot_layers(self, task: str, model: str, path: Path) -> bool:
        """Score vs fused layer: mean with seed std as error bars, each seed as a dot, the base rows as bands."""
        from dlfa.reporting.plots import _pyplot, save_figure

        rows = sorted({row for (t, m, row) in self.groups if t == task and m == model}, key=Row.sort_key)
        fused = [row for row in rows if row.fuse_layer is not None]
        if not fused:
            return False
        depth = [r.num_layers for (t, m, _), members in self.groups.items() if t == task and m == model
                 for r in members if r.num_layers]
        num_layers = max(depth) if depth else max(row.fuse_layer for row in fused) + 1
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        families = list(dict.fromkeys(row.family for row in rows))
        for i, family in enumerate(families):
            color = colors[i % len(colors)]
            name = "DLFA" if not family else family
            points = [row for row in fused if row.family == family]
            if points:
                stats = [self.cell(task, model, row) for row in points]
                xs = [row.fuse_layer for row in points]
                ax.errorbar(xs, [s.mean for s in stats], yerr=[s.std or 0.0 for s in stats], marker="o", capsize=3,
                            color=color, label=f"{name} D_x (mean ± std, n={max(s.n for s in stats)})")
                for x, s in zip(xs, stats):
                    ax.scatter([x] * s.n, s.values, s=9, color=color, alpha=0.35, linewidths=0)
            base = self.cell(task, model, Row(family, None))
            if base is not None:
                label = "baseline" if not family else family
                ax.axhline(base.mean, color=color, linestyle="--", label=f"{label} (mean ± std, n={base.n})")
                if base.std:
                    ax.axhspan(base.mean - base.std, base.mean + base.std, color=color, alpha=0.12)
        source = _published_for(model, self.options)
        if source:
            paper = [(x, published_value(source, f"D_{x}", task)) for x in range(1, num_layers)]
            paper = [(x, v) for x, v in paper if v is not None]
            if paper:
                ax.plot(*zip(*paper), color="grey", linestyle=":", marker=".", label="paper D_x")
            base_value = published_value(source, "baseline", task)
            if base_value is not None:
                ax.axhline(base_value, color="grey", linestyle="-.", linewidth=1, label="paper baseline")
        ax.set_xticks(range(1, num_layers))
        ax.set_xlim(0.5, num_layers - 0.5)
        ax.set_xlabel("fused layer x (D_x)")
        ax.set_ylabel(f"{self.measure(task)} (average over languages)")
        ax.set_title(f"{task} · {model_label(model)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        save_figure(fig, path)
        plt.close(fig)
        return True

    def plot_delta_heatmap(self, task: str, model: str, path: Path) -> bool:
        """Per-language (D_x − its base row), mean over seeds; diverging colours centred at zero."""
        from dlfa.reporting.plots import _pyplot, save_figure

        rows = sorted({row for (t, m, row) in self.groups if t == task and m == model and row.fuse_layer is not None
                       and (t, m, row.base) in self.groups}, key=Row.sort_key)
        if not rows:
            return False
        langs = self.task_languages(task)
        matrix: list[list[float]] = []
        for row in rows:
            line = []
            for lang in langs:
                ours, base = (self.language_cell(task, model, row, lang),
                              self.language_cell(task, model, row.base, lang))
                line.append(math.nan if ours is None or base is None else ours.mean - base.mean)
            matrix.append(line)
        finite = [abs(v) for line in matrix for v in line if not math.isnan(v)]
        bound = max(finite) if finite and max(finite) > 0 else 1.0
        plt = _pyplot()
        from matplotlib.colors import TwoSlopeNorm

        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(langs) + 2.5), max(2.5, 0.38 * len(rows) + 1.5)))
        image = ax.imshow(matrix, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound),
                          aspect="auto")
        ax.set_xticks(range(len(langs)), langs, rotation=90 if len(langs) > 12 else 0)
        ax.set_yticks(range(len(rows)), [row.label for row in rows])
        if len(rows) * len(langs) <= 300:
            for i, line in enumerate(matrix):
                for j, value in enumerate(line):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:+.1f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, label=f"Δ {self.metric[task]} vs baseline")
        ax.set_title(f"{task} · {model_label(model)}: D_x − baseline per language (mean over seeds)")
        save_figure(fig, path)
        plt.close(fig)
        return True


# -- writing -----------------------------------------------------------------------------------------------------


def command_line() -> str:
    """How this process was started, for the report (``dlfa ...`` when run as the console script)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("dlfa", "__main__.py"):
        argv[0] = "dlfa"
    return shlex.join(argv)


def load_groups(path: str | Path) -> dict[str, list[str]]:
    """A JSON object {group: [language, ...]}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlfaInputError("groups file not found", path=path) from None
    except json.JSONDecodeError as exc:
        raise DlfaInputError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DlfaInputError(f"unreadable groups file ({type(exc).__name__})", path=path) from None
    if not isinstance(data, dict) or not data:
        raise DlfaInputError('expected a JSON object {"group": ["lang", ...]}', path=path)
    for name, langs in data.items():
        if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs) or not langs:
            raise DlfaInputError(f"group {name!r} must be a non-empty list of language codes", path=path)
    return {name: list(langs) for name, langs in data.items()}


def write_report(
    roots: Sequence[str | Path],
    output: str | Path | None = None,
    options: ReportOptions | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Collect, aggregate and write every table and figure; returns what was written."""
    if not roots:
        raise DlfaInputError("give at least one run folder")
    output = Path(output) if output is not None else Path(roots[0]) / "report"
    collected = collect_runs(roots, exclude=[output])
    report = Report(collected.runs, options)
    command = command or command_line()
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        write_text_atomic(output / name, text)
        written.append(output / name)

    t1, r1 = report.table1()
    t2, r2 = report.table2()
    t4, r4 = report.table4()
    seeds, rs = report.seeds_table()
    selection, rsel = report.selection_table()
    outputs = [("table1", [t1], r1), ("table2", t2, r2), ("table4", t4, r4), ("seeds", [seeds], rs)]
    if selection.rows:
        outputs.append(("selection", [selection], rsel))
    for name, tables, records in outputs:
        put(f"{name}.md", "\n".join(table_markdown(t) for t in tables))
        put(f"{name}.csv", records_csv(records))
        put(f"{name}.tex", "\n".join(table_latex(t) for t in tables))
    by_language = report.table4_by_language()  # the same records as table4.csv, a language per line
    put("table4_by_language.md", "\n".join(table_markdown(t) for t in by_language))
    put("table4_by_language.tex", "\n".join(table_latex(t) for t in by_language))

    figures: list[Path] = []
    for task in report.tasks:
        for model in sorted({m for (t, m, _) in report.groups if t == task}):
            layers = output / f"layers_{task}_{_slug(model)}.png"
            if report.plot_layers(task, model, layers):
                figures.append(layers)
            heat = output / f"delta_{task}_{_slug(model)}.png"
            if report.plot_delta_heatmap(task, model, heat):
                figures.append(heat)
    written += figures

    published = report.published_table()
    n_values = sorted({s.n for (t, m, row) in report.groups if (s := report.cell(t, m, row))})
    all_seeds = sorted({r.seed for r in report.runs if r.seed is not None})
    stds = [s.std for (t, m, row) in report.groups if (s := report.cell(t, m, row)) and s.std is not None]
    lines = [
        "# DLFA report",
        "",
        f"Command: `{command}`  ",
        f"Run folders: {', '.join(f'`{r}`' for r in roots)}  ",
        f"Finished runs: {len(report.runs)} in {len(report.groups)} cells; skipped: {len(collected.skipped)}.  ",
        f"Seeds: {', '.join(map(str, all_seeds)) or 'not recorded'}; runs per cell (n): "
        f"{', '.join(map(str, n_values))} (per cell: see the seeds table).  ",
        "Spread: cells are mean ± sample standard deviation over seeds (n − 1 in the denominator; '–' when "
        "n = 1). " + (f"Std over cells: median {statistics.median(stds):.2f}, largest {max(stds):.2f}."
                      if stds else "No cell has more than one seed, so no spread can be given."),
        "",
        "Score of a run: the primary metric (" + ", ".join(f"{t}: {report.metric[t]} by scorer "
                                                         f"`{report.scorer[t]}`" for t in report.tasks)
        + ") averaged over every evaluated language **including English** (metrics.json `average`, the XTREME "
        f"convention). Language groups (Table 2): {report.options.groups_source}.",
        "",
        table_markdown(t1),
    ]
    if selection.rows:
        lines.append(table_markdown(selection))
    lines += [table_markdown(t) for t in t2] + [table_markdown(t) for t in t4] + [table_markdown(seeds)]
    if published is not None:
        lines.append(table_markdown(published))
    if figures:
        lines += ["### Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    notes = report.notes()
    if notes:
        lines += ["### Notes", ""] + [f"* {note}" for note in notes] + [""]
    if collected.skipped:
        lines += ["### Skipped run folders", ""] + [f"* `{p}`: {why}" for p, why in collected.skipped] + [""]
    lines += ["Files: " + ", ".join(f"`{p.name}`" for p in written), ""]
    put("report.md", "\n".join(lines))
    return {"output": str(output), "runs": len(report.runs), "skipped": [str(p) for p, _ in collected.skipped],
            "files": [str(p) for p in written], "table1": table_markdown(t1)}
