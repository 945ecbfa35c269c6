"""`dlfa report`: collecting runs, aggregation over seeds, the tables in three formats, figures, published values."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from dlfa.cli.main import main
from dlfa.configs import PruneConfig
from dlfa.errors import DlfaInputError
from dlfa.io import write_checksums
from dlfa.reporting.plots import language_bars, relative_luminance, save_figure, text_color_for
from dlfa.reporting.prune import disk_usage, prune_run, run_prune
from dlfa.reporting.published import PUBLISHED, is_mbert, published_value
from dlfa.reporting.references import SELECTION_FLOORS, check_selected_score
from dlfa.reporting.report import (
    DEFAULT_GROUPS,
    Report,
    ReportOptions,
    Row,
    Table,
    collect_runs,
    load_run,
    resolve_output,
    row_for,
    table_latex,
    tex_escape,
    write_report,
)
from dlfa.reporting.tables import average_label, comparison_table

METRIC = {"xnli": "accuracy", "udpos": "f1"}


def make_run(folder: Path, task: str, scores: dict[str, float], *, method: str | None = None,
             fuse_layer: int | None = None, seed: int = 1, model: str = "tiny", num_layers: int = 4,
             dev: float | None = None) -> Path:
    """A finished run folder as the recipe writes it (only the fields the report reads)."""
    metric = METRIC[task]
    folder.mkdir(parents=True, exist_ok=True)
    languages = {lang: {metric: value, "accuracy": value} for lang, value in scores.items()}
    avg = statistics.fmean(scores.values())
    metrics = {
        "task": task, "model": model, "method": method or ("dlfa" if fuse_layer is not None else "baseline"),
        "fuse_layer": fuse_layer, "seed": seed, "primary_metric": metric, "eval_split": "test",
        "selection": {} if dev is None else {"language": "en", "split": "dev", "best_score": dev},
        "languages": languages, "leaky_languages": [],
        "average": {metric: avg, "accuracy": avg}, "average_zero_shot": {}, "train_seconds": 1.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"config": {"seed": seed}, "resolved": {"num_layers": num_layers}}),
                                        encoding="utf-8")
    (folder / "best").mkdir(exist_ok=True)
    (folder / "best" / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """xnli: baseline and D_2 (3 seeds each), D_1 (2 seeds); udpos: baseline and D_1 (1 seed)."""
    root = tmp_path / "sweep"
    base = {1: {"en": 80.0, "de": 70.0, "zh": 60.0}, 2: {"en": 82.0, "de": 72.0, "zh": 62.0},
            3: {"en": 84.0, "de": 74.0, "zh": 64.0}}
    for seed, scores in base.items():
        make_run(root / "xnli/tiny/baseline" / f"seed-{seed}", "xnli", scores, seed=seed)
        make_run(root / "xnli/tiny/D_2" / f"seed-{seed}", "xnli", {k: v + 3 for k, v in scores.items()},
                 fuse_layer=2, seed=seed)
    for seed in (1, 2):
        make_run(root / "xnli/tiny/D_1" / f"seed-{seed}", "xnli", {k: v - 1 for k, v in base[seed].items()},
                 fuse_layer=1, seed=seed)
    make_run(root / "udpos/tiny/baseline/seed-1", "udpos", {"en": 90.0, "de": 80.0, "ja": 40.0})
    make_run(root / "udpos/tiny/D_1/seed-1", "udpos", {"en": 91.0, "de": 82.0, "ja": 45.0}, fuse_layer=1)
    return root


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def test_row_labels():
    assert row_for("baseline", None).label == "baseline"
    assert row_for("dlfa", 8).label == "D_8"
    assert row_for("xmixup", None).label == "xmixup"
    assert row_for("xmixup", 8).label == "xmixup+D_8"
    ordered = sorted([row_for("xmixup", 2), row_for("dlfa", 10), row_for("baseline", None), row_for("dlfa", 2),
                      row_for("xmixup", None)], key=Row.sort_key)
    assert [r.label for r in ordered] == ["baseline", "D_2", "D_10", "xmixup", "xmixup+D_2"]


def test_aggregation_is_mean_and_sample_std_over_seeds(sweep):
    collected = collect_runs([sweep])
    assert len(collected.runs) == 10 and not collected.skipped
    report = Report(collected.runs)
    cell = report.cell("xnli", "tiny", Row("", None))
    # per-seed averages over en, de, zh (incl. en): 70, 72, 74
    assert cell.values == (70.0, 72.0, 74.0) and cell.seeds == (1, 2, 3)
    assert cell.mean == pytest.approx(72.0) and cell.std == pytest.approx(2.0)  # sample std (n - 1)
    assert cell.text() == "72.00 ± 2.00 (n=3)"
    single = report.cell("udpos", "tiny", Row("", 1))
    assert single.std is None and single.text() == "72.67 (n=1)"


def test_write_report_files_and_contents(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 0
    for name in ("table1", "table2", "table4", "seeds"):
        for ext in ("md", "csv", "tex"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    for png in ("layers_xnli_tiny.png", "delta_xnli_tiny.png", "layers_udpos_tiny.png", "delta_udpos_tiny.png"):
        assert (out / png).stat().st_size > 1000, png
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind

    rows = {(r["task"], r["row"]): r for r in _csv(out / "table1.csv")}
    assert float(rows[("xnli", "baseline")]["mean"]) == pytest.approx(72.0)
    assert float(rows[("xnli", "baseline")]["std"]) == pytest.approx(2.0)
    assert rows[("xnli", "baseline")]["n"] == "3" and rows[("xnli", "baseline")]["seeds"] == "1 2 3"
    assert rows[("xnli", "D_2")]["best"] == "*" and rows[("xnli", "baseline")]["best"] == ""
    assert rows[("udpos", "D_1")]["best"] == "*" and rows[("udpos", "D_1")]["std"] == ""

    md = (out / "table1.md").read_text()
    assert "**75.00 ± 2.00 (n=3)**" in md and " 72.00 ± 2.00 (n=3) |" in md
    tex = (out / "table1.tex").read_text()
    assert r"\textbf{75.00 $\pm$ 2.00 (n=3)}" in tex and r"D\_2" in tex and r"\begin{tabular}{llrr}" in tex
    assert "xnli (accuracy, accuracy, avg of 3 incl. en)" in md

    report = (out / "report.md").read_text()
    assert "Command: `" in report  # sys.argv: here pytest's, from a shell `dlfa report ...`
    assert "Seeds: 1, 2, 3" in report and "runs per cell (n): 1, 2, 3" in report
    assert "avg of 3 incl. en" in report and "sample standard deviation" in report
    assert "different numbers of seeds" in report  # D_1 has 2 seeds, the others 3
    assert "![layers_xnli_tiny](layers_xnli_tiny.png)" in report
    for section in ("Table 1", "Table 2 (xnli)", "Table 4 (udpos)", "Seeds and spread"):
        assert section in report


def test_table2_language_groups(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 0
    records = _csv(out / "table2.csv")
    enf = {(r["task"], r["row"]): r for r in records if r["group"] == "enf"}
    assert float(enf[("xnli", "baseline")]["mean"]) == pytest.approx(statistics.fmean([75, 77, 79]))
    assert enf[("xnli", "baseline")]["languages"] == "en de"
    md = (out / "table2.md").read_text()
    assert "enf (2/2)" in md and "non-latin (1/" in md and "east-asian (1/3)" in md
    assert "Groups with no evaluated language" in md

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"asian": ["zh", "ja", "ko"], "ende": ["en", "de"]}))
    assert main(["report", str(sweep), "--output", str(out), "--groups", str(groups)]) == 0
    records = _csv(out / "table2.csv")
    assert {r["group"] for r in records} == {"asian", "ende"}
    asian = next(r for r in records if r["task"] == "udpos" and r["row"] == "D_1" and r["group"] == "asian")
    assert float(asian["mean"]) == pytest.approx(45.0) and asian["languages"] == "ja"
    assert "from " + str(groups) in (out / "report.md").read_text()


def test_table4_per_language(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 0
    records = {(r["task"], r["row"], r["language"]): r for r in _csv(out / "table4.csv")}
    de = records[("xnli", "D_2", "de")]
    assert float(de["mean"]) == pytest.approx(75.0) and float(de["std"]) == pytest.approx(2.0) and de["n"] == "3"
    md = (out / "table4.md").read_text()
    assert md.splitlines()[2].replace(" ", "").startswith("|model|row|nseeds|en|de|zh|")
    assert "75.00 ± 2.00" in md


def test_table4_by_language_has_a_line_per_language(sweep):
    report = Report(collect_runs([sweep]).runs)
    xnli = report.table4_by_language()[0]
    assert xnli.headers == ["language", "baseline", "D_1", "D_2"]
    lines = {row[0]: row for row in xnli.rows}
    assert list(lines) == ["en", "de", "zh", "avg of 3 incl. en"]  # the average row says what it holds
    assert lines["de"][3] == "75.00 ± 2.00"  # D_2 de: 73, 75, 77
    assert lines["avg of 3 incl. en"][1] == "72.00 ± 2.00"  # the baseline's Table 1 cell
    de = xnli.rows.index(lines["de"])
    assert (de, 3) in xnli.best and (de, 1) not in xnli.best


def test_other_methods_get_their_own_rows(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "a", "xnli", {"en": 80.0, "de": 70.0})
    make_run(root / "b", "xnli", {"en": 81.0, "de": 71.0}, method="xmixup")
    make_run(root / "c", "xnli", {"en": 82.0, "de": 74.0}, method="xmixup", fuse_layer=3)
    make_run(root / "d", "xnli", {"en": 83.0, "de": 73.0}, fuse_layer=3)
    report = Report(collect_runs([root]).runs)
    assert [row.label for _, row in report.row_keys] == ["baseline", "D_3", "xmixup", "xmixup+D_3"]
    assert report.cell("xnli", "tiny", Row("xmixup", 3)).mean == pytest.approx(78.0)
    assert report.plot_delta_heatmap("xnli", "tiny", tmp_path / "h.png")  # xmixup+D_3 vs xmixup, D_3 vs baseline


def test_unfinished_runs_are_skipped_and_listed(sweep, tmp_path):
    unfinished = sweep / "xnli/tiny/D_3/seed-1"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps({"config": {}}))
    (unfinished / "train.log").write_text("")
    (sweep / "xnli/tiny/D_3/seed-1.lock").write_text("")
    collected = collect_runs([sweep])
    assert len(collected.runs) == 10
    assert [p for p, _ in collected.skipped] == [unfinished]
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Skipped run folders" in report and str(unfinished) in report


def test_default_output_is_inside_the_first_folder_and_not_rescanned(sweep):
    assert main(["report", str(sweep)]) == 0
    assert (sweep / "report" / "report.md").is_file()
    assert main(["report", str(sweep)]) == 0  # a second time: the report folder is not a run


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "metrics.json:1: malformed metrics file"),
        (json.dumps({"task": "xnli"}), "metrics.json: malformed metrics file: 'model' missing"),
        (json.dumps({"task": "xnli", "model": "m", "primary_metric": "accuracy", "average": {"accuracy": "x"},
                     "languages": {}}), "'average' has no number for the primary metric 'accuracy'"),
        (json.dumps({"task": "xnli", "model": "m", "primary_metric": "accuracy", "average": {"accuracy": 1.0},
                     "languages": {"de": {}}}), "language 'de' has no number"),
    ],
)
def test_malformed_metrics_is_one_line_naming_the_file(sweep, tmp_path, capsys, content, expected):
    bad = sweep / "xnli/tiny/baseline/seed-2/metrics.json"
    bad.write_text(content)
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert str(bad.parent) in err[0] and expected in err[0]
    assert not out.exists()


def test_no_runs_and_missing_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: run folder not found" in capsys.readouterr().err
    bad_groups = tmp_path / "g.json"
    bad_groups.write_text('{"x": "en"}')
    make_run(tmp_path / "r", "xnli", {"en": 1.0})
    assert main(["report", str(tmp_path), "--groups", str(bad_groups)]) == 2
    assert "group 'x' must be a non-empty list" in capsys.readouterr().err


def test_published_table_values():
    table = PUBLISHED["mbert"]
    assert list(table) == ["baseline"] + [f"D_{i}" for i in range(1, 12)]
    assert table["baseline"] == {"xnli": 65.40, "pawsx": 81.94, "panx": 62.17, "udpos": 70.28}
    assert published_value("mbert", "D_8", "xnli") == 66.90
    assert published_value("mbert", "D_6", "pawsx") == 84.37
    assert published_value("mbert", "D_8", "panx") == 63.34
    assert published_value("mbert", "D_10", "udpos") == 71.81
    assert published_value("mbert", "D_11", "pawsx") == 83.04
    assert published_value("mbert", "D_12", "xnli") is None and published_value("xlmr", "D_1", "xnli") is None
    assert is_mbert("bert-base-multilingual-cased") and is_mbert("/models/bert-base-multilingual-cased/")
    assert not is_mbert("embedded:multilingual-e5-small")


def test_published_columns_beside_mbert(tmp_path):
    root = tmp_path / "runs"
    mbert = "bert-base-multilingual-cased"
    make_run(root / "a", "xnli", {"en": 80.0, "de": 60.0}, model=mbert, num_layers=12)
    make_run(root / "b", "xnli", {"en": 81.0, "de": 62.0}, model=mbert, fuse_layer=8, num_layers=12)
    make_run(root / "c", "xnli", {"en": 70.0, "de": 50.0}, model="other")
    out = tmp_path / "report"
    assert main(["report", str(root), "--output", str(out)]) == 0
    md = (out / "table1.md").read_text()
    assert "xnli paper" in md and "65.40" in md and "66.90" in md
    rows = {(r["model"], r["row"]): r for r in _csv(out / "table1.csv")}
    assert rows[(mbert, "D_8")]["published"] == "66.9000" and rows[("other", "baseline")]["published"] == ""
    assert "Published: Chen et al. (2022)" in (out / "report.md").read_text()

    assert main(["report", str(root), "--output", str(out), "--published", "none"]) == 0
    assert "paper" not in (out / "table1.md").read_text()
    assert main(["report", str(root), "--output", str(out), "--published", "mbert"]) == 0
    assert {r["published"] for r in _csv(out / "table1.csv") if r["model"] == "other"} == {"65.4000"}


def test_default_groups_have_the_papers_enf():
    assert DEFAULT_GROUPS["enf"] == ("en", "de")
    assert not set(DEFAULT_GROUPS["latin"]) & set(DEFAULT_GROUPS["non-latin"])


def test_tex_escape():
    assert tex_escape("D_1 & 50% ± 1") == r"D\_1 \& 50\% $\pm$ 1"


def test_load_run_reads_num_layers_and_rejects_bad_fuse_layer(tmp_path):
    run = make_run(tmp_path / "r", "xnli", {"en": 1.0}, fuse_layer=2, num_layers=6)
    assert load_run(run).num_layers == 6 and load_run(run).row == Row("", 2)
    data = json.loads((run / "metrics.json").read_text())
    data["fuse_layer"] = "two"
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(DlfaInputError, match="fuse_layer"):
        load_run(run)


def test_options_published_auto_only_for_mbert(sweep):
    report = Report(collect_runs([sweep]).runs, ReportOptions(published="auto"))
    table, _ = report.table1()
    assert not any("paper" in h for h in table.headers)
    assert math.isclose(report.cell("xnli", "tiny", Row("", 2)).mean, 75.0)


def test_layer_is_selected_on_english_dev_only(tmp_path):
    """D_1 has the better English dev score but the worse target scores: the report must still pick D_1."""
    root = tmp_path / "sweep"
    for seed in (1, 2):
        make_run(root / f"base/{seed}", "xnli", {"en": 70.0 + seed, "de": 60.0}, seed=seed, dev=70.0)
        make_run(root / f"d1/{seed}", "xnli", {"en": 71.0 + seed, "de": 60.0}, fuse_layer=1, seed=seed, dev=75.0)
        make_run(root / f"d2/{seed}", "xnli", {"en": 70.0 + seed, "de": 70.0 + 2 * seed}, fuse_layer=2, seed=seed,
                 dev=74.0)
    report = Report(collect_runs([root]).runs)
    assert report.selected_rows() == {("xnli", "tiny", ""): Row("", 1)}
    delta = report.paired_delta("xnli", "tiny", Row("", 2))
    # per seed: D_2 average (70+s + 70+2s)/2 minus baseline (70+s + 60)/2 = 5 + s
    assert delta.values == (6.0, 7.0) and delta.seeds == (1, 2)
    table, records = report.selection_table()
    selected = [r for r in records if r["selected"]]
    assert [r["row"] for r in selected] == ["D_1"] and selected[0]["dev_mean"] == pytest.approx(75.0)
    out = tmp_path / "report"
    assert main(["report", str(root), "--output", str(out)]) == 0
    assert (out / "selection.csv").exists() and "best en dev" in (out / "report.md").read_text(encoding="utf-8")


def test_no_selection_table_without_dev_scores(sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--output", str(out)]) == 0
    assert not (out / "selection.md").exists()


# -- the selected checkpoint far below what the task reaches ---------------------------------------------------


def test_check_selected_score_messages():
    message = check_selected_score("udpos", "f1", 3.6)
    assert message is not None and "3.60 en-dev f1" in message and "far below the 80" in message
    assert "under-trained or diverged" in message and "docs/results.md" in message
    assert check_selected_score("udpos", "f1", 91.42) is None  # the demo's baseline (measured, references.py)
    assert check_selected_score("udpos", "f1", 80.0) is None  # the floor itself passes
    assert "chance is 33.3" in check_selected_score("xnli", "accuracy", 34.0)
    assert "majority class" in check_selected_score("pawsx", "accuracy", 56.85)
    assert check_selected_score("panx", "f1", 59.03) is None  # the weakest row of the CPU reproduction
    assert check_selected_score("panx", "f1", 12.0) is not None
    assert "not a number" in check_selected_score("panx", "f1", float("nan"))
    # No reference, no verdict: other metrics, unknown tasks, selection on another language, no score.
    assert check_selected_score("udpos", "accuracy", 3.6) is None
    assert check_selected_score("mytask", "f1", 3.6) is None
    assert check_selected_score("udpos", "f1", 3.6, language="de") is None
    assert check_selected_score("udpos", "f1", None) is None
    assert {task for task, _ in SELECTION_FLOORS} == {"udpos", "panx", "xnli", "pawsx"}
    assert all(f.reference and 0 < f.floor < 100 for f in SELECTION_FLOORS.values())


def test_low_dev_score_is_never_a_plain_selected(tmp_path):
    """The case of the issue: a short run at the default learning rate (en dev F1 3.6) was marked "selected"."""
    root = tmp_path / "sweep"
    for seed in (1, 2):
        make_run(root / f"udpos/tiny/baseline/seed-{seed}", "udpos", {"en": 90.0, "de": 80.0}, seed=seed, dev=93.0)
        make_run(root / f"udpos/tiny/D_1/seed-{seed}", "udpos", {"en": 5.0, "de": 3.0}, fuse_layer=1, seed=seed,
                 dev=3.6)
    report = Report(collect_runs([root]).runs)
    assert report.selected_rows() == {("udpos", "tiny", ""): Row("", 1)}  # the only fused row
    table, records = report.selection_table()
    status = {row[2]: row[-1] for row in table.rows}
    assert status["D_1"].startswith("best en dev, but SUSPECT: 2 of 2 runs below the en-dev floor 80")
    assert status["baseline"] == ""
    d1 = next(r for r in records if r["row"] == "D_1")
    assert d1["selected"] and d1["runs_below_floor"] == 2 and d1["floor"] == 80.0
    assert any("(!)" in note for note in table.notes)

    out = tmp_path / "report"
    result = write_report([root], out)
    assert len(result["warnings"]) == 2 and all("3.60 en-dev f1" in w for w in result["warnings"])
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Warnings" in text and str(root / "udpos/tiny/D_1/seed-1") in text
    assert text.index("## Warnings") < text.index("### Table 1")
    assert "4.00 ± 0.00 (n=2) (!)" in (out / "table1.md").read_text(encoding="utf-8")
    assert {r["row"]: r["warning"] for r in _csv(out / "table1.csv")} == {"baseline": "0", "D_1": "2"}

    healthy = tmp_path / "healthy"
    make_run(healthy / "a", "udpos", {"en": 90.0, "de": 80.0}, fuse_layer=1, dev=93.0)
    table, _ = Report(collect_runs([healthy]).runs).selection_table()
    assert table.rows[0][-1] == "yes (best en dev)"
    assert write_report([healthy], tmp_path / "r2")["warnings"] == []
    assert "Warnings" not in (tmp_path / "r2" / "report.md").read_text(encoding="utf-8")


# -- averages labelled by what they hold ----------------------------------------------------------------------


def test_average_labels_follow_the_scored_languages(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "a", "xnli", {"de": 70.0, "zh": 60.0})  # English not scored
    make_run(root / "b", "xnli", {"de": 72.0, "zh": 62.0}, fuse_layer=1)
    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "table1.md").read_text(encoding="utf-8")
    assert "xnli (accuracy, accuracy, avg of 2 targets (en excluded))" in md and "incl. en" not in md
    report_md = (out / "report.md").read_text(encoding="utf-8")
    assert "xnli (accuracy by scorer `accuracy`): avg of 2 targets (en excluded)" in report_md
    assert "including English" not in report_md and "incl. en" not in report_md
    assert {r["average_of"] for r in _csv(out / "table1.csv")} == {"avg of 2 targets (en excluded)"}
    by_language = (out / "table4_by_language.md").read_text(encoding="utf-8")
    assert "| avg of 2 targets (en excluded) |" in by_language.replace("  ", " ")

    make_run(root / "c", "xnli", {"en": 80.0, "de": 71.0, "zh": 61.0}, seed=2)  # now the sets differ
    report = Report(collect_runs([root]).runs)
    assert report.average_label("xnli") == "avg of 2-3 languages, sets differ (en in 1 of 3 runs)"
    baseline_runs = report.groups[("xnli", "tiny", Row("", None))]
    assert report.average_label("xnli", baseline_runs) == "avg of 2-3 languages, sets differ (en in 1 of 2 runs)"


def test_average_label_helper_and_demo_table():
    assert average_label(["en"] + [f"l{i}" for i in range(20)]) == "avg of 21 incl. en"
    assert average_label([f"l{i}" for i in range(20)]) == "avg of 20 targets (en excluded)"
    assert average_label(["de"]) == "avg of 1 target (en excluded)"
    base = {lang: {"accuracy": v} for lang, v in {"de": 50.0, "es": 60.0}.items()}
    cand = {lang: {"accuracy": v + 1} for lang, v in {"de": 50.0, "es": 60.0}.items()}
    text, records = comparison_table(base, cand, "accuracy", candidate_name="D_8")
    assert records[-1]["language"] == "average" and records[-1]["label"] == "avg of 2 targets (en excluded)"
    assert records[-1]["languages"] == ["de", "es"] and records[-1]["delta"] == pytest.approx(1.0)
    assert "| avg of 2 targets (en excluded) |" in text
    with_en = {**base, "en": {"accuracy": 90.0}}
    _, records = comparison_table(with_en, {**cand, "en": {"accuracy": 91.0}}, "accuracy")
    assert records[-1]["label"] == "avg of 3 incl. en"
    with pytest.raises(ValueError, match="different languages: en"):
        comparison_table(with_en, cand, "accuracy")


def test_an_average_that_is_not_the_mean_of_its_languages_is_refused(tmp_path):
    run = make_run(tmp_path / "r", "xnli", {"en": 80.0, "de": 60.0})
    data = json.loads((run / "metrics.json").read_text())
    data["average"]["accuracy"] = 60.0  # e.g. English left out of the average but not of the languages
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(DlfaInputError, match=r"'average' accuracy 60.0000 is not the mean of its 2 per-language"):
        load_run(run)


# -- where the report goes ------------------------------------------------------------------------------------


def test_two_runs_get_a_neutral_output_in_the_current_folder(tmp_path, monkeypatch, capsys):
    run_a = make_run(tmp_path / "runA", "xnli", {"en": 80.0, "de": 70.0})
    run_b = make_run(tmp_path / "runB", "xnli", {"en": 81.0, "de": 71.0}, fuse_layer=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    output, reason = resolve_output([run_a, run_b])
    assert re.fullmatch(r"report-[0-9a-f]{8}", str(output)) and "share no sweep" in reason
    assert resolve_output([run_b, run_a])[0] == output  # the set of runs, not their order, names it
    assert resolve_output([run_a])[0] != output  # one run folder: neutral too, never inside the run
    assert resolve_output([run_a])[0].parent == Path(".")
    assert main(["report", str(run_a), str(run_b)]) == 0
    assert (cwd / output / "report.md").is_file() and (cwd / output / "dlfa-report.json").is_file()
    assert not (run_a / "report").exists() and not (run_b / "report").exists()
    assert main(["report", str(run_a), str(run_b)]) == 0  # the same command updates its own folder
    assert "Output: `" + str(output) in (cwd / output / "report.md").read_text(encoding="utf-8")


def test_runs_of_one_sweep_report_into_the_sweep(sweep, tmp_path):
    cell = sweep / "xnli/tiny/baseline/seed-1"
    assert resolve_output([cell, sweep / "udpos"]) == (sweep / "report", resolve_output([cell, sweep / "udpos"])[1])
    assert resolve_output([sweep / "xnli", sweep / "udpos/tiny"])[0] == sweep / "report"
    assert resolve_output([sweep])[0] == sweep / "report"  # one folder that is not a run
    other = make_run(tmp_path / "elsewhere", "xnli", {"en": 1.0, "de": 2.0})
    assert resolve_output([cell, other])[0].name.startswith("report-")
    assert resolve_output([sweep, tmp_path / "out"], output=tmp_path / "out")[0] == tmp_path / "out"


def test_output_that_dlfa_did_not_make_is_refused(sweep, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["report", str(sweep), "--output", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "exists and is a file" in err and a_file.read_text() == "mine"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("mine")
    assert main(["report", str(sweep), "--output", str(theirs)]) == 2
    assert "was not made by dlfa report" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(sweep), "--output", str(empty)]) == 0  # an empty folder replaces nothing
    marker = json.loads((empty / "dlfa-report.json").read_text())
    assert marker["format"] == "dlfa-report" and "table1.md" in marker["files"] and "report.md" in marker["files"]


def test_a_report_folder_is_updated_and_its_stale_files_removed(sweep, tmp_path):
    out = tmp_path / "report"
    write_report([sweep], out)
    assert (out / "delta_udpos_tiny.png").is_file()
    (out / "my-notes.md").write_text("mine")  # something the user added
    write_report([sweep / "xnli"], out)  # udpos is no longer in the report
    assert not (out / "delta_udpos_tiny.png").exists() and not (out / "delta_udpos_tiny.pdf").exists()
    assert (out / "delta_xnli_tiny.png").is_file() and (out / "my-notes.md").read_text() == "mine"

    legacy = tmp_path / "legacy"  # made by a dlfa report from before the marker
    legacy.mkdir()
    (legacy / "report.md").write_text("# DLFA report\n\nold\n")
    (legacy / "old-figure.png").write_bytes(b"x")
    write_report([sweep], legacy)
    assert (legacy / "dlfa-report.json").is_file() and (legacy / "old-figure.png").exists()


# -- LaTeX -------------------------------------------------------------------------------------------------------


def _check_latex_markup(tex: str) -> None:
    assert tex.isascii(), sorted({ch for ch in tex if not ch.isascii()})
    unescaped = re.sub(r"\\[{}]", "", tex)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    floats = tex.count(r"\begin{table}")
    assert floats and floats == tex.count(r"\end{table}") == tex.count(r"\label{tab:dlfa-")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == floats, rule
    assert r"\hline" not in tex
    for caption in re.findall(r"\\caption\{(.*)\}", tex):
        assert not caption.startswith("Table"), caption
    for tabular in re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", tex, re.S):
        columns, body = len(tabular[0]), tabular[1]
        for line in body.splitlines():
            if line.endswith(r"\\"):
                assert line.replace(r"\&", "").count("&") == columns - 1, line


def test_latex_tables_are_booktabs_ascii_and_labelled(sweep, tmp_path):
    out = tmp_path / "report"
    make_run(sweep / "xnli/tiny/D_1/seed-3", "xnli", {"en": 80.0, "de": 70.0, "zh": 60.0}, fuse_layer=1, seed=3,
             dev=20.0)  # a low one: its selection row carries a warning
    for seed in (1, 2):
        data = json.loads((sweep / f"xnli/tiny/D_1/seed-{seed}/metrics.json").read_text())
        data["selection"] = {"language": "en", "split": "dev", "best_score": 75.0}
        (sweep / f"xnli/tiny/D_1/seed-{seed}/metrics.json").write_text(json.dumps(data))
    write_report([sweep], out)
    files = sorted(out.glob("*.tex"))
    assert {f.stem for f in files} >= {"table1", "table2", "table4", "seeds", "selection", "table4_by_language"}
    for file in files:
        _check_latex_markup(file.read_text(encoding="utf-8"))
    table1 = (out / "table1.tex").read_text()
    assert r"\caption{each run's average" in table1 and r"\label{tab:dlfa-table1}" in table1
    assert r"\label{tab:dlfa-table2-xnli}" in (out / "table2.tex").read_text()
    selection = (out / "selection.tex").read_text()
    assert "SUSPECT" in selection and "$\\Delta$ vs base" in selection


def test_tex_escape_leaves_only_ascii():
    assert tex_escape("D_1 & 50% ± 1") == r"D\_1 \& 50\% $\pm$ 1"
    assert tex_escape("✓ (best en dev) | a<b> – é ∑") == r"yes (best en dev) \textbar{} a\textless{}b\textgreater{} -- e [U+2211]"
    table = Table("Table 9: x_y ✓", ["a", "b ± c"], [["1", "é"]], notes=["`metrics.json` 100%"], label_columns=1)
    tex = table_latex(table)
    _check_latex_markup(tex)
    assert r"\caption{x\_y yes}" in tex and r"\texttt{metrics.json} 100\%" in tex


def _compile(tex_files: list[Path], folder: Path) -> subprocess.CompletedProcess:
    body = "\n".join(rf"\input{{{f.stem}}}\clearpage" for f in tex_files)
    (folder / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                    f"{body}\n\\end{{document}}\n", encoding="ascii")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=folder,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("kpsewhich") is None,
                    reason="no pdflatex (Debian: apt-get install texlive-latex-base texlive-latex-recommended)")
def test_latex_tables_compile_with_pdflatex(sweep, tmp_path):
    if subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, text=True).stdout.strip() == "":
        pytest.skip("booktabs.sty not installed (Debian: texlive-latex-recommended)")
    out = tmp_path / "report"
    make_run(sweep / "udpos/tiny/D_1/seed-2", "udpos", {"en": 9.0, "de": 2.0, "ja": 1.0}, fuse_layer=1, seed=2,
             dev=3.6)
    write_report([sweep], out)
    files = sorted(out.glob("*.tex"))
    result = _compile(files, out)
    assert result.returncode == 0, result.stdout[-3000:]
    log = (out / "doc.log").read_text(encoding="latin-1")
    assert "Missing character" not in log and "Undefined control sequence" not in log
    assert (out / "doc.pdf").read_bytes().startswith(b"%PDF")


# -- figures -----------------------------------------------------------------------------------------------------


def test_every_png_has_a_pdf_beside_it(sweep, tmp_path):
    out = tmp_path / "report"
    result = write_report([sweep], out)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        pdf = png.with_suffix(".pdf")
        assert pdf.read_bytes().startswith(b"%PDF") and str(pdf) in result["files"], pdf
    assert not list(out.glob(".*.tmp"))
    assert "also saved as PDF" in (out / "report.md").read_text(encoding="utf-8")


def test_save_figure_writes_png_and_a_reproducible_pdf(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    first = save_figure(fig, tmp_path / "a.png")
    pdf = (tmp_path / "a.pdf").read_bytes()
    second = save_figure(fig, tmp_path / "a.png")
    plt.close(fig)
    assert first == second == [tmp_path / "a.png", tmp_path / "a.pdf"]
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "a.pdf").read_bytes() == pdf
    assert b"/CreationDate" not in pdf


def test_heatmap_labels_are_white_on_dark_and_black_on_light(sweep, monkeypatch, tmp_path):
    from matplotlib import colormaps

    rdbu = colormaps["RdBu"]
    assert text_color_for(rdbu(0.0)) == "white" and text_color_for(rdbu(1.0)) == "white"  # dark red, dark blue
    assert text_color_for(rdbu(0.5)) == "black"  # the near-white middle
    assert text_color_for((1, 1, 0, 1)) == "black" and text_color_for((0, 0, 0.5, 1)) == "white"
    assert relative_luminance((1, 1, 1)) == pytest.approx(1.0) and relative_luminance((0, 0, 0)) == 0.0

    import dlfa.reporting.plots as plots

    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    root = tmp_path / "runs"
    make_run(root / "base", "xnli", {"en": 80.0, "de": 70.0, "zh": 60.0})
    make_run(root / "d1", "xnli", {"en": 80.1, "de": 90.0, "zh": 40.0}, fuse_layer=1)  # +0.1, +20, -20
    written = Report(collect_runs([root]).runs).plot_delta_heatmap("xnli", "tiny", tmp_path / "h.png")
    assert written == [tmp_path / "h.png", tmp_path / "h.pdf"]
    texts = {t.get_text(): t.get_color() for t in figures[0].axes[0].texts}
    assert texts == {"+0.1": "black", "+20.0": "white", "-20.0": "white"}


def test_language_bars_value_labels_zoom_and_pdf(tmp_path, monkeypatch):
    import dlfa.reporting.plots as plots

    figures = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    written = language_bars(["de", "es", "avg of 2 targets (en excluded)"],
                            {"baseline": [80.0, 82.0, 81.0], "D_8": [81.0, 81.5, 81.25]}, "accuracy", "t",
                            tmp_path / "bars.png", errors={"baseline": [0.5, None, 0.2]}, zoom=True,
                            note="one seed cannot separate the two")
    assert written == [tmp_path / "bars.png", tmp_path / "bars.pdf"] and all(p.is_file() for p in written)
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] > 70 and "does not start at 0" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.texts]
    assert {"80.0", "82.0", "81.5", "81.2"} <= set(labels) and "one seed cannot separate the two" in labels
    language_bars(["de"], {"a": [50.0]}, "accuracy", "t", tmp_path / "plain.png")  # the old call still works
    assert (tmp_path / "plain.pdf").is_file()


# -- pruning weights ---------------------------------------------------------------------------------------------


def _fake_model_folder(run: Path, payload: bytes = b"\0" * 4096) -> Path:
    """best/ as save_pretrained leaves it: weights listed in a dlfa checksums.json (written by dlfa's own helper)."""
    best = run / "best"
    best.mkdir(parents=True, exist_ok=True)
    (best / "model.safetensors").write_bytes(payload)
    write_checksums(best, ("model.safetensors",))
    return best


def test_prune_only_a_finished_runs_own_weights(tmp_path):
    run = make_run(tmp_path / "run", "xnli", {"en": 80.0, "de": 70.0})
    best = _fake_model_folder(run)
    (best / "mine.safetensors").write_bytes(b"user file")  # not listed by dlfa: never touched
    unfinished = tmp_path / "unfinished"
    _fake_model_folder(unfinished)
    with pytest.raises(DlfaInputError, match="not a finished run"):
        prune_run(unfinished)
    assert (unfinished / "best/model.safetensors").is_file()
    result = prune_run(run)
    assert result.removed == ["best/model.safetensors"] and not result.kept
    assert result.bytes_freed == 4096 - (run / "pruned.json").stat().st_size  # the record costs a few hundred bytes
    assert not (best / "model.safetensors").exists() and (best / "mine.safetensors").is_file()
    record = json.loads((run / "pruned.json").read_text())
    assert record["format"] == "dlfa-pruned" and record["removed"]["best/model.safetensors"]["bytes"] == 4096
    assert (run / "metrics.json").is_file() and (best / "checksums.json").is_file()
    assert prune_run(run).removed == []  # idempotent
    assert load_run(run).pruned
    out = tmp_path / "report"
    write_report([run], out)
    assert "model weights pruned in 1 (scores unaffected)" in (out / "report.md").read_text(encoding="utf-8")


def test_prune_keeps_weights_that_are_not_what_dlfa_wrote(tmp_path):
    run = make_run(tmp_path / "run", "xnli", {"en": 80.0})
    best = _fake_model_folder(run)
    (best / "model.safetensors").write_bytes(b"replaced by the user")
    result = prune_run(run)
    assert result.removed == [] and result.kept[0][0] == "best/model.safetensors"
    assert "not what dlfa wrote" in result.kept[0][1] and (best / "model.safetensors").is_file()
    assert not (run / "pruned.json").exists()


def test_run_prune_over_a_sweep(sweep):
    for cell in sorted(p.parent for p in sweep.rglob("metrics.json")):
        _fake_model_folder(cell)
    with pytest.raises(DlfaInputError, match="must not be empty"):
        PruneConfig(runs=[])
    results = run_prune(PruneConfig(runs=[str(sweep)]))
    assert len(results) == 10 and all(r.removed == ["best/model.safetensors"] for r in results)
    assert not list(sweep.rglob("model.safetensors"))
    assert "removed best/model.safetensors" in results[0].summary()


def test_evaluate_says_the_weights_were_pruned(tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.configs import EvaluateConfig
    from dlfa.evaluation.run_eval import evaluate_run
    from dlfa.training.config import TrainConfig
    from dlfa.training.recipe import FinetuneRecipe

    run = tmp_path / "run"
    FinetuneRecipe(TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir),
                               output_dir=str(run), epochs=1, batch_size=4, learning_rate=1e-3)).run()
    before = disk_usage(run)
    result = prune_run(run)
    assert result.removed == ["best/model.safetensors"] and result.bytes_before == before
    assert disk_usage(run) == result.bytes_after < before
    with pytest.raises(DlfaInputError, match="were pruned after it finished") as info:
        evaluate_run(EvaluateConfig(run=str(run)))
    assert str(run) in str(info.value)
    with pytest.raises(DlfaInputError, match="were pruned"):
        evaluate_run(EvaluateConfig(run=str(run / "best")))  # the model folder itself


