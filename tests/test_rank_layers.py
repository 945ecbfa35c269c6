"""dlfa rank-layers: config checks, the output files, determinism, English-only reading, the ranking on a toy
where one layer is made informative, and the comparison with a sweep (Spearman, top-k, the report's table)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from dlfa.analysis.rank_compare import (
    compare_rankings,
    find_rankings,
    load_ranking,
    ranking_table,
    rankings_markdown,
    spearman,
    sweep_layer_scores,
)
from dlfa.analysis.rank_layers import (
    HiddenCache,
    ProbeSettings,
    RankLayersConfig,
    main,
    ranking_markdown,
    run_rank_layers,
    train_probes,
)
from dlfa.errors import DlfaInputError

# -- the config ------------------------------------------------------------------------------------------------------


def _config(data_dir, output_dir, model, **overrides) -> RankLayersConfig:
    fields = {"task": "udpos", "data_dir": str(data_dir), "output_dir": str(output_dir), "model": str(model),
              "seeds": [1, 2], "max_steps": 6, "eval_every": 3, "batch_size": 4, "learning_rate": 5e-3,
              "eval_batch_size": 5, "mode": "frozen", **overrides}
    return RankLayersConfig(**fields)


@pytest.mark.parametrize("field,value,option", [
    ("task", "ner", "--task"),
    ("data_dir", "", "--data-dir"),
    ("layers", [0, 2], "--layers"),
    ("layers", [2, 2], "--layers"),
    ("layers", [], "--layers"),
    ("seeds", [], "--seeds"),
    ("seeds", [1, 1], "--seeds"),
    ("learning_rate", 0.0, "--learning-rate"),
    ("learning_rate", math.nan, "--learning-rate"),
    ("learning_rate", math.inf, "--learning-rate"),
    ("epochs", -1.0, "--epochs"),
    ("warmup_ratio", 1.5, "--warmup-ratio"),
    ("classifier_dropout", 1.0, "--classifier-dropout"),
    ("dev_holdout", 0.0, "--dev-holdout"),
    ("max_train_examples", -1, "--max-train-examples"),
    ("batch_size", 0, "--batch-size"),
    ("max_steps", 0, "--max-steps"),
    ("eval_every", 0, "--eval-every"),
    ("max_length", True, "--max-length"),
    ("max_length", 4, "--max-length"),
    ("aif_norm", "batchnorm", "--aif-norm"),
    ("reduction", 0, "--reduction"),
    ("mode", "cached", "--mode"),
    ("freeze_embeddings", "yes", "--freeze-embeddings"),
])
def test_config_refuses_bad_values_naming_the_option(tmp_path, field, value, option):
    fields = {"task": "udpos", "data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), field: value}
    with pytest.raises(DlfaInputError) as info:
        RankLayersConfig(**fields)
    assert info.value.option == option


def test_config_defaults_and_command_line_flags():
    from dlfa.cli.main import parse
    from dlfa.options import parse_config

    command, given = parse(["rank-layers", "--task", "panx", "--data-dir", "d", "--output", "o", "--layers", "4,8",
                            "--seeds", "5", "--no-include-baseline", "--max-train-examples", "0"])
    config = parse_config(RankLayersConfig, given)
    assert (config.task, config.layers, config.seeds, config.include_baseline) == ("panx", [4, 8], [5], False)
    assert config.max_train_examples == 0 and config.model == "embedded:multilingual-e5-small"
    default = RankLayersConfig(task="udpos", data_dir="d", output_dir="o")
    assert default.seeds == [1, 2, 3] and default.mode == "joint"
    # Mode defaults: joint trains as a CPU-reproduction cell; frozen makes passes over its cache.
    assert default.resolved() == {"learning_rate": 1e-4, "batch_size": 16, "eval_every": 100,
                                  "max_train_examples": 0, "max_steps": 300, "epochs": None}
    frozen = RankLayersConfig(task="udpos", data_dir="d", output_dir="o", mode="frozen", batch_size=8)
    assert frozen.resolved() == {"learning_rate": 3e-3, "batch_size": 8, "eval_every": None,
                                 "max_train_examples": 2000, "max_steps": None, "epochs": 4.0}
    assert RankLayersConfig(task="udpos", data_dir="d", output_dir="o", epochs=2.0).resolved()["max_steps"] is None
    for f in dataclasses.fields(RankLayersConfig):  # every option has help text for the generated CLI
        assert f.metadata.get("help"), f.name


def test_main_bad_option_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--task", "udpos", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--learning-rate", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dlfa: error: option --learning-rate: must be a finite number, got nan"]


# -- the command on the tiny model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_output_files_and_format(tiny_model_dir, tiny_udpos_dir, tmp_path, mode):
    out = tmp_path / "rank"
    result = run_rank_layers(_config(tiny_udpos_dir, out, tiny_model_dir, mode=mode), show_progress=False,
                             command="test")
    data = load_ranking(out)
    assert data == json.loads((out / "ranking.json").read_text())
    assert data["format"] == "dlfa-rank-layers" and data["task"] == "udpos" and data["num_layers"] == 4
    assert data["mode"] == mode
    assert data["primary_metric"] == "f1" and data["seeds"] == [1, 2]
    layers = {e["layer"]: e for e in data["layers"]}
    assert sorted(layers) == [1, 2, 3]  # default: every layer 1..N-1 of the 4-layer encoder
    assert sorted(e["rank"] for e in data["layers"]) == [1, 2, 3]
    assert data["ranking"] == [e["layer"] for e in sorted(data["layers"], key=lambda e: e["rank"])]
    means = [layers[x]["mean"] for x in data["ranking"]]
    assert means == sorted(means, reverse=True)
    for entry in data["layers"]:
        values = [entry["scores"]["1"], entry["scores"]["2"]]
        assert entry["row"] == f"D_{entry['layer']}"
        assert entry["mean"] == pytest.approx(sum(values) / 2)
        assert entry["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert all(0.0 <= v <= 100.0 for v in values)
    assert set(data["baseline"]["scores"]) == {"1", "2"}
    # The best score of a run is the best of its evaluations (every 3 steps of 6: steps 3 and 6).
    for seed in ("1", "2"):
        history = data["history"][seed]
        assert [h["step"] for h in history] == [3, 6]
        for x in (1, 2, 3):
            assert layers[x]["scores"][seed] == max(h["scores"][str(x)] for h in history)
    assert data["cost"]["cpu_seconds"] > 0 and data["cost"]["cpu_seconds_train"] > 0
    assert data["settings"]["resolved"]["total_steps"] == 6 and data["command"] == "test"
    assert data["settings"]["config"]["layers"] is None
    md = (out / "ranking.md").read_text()
    assert md == ranking_markdown(result)
    first = data["ranking"][0]
    assert re.search(rf"^\| 1 +\| D_{first} +\| +{layers[first]['mean']:.2f} ± ", md, re.M)
    assert "last layer alone" in md and "No target-language file was read" in md
    assert sorted(p.name for p in out.iterdir()) == ["ranking.json", "ranking.md"]


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_same_seed_same_result(tiny_model_dir, tiny_udpos_dir, tmp_path, mode):
    first = run_rank_layers(_config(tiny_udpos_dir, tmp_path / "a", tiny_model_dir, mode=mode), show_progress=False)
    second = run_rank_layers(_config(tiny_udpos_dir, tmp_path / "b", tiny_model_dir, mode=mode), show_progress=False)
    assert first["layers"] == second["layers"] and first["history"] == second["history"]
    assert first["history"]["1"] != first["history"]["2"]  # the seed matters (initialisation, order, dropout)
    # Each seed starts from the pretrained encoder: seed 2 alone gives what it gave after seed 1.
    alone = run_rank_layers(_config(tiny_udpos_dir, tmp_path / "c", tiny_model_dir, mode=mode, seeds=[2]),
                            show_progress=False)
    assert alone["history"]["2"] == first["history"]["2"]


def test_frozen_layer_trains_as_alone(tiny_model_dir, tiny_udpos_dir, tmp_path):
    # A subset of layers, one seed: with no dropout a layer trains as it does in the full stack (its own
    # initialisation, AdamW moments and clipping), so its scores do not depend on the other layers.
    full = run_rank_layers(_config(tiny_udpos_dir, tmp_path / "c", tiny_model_dir, seeds=[3],
                                   classifier_dropout=0.0), show_progress=False)
    alone = run_rank_layers(_config(tiny_udpos_dir, tmp_path / "d", tiny_model_dir, seeds=[3], layers=[2],
                                    classifier_dropout=0.0, include_baseline=False), show_progress=False)
    assert [h["scores"]["2"] for h in alone["history"]["3"]] == pytest.approx(
        [h["scores"]["2"] for h in full["history"]["3"]])
    assert alone["baseline"] is None and [e["layer"] for e in alone["layers"]] == [2]


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_reads_only_training_language_files(tiny_model_dir, tiny_udpos_dir, tmp_path, monkeypatch, mode):
    # Target files that cannot be parsed: the ranking never opens them.
    (tiny_udpos_dir / "de-test.conllu").write_text("this is not CoNLL-U\n", encoding="utf-8")
    (tiny_udpos_dir / "ja-test.conllu").write_bytes(b"\xff\xfe broken")
    (tiny_udpos_dir / "en-test.conllu").write_text("also broken\n", encoding="utf-8")
    from dlfa.tasks.udpos import TASK

    reads: list[tuple[str, str]] = []
    original = type(TASK).read

    def spy(self, data_dir, language, split):
        reads.append((language, split))
        return original(self, data_dir, language, split)

    monkeypatch.setattr(type(TASK), "read", spy)
    run_rank_layers(_config(tiny_udpos_dir, tmp_path / "rank", tiny_model_dir, seeds=[1], mode=mode),
                    show_progress=False)
    assert sorted(reads) == [("en", "dev"), ("en", "train")]


def test_refuses_non_empty_output_and_checks_before_writing(tiny_model_dir, tiny_udpos_dir, tmp_path):
    out = tmp_path / "rank"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DlfaInputError, match="not empty") as info:
        run_rank_layers(_config(tiny_udpos_dir, out, tiny_model_dir), show_progress=False)
    assert info.value.option == "--output"
    run_rank_layers(_config(tiny_udpos_dir, out, tiny_model_dir, seeds=[1], overwrite=True), show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # only the ranking files are written
    assert (out / "ranking.json").is_file()
    # A layer the 4-layer encoder does not have: refused before anything is written.
    fresh = tmp_path / "fresh"
    with pytest.raises(DlfaInputError, match=r"1\.\.3") as info:
        run_rank_layers(_config(tiny_udpos_dir, fresh, tiny_model_dir, layers=[1, 4]), show_progress=False)
    assert info.value.option == "--layers" and not fresh.exists()
    with pytest.raises(DlfaInputError, match="data folder not found"):
        run_rank_layers(_config(tmp_path / "nowhere", fresh, tiny_model_dir), show_progress=False)
    assert not fresh.exists()


def test_pair_task_holds_out_selection_from_one_file(tiny_model_dir, tmp_path):
    folder = tmp_path / "pawsx"
    folder.mkdir()
    rows = [f"the cat sat {i}\tthe dog sat {i}\t{i % 2}" for i in range(20)]
    (folder / "dev-en.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "test-de.tsv").write_text("broken\n", encoding="utf-8")
    result = run_rank_layers(_config(folder, tmp_path / "rank", tiny_model_dir, task="pawsx", train_split="dev",
                                     seeds=[1], layers=[1, 3], mode="joint"), show_progress=False)
    resolved = result["settings"]["resolved"]
    assert result["primary_metric"] == "accuracy"
    assert (resolved["train_examples"], resolved["dev_examples"]) == (18, 2)
    assert resolved["selection_held_out_from_training_file"] is True


# -- the ranking on a toy with one informative layer -----------------------------------------------------------------


def _toy_cache(n: int, informative: int, generator: torch.Generator, layers=(1, 2, 3, 4)) -> HiddenCache:
    """Token features where only hidden layer ``informative`` carries the label (a noisy one-hot); the rest,
    the last layer included, is noise."""
    hidden, num_labels, length = 16, 4, 6
    labels = torch.randint(0, num_labels, (n * length,), generator=generator)
    labels[::length] = -100  # a position without a label, like <s>
    states = torch.randn(n * length, len(layers), hidden, generator=generator)
    signal = torch.zeros(n * length, hidden)
    signal[labels != -100, labels[labels != -100]] = 3.0
    states[:, list(layers).index(informative)] += signal
    offsets = torch.arange(0, n * length + 1, length)
    return HiddenCache(states=states.to(torch.bfloat16), offsets=offsets, labels=labels, layers=list(layers),
                       head="token")


def _accuracy(cache: HiddenCache):
    gold = [cache.labels[s:e][cache.labels[s:e] != -100].tolist()
            for s, e in zip(cache.offsets[:-1].tolist(), cache.offsets[1:].tolist())]

    def score(predictions):
        pairs = [(p, g) for pred, ref in zip(predictions, gold) for p, g in zip(pred, ref, strict=True)]
        return 100.0 * sum(p == g for p, g in pairs) / len(pairs)

    return score


@pytest.mark.parametrize("informative", [2, 1])
def test_informative_layer_ranks_first(informative):
    generator = torch.Generator().manual_seed(informative)
    train, dev = _toy_cache(200, informative, generator), _toy_cache(60, informative, generator)
    settings = ProbeSettings(head="token", num_labels=4, total_steps=60, batch_size=16, learning_rate=1e-2)
    result = train_probes(train, dev, settings, seed=1, score=_accuracy(dev))
    others = [result.best[x] for x in (1, 2, 3) if x != informative]
    assert result.best[informative] > 90.0  # the gate lets the head read the informative layer
    assert result.best[informative] > max(others) + 40.0  # the rest is noise: near chance (25%)
    assert result.best["baseline"] < 50.0  # the last layer alone is noise too
    assert len(result.history) == 60 // math.ceil(200 / 16) + 1  # each epoch, and the last step


# -- comparing rankings ----------------------------------------------------------------------------------------------


def test_compare_rankings_on_synthetic_rankings():
    ref = {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0}
    same = compare_rankings({x: v / 10 for x, v in ref.items()}, ref)
    assert same["spearman_rho"] == pytest.approx(1.0) and same["top1_match"] and same["topk_overlap"] == 3
    assert same["regret"] == 0.0 and same["reference_best_in_proxy_topk"] and same["proxy_order"] == [5, 4, 3, 2, 1]
    reverse = compare_rankings({x: -v for x, v in ref.items()}, ref)
    assert reverse["spearman_rho"] == pytest.approx(-1.0) and not reverse["top1_match"]
    assert reverse["topk_overlap"] == 1 and reverse["regret"] == pytest.approx(40.0)  # 3 is in both top-3s
    # The two best swapped: sum d^2 = 2, rho = 1 - 6 * 2 / (5 * 24) = 0.9.
    swap = compare_rankings({1: 1, 2: 2, 3: 3, 4: 5, 5: 4}, ref)
    assert swap["spearman_rho"] == pytest.approx(0.9)
    assert not swap["top1_match"] and swap["reference_best_in_proxy_topk"] and swap["regret"] == pytest.approx(10.0)
    assert swap["topk_overlap"] == 3
    # Only layers in both count; a tie for the reference's best accepts either.
    tied = compare_rankings({2: 1.0, 3: 2.0, 9: 5.0}, {2: 7.0, 3: 7.0, 4: 1.0})
    assert tied["layers"] == [2, 3] and tied["top1_match"] and math.isnan(tied["spearman_rho"])
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # average ranks for ties
    with pytest.raises(ValueError):
        compare_rankings({1: 1.0}, {1: 2.0})


def _ranking(task="udpos", model="m", means=None) -> dict:
    means = means or {1: 80.0, 2: 90.0, 3: 85.0}
    order = sorted(means, key=lambda x: -means[x])
    return {"format": "dlfa-rank-layers", "task": task, "model": model, "primary_metric": "f1", "seeds": [1, 2],
            "layers": [{"layer": x, "row": f"D_{x}", "mean": v, "std": 0.5, "rank": order.index(x) + 1,
                        "scores": {"1": v, "2": v}} for x, v in means.items()],
            "ranking": order}


def test_ranking_table_beside_sweep_rows():
    rows = [{"task": "udpos", "model": "m", "row": "baseline", "dev_mean": 99.0, "mean": 99.0},
            {"task": "udpos", "model": "m", "row": "D_1", "dev_mean": 70.0, "mean": 60.0},
            {"task": "udpos", "model": "m", "row": "D_2", "dev_mean": 75.0, "mean": 61.0},
            {"task": "udpos", "model": "m", "row": "D_3", "dev_mean": 72.0, "mean": 62.0},
            {"task": "panx", "model": "m", "row": "D_1", "dev_mean": 1.0, "mean": 1.0},
            {"task": "udpos", "model": "m", "row": "xmixup+D_1", "dev_mean": 1.0, "mean": 1.0}]
    md = ranking_table(_ranking(), rows)
    assert "| D_2 | 90.00 ± 0.50 (1) | 75.00 (1) | 61.00 (2) |" in md
    assert "| D_1 | 80.00 ± 0.50 (3) | 70.00 (3) | 60.00 (3) |" in md
    assert "vs sweep en dev (3 layers): Spearman ρ 1.00; top-1 agrees" in md
    assert "vs sweep average (3 layers): Spearman ρ 0.50; top-1 differs (proxy D_2, sweep D_3)" in md
    alone = ranking_table(_ranking(), [])
    assert "| D_2 | 90.00 ± 0.50 (1) | – | – |" in alone and "fewer than 2 layers in common" in alone


def test_ranking_table_from_report_selection_records(tmp_path):
    from dlfa.reporting.report import Report, collect_runs

    for x, (dev, score) in {None: (90.0, 70.0), 1: (85.0, 65.0), 2: (91.0, 69.0)}.items():
        for seed in (1, 2):
            folder = tmp_path / "sweep" / ("baseline" if x is None else f"D_{x}") / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({
                "task": "udpos", "model": "m", "method": "baseline" if x is None else "dlfa", "fuse_layer": x,
                "seed": seed, "primary_metric": "f1", "average": {"f1": score + seed},
                "languages": {"en": {"f1": score + seed}}, "selection": {"best_score": dev + seed}}))
    _, records = Report(collect_runs([tmp_path / "sweep"]).runs).selection_table()
    md = ranking_table(_ranking(means={1: 50.0, 2: 60.0}), records)
    assert "| D_2 | 60.00 ± 0.50 (1) | 92.50 (1) | 70.50 (1) |" in md
    assert "top-1 agrees (proxy D_2, sweep D_2)" in md
    # The report's section: every ranking found under its folders (none: nothing to add).
    assert rankings_markdown([tmp_path / "sweep"], records) == ""
    (tmp_path / "sweep" / "rank").mkdir()
    (tmp_path / "sweep" / "rank" / "ranking.json").write_text(json.dumps(_ranking(means={1: 50.0, 2: 60.0})))
    assert rankings_markdown([tmp_path / "sweep"], records) == md
    assert len(collect_runs([tmp_path / "sweep"]).runs) == 6  # a ranking folder is not taken for a run


def test_load_and_find_rankings(tmp_path):
    good = tmp_path / "a" / "rank"
    good.mkdir(parents=True)
    (good / "ranking.json").write_text(json.dumps(_ranking()))
    other = tmp_path / "b"
    other.mkdir()
    (other / "ranking.json").write_text(json.dumps({"something": "else"}))
    (tmp_path / "c.json").write_text("{")
    assert find_rankings([tmp_path]) == [(good / "ranking.json").resolve()]
    assert load_ranking(good)["task"] == "udpos"
    with pytest.raises(DlfaInputError, match="not a dlfa-rank-layers file"):
        load_ranking(other / "ranking.json")
    (other / "ranking.json").write_text("{oops")
    with pytest.raises(DlfaInputError, match=r"ranking\.json:1: malformed ranking file"):
        load_ranking(other)
    broken = _ranking()
    broken["layers"][0]["mean"] = "high"
    (other / "ranking.json").write_text(json.dumps(broken))
    with pytest.raises(DlfaInputError, match="bad layer entry"):
        load_ranking(other)


def _sweep_cell(root: Path, task: str, x: int, seed: int, dev: float, zero: float, model="embedded:m") -> None:
    folder = root / task / "embedded_m" / f"D_{x}" / f"seed-{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "task": task, "model": model, "method": "dlfa", "fuse_layer": x, "seed": seed, "primary_metric": "f1",
        "average": {"f1": zero + 1}, "average_zero_shot": {"f1": zero}, "selection": {"best_score": dev},
        "languages": {}}))


def test_sweep_layer_scores_reads_dev_and_zero_shot_per_seed(tmp_path):
    for x in (1, 2):
        for seed in (1, 2):
            _sweep_cell(tmp_path, "udpos", x, seed, dev=90.0 + x + seed, zero=60.0 - x + seed)
    (tmp_path / "udpos" / "embedded_m" / "baseline" / "seed-1").mkdir(parents=True)  # not a D_x row: ignored
    data = sweep_layer_scores(tmp_path, "udpos")
    assert data["model"] == "embedded:m" and data["metric"] == "f1" and data["seeds"] == [1, 2]
    assert data["layers"][2] == {"dev": {1: 93.0, 2: 94.0}, "zero_shot": {1: 59.0, 2: 60.0},
                                 "average": {1: 60.0, 2: 61.0}}
    assert sweep_layer_scores(tmp_path, "panx")["layers"] == {}
    bad = tmp_path / "udpos" / "embedded_m" / "D_1" / "seed-1" / "metrics.json"
    bad.write_text(json.dumps({"fuse_layer": 1}))
    with pytest.raises(DlfaInputError, match="malformed metrics file"):
        sweep_layer_scores(tmp_path, "udpos")


def _validation_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_rank_layers.py"
    spec = importlib.util.spec_from_file_location("validate_rank_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_summary_on_synthetic_outputs(tmp_path):
    script = _validation_script()
    sweep_dir = tmp_path / "sweep"
    # Sweep: dev ranks 3 > 2 > 1; zero-shot ranks 2 > 3 > 1. Proxy: 3 > 1 > 2.
    for seed in (1, 2):
        for x, dev, zero in ((1, 80.0, 50.0), (2, 85.0, 58.0), (3, 90.0, 55.0)):
            _sweep_cell(sweep_dir, "udpos", x, seed, dev=dev + seed, zero=zero + seed)
    rank_dir = tmp_path / "rank" / "udpos" / "joint"
    rank_dir.mkdir(parents=True)
    ranking = _ranking(model="embedded:m", means={1: 70.0, 2: 60.0, 3: 75.0})
    (rank_dir / "ranking.json").write_text(json.dumps(ranking))
    costs = {"udpos": {"sweep": {"cpu_seconds": 1000.0, "wall_seconds": 600.0},
                       "rank-joint": {"cpu_seconds": 50.0, "wall_seconds": 40.0}}}
    summary = script.summarize(tmp_path, ["udpos"], costs)
    assert list(summary["tasks"]) == ["udpos joint"]  # no frozen ranking here: left out
    task = summary["tasks"]["udpos joint"]
    assert task["vs_sweep_dev"]["spearman_rho"] == pytest.approx(0.5) and task["vs_sweep_dev"]["top1_match"]
    assert task["vs_sweep_zero_shot"]["spearman_rho"] == pytest.approx(-0.5)
    assert not task["vs_sweep_zero_shot"]["top1_match"]
    assert task["sweep_dev_vs_zero_shot"]["spearman_rho"] == pytest.approx(0.5)
    assert task["cpu_ratio"] == pytest.approx(0.05)
    md = script.validation_markdown(summary)
    assert "| udpos joint | proxy vs sweep en dev | 3 | 0.50 | yes | 3/3 |" in md
    assert "| udpos joint | 1000 | 50 | 0.050 (1/20.0) |" in md
    # The script's own entry point, comparing existing outputs only (no costs recorded: CPU columns empty).
    assert script.main(["--output", str(tmp_path), "--tasks", "udpos", "--compare-only"]) == 0
    written = json.loads((tmp_path / "validation.json").read_text())
    assert written["tasks"]["udpos joint"]["vs_sweep_dev"]["top1_match"] is True
    assert "| udpos joint | – | – | – |" in (tmp_path / "validation.md").read_text()


def test_validation_script_end_to_end_on_the_tiny_model(tiny_model_dir, tiny_udpos_dir, tmp_path):
    """The whole script (sweep, both rank-layers modes, comparison, cost ledger) on a few tiny steps."""
    import sys

    script = _validation_script()
    out = tmp_path / "validate"
    python = sys.executable
    assert script.main([
        "--data-root", str(tiny_udpos_dir.parent), "--output", str(out), "--tasks", "udpos", "--seeds", "1",
        "--layers", "1-3", "--parallel", "1", "--model", str(tiny_model_dir), "--dlfa", f"{python} -m dlfa",
        "--rank-command", f"{python} -m dlfa.analysis.rank_layers",
        "--sweep-options", "--max-steps 2 --eval-every 2 --max-eval-examples 2",
        "--rank-options", "--max-steps 2 --eval-every 2 --max-dev-examples 2 --eval-batch-size 4",
    ]) == 0
    summary = json.loads((out / "validation.json").read_text())
    assert sorted(summary["tasks"]) == ["udpos frozen", "udpos joint"]
    for entry in summary["tasks"].values():
        assert entry["vs_sweep_dev"]["layers"] == [1, 2, 3] and entry["sweep_seeds"] == [1]
        assert entry["sweep_cpu_seconds"] > 0 and entry["rank_cpu_seconds"] > 0 and entry["costs_complete"]
    costs = json.loads((out / "costs.json").read_text())
    assert sorted(costs["udpos"]) == ["rank-frozen", "rank-joint", "sweep"]
    assert load_ranking(out / "rank" / "udpos" / "joint")["settings"]["resolved"]["total_steps"] == 2
