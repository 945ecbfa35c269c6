"""``dlfa demo``: baseline against DLFA on the shipped multilingual POS sample, on the embedded model.

For each seed, trains a baseline and a D_x model on ~320 English sentences (selecting on the English dev sample)
and scores six other languages zero-shot. The table gives, per language, the mean over seeds and the per-seed
difference D_x - baseline with its spread, and says plainly whether the seeds can tell the two apart; the plot
shows the differences, with value labels. Sized for a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.io import check_new_output, write_json_atomic, write_text_atomic
from dlfa.reporting.tables import format_score, markdown_table
from dlfa.training.config import DemoConfig, TrainConfig

METRIC = "accuracy"  # on a toy sample, word accuracy is the easiest number to read
DEMO_FILE = "demo.json"
# Seconds per fine-tuning and its scoring on 2 idle cores (the estimate printed up front), fitted to
# benchmarks/load.py (2026-12-01): 2 runs of 1 epoch took 29.3 s, the default demo (4 runs of 6 epochs) 284.7 s.
SECONDS_PER_RUN_FIXED = 4.0
SECONDS_PER_EPOCH = 11.2


def _estimate_minutes(runs: int, epochs: float) -> float:
    return max(runs * (SECONDS_PER_RUN_FIXED + SECONDS_PER_EPOCH * epochs) / 60, 1.0)


def demo_data_dir() -> Path:
    return Path(str(resources.files("dlfa") / "resources" / "demo_pos"))


def _train_config(config: DemoConfig, name: str, fuse_layer: int | None, seed: int) -> TrainConfig:
    return TrainConfig(
        task="udpos", model=config.model, data_dir=str(demo_data_dir()),
        output_dir=str(Path(config.output_dir) / f"seed-{seed}" / name), fuse_layer=fuse_layer, epochs=config.epochs,
        batch_size=config.batch_size, learning_rate=config.learning_rate, seed=seed,
        freeze_embeddings=config.freeze_embeddings, warmup_ratio=0.1, keep_weights=config.keep_weights,
    )


def _check(config: DemoConfig) -> None:
    """Everything that can be wrong, before the first run trains (a bad --fuse-layer must not wait for the baseline)."""
    from transformers import AutoConfig

    from dlfa.training.recipe import resolve_model

    output = Path(config.output_dir)
    if output.exists() and not (config.overwrite and output.is_dir() and (output / DEMO_FILE).is_file()):
        if config.overwrite and output.is_dir():
            raise DlfaInputError(f"{output} was not made by dlfa demo; refusing to replace it", option="--output")
        raise DlfaInputError(f"{output} exists (pass --overwrite to replace an earlier demo)", option="--output")
    check_new_output(output, "--output", allow_existing_folder=config.overwrite)
    try:
        encoder_config = AutoConfig.from_pretrained(resolve_model(config.model))
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"cannot load model {config.model!r}: {str(exc).splitlines()[0]}", option="--model") from None
    _train_config(config, "dlfa", config.fuse_layer, config.seeds[0]).check_against_encoder(encoder_config)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], signed: bool = False) -> str:
    mean, std = _mean_std(values)
    return format_score(mean, signed=signed) + (f" ± {std:.2f}" if std is not None else "")


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]], fuse_layer: int) -> dict[str, Any]:
    """Per language: baseline and D_x over seeds, and the paired per-seed differences with their spread."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]["baseline"]["languages"]
    targets = [lang for lang in first if lang != "en"]
    rows = []
    for lang in [*targets, "average"]:
        def score(run: dict[str, Any], lang: str = lang) -> float:
            if lang == "average":
                return statistics.fmean(run["languages"][t][METRIC] for t in targets)
            return run["languages"][lang][METRIC]

        base = [score(per_seed[s]["baseline"]) for s in seeds]
        dlfa = [score(per_seed[s]["dlfa"]) for s in seeds]
        deltas = [d - b for b, d in zip(base, dlfa)]
        mean, std = _mean_std(deltas)
        rows.append({"language": lang, "baseline": base, f"D_{fuse_layer}": dlfa, "delta": deltas,
                     "delta_mean": mean, "delta_std": std})
    average = rows[-1]
    if len(seeds) < 2:
        verdict = "one seed cannot separate the two: run more seeds (--seeds 1,2,3) before reading the difference"
    elif average["delta_std"] is not None and abs(average["delta_mean"]) <= 2 * average["delta_std"] / len(seeds) ** .5:
        verdict = (f"the average difference {average['delta_mean']:+.2f} is within two standard errors of the "
                   f"{len(seeds)} seeds: these runs do not separate DLFA from the baseline")
    else:
        verdict = (f"the average difference {average['delta_mean']:+.2f} is larger than two standard errors of the "
                   f"{len(seeds)} seeds")
    return {"seeds": seeds, "targets": targets, "rows": rows, "verdict": verdict}


