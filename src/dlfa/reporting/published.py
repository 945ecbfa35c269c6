"""Published numbers kept as data, so that a report can print them beside ours.

Chen et al. (2022), "Feature Aggregation in Zero-Shot Cross-Lingual Transfer Using Multilingual BERT",
Table 1: mBERT (bert-base-multilingual-cased) fine-tuned on English, the primary metric averaged over the
XTREME languages of each task (XNLI and PAWS-X accuracy, PAN-X and UD-POS F1). Row "baseline" reads the
last layer only; row "D_x" fuses the last layer with layer x.

These are single numbers from the paper (no spread was published); the paper's data versions (e.g. UD v2.5)
and language sets differ from what a local run may use, so differences of a few tenths are expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

MBERT_MODEL = "bert-base-multilingual-cased"
TASKS = ("xnli", "pawsx", "panx", "udpos")

_BASELINE = {"xnli": 65.40, "pawsx": 81.94, "panx": 62.17, "udpos": 70.28}
_DLFA = {
    "xnli": (65.85, 66.15, 66.00, 66.14, 65.42, 66.75, 66.20, 66.90, 66.57, 66.55, 66.91),
    "pawsx": (82.50, 83.04, 83.81, 82.75, 82.44, 84.37, 83.48, 82.91, 84.24, 84.33, 83.04),
    "panx": (61.73, 61.34, 61.88, 62.28, 61.66, 61.84, 62.63, 63.34, 62.43, 62.76, 62.27),
    "udpos": (71.18, 71.38, 71.21, 71.26, 71.08, 71.29, 71.52, 71.36, 71.58, 71.81, 71.53),
}


def _build() -> Mapping[str, Mapping[str, float]]:
    rows: dict[str, dict[str, float]] = {"baseline": dict(_BASELINE)}
    for layer in range(1, 12):
        rows[f"D_{layer}"] = {task: values[layer - 1] for task, values in _DLFA.items()}
    return MappingProxyType({row: MappingProxyType(values) for row, values in rows.items()})


#: ``PUBLISHED["mbert"][row][task]``: the paper's Table 1, rows "baseline" and "D_1".."D_11".
PUBLISHED: Mapping[str, Mapping[str, Mapping[str, float]]] = MappingProxyType({"mbert": _build()})
SOURCES = MappingProxyType({"mbert": "Chen et al. (2022), Table 1 (mBERT, average over XTREME languages)"})


def is_mbert(model: str) -> bool:
    """True for the model the paper used, however it was named (hub id, folder path ending in its name)."""
    return model.rstrip("/").split("/")[-1] == MBERT_MODEL


def published_value(source: str, row: str, task: str) -> float | None:
    """The paper's number for a row label (``baseline``/``D_x``) and task, or None when it has none."""
    return PUBLISHED.get(source, {}).get(row, {}).get(task)
