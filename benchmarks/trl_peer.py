#!/usr/bin/env python
"""TRL's GRPOTrainer and `respec train`, side by side on one HF policy directory.

Both trainers get the same policy directory, the same arithmetic-task reward (`task.score(problem, text).reward`
on the completion decoded with skip_special_tokens), the same prompts in the same order (respec's training stream:
its first pass over `task.problems(data.epoch_problems, seed=trainer.seed * 1_000_003)` less the held-out
problems, P per step), the same G, completion budget, learning rate (constant: no warm-up, no decay in either),
beta = 0 and the matching loss type. One RL step = P prompts x G samples rolled out, then
`P / mini_batch` optimiser steps of `mini_batch` prompts x G samples each (`--mini-batch`, default P: one
optimiser step per RL step).

    /tmp/trlvenv/bin/python benchmarks/trl_peer.py --policy DIR [--drafter DIR] --steps 10 --prompts 8 \
        --group 8 --max-new-tokens 96 --lr 5e-5 --json runs/bench/trl_peer.json

TRL is not a dependency of respec: run this with an interpreter that has both (`pip install -e '.[trl]'`, or a
scratch venv with `trl` and `pip install --no-deps -e .`). `--only respec-off,respec-adaptive` runs without TRL.

Seconds per step: TRL, wall time from `on_step_begin` to `on_step_end` of a TrainerCallback (generation,
reward, advantages, the loss forward/backward and the optimiser step; logging is outside), summed over the
optimiser steps of one RL step; respec, `timing/step_s` of run_dir/metrics.jsonl (rollout, reward, update and
the in-memory weight push; evaluation and checkpoints are outside). The summary is the median over steps 2..N
(step 1 carries one-off warm-up: the tuner's cost profile, allocator growth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: the policy is a local directory
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SYSTEMS = ("trl", "respec-off", "respec-adaptive")
LABELS = {"trl": "TRL GRPOTrainer", "respec-off": "respec, no SD", "respec-adaptive": "respec, adaptive SD"}


# -- the shared setup --------------------------------------------------------------------------------------------
def respec_config(args, spec: str, drafter: str | None):
    """Returns respec's TrainConfig for this comparison (defaults where TRL has the same; see mapping())."""
    from respec.rl.config import AlgorithmConfig, DataConfig, RolloutConfig, TrainConfig, TrainerConfig

    return TrainConfig(
        trainer=TrainerConfig(model=str(args.policy), steps=args.steps, lr=args.lr, warmup_steps=0, min_lr_ratio=1.0,
                              weight_decay=0.0, grad_clip=1.0, eval_every=0, eval_before_train=False, save_every=0,
                              seed=args.seed, dtype="fp32", device="cpu", num_threads=args.threads),
        algorithm=AlgorithmConfig(adv_scale="group", ppo_epochs=args.epochs, ppo_mini_batch_size=args.mini_batch,
                                  clip_low=0.2, clip_high=0.2, clip_c=None, loss_agg="token-mean", kl_coef=0.0),
        rollout=RolloutConfig(group_size=args.group, temperature=1.0, max_new_tokens=args.max_new_tokens, spec=spec,
                              drafter=drafter),
        data=DataConfig(task="arithmetic", prompts_per_step=args.prompts),
    )


def training_problems(config, n: int):
    """Returns the first n problems of respec's training stream for `config` (Trainer._epoch_pool, pass 0)."""
    from respec.world.tasks import get_task

    d, t = config.data, config.trainer
    task = get_task(d.task)
    held_out = {p.prompt for p in task.problems(d.eval_problems, seed=d.eval_seed)}
    pool = [p for p in task.problems(d.epoch_problems, seed=t.seed * 1_000_003 + 0) if p.prompt not in held_out]
    if len(pool) < n:
        raise SystemExit(f"{n} problems needed, the first pass has {len(pool)}: lower --steps or --prompts")
    return task, pool[:n]


