"""Joining or starting a Ray cluster for one run, and its placement group.

`Cluster(config)` runs before any model loads or any file is written. It checks that Ray is installed and the
address reachable, joins `trainer.ray_address` (or starts a local Ray on this machine, no dashboard; or reuses the
Ray this process already runs), checks that the bundles fit the cluster, and reserves one placement group:
a bundle per rollout worker ({"CPU": rollout.worker_threads, "GPU": rollout.worker_gpus}) and, with an async
learner, a one-CPU bundle for the learner actor, so the learner never shares a core with a rollout worker. The
driver (update, evaluation, checkpoints) stays outside the group, in the process that runs `respec train`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import socket
import time
from collections.abc import Iterator

from respec.errors import ConfigError
from respec.rl.config import TrainConfig

CONNECT_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection in this time is unreachable
PLACEMENT_TIMEOUT_S = 120.0
FREE_WAIT_S = 15.0
# Ray runs its worker processes at niceness 15 by default, so anything else on a machine (a learner thread, another
# job) takes the cores from the rollout workers, which are the run's critical path: a Ray this module starts runs
# them at the driver's niceness. A cluster started with `ray start` needs RAY_worker_niceness=0 in the environment of each `ray start`.
SYSTEM_CONFIG = {"worker_niceness": 0}
_runs = {"open": 0, "started_ray": False}  # runs of this process on Ray; whether one of them started it


def bundles(config: TrainConfig) -> list[dict[str, float]]:
    """Returns the placement group's bundles: one per rollout worker, then the learner actor's (async learner)."""
    r = config.rollout
    worker = {"CPU": float(r.worker_threads), **({"GPU": float(r.worker_gpus)} if r.worker_gpus else {})}
    out = [dict(worker) for _ in range(r.workers)]
    if learner_is_actor(config):
        out.append({"CPU": 1.0})
    return out


def learner_is_actor(config: TrainConfig) -> bool:
    """Whether the run's learner runs as a Ray actor (backend=ray with an async learner)."""
    return config.trainer.backend == "ray" and config.learner.mode == "async"


def check_installed() -> None:
    """Raises ConfigError (one line) when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("trainer.backend=ray needs Ray, which is not installed: pip install 'respec[ray]' "
                          "(or set trainer.backend=local)")


def _check_fits(config: TrainConfig) -> None:
    """Raises ConfigError (one line) when the bundles ask for more CPUs (GPUs) than the cluster has."""
    import ray

    r = config.rollout
    have, free = ray.cluster_resources(), None
    for resource, each in (("CPU", r.worker_threads), ("GPU", r.worker_gpus)):
        asked = sum(b.get(resource, 0.0) for b in bundles(config))
        learner = " + 1 for the learner actor" if learner_is_actor(config) and resource == "CPU" else ""
        what = f"rollout.workers={r.workers} x {each:g} {resource}{learner} = {asked:g} {resource}s"
        if asked > have.get(resource, 0.0):
            raise ConfigError(f"{what}, but the Ray cluster has {have.get(resource, 0.0):g}: lower rollout.workers "
                              "(or rollout.worker_threads), or add machines to the cluster (`ray start --address`)")
        free = free or _free(config)
        if asked > free.get(resource, 0.0):
            raise ConfigError(f"{what}, but only {free.get(resource, 0.0):g} of the cluster's "
                              f"{have.get(resource, 0.0):g} are free (other runs hold the rest)")


def _free(config: TrainConfig) -> dict[str, float]:
    """Returns the cluster's free resources, waiting up to FREE_WAIT_S for those a run just gave back (Ray frees a
    removed placement group's resources shortly after the call)."""
    import ray

    need = bundles(config)
    deadline = time.monotonic() + FREE_WAIT_S
    while True:
        free = ray.available_resources()
        if all(sum(b.get(k, 0.0) for b in need) <= free.get(k, 0.0) for k in ("CPU", "GPU")) or \
                time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        raise ConfigError(f"trainer.ray_address must be HOST:PORT of a Ray head (`ray start --head` prints it), "
                          f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"trainer.ray_address {address}: no Ray head answers there ({e.strerror or e}); start one "
                          "with `ray start --head` or fix the address") from None


