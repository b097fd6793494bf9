"""The online learner's cost to the other phases of an RL step when it runs as a thread beside them.

One trainer (the embedded policy and drafter unless --policy/--drafter), one step of GRPO to fill the learner's
buffer, then `--repeats` rounds of the identical rollout (same prompts, seed and static k, so the same work) and
the identical policy update (the same batch; the actor is restored after each) under three sides, in an order
that rotates every round:

- idle: the learner holds still;
- thread: the trainer's own learner thread trains (as `learner.mode=async` does during training).

A rollout is a chain of small ops, each of which takes the GIL back after its kernel: a learner thread in the
same process competes for it, and for the cores, caches and memory. The rollout's thread
CPU seconds are kept beside its wall seconds (wall - CPU = time it waited, e.g. for the GIL). Writes JSON with
every timing.

    python benchmarks/learner_overhead.py [--repeats 5] [--k 1] [--json runs/bench/learner_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from respec.engine.generate import SpecConfig
from respec.engine.sampling import SamplingParams
from respec.rl.config import LearnerConfig, RolloutConfig, TrainConfig, TrainerConfig
from respec.rl.grpo import group_advantages
from respec.rl.trainer import Trainer
from respec.world.defaults import resolve_models

SIDES = ("idle", "thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=1, help="static k of the timed rollouts (0: plain)")
    ap.add_argument("--out", default="runs/bench/learner_overhead_run")
    ap.add_argument("--json", default="runs/bench/learner_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, drafter = resolve_models(args.policy, args.drafter, "arithmetic")
    config = TrainConfig(trainer=TrainerConfig(model=str(policy), eval_before_train=False, eval_every=0,
                                               save_every=0),
                         rollout=RolloutConfig(drafter=str(drafter)),
                         learner=LearnerConfig(mode="async"))
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    trainer = Trainer.start(config, out)
    trainer.step()  # fills the buffer
    learner = trainer.learner
    learner.grant(0)
    learner.wait_idle()
    learner.publish_fn = lambda d, v: None  # the drafter stays the same: identical rollouts on every side
    G = config.rollout.group_size
    problems = trainer.problems.next(16)
    prompts = [trainer.rollout.encode(p) for p in problems for _ in range(G)]
    params = SamplingParams(temperature=1.0, max_new_tokens=config.rollout.max_new_tokens, seed=1234)
    spec = SpecConfig(mode="static", k=args.k) if args.k else SpecConfig(mode="off")
    result = trainer.engine.generate(prompts, params, spec)
    texts = trainer.rollout.tokenizer.batch_decode([s.tokens for s in result.sequences], skip_special_tokens=True)
    rewards = torch.tensor([float(trainer.rollout.reward_fn(problems[i // G], t)) for i, t in enumerate(texts)])
    batch = trainer.rollout._batch(prompts, result, group_advantages(rewards, G))
    actor_state = copy.deepcopy(trainer.actor.state_dict())
    optim_state = copy.deepcopy(trainer.update.optimizer.state_dict())

    def rollout() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        trainer.engine.generate(prompts, params, spec)
        return time.perf_counter() - t0, time.thread_time() - c0

    def update() -> float:
        t0 = time.perf_counter()
        trainer.update.run(batch, rewards, 1, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        trainer.actor.load_state_dict(actor_state)  # the same update every time
        trainer.update.optimizer.load_state_dict(optim_state)
        return seconds

    sides = {"thread": learner}
    times: dict[str, dict[str, list[float]]] = {s: {"rollout": [], "rollout_cpu": [], "update": []} for s in SIDES}
    rollout(), update()  # warm-up
    for i in range(args.repeats):
        for side in SIDES[i % 2:] + SIDES[: i % 2]:
            busy = sides.get(side)
            if busy is not None:
                busy.grant(10 ** 9)
                time.sleep(0.3)  # the learner is mid-step
            wall, cpu = rollout()
            seconds = update()
            if busy is not None:
                busy.grant(0)  # after its step in flight
                busy.wait_idle()
            times[side]["rollout"].append(wall)
            times[side]["rollout_cpu"].append(cpu)
            times[side]["update"].append(seconds)
    trainer.close()
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    report = {"times": times, "median": med, "k": args.k, "batch": len(prompts),
              "overhead": {s: {k: med[s][k] / med["idle"][k] for k in med[s]} for s in SIDES}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(prompts)} rows, {'static k=' + str(args.k) if args.k else 'plain'}; medians of {args.repeats}, "
          "ratio to idle in parentheses:")
    for s in SIDES:
        o = report["overhead"][s]
        print(f"  learner {s:8s} rollout {med[s]['rollout']:.3f} s ({o['rollout']:.2f}x), its CPU "
              f"{med[s]['rollout_cpu']:.3f} s ({o['rollout_cpu']:.2f}x); update {med[s]['update']:.3f} s "
              f"({o['update']:.2f}x)")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
