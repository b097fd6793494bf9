"""GRPO seconds per step and the phase split of a Qwen2-0.5B-shaped, randomly initialised policy on a GPU.

Builds the policy (Qwen2-0.5B's shape: 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151936,
tied embeddings: 494M parameters) and a random EAGLE-3 drafter for it (draft vocabulary 32000), with the
embedded default's tokenizer (token ids past its vocabulary decode to nothing), then runs the same GRPO steps
through `Trainer` once per rollout mode (`--specs off,static,adaptive`) in bf16 (fp32 master weights). Prints and
writes (JSON + PNG) the median seconds per step and per phase over the steps after the first (warm-up).

A random policy samples close to uniformly, so every row runs to the budget and the reward is 0: this measures
cost, not learning; the drafter's acceptance on a random pair says nothing about a trained one.

    python benchmarks/gpu_train.py --out runs/gpu --device cuda --steps 6
    python benchmarks/gpu_train.py --out runs/gpu-smoke --shape tiny --device cpu --steps 2   # CPU check
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from respec.bench.engine import machine_info
from respec.engine.checkpoint import atomic_write_text, save_model
from respec.engine.drafter import init_drafter, save_drafter
from respec.engine.model import ModelConfig, init_model
from respec.rl.config import load_config
from respec.rl.trainer import Trainer
from respec.world.tokenizer import load_tokenizer, save_tokenizer

SHAPES = {
    # Qwen/Qwen2-0.5B's config.json, with the embedded tokenizer's special ids
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}
PHASES = ("timing/rollout_s", "timing/reward_s", "timing/update_s", "timing/push_s", "timing/learner_s")


def build_models(shape: str, tokenizer_dir: Path, out: Path, draft_vocab: int) -> tuple[Path, Path, int]:
    """Writes the random policy (with the tokenizer) and its random drafter under `out`; returns their
    directories and the policy's parameter count."""
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    cfg = ModelConfig(model_type="qwen2", **SHAPES[shape], **{f"{k}_token_id": v for k, v in ids.items()})
    model = init_model(cfg, seed=0)
    params = sum(p.numel() for p in model.parameters())
    policy = save_model(model, out / "policy")
    save_tokenizer(tokenizer, policy)
    counts = torch.ones(cfg.vocab_size)  # a random drafter: any vocabulary subset is as good as another
    drafter = init_drafter(model, seed=1, draft_vocab_size=min(draft_vocab, cfg.vocab_size), token_frequencies=counts)
    return policy, save_drafter(drafter, out / "drafter"), params


def run_mode(policy: Path, drafter: Path, spec: str, args, out: Path) -> dict:
    overrides = {"trainer.model": str(policy), "trainer.device": args.device, "trainer.steps": str(args.steps),
                 "trainer.eval_before_train": "false", "trainer.eval_every": "0", "trainer.save_every": "0",
                 "trainer.num_threads": "1", "trainer.lr": "1e-6", "rollout.spec": spec,
                 "rollout.drafter": str(drafter), "rollout.max_new_tokens": str(args.max_new_tokens),
                 "rollout.group_size": str(args.group), "data.prompts_per_step": str(args.prompts),
                 "algorithm.ppo_mini_batch_size": str(args.minibatch)}
    if args.dtype:
        overrides["trainer.dtype"] = args.dtype
    config = load_config(None, overrides)
    run_dir = out / f"run-{spec}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = Trainer.start(config, run_dir)
    load_s = time.perf_counter() - t0
    rows = []
    try:
        for _ in range(args.steps):  # step() without train(): no checkpoint of 6 GB at the end
            rows.append(trainer.step())
            r = rows[-1]
            print(f"  {spec:9s} step {r['step']}: {r['timing/step_s']:.2f} s (rollout {r['timing/rollout_s']:.2f}, "
                  f"update {r['timing/update_s']:.2f}), {r['rollout/mean_emitted_per_step']:.2f} tokens/verify, "
                  f"k {r['rollout/k_mean']:.1f}", flush=True)
    finally:
        trainer.close()
    timed = rows[1:] or rows
    result = {"load_s": load_s, "steps": len(rows),
              "step_s": statistics.median(r["timing/step_s"] for r in timed),
              "tokens_per_s": statistics.median(r["rollout/tokens_per_s"] for r in timed),
              "emitted_per_step": statistics.median(r["rollout/mean_emitted_per_step"] for r in timed),
              "k_mean": statistics.median(r["rollout/k_mean"] for r in timed),
              "response_length": statistics.median(r["response_length/mean"] for r in timed),
              "logprob_diff_max": max(r["rollout/logprob_diff_max"] for r in rows),
              "rows": rows}
    for key in PHASES:
        result[key.split("/")[1]] = statistics.median(r[key] for r in timed)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
    return result


def plot(data: dict, png: Path) -> Path:
    """Draws seconds per GRPO step by phase, one stacked bar per mode (respec.bench.plot's Agg canvas, atomic)."""
    from matplotlib.figure import Figure

    from respec.bench.plot import save_figure

    modes = list(data["modes"])
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    bottom = [0.0] * len(modes)
    for key in PHASES:
        name = key.split("/")[1]
        values = [data["modes"][m][name] for m in modes]
        ax.bar(modes, values, bottom=bottom, label=name.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per GRPO step (median)")
    ax.set_title(f"{data['shape']} ({data['params'] / 1e6:.0f}M), {data['machine']['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument("--tokenizer", default=None, help="a directory with tokenizer.json (default: the embedded policy)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default bf16 on CUDA)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--specs", default="off,static,adaptive")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=4, help="prompts per optimiser step")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--draft-vocab", type=int, default=32000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from respec.world.defaults import resolve_models

        args.tokenizer = resolve_models(None, None, "arithmetic")[0]
    policy, drafter, params = build_models(args.shape, Path(args.tokenizer), out / "models", args.draft_vocab)
    print(f"policy {args.shape}: {params / 1e6:.1f}M parameters at {policy}", flush=True)
    data = {"command": shlex.join(["python", "benchmarks/gpu_train.py", *sys.argv[1:]]), "shape": args.shape,
            "params": params, "machine": machine_info(args.device), "args": vars(args), "modes": {}, "errors": {}}
    for spec in args.specs.split(","):
        try:
            data["modes"][spec] = run_mode(policy, drafter, spec, args, out)
        except Exception:  # one mode's failure must not lose the others' numbers
            data["errors"][spec] = traceback.format_exc()
            print(data["errors"][spec], flush=True)
        atomic_write_text(out / "gpu_train.json", json.dumps(data, indent=1, default=str))
    base = data["modes"].get("off")
    print(f"\n{'mode':10s} {'step s':>7s} {'rollout':>8s} {'update':>7s} {'other':>6s} {'tok/verify':>10s} "
          f"{'k':>4s} {'vs off':>7s}")
    for spec, m in data["modes"].items():
        other = m["step_s"] - m["rollout_s"] - m["update_s"]
        ratio = f"{base['step_s'] / m['step_s']:.2f}x" if base else "-"
        print(f"{spec:10s} {m['step_s']:7.2f} {m['rollout_s']:8.2f} {m['update_s']:7.2f} {other:6.2f} "
              f"{m['emitted_per_step']:10.2f} {m['k_mean']:4.1f} {ratio:>7s}")
    if data["modes"]:
        print(f"plot: {plot(data, out / 'gpu_train.png')}")
    print(f"json: {out / 'gpu_train.json'}")
    shutil.rmtree(out / "models", ignore_errors=True)


if __name__ == "__main__":
    main()
