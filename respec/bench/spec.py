"""Speculative decoding vs plain decoding on the same engine, prompts and seeds: tokens/s, speedup and tokens
emitted per verify step, over batch sizes, temperatures and ways of choosing the draft length k.

Modes (cells per batch size and temperature):
- "plain": k = 0 every step, the reference of every speedup;
- "static": one cell per k in `ks`, that k every step; the grid reproduces the paper's first gap on the machine
  at hand (the speedup is largest at batch 1 and shrinks, or turns into a slowdown, as the batch grows);
- "adaptive": our tuner (`respec.engine.tuner.Tuner`) picks k in 0..max(ks) every step;
- "table": vLLM's dynamic SD, a k per batch-size range filled from this run's own plain/static grid of the same
  temperature (`respec.bench.policies.TablePolicy`, `table_from_cells`), as a vLLM user would fill it offline;
- "bandit": TLT/FastRL's epsilon-greedy bandit over the ks (`respec.bench.policies.BanditPolicy`), its SD gate
  set from the same grid (the largest batch at which the table speculates; FastRL's 32 without a grid).
Each adaptive cell starts cold: a fresh tuner on the engine's profiled costs (profiling happens once, before
any timing), a fresh bandit; each keeps learning over the cell's generate calls and repeats. Their `k` is the
mean chosen k over the decode steps of the kept pass.
`bench_spec` returns a JSON-able dict and, given a path, writes it atomically with a PNG beside it; it reports
progress through `log(message, fraction)` and prints nothing (`spec_tables` renders the results for the CLI).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from respec.bench.engine import Log, machine_info, no_progress, torch_threads, write_results
from respec.bench.plot import plot_bench_spec
from respec.bench.policies import BanditPolicy, TablePolicy, sd_threshold_from_table, table_from_cells
from respec.engine.generate import Engine, KChooser, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError
from respec.world.env import TaskEnv
from respec.world.tasks import DEFAULT_TASK

MODES = ("plain", "static", "adaptive", "table", "bandit")
CHOOSER_MODES = ("adaptive", "table", "bandit")  # k chosen per step; their cells' k is a mean
FASTRL_BS_THRESHOLD = 32  # verl/trainer/config/fastrl_trainer.yaml speculative.bs_threshold (mit-han-lab/fastrl)


@dataclass(frozen=True)
class SpecBenchConfig:
    """What `bench_spec` measures; the defaults are the grid of docs/results.md."""

    policy: str | None = None  # HF policy directory (with tokenizer); None = build/reuse the embedded default
    drafter: str | None = None  # EAGLE-3 drafter directory; None = build/reuse the default for the policy
    task: str = DEFAULT_TASK  # where the prompts come from (held-out problems)
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    ks: tuple[int, ...] = (1, 2, 4, 6, 8)  # static draft lengths; the choosers pick among them (tuner: 0..max)
    modes: tuple[str, ...] = MODES  # which cells to run (module docstring); "plain" is always needed
    max_new_tokens: int = 64
    repeats: int = 2  # timed runs per cell; the fastest is kept (the median is reported beside it)
    min_prompts: int = 16  # prompts per cell at least: a batch smaller than this runs in several calls
    seed: int = 0
    threads: int | None = 1  # torch CPU threads; 1 is steadier on a small or shared machine
    compile: str = "off"  # decode steps: "off" (eager) | "on" (torch.compile) | "auto" (the faster per profiled cell)
    device: str = "cpu"
    dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "ks", "temperatures", "modes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not self.ks or any(not 1 <= k <= 16 for k in self.ks):
            raise ConfigError(f"ks must be integers in [1, 16], got {list(self.ks)}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must be >= 0, got {list(self.temperatures)}")
        if self.max_new_tokens < 1 or self.repeats < 1 or self.min_prompts < 1:
            raise ConfigError("max_new_tokens, repeats and min_prompts must be >= 1")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown bench modes {unknown}: choose from {', '.join(MODES)}")
        if "plain" not in self.modes:
            raise ConfigError("modes must include 'plain': every speedup is relative to plain decoding")
        if "table" in self.modes and "static" not in self.modes:
            raise ConfigError("mode 'table' fills its table from this run's static cells: add 'static' to modes")
        object.__setattr__(self, "modes", tuple(m for m in MODES if m in self.modes))


def _timed(engine: Engine, batches: list[tuple[list[list[int]], TaskEnv | None]], params: SamplingParams,
           spec: SpecConfig, repeats: int, chooser: KChooser | None = None) -> dict:
    """Returns the fastest of `repeats` passes over every (prompts, environment) batch in turn (same seeds, so
    greedy passes of a fixed k are identical): tokens, seconds, tokens_per_s, mean_emitted_per_step (per row per
    verify step, 1.0 without one), mean_k (over decode steps), and tokens_per_s_median over the passes. Tokens
    count what the policy generated, not an environment's observations."""
    passes = []
    for _ in range(repeats):
        tokens = steps = k_sum = spec_rows = spec_emitted = 0
        t0 = time.perf_counter()
        for prompts, env in batches:
            if isinstance(chooser, BanditPolicy):
                chooser.reset_gate()  # each generate call is a rollout: FastRL closes its SD gate between them
            out = engine.generate(prompts, params, spec, chooser=chooser, env=env)
            tokens += out.num_generated
            steps += len(out.stats)
            k_sum += sum(s.k for s in out.stats)
            spec_rows += sum(s.batch for s in out.stats if s.k > 0)
            spec_emitted += sum(s.emitted for s in out.stats if s.k > 0)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - t0
        passes.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                       "mean_emitted_per_step": spec_emitted / spec_rows if spec_rows else 1.0,
                       "mean_k": k_sum / max(steps, 1)})
    best = max(passes, key=lambda p: p["tokens_per_s"])
    return {**best, "tokens_per_s_median": statistics.median(p["tokens_per_s"] for p in passes)}


