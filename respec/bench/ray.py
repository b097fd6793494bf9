"""`respec bench ray`: what the Ray backend buys on the machine at hand, in one run.

Scale. The same RL run (seeds, data, 128-row rollouts by default, static k) on the local backend and on Ray
with `workers` rollout workers of one thread each, stepped alternately (a shared host's drift reaches both
alike); per step the rows whose token ids are identical on both backends, the relative difference of the
step's metrics, the phase split (rollout, update, push, learner), the Ray overhead (the rollout's wall time
beyond its slowest shard: dispatch, transfer, gathering; and the weight push) and the step. Reported: medians
after the first (warm-up) step, the rollout speedup, the overhead's share of a Ray step, and the bound of the
speedup on this machine and world, twice: one step's rollout on the local engine against each of its shards (whole
groups, as the workers get them) run alone on the same engine, i.e. what `workers` engines on cores that do not
slow each other could do with no Ray in between; and against the same shards run at the same time, each in a
plain process of its own with one thread (no Ray), i.e. what `workers` engines on this machine's cores reach
when they share its caches, memory bandwidth and host, as Ray's workers must.

Learner. The cost of a busy online learner to the rollout, measured as `benchmarks/learner_overhead.py` does:
the identical rollout (same prompts, seed, static k, the drafter held fixed) with the learner idle and with it
training flat out, alternated. Once with the learner as a thread beside the local engine (`learner.mode=async`,
local backend), once as a Ray actor on its own CPU beside one rollout worker.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from respec.engine.checkpoint import torch_threads
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.rl.config import (
    AlgorithmConfig,
    DataConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
)
from respec.rl.trainer import Trainer

Log = Callable[[str], None]
PHASES = ("rollout_s", "update_s", "push_s", "learner_s", "step_s", "ray_overhead_s")
BOUND_TIMEOUT_S = 600.0  # a shard process that does not answer in this time has failed
# The task the benchmark trains on: a single-turn one, as its fixed rollouts (`fixed_rollout`, `shard_bound`) are
# generate calls without an environment.
TASK = "arithmetic"
SAME = ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm")  # compared per step


def bench_config(policy: str, drafter: str, prompts: int, group: int, max_new_tokens: int, k: int) -> TrainConfig:
    """Returns the benchmark's run: `prompts` x `group` rows per step, static k, no evaluation or checkpoints."""
    return TrainConfig(
        trainer=TrainerConfig(model=policy, steps=1000, eval_every=0, eval_before_train=False, save_every=0),
        algorithm=AlgorithmConfig(ppo_mini_batch_size=4),
        rollout=RolloutConfig(group_size=group, max_new_tokens=max_new_tokens, spec="static", k=k, drafter=drafter),
        data=DataConfig(task=TASK, prompts_per_step=prompts, eval_problems=8))


def _run_threads(bench: Callable[..., dict]) -> Callable[..., dict]:
    """Runs a benchmark of `config` (its first argument) with the run's torch threads (trainer.num_threads), as
    `respec train` does: Ray's workers have their own count, the local backend would otherwise take every core."""
    @functools.wraps(bench)
    def run(config: TrainConfig, *args, **kwargs) -> dict:
        with torch_threads(config.trainer.num_threads):
            return bench(config, *args, **kwargs)
    return run