def mapping(args) -> list[tuple[str, str, str]]:
    """(setting, respec, TRL) rows: how each respec setting is expressed in TRL's GRPOConfig."""
    spg = args.prompts // args.mini_batch
    return [
        ("policy", f"{args.policy} (respec Transformer)", "same dir, AutoModelForCausalLM (Qwen2, fp32, sdpa)"),
        ("tokenizer", "respec.world.tokenizer.load_tokenizer", "the same object, as processing_class"),
        ("prompt ids", "encode_prompt: [bos] + encode(text)", "text = bos_token + prompt; checked equal below"),
        ("reward", "task.score(problem, decoded).reward", "the same function of the decoded completion"),
        ("prompts / step (P)", f"data.prompts_per_step={args.prompts}", f"generation_batch_size={args.prompts * args.group}"),
        ("samples / prompt (G)", f"rollout.group_size={args.group}", f"num_generations={args.group}"),
        ("completion budget", f"rollout.max_new_tokens={args.max_new_tokens}",
         f"max_completion_length={args.max_new_tokens}"),
        ("sampling", "temperature 1.0, no top-k/top-p", "temperature=1.0, top_p=1.0, top_k=0"),
        ("minibatch", f"algorithm.ppo_mini_batch_size={args.mini_batch} (prompts)",
         f"per_device_train_batch_size={args.mini_batch * args.group}, gradient_accumulation_steps=1, "
         f"steps_per_generation={spg}"),
        ("epochs (mu)", f"algorithm.ppo_epochs={args.epochs}", f"num_iterations={args.epochs}"),
        ("advantages", "adv_scale=group: (r-mean)/(std+1e-6)", "scale_rewards='group': (r-mean)/(std+1e-4)"),
        ("loss", "loss_agg=token-mean", "loss_type='dapo' (token-level, normalised by active tokens)"),
        ("clip", "clip_low=clip_high=0.2, clip_c=None", "epsilon=0.2, epsilon_high=0.2 (TRL has no dual clip)"),
        ("KL", "kl_coef=0 (no reference)", "beta=0.0 (no reference)"),
        ("old logprobs", "the engine's verifying forward (never recomputed)",
         "per_token_logps.detach() when steps_per_generation * num_iterations == 1, else one extra forward"),
        ("optimiser", "AdamW(0.9, 0.999, 1e-8), wd 0, clip 1.0", "adamw_torch, weight_decay=0, max_grad_norm=1.0"),
        ("LR schedule", f"lr={args.lr:g}, warmup_steps=0, min_lr_ratio=1 (constant)",
         f"learning_rate={args.lr:g}, lr_scheduler_type='constant', warmup_steps=0"),
        ("precision", "trainer.dtype=fp32 (engine and actor)", "bf16=False, fp16=False, use_cpu=True"),
        ("memory saving", "none", f"gradient_checkpointing={args.trl_gradient_checkpointing} "
                                  "(GRPOConfig's default is True)"),
        ("threads", f"trainer.num_threads={args.threads}", f"torch.set_num_threads({args.threads})"),
        ("seed", f"trainer.seed={args.seed}", f"seed={args.seed}, shuffle_dataset=False"),
    ]


