"""A GRPO-shaped rollout, timed under every way of choosing the draft length: plain decoding, each static k,
vLLM's per-batch-size table, TLT's bandit, our adaptive tuner, and the hindsight oracle's bound.

The workload is what an RL step generates: P prompts x G samples at temperature 1 with the policy's own
long-tailed completion lengths, so the live batch starts at P*G and drains to a tail of a few rows. That drain
is ReSpec's first gap: the best k at the start (batch 128: small k or none) is wrong at the end (batch 1-4:
large k), so every single static choice loses somewhere.

- table: a k per batch-size range, filled offline from this run's own static and plain rollouts (the k with
  the highest measured tokens/s among steps at each range), as a vLLM user fills the table from a benchmark.
- oracle: in a static-k rollout, a row that accepted c of its k drafts would have accepted min(c, j) of j <= k
  (the rejection rule's draws for drafts 1..j do not depend on k), so the tokens every j <= k would have
  emitted at each step are known in hindsight. With each j's measured seconds per step at that live batch (the
  median of this run's steps with that j in the same batch bucket, the padded batch a step really runs at;
  interpolated between measured buckets), the oracle takes the best tokens-per-second j at every step: time =
  prefill + sum over steps of the step's tokens at the oracle's rate. Each static rollout drains at its own
  pace (which sets the batch at which tokens are made), so the oracle is evaluated on every static rollout and
  the best is reported, plus that rollout's measured time outside its steps (environment turns, the generate
  call's own work). A bound under the measured costs: a chooser can beat it only by their noise.
Every mode's seconds are the wall time of its generate call (a step's time includes booking its tokens, which a
plain step pays for one token per row); CPU seconds beside them.
Choosers keep their state across repeats (one untimed warm-up pass first), as they would across RL steps.
`bench_rollout` reports progress through `log(message, fraction)` and prints nothing (`rollout_tables` renders
the results for the CLI).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from respec.bench.engine import Log, machine_info, no_progress, write_results
from respec.bench.policies import BanditPolicy, TablePolicy, table_from_cells
from respec.engine.checkpoint import load_model, torch_threads
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, GenerationResult, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.engine.slots import bucket_size
from respec.errors import ConfigError
from respec.rl.rollout_shape import RANGE_LABELS, SMALL_BATCH, drain_shape, rollout_shape
from respec.world.tasks import DEFAULT_TASK, task_budget

BATCH_RANGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # lower bounds of the batch-size ranges of table and oracle
WORKED_ROLLOUTS = 100  # rollouts of fresh problems priced for the worked-solution shape (`worked_shape`)


@dataclass(frozen=True)
class RolloutBenchConfig:
    """What `bench_rollout` measures; the defaults are the run of docs/results.md."""

    policy: str | None = None  # policy directory (with tokenizer); None = the embedded default
    drafter: str | None = None  # drafter directory; None = the embedded default's
    task: str = DEFAULT_TASK
    prompts: int = 16  # P distinct prompts ...
    samples: int = 8  # ... x G samples each: the rollout batch
    temperature: float = 1.0
    max_new_tokens: int | None = None  # a row's budget; None = the task's (`task_budget`: probe 512, arithmetic 96)
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # static draft lengths; the largest is k_max of every chooser
    repeats: int = 3  # timed rollouts per mode (after one untimed round); the median is reported
    seed: int = 0
    threads: int | None = 1
    compile: str = "off"  # decode steps: "off" (eager) | "on" (torch.compile) | "auto" (the faster per profiled cell)
    device: str = "cpu"
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", task_budget(self.task))  # an unknown task: ConfigError
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


Costs = dict[int, dict[int, float]]  # k -> {batch bucket: seconds per step}


def step_costs(results: dict[int, list[GenerationResult]]) -> Costs:
    """Returns, per k (0: plain), the median measured seconds of the steps of the rollouts run with that k, per
    batch bucket (`bucket_size` over the largest batch seen: the rows a step computes, pads included). A median
    per bucket, not a fit across buckets: a step's cost is flat in the batch where overhead dominates and
    steep where compute does, and preempted steps are outliers a median ignores."""
    slots = max(s.batch for runs in results.values() for run in runs for s in run.stats)
    out: Costs = {}
    for k, runs in results.items():
        cells = defaultdict(list)
        for run in runs:
            for s in run.stats:
                if s.k == k:
                    cells[bucket_size(s.batch, slots)].append(s.seconds)
        out[k] = {b: statistics.median(v) for b, v in sorted(cells.items())}
    return out


def step_cost_at(costs: Costs, k: int, batch: int) -> float:
    """Returns k's step seconds at live batch `batch`: its bucket's measured median, else interpolated linearly
    between the nearest measured buckets (the nearest one's beyond them)."""
    cells = costs[k]
    bucket = bucket_size(batch, max(max(c) for c in costs.values() if c))  # the largest bucket: the slots
    if bucket in cells:
        return cells[bucket]
    lo = max((b for b in cells if b < bucket), default=None)
    hi = min((b for b in cells if b > bucket), default=None)
    if lo is None or hi is None:
        return cells[hi if lo is None else lo]
    return cells[lo] + (cells[hi] - cells[lo]) * (bucket - lo) / (hi - lo)


def table_from_rollouts(results: dict[int, list[GenerationResult]]) -> dict[int, int]:
    """Returns {batch range lower bound: k}: per power-of-two batch range, the k (0 = plain) whose steps in that
    range had the highest measured tokens/s, filled like a bench-spec grid (`table_from_cells`)."""
    totals: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (range, k) -> tokens, seconds
    for k, runs in results.items():
        for run in runs:
            for s in run.stats:
                total = totals[(range_of(s.batch), k)]
                total[0] += s.emitted
                total[1] += s.seconds
    return table_from_cells({"batch": b, "mode": "static" if k else "plain", "k": k,
                             "tokens_per_s": tokens / max(seconds, 1e-12)}
                            for (b, k), (tokens, seconds) in totals.items())


def oracle(reference: GenerationResult, costs: Costs) -> tuple[float, list[int]]:
    """Returns (seconds, k per step) of the hindsight oracle over the steps of a static-k rollout (k >= 1),
    choosing among the draft lengths 0..k that it can judge exactly."""
    seconds, trace = reference.prefill_seconds, []
    k_ref = max(s.k for s in reference.stats)
    for s in reference.stats:
        rates = {k: sum(min(c, k) + 1 for c in s.accepted) / step_cost_at(costs, k, s.batch) for k in costs
                 if k <= k_ref and costs[k]}
        best = max(rates, key=lambda k: (rates[k], -k))
        trace.append(best)
        seconds += s.emitted / rates[best]
    return seconds, trace


def bench_rollout(cfg: RolloutBenchConfig | None = None, json_path: str | os.PathLike | None = None,
                  log: Log | None = None, command: str | None = None) -> dict:
    """Returns {"command", "plain_s", "static_s", "table_s", "bandit_s", "adaptive_s", "oracle_s", ..., "machine"};
    writes JSON + PNG if json_path is given. `command` is recorded as the command line that produced the results
    (the CLI passes its own)."""
    from respec.bench.plot import plot_bench_rollout
    from respec.world.defaults import resolve_models
    from respec.world.env import task_env
    from respec.world.prompts import HELD_OUT_SEED, task_prompts

    cfg = cfg or RolloutBenchConfig()
    log = log or no_progress
    with torch_threads(cfg.threads):
        policy_dir, drafter_dir = resolve_models(cfg.policy, cfg.drafter, cfg.task, log=log)
        target = load_model(policy_dir, dtype=cfg.dtype, device=cfg.device)
        prompts = [p for p in task_prompts(policy_dir, cfg.task, cfg.prompts, HELD_OUT_SEED) for _ in range(cfg.samples)]
        # As many slots as rows: the tuner profiles the batch sizes the rollout can reach, no larger.
        engine = Engine(target, load_drafter(drafter_dir, target), compile=cfg.compile, max_running=len(prompts))
        env = task_env(policy_dir, cfg.task, cfg.prompts, HELD_OUT_SEED, cfg.seed, cfg.samples)  # multi-turn tasks
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        engine.default_tuner(cfg.k_max)  # profiles (or loads) the cost model outside the timed runs
        # With compiled steps, the eager engine's adaptive rollout runs beside them: the compiled path's gain.
        eager = Engine(target, engine.drafter, max_running=len(prompts)) if cfg.compile != "off" else None
        if eager is not None:
            eager.default_tuner(cfg.k_max)
        static = {0: SpecConfig(mode="off"), **{k: SpecConfig(mode="static", k=k) for k in cfg.ks}}
        adaptive = SpecConfig(mode="adaptive", k_max=cfg.k_max)
        runs: dict[str, list[GenerationResult]] = defaultdict(list)
        total, done = (cfg.repeats + 1) * (len(static) + 3 + (eager is not None)), 0
        table = bandit = None
        for r in range(cfg.repeats + 1):  # pass 0 warms up every mode and is not counted
            what = f"repeat {r}/{cfg.repeats}" if r else "warm-up"
            warm: dict[int, list[GenerationResult]] = {}
            for k, spec in static.items():
                log(f"rollout: {what}, {'plain' if k == 0 else f'static k={k}'}", done / total)
                out = _timed(engine, prompts, params, spec, env=env)
                (runs[f"static_{k}"] if r else warm.setdefault(k, [])).append(out)
                done += 1
            if table is None:  # filled from the warm-up pass's static grid, as offline tuning would be
                table = TablePolicy(table_from_rollouts(warm))
                bandit = BanditPolicy(ks=list(cfg.ks), seed=cfg.seed)
            for name, chooser in (("table", table), ("bandit", bandit), ("adaptive", None)):
                log(f"rollout: {what}, {name}", done / total)
                out = _timed(engine, prompts, params, adaptive, chooser, env)
                if r:
                    runs[name].append(out)
                done += 1
            if eager is not None:
                log(f"rollout: {what}, adaptive (eager)", done / total)
                out = _timed(eager, prompts, params, adaptive, env=env)
                if r:
                    runs["adaptive_eager"].append(out)
                done += 1
        log("rollout: done", 1.0)
        machine = machine_info(cfg.device)
    static_runs = {k: runs[f"static_{k}"] for k in static}
    costs = step_costs(static_runs)
    # The oracle's schedule applied to each static trajectory (its rows drain at that k's pace); the best one. Its
    # steps are priced; the run's time outside them (environment turns, the call's own work) is added as measured.
    oracle_by_k = {k: statistics.median(oracle(run, costs)[0] + run.wall_seconds - run.seconds
                                        for run in static_runs[k]) for k in cfg.ks}
    med = lambda rs: statistics.median(r.wall_seconds for r in rs)  # noqa: E731
    cpu = lambda rs: statistics.median(r.cpu_seconds for r in rs)  # noqa: E731
    data = {
        "command": command or "python API: bench_rollout(...)",
        "plain_s": med(static_runs[0]),
        "static_s": {str(k): med(static_runs[k]) for k in cfg.ks},
        "table_s": med(runs["table"]), "bandit_s": med(runs["bandit"]), "adaptive_s": med(runs["adaptive"]),
        "oracle_s": min(oracle_by_k.values()),
        "oracle_by_reference_s": {str(k): v for k, v in oracle_by_k.items()},
        "cpu_s": {"plain": cpu(static_runs[0]), **{f"static_{k}": cpu(static_runs[k]) for k in cfg.ks},
                  "table": cpu(runs["table"]), "bandit": cpu(runs["bandit"]), "adaptive": cpu(runs["adaptive"])},
        "table": {str(b): k for b, k in table.table.items()},
        "tokens": statistics.median(r.num_tokens for r in runs["adaptive"]),
        "mean_k": {name: statistics.mean(r.mean_k for r in runs[name]) for name in ("table", "bandit", "adaptive")},
        "trace": _trace(runs["adaptive"][-1], costs, cfg),
        # per k, the median seconds of a step per batch bucket (`step_costs`)
        "step_cost": {str(k): {str(b): sec for b, sec in cells.items()} for k, cells in costs.items()},
        # the plain rollouts' response lengths and decode seconds per live-batch range (their repeats pooled)
        "shape": rollout_shape([len(s.tokens) for r in static_runs[0] for s in r.sequences],
                               [s for r in static_runs[0] for s in r.stats]),
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
    worked = worked_shape(policy_dir, cfg, lambda batch: step_cost_at(costs, 0, batch))
    if worked is not None:
        data["worked_shape"] = worked
    if eager is not None:
        data["adaptive_eager_s"] = med(runs["adaptive_eager"])
        data["ratios"]["adaptive_vs_adaptive_eager"] = data["adaptive_eager_s"] / data["adaptive_s"]
    if json_path is not None:
        write_results(data, Path(json_path), plot_bench_rollout)
    return data


def worked_shape(policy_dir: str | os.PathLike, cfg: RolloutBenchConfig, price: Callable[[int], float],
                 rollouts: int = WORKED_ROLLOUTS) -> dict | None:
    """Returns the `drain_shape` of `rollouts` GRPO-shaped rollouts (cfg.prompts problems x cfg.samples rows) in
    which every row writes a worked solution of its problem (the task's always-right style, where GRPO drives the
    policy; each row its own sample, `worked_lengths`), clipped to cfg.max_new_tokens, each step priced by
    `price(live rows)` (the plain steps' measured seconds): the share of time at a small live batch that the
    task's own lengths allow once the policy works every problem. The problems are the held-out stream (the first
    rollout's are the timed prompts). None for a task without generated solutions (jsonl)."""
    from respec.world.prompts import HELD_OUT_SEED
    from respec.world.tasks import get_task
    from respec.world.tokenizer import load_tokenizer

    task = get_task(cfg.task)
    if not hasattr(task, "sft_completion") or "worked" not in task.styles:
        return None
    problems = task.problems(cfg.prompts * rollouts, HELD_OUT_SEED)
    batches = worked_lengths(task, load_tokenizer(policy_dir), problems, cfg.prompts, cfg.samples,
                             cfg.max_new_tokens, random.Random(cfg.seed))
    return {**drain_shape(batches, price), "rollouts": rollouts}


def worked_lengths(task, tokenizer, problems: list, prompts: int, samples: int, budget: int,
                   rng: random.Random) -> list[list[int]]:
    """Returns one list of row lengths (tokens + eos, clipped to `budget`) per rollout of `prompts` consecutive
    problems x `samples` rows, every row a worked solution sampled on its own: where a task's solution depends on
    the sampled path (redraw), the rows of a group differ as the policy's would."""
    texts = [task.sft_completion(p, rng, "worked")[0] for p in problems for _ in range(samples)]
    lengths = [min(len(ids) + 1, budget) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    per_rollout = prompts * samples
    return [lengths[i:i + per_rollout] for i in range(0, len(lengths), per_rollout)]


def _timed(engine: Engine, prompts, params, spec, chooser=None, env=None) -> GenerationResult:
    """Returns the rollout with `wall_seconds` (the generate call's, environment turns included: what a trainer
    waits) and `cpu_seconds` set: this process's CPU time over the call. With one torch thread on a CPU that is the
    work done, unaffected by other processes taking the core (wall time is not)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = engine.generate(prompts, params, spec, chooser=chooser, env=env)
    out.wall_seconds, out.cpu_seconds = time.perf_counter() - w0, time.process_time() - c0
    return out


def _trace(run: GenerationResult, costs: Costs, cfg: RolloutBenchConfig) -> dict:
    """Returns the adaptive decision trace (live batch, chosen k, predicted and measured seconds per step) and
    the oracle's k at each step's batch (the best k under the measured costs and this run's acceptance)."""
    accept_rows = [c for s in run.stats if s.k for c in s.accepted] or [0]
    emitted = {k: statistics.mean(min(c, k) for c in accept_rows) + 1 for k in costs if costs[k]}
    oracle_k = [max(emitted, key=lambda k: (emitted[k] / step_cost_at(costs, k, s.batch), -k)) for s in run.stats]
    return {"batch": [s.batch for s in run.stats], "k": [s.k for s in run.stats], "oracle_k": oracle_k,
            "seconds": [s.seconds for s in run.stats], "predicted_seconds": [s.predicted_seconds for s in run.stats]}


def rollout_tables(data: dict) -> list[Table | Text]:
    """Returns the table of `bench_rollout` data (wall and CPU seconds of every mode) and a line of the adaptive
    tuner's ratios, for the caller to print."""
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
    r = data["ratios"]
    shape = [shape_table(shapes)] if (shapes := bench_shapes(data)) else []
    return [table, *shape, Text(f"adaptive: {r['adaptive_vs_plain']:.2f}x plain, {r['adaptive_vs_best_static']:.2f}x best "
                        f"static (k={data['best_static_k']}), {r['adaptive_vs_table']:.2f}x table, "
                        f"{r['adaptive_vs_bandit']:.2f}x bandit, {r['adaptive_vs_oracle']:.2f} of the oracle's speed"
                        + (f", {r['adaptive_vs_adaptive_eager']:.2f}x the eager engine's adaptive rollout"
                           if "adaptive_vs_adaptive_eager" in r else ""))]



def bench_shapes(data: dict) -> dict[str, dict]:
    """Returns the rollout shapes of a `bench_rollout` result by name: the plain rollouts' ("plain") and the
    worked-solution drain priced by their step costs ("all worked", `worked_shape`), those present."""
    return {name: data[key] for name, key in (("plain", "shape"), ("all worked", "worked_shape")) if key in data}


def shape_table(shapes: dict[str, dict]) -> Table:
    """Returns the table of rollout shapes (`rollout_shape` layouts by name): response-length quantiles and the
    share of decode time at each live-batch range."""
    table = Table(title="Rollout shape: response length in tokens (median, p90, p99, max), and the share of decode "
                        "time at each live batch (rows still generating)")
    for col in ("rollout", "median", "p90", "p99", "max", *RANGE_LABELS, f"<={SMALL_BATCH}"):
        table.add_column(col, justify="left" if col == "rollout" else "right")
    for name, shape in shapes.items():
        length = shape["length"]
        table.add_row(name, *(f"{length[q]:.0f}" for q in ("median", "p90", "p99", "max")),
                      *(f"{shape['batch_share'][label]:.0%}" for label in RANGE_LABELS),
                      f"{shape['small_batch_share']:.0%}")
    return table
