"""Tasks: what a model is trained and scored on (data and scoring together), one registry.

    from tasks import get_task
    task = get_task("arithmetic")(cfg.task)      # its config checked
    dm = task.datamodule(run_config, None, out)  # its data

`TASK_MODULES` lists one module per task (`tasks/<module>.py`); each registers its `Task` class
with `tasks.base.register`. A new task is a module plus its line here and a
`conf/task/<name>.yaml`.
"""

from __future__ import annotations

import importlib

from bipe.errors import ConfigError
from tasks.base import TASKS, Task, register

TASK_MODULES = ("lm", "arithmetic", "bi_nfa", "scrolls")


def load_all() -> dict[str, type[Task]]:
    """Every task of `TASK_MODULES`, imported and registered (their modules are light)."""
    for module in TASK_MODULES:
        importlib.import_module(f"tasks.{module}")
    return TASKS


def get_task(name: str) -> type[Task]:
    """The task registered as `name`; ConfigError naming `task.name` with the valid ones."""
    tasks = load_all()
    if name not in tasks:
        raise ConfigError(f"task.name={name!r} is unknown; choose one of {', '.join(tasks)}")
    return tasks[name]


def main_metric(name: str) -> str:
    """The headline rate of a task's reports."""
    return get_task(name).main_metric


__all__ = ["TASKS", "TASK_MODULES", "Task", "get_task", "load_all", "main_metric", "register"]
