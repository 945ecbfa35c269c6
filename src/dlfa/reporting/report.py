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
  every language the run scored (XTREME and the paper include English). Every average is labelled with what it
  holds, computed from the languages the runs actually scored ("avg of 21 incl. en", "avg of 20 targets (en
  excluded)"); a run whose ``average`` is not the mean of its per-language scores is refused.
* every table names the scorer behind its numbers (``metrics.json["scorer"]``, see ``dlfa.tasks.scoring``);
  runs of one task scored by different scorers are refused, never averaged together. A metrics.json written
  before dlfa named its scorers is read as the scorer dlfa used then (``LEGACY_SCORERS``), and a note says so.

A run whose selected checkpoint scores far below what the task normally reaches on English dev
(:mod:`dlfa.reporting.references`) is listed under "Warnings" at the top of ``report.md``, and the layer-selection
table never marks such a row as a plain "selected".

Outputs (Markdown, CSV and booktabs LaTeX, each written atomically): Table 1 (task x row, best per column
marked), Table 2 (averages over language groups), Table 4 (per-language scores), ``seeds`` (seeds and spread of
every cell), the figures (PNG and PDF), and ``report.md`` that puts it all together with the command that produced
it. Where they go (:func:`resolve_output`): the ``output`` given; else ``<RUN_DIR>/report`` for a single folder
that is not itself a run (a sweep), or ``<sweep>/report`` when several folders all lie in one sweep folder;
otherwise ``report-<hash>`` in the current folder, the hash naming the set of run folders (the same command
updates the same folder). A folder is written only if it is new, empty, or was made by ``dlfa report`` (it holds
``dlfa-report.json``): an existing file or anyone else's folder is refused, never replaced.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlfa import __version__
from dlfa.errors import DlfaInputError
from dlfa.io import write_json_atomic, write_text_atomic
from dlfa.reporting.prune import PRUNED_FILE
from dlfa.reporting.published import PUBLISHED, SOURCES, is_mbert, published_value
from dlfa.reporting.references import SELECTION_LANGUAGE, check_selected_score, selection_floor
from dlfa.reporting.tables import average_label, markdown_table

if TYPE_CHECKING:
    from dlfa.configs import ReportConfig

__all__ = ["check_selected_score", "write_report", "run_report", "resolve_output", "Report"]

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
        """The same method without fusion: what a D_x row is compared with (a DLFA variant such as
        ``gate-baseline+D_8`` is compared with the method's own baseline, which has no gate)."""
        from dlfa.training.config import VARIANT_NAMES

        return Row("+".join(p for p in self.family.split("+") if p and p not in VARIANT_NAMES), None)

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
    selection_language: str = SELECTION_LANGUAGE
    scorer: str = ""  # metrics["scorer"], or LEGACY_SCORERS[task] for a metrics.json that names none
    scorer_inferred: bool = False  # True when the scorer came from LEGACY_SCORERS
    pruned: bool = False  # its weights were deleted after it finished (pruned.json); the scores stand

    @property
    def dev_warning(self) -> str | None:
        """The warning of :func:`check_selected_score` for this run's selected checkpoint, if any."""
        return check_selected_score(self.task, self.metric, self.dev_score, self.selection_language)


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
    # The tables label each average by the languages it holds: that label must describe the number.
    mean = statistics.fmean(per_language.values())
    if not math.isclose(avg[metric], mean, rel_tol=1e-6, abs_tol=1e-6):
        raise bad(f"'average' {metric} {avg[metric]:.4f} is not the mean of its {len(per_language)} per-language "
                  f"scores ({mean:.4f})")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"'seed' must be an integer, got {seed!r}")
    leaky = data.get("leaky_languages") or []
    selection = data.get("selection")
    dev_score = selection.get("best_score") if isinstance(selection, dict) else None
    language = selection.get("language") if isinstance(selection, dict) else None
    return RunResult(
        path=folder, task=data["task"], model=data["model"], row=row_for(method, fuse_layer), seed=seed,
        metric=metric, score=float(avg[metric]), languages=per_language, num_layers=_num_layers(folder),
        leaky=tuple(str(x) for x in leaky) if isinstance(leaky, list) else (),
        dev_score=float(dev_score) if _number(dev_score) else None, scorer=scorer, scorer_inferred=inferred,
        selection_language=language if isinstance(language, str) and language else SELECTION_LANGUAGE,
        pruned=(folder / PRUNED_FILE).is_file(),
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
    """One rendered table: plain-text cells, which of them are the best of their column, and CSV records.

    ``title`` heads the Markdown table ("Table 1: ..."); ``caption`` is the LaTeX caption, without the "Table 1:"
    that LaTeX adds itself (default: the title with such a prefix removed); ``key`` names its ``\\label``.
    """

    title: str
    headers: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) indices to bold
    notes: list[str] = field(default_factory=list)
    label_columns: int = 2
    caption: str = ""
    key: str = ""

    def latex_caption(self) -> str:
        return self.caption or re.sub(r"^Table\s+\d+\s*:\s*", "", self.title)

    def latex_label(self) -> str:
        key = self.key or self.title
        return "tab:dlfa-" + (re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower() or "table")


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


