"""Compare a layer ranking (``dlfa rank-layers``) with the ranking a sweep gives, and show both side by side.

Light on purpose (no torch): ``dlfa report`` and ``benchmarks/validate_rank_layers.py`` import it.

A ranking here is a mapping ``fused layer x -> score`` (higher is better): the proxy's mean English-dev score,
or a sweep's mean English-dev score (its selection signal) or mean zero-shot average over seeds. Two rankings
are compared on the layers both contain by

* **Spearman's ρ** (``scipy.stats.spearmanr``: tied scores share their average rank), NaN when one side is
  constant;
* **top-1 match**: the proxy's best layer is a best layer of the reference (all tied best ones count);
* **top-k overlap**: how many of the proxy's k best layers are among the reference's k best (0..k);
* **reference best in proxy top-k**: would training the proxy's k best layers have found the reference's
  best one;
* **regret**: the reference's best score minus the reference score of the proxy's best layer (0 when the
  proxy picks the reference's best; in the reference's points).

Orders break ties by the lower layer, so that they are deterministic.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError

RANKING_FILE = "ranking.json"
RANKING_FORMAT = "dlfa-rank-layers"
_ROW = re.compile(r"D_([0-9]+)")


def order(scores: Mapping[int, float]) -> list[int]:
    """Layers best first; ties go to the lower layer."""
    return sorted(scores, key=lambda x: (-scores[x], x))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN when undefined (n < 2 or a constant side)."""
    if len(a) != len(b):
        raise ValueError(f"expected two sequences of the same length, got {len(a)} and {len(b)}")
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def compare_rankings(proxy: Mapping[int, float], reference: Mapping[int, float], k: int = 3) -> dict[str, Any]:
    """How well ``proxy`` scores rank the layers of ``reference`` (see the module docstring for each figure)."""
    common = sorted(set(proxy) & set(reference))
    if len(common) < 2:
        raise ValueError(f"need at least 2 layers in both rankings to compare them, got {common}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = {x: float(proxy[x]) for x in common}
    r = {x: float(reference[x]) for x in common}
    p_order, r_order = order(p), order(r)
    best = max(r.values())
    reference_best = [x for x in common if math.isclose(r[x], best, rel_tol=0.0, abs_tol=1e-9)]
    k = min(k, len(common))
    return {
        "layers": common,
        "n": len(common),
        "spearman_rho": spearman([p[x] for x in common], [r[x] for x in common]),
        "top1_match": p_order[0] in reference_best,
        "k": k,
        "topk_overlap": len(set(p_order[:k]) & set(r_order[:k])),
        "reference_best_in_proxy_topk": any(x in p_order[:k] for x in reference_best),
        "regret": best - r[p_order[0]],
        "proxy_order": p_order,
        "reference_order": r_order,
    }


# -- reading ---------------------------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_ranking(path: str | Path) -> dict[str, Any]:
    """A ``ranking.json`` written by ``dlfa rank-layers`` (a folder holding one is accepted too), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / RANKING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlfaInputError("ranking file not found", path=path) from None
    except json.JSONDecodeError as exc:
        raise DlfaInputError(f"malformed ranking file: {exc.msg}", path=path, line=exc.lineno) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DlfaInputError(f"unreadable ranking file ({type(exc).__name__})", path=path) from None
    if not isinstance(data, dict) or data.get("format") != RANKING_FORMAT:
        raise DlfaInputError(f"not a {RANKING_FORMAT} file", path=path)
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DlfaInputError("malformed ranking file: 'layers' missing or empty", path=path)
    for entry in layers:
        if (not isinstance(entry, dict) or not isinstance(entry.get("layer"), int) or not _number(entry.get("mean"))
                or not isinstance(entry.get("rank"), int)):
            raise DlfaInputError(f"malformed ranking file: bad layer entry {str(entry)[:80]}", path=path)
    for key in ("task", "model", "primary_metric"):
        if not isinstance(data.get(key), str):
            raise DlfaInputError(f"malformed ranking file: '{key}' missing", path=path)
    return data


def find_rankings(roots: Iterable[str | Path]) -> list[Path]:
    """Every ``ranking.json`` of ``dlfa rank-layers`` under ``roots`` (recursive), sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        candidates = [root] if root.is_file() else root.rglob(RANKING_FILE) if root.is_dir() else []
        for path in candidates:
            if path.name != RANKING_FILE:
                continue
            try:
                marker = json.loads(path.read_text(encoding="utf-8")).get("format")
            except (OSError, ValueError, AttributeError):
                continue
            if marker == RANKING_FORMAT:
                found.add(path.resolve())
    return sorted(found)


def proxy_scores(ranking: Mapping[str, Any]) -> dict[int, float]:
    """Layer -> mean English-dev score of a loaded ranking."""
    return {int(entry["layer"]): float(entry["mean"]) for entry in ranking["layers"]}


def sweep_layer_scores(sweep_dir: str | Path, task: str) -> dict[str, Any]:
    """Per fused layer of a sweep's D_x cells of ``task``: English-dev, zero-shot and overall averages per seed.

    Reads every ``<sweep_dir>/<task>/<model>/D_x/seed-<s>/metrics.json`` (finished cells only). Returns
    ``{"model": ..., "metric": ..., "seeds": [...], "layers": {x: {"dev": {seed: v}, "zero_shot": {...},
    "average": {...}}}}``. The dev score is ``selection.best_score`` (the English-dev score of the kept
    checkpoint, the sweep's selection signal); ``zero_shot`` is ``average_zero_shot`` (targets only).
    """
    root = Path(sweep_dir) / task
    layers: dict[int, dict[str, dict[int, float]]] = {}
    models, metrics, seeds = set(), set(), set()
    for path in sorted(root.glob("*/D_*/seed-*/metrics.json")):
        match = _ROW.fullmatch(path.parent.parent.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            metric = data["primary_metric"]
            seed = int(data["seed"])
            values = {"dev": data["selection"]["best_score"], "zero_shot": data["average_zero_shot"][metric],
                      "average": data["average"][metric]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DlfaInputError(f"malformed metrics file ({type(exc).__name__}: {exc})", path=path) from None
        if data.get("fuse_layer") != int(match.group(1)) or not all(_number(v) for v in values.values()):
            raise DlfaInputError("metrics file does not match its D_x folder or lacks a score", path=path)
        models.add(data["model"])
        metrics.add(metric)
        seeds.add(seed)
        cell = layers.setdefault(int(match.group(1)), {"dev": {}, "zero_shot": {}, "average": {}})
        for key, value in values.items():
            cell[key][seed] = float(value)
    if len(models) > 1:
        raise DlfaInputError(f"several models in one sweep task folder ({', '.join(sorted(models))})", path=root)
    return {"model": next(iter(models), None), "metric": next(iter(metrics), None), "seeds": sorted(seeds),
            "layers": dict(sorted(layers.items()))}


def mean_over_seeds(per_seed: Mapping[int, Mapping[int, float]]) -> dict[int, float]:
    """Layer -> mean over the seeds it has."""
    return {x: statistics.fmean(v.values()) for x, v in per_seed.items() if v}


# -- the report's view -----------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _ranked(scores: Mapping[int, float]) -> dict[int, int]:
    return {x: i + 1 for i, x in enumerate(order(scores))}


def ranking_table(ranking: Mapping[str, Any], sweep_rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown: the proxy's ranking of the fused layers beside the sweep's, with ρ and top-1/top-3 agreement.

    ``ranking``: a loaded ``ranking.json`` (:func:`load_ranking`). ``sweep_rows``: records with ``task``,
    ``model``, ``row`` (``D_x``), ``dev_mean`` (mean English-dev score over seeds) and ``mean`` (mean average
    score over all evaluated languages), e.g. the records of ``Report.selection_table()``; rows of other tasks
    or models, and rows that are not plain ``D_x``, are ignored.
    """
    task, model, metric = ranking["task"], ranking["model"], ranking["primary_metric"]
    proxy = proxy_scores(ranking)
    dev: dict[int, float] = {}
    average: dict[int, float] = {}
    for record in sweep_rows:
        match = _ROW.fullmatch(str(record.get("row", "")))
        if not match or record.get("task") != task or record.get("model") != model:
            continue
        x = int(match.group(1))
        if _number(record.get("dev_mean")):
            dev[x] = float(record["dev_mean"])
        if _number(record.get("mean")):
            average[x] = float(record["mean"])
    p_rank, d_rank, a_rank = _ranked(proxy), _ranked(dev), _ranked(average)
    std = {int(e["layer"]): e.get("std") for e in ranking["layers"]}
    lines = [f"### Layer ranking: proxy (`dlfa rank-layers`) beside the sweep ({task}, {model})", ""]
    header = ["layer", f"proxy en dev {metric} (rank)", f"sweep en dev {metric} (rank)",
              f"sweep average {metric} (rank)"]
    lines += ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|"]
    for x in sorted(set(proxy) | set(dev) | set(average)):
        p = f"{_fmt(proxy.get(x))}" + (f" ± {_fmt(std[x])}" if _number(std.get(x)) else "")
        cells = [f"D_{x}",
                 f"{p} ({p_rank[x]})" if x in proxy else "–",
                 f"{_fmt(dev[x])} ({d_rank[x]})" if x in dev else "–",
                 f"{_fmt(average[x])} ({a_rank[x]})" if x in average else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, reference in (("sweep en dev", dev), ("sweep average", average)):
        if len(set(proxy) & set(reference)) < 2:
            lines.append(f"* vs {name}: fewer than 2 layers in common, no comparison.")
            continue
        c = compare_rankings(proxy, reference)
        lines.append(f"* vs {name} ({c['n']} layers): Spearman ρ {_fmt(c['spearman_rho'])}; top-1 "
                     f"{'agrees' if c['top1_match'] else 'differs'} (proxy D_{c['proxy_order'][0]}, sweep "
                     f"D_{c['reference_order'][0]}); top-{c['k']} overlap {c['topk_overlap']}/{c['k']}; regret "
                     f"{_fmt(c['regret'])} points.")
    lines.append(f"* Proxy: mean ± std over seeds {', '.join(map(str, ranking.get('seeds', [])))} of the English-dev "
                 "score of a gate and head trained on the frozen encoder; sweep: mean over its seeds, "
                 "`average` includes English (Table 1). No target-language label enters the proxy.")
    return "\n".join(lines) + "\n"


def rankings_markdown(roots: Iterable[str | Path], sweep_rows: Iterable[Mapping[str, Any]]) -> str:
    """The report's section: :func:`ranking_table` for every ranking under ``roots``; "" when there is none.

    ``dlfa report`` calls it with its run folders and the records of ``Report.selection_table()``.
    """
    rows = list(sweep_rows)
    return "\n".join(ranking_table(load_ranking(path), rows) for path in find_rankings(roots))
