"""What a working run reaches on English dev, per task: the floor below which a selected checkpoint is suspect.

A run keeps the checkpoint with the best English-dev score. When even that score is far below what the task
normally reaches (a short run at a small learning rate that has barely left its initialisation, a diverged run,
a broken data file), every zero-shot number of the run is meaningless, and the report must not present it as a
plain "selected" result. :func:`check_selected_score` says so in one line; the recipe calls it after selection
and ``dlfa report`` marks such runs.

The floors are deliberately low: far under what the shortest sensible run reaches, well above what a model that
learned nothing scores. Where each comes from:

========  ==========  =====  ==========================================================================================
task      metric      floor  reference
========  ==========  =====  ==========================================================================================
udpos     f1          80.0   e5-small (embedded), 300 steps on English-EWT: 93.53 (baseline), 91.52 (D_4, the weakest
                             row), docs/results.md; the shipped demo (120 steps on 320 sentences): 91.42, and 39.77
                             after its first 20 steps. The run that prompted this check: 3.6.
panx      f1          50.0   e5-small, 200 steps: 71.44 (baseline), 59.29 (D_4, the weakest row), docs/results.md.
xnli      accuracy    45.0   no dlfa reference run yet: chance is 33.33 (three balanced classes in dev-en.tsv).
pawsx     accuracy    60.0   no dlfa reference run yet: always answering the majority class scores 56.85 on dev-en.tsv
                             (1,137 of 2,000 pairs are label 0).
========  ==========  =====  ==========================================================================================

Only the primary metric of the four tasks, and only selection on English, have a floor; anything else is not
checked (``None``). This module imports nothing heavy: the CLI and the recipe may call it at any time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class ScoreFloor:
    """The English-dev score below which a task's selected checkpoint is flagged, and where the number comes from."""

    task: str
    metric: str
    floor: float
    reference: str  # what a working run reaches, or the chance level, with its source


SELECTION_FLOORS: Mapping[tuple[str, str], ScoreFloor] = MappingProxyType({
    (f.task, f.metric): f for f in (
        ScoreFloor("udpos", "f1", 80.0, "e5-small reaches 93.5 English-dev F1 after 300 steps, docs/results.md; "
                                        "the demo 91.4 after 120 steps"),
        ScoreFloor("panx", "f1", 50.0, "e5-small reaches 71.4 English-dev F1 after 200 steps, docs/results.md"),
        ScoreFloor("xnli", "accuracy", 45.0, "chance is 33.3 (three balanced classes)"),
        ScoreFloor("pawsx", "accuracy", 60.0, "always answering the majority class scores 56.9 on English dev"),
    )
})

SELECTION_LANGUAGE = "en"


def selection_floor(task: str, metric: str, language: str = SELECTION_LANGUAGE) -> ScoreFloor | None:
    """The floor for a task's metric when selecting on ``language`` (only English has references)."""
    if language != SELECTION_LANGUAGE:
        return None
    return SELECTION_FLOORS.get((task, metric))


def check_selected_score(task_name: str, metric: str, score: float | None,
                         language: str = SELECTION_LANGUAGE) -> str | None:
    """One line of warning when the selected checkpoint's English-dev score is far below the task's floor.

    ``None`` when the score is at or above the floor, or when there is no floor for this task, metric or
    selection language. A score that is not a finite number is always suspect.
    """
    floor = selection_floor(task_name, metric, language)
    if floor is None or score is None:
        return None
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        return (f"{task_name}: the selected checkpoint's {language}-dev {metric} is {score!r}, not a number: "
                "the run is broken and its scores mean nothing")
    if score >= floor.floor:
        return None
    return (f"{task_name}: the selected checkpoint scores only {score:.2f} {language}-dev {metric}, far below the "
            f"{floor.floor:.0f} that a working run exceeds ({floor.reference}); the run is under-trained or "
            "diverged (too few steps, or a learning rate too small or too large), so its zero-shot scores do not "
            "measure the method")
