"""The share of a plain GRPO rollout's decode time at <= 16 live rows for `probe`, the multi-turn task whose
lengths an environment sets, before any training, over a grid of its bar spreads, on this machine.

Every row writes the worked transcript of its own environment draws (row r of a rollout drawn with seed s has
nonce `ProbeTask.nonce(s, r)`), P prompts x G rows per rollout, tokenised turn by turn as a rollout holds it
(`world.env.encode_transcript`) and cut at the task's budget (policy and observation tokens together). A row's
decode steps are its policy tokens less one per continuation (a continuation's first token comes from its
prefill); observation tokens cost no decode step. Each decode step is priced by the plain step cost that a
`respec bench rollout` JSON measured (`step_cost`), beside a flat cost (the share of steps). Every continuation
goes back into the slot that holds its context and prefills the stop token and the observation: priced as one
forward over those positions (the measured step cost at that many rows), and reported beside the decode time
(continuations admitted at the same step share one forward in the engine, so this overstates them).

    python benchmarks/turns_bound.py --bench docs/results/rollout.json --policy POLICY_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from respec.world.env import encode_transcript
from respec.world.tasks import get_task, task_budget
from respec.world.tasks.probe import write_transcript
from respec.world.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from tail_bound import drain_row, share_text, step_price, write_result  # noqa: E402

GRID = [dict(min_bar=lo, max_bar=hi) for lo, hi in ((10, 96), (10, 97), (10, 98), (30, 97), (50, 90))]


def row_shape(tok, task, problem, nonce: int, budget: int) -> tuple[int, int, list[int]]:
    """Returns (decode steps, tokens after the prompt, the tokens every continuation prefills: its stop token and
    observation) of the worked transcript of one row, cut at `budget` tokens."""
    text = write_transcript(problem.meta["bar"], nonce, task.draws(problem, nonce))
    ids, generated = encode_transcript(tok, task, text)
    ids, generated = ids[:budget], generated[:budget]
    # A continuation starts after each observation that ends before the budget does.
    starts = [i for i in range(1, len(ids)) if generated[i] and not generated[i - 1]]
    observed = [next(j for j in range(i - 1, -1, -1) if generated[j]) for i in starts]  # each one's stop token
    return sum(generated) - len(starts), len(ids), [i - j for i, j in zip(starts, observed, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="a respec bench rollout JSON with step_cost")
    ap.add_argument("--policy", type=Path, required=True, help="the policy directory whose tokenizer counts tokens")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("runs/turns_bound.json"))
    args = ap.parse_args()
    plain = json.loads(args.bench.read_text())["step_cost"]["0"]
    price = step_price(plain)
    tok, budget = load_tokenizer(args.policy), task_budget("probe")
    rows = []
    for g in GRID:
        task = get_task("probe", **g)
        problems = task.problems(args.prompts * args.rollouts, seed=0)
        batches, tokens, prefill_s, clipped = [], [], 0.0, 0
        for r in range(args.rollouts):
            steps = []
            for i in range(args.prompts * args.samples):
                problem = problems[r * args.prompts + i // args.samples]
                n_steps, n_tokens, prefills = row_shape(tok, task, problem, task.nonce(r, i), budget)
                steps.append(n_steps)
                tokens.append(n_tokens)
                clipped += n_tokens >= budget
                prefill_s += sum(price(min(n, 128)) * max(1.0, n / 128) for n in prefills)
            batches.append(steps)
        row = {**g, **drain_row(batches, price), "tokens_mean": sum(tokens) / len(tokens),
               "clipped": clipped / len(tokens)}
        row["prefill_share"] = prefill_s / (prefill_s + row["decode_s"])
        rows.append(row)
        steps = row["length"]  # of decode steps per row
        print(f"bars {g['min_bar']}..{g['max_bar']}: decode steps per row median {steps['median']:.0f} "
              f"mean {steps['mean']:.1f} p99 {steps['p99']:.0f} max {steps['max']:.0f}, tokens mean "
              f"{row['tokens_mean']:.1f} (clipped {row['clipped']:.2%}); {share_text(row)}; continuation prefills "
              f"{row['prefill_share']:.0%} of rollout seconds", flush=True)
    write_result(args, "probe", budget, plain, rows)


if __name__ == "__main__":
    main()
