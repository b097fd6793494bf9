"""The share of a plain GRPO rollout's decode time at <= 16 live rows that a task's length distribution allows
once RL has made the policy work every problem, over a grid of the task's parameters, on this machine.

Every row writes a worked solution of its problem (the style GRPO drives the policy to), sampled on its own, P
prompts x G rows per rollout: for chainsum the rows of a prompt's group are then about as long as each other (the
problem sets the length), for redraw each row's own path sets it. Each decode step is priced by the plain step
cost that a `respec bench rollout` JSON measured (`step_cost`: median seconds per batch bucket, or from older JSON
a line, seconds = a + b x rows), beside a flat cost (a step costs the same at any batch, as on an accelerator far
from compute bound: the share of steps). Lengths are clipped to the task's completion budget. With chainsum's
min_operands 1 the bulk is one-number problems (``Q: 47=?``, answered ``Answer: 47``), the shortest answers there
are.

    python benchmarks/tail_bound.py --bench docs/results/rollout.json --policy POLICY_DIR [--task redraw]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

from respec.bench.rollout import step_cost_at, worked_lengths
from respec.engine.checkpoint import atomic_write_text
from respec.rl.rollout_shape import drain_shape
from respec.world.tasks import get_task, task_budget
from respec.world.tokenizer import load_tokenizer

GRIDS = {  # task options per grid point
    "chainsum": [dict(alpha=al, min_operands=lo_n, max_operands=mx, min_digits=lo, max_digits=hi)
                 for lo_n in (2, 1) for lo, hi in ((2, 3), (1, 1)) for mx in (10, 16, 24)
                 for al in (1.5, 2.0, 2.5, 3.0, 3.5)],
    "redraw": [dict(min_width=lo, max_width=hi) for lo, hi in ((10, 20), (20, 40), (30, 60), (40, 80), (20, 60))],
}


def step_price(step_cost) -> object:
    """Returns price(live rows) -> seconds from a bench JSON's plain `step_cost`: per-bucket medians, or a line
    [a, b] (seconds = a + b x rows) as older JSON recorded it."""
    if isinstance(step_cost, list):
        a, b = step_cost
        return lambda rows: a + b * rows
    costs = {0: {int(bucket): seconds for bucket, seconds in step_cost.items()}}
    return lambda rows: step_cost_at(costs, 0, rows)


def drain_row(batches: list[list[int]], price) -> dict:
    """Returns the drain of rollouts with these rows' decode steps priced by `price` and by a flat cost: length
    stats, the shares at <= 16 live rows (pooled and the mean of rollouts), and the priced decode seconds."""
    cpu = drain_shape(batches, price)
    flat = drain_shape(batches, lambda rows: 1.0)
    return {"length": cpu["length"], "small_share": cpu["small_batch_share"],
            "small_share_mean": cpu["small_batch_share_mean"], "flat_small_share": flat["small_batch_share"],
            "flat_small_share_mean": flat["small_batch_share_mean"], "decode_s": sum(cpu["batch_s"].values())}


def share_text(row: dict) -> str:
    """Returns the printed shares of a `drain_row`."""
    return (f"<= 16 rows: this machine {row['small_share']:.0%} (mean per rollout {row['small_share_mean']:.0%}), "
            f"flat cost {row['flat_small_share']:.0%} ({row['flat_small_share_mean']:.0%})")


def write_result(args, task: str, budget: int, step_cost, rows: list[dict]) -> None:
    """Writes the grid's rows with the command and settings to args.json (atomically) and says where."""
    data = {"command": shlex.join(["python", *sys.argv]), "task": task, "budget": budget, "step_cost": step_cost,
            "prompts": args.prompts, "samples": args.samples, "rollouts": args.rollouts, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="a respec bench rollout JSON with step_cost")
    ap.add_argument("--policy", type=Path, required=True, help="the policy directory whose tokenizer counts tokens")
    ap.add_argument("--task", choices=sorted(GRIDS), default="chainsum")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("runs/tail_bound.json"))
    args = ap.parse_args()
    plain = json.loads(args.bench.read_text())["step_cost"]["0"]
    price = step_price(plain)
    tok, budget = load_tokenizer(args.policy), task_budget(args.task)
    rows = []
    for g in GRIDS[args.task]:
        task = get_task(args.task, **g)
        batches = worked_lengths(task, tok, task.problems(args.prompts * args.rollouts, seed=0), args.prompts,
                                 args.samples, budget, random.Random(0))
        clipped = sum(n >= budget for b in batches for n in b) / sum(len(b) for b in batches)
        row = {**g, "clipped": clipped, **drain_row(batches, price)}
        rows.append(row)
        print(f"{' '.join(f'{k} {v}' for k, v in g.items())}: length median {row['length']['median']:.0f} "
              f"p99 {row['length']['p99']:.0f} max {row['length']['max']:.0f} (clipped {clipped:.2%}); "
              f"{share_text(row)}", flush=True)
    write_result(args, args.task, budget, plain, rows)


if __name__ == "__main__":
    main()
