"""The task registry: a plain dict from task name to its :class:`~dlfa.tasks.base.Task`."""

from __future__ import annotations

from dlfa.errors import DlfaInputError
from dlfa.tasks import panx, pawsx, udpos, xnli
from dlfa.tasks.base import Task

TASKS: dict[str, Task] = {task.name: task for task in (udpos.TASK, panx.TASK, xnli.TASK, pawsx.TASK)}


def get_task(name: str, option: str = "--task") -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DlfaInputError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})", option=option) from None


def tasks_table(data_dir: str | None = None) -> str:
    """The tasks as a Markdown table; with ``data_dir``, the languages actually there (per split) instead of XTREME's.

    ``data_dir`` is a task folder (its task is recognised by its file names) or a folder of task folders.
    """
    from pathlib import Path

    from dlfa.reporting.tables import markdown_table
    from dlfa.tasks.base import SPLITS

    folders: dict[str, Path] = {}
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DlfaInputError(f"folder not found: {root}", option="--data-dir")
        for task in TASKS.values():
            for folder in (root, root / task.name):
                if folder.is_dir() and any(task.available_languages(folder, s) for s in SPLITS):
                    folders.setdefault(task.name, folder)
        if not folders:
            raise DlfaInputError(f"no task files in {root} or its task subfolders", option="--data-dir")
    rows = []
    for task in TASKS.values():
        scorer = getattr(task, "default_scorer", None)
        metric = f"{task.primary_metric} ({scorer})" if scorer else task.primary_metric
        row = [task.name, task.head, metric, task.eval_split, str(len(task.labels))]
        if data_dir is None:
            row.append(f"{len(task.languages)} (XTREME): {', '.join(task.languages)}")
        elif task.name in folders:
            folder = folders[task.name]
            present = {s: task.available_languages(folder, s) for s in SPLITS}
            row.append("; ".join(f"{s} {len(langs)}: {', '.join(langs)}" for s, langs in present.items() if langs)
                       + f" ({folder})")
        else:
            row.append("not in this folder")
        rows.append(row)
    headers = ["task", "head", "metric (scorer)", "scored on", "labels", "languages"]
    return markdown_table(headers, rows, align_right_from=4)