def _table(summary: dict[str, Any], fuse_layer: int) -> str:
    name = f"D_{fuse_layer}"
    rows = [[r["language"] if r["language"] != "average" else f"average ({len(summary['targets'])} targets)",
             _cell(r["baseline"]), _cell(r[name]), _cell(r["delta"], signed=True)] for r in summary["rows"]]
    n = len(summary["seeds"])
    spread = f"mean ± sample std over {n} seeds" if n > 1 else "1 seed"
    return markdown_table(["language", f"baseline {METRIC}", f"{name} {METRIC}", f"{name} − baseline"], rows) + (
        f"\n\n{spread} ({', '.join(map(str, summary['seeds']))}); the difference is paired by seed.")


def plot_deltas(summary: dict[str, Any], fuse_layer: int, path: Path) -> None:
    """The per-language difference D_x - baseline (mean over seeds, error bar = std), labelled with its value."""
    from dlfa.reporting.plots import _pyplot, save_figure

    plt = _pyplot()
    rows = summary["rows"]
    labels = [r["language"] for r in rows]
    means = [r["delta_mean"] for r in rows]
    errors = [r["delta_std"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4))
    colors = ["#2a7ab9" if m >= 0 else "#c8553d" for m in means]
    bars = ax.bar(range(len(rows)), means, yerr=errors if len(summary["seeds"]) > 1 else None, capsize=4, color=colors)
    ax.bar_label(bars, labels=[f"{m:+.2f}" for m in means], padding=3, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels)
    limit = max(abs(m) + e for m, e in zip(means, errors)) or 1.0
    ax.set_ylim(-1.25 * limit, 1.25 * limit)  # the axis spans the differences, centred on 0
    ax.set_ylabel(f"D_{fuse_layer} − baseline, POS {METRIC} (points)")
    n = len(summary["seeds"])
    ax.set_title(f"dlfa demo: zero-shot POS from English, {n} seed{'s' if n > 1 else ''}"
                 + (" (bars: mean, whiskers: std)" if n > 1 else " (one seed: no spread)"))
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    save_figure(fig, path.with_suffix(".svg"))
    plt.close(fig)


def run_demo(config: DemoConfig, echo=print) -> dict[str, Any]:
    from dlfa.training.recipe import FinetuneRecipe

    _check(config)
    output = Path(config.output_dir)
    runs = 2 * len(config.seeds)
    echo(f"dlfa demo: {runs} fine-tunings (baseline and D_{config.fuse_layer}, seeds "
         f"{','.join(map(str, config.seeds))}) on the shipped POS sample; about {_estimate_minutes(runs, config.epochs):.0f} min "
         "on 2 idle cores")
    started = time.time()
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in config.seeds:
        per_seed[seed] = {}
        for name, fuse_layer in (("baseline", None), ("dlfa", config.fuse_layer)):
            echo(f"== seed {seed}: {name} ({'last layer' if fuse_layer is None else f'D_{fuse_layer}'}) ==")
            recipe = FinetuneRecipe(_train_config(config, name, fuse_layer, seed), overwrite=config.overwrite)
            per_seed[seed][name] = recipe.run()

    summary = summarize(per_seed, config.fuse_layer)
    table = _table(summary, config.fuse_layer)
    seconds = time.time() - started
    header = (f"UD-POS zero-shot from English (demo sample), model {config.model}; checkpoints chosen on English dev "
              "only; word accuracy")
    plot_deltas(summary, config.fuse_layer, output / "demo.png")
    write_text_atomic(output / "demo.md", f"{header}\n\n{table}\n\n{summary['verdict']}.\n\nwall time {seconds:.0f}s\n")
    record = {"config": dataclasses.asdict(config), "metric": METRIC, **summary, "wall_seconds": seconds}
    write_json_atomic(output / DEMO_FILE, record)
    echo("")
    echo(header)
    echo(table)
    echo(f"\n{summary['verdict']}.")
    echo(f"\nwall time {seconds:.0f}s; table {output / 'demo.md'}, plot {output / 'demo.png'}, runs in {output}/")
    return record