# pdflatex reads ASCII safely; everything else dlfa writes gets a LaTeX spelling. Characters that OT1-encoded
# text mode prints wrongly (|, <, >) get their text commands.
_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
                "±": r"$\pm$", "–": "--", "—": "---", "−": "$-$", "Δ": r"$\Delta$", "·": r"$\cdot$",
                "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "≈": r"$\approx$", "→": r"$\rightarrow$",
                "✓": r"yes", "✗": r"no", "…": r"\ldots{}", "‘": "`", "’": "'", "“": "``", "”": "''",
                "\u00a0": "~"}


def tex_escape(text: str) -> str:
    """``text`` as pdflatex-safe ASCII LaTeX: specials escaped, known symbols as macros, accents dropped, and any
    other character spelled ``[U+XXXX]`` (visible, never a compile error)."""
    out = []
    for ch in text:
        if ch in _TEX_ESCAPES:
            out.append(_TEX_ESCAPES[ch])
        elif ch.isascii():
            out.append(ch)
        else:
            base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
            out.append(tex_escape(base) if base and base.isascii() else f"[U+{ord(ch):04X}]")
    return "".join(out)


def _tex_cell(text: str) -> str:
    """A table cell: escaped, with a minus sign (not a hyphen) before negative numbers."""
    return re.sub(r"(?<![\w-])-(?=\d)", "$-$", tex_escape(text))


def _tex_note(note: str) -> str:
    """A note with its `code` spans in \\texttt."""
    parts = note.split("`")
    if len(parts) % 2 == 0:  # unbalanced backticks: no code spans
        return tex_escape(note)
    return "".join(rf"\texttt{{{tex_escape(p)}}}" if i % 2 else tex_escape(p) for i, p in enumerate(parts))


