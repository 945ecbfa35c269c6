"""Honest evaluation: a model is never scored on its training file or on a translation of it.

XNLI and PAWS-X dev (and test) files are translations of each other, so a model trained on the English dev
file has seen the content of every other language's dev file. Scoring on those is an error unless the user
explicitly allows it, and then every such score is marked as leaky in the report.
"""

from __future__ import annotations

from pathlib import Path

from dlfa.errors import DlfaInputError
from dlfa.tasks.base import Task


def leaky_languages(
    task: Task,
    data_dir: str | Path,
    train_language: str,
    train_split: str,
    languages: list[str],
    eval_split: str,
) -> list[str]:
    """The target languages whose evaluation files are the training file or its translations."""
    train_files = {p.resolve() for p in task.files(data_dir, train_language, train_split)}
    leaky = []
    for lang in languages:
        eval_files = {p.resolve() for p in task.files(data_dir, lang, eval_split)}
        same_file = bool(eval_files & train_files)
        translation = eval_split == train_split and eval_split in task.parallel_splits
        if same_file or translation:
            leaky.append(lang)
    return leaky


def check_honest_evaluation(
    task: Task,
    data_dir: str | Path,
    train_language: str,
    train_split: str,
    languages: list[str],
    eval_split: str,
    allow_leaky: bool,
) -> list[str]:
    """Raise for leaky evaluations unless allowed; return the leaky languages (to mark in reports)."""
    leaky = leaky_languages(task, data_dir, train_language, train_split, languages, eval_split)
    if leaky and not allow_leaky:
        raise DlfaInputError(
            f"{task.name} {eval_split} files for {', '.join(leaky)} are the training file "
            f"({train_language} {train_split}) or translations of it; scoring on them leaks the training data "
            "(pass --allow-leaky-evaluation to do it anyway; the report will mark those scores)",
            option="--languages",
        )
    return leaky