def _init(address: str | None) -> bool:
    """Connects this process to Ray (no-op if it already is); returns whether it started or joined one now."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
    else:
        _start_local()
    return True


def _start_local(**resources) -> None:
    """Starts a Ray on this machine (no dashboard, workers at the driver's niceness) with `resources`
    (num_cpus, num_gpus; default: the machine's)."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, _system_config=SYSTEM_CONFIG, **resources)


@contextlib.contextmanager
def time_shared(configs: list[TrainConfig]) -> Iterator[None]:
    """Runs the block on a local Ray with as many CPUs (GPUs) as `configs`' bundles ask together, at least this
    machine's: for runs that each hold a placement group for their whole life but step one at a time (the
    experiment's interleaved configurations), so that their workers share the cores in turn. A no-op when no
    config is on Ray, one joins a cluster (`trainer.ray_address`: it must fit them all), or Ray already runs."""
    on_ray = [c for c in configs if c.trainer.backend == "ray"]
    if not on_ray or any(c.trainer.ray_address for c in on_ray):
        yield
        return
    check_installed()
    import ray

    if ray.is_initialized():
        yield
        return
    asked = {r: sum(b.get(r, 0.0) for c in on_ray for b in bundles(c)) for r in ("CPU", "GPU")}
    _start_local(num_cpus=max(math.ceil(asked["CPU"]), os.cpu_count() or 1),
                 **({"num_gpus": math.ceil(asked["GPU"])} if asked["GPU"] else {}))
    try:
        yield
    finally:
        ray.shutdown()


class Cluster:
    """The run's hold on Ray: its placement group; the last run of the process to close leaves Ray."""

    def __init__(self, config: TrainConfig):
        import ray
        from ray.util.placement_group import placement_group

        check_installed()
        address = config.trainer.ray_address
        if address is not None:
            _check_reachable(address)
        self.config = config
        _runs["started_ray"] |= _init(address)
        _runs["open"] += 1
        try:
            _check_fits(config)
        except ConfigError:
            self._leave()
            raise
        self.bundles = bundles(config)
        self.group = placement_group(self.bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.group)
            self._leave()
            raise ConfigError(f"the Ray cluster did not grant the bundles {self.bundles} in "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s: is another run holding its CPUs?")

    def strategy(self, bundle: int):
        """Returns the scheduling strategy that places an actor in bundle `bundle` of the run's group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)

    def rollout_workers(self, engine):
        """Returns the run's `WorkerPool`: one RolloutWorker per worker bundle, each from `engine`'s models."""
        from respec.cluster.workers import WorkerPool

        r = self.config.rollout
        return WorkerPool(engine, r.workers, r.group_size, r.worker_threads, r.worker_gpus, r.compile, self)

    def learner(self, drafter, publish, seed: int):
        """Returns a `RemoteLearner` in the learner bundle (the last one)."""
        from respec.cluster.learner_actor import RemoteLearner

        return RemoteLearner(self.config.learner, drafter, publish, seed, threads=1,
                             strategy=self.strategy(len(self.bundles) - 1))

    def close(self) -> None:
        """Gives the placement group back (its actors end with it) and ends this run's use of Ray."""
        import ray

        if not ray.is_initialized():
            return
        ray.util.remove_placement_group(self.group)
        self._leave()

    def _leave(self) -> None:
        """Ends this run's use of Ray; the last run of the process leaves it (a Ray it started stops, a joined
        cluster goes on). A Ray the caller started (tests, notebooks) is the caller's to stop."""
        import ray

        _runs["open"] -= 1
        if _runs["open"] == 0 and _runs["started_ray"]:
            _runs["started_ray"] = False
            ray.shutdown()
