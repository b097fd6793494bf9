"""Verifiable tasks: problems, reward functions and (for the synthetic ones) training completions."""

from __future__ import annotations

from respec.errors import ConfigError
from respec.world.tasks.arithmetic import ArithmeticTask
from respec.world.tasks.base import ANSWER_PREFIX, EnvTask, Problem, Score, SyntheticTask, Task, final_answer
from respec.world.tasks.chainsum import ChainSumTask
from respec.world.tasks.countdown import CountdownTask
from respec.world.tasks.jsonl import JsonlTask
from respec.world.tasks.probe import ProbeTask
from respec.world.tasks.redraw import RedrawTask

TASKS = {"arithmetic": ArithmeticTask, "chainsum": ChainSumTask, "countdown": CountdownTask, "jsonl": JsonlTask,
         "probe": ProbeTask, "redraw": RedrawTask}

__all__ = [
    "ANSWER_PREFIX",
    "TASKS",
    "ArithmeticTask",
    "ChainSumTask",
    "CountdownTask",
    "EnvTask",
    "JsonlTask",
    "ProbeTask",
    "RedrawTask",
    "Problem",
    "Score",
    "SyntheticTask",
    "Task",
    "DEFAULT_TASK",
    "final_answer",
    "get_task",
    "task_budget",
]

DEFAULT_TASK = "probe"  # the embedded world's task: what commands train and measure when given none
DEFAULT_BUDGET = 96  # new tokens per completion of a task that names no budget of its own


def task_budget(name: str) -> int:
    """Return the completion budget (new tokens) that rollouts and evaluations of task `name` use by default: the
    task class's `max_new_tokens`, else DEFAULT_BUDGET. Raises ConfigError for an unknown name."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return getattr(TASKS[name], "max_new_tokens", DEFAULT_BUDGET)


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
