"""The embedded default, resolved: the policy and drafter directories a command uses when the user names none
(built on first use, then reused from the artifact cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from respec.world.tasks import DEFAULT_TASK


def resolve_models(policy: str | Path | None = None, drafter: str | Path | None = None,
                   task: str = DEFAULT_TASK, log: Callable[[str], None] | None = None,
                   threads: int | None = 1) -> tuple[Path, Path]:
    """Returns (policy, drafter) directories: the given ones, or the embedded default policy for `task` and its
    distilled drafter, built or reused from the cache. `log` receives progress lines; `threads` are the torch
    CPU threads of a policy build (None: every core; 1 suits a shared machine)."""
    from respec.world.distill import build_drafter
    from respec.world.pretrain import PretrainConfig, pretrain

    policy_dir = Path(policy) if policy else pretrain(PretrainConfig.for_task(task, num_threads=threads),
                                                                   log=log)
    drafter_dir = Path(drafter) if drafter else build_drafter(policy_dir, task=task, log=log)
    return policy_dir, drafter_dir