# -- TRL -----------------------------------------------------------------------------------------------------------
def run_trl(args, config, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from respec.world.prompts import encode_prompt
    from respec.world.tokenizer import load_tokenizer

    P, G = args.prompts, args.group
    spg = P // args.mini_batch
    task, problems = training_problems(config, args.steps * P)
    tokenizer = load_tokenizer(args.policy)
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    dataset = Dataset.from_list([{"prompt": bos + p.prompt, "idx": i} for i, p in enumerate(problems)])

    rewards_per_call: list[list[float]] = []
    idx_per_call: list[list[int]] = []

    def arithmetic_reward(prompts, completions, idx, **kwargs):
        """The task's reward of each decoded completion (TRL decodes with skip_special_tokens=True)."""
        rewards = [float(task.score(problems[i], text).reward) for i, text in zip(idx, completions, strict=True)]
        rewards_per_call.append(rewards)
        idx_per_call.append(list(idx))
        return rewards

    step_times: list[float] = []
    log_rows: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs:
                log_rows.append({"step": state.global_step, **logs})

    cfg = GRPOConfig(
        output_dir=str(out_dir / "trl"),
        num_generations=G,
        per_device_train_batch_size=args.mini_batch * G,
        gradient_accumulation_steps=1,
        steps_per_generation=spg,
        num_iterations=args.epochs,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        epsilon_high=0.2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_steps=args.steps * spg * args.epochs,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=args.seed,
        dataloader_num_workers=0,
        log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=cfg, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])

    # Instrumentation (timing and checks only; no behaviour changes).
    seen_prompt_ids: list[list[int]] = []
    tokenize = trainer._tokenize_prompts

    def tokenize_and_record(prompts):
        out = tokenize(prompts)
        seen_prompt_ids.extend([list(map(int, ids)) for ids in out[0]])
        return out

    trainer._tokenize_prompts = tokenize_and_record
    gen_times: list[float] = []
    score_times: list[float] = []
    generate = trainer.model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        return out

    trainer.model.generate = timed_generate
    gen_and_score = trainer._generate_and_score_completions

    def timed_gen_and_score(batch):
        t = time.perf_counter()
        out = gen_and_score(batch)
        score_times.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed_gen_and_score

    t_start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_start

    # Checks: the prompt ids TRL fed to generate equal respec's, and the prompts came in respec's order.
    expected_ids = [encode_prompt(tokenizer, problems[i].prompt) for call in idx_per_call for i in call]
    ids_equal = seen_prompt_ids == expected_ids
    order_ok = all(call == [i for i in range(k * P, (k + 1) * P) for _ in range(G)]
                   for k, call in enumerate(idx_per_call))
    n = len(rewards_per_call)
    per_step = [sum(step_times[k * spg * args.epochs:(k + 1) * spg * args.epochs]) for k in range(n)]
    lengths = [e.get("completions/mean_length") for e in log_rows if "completions/mean_length" in e]
    return {
        "steps": n,
        "step_s": per_step,
        "reward": [sum(r) / len(r) for r in rewards_per_call],
        "rollout_s": score_times,  # _generate_and_score_completions: tokenise, generate, decode, reward, advantages
        "generate_s": gen_times,  # model.generate alone
        "update_s": [s - r for s, r in zip(per_step, score_times, strict=False)],
        "response_length": lengths[::spg * args.epochs] if lengths else [],
        "optimizer_step_s": step_times,
        "wall_s": wall,
        "checks": {"prompt_ids_equal_encode_prompt": ids_equal, "prompts_in_respec_order": order_ok,
                   "prompt_ids_example": seen_prompt_ids[0] if seen_prompt_ids else None,
                   "reward_calls": n},
        "logs": log_rows,
        "versions": _versions(),
    }


# -- respec --------------------------------------------------------------------------------------------------------
def run_respec(args, spec: str, drafter: str | None, out_dir: Path) -> dict:
    from respec.rl.trainer import METRICS, Trainer

    config = respec_config(args, spec, drafter)
    run_dir = out_dir / f"respec-{spec}"
    t_start = time.perf_counter()
    trainer = Trainer.start(config, run_dir)
    used: list[list[str]] = []
    next_problems = trainer.problems.next

    def record(n):
        out = next_problems(n)
        used.append([p.prompt for p in out])
        return out

    trainer.problems.next = record
    t_train = time.perf_counter()
    trainer.train(args.steps)
    wall = time.perf_counter() - t_train
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) >= 1 and "timing/step_s" in r]
    _, expected = training_problems(config, args.steps * args.prompts)
    order_ok = used == [[p.prompt for p in expected[k * args.prompts:(k + 1) * args.prompts]]
                        for k in range(len(used))]
    return {
        "steps": len(rows),
        "step_s": [r["timing/step_s"] for r in rows],
        "reward": [r["critic/score/mean"] for r in rows],
        "rollout_s": [r["timing/rollout_s"] + r["timing/reward_s"] for r in rows],  # as TRL's generate-and-score
        "generate_s": [r["timing/rollout_s"] for r in rows],
        "update_s": [r["timing/update_s"] for r in rows],
        "push_s": [r["timing/push_s"] for r in rows],
        "response_length": [r["response_length/mean"] for r in rows],
        "k_mean": [r["rollout/k_mean"] for r in rows],
        "mean_emitted_per_step": [r["rollout/mean_emitted_per_step"] for r in rows],
        "logprob_diff_max": [r["rollout/logprob_diff_max"] for r in rows],
        "setup_s": t_train - t_start,
        "wall_s": wall,
        "run_dir": str(run_dir),
        "checks": {"prompts_in_stream_order": order_ok},
    }


