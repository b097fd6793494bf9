"""What a mid-rollout drafter swap costs: tokens per verify step of one static-k rollout while an identical copy
of the drafter is published every N decode steps (as the online learner publishes between decode steps).

An identical copy drafts exactly what the original drafts when it sees the same context, so any loss is the
engine's: a swapped-in drafter catches up on the recorded history, so it should lose nothing (a drafter that
started from an empty cache would lose most of a verify step's tokens after every swap).

    python benchmarks/swap_cost.py [--policy DIR --drafter DIR] [--every 0,8,3] [--json runs/bench/swap_cost.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from respec.engine.checkpoint import load_model
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.world.defaults import resolve_models
from respec.world.prompts import HELD_OUT_SEED, encode_prompt
from respec.world.tasks import get_task
from respec.world.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--every", default="0,8,3", help="publish a copy every N decode steps (0 = never)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, drafter_dir = resolve_models(args.policy, args.drafter, "arithmetic")
    target = load_model(policy)
    drafter = load_drafter(drafter_dir, target)
    twin = copy.deepcopy(drafter)
    tokenizer = load_tokenizer(policy)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in get_task("arithmetic").problems(args.prompts, HELD_OUT_SEED)]
    engine = Engine(target, drafter)
    params = SamplingParams(temperature=1.0, max_new_tokens=96, seed=11)
    results = {}
    for every in (int(e) for e in args.every.split(",")):
        steps = [0]

        def on_step(stats, every=every, steps=steps):
            steps[0] += 1
            if every and steps[0] % every == 0:
                engine.set_drafter((drafter, twin)[steps[0] // every % 2], version=steps[0])

        out = engine.generate(prompts, params, SpecConfig(mode="static", k=args.k), on_step=on_step)
        engine.set_drafter(drafter, version=0)
        results[every] = out.mean_emitted_per_step
        print(f"publish every {every or 'never':>5}: {out.mean_emitted_per_step:.3f} tokens per verify step "
              f"({out.mean_emitted_per_step / results[next(iter(results))]:.2f}x the first row)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"k": args.k, "tokens_per_verify": results}, indent=1))


if __name__ == "__main__":
    main()
