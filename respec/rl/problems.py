"""The problem stream of an RL run: the training problems in a deterministic order, held-out prompts removed.

A pass (epoch) over the task's problems is drawn from the run's seed and the pass number, so the stream is a
function of (seed, epoch, cursor): `state_dict()` is those two numbers, and a resumed run continues it exactly.
"""

from __future__ import annotations

from respec.errors import DataError
from respec.world.tasks import Problem, Task


class ProblemStream:
    """The training problems of one run: `next(n)` takes the next n, `state_dict()` is the data position."""

    def __init__(self, task: Task, held_out: set[str], seed: int, epoch_problems: int):
        self.task, self.held_out, self.seed, self.epoch_problems = task, held_out, seed, epoch_problems
        self.epoch, self.cursor = 0, 0  # pass over the problems, index in that pass's order
        self._pool: tuple[int, list[Problem]] | None = None

    def next(self, n: int) -> list[Problem]:
        """Returns the next n training problems, advancing the data position (into the next pass if need be)."""
        out: list[Problem] = []
        while len(out) < n:
            pool = self.pool()
            if self.cursor >= len(pool):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            take = pool[self.cursor: self.cursor + n - len(out)]
            self.cursor += len(take)
            out.extend(take)
        return out

    def pool(self) -> list[Problem]:
        """Returns the training problems of the current pass, in its order, held-out prompts removed."""
        if self._pool is None or self._pool[0] != self.epoch:
            all_problems = getattr(self.task, "all_problems", None)  # a file: one pass over all of it
            size = len(all_problems) if all_problems is not None else self.epoch_problems
            seed = self.seed * 1_000_003 + self.epoch
            pool = [p for p in self.task.problems(size, seed=seed) if p.prompt not in self.held_out]
            if not pool:
                raise DataError(f"every problem of {getattr(self.task, 'path', self.task.name)} is held out for "
                                "evaluation: lower data.eval_problems or give data.eval_path")
            self._pool = (self.epoch, pool)
        return self._pool[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