def bench_spec(cfg: SpecBenchConfig | None = None, json_path: str | os.PathLike | None = None,
               log: Log | None = None, command: str | None = None) -> dict:
    """Returns {"command", "cells", "machine", "config", "policy", "drafter"}; writes JSON + PNG if json_path is
    given. `command` is recorded as the command line that produced the results (the CLI passes its own)."""
    from respec.engine.checkpoint import load_model
    from respec.engine.drafter import load_drafter
    from respec.engine.tuner import Tuner
    from respec.world.defaults import resolve_models
    from respec.world.env import task_env
    from respec.world.prompts import HELD_OUT_SEED, task_prompts

    cfg = cfg or SpecBenchConfig()
    log = log or no_progress
    k_max = max(cfg.ks)
    with torch_threads(cfg.threads):
        policy_dir, drafter_dir = resolve_models(cfg.policy, cfg.drafter, cfg.task, log=log)
        target = load_model(policy_dir, dtype=cfg.dtype, device=cfg.device)
        drafter = load_drafter(drafter_dir, target)
        engine = Engine(target, drafter, compile=cfg.compile, max_running=max(cfg.batch_sizes))
        # Small batches run several generate calls in turn (batch 1: 16 prompts one by one), so every cell
        # averages over at least `min_prompts` prompts instead of timing one short answer.
        n_prompts = max(max(cfg.batch_sizes), cfg.min_prompts)
        prompts = task_prompts(policy_dir, cfg.task, n_prompts, HELD_OUT_SEED)
        env = task_env(policy_dir, cfg.task, n_prompts, HELD_OUT_SEED, cfg.seed)  # a multi-turn task's turns
        engine.generate(prompts[:4], SamplingParams(max_new_tokens=8), SpecConfig(mode="static", k=2))  # warm-up
        # The tuner's cost profile is measured (or loaded) here, outside every timed region.
        profiled = engine.default_tuner(k_max) if "adaptive" in cfg.modes else None
        grid = [(batch, t) for batch in cfg.batch_sizes for t in cfg.temperatures]
        choosers = sum(m in cfg.modes for m in CHOOSER_MODES)
        per_point = ("plain" in cfg.modes) + len(cfg.ks) * ("static" in cfg.modes) + choosers + \
            (1 + ("static" in cfg.modes)) * (choosers > 0)
        cells, plain_tps = [], {}
        total = len(grid) * per_point

        def run(batch: int, temperature: float, mode: str, k: int | None, spec: SpecConfig,
                chooser: KChooser | None = None, **extra) -> None:
            log(f"spec: batch {batch} T={temperature:g} {mode}" + (f" k={k}" if k else ""), len(cells) / total)
            calls = max(1, cfg.min_prompts // batch)  # generate calls of `batch` prompts each
            batches = [(prompts[i * batch:(i + 1) * batch],
                        None if env is None else env.rows(i * batch, (i + 1) * batch)) for i in range(calls)]
            params = SamplingParams(temperature=temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            r = _timed(engine, batches, params, spec, cfg.repeats, chooser)
            if mode in ("plain", "plain_again"):  # plain runs first in each phase; later cells compare with the latest
                plain_tps[(batch, temperature)] = r["tokens_per_s"]
            ref = plain_tps[(batch, temperature)]
            cells.append({"batch": batch, "temperature": temperature, "mode": mode,
                          "k": r["mean_k"] if k is None else k, "tokens_per_s": r["tokens_per_s"],
                          "speedup_vs_plain": r["tokens_per_s"] / ref,
                          "tokens_per_s_median": r["tokens_per_s_median"],
                          "mean_emitted_per_step": r["mean_emitted_per_step"], "tokens": r["tokens"],
                          "seconds": r["seconds"], "prompts": calls * batch, **extra})

        # The fixed-k grid first: the table and the bandit's gate are filled from it.
        for batch, temperature in grid:
            run(batch, temperature, "plain", 0, SpecConfig(mode="off"))
            if "static" in cfg.modes:
                for k in cfg.ks:
                    run(batch, temperature, "static", k, SpecConfig(mode="static", k=k))
        adaptive = SpecConfig(mode="adaptive", k_max=k_max)
        for batch, temperature in grid:
            table = table_from_cells(c for c in cells if c["temperature"] == temperature) \
                if "static" in cfg.modes else None
            # The choosers run minutes after the grid; plain and the best static k are measured again right
            # before them, so that every ratio of a cell compares runs made close together in time (the
            # machine's speed drifts over a run on a shared host).
            run(batch, temperature, "plain_again", 0, SpecConfig(mode="off"))
            if "static" in cfg.modes:
                best_k = max((c for c in cells if (c["batch"], c["temperature"]) == (batch, temperature)
                              and c["mode"] == "static"), key=lambda c: c["tokens_per_s"])["k"]
                run(batch, temperature, "best_static_again", best_k, SpecConfig(mode="static", k=best_k))
            if "adaptive" in cfg.modes:
                run(batch, temperature, "adaptive", None, adaptive, Tuner(profiled.costs, k_max, profiled.config))
            if "table" in cfg.modes:
                policy = TablePolicy(table)
                run(batch, temperature, "table", None, adaptive, policy,
                    table=[list(r) for r in policy.vllm_schedule()])
            if "bandit" in cfg.modes:
                threshold = FASTRL_BS_THRESHOLD if table is None else sd_threshold_from_table(table)
                run(batch, temperature, "bandit", None, adaptive,
                    BanditPolicy(cfg.ks, sd_batch_threshold=threshold, seed=cfg.seed),
                    sd_batch_threshold=threshold)
        log("spec: done", 1.0)
        machine = machine_info(cfg.device)  # while the benchmark's thread count is still set
    order = {(b, t): i for i, (b, t) in enumerate(grid)}
    rank = ("plain", "static", "plain_again", "best_static_again", *CHOOSER_MODES)
    cells.sort(key=lambda c: (order[(c["batch"], c["temperature"])], rank.index(c["mode"])))  # stable: k order
    data = {"command": command or "python API: bench_spec(...)", "cells": cells, "machine": machine,
            "config": asdict(cfg), "policy": str(policy_dir), "drafter": str(drafter_dir)}
    if json_path is not None:
        write_results(data, Path(json_path), plot_bench_spec)
    return data


def best_cells(data: dict) -> list[dict]:
    """Returns, per (batch, temperature), the static cell with the highest speedup."""
    best: dict[tuple, dict] = {}
    for c in data["cells"]:
        key = (c["batch"], c["temperature"])
        if c["mode"] == "static" and (key not in best or c["speedup_vs_plain"] > best[key]["speedup_vs_plain"]):
            best[key] = c
    return list(best.values())


def spec_tables(data: dict) -> list[Table]:
    """Returns the tables of `bench_spec` data, for the caller to print: the static grid (speedup and tokens
    emitted per verify step for every k) and, per (batch, temperature), the best static k against the per-step
    choosers."""
    tables = []
    cells = data["cells"]
    points: dict[tuple, dict] = {}  # (batch, temperature) -> {"plain" | k of a static cell | chooser mode: cell}
    for c in cells:
        points.setdefault((c["batch"], c["temperature"]), {})[c["k"] if c["mode"] == "static" else c["mode"]] = c
    best = {(c["batch"], c["temperature"]): c for c in best_cells(data)}
    ks = sorted({c["k"] for c in cells if c["mode"] == "static"})
    if ks:
        table = Table(title="Speculative vs plain decoding, same engine/prompts/seeds: speedup (tokens per step)")
        for col in ("batch", "T", "plain tok/s", *(f"k={k}" for k in ks), "best"):
            table.add_column(col, justify="right")
        for (batch, temperature), row in points.items():
            b = best[(batch, temperature)]
            table.add_row(str(batch), f"{temperature:g}", f"{row['plain']['tokens_per_s']:.0f}",
                          *(f"{row[k]['speedup_vs_plain']:.2f}x ({row[k]['mean_emitted_per_step']:.2f})"
                            if k in row else "-" for k in ks),
                          f"{b['speedup_vs_plain']:.2f}x @k={b['k']}")
        tables.append(table)
    modes = [m for m in CHOOSER_MODES if any(c["mode"] == m for c in cells)]
    if not modes:
        return tables
    table = Table(title="Choosing k per step vs the best static k: speedup over plain (mean k)")
    ratio = "adaptive" in modes and bool(best)
    for col in ("batch", "T", "plain tok/s", *(["best static"] if best else []), *modes,
                *(["adaptive / best static"] if ratio else [])):
        table.add_column(col, justify="right")
    for key, row in points.items():
        b = row.get("best_static_again", best.get(key))  # measured beside the choosers when present
        table.add_row(str(key[0]), f"{key[1]:g}", f"{row.get('plain_again', row['plain'])['tokens_per_s']:.0f}",
                      *([f"{b['speedup_vs_plain']:.2f}x (k={b['k']})"] if best else []),
                      *(f"{row[m]['speedup_vs_plain']:.2f}x ({row[m]['k']:.1f})" if m in row else "-" for m in modes),
                      *([f"{row['adaptive']['tokens_per_s'] / b['tokens_per_s']:.2f}"] if ratio else []))
    return [*tables, table]
