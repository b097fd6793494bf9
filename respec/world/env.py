"""Environment turns in token ids: a multi-turn task's environment (`EnvTask.env_step`, text) as the callable that
`Engine.generate(env=...)` calls, and transcripts encoded turn by turn as rollouts produce them.

A rollout encodes each observation on its own and the policy ends each turn with eos, so pretraining must encode a
transcript the same way (`encode_transcript`): encoded whole, a BPE merge across a turn's edge would give the
policy token sequences it never meets at generation.
"""

from __future__ import annotations

from pathlib import Path

from respec.world.tasks import TASKS, EnvTask, Problem, get_task


class TaskEnv:
    """`env(row, token_ids) -> observation ids | None` for rows of `problems` (row r: problem r, nonce
    task.nonce(seed, r)); plain data, so it pickles to rollout workers."""

    def __init__(self, task: EnvTask, problems: list[Problem], tokenizer, seed: int):
        self.task, self.problems, self.tokenizer, self.seed = task, problems, tokenizer, seed

    def __call__(self, row: int, token_ids: list[int]) -> list[int] | None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        problem = self.problems[row]
        obs = self.task.env_step(problem, text, self.task.nonce(self.seed, row))
        return None if obs is None else self.tokenizer.encode(obs, add_special_tokens=False)

    def rows(self, start: int, stop: int) -> TaskEnv:
        """Returns the environment of rows start..stop-1 as rows 0.. of a generate call of their own (their nonces
        those of rows 0.. under the same seed)."""
        return TaskEnv(self.task, self.problems[start:stop], self.tokenizer, self.seed)


def is_env_task(task) -> bool:
    """Return whether `task` has an environment (multi-turn rollouts)."""
    return isinstance(task, EnvTask)


def encode_transcript(tokenizer, task: EnvTask, transcript: str) -> tuple[list[int], list[bool]]:
    """Return (ids, generated) of a whole transcript as a rollout holds it: each piece encoded on its own, eos after
    every policy turn (a tool call's end and the last turn's); generated is False at observation ids."""
    ids, generated = [], []
    eos = tokenizer.eos_token_id
    for text, observed in task.segments(transcript):
        piece = tokenizer.encode(text, add_special_tokens=False) + ([] if observed else [eos])
        ids += piece
        generated += [not observed] * len(piece)
    return ids, generated


def task_env(policy_dir: str | Path, task: str, n: int, seed: int, env_seed: int, samples: int = 1) -> TaskEnv | None:
    """Returns the environment of the rows of `task_prompts(policy_dir, task, n, seed)`, each repeated `samples`
    times in a row (nonces from env_seed), or None for a task without one."""
    env_task = get_task(task) if task in TASKS else None
    if not is_env_task(env_task):
        return None
    from respec.world.tokenizer import load_tokenizer

    problems = [p for p in env_task.problems(n, seed) for _ in range(samples)]
    return TaskEnv(env_task, problems, load_tokenizer(policy_dir), env_seed)
