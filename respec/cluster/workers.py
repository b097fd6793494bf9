"""Rollout workers: Ray actors each owning a slot engine, and the pool that shards a step's rollout over them.

Sharding. A step's P x G prompts are split by whole groups into one contiguous shard per live worker; a shard
starting at row a generates with `first_stream=a`, so every row draws from the stream it would draw from in one
engine (`Engine.generate`), and the merged result equals the local backend's up to floating-point differences
between batch shapes. Sequences come back in row order; step stats are concatenated shard by shard.

Weights. A new policy goes out once per step: `transport.send(state)` (one `ray.put`) and the handle to every
worker, whose `load` copies it into its engine before its next rollout (a worker's default calls run in the
order they are sent). A published drafter goes out the same way to `set_drafter`, which runs in a concurrency
group of its own, beside a rollout in flight: the engine swaps it in between two decode steps (SD is exact with
any drafter). `WeightTransport` is the one seam for another transport (an NCCL broadcast between GPU workers).

Tuner. In adaptive mode every worker's engine learns its own acceptance evidence from its shards; the run's
checkpoint holds one tuner state per worker, and a resumed run gives worker i state i.

Faults. A worker whose process dies mid-rollout fails its call: its shard goes back to the queue and runs on the
next free live worker, so the step completes with every row exactly once. Ray restarts the dead actor (up to
`MAX_RESTARTS`); the pool sends it the current policy and drafter and keeps it out of rollouts until that load has
returned. A worker out of restarts is dropped; with none left the step fails with one line.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import ray
import torch
from ray.exceptions import RayActorError

from respec.engine.generate import Engine, GenerationResult, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError, TrainingError

MAX_RESTARTS = 3  # restarts of one rollout worker's process before the pool drops it


def shard_edges(rows: int, group_size: int, workers: int) -> list[tuple[int, int]]:
    """Returns the (start, end) rows of each shard: `rows` in whole groups split as evenly as groups allow over at
    most `workers` shards (at least one), contiguous and in order."""
    groups = rows // group_size
    n = max(1, min(workers, groups))
    edges = [round(i * groups / n) * group_size for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


class WeightTransport(Protocol):
    """Sends one object (a state dict, a drafter) to every worker: `send` is called once per object and returns
    a handle that each worker's call receives as the object itself."""

    def send(self, obj: Any) -> Any: ...


class ObjectStoreTransport:
    """Through Ray's object store: one `ray.put` per object; Ray resolves the reference in each worker's call."""

    def send(self, obj: Any) -> ray.ObjectRef:
        return ray.put(obj)


