"""The task protocol: problems with a reference answer, and a scorer that turns a completion into a reward.

Every completion ends with a final line ``Answer: <value>``; scorers read the text after
the LAST ``Answer:`` so that a model which restates or corrects itself is judged on what
it finally says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from respec.errors import ConfigError

ANSWER_PREFIX = "Answer:"


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text the policy continues, e.g. "Q: 47+385=?\n"
    answer: str  # the reference answer (for countdown: one expression that reaches the target)
    meta: dict = field(default_factory=dict)  # task-specific facts (operands, numbers, target, ...)


@dataclass(frozen=True)
class Score:
    reward: float  # in [0, 1]
    parsed: str | None  # what the scorer read as the final answer, None if nothing was found
    reason: str  # one short phrase: "correct", "wrong value 431", "no Answer: line", ...


@runtime_checkable
class Task(Protocol):
    """Anything with deterministic problems and a scorer that never raises."""

    name: str

    def problems(self, n: int, seed: int) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> Score: ...


@runtime_checkable
class SyntheticTask(Task, Protocol):
    """A generated task that can also write training completions in several solution styles."""

    styles: tuple[str, ...]

    def sft_completion(
        self, problem: Problem, rng: random.Random, style: str | None = None
    ) -> tuple[str, bool]: ...


@runtime_checkable
class EnvTask(Task, Protocol):
    """A multi-turn task: after each policy turn that ends on eos, its environment may answer with an observation
    (text appended to the transcript), and the policy goes on. `score` reads the whole transcript, observations
    included, and must recompute them (a policy that writes its own scores 0)."""

    def nonce(self, seed: int, row: int) -> int:
        """Return the environment's per-row randomness of rollout row `row` under `seed`."""
        ...

    def env_step(self, problem: Problem, transcript: str, nonce: int) -> str | None:
        """Return the observation after `transcript` (the completion so far), or None: the row ends."""
        ...

    def segments(self, transcript: str) -> list[tuple[str, bool]]:
        """Return the transcript as (text, is_observation) pieces in order (policy turns between observations)."""
        ...


def final_answer(completion: str) -> str | None:
    """Return the stripped text after the last ``Answer:`` up to the end of its line, or None."""
    at = completion.rfind(ANSWER_PREFIX)
    if at < 0:
        return None
    rest = completion[at + len(ANSWER_PREFIX) :]
    return rest.split("\n", 1)[0].strip()


def check_style_mix(task: str, style_weights: tuple[float, ...], direct_accuracy: float,
                    styles: tuple[str, ...] = ("worked", "direct", "sloppy")) -> None:
    """Raises ConfigError unless style_weights are one non-negative weight per style with a positive sum and
    direct_accuracy is a probability."""
    if len(style_weights) != len(styles) or min(style_weights) < 0 or sum(style_weights) <= 0:
        raise ConfigError(
            f"{task} style_weights must be {len(styles)} non-negative weights ({', '.join(styles)}) with a "
            f"positive sum, got {style_weights}"
        )
    if not 0.0 <= direct_accuracy <= 1.0:
        raise ConfigError(f"{task} direct_accuracy must be in [0, 1], got {direct_accuracy}")


def pick_style(styles: tuple[str, ...], weights: tuple[float, ...], rng: random.Random) -> str:
    """Return one style name drawn with the given weights."""
    return rng.choices(styles, weights=weights, k=1)[0]


def resolve_style(task, style: str | None, rng: random.Random) -> str:
    """Return `style`, or one drawn from the task's `style_weights` when None; ConfigError for an unknown one."""
    if style is None:
        style = pick_style(task.styles, task.style_weights, rng)
    if style not in task.styles:
        raise ConfigError(f"unknown {task.name} style {style!r}; choose one of {', '.join(task.styles)}")
    return style


def clip(text: str, limit: int = 24) -> str:
    """Return repr(text) shortened to about `limit` characters, for reasons that quote user text."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
