"""Figures (matplotlib, no display needed). Files are written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dlfa.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight")


def language_bars(
    languages: Sequence[str],
    series: dict[str, Sequence[float]],
    metric: str,
    title: str,
    path: str | Path,
) -> None:
    """Grouped bars: one group per language, one bar per series (e.g. baseline and DLFA)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(languages) + 2), 4))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(languages))]
        ax.bar(positions, values, width=width, label=name)
    ax.set_xticks(range(len(languages)), list(languages))
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=max(len(series), 1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
