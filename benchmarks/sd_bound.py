"""What bounds speculative decoding at batch 1 on this machine: the cost of a decode step with k drafts, split into
its target forwards, its drafter forwards and the rest, beside the tokens each step emits.

Runs the engine (policy and drafter of the embedded world, or given directories) over held-out prompts one at a time
(a multi-turn task's each with its environment; tokens are the policy's), plain and with static k, interleaved, the
fastest of `--repeats` passes per mode. Forward hooks time every target and drafter call (a drafter call: a chained
draft, a step's catch-up or a prompt's prefill; the CPU runs them synchronously, on a GPU the script synchronises
around each call). For each k it reports the speedup over plain decoding, tokens per verify step, the step's
milliseconds by part, the drafter call's cost as a share of a plain step, and the speedup the same steps would give
with a free drafter (tokens per step x plain step / (step - drafter part)): a goal above that is out of reach
without a cheaper verify, whatever the drafter. Beside them, the bound of the engine's decode step alone (the
tuner's start-up profile of plain and k-draft steps, faster path per k, without the generate loop around it): tokens
per step x t(1, 0) / t(1, k).

    python benchmarks/sd_bound.py --compile auto --json docs/results/sd_bound.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from respec.bench.engine import machine_info, write_results
from respec.bench.plot import plot_sd_bound
from respec.engine.checkpoint import load_model
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.world.defaults import DEFAULT_TASK, resolve_models
from respec.world.env import task_env
from respec.world.prompts import HELD_OUT_SEED, task_prompts


class CallTimer:
    """Sums the wall time of a module's forward calls (pre- and post-forward hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self.calls, self._t0, self._device = 0.0, 0, 0.0, device
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _start(self, *_) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--task", default=DEFAULT_TASK)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--ks", default="1,2,3,4,6")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("runs/sd_bound.json"), help="writes JSON + PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy_dir, drafter_dir = resolve_models(args.policy, args.drafter, args.task)
    target = load_model(policy_dir)
    drafter = load_drafter(drafter_dir, target)
    engine = Engine(target, drafter, compile=args.compile, max_running=1)
    device = engine.device
    prompts = task_prompts(policy_dir, args.task, args.prompts, HELD_OUT_SEED)
    env = task_env(policy_dir, args.task, args.prompts, HELD_OUT_SEED, 0)  # a multi-turn task's turns, row by row
    ks = [int(k) for k in args.ks.split(",")]
    modes = [("plain", SpecConfig(mode="off"))] + [(f"k={k}", SpecConfig(mode="static", k=k)) for k in ks]
    timers = {"target": CallTimer(target, device), "drafter": CallTimer(drafter, device)}
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    # The compiled path's graphs and the tuner's step profile (the engine's decode step alone, no generate loop
    # around it, the faster path per k), outside the timed passes.
    profile = engine.default_tuner(max(ks)).costs.steps[0]  # seconds per step at batch 1, k = 0..max

    def run(spec: SpecConfig) -> dict:
        for t in timers.values():
            t.take()
        tokens = steps = 0
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            out = engine.generate([p], params, spec, env=None if env is None else env.rows(i, i + 1))
            tokens += out.num_generated
            steps += len(out.stats)
        seconds = time.perf_counter() - t0
        parts = {name: t.take() for name, t in timers.items()}
        return {"seconds": seconds, "tokens": tokens, "steps": steps,
                **{f"{name}_seconds": s for name, (s, _) in parts.items()},
                **{f"{name}_calls": c for name, (_, c) in parts.items()}}

    for _, spec in modes:  # warm every path once
        run(spec)
    passes: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for _ in range(args.repeats):
        for name, spec in modes:
            passes[name].append(run(spec))
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in passes.items()}
    plain = best["plain"]
    plain_step = plain["seconds"] / plain["steps"]
    plain_tps = plain["tokens"] / plain["seconds"]
    drafter_call = None
    rows = []
    for name, r in best.items():
        step = r["seconds"] / r["steps"]
        per_step = {part: r[f"{part}_seconds"] / r["steps"] for part in timers}
        tokens_per_step = r["tokens"] / r["steps"]
        row = {"mode": name, "speedup": r["tokens"] / r["seconds"] / plain_tps, "tokens_per_step": tokens_per_step,
               "step_ms": 1e3 * step, **{f"{part}_ms": 1e3 * v for part, v in per_step.items()},
               "other_ms": 1e3 * (step - sum(per_step.values())), **r}
        if r["drafter_calls"]:
            call = r["drafter_seconds"] / r["drafter_calls"]
            drafter_call = call if drafter_call is None else min(drafter_call, call)
            row["drafter_call_vs_plain_step"] = call / plain_step
            row["free_drafter_bound"] = tokens_per_step * plain_step / (step - per_step["drafter"])
            k = int(name.removeprefix("k="))
            row["profiled_step_ratio"] = profile[k] / profile[0]
            row["profiled_bound"] = tokens_per_step * profile[0] / profile[k]
        rows.append(row)
    print(f"{'mode':>6} {'speedup':>8} {'tok/step':>8} {'step ms':>8} {'target':>7} {'drafter':>8} {'other':>6} "
          f"{'free-drafter bound':>18} {'profiled bound':>14}")
    for row in rows:
        bound, profiled = row.get("free_drafter_bound"), row.get("profiled_bound")
        print(f"{row['mode']:>6} {row['speedup']:>7.2f}x {row['tokens_per_step']:>8.2f} {row['step_ms']:>8.2f} "
              f"{row['target_ms']:>7.2f} {row['drafter_ms']:>8.2f} {row['other_ms']:>6.2f} "
              f"{'' if bound is None else f'{bound:.2f}x':>18} "
              f"{'' if profiled is None else f'{profiled:.2f}x':>14}")
    print(f"one drafter call: {1e3 * drafter_call:.2f} ms = {drafter_call / plain_step:.2f} of a plain step "
          f"({1e3 * plain_step:.2f} ms)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": "python benchmarks/sd_bound.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json")
        + f" --json {args.json}", "machine": machine_info(str(device)), "policy": str(policy_dir),
        "drafter": str(drafter_dir), "rows": rows}
    print("wrote", *write_results(data, args.json, plot_sd_bound))


if __name__ == "__main__":
    main()
