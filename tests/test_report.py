"""`dlfa report`: collecting runs, aggregation over seeds, the tables in three formats, figures, published values."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest

from dlfa.cli.main import main
from dlfa.errors import DlfaInputError
from dlfa.reporting.published import PUBLISHED, is_mbert, published_value
from dlfa.reporting.report import (
    DEFAULT_GROUPS,
    Report,
    ReportOptions,
    Row,
    collect_runs,
    load_run,
    row_for,
    tex_escape,
)

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

    report = (out / "report.md").read_text()
    assert "Command: `" in report  # sys.argv: here pytest's, from a shell `dlfa report ...`
    assert "Seeds: 1, 2, 3" in report and "runs per cell (n): 1, 2, 3" in report
    assert "including English" in report and "sample standard deviation" in report
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
    assert list(lines) == ["en", "de", "zh", "average"]
    assert lines["de"][3] == "75.00 ± 2.00"  # D_2 de: 73, 75, 77
    assert lines["average"][1] == "72.00 ± 2.00"  # the baseline's Table 1 cell
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
