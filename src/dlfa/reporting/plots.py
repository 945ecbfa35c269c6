"""Figures (matplotlib, no display needed). Files are written atomically.

Every figure is saved twice: the PNG that Markdown shows, and a PDF beside it (same name, ``.pdf``) with
embedded TrueType fonts, for LaTeX documents (pdflatex's ``\\includegraphics`` takes PDF, not SVG).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from dlfa.io import atomic_path

VECTOR_FORMAT = "pdf"
"""Saved beside each PNG."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, vector: bool = True) -> list[Path]:
    """Write ``fig`` to ``path`` (its suffix picks the format) and, with ``vector``, a PDF beside it.

    Returns the paths written. Each file is written atomically; the PDF carries no creation date, so the same
    figure gives the same bytes.
    """
    import matplotlib

    path = Path(path)
    targets = [path]
    if vector and path.suffix.lower() != f".{VECTOR_FORMAT}":
        targets.append(path.with_suffix(f".{VECTOR_FORMAT}"))
    for target in targets:
        fmt = target.suffix.lstrip(".").lower() or "png"
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with matplotlib.rc_context({"pdf.fonttype": 42}), atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)
    return targets


def relative_luminance(rgba: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour given as 0..1 floats (alpha ignored)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color_for(rgba: Sequence[float]) -> str:
    """``"white"`` or ``"black"``, whichever contrasts more with a cell of colour ``rgba`` (WCAG contrast ratio)."""
    luminance = relative_luminance(rgba)
    against_white = 1.05 / (luminance + 0.05)
    against_black = (luminance + 0.05) / 0.05
    return "white" if against_white > against_black else "black"


def annotate_cells(ax, image, matrix: Sequence[Sequence[float]], fmt: str = "{:+.1f}", fontsize: float = 6) -> list:
    """Write each finite value of ``matrix`` on its cell of ``image`` (an ``imshow``), white on dark, black on light.

    Returns the text objects (row by row, NaN cells left out).
    """
    import math

    texts = []
    for i, line in enumerate(matrix):
        for j, value in enumerate(line):
            if value is None or math.isnan(value):
                continue
            color = text_color_for(image.cmap(image.norm(value)))
            texts.append(ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize, color=color))
    return texts


def language_bars(
    languages: Sequence[str],
    series: dict[str, Sequence[float]],
    metric: str,
    title: str,
    path: str | Path,
    *,
    errors: dict[str, Sequence[float | None]] | None = None,
    value_labels: bool = True,
    zoom: bool = False,
    note: str | None = None,
) -> list[Path]:
    """Grouped bars: one group per language, one bar per series (e.g. baseline and DLFA).

    ``errors``: per series, an error bar per bar (e.g. the standard deviation over seeds; None for none).
    ``value_labels``: print each bar's value on it. ``zoom``: start the y axis near the smallest value instead
    of at 0, so that differences of a few points show (the axis then says it does not start at 0).
    ``note``: a line under the plot (e.g. "one seed: the difference is not separated from seed noise").
    Returns the files written (``path`` and a PDF beside it).
    """
    import math

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(languages) + 2), 4))
    width = 0.8 / max(len(series), 1)
    lows, highs = [], []
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(languages))]
        yerr = None
        if errors and errors.get(name) is not None:
            yerr = [0.0 if e is None or not math.isfinite(e) else e for e in errors[name]]
        ax.bar(positions, values, width=width, label=name, yerr=yerr, capsize=2 if yerr else 0)
        spread = yerr or [0.0] * len(values)
        lows += [v - e for v, e in zip(values, spread)]
        highs += [v + e for v, e in zip(values, spread)]
        if value_labels:  # above the error bar, so that the whisker never crosses the number
            for x, v, e in zip(positions, values, spread):
                ax.annotate(f"{v:.1f}", xy=(x, v + e), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6)
    if zoom and lows:
        low, high = min(lows), max(highs)
        margin = max((high - low) * 0.15, 0.5)
        ax.set_ylim(max(0.0, low - margin), high + margin)
        if low - margin > 0:
            metric = f"{metric} (axis does not start at 0)"
    # long names (e.g. "avg of 6 targets (en excluded)") wrap instead of running into their neighbours
    ax.set_xticks(range(len(languages)), [textwrap.fill(str(name), 14) for name in languages])
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside: clear of wrapped names
    ax.grid(axis="y", alpha=0.3)
    if note:
        # under the (up to three lines of) language names, in points so that it never overlaps them
        ax.annotate(note, xy=(0.5, 0.0), xycoords="axes fraction", xytext=(0, -52), textcoords="offset points",
                    ha="center", va="top", fontsize=8, annotation_clip=False)
    written = save_figure(fig, path)
    plt.close(fig)
    return written