# -- report --------------------------------------------------------------------------------------------------------
def _median_tail(xs: list[float]) -> float | None:
    tail = xs[1:] if len(xs) > 1 else xs
    return statistics.median(tail) if tail else None


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(results: dict, k: int) -> dict:
    out = {}
    for name, r in results.items():
        out[name] = {
            "step_s_median_2_to_n": _median_tail(r["step_s"]),
            "rollout_s_median_2_to_n": _median_tail(r["rollout_s"]),
            "generate_s_median_2_to_n": _median_tail(r["generate_s"]),
            "update_s_median_2_to_n": _median_tail(r["update_s"]),
            "step1_s": r["step_s"][0] if r["step_s"] else None,
            "reward_first": _mean(r["reward"][:k]),
            "reward_last": _mean(r["reward"][-k:]),
            "reward_mean": _mean(r["reward"]),
            "response_length_mean": _mean(r.get("response_length") or []),
        }
    base = out.get("trl", {}).get("step_s_median_2_to_n")
    for s in out.values():
        s["speedup_vs_trl"] = base / s["step_s_median_2_to_n"] if base and s["step_s_median_2_to_n"] else None
    return out


def table(summary: dict, results: dict, k: int, n_steps: int) -> str:
    def f(x, spec="{:.3f}"):
        return "-" if x is None else spec.format(x)

    head = (f"{'system':<22} {'s/step':>7} {'rollout':>8} {'(gen)':>7} {'update':>7} {'step1':>7} "
            f"{'vs TRL':>7} {f'reward 1..{k}':>12} {f'reward last {k}':>14} {'len':>6}")
    lines = [f"seconds per step: median over steps 2..{n_steps}; rollout = generate + decode + reward "
             "(TRL: _generate_and_score_completions); vs TRL = TRL s/step / this s/step", head, "-" * len(head)]
    for name, s in summary.items():
        lines.append(f"{LABELS[name]:<22} {f(s['step_s_median_2_to_n']):>7} {f(s['rollout_s_median_2_to_n']):>8} "
                     f"{f(s['generate_s_median_2_to_n']):>7} {f(s['update_s_median_2_to_n']):>7} "
                     f"{f(s['step1_s']):>7} {f(s['speedup_vs_trl'], '{:.2f}x'):>7} "
                     f"{f(s['reward_first']):>12} {f(s['reward_last']):>14} "
                     f"{f(s['response_length_mean'], '{:.1f}'):>6}")
    lines.append("")
    lines.append("reward per step:")
    for name, r in results.items():
        lines.append(f"  {LABELS[name]:<20} " + " ".join(f"{x:.3f}" for x in r["reward"]))
    lines.append("seconds per step:")
    for name, r in results.items():
        lines.append(f"  {LABELS[name]:<20} " + " ".join(f"{x:.2f}" for x in r["step_s"]))
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = range(1, len(r["reward"]) + 1)
        ax1.plot(steps, r["reward"], marker="o", label=LABELS[name])
        ax2.plot(range(1, len(r["step_s"]) + 1), r["step_s"], marker="o", label=LABELS[name])
    ax1.set(xlabel="RL step", ylabel="mean reward (P x G samples)", title="reward")
    ax2.set(xlabel="RL step", ylabel="seconds", title="seconds per step", ylim=(0, None))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _complete_drafter(path: str | None) -> str | None:
    if path is None:
        return None
    if not (Path(path) / "RESPEC_COMPLETE").is_file():
        print(f"drafter {path} is incomplete (no RESPEC_COMPLETE): the adaptive-SD run is skipped", file=sys.stderr)
        return None
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="HF policy directory with its tokenizer (default: the embedded default)")
    ap.add_argument("--drafter", help="EAGLE-3 drafter of the policy, for the adaptive-SD run (default: the "
                    "embedded default's when --policy is not given; else no SD run)")
    ap.add_argument("--steps", type=int, default=10, help="RL steps per system")
    ap.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="completion budget")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate (constant in both)")
    ap.add_argument("--mini-batch", type=int, default=None,
                    help="prompts per optimiser step (respec ppo_mini_batch_size; default P: one update per step)")
    ap.add_argument("--epochs", type=int, default=1, help="respec ppo_epochs = TRL num_iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="keep GRPOConfig's default gradient_checkpointing=True (off by default here: respec "
                    "does not checkpoint activations, so it would charge TRL for a memory saving it needs not)")
    ap.add_argument("--work-dir", help="where the runs go (default: a fresh temporary directory)")
    ap.add_argument("--json", default="runs/bench/trl_peer.json", help="results file (a .png is written beside)")
    args = ap.parse_args(argv)

    args.mini_batch = args.mini_batch or args.prompts
    if args.prompts % args.mini_batch:
        ap.error(f"--prompts ({args.prompts}) must be a multiple of --mini-batch ({args.mini_batch})")
    systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose among {', '.join(SYSTEMS)}")
    torch.set_num_threads(args.threads)
    if args.policy is None:
        from respec.world.defaults import resolve_models

        policy, drafter = resolve_models(None, args.drafter)
        args.policy, args.drafter = str(policy), args.drafter or str(drafter)
    drafter = _complete_drafter(args.drafter)
    if drafter is None and "respec-adaptive" in systems:
        print("no complete drafter: respec runs without SD only", file=sys.stderr)
        systems.remove("respec-adaptive")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="trl_peer-"))
    work.mkdir(parents=True, exist_ok=True)

    print("setting mapping (respec -> TRL):")
    for name, mine, theirs in mapping(args):
        print(f"  {name:<20} {mine:<55} | {theirs}")
    print(flush=True)

    results: dict[str, dict] = {}
    config = respec_config(args, "off", None)
    for name in systems:
        t = time.perf_counter()
        print(f"== {LABELS[name]}: {args.steps} steps", flush=True)
        if name == "trl":
            results[name] = run_trl(args, config, work)
        else:
            spec = name.split("-", 1)[1]
            results[name] = run_respec(args, spec, drafter if spec != "off" else None, work)
        r = results[name]
        print(f"   done in {time.perf_counter() - t:.1f} s; checks {r['checks'] if name != 'trl' else {k: v for k, v in r['checks'].items() if k != 'prompt_ids_example'}}",
              flush=True)

    k = min(3, max(args.steps // 2, 1))
    summary = summarise(results, k)
    text = table(summary, results, k, args.steps)
    print()
    print(text)

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    title = (f"P={args.prompts} x G={args.group}, {args.max_new_tokens} new tokens, lr {args.lr:g}, beta 0, "
             f"token-mean/dapo, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    plot(results, png, title)
    from respec.bench.engine import machine_info

    report = {
        "command": shlex.join(["python", "benchmarks/trl_peer.py", *sys.argv[1:]]),
        "machine": machine_info("cpu"),
        "args": vars(args),
        "versions": _versions(),
        "mapping": [{"setting": a, "respec": b, "trl": c} for a, b, c in mapping(args)],
        "summary": summary,
        "results": results,
        "table": text,
        "plot": str(png),
        "work_dir": str(work),
        "load_average": os.getloadavg(),
    }
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