@_run_threads
def bench_scale(config: TrainConfig, out: Path, steps: int, workers: int, log: Log | None = None) -> dict:
    """Returns per-step phase seconds of the local and the Ray backend stepped alternately, with medians after
    the first step, the rollout speedup and the Ray overhead's share of a Ray step."""
    on_ray = replace(config, trainer=replace(config.trainer, backend="ray"),
                     rollout=replace(config.rollout, workers=workers))
    trainers = {"local": _start(config, out / "local"), "ray": _start(on_ray, out / "ray")}
    rows: dict[str, list[dict]] = {name: [] for name in trainers}
    tokens: dict[str, list[list[list[int]]]] = {name: [] for name in trainers}
    try:
        for step in range(steps):
            for name in (("local", "ray") if step % 2 == 0 else ("ray", "local")):
                row = trainers[name].step()
                rows[name].append({**{p: row.get(f"timing/{p}", 0.0) for p in PHASES},
                                   **{k: row[k] for k in SAME if k in row}})
                tokens[name].append(rollout_rows(trainers[name]))
                _log(log, f"scale {name} step {step + 1}/{steps}: rollout {row['timing/rollout_s']:.2f} s, step "
                          f"{row['timing/step_s']:.2f} s")
        bound = shard_bound(trainers["local"], config, workers, repeats=3)
        _log(log, f"shards alone: full rollout {bound['full_s']:.2f} s, slowest of {workers} shards "
                  f"{max(bound['shard_s']):.2f} s: at most {bound['speedup']:.2f}x")
    finally:
        for trainer in trainers.values():
            trainer.close()
    med = {name: {p: statistics.median(r[p] for r in rs[1:] or rs) for p in PHASES} for name, rs in rows.items()}
    identical = [sum(a == b for a, b in zip(x, y, strict=True)) for x, y in zip(*tokens.values(), strict=True)]
    ray_step = med["ray"]["step_s"]
    return {"steps": steps, "workers": workers, "rows": config.data.prompts_per_step * config.rollout.group_size,
            "per_step": rows, "median": med, "identical_rows": identical,
            "metric_rel_diff": {k: [abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in
                                    zip(rows["local"], rows["ray"], strict=True)] for k in SAME},
            "rollout_speedup": med["local"]["rollout_s"] / med["ray"]["rollout_s"],
            "step_speedup": med["local"]["step_s"] / ray_step,
            "ray_overhead_share": (med["ray"]["ray_overhead_s"] + med["ray"]["push_s"]) / ray_step,
            "shard_bound": bound}


def fixed_rollout(trainer: Trainer, config: TrainConfig, seed: int) -> tuple[list[list[int]], SamplingParams,
                                                                             SpecConfig]:
    """Returns one step's rollout to time again and again: the run's next problems as P x G prompts, sampling at
    T = 1 from `seed`, and the run's static k (plain decoding when the run is not static)."""
    problems = trainer.problems.next(config.data.prompts_per_step)
    prompts = [trainer.rollout.encode(p) for p in problems for _ in range(config.rollout.group_size)]
    params = SamplingParams(temperature=1.0, max_new_tokens=config.rollout.max_new_tokens, seed=seed)
    spec = SpecConfig(mode="static", k=config.rollout.k) if config.rollout.spec == "static" else SpecConfig(mode="off")
    return prompts, params, spec


def shard_bound(trainer: Trainer, config: TrainConfig, workers: int, repeats: int) -> dict:
    """Returns {"full_s", "shard_s", "speedup", "concurrent_shard_s", "concurrent_speedup"}: the median seconds
    of one step's rollout (the next problems, fixed seed, the run's static k) on `trainer`'s engine, of each of its
    `workers` shards of whole groups alone on the same engine (run alternately with the full one), and full /
    slowest shard: the rollout speedup that `workers` engines on cores that do not slow each other would reach with
    nothing between them; then the shards' seconds per repeat run at the same time in plain processes
    (`concurrent_shards`) and full / the median of the slowest: the speedup this machine allows `workers` engines
    with no Ray between them."""
    from respec.cluster.workers import shard_edges

    prompts, params, spec = fixed_rollout(trainer, config, seed=4321)
    edges = [(0, len(prompts)), *shard_edges(len(prompts), config.rollout.group_size, workers)]  # full, shards
    times: list[list[float]] = [[] for _ in edges]
    for r in range(repeats + 1):  # the first pass warms up
        for i, (a, b) in enumerate(edges):
            t0 = time.perf_counter()
            trainer.engine.generate(prompts[a:b], params, spec, first_stream=a)  # the streams a worker draws
            if r:
                times[i].append(time.perf_counter() - t0)
    full, *shard = [statistics.median(t) for t in times]
    together = concurrent_shards(trainer.engine, prompts, edges[1:], params, spec, repeats)
    slowest = statistics.median(max(r) for r in together)
    return {"full_s": full, "shard_s": shard, "speedup": full / max(shard), "concurrent_shard_s": together,
            "concurrent_speedup": full / slowest}


