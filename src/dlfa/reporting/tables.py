"""Plain-text tables (Markdown, which also reads well in a terminal)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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


def average_label(languages: Iterable[str], train_language: str = "en") -> str:
    """What an average over ``languages`` contains, in words: ``avg of 21 incl. en``, ``avg of 6 targets (en
    excluded)``. Always computed from the languages actually averaged, never assumed."""
    langs = list(dict.fromkeys(languages))
    if train_language in langs:
        return f"avg of {len(langs)} incl. {train_language}"
    return f"avg of {len(langs)} target{'s' if len(langs) != 1 else ''} ({train_language} excluded)"


def comparison_table(
    baseline: dict[str, dict[str, float]],
    candidate: dict[str, dict[str, float]],
    metric: str,
    candidate_name: str = "DLFA",
    train_language: str = "en",
) -> tuple[str, list[dict]]:
    """Per-language baseline vs candidate with the difference, plus the average row.

    The average row's first cell says what it averages (``avg of 6 targets (en excluded)``); its record keeps
    ``language: "average"`` and carries that text as ``label`` and the languages as ``languages``.
    """
    missing = sorted(set(baseline) ^ set(candidate))
    if missing:
        raise ValueError(f"baseline and candidate were scored on different languages: {', '.join(missing)}")
    records = []
    for lang in baseline:
        b, c = baseline[lang][metric], candidate[lang][metric]
        records.append({"language": lang, "baseline": b, candidate_name: c, "delta": c - b})
    if records:
        langs = [r["language"] for r in records]
        mean_b = sum(r["baseline"] for r in records) / len(records)
        mean_c = sum(r[candidate_name] for r in records) / len(records)
        records.append({"language": "average", "baseline": mean_b, candidate_name: mean_c, "delta": mean_c - mean_b,
                        "label": average_label(langs, train_language), "languages": langs})
    rows = [
        [r.get("label", r["language"]), format_score(r["baseline"]), format_score(r[candidate_name]),
         format_score(r["delta"], signed=True)]
        for r in records
    ]
    return markdown_table(["language", f"baseline {metric}", f"{candidate_name} {metric}", "delta"], rows), records