class RolloutWorker:
    """One slot engine in its own process with its own torch thread count (the body of a Ray actor)."""

    def __init__(self, target: torch.nn.Module, drafter: torch.nn.Module | None, threads: int, compile: str,
                 max_running: int):
        torch.set_num_threads(threads)
        self.engine = Engine(target, drafter, compile=compile, max_running=max_running)
        self.policy_version = 0
        self.decode_steps = 0  # of the rollout in flight (or the last one)
        self.generating = False

    @ray.method(max_task_retries=-1)  # idempotent: sent to a restarting worker, it waits for the restart
    def load(self, policy_version: int, state: dict | None, drafter: torch.nn.Module | None,
             drafter_version: int | None) -> tuple[int, int | None]:
        """Loads the given policy weights and drafter (None, or older than its own: keeps its own); returns the
        (policy, drafter) versions it holds. Loads sent to a restarting worker may arrive out of order."""
        if state is not None and policy_version > self.policy_version:
            self.engine.load_weights(state)
            self.policy_version = policy_version
        if drafter is not None:
            self._swap(drafter, drafter_version)
        return self.policy_version, self.engine.drafter_version

    def tuner_state(self) -> dict | None:
        """Returns the adaptive tuner's state (None before the first adaptive rollout)."""
        tuner = self.engine.tuner
        return tuner.state_dict() if tuner is not None and hasattr(tuner, "state_dict") else None

    @ray.method(max_task_retries=-1)
    def load_tuner_state(self, state: dict, k_max: int) -> None:
        """Gives the engine an adaptive tuner with `state` (before its next rollout)."""
        self.engine.default_tuner(k_max).load_state_dict(state)

    @ray.method(concurrency_group="control", max_task_retries=-1)
    def set_drafter(self, drafter: torch.nn.Module, version: int | None) -> None:
        """Swaps in a published drafter from the next decode step on, unless the engine has a newer one."""
        self._swap(drafter, version)

    def _swap(self, drafter: torch.nn.Module, version: int | None) -> None:
        if version is not None and self.engine.drafter_version is not None and version <= self.engine.drafter_version:
            return
        self.engine.set_drafter(drafter, version, keep_evidence=1.0)

    def generate(self, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig,
                 first_stream: int, env=None) -> tuple[GenerationResult, float]:
        """Returns the engine's result for one shard and the seconds it took inside this process (`env` is called
        with the rows' streams, first_stream + i, so a shard's turns are the whole batch's)."""
        t0 = time.perf_counter()
        self.decode_steps, self.generating = 0, True
        try:
            result = self.engine.generate(prompts, params, spec, on_step=self._count, first_stream=first_stream,
                                          env=env)
        finally:
            self.generating = False
        return result, time.perf_counter() - t0

    def _count(self, _stats) -> None:
        self.decode_steps += 1

    @ray.method(concurrency_group="control")
    def status(self) -> dict:
        """Returns the process id and its niceness, whether a rollout is in flight and its decode steps so far, and
        the versions."""
        return {"pid": os.getpid(), "niceness": os.nice(0), "generating": self.generating, "decode_steps": self.decode_steps,
                "policy_version": self.policy_version, "drafter_version": self.engine.drafter_version}


