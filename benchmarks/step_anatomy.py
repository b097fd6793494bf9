"""Where a decode step's time goes: plain and speculative steps of a GRPO-shaped rollout, by part, per live-batch
range. It explains a rollout ratio (`respec bench rollout`, `respec experiment`): speculative decoding pays only
where a verify step over k + 1 tokens plus the drafter costs less than E(k) plain steps.

Each mode (plain, static k for each --ks) rolls out the same prompts (P x G at T = 1) `--repeats` times after one
untimed pass; the engine's step functions are wrapped with timers (the target forward, the drafter's forwards,
the rejection rule, the bookkeeping of stops, budgets and outputs), each step filed under its live batch's range.
On a CPU every op is synchronous, so wall time per part is that part's cost; on CUDA the timers sync first.

    python benchmarks/step_anatomy.py --policy DIR --drafter DIR [--ks 1,2,4] [--repeats 3]
        [--json runs/bench/step_anatomy.json]

Prints, per batch range and mode, milliseconds per step by part and tokens emitted per row per step; writes the
JSON and a PNG (stacked bars of the parts, one panel per batch range).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import respec.engine.generate as generate
from respec.bench.engine import machine_info, write_results
from respec.engine.checkpoint import atomic_write_bytes, load_model, torch_threads
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.engine.tuner import sync_device
from respec.world.prompts import HELD_OUT_SEED, task_prompts

RANGES = ((96, 10 ** 9), (32, 95), (9, 31), (1, 8))  # live batch ranges, largest first
PARTS = ("target forward", "drafter", "rejection", "commit", "other")


class Timers:
    """Accumulates seconds per (batch range, mode, part) while the wrapped engine runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[tuple[str, str, str], float] = defaultdict(float)
        self.steps: dict[tuple[str, str], int] = defaultdict(int)
        self.emitted: dict[tuple[str, str], float] = defaultdict(float)  # tokens per row, summed over steps
        self.mode = ""
        self.range = ""
        self.depth = 0  # nested timers (a drafter forward inside draft) count once

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            if self.depth or not self.range:
                return fn(*args, **kwargs)
            self.depth += 1
            sync_device(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync_device(self.device)
                self.seconds[(self.range, self.mode, part)] += time.perf_counter() - t0
                self.depth -= 1
        return wrapper


def batch_range(batch: int) -> str:
    lo, hi = next((lo, hi) for lo, hi in RANGES if lo <= batch <= hi)
    return f"{lo}+" if hi >= 10 ** 9 else f"{lo}-{hi}"


def install(timers: Timers, engine: Engine) -> None:
    """Wraps the engine's step parts with timers (this process only: a benchmark, not a library feature)."""
    decode, book = Engine._decode, Engine._book

    def timed_decode(self, tab, b, k):
        timers.range = batch_range(len(b.live))
        sync_device(timers.device)
        t0 = time.perf_counter()
        out = decode(self, tab, b, k)
        sync_device(timers.device)
        timers.seconds[(timers.range, timers.mode, "step")] += time.perf_counter() - t0
        return out

    def timed_book(self, tab, b, k, host, flushed):
        key = (timers.range, timers.mode)
        t0 = time.perf_counter()
        accepted, advanced = book(self, tab, b, k, host, flushed)
        seconds = time.perf_counter() - t0  # host-side bookkeeping: part of the step's commit
        timers.seconds[(*key, "step")] += seconds
        timers.seconds[(*key, "commit")] += seconds
        timers.steps[key] += 1
        timers.emitted[key] += sum(accepted) / len(accepted) + 1
        timers.range = ""
        return accepted, advanced

    Engine._decode, Engine._book = timed_decode, timed_book
    # The drafter's forwards (catch-up, chained drafts, the prompt's drafter prefill); the sampling of the chained
    # drafts falls under "other".
    engine.drafter.forward = timers.timed("drafter", engine.drafter.forward)
    generate.catch_up = timers.timed("drafter", generate.catch_up)
    generate.drafter_prefill = timers.timed("drafter", generate.drafter_prefill)
    generate.finish = timers.timed("commit", generate.finish)
    generate.rejection_sample = timers.timed("rejection", generate.rejection_sample)
    engine.target.forward = timers.timed("target forward", engine.target.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=Path("runs/bench/step_anatomy.json"))
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    with torch_threads(args.threads):
        target = load_model(args.policy, device=args.device)
        engine = Engine(target, load_drafter(args.drafter, target))
        timers = Timers(engine.device)
        install(timers, engine)
        prompts = [p for p in task_prompts(args.policy, args.task, args.prompts, HELD_OUT_SEED)
                   for _ in range(args.samples)]
        params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        modes = {"plain": SpecConfig(mode="off"), **{f"k={k}": SpecConfig(mode="static", k=k) for k in ks}}
        totals: dict[str, list[float]] = defaultdict(list)
        for r in range(args.repeats + 1):  # repeat 0 warms up and is not counted
            for name, spec in modes.items():
                timers.mode = name if r else "warm-up"
                t0 = time.perf_counter()
                engine.generate(prompts, params, spec)
                if r:
                    totals[name].append(time.perf_counter() - t0)
    rows = []
    for lo, _ in RANGES:
        rng = batch_range(lo)
        for name in modes:
            steps = timers.steps[(rng, name)]
            if not steps:
                continue
            ms = {part: 1e3 * timers.seconds[(rng, name, part)] / steps for part in PARTS[:-1]}
            ms["other"] = 1e3 * timers.seconds[(rng, name, "step")] / steps - sum(ms.values())
            rows.append({"batch": rng, "mode": name, "steps": steps, "ms_per_step": ms,
                         "step_ms": sum(ms.values()), "emitted_per_row": timers.emitted[(rng, name)] / steps})
    plain = {r["batch"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:  # tokens per second per row against plain decoding in the same batch range
        p = plain.get(r["batch"])
        r["vs_plain"] = (r["emitted_per_row"] / r["step_ms"]) / (1 / p["step_ms"]) if p else None
    data = {"rows": rows, "rollout_s": {m: statistics.median(v) for m, v in totals.items()},
            "config": vars(args) | {"json": str(args.json)}, "machine": machine_info(args.device)}
    print(f"{'batch':>7} {'mode':>6} {'steps':>5} " + " ".join(f"{p:>15}" for p in PARTS)
          + f" {'step ms':>8} {'tokens/row':>10} {'vs plain':>8}")
    for r in rows:
        print(f"{r['batch']:>7} {r['mode']:>6} {r['steps']:>5} "
              + " ".join(f"{r['ms_per_step'][p]:>15.2f}" for p in PARTS)
              + f" {r['step_ms']:>8.2f} {r['emitted_per_row']:>10.2f} {r['vs_plain'] or 0:>7.2f}x")
    plain_s = data["rollout_s"]["plain"]
    print("rollout seconds (median): " + ", ".join(f"{m} {s:.3f} ({plain_s / s:.2f}x)"
                                                  for m, s in data["rollout_s"].items()))
    json_path, png = write_results(data, args.json, plot)
    print(f"wrote {json_path} and {png}")


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges = list(dict.fromkeys(r["batch"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(ranges), figsize=(4 * len(ranges), 4), squeeze=False)
    for ax, rng in zip(axes[0], ranges, strict=True):
        rows = [r for r in data["rows"] if r["batch"] == rng]
        bottom = [0.0] * len(rows)
        for part in PARTS:
            values = [r["ms_per_step"][part] for r in rows]
            ax.bar([r["mode"] for r in rows], values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for i, r in enumerate(rows):
            ax.text(i, bottom[i], f"{r['emitted_per_row']:.2f} tok\n{r['vs_plain']:.2f}x", ha="center",
                    va="bottom", fontsize=8)
        ax.set_title(f"live batch {rng}")
        ax.set_ylabel("ms per decode step")
        ax.set_ylim(0, max(bottom) * 1.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("decode step anatomy: plain vs speculative (tokens per row per step, rate vs plain)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


if __name__ == "__main__":
    main()
