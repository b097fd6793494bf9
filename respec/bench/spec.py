"""Speculative decoding vs plain decoding on the same engine, prompts and seeds: tokens/s, speedup and tokens
emitted per verify step, over batch sizes, temperatures and draft lengths k.

The table reproduces the paper's first gap on the machine at hand: the speedup is largest at batch 1 and
shrinks (or turns into a slowdown) as the batch grows and verification becomes compute bound.
`bench_spec` returns a JSON-able dict and, given a path, writes it atomically with a PNG beside it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from respec.bench.engine import machine_info, torch_threads, write_results
from respec.bench.plot import plot_bench_spec
from respec.engine.generate import Engine, GenerationResult, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError


@dataclass(frozen=True)
class SpecBenchConfig:
    """What `bench_spec` measures; the defaults are the grid of benchmarks/RESULTS.md."""

    policy: str | None = None  # HF policy directory (with tokenizer); None = build/reuse the embedded default
    drafter: str | None = None  # EAGLE-3 drafter directory; None = build/reuse the default for the policy
    task: str = "arithmetic"  # where the prompts come from (held-out problems)
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    ks: tuple[int, ...] = (1, 2, 4, 6, 8)  # static draft lengths compared against plain decoding
    max_new_tokens: int = 64
    repeats: int = 2  # timed runs per cell (after one warm-up run); the fastest is kept
    min_prompts: int = 16  # prompts per cell at least: a batch smaller than this runs in several calls
    seed: int = 0
    threads: int | None = 1  # torch CPU threads; 1 is steadier on a small or shared machine
    device: str = "cpu"
    dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "ks", "temperatures"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not self.ks or any(not 1 <= k <= 16 for k in self.ks):
            raise ConfigError(f"ks must be integers in [1, 16], got {list(self.ks)}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must be >= 0, got {list(self.temperatures)}")
        if self.max_new_tokens < 1 or self.repeats < 1 or self.min_prompts < 1:
            raise ConfigError("max_new_tokens, repeats and min_prompts must be >= 1")


def _timed(engine: Engine, batches: list[list[list[int]]], params: SamplingParams, spec: SpecConfig,
           repeats: int) -> tuple[int, float, float]:
    """Returns (tokens, wall seconds, mean emitted per step) of generating every batch in turn, the fastest
    of `repeats` passes (same seeds, so greedy passes are identical)."""
    best = None
    for _ in range(repeats):
        tokens = emitted = rows = 0
        t0 = time.perf_counter()
        for prompts in batches:
            out: GenerationResult = engine.generate(prompts, params, spec)
            tokens += out.num_tokens
            emitted += sum(s.emitted for s in out.stats)
            rows += sum(s.batch for s in out.stats)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - t0
        if best is None or tokens / seconds > best[0] / best[1]:
            best = (tokens, seconds, emitted / max(rows, 1))
    return best


def bench_spec(cfg: SpecBenchConfig | None = None, json_path: str | os.PathLike | None = None,
               console: Console | None = None) -> dict:
    """Returns {"cells", "machine", "config", "policy", "drafter"}; writes JSON + PNG if json_path is given."""
    from respec.engine.checkpoint import load_model
    from respec.engine.drafter import load_drafter
    from respec.world.defaults import resolve_models
    from respec.world.prompts import HELD_OUT_SEED, task_prompts

    cfg = cfg or SpecBenchConfig()
    console = console or Console()
    with torch_threads(cfg.threads):
        policy_dir, drafter_dir = resolve_models(cfg.policy, cfg.drafter, cfg.task)
        target = load_model(policy_dir, dtype=cfg.dtype, device=cfg.device)
        drafter = load_drafter(drafter_dir, target)
        engine = Engine(target, drafter)
        # Small batches run several generate calls in turn (batch 1: 16 prompts one by one), so every cell
        # averages over at least `min_prompts` prompts instead of timing one short answer.
        n_prompts = max(max(cfg.batch_sizes), cfg.min_prompts)
        prompts = task_prompts(policy_dir, cfg.task, n_prompts, HELD_OUT_SEED)
        engine.generate(prompts[:4], SamplingParams(max_new_tokens=8), SpecConfig(mode="static", k=2))  # warm-up
        cells = []
        total = len(cfg.batch_sizes) * len(cfg.temperatures) * (1 + len(cfg.ks))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("bench spec", total=total)
            for batch in cfg.batch_sizes:
                rounds = max(1, cfg.min_prompts // batch)
                batches = [prompts[i * batch:(i + 1) * batch] for i in range(rounds)]
                for temperature in cfg.temperatures:
                    params = SamplingParams(temperature=temperature, max_new_tokens=cfg.max_new_tokens,
                                            seed=cfg.seed)
                    runs = [("plain", 0, SpecConfig(mode="off"))]
                    runs += [("static", k, SpecConfig(mode="static", k=k)) for k in cfg.ks]
                    plain_tps = None
                    for mode, k, spec in runs:
                        bar.update(task, description=f"batch {batch} T={temperature} {mode} k={k}")
                        tokens, seconds, emitted = _timed(engine, batches, params, spec, cfg.repeats)
                        tps = tokens / seconds
                        plain_tps = plain_tps or tps
                        cells.append({"batch": batch, "temperature": temperature, "mode": mode, "k": k,
                                      "tokens_per_s": tps, "speedup_vs_plain": tps / plain_tps,
                                      "mean_emitted_per_step": emitted, "tokens": tokens,
                                      "seconds": seconds, "prompts": rounds * batch})
                        bar.advance(task)
        machine = machine_info(cfg.device)  # while the benchmark's thread count is still set
    data = {"cells": cells, "machine": machine, "config": asdict(cfg),
            "policy": str(policy_dir), "drafter": str(drafter_dir)}
    print_spec_table(data, console)
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


def print_spec_table(data: dict, console: Console) -> None:
    """Prints speedup (and tokens emitted per verify step) for every (batch, temperature) row and k column."""
    ks = sorted({c["k"] for c in data["cells"] if c["mode"] == "static"})
    table = Table(title="Speculative vs plain decoding, same engine/prompts/seeds: speedup (tokens per step)")
    for col in ("batch", "T", "plain tok/s", *(f"k={k}" for k in ks), "best"):
        table.add_column(col, justify="right")
    best = {(c["batch"], c["temperature"]): c for c in best_cells(data)}
    for (batch, temperature), b in best.items():
        row = {c["k"]: c for c in data["cells"] if (c["batch"], c["temperature"]) == (batch, temperature)}
        table.add_row(str(batch), f"{temperature:g}", f"{row[0]['tokens_per_s']:.0f}",
                      *(f"{row[k]['speedup_vs_plain']:.2f}x ({row[k]['mean_emitted_per_step']:.2f})" for k in ks),
                      f"{b['speedup_vs_plain']:.2f}x @k={b['k']}")
    console.print(table)

