"""A GRPO-shaped rollout, timed under every way of choosing the draft length: plain decoding, each static k,
vLLM's per-batch-size table, TLT's bandit, our adaptive tuner, and the hindsight oracle's bound.

The workload is what an RL step generates: P prompts x G samples at temperature 1 with the policy's own
long-tailed completion lengths, so the live batch starts at P*G and drains to a tail of a few rows. That drain
is ReSpec's first gap: the best k at the start (batch 128: small k or none) is wrong at the end (batch 1-4:
large k), so every single static choice loses somewhere.

- table: a k per batch-size range, filled offline from this run's own static and plain rollouts (the k with
  the highest measured tokens/s among steps at each range), as a vLLM user fills the table from a benchmark.
- oracle: for every step of the static k_max rollout, a row that accepted c of k_max drafts would have
  accepted min(c, k) of k (the rejection rule's draws for drafts 1..k do not depend on k), so the tokens every
  k would have emitted are known in hindsight; with each k's measured seconds per step at that live batch
  (medians over this run's static and plain steps), the oracle takes the best tokens-per-second k at every
  step. oracle_s = prefill + sum over steps of the step's tokens at the oracle's rate: no real chooser beats it.
Choosers keep their state across repeats (one untimed warm-up round first), as they would across RL steps.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from respec.bench.engine import machine_info, write_results
from respec.engine.checkpoint import load_model, torch_threads
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, GenerationResult, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError

BATCH_RANGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # lower bounds of the batch-size ranges of table and oracle


@dataclass(frozen=True)
class RolloutBenchConfig:
    """What `bench_rollout` measures; the defaults are the run of benchmarks/RESULTS.md."""

    policy: str | None = None  # policy directory (with tokenizer); None = the embedded default
    drafter: str | None = None  # drafter directory; None = the embedded default's
    task: str = "arithmetic"
    prompts: int = 16  # P distinct prompts ...
    samples: int = 8  # ... x G samples each: the rollout batch
    temperature: float = 1.0
    max_new_tokens: int = 128
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # static draft lengths; the largest is k_max of every chooser
    repeats: int = 3  # timed rollouts per mode (after one untimed round); the median is reported
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if not self.ks or self.ks[0] < 1 or self.ks[-1] > 16:
            raise ConfigError(f"ks must be draft lengths in [1, 16], got {list(self.ks)}")
        for name in ("prompts", "samples", "max_new_tokens", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def k_max(self) -> int:
        return self.ks[-1]


def range_of(batch: int) -> int:
    """Returns the lower bound of the batch-size range holding `batch`."""
    return max(b for b in BATCH_RANGES if b <= batch)


def step_costs(results: dict[int, list[GenerationResult]]) -> dict[tuple[int, int], float]:
    """Returns the median measured seconds per step for each (batch range, k) over the given rollouts by k."""
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    for k, runs in results.items():
        for run in runs:
            for s in run.stats:
                if s.k == k:
                    times[(range_of(s.batch), k)].append(s.seconds / s.batch)  # per row: ranges hold many B
    return {key: statistics.median(v) for key, v in times.items()}


def table_from_rollouts(results: dict[int, list[GenerationResult]]) -> dict[int, int]:
    """Returns {batch range lower bound: k} with the highest measured tokens/s of steps in that range (k=0 plain)."""
    rate: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for k, runs in results.items():
        for run in runs:
            for s in run.stats:
                acc = rate[range_of(s.batch)][k]
                acc[0] += s.emitted
                acc[1] += s.seconds
    table = {b: max(ks, key=lambda k: ks[k][0] / max(ks[k][1], 1e-12)) for b, ks in sorted(rate.items())}
    first = min(table)
    table[1] = table.pop(first)  # vLLM's ranges start at 1: the smallest measured range covers the batches below
    return dict(sorted(table.items()))


def oracle(reference: GenerationResult, costs: dict[tuple[int, int], float], ks: list[int]) -> tuple[float, list[int]]:
    """Returns (seconds, k per step) of the hindsight oracle over the steps of a static k_max rollout."""
    seconds, trace = reference.prefill_seconds, []
    for s in reference.stats:
        r = range_of(s.batch)
        best_k, best_rate = 0, 0.0
        for k in [0, *ks]:
            if (r, k) not in costs:
                continue
            tokens = sum(min(c, k) + 1 for c in s.accepted)
            rate = tokens / (costs[(r, k)] * s.batch)
            if rate > best_rate:
                best_k, best_rate = k, rate
        trace.append(best_k)
        seconds += s.emitted / best_rate
    return seconds, trace


def bench_rollout(cfg: RolloutBenchConfig | None = None, json_path: str | os.PathLike | None = None,
                  console: Console | None = None) -> dict:
    """Returns {"plain_s", "static_s", "table_s", "bandit_s", "adaptive_s", "oracle_s", ...}; writes JSON + PNG."""
    from respec.bench.plot import plot_bench_rollout
    from respec.bench.policies import BanditPolicy, TablePolicy
    from respec.world.defaults import resolve_models
    from respec.world.prompts import HELD_OUT_SEED, task_prompts

    cfg = cfg or RolloutBenchConfig()
    console = console or Console()
    with torch_threads(cfg.threads):
        policy_dir, drafter_dir = resolve_models(cfg.policy, cfg.drafter, cfg.task)
        target = load_model(policy_dir, dtype=cfg.dtype, device=cfg.device)
        engine = Engine(target, load_drafter(drafter_dir, target))
        prompts = [p for p in task_prompts(policy_dir, cfg.task, cfg.prompts, HELD_OUT_SEED) for _ in range(cfg.samples)]
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        engine.default_tuner(cfg.k_max)  # profiles (or loads) the cost model outside the timed runs
        static = {0: SpecConfig(mode="off"), **{k: SpecConfig(mode="static", k=k) for k in cfg.ks}}
        adaptive = SpecConfig(mode="adaptive", k_max=cfg.k_max)
        runs: dict[str, list[GenerationResult]] = defaultdict(list)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("bench rollout", total=(cfg.repeats + 1) * (len(static) + 3))
            table = bandit = None
            for r in range(cfg.repeats + 1):  # round 0 warms up every mode and is not counted
                warm: dict[int, list[GenerationResult]] = {}
                for k, spec in static.items():
                    bar.update(task, description=f"round {r} {'plain' if k == 0 else f'static k={k}'}")
                    out = _timed(engine, prompts, params, spec)
                    (runs[f"static_{k}"] if r else warm.setdefault(k, [])).append(out)
                    bar.advance(task)
                if table is None:  # filled from the warm-up round's static grid, as offline tuning would be
                    table = TablePolicy(table_from_rollouts(warm))
                    bandit = BanditPolicy(ks=list(cfg.ks), seed=cfg.seed)
                for name, chooser in (("table", table), ("bandit", bandit), ("adaptive", None)):
                    bar.update(task, description=f"round {r} {name}")
                    out = _timed(engine, prompts, params, adaptive, chooser)
                    if r:
                        runs[name].append(out)
                    bar.advance(task)
        machine = machine_info(cfg.device)
    static_runs = {k: runs[f"static_{k}"] for k in static}
    costs = step_costs(static_runs)
    oracle_runs = [oracle(run, costs, list(cfg.ks)) for run in static_runs[cfg.k_max]]
    med = lambda rs: statistics.median(r.seconds for r in rs)  # noqa: E731
    cpu = lambda rs: statistics.median(r.cpu_seconds for r in rs)  # noqa: E731
    data = {
        "plain_s": med(static_runs[0]),
        "static_s": {str(k): med(static_runs[k]) for k in cfg.ks},
        "table_s": med(runs["table"]), "bandit_s": med(runs["bandit"]), "adaptive_s": med(runs["adaptive"]),
        "oracle_s": statistics.median(s for s, _ in oracle_runs),
        "cpu_s": {"plain": cpu(static_runs[0]), **{f"static_{k}": cpu(static_runs[k]) for k in cfg.ks},
                  "table": cpu(runs["table"]), "bandit": cpu(runs["bandit"]), "adaptive": cpu(runs["adaptive"])},
        "table": {str(b): k for b, k in table.table.items()},
        "tokens": statistics.median(r.num_tokens for r in runs["adaptive"]),
        "mean_k": {name: statistics.mean(r.mean_k for r in runs[name]) for name in ("table", "bandit", "adaptive")},
        "trace": _trace(runs["adaptive"][-1], costs, cfg),
        "machine": machine, "config": asdict(cfg), "policy": str(policy_dir), "drafter": str(drafter_dir),
    }
    best_k = min(cfg.ks, key=lambda k: data["static_s"][str(k)])
    data["best_static_k"] = best_k
    data["ratios"] = {
        "adaptive_vs_plain": data["plain_s"] / data["adaptive_s"],
        "adaptive_vs_best_static": data["static_s"][str(best_k)] / data["adaptive_s"],
        "adaptive_vs_table": data["table_s"] / data["adaptive_s"],
        "adaptive_vs_bandit": data["bandit_s"] / data["adaptive_s"],
        "adaptive_vs_oracle": data["oracle_s"] / data["adaptive_s"],
    }
    data["cpu_ratios"] = {
        "adaptive_vs_plain": data["cpu_s"]["plain"] / data["cpu_s"]["adaptive"],
        "adaptive_vs_best_static": min(data["cpu_s"][f"static_{k}"] for k in cfg.ks) / data["cpu_s"]["adaptive"],
        "adaptive_vs_table": data["cpu_s"]["table"] / data["cpu_s"]["adaptive"],
        "adaptive_vs_bandit": data["cpu_s"]["bandit"] / data["cpu_s"]["adaptive"],
    }
    print_rollout_table(data, console)
    if json_path is not None:
        write_results(data, Path(json_path), plot_bench_rollout)
    return data


def _timed(engine: Engine, prompts, params, spec, chooser=None) -> GenerationResult:
    """Returns the rollout with `cpu_seconds` set: this process's CPU time over the call. With one torch thread
    on a CPU that is the work done, unaffected by other processes taking the core (wall time is not)."""
    c0 = time.process_time()
    out = engine.generate(prompts, params, spec, chooser=chooser)
    out.cpu_seconds = time.process_time() - c0
    return out


def _trace(run: GenerationResult, costs: dict[tuple[int, int], float], cfg: RolloutBenchConfig) -> dict:
    """Returns the adaptive decision trace (live batch, chosen k, predicted and measured seconds per step) and
    the oracle's k at each step's batch (its best k for the tuner's acceptance in hindsight)."""
    accept_rows = [c for s in run.stats if s.k for c in s.accepted]
    oracle_k = []
    for s in run.stats:
        r = range_of(s.batch)
        # expected tokens per row for each k under this run's realised acceptance counts (capped at k)
        best = max((k for k in [0, *cfg.ks] if (r, k) in costs),
                   key=lambda k: (statistics.mean(min(c, k) for c in accept_rows) + 1 if accept_rows else 1)
                   / costs[(r, k)])
        oracle_k.append(best)
    return {"batch": [s.batch for s in run.stats], "k": [s.k for s in run.stats], "oracle_k": oracle_k,
            "seconds": [s.seconds for s in run.stats], "predicted_seconds": [s.predicted_seconds for s in run.stats]}


def print_rollout_table(data: dict, console: Console) -> None:
    """Prints wall seconds of every mode and the adaptive tuner's ratios."""
    table = Table(title="GRPO-shaped rollout: seconds (lower is better), same engine, prompts and seeds")
    table.add_column("mode")
    table.add_column("seconds", justify="right")
    table.add_column("vs plain", justify="right")
    table.add_column("CPU seconds", justify="right")
    table.add_column("vs plain", justify="right")
    cpu = data["cpu_s"]
    rows = [("plain", data["plain_s"], cpu["plain"])]
    rows += [(f"static k={k}", s, cpu[f"static_{k}"]) for k, s in data["static_s"].items()]
    rows += [("table (vLLM)", data["table_s"], cpu["table"]), ("bandit (TLT)", data["bandit_s"], cpu["bandit"]),
             ("adaptive (ours)", data["adaptive_s"], cpu["adaptive"]), ("oracle (bound)", data["oracle_s"], None)]
    for name, s, c in rows:
        table.add_row(name, f"{s:.2f}", f"{data['plain_s'] / s:.2f}x", "" if c is None else f"{c:.2f}",
                      "" if c is None else f"{cpu['plain'] / c:.2f}x")
    console.print(table)
    r = data["ratios"]
    console.print(f"adaptive: {r['adaptive_vs_plain']:.2f}x plain, {r['adaptive_vs_best_static']:.2f}x best static "
                  f"(k={data['best_static_k']}), {r['adaptive_vs_table']:.2f}x table, {r['adaptive_vs_bandit']:.2f}x "
                  f"bandit, {r['adaptive_vs_oracle']:.2f} of the oracle's speed")