def concurrent_shards(engine: Engine, prompts: list[list[int]], shards: list[tuple[int, int]],
                      params: SamplingParams, spec: SpecConfig, repeats: int) -> list[list[float]]:
    """Returns, per repeat, the seconds of each shard ((start, end) rows of `prompts`) generated at the same time as
    the others, each in a plain child process of its own (one torch thread, a copy of `engine`'s models, the
    streams it would draw in one engine); every child warms up once first, and every repeat starts them together."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(shards) + 1)
    times = ctx.Queue()
    procs = [ctx.Process(target=_generate_shard, daemon=True,
                         args=(engine.target, engine.drafter, engine.compile, prompts[a:b], params, spec, a, repeats,
                               start, times, i))
             for i, (a, b) in enumerate(shards)]
    for proc in procs:
        proc.start()
    try:
        for _ in range(repeats):
            start.wait(timeout=BOUND_TIMEOUT_S)
        got = [times.get(timeout=BOUND_TIMEOUT_S) for _ in range(repeats * len(shards))]
    finally:
        for proc in procs:
            proc.join(timeout=BOUND_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
    out = [[0.0] * len(shards) for _ in range(repeats)]
    for r, i, seconds in got:
        out[r][i] = seconds
    return out


def _generate_shard(target, drafter, compile: str, prompts, params, spec, first_stream: int, repeats: int,
                    start, times, index: int) -> None:
    torch.set_num_threads(1)
    engine = Engine(target, drafter, compile=compile)
    engine.generate(prompts, params, spec, first_stream=first_stream)  # warm-up
    for r in range(repeats):
        start.wait(timeout=BOUND_TIMEOUT_S)
        t0 = time.perf_counter()
        engine.generate(prompts, params, spec, first_stream=first_stream)
        times.put((r, index, time.perf_counter() - t0))


@_run_threads
def bench_learner(config: TrainConfig, out: Path, repeats: int, log: Log | None = None) -> dict:
    """Returns the rollout's seconds with the learner idle and busy (alternated, `repeats` each) for the thread
    learner (local backend) and the actor learner (Ray, one rollout worker), and each busy / idle ratio."""
    learner = replace(config.learner, mode="async", steps_per_rollout=1, publish_every=10 ** 6)
    sides = {"thread": replace(config, learner=learner),
             "actor": replace(config, learner=learner, trainer=replace(config.trainer, backend="ray"),
                              rollout=replace(config.rollout, workers=1))}
    result = {}
    for side, cfg in sides.items():
        trainer = _start(cfg, out / f"learner-{side}")
        try:
            trainer.step()  # fills the learner's buffer
            trainer.learner.publish_fn = lambda d, v: None  # the drafter stays: identical rollouts on both sides
            prompts, params, spec = fixed_rollout(trainer, cfg, seed=1234)
            generate = (trainer.workers or trainer.engine).generate
            times: dict[str, list[float]] = {"idle": [], "busy": []}
            trainer.learner.grant(0)
            trainer.learner.wait_idle(120)
            generate(prompts, params, spec)  # warm-up
            for i in range(2 * repeats):
                state = ("idle", "busy")[(i + i // 2) % 2]  # idle busy busy idle ...: neither always goes first
                if state == "busy":
                    trainer.learner.grant(10 ** 9)
                    time.sleep(0.3)  # the learner is mid-step
                t0 = time.perf_counter()
                generate(prompts, params, spec)
                times[state].append(time.perf_counter() - t0)
                trainer.learner.grant(0)
                trainer.learner.wait_idle(120)
                _log(log, f"learner {side} {state}: rollout {times[state][-1]:.2f} s")
        finally:
            trainer.close()
        med = {s: statistics.median(t) for s, t in times.items()}
        result[side] = {"seconds": times, "median": med, "busy_over_idle": med["busy"] / med["idle"]}
    return {"repeats": repeats, "rows": len(prompts), **result}


def rollout_rows(trainer: Trainer) -> list[list[int]]:
    """Returns the last step's rows (prompt + completion ids) as the update saw them."""
    f = trainer.last_features
    return [row[: int(n)].tolist() for row, n in zip(f.input_ids, f.loss_mask.sum(1) + f.prompt_lens, strict=True)]


def _start(config: TrainConfig, run_dir: Path) -> Trainer:
    shutil.rmtree(run_dir, ignore_errors=True)
    return Trainer.start(config, run_dir)


def _log(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
