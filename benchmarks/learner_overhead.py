"""The online learner's cost to rollout: the same rollout batch timed with the learner thread idle and busy.

One trainer (the embedded policy and drafter unless --policy/--drafter), one step of GRPO to fill the learner's
buffer, then `--repeats` pairs of the identical rollout (same prompts, seed and static k, so the same work):
once with the learner idle, once while it trains. Pairs alternate which side runs first; the ratio of medians is
the overhead. Writes JSON with every timing.

    python benchmarks/learner_overhead.py --json runs/bench/learner_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from respec.engine.generate import SpecConfig
from respec.engine.sampling import SamplingParams
from respec.rl.config import LearnerConfig, RolloutConfig, TrainConfig, TrainerConfig
from respec.rl.trainer import Trainer
from respec.world.defaults import resolve_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None)
    ap.add_argument("--drafter", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
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
    prompts = [trainer._encode(p) for p in trainer._next_problems(16) for _ in range(8)]
    params = SamplingParams(temperature=1.0, max_new_tokens=config.rollout.max_new_tokens, seed=1234)
    spec = SpecConfig(mode="static", k=args.k)
    publish = learner.publish_fn
    learner.publish_fn = lambda d, v: None  # the drafter stays the same: identical rollouts on both sides

    def rollout() -> float:
        t0 = time.perf_counter()
        trainer.engine.generate(prompts, params, spec)
        return time.perf_counter() - t0

    def busy(flag: threading.Event) -> None:
        learner.grant(10 ** 9)
        flag.set()

    def idle() -> None:
        learner.grant(0)
        with learner.paused():  # waits for the step in flight
            pass

    idle_s, busy_s, steps = [], [], []
    rollout()  # warm-up
    for i in range(args.repeats):
        for side in (("idle", "busy") if i % 2 == 0 else ("busy", "idle")):
            if side == "busy":
                flag = threading.Event()
                busy(flag)
                flag.wait()
                time.sleep(0.2)  # the learner is mid-step
                before = learner.steps
                busy_s.append(rollout())
                steps.append(learner.steps - before)
                idle()
            else:
                idle_s.append(rollout())
    learner.publish_fn = publish
    trainer.close()
    report = {"idle_s": idle_s, "busy_s": busy_s, "learner_steps_during_busy": steps,
              "overhead": statistics.median(busy_s) / statistics.median(idle_s), "k": args.k,
              "batch": len(prompts), "threads": torch.get_num_threads()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"rollout of {len(prompts)} sequences, static k={args.k}: idle median {statistics.median(idle_s):.3f} s, "
          f"learner busy median {statistics.median(busy_s):.3f} s ({statistics.median(steps)} learner steps "
          f"during it) -> overhead {report['overhead']:.2f}x; {args.json}")


if __name__ == "__main__":
    main()