def test_keep_weights_off_prunes_a_finished_run(tiny_model_dir, tiny_udpos_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--task", "udpos", "--model", str(tiny_model_dir), "--data-dir", str(tiny_udpos_dir),
                 "--output", str(run), "--epochs", "1", "--batch-size", "4", "--no-keep-weights"]) == 0
    assert (run / "metrics.json").is_file() and (run / "pruned.json").is_file()
    assert not (run / "best" / "model.safetensors").exists() and (run / "best" / "config.json").is_file()


def test_variant_rows_are_compared_with_the_papers_row_at_the_same_layer(tmp_path):
    root = tmp_path / "sweep"
    for seed in (1, 2, 3):
        base = {"en": 80.0 + seed, "de": 70.0, "zh": 60.0}
        make_run(root / f"xnli/tiny/baseline/seed-{seed}", "xnli", base, seed=seed, dev=80.0)
        make_run(root / f"xnli/tiny/D_2/seed-{seed}", "xnli", {**base, "de": 71.0}, fuse_layer=2, seed=seed,
                 dev=81.0)
        if seed < 3:  # the variant ran two seeds: only those are paired
            make_run(root / f"xnli/tiny/gate-baseline+D_2/seed-{seed}", "xnli",
                     {**base, "de": 71.0 + 3 * seed, "zh": 59.0}, method="gate-baseline", fuse_layer=2, seed=seed,
                     dev=81.0 + seed)
    report = Report(collect_runs([root]).runs)
    table, records = report.variant_table()
    assert len(records) == 1
    record = records[0]
    assert (record["row"], record["compared_with"], record["seeds"]) == ("gate-baseline+D_2", "D_2", [1, 2])
    # average over en, de, zh: (3 s - 1) / 3 per seed -> 2/3 and 5/3
    assert record["delta_mean"] == pytest.approx(statistics.fmean([2 / 3, 5 / 3]))
    assert record["delta_std"] == pytest.approx(statistics.stdev([2 / 3, 5 / 3]))
    assert record["delta_dev_mean"] == pytest.approx(1.5)
    assert (record["targets_better"], record["targets"]) == (1, 2)  # de better, zh worse
    assert table.rows[0][7] == "1 of 2"
    out = write_report([root], tmp_path / "report")
    assert "variants.md" in {Path(f).name for f in out["files"]}
