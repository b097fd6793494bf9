"""The share of a plain GRPO rollout's decode time at <= 16 live rows that chainsum's length distribution allows
once RL has made the policy work every problem, over a grid of the task's size parameters, on this machine.

Every row writes its problem's worked solution (the style GRPO drives the policy to; the rows of a prompt's group
are then as long as each other), P prompts x G rows per rollout, and each decode step is priced by the plain step
cost that a `respec bench rollout` JSON measured (`step_cost`: median seconds per batch bucket), beside a flat cost (a
step costs the same at any batch, as on an accelerator far from compute bound: the share of steps). With
min_operands 1 the bulk is one-number problems (``Q: 47=?``, answered ``Answer: 47``), the shortest answers there are.

    python benchmarks/tail_bound.py --bench docs/results/rollout.json --policy POLICY_DIR
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

from respec.bench.rollout import step_cost_at
from respec.engine.checkpoint import atomic_write_text
from respec.rl.rollout_shape import drain_shape
from respec.world.tasks.chainsum import ChainSumTask
from respec.world.tokenizer import load_tokenizer


def lengths(task: ChainSumTask, tok, n: int, seed: int) -> list[int]:
    """Returns the token lengths (+ eos) of `n` problems' worked solutions."""
    rng = random.Random(seed)
    return [len(tok.encode(task.sft_completion(p, rng, "worked")[0], add_special_tokens=False)) + 1
            for p in task.problems(n, seed)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="a respec bench rollout JSON with step_cost")
    ap.add_argument("--policy", type=Path, required=True, help="the policy directory whose tokenizer counts tokens")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("runs/tail_bound.json"))
    args = ap.parse_args()
    plain = json.loads(args.bench.read_text())["step_cost"]["0"]
    costs = {0: {int(b): seconds for b, seconds in plain.items()}}
    tok = load_tokenizer(args.policy)
    grid = [dict(alpha=al, min_operands=lo_n, max_operands=mx, min_digits=lo, max_digits=hi)
            for lo_n in (2, 1) for lo, hi in ((2, 3), (1, 1)) for mx in (10, 16, 24) for al in (1.5, 2.0, 2.5, 3.0, 3.5)]
    rows = []
    for g in grid:
        task = ChainSumTask(**g)
        ls = lengths(task, tok, args.prompts * args.rollouts, seed=0)
        batches = [[n for n in ls[i:i + args.prompts] for _ in range(args.samples)]
                   for i in range(0, len(ls), args.prompts)]
        cpu = drain_shape(batches, lambda rows: step_cost_at(costs, 0, rows))
        flat = drain_shape(batches, lambda rows: 1.0)
        row = {**g, "length": cpu["length"], "small_share": cpu["small_batch_share"],
               "small_share_mean": cpu["small_batch_share_mean"], "flat_small_share": flat["small_batch_share"],
               "flat_small_share_mean": flat["small_batch_share_mean"]}
        rows.append(row)
        print(f"alpha {g['alpha']:.1f} operands {g['min_operands']}-{g['max_operands']:<2} digits "
              f"{g['min_digits']}-{g['max_digits']}: length median {row['length']['median']:.0f} "
              f"p99 {row['length']['p99']:.0f} max {row['length']['max']:.0f}; <= 16 rows: this machine "
              f"{row['small_share']:.0%} (mean per rollout {row['small_share_mean']:.0%}), flat cost "
              f"{row['flat_small_share']:.0%} ({row['flat_small_share_mean']:.0%})", flush=True)
    data = {"command": shlex.join(["python", *sys.argv]), "step_cost": plain, "prompts": args.prompts,
            "samples": args.samples, "rollouts": args.rollouts, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
