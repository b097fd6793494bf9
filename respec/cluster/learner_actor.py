"""The online learner as a Ray actor on a CPU of its own, and the driver's handle on it.

The actor runs `Learner(mode="async")` (its thread trains whenever the scheduler's budget allows) and keeps the
newest publication. The driver's `RemoteLearner` has the interface the trainer uses (`submit`, `metrics`,
`grant`, `update_window`, `paused`, `wait_idle`, `state_dict` / `load_state_dict`, `close`, `version`,
`trained_through`, `alive`, `draft_ids`, `log`); a listener thread long-polls the actor for publications and
hands each to `publish` (the trainer's: its own engine and every rollout worker), so the workers swap a new
drafter in between decode steps while a rollout runs.

Faults. If the actor's process dies, every call fails: the handle says so once, reports `learner/alive` 0 and
drops the step's submissions, and rollouts go on with the last published drafter. Ray restarts the actor (up to
`MAX_RESTARTS`) with its first drafter; the handle then loads the learner state of the run's last checkpoint
into it (its last saved state) and goes on from there.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from respec.engine.drafter import Eagle3Drafter
from respec.errors import ConfigError
from respec.rl.config import LearnerConfig
from respec.rl.learner import Learner, Publish, StepRollouts

MAX_RESTARTS = 3
POLL_S = 1.0  # the listener's long-poll; also how soon `close` ends it


class LearnerActor:
    """The body of the Ray actor: a `Learner` with its thread, and the newest publication for the driver."""

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, seed: int, threads: int):
        torch.set_num_threads(threads)
        self._cond = threading.Condition()
        self._published: tuple[int, int, Eagle3Drafter] | None = None  # (version, trained_through, drafter)
        self._logs: list[str] = []
        self.learner = Learner(replace(config, mode="async"), drafter, self._publish, seed=seed, log=self._log)

    def _publish(self, drafter: Eagle3Drafter, version: int) -> None:
        with self._cond:
            self._published = (version, self.learner.trained_through, drafter)
            self._cond.notify_all()

    def _log(self, message: str) -> None:
        with self._cond:
            self._logs.append(message)
            self._cond.notify_all()

    @ray.method(concurrency_group="poll")
    def next_publication(self, after: int, timeout: float) -> tuple[tuple | None, list[str]]:
        """Returns (the newest publication if its version is above `after`, else None; log lines since the last
        call), waiting up to `timeout` seconds for either."""
        with self._cond:
            self._cond.wait_for(lambda: self._logs or (self._published is not None and self._published[0] > after),
                                timeout)
            logs, self._logs = self._logs, []
            newest = self._published if self._published is not None and self._published[0] > after else None
            return newest, logs

    def submit(self, rollouts: dict) -> None:
        self.learner.submit(StepRollouts(**rollouts))

    def grant(self, steps: int) -> int:
        return self.learner.grant(steps)

    def update_window(self, open_: bool) -> None:
        self.learner.update_window(open_)

    def pause(self) -> int:
        """Sets the budget to 0 and waits for the step in flight; returns the budget left."""
        left = self.learner.grant(0)
        self.learner.scheduler.wait_step()
        return left

    def metrics(self) -> dict:
        return self.learner.metrics()

    @ray.method(max_task_retries=-1)
    def counters(self) -> dict:
        return {"version": self.learner.version, "trained_through": self.learner.trained_through,
                "steps": self.learner.steps}

    def wait_idle(self, timeout: float | None) -> bool:
        return self.learner.wait_idle(timeout)

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    @ray.method(max_task_retries=-1)  # the restore of a restarted actor: sent while it restarts, it waits
    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def close(self) -> None:
        self.learner.close()

    def pid(self) -> int:
        import os

        return os.getpid()


class RemoteLearner:
    """The driver's handle on a `LearnerActor` (see the module docstring)."""

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, publish: Publish, seed: int, threads: int,
                 strategy, log=None):
        self.config, self.publish_fn, self.log = config, publish, log
        cfg = drafter.config
        self.draft_ids = None if cfg.draft_vocab_size == cfg.vocab_size else drafter.draft_ids_in_target()
        self.version, self.trained_through, self.steps = 0, 0, 0
        self.alive = True
        self.restarting: ray.ObjectRef | None = None  # the restore of a restarted actor, in flight
        self.last_state: dict | None = None  # the learner state a restarted actor resumes from
        remote = ray.remote(concurrency_groups={"poll": 1})(LearnerActor)
        self._first = ray.put(drafter)  # a restart re-runs the constructor on it: kept in scope
        self.actor = remote.options(max_restarts=MAX_RESTARTS, max_task_retries=0, num_cpus=1,
                                    scheduling_strategy=strategy).remote(config, self._first, seed, threads)
        self._forward_lock = threading.Lock()
        self._stop = threading.Event()
        try:
            ray.get(self.actor.pid.remote())  # up before the first step
        except RayActorError as e:
            ray.kill(self.actor, no_restart=True)
            raise ConfigError(f"the learner actor did not start ({type(e).__name__}): every machine of the cluster "
                              "needs the same Python environment with respec and torch installed") from None
        self._listener = threading.Thread(target=self._listen, name="respec-learner-listener", daemon=True)
        self._listener.start()

    # -- calls, with the actor's death and restart handled ----------------------------------------------------
    def _call(self, method: str, *args, default=None):
        """Returns the actor method's result; `default` while the actor is dead or restarting."""
        if not self._ready():
            return default
        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except RayActorError as e:
            self._died(e)
            return default

    def _died(self, e: Exception) -> None:
        if self.alive:
            self.alive = False
            self._emit(f"learner actor died ({type(e).__name__}); rollouts go on with drafter version {self.version} "
                       "while it restarts")
        if self.restarting is None:
            self.restarting = self.actor.load_state_dict.remote(self.last_state) if self.last_state is not None \
                else self.actor.counters.remote()

    def _ready(self) -> bool:
        """Whether the actor is alive (a restarted one once it has loaded its last state)."""
        if self.alive:
            return True
        if self.restarting is None:
            return False
        ready, _ = ray.wait([self.restarting], timeout=0)
        if not ready:
            return False
        try:
            ray.get(self.restarting)
        except RayActorError as e:  # out of restarts, or it died again: ask again (fails at once if gone for good)
            self.restarting = None
            self._died(e)
            return False
        self.restarting, self.alive = None, True
        self._emit(f"learner actor restarted from its last saved state (drafter version {self.version})")
        return True

    def _emit(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    # -- the trainer's side (Learner's interface) -------------------------------------------------------------
    def submit(self, rollouts: StepRollouts) -> None:
        self._call("submit", {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(rollouts).items()})

    def grant(self, steps: int) -> int:
        return self._call("grant", steps, default=0)

    def update_window(self, open_: bool) -> None:
        self._call("update_window", open_)

    def metrics(self) -> dict:
        out = self._call("metrics")
        if out is None:
            return {"learner/steps": self.steps, "learner/version": self.version, "learner/alive": 0}
        self.steps = out["learner/steps"]
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._call("wait_idle", timeout, default=True)

    def paused(self):
        return _RemotePaused(self)

    def state_dict(self) -> dict | None:
        """Returns the actor's learner state; while it restarts, the state it restarts from (None before the
        first checkpoint: a resumed run then starts the learner afresh on the checkpoint's drafter)."""
        state = self._call("state_dict")
        if state is not None:
            self.last_state = state
        return self.last_state

    def load_state_dict(self, state: dict) -> None:
        self.last_state = state
        self._call("load_state_dict", state)
        c = state["counters"]
        self.version, self.trained_through, self.steps = c["version"], c["trained_through"], c["steps"]

    def close(self) -> None:
        self._stop.set()
        self._call("close")
        self._listener.join(POLL_S * 5)
        ray.kill(self.actor, no_restart=True)

    # -- publications -----------------------------------------------------------------------------------------
    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                newest, logs = ray.get(self.actor.next_publication.remote(self.version, POLL_S), timeout=POLL_S * 10)
            except (RayActorError, GetTimeoutError):
                self._stop.wait(POLL_S)  # dead or restarting: the calls of the trainer's thread notice it
                continue
            for message in logs:
                self._emit(message)
            if newest is not None:
                self._forward(newest)

    def forward_latest(self) -> None:
        """Forwards the actor's newest publication now, if it is newer than the last forwarded."""
        try:
            newest, _ = ray.get(self.actor.next_publication.remote(self.version, 0.0))
        except RayActorError:
            return
        if newest is not None:
            self._forward(newest)

    def _forward(self, publication: tuple) -> None:
        version, trained_through, drafter = publication
        with self._forward_lock:
            if version <= self.version:
                return
            self.publish_fn(drafter, version)
            self.version, self.trained_through = version, trained_through


class _RemotePaused:
    """`RemoteLearner.paused()`: the actor's budget 0 and its step in flight ended, its newest publication
    forwarded (so the engine's drafter and the learner's state are of one moment); the budget given back after."""

    def __init__(self, learner: RemoteLearner):
        self.learner, self.left = learner, 0

    def __enter__(self) -> None:
        self.left = self.learner._call("pause", default=0)
        if self.learner.alive:
            self.learner.forward_latest()

    def __exit__(self, *exc) -> None:
        self.learner._call("grant", self.left)
