"""Verifiable tasks: problems, reward functions and (for the synthetic ones) training completions."""

from __future__ import annotations

from respec.errors import ConfigError
from respec.world.tasks.arithmetic import ArithmeticTask
from respec.world.tasks.base import ANSWER_PREFIX, Problem, Score, SyntheticTask, Task, final_answer
from respec.world.tasks.countdown import CountdownTask
from respec.world.tasks.jsonl import JsonlTask

TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "jsonl": JsonlTask}

__all__ = [
    "ANSWER_PREFIX",
    "TASKS",
    "ArithmeticTask",
    "CountdownTask",
    "JsonlTask",
    "Problem",
    "Score",
    "SyntheticTask",
    "Task",
    "final_answer",
    "get_task",
]


def get_task(name: str, **kwargs) -> Task:
    """Return the task called `name` built with `kwargs` (jsonl needs path=...; its file is read now).

    Raises ConfigError for an unknown name or option, DataError for a bad jsonl file.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    try:
        task = TASKS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for task {name!r}: {e}") from None
    if isinstance(task, JsonlTask):
        task.all_problems  # noqa: B018  (fail at start-up, not at the first rollout)
    return task