def table_latex(table: Table) -> str:
    """A booktabs table float (needs ``\\usepackage{booktabs}``): caption above, ``\\label``, notes below."""
    spec = "l" * table.label_columns + "r" * (len(table.headers) - table.label_columns)
    lines = [f"% {tex_escape(table.title)}", r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\small", rf"\caption{{{tex_escape(table.latex_caption())}}}", rf"\label{{{table.latex_label()}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(tex_escape(h) for h in table.headers) + r" \\",
             r"\midrule"]
    for r, row in enumerate(table.rows):
        cells = [rf"\textbf{{{_tex_cell(c)}}}" if (r, i) in table.best else _tex_cell(c) for i, c in enumerate(row)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines += [r"\par\smallskip", r"{\footnotesize"] + [_tex_note(n) + r"\par" for n in table.notes] + ["}"]
    lines.append(r"\end{table}")
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

    def average_label(self, task: str, runs: Sequence[RunResult] | None = None) -> str:
        """What the runs' averages hold, from the languages they scored: ``avg of 21 incl. en``, ``avg of 20
        targets (en excluded)``, or, where runs scored different sets, the range and how many included English."""
        runs = [r for r in self.runs if r.task == task] if runs is None else list(runs)
        sets = {frozenset(r.languages) for r in runs}
        if len(sets) == 1:
            return average_label(sorted(next(iter(sets))), SELECTION_LANGUAGE)
        sizes = sorted({len(s) for s in sets})
        count = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        with_en = sum(SELECTION_LANGUAGE in r.languages for r in runs)
        en = ("incl. en" if with_en == len(runs) else "en excluded" if with_en == 0
              else f"en in {with_en} of {len(runs)} runs")
        return f"avg of {count} languages, sets differ ({en})"

    def cell_warnings(self, task: str, model: str, row: Row) -> list[str]:
        """The dev-score warnings of a cell's runs (:func:`check_selected_score`), one per run below the floor."""
        return [f"{r.path}: {w}" for r in self.groups.get((task, model, row), []) if (w := r.dev_warning)]

    def warnings(self) -> list[str]:
        """Every run whose selected checkpoint is far below what the task reaches on English dev."""
        return [f"{r.path}: {w}" for r in sorted(self.runs, key=lambda r: str(r.path)) if (w := r.dev_warning)]

    # Table 1 ---------------------------------------------------------------------------------------------------

    def table1(self) -> tuple[Table, list[dict[str, Any]]]:
        paper_tasks = [t for t in self.tasks if any(
            (src := _published_for(m, self.options)) and published_value(src, row.label, t) is not None
            for m, row in self.row_keys)]
        headers = ["model", "row"]
        columns: list[tuple[str, str]] = []  # (kind, task)
        for task in self.tasks:
            columns.append(("ours", task))
            headers.append(f"{task} ({self.measure(task)}, {self.average_label(task)})")
            if task in paper_tasks:
                columns.append(("paper", task))
                headers.append(f"{task} paper")
        table = Table("Table 1: each run's average over the languages it scored (the header says which), mean ± "
                      "sample std over seeds (n = seeds)", headers, [], key="table1")
        flagged = False
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
                mark = " (!)" if self.cell_warnings(task, model, row) else ""
                flagged = flagged or bool(mark)
                cells.append("–" if stat is None else stat.text() + mark)
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
                members = self.groups[(task, model, row)]
                records.append({
                    "task": task, "model": model, "row": row.label, "metric": self.metric[task],
                    "average_of": self.average_label(task, members),
                    "scorer": self.scorer[task],
                    "mean": stat.mean, "std": stat.std, "n": stat.n, "seeds": list(stat.seeds),
                    "best": "*" if (r, i + 2) in table.best else "",
                    "published": published_value(source, row.label, task) if source else None,
                    "warning": len(self.cell_warnings(task, model, row)),
                })
        table.notes.append("Bold: best mean of the column. Each run's score is metrics.json `average`, the primary "
                           "metric averaged over the languages the run scored (XTREME includes English). "
                           "Headers: task (metric, scorer, average).")
        for task in self.tasks:
            langs = self.task_languages(task)
            table.notes.append(f"{task}: {self.average_label(task)}: {', '.join(langs)}.")
        if flagged:
            table.notes.append("(!): a run of the cell kept a checkpoint far below what the task reaches on English "
                               "dev; its scores do not measure the method (see Warnings).")
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
            table = Table(f"Table 2 ({task}): {self.metric[task]} (scorer {self.scorer[task]}) averaged over language groups, mean ± std over "
                          "seeds", headers, [], label_columns=2, key=f"table2-{task}",
                          caption=f"{task}: {self.metric[task]} (scorer {self.scorer[task]}) averaged over language groups, mean ± std over seeds")
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
            table = Table(f"Table 4 ({task}): {self.metric[task]} (scorer {self.scorer[task]}) per language, mean ± std over seeds",
                          ["model", "row", "n seeds"] + langs, [], label_columns=2, key=f"table4-{task}",
                          caption=f"{task}: {self.metric[task]} (scorer {self.scorer[task]}) per language, mean ± std over seeds")
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
            table = Table(f"Table 4 ({task}) by language: {self.metric[task]} (scorer {self.scorer[task]}), mean ± std over seeds",
                          ["language"] + names, [], label_columns=1, key=f"table4-by-language-{task}",
                          caption=f"{task}: {self.metric[task]} (scorer {self.scorer[task]}) by language, mean ± std over seeds")
            label = self.average_label(task)
            means: list[list[float | None]] = []
            for lang in self.task_languages(task) + [None]:
                cells, line = [label if lang is None else lang], [None]
                for m, row in keys:
                    stat = self.cell(task, m, row) if lang is None else self.language_cell(task, m, row, lang)
                    cells.append("–" if stat is None else stat.text(show_n=False))
                    line.append(None if stat is None else stat.mean)
                table.rows.append(cells)
                means.append(line)
            for r, line in enumerate(means):  # best of each language (line), not of each column
                values = [v for v in line if v is not None]
                if len(values) > 1:
                    table.best.update((r, c) for c, v in enumerate(line)
                                      if v is not None and math.isclose(v, max(values), abs_tol=1e-9))
            table.notes.append(f"Bold: best mean of the line. {label}: metrics.json `average` of each run (the "
                               "languages it scored), as in Table 1.")
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

    def variant_table(self) -> tuple[Table, list[dict[str, Any]]]:
        """Each DLFA variant row (``gate-baseline+D_x``, ``mscam+D_x``, ...) against the paper's row of its method at
        the same layer (``D_x``), seed by seed: the comparison that isolates the variant."""
        from dlfa.training.config import VARIANT_NAMES

        table = Table("DLFA variants against the paper's D_x at the same layer: paired differences over the same "
                      "seeds (variant minus paper), English dev and average (Table 1)",
                      ["task", "model", "row", "compared with", "seeds", "Δ en dev (paired)", "Δ average (paired)",
                       "targets better"], [], label_columns=4, key="variants")
        records = []
        for task in self.tasks:
            for model, row in self.row_keys:
                parts = [p for p in row.family.split("+") if p]
                if row.fuse_layer is None or not any(p in VARIANT_NAMES for p in parts):
                    continue
                paper = Row("+".join(p for p in parts if p not in VARIANT_NAMES), row.fuse_layer)
                mine = {r.seed: r for r in self.groups.get((task, model, row), []) if r.seed is not None}
                theirs = {r.seed: r for r in self.groups.get((task, model, paper), []) if r.seed is not None}
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    continue
                average = _stat([mine[s].score - theirs[s].score for s in seeds], seeds)
                dev_pairs = [s for s in seeds if mine[s].dev_score is not None and theirs[s].dev_score is not None]
                dev = _stat([mine[s].dev_score - theirs[s].dev_score for s in dev_pairs], dev_pairs) \
                    if dev_pairs else None
                targets = sorted(set.intersection(*(set(mine[s].languages) & set(theirs[s].languages) for s in seeds))
                                 - {SELECTION_LANGUAGE})
                better = sum(statistics.fmean(mine[s].languages[lang] - theirs[s].languages[lang] for s in seeds) > 0
                             for lang in targets)
                table.rows.append([task, model_label(model), row.label, paper.label, ",".join(map(str, seeds)),
                                   "–" if dev is None else dev.text(), average.text(), f"{better} of {len(targets)}"])
                records.append({"task": task, "model": model, "row": row.label, "compared_with": paper.label,
                                "seeds": seeds, "delta_dev_mean": None if dev is None else dev.mean,
                                "delta_dev_std": None if dev is None else dev.std, "delta_mean": average.mean,
                                "delta_std": average.std, "targets_better": better, "targets": len(targets)})
        table.notes.append("targets better: target languages (English left out) where the variant's mean over the "
                           "paired seeds is higher. Both rows are compared with the same baseline in the selection "
                           "table.")
        return table, records

    def selection_table(self) -> tuple[Table, list[dict[str, Any]]]:
        table = Table("Layer selection on English dev (the only selection signal): dev score of each row, its "
                      "average (Table 1), and the paired difference to its base row over the same seeds",
                      ["task", "model", "row", "en dev", "average (Table 1)", "Δ vs base (paired)", "selected"], [],
                      label_columns=3, key="selection")
        selected = self.selected_rows()
        records = []
        flagged = False
        for task in self.tasks:
            floor = selection_floor(task, self.metric[task])
            for model, row in self.row_keys:
                dev, score = self.dev_cell(task, model, row), self.cell(task, model, row)
                if dev is None or score is None:
                    continue
                delta = self.paired_delta(task, model, row) if row.fuse_layer is not None else None
                is_selected = selected.get((task, model, row.family)) == row
                low = self.cell_warnings(task, model, row)
                status = "yes (best en dev)" if is_selected else ""
                if low:  # never a plain "selected": the checkpoint did not learn the task
                    flagged = True
                    below = f"{len(low)} of {dev.n} runs below the en-dev floor {floor.floor:.0f} (!)" if floor else "(!)"
                    status = f"best en dev, but SUSPECT: {below}" if is_selected else below
                table.rows.append([task, model_label(model), row.label, dev.text(), score.text(),
                                   "–" if delta is None else delta.text(), status])
                records.append({"task": task, "model": model, "row": row.label, "dev_mean": dev.mean,
                                "dev_std": dev.std, "mean": score.mean, "std": score.std, "n": score.n,
                                "delta_mean": None if delta is None else delta.mean,
                                "delta_std": None if delta is None else delta.std, "selected": is_selected,
                                "runs_below_floor": len(low), "floor": floor.floor if floor else None})
        table.notes.append("en dev: metrics.json `selection.best_score`, the English-dev score of the checkpoint "
                           "each run kept. The selected row of each method is the fused layer with the best mean "
                           "English-dev score; target-language scores play no part in the choice.")
        if flagged:
            table.notes.append("(!): runs whose kept checkpoint is far below what the task reaches on English dev "
                               "(floors and their sources: dlfa.reporting.references); see Warnings.")
        return table, records

    # Seeds and spread --------------------------------------------------------------------------------------------

    def seeds_table(self) -> tuple[Table, list[dict[str, Any]]]:
        table = Table("Seeds and spread of every cell (score = each run's average over the languages it scored, as "
                      "in Table 1)", ["task", "model", "row", "n", "seeds", "mean", "std", "min", "max", "max-min"],
                      [], label_columns=3, key="seeds")
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
        table = Table(f"Published: {SOURCES[source]}", ["row"] + tasks, [], label_columns=1, key="published")
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

    def plot_layers(self, task: str, model: str, path: Path) -> list[Path]:
        """Score vs fused layer: mean with seed std as error bars, each seed as a dot, the base rows as bands.

        Returns the files written (the PNG and the PDF beside it), none when the task has no fused row."""
        from dlfa.reporting.plots import _pyplot, save_figure

        rows = sorted({row for (t, m, row) in self.groups if t == task and m == model}, key=Row.sort_key)
        fused = [row for row in rows if row.fuse_layer is not None]
        if not fused:
            return []
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
        ax.set_ylabel(f"{self.measure(task)} ({self.average_label(task)})")
        ax.set_title(f"{task} · {model_label(model)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        written = save_figure(fig, path)
        plt.close(fig)
        return written

    def plot_delta_heatmap(self, task: str, model: str, path: Path) -> list[Path]:
        """Per-language (D_x − its base row), mean over seeds; diverging colours centred at zero, each value
        written on its cell in white or black, whichever reads better on the cell's colour.

        Returns the files written (the PNG and the PDF beside it), none when no fused row has its base row."""
        from dlfa.reporting.plots import _pyplot, annotate_cells, save_figure

        rows = sorted({row for (t, m, row) in self.groups if t == task and m == model and row.fuse_layer is not None
                       and (t, m, row.base) in self.groups}, key=Row.sort_key)
        if not rows:
            return []
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
            annotate_cells(ax, image, matrix, "{:+.1f}", fontsize=6)
        fig.colorbar(image, ax=ax, label=f"Δ {self.metric[task]} vs baseline")
        ax.set_title(f"{task} · {model_label(model)}: D_x − baseline per language (mean over seeds)")
        written = save_figure(fig, path)
        plt.close(fig)
        return written


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


# -- where the report goes -----------------------------------------------------------------------------------

REPORT_MARKER = "dlfa-report.json"
REPORT_FORMAT = "dlfa-report"
_SEED_DIR = re.compile(r"seed-\d+")


def _as_folder(root: str | Path) -> Path:
    root = Path(root)
    return root.parent if root.name == METRICS_FILE and root.is_file() else root


def _is_run_folder(folder: Path) -> bool:
    if (folder / METRICS_FILE).is_file():
        return True
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return _is_unfinished_run(folder, names)


def _is_cell_path(parts: Sequence[str]) -> bool:
    """``parts`` is (a prefix of) a sweep cell path ``<task>/<model>/<row>/seed-<s>``."""
    if not 1 <= len(parts) <= 4 or parts[0] not in TASK_ORDER:
        return False
    return len(parts) < 4 or bool(_SEED_DIR.fullmatch(parts[3]))


def _sweep_of(folder: Path) -> Path | None:
    """The sweep folder ``folder`` lies in (the nearest ancestor of which it is a cell path), else itself when it
    is not a run (a folder given as a whole), else None."""
    for ancestor in folder.parents:
        if _is_cell_path(folder.relative_to(ancestor).parts) and not _is_run_folder(ancestor):
            return ancestor
    return None if _is_run_folder(folder) else folder


def resolve_output(roots: Sequence[str | Path], output: str | Path | None = None) -> tuple[Path, str]:
    """Where ``dlfa report`` writes, and why there: ``(folder, reason)``.

    * ``output`` when given;
    * one folder that is not itself a run (a sweep, or a folder of runs): ``<folder>/report``;
    * several folders that all lie in one sweep folder (``<sweep>/<task>/<model>/<row>/seed-<s>`` or a prefix of
      it, or the sweep folder itself): ``<sweep>/report``;
    * anything else (a single run, runs from different places): ``report-<hash>`` in the current folder, the
      hash (8 hex digits of sha256) naming the set of run folders, so that the same command updates the same
      folder and another set of runs never overwrites it. Never inside a run folder that was not asked for.
    """
    if not roots:
        raise DlfaInputError("give at least one run folder")
    if output is not None:
        if not str(output).strip():
            raise DlfaInputError("the output folder is an empty name", option="--output")
        return Path(output), "given with --output"
    folders = [_as_folder(r) for r in roots]
    for folder in folders:
        if not folder.is_dir():
            raise DlfaInputError("run folder not found", path=folder)
    resolved = sorted({f.resolve() for f in folders})
    if len(resolved) == 1 and not _is_run_folder(resolved[0]):
        return folders[0] / "report", "the report folder of the one folder given"
    sweeps = {_sweep_of(f) for f in resolved}
    if len(sweeps) == 1 and None not in sweeps:
        sweep = sweeps.pop()
        assert sweep is not None
        return sweep / "report", "the report folder of the sweep that holds every folder given"
    digest = hashlib.sha256("\n".join(map(str, resolved)).encode("utf-8")).hexdigest()[:8]
    return Path(f"report-{digest}"), "named after the set of run folders (they share no sweep folder)"


def _report_marker(output: Path) -> dict[str, Any] | None:
    """The marker of a folder ``dlfa report`` made, or None. An older report (before markers) counts as made by
    dlfa report when its report.md starts with the title this module writes."""
    marker = output / REPORT_MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == REPORT_FORMAT else None
    report_md = output / "report.md"
    try:
        with open(report_md, encoding="utf-8") as handle:
            legacy = handle.readline().rstrip("\n") == "# DLFA report"
    except (OSError, UnicodeDecodeError):
        return None
    return {"format": REPORT_FORMAT, "files": [], "legacy": True} if legacy else None


def check_output(output: str | Path) -> dict[str, Any] | None:
    """Refuse an output that is an existing file, or an existing folder that ``dlfa report`` did not make (and
    is not empty): dlfa never replaces what it did not create. Returns the earlier report's marker, if any."""
    output = Path(output)
    if output.is_symlink() and not output.is_dir():
        raise DlfaInputError("the output is a symbolic link to no folder", path=output, option="--output")
    if output.exists() and not output.is_dir():
        raise DlfaInputError("the output exists and is a file, not a report folder", path=output, option="--output")
    if not output.exists() or not any(output.iterdir()):
        return None
    marker = _report_marker(output)
    if marker is None:
        raise DlfaInputError(f"the output folder exists and was not made by dlfa report (no {REPORT_MARKER}); "
                             "give a new or empty folder", path=output, option="--output")
    return marker


# -- writing it ----------------------------------------------------------------------------------------------


def write_report(
    roots: Sequence[str | Path],
    output: str | Path | None = None,
    options: ReportOptions | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Collect, aggregate and write every table and figure; returns what was written.

    ``output``: see :func:`resolve_output` (None derives it) and :func:`check_output` (what is refused).
    """
    output, reason = resolve_output(roots, output)
    previous = check_output(output)
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
    variants, rv = report.variant_table()
    if variants.rows:
        outputs.append(("variants", [variants], rv))
    for name, tables, records in outputs:
        put(f"{name}.md", "\n".join(table_markdown(t) for t in tables))
        put(f"{name}.csv", records_csv(records))
        put(f"{name}.tex", "\n".join(table_latex(t) for t in tables))
    from dlfa.analysis.rank_compare import rankings_markdown

    proxy = rankings_markdown(roots, rsel)  # `dlfa rank-layers` rankings under the run folders, beside the sweep's
    if proxy:
        put("rank_layers.md", proxy)
    by_language = report.table4_by_language()  # the same records as table4.csv, a language per line
    put("table4_by_language.md", "\n".join(table_markdown(t) for t in by_language))
    put("table4_by_language.tex", "\n".join(table_latex(t) for t in by_language))

    figures: list[Path] = []  # the PNGs; each has a PDF beside it
    for task in report.tasks:
        for model in sorted({m for (t, m, _) in report.groups if t == task}):
            for kind, plot in (("layers", report.plot_layers), ("delta", report.plot_delta_heatmap)):
                files = plot(task, model, output / f"{kind}_{task}_{_slug(model)}.png")
                figures += files[:1]
                written += files

    warnings = report.warnings()
    published = report.published_table()
    n_values = sorted({s.n for (t, m, row) in report.groups if (s := report.cell(t, m, row))})
    all_seeds = sorted({r.seed for r in report.runs if r.seed is not None})
    stds = [s.std for (t, m, row) in report.groups if (s := report.cell(t, m, row)) and s.std is not None]
    pruned = sum(r.pruned for r in report.runs)
    lines = [
        "# DLFA report",
        "",
        f"Command: `{command}`  ",
        f"Run folders: {', '.join(f'`{r}`' for r in roots)}  ",
        f"Output: `{output}` ({reason}).  ",
        f"Finished runs: {len(report.runs)} in {len(report.groups)} cells; skipped: {len(collected.skipped)}"
        + (f"; model weights pruned in {pruned} (scores unaffected)" if pruned else "") + ".  ",
        f"Seeds: {', '.join(map(str, all_seeds)) or 'not recorded'}; runs per cell (n): "
        f"{', '.join(map(str, n_values))} (per cell: see the seeds table).  ",
        "Spread: cells are mean ± sample standard deviation over seeds (n − 1 in the denominator; '–' when "
        "n = 1). " + (f"Std over cells: median {statistics.median(stds):.2f}, largest {max(stds):.2f}."
                      if stds else "No cell has more than one seed, so no spread can be given."),
        "",
    ]
    if warnings:
        lines += ["## Warnings", "",
                  f"{len(warnings)} of {len(report.runs)} runs kept a checkpoint far below what the task reaches on "
                  "English dev; their cells are marked (!) and their scores do not measure the method:", ""]
        lines += [f"* {w}" for w in warnings] + [""]
    lines += [
        "Score of a run: metrics.json `average`, its primary metric averaged over the languages it scored: "
        + "; ".join(f"{t} ({report.metric[t]} by scorer `{report.scorer[t]}`): {report.average_label(t)}"
                    for t in report.tasks)
        + f". Language groups (Table 2): {report.options.groups_source}.",
        "",
        table_markdown(t1),
    ]
    if selection.rows:
        lines.append(table_markdown(selection))
    if variants.rows:
        lines.append(table_markdown(variants))
    if proxy:
        lines.append(proxy)
    lines += [table_markdown(t) for t in t2] + [table_markdown(t) for t in t4] + [table_markdown(seeds)]
    if published is not None:
        lines.append(table_markdown(published))
    if figures:
        lines += ["### Figures", "", "Each figure is also saved as PDF beside the PNG (same name, `.pdf`).", ""]
        lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    notes = report.notes()
    if notes:
        lines += ["### Notes", ""] + [f"* {note}" for note in notes] + [""]
    if collected.skipped:
        lines += ["### Skipped run folders", ""] + [f"* `{p}`: {why}" for p, why in collected.skipped] + [""]
    lines += ["Files: " + ", ".join(f"`{p.name}`" for p in written + [output / 'report.md']), ""]
    put("report.md", "\n".join(lines))

    names = {p.name for p in written}
    if previous:  # files an earlier report wrote and this one did not: stale, and dlfa's own
        for name in previous.get("files") or []:
            stale = output / name if isinstance(name, str) and name and Path(name).name == name else None
            if stale is not None and name not in names and name != REPORT_MARKER and stale.is_file() \
                    and not stale.is_symlink():
                stale.unlink()
    write_json_atomic(output / REPORT_MARKER, {
        "format": REPORT_FORMAT, "dlfa_version": __version__, "command": command,
        "runs": [str(r) for r in roots], "files": sorted(names),
    })
    return {"output": str(output), "output_reason": reason, "runs": len(report.runs),
            "skipped": [str(p) for p, _ in collected.skipped], "files": [str(p) for p in written],
            "table1": table_markdown(t1), "warnings": warnings}


def run_report(config: ReportConfig, command: str | None = None) -> dict[str, Any]:
    """Build the options from ``config`` and write the report (see :func:`write_report`)."""
    options = ReportOptions(published=config.published)
    if config.groups:
        options.groups = load_groups(config.groups)
        options.groups_source = f"from {config.groups}"
    return write_report(config.runs, config.output, options, command)