class WorkerPool:
    """The rollout workers of one run, with `Engine.generate`'s signature for the trainer's rollout role."""

    def __init__(self, engine: Engine, workers: int, group_size: int, threads: int, gpus: float, compile: str,
                 cluster, transport: WeightTransport | None = None):
        self.group_size = group_size
        self.transport = transport or ObjectStoreTransport()
        self.policy: tuple[int, Any] = (0, None)  # (version, handle) of the newest weights; None = the first
        self.drafter: tuple[int | None, Any] = (engine.drafter_version, None)
        # set_drafter and status run beside a rollout in flight; the default group keeps load and generate in order.
        remote = ray.remote(concurrency_groups={"control": 1})(RolloutWorker)
        target_ref = ray.put(engine.target)
        drafter_ref = ray.put(engine.drafter) if engine.drafter is not None else None
        self._first = (target_ref, drafter_ref)  # a restart re-runs the constructor on them: kept in scope
        self.workers = [
            remote.options(max_restarts=MAX_RESTARTS, max_task_retries=0, num_cpus=threads, num_gpus=gpus,
                           scheduling_strategy=cluster.strategy(i)).remote(target_ref, drafter_ref, threads, compile,
                                                                          engine.max_running)
            for i in range(workers)]
        self.live = set(range(len(self.workers)))
        self.rejoining: dict[int, ray.ObjectRef] = {}  # restarted workers loading the current weights
        self.overhead_s = 0.0  # the last rollout's wall time beyond its slowest shard's time inside its worker
        self.redispatched = 0  # shards re-run after their worker died (since the pool started)
        try:
            ray.get([w.status.remote() for w in self.workers])  # every worker up before the first step
        except RayActorError as e:
            self.close()
            raise ConfigError(f"the rollout workers did not start ({type(e).__name__}): every machine of the cluster "
                              "needs the same Python environment with respec and torch installed") from None

    # -- the trainer's side ------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig,
                 env=None) -> GenerationResult:
        """Returns the merged result of `prompts` sharded by whole groups over the live workers; `env` (pickled to
        each worker) answers environment turns as in `Engine.generate`."""
        t0 = time.perf_counter()
        self._admit_rejoined(block=not self.live)
        pending = shard_edges(len(prompts), self.group_size, len(self.live))
        running: dict[ray.ObjectRef, tuple[int, tuple[int, int]]] = {}
        done: dict[tuple[int, int], tuple[GenerationResult, float]] = {}
        while pending or running:
            busy = {i for i, _ in running.values()}
            idle = [i for i in sorted(self.live) if i not in busy]
            while pending and idle:
                i, shard = idle.pop(0), pending.pop(0)
                a, b = shard
                running[self.workers[i].generate.remote(prompts[a:b], params, spec, a, env)] = (i, shard)
            if not running:  # every worker died: wait for a restarted one
                self._admit_rejoined(block=True)
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i, shard = running.pop(ref)
                try:
                    done[shard] = ray.get(ref)
                except RayActorError:
                    pending.append(shard)  # re-dispatched to the next free live worker
                    self.redispatched += 1
                    self._lost(i)
            self._admit_rejoined(block=False)
        shards = sorted(done)
        results = [done[s][0] for s in shards]
        self.overhead_s = max(time.perf_counter() - t0 - max(done[s][1] for s in shards), 0.0)
        return GenerationResult([seq for r in results for seq in r.sequences],
                                [st for r in results for st in r.stats], sum(r.prefill_seconds for r in results))

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Sends new policy weights to every worker (one `transport.send`), loaded before its next rollout."""
        handle = self.transport.send(state)
        self.policy = (self.policy[0] + 1, handle)
        for i in self.live | set(self.rejoining):
            self.workers[i].load.remote(self.policy[0], handle, None, None)

    def set_drafter(self, drafter: torch.nn.Module, version: int | None) -> None:
        """Sends a published drafter to every worker (one `transport.send`), swapped in between decode steps."""
        handle = self.transport.send(drafter)
        self.drafter = (version, handle)
        for i in self.live | set(self.rejoining):
            self.workers[i].set_drafter.remote(handle, version)

    def tuner_states(self) -> list[dict | None]:
        """Returns each worker's adaptive tuner state (None: no tuner yet, or the worker is not live)."""
        refs = {i: self.workers[i].tuner_state.remote() for i in sorted(self.live)}
        states: list[dict | None] = [None] * len(self.workers)
        for i, ref in refs.items():
            try:
                states[i] = ray.get(ref)
            except RayActorError:
                pass
        return states

    def load_tuner_states(self, states: list[dict | None], k_max: int) -> None:
        """Gives worker i tuner state i (of a run with as many workers; else the states in turn), loaded before its
        next rollout; None entries leave a worker to start its own."""
        for i, worker in enumerate(self.workers):
            state = states[i % len(states)] if states else None
            if state is not None:
                worker.load_tuner_state.remote(state, k_max)

    def status(self) -> list[dict | None]:
        """Returns each worker's `RolloutWorker.status()`, None for one that does not answer."""
        out = []
        for w in self.workers:
            try:
                out.append(ray.get(w.status.remote(), timeout=30))
            except (RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)

    # -- faults ------------------------------------------------------------------------------------------------
    def _lost(self, i: int) -> None:
        """Takes worker i out of rollouts and has it load the current policy and drafter once Ray restarted it."""
        self.live.discard(i)
        version, handle = self.policy
        drafter_version, drafter = self.drafter
        self.rejoining[i] = self.workers[i].load.remote(version, handle, drafter, drafter_version)

    def _admit_rejoined(self, block: bool) -> None:
        """Admits restarted workers whose load has returned; drops those out of restarts. With `block` and no live
        worker, waits for one (raises TrainingError when none is left)."""
        while self.rejoining:
            refs = {ref: i for i, ref in self.rejoining.items()}
            wait = block and not self.live
            ready, _ = ray.wait(list(refs), num_returns=1 if wait else len(refs), timeout=None if wait else 0)
            for ref in ready:
                i = refs[ref]
                del self.rejoining[i]
                try:
                    policy, drafter = ray.get(ref)
                except RayActorError:
                    continue  # out of restarts: dropped
                if policy < self.policy[0] or (self.drafter[0] or 0) > (drafter or 0):
                    self._lost(i)  # newer weights went out while it restarted: it loads those first
                else:
                    self.live.add(i)
            if not wait or self.live:
                break
        if block and not self.live:
            raise TrainingError(f"every rollout worker died (each restarted up to {MAX_RESTARTS} times); the last "
                                "checkpoint is intact: resume the run with --resume")
