"""Plain-text tables (Markdown, which also reads well in a terminal)."""

from __future__ import annotations

from collections.abc import Sequence


def format_score(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """A Markdown table padded so that its columns line up in plain text as well."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [c.rjust(w) if i >= align_right_from else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i >= align_right_from else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |"] + [line(r) for r in cells[1:]])


def comparison_table(
    baseline: dict[str, dict[str, float]],
    candidate: dict[str, dict[str, float]],
    metric: str,
    candidate_name: str = "DLFA",
) -> tuple[str, list[dict]]:
    """Per-language baseline vs candidate with the difference, plus the average row."""
    records = []
    for lang in baseline:
        b, c = baseline[lang][metric], candidate[lang][metric]
        records.append({"language": lang, "baseline": b, candidate_name: c, "delta": c - b})
    if records:
        mean_b = sum(r["baseline"] for r in records) / len(records)
        mean_c = sum(r[candidate_name] for r in records) / len(records)
        records.append({"language": "average", "baseline": mean_b, candidate_name: mean_c, "delta": mean_c - mean_b})
    rows = [
        [r["language"], format_score(r["baseline"]), format_score(r[candidate_name]), format_score(r["delta"], signed=True)]
        for r in records
    ]
    return markdown_table(["language", f"baseline {metric}", f"{candidate_name} {metric}", "delta"], rows), records
