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
