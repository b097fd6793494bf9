"""Decode-step time of the slot engine on a GPU: eager vs compiled steps, beside the memory-bandwidth bound, and
speculative vs plain decoding with the embedded policy and drafter.

Part 1 builds a randomly initialised Qwen2-0.5B-shaped model (bf16 on CUDA) and times plain decode steps at
batch 1, 8, 32 and 128 (prompts of 32 tokens, 64 generated tokens each, every row to its budget) with
compile="off" and compile="on", side by side in one run. Beside each it prints the bandwidth bound of one step:
the weight bytes read per step / the device's memory bandwidth (`--hbm-gbps`, default by device name).
Part 2 runs the embedded policy with its drafter (`--policy` / `--drafter`, default: built or reused from the
cache) at the same batches, temperature 1, plain vs static k, and reports tokens/s and the speedup.

    python benchmarks/gpu_engine.py --json docs/results/gpu_engine.json                  # on a GPU, < 8 minutes
    python benchmarks/gpu_engine.py --device cpu --shape tiny --batches 1,4 --json runs/gpu_engine_smoke.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from gpu_train import SHAPES  # the Qwen2-0.5B and tiny shapes of the GPU training benchmark

from respec.bench.engine import machine_info
from respec.engine.checkpoint import atomic_write_text, load_model
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.model import ModelConfig, init_model
from respec.engine.sampling import SamplingParams

HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}  # GB/s, SXM parts


def bandwidth(device: torch.device, override: float | None) -> float | None:
    """Returns the device's memory bandwidth in GB/s: `override`, else by device name, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for part, gbps in HBM_GBPS.items() if part in name), None)


def step_times(engine: Engine, batch: int, prompt_len: int, new_tokens: int, spec: SpecConfig,
               temperature: float, vocab: int) -> dict:
    """Returns the median decode-step seconds, tokens/s and tokens per step of one generate call (after one
    untimed warm-up call, which compiles)."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts, params, spec)  # warm-up: compiles, profiles, fills caches
    out = engine.generate(prompts, params, spec)
    return {"step_s": statistics.median(s.seconds for s in out.stats), "tokens_per_s": out.tokens_per_s,
            "tokens_per_step": out.mean_emitted_per_step, "steps": len(out.stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", default="2,4", help="static draft lengths of part 2")
    ap.add_argument("--policy", default=None, help="policy directory (default: the embedded policy)")
    ap.add_argument("--drafter", default=None, help="drafter directory (default: the embedded drafter)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (default: by device name)")
    ap.add_argument("--json", default="runs/gpu_engine.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data: dict = {"command": shlex.join(["python", *sys.argv]), "machine": machine_info(args.device),
                  "shape": args.shape, "dtype": str(dtype), "batches": batches, "decode": [], "spec": []}
    t_start = time.perf_counter()

    # Part 1: eager vs compiled decode steps of a Qwen2-0.5B-shaped model, beside the bandwidth bound.
    cfg = ModelConfig(model_type="qwen2", **SHAPES[args.shape])
    model = init_model(cfg, seed=0).to(device, dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gbps = bandwidth(device, args.hbm_gbps)
    bound = weight_bytes / (gbps * 1e9) if gbps else None
    data.update(weight_bytes=weight_bytes, hbm_gbps=gbps, bound_step_s=bound)
    engines = {mode: Engine(model, compile=mode, max_running=max(batches),
                            max_model_len=args.prompt_len + args.new_tokens + 1) for mode in ("off", "on")}
    print(f"model {args.shape}: {weight_bytes / 1e9:.2f} GB of weights; bound per step "
          f"{bound * 1e3:.3f} ms" if bound else f"model {args.shape}: {weight_bytes / 1e9:.2f} GB of weights")
    for batch in batches:
        row = {"batch": batch}
        for mode, engine in engines.items():
            row[mode] = step_times(engine, batch, args.prompt_len, args.new_tokens, SpecConfig(mode="off"), 0.0,
                                   cfg.vocab_size)
        row["compiled_speedup"] = row["off"]["step_s"] / row["on"]["step_s"]
        row["on_vs_bound"] = row["on"]["step_s"] / bound if bound else None
        data["decode"].append(row)
        print(f"batch {batch:4d}: eager {row['off']['step_s'] * 1e3:8.3f} ms  compiled {row['on']['step_s'] * 1e3:8.3f}"
              f" ms  ({row['compiled_speedup']:.2f}x)" + (f"  {row['on_vs_bound']:.2f}x the bound" if bound else ""),
              flush=True)
    del engines, model

    # Part 2: speculative vs plain decoding with the embedded policy and drafter.
    if args.policy is None or args.drafter is None:
        from respec.world.defaults import resolve_models

        policy_dir, drafter_dir = resolve_models(args.policy, args.drafter, "arithmetic", threads=None)
    else:
        policy_dir, drafter_dir = Path(args.policy), Path(args.drafter)
    target = load_model(policy_dir, dtype, args.device)
    drafter = load_drafter(drafter_dir, target)
    ks = [int(k) for k in args.k.split(",")]
    for mode in ("off", "on"):
        engine = Engine(target, drafter, compile=mode, max_running=max(batches),
                        max_model_len=min(target.config.max_position_embeddings, args.prompt_len + args.new_tokens + 16))
        for batch in batches:
            row = {"batch": batch, "compile": mode,
                   "plain": step_times(engine, batch, 8, args.new_tokens, SpecConfig(mode="off"), 1.0,
                                       target.config.vocab_size)}
            for k in ks:
                row[f"k{k}"] = step_times(engine, batch, 8, args.new_tokens, SpecConfig(mode="static", k=k), 1.0,
                                          target.config.vocab_size)
            best = max(ks, key=lambda k: row[f"k{k}"]["tokens_per_s"])
            row["best_k"], row["speedup"] = best, row[f"k{best}"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
            data["spec"].append(row)
            print(f"compile={mode} batch {batch:4d}: plain {row['plain']['tokens_per_s']:9.1f} tok/s, best k={best} "
                  f"{row[f'k{best}']['tokens_per_s']:9.1f} tok/s ({row['speedup']:.2f}x, "
                  f"{row[f'k{best}']['tokens_per_step']:.2f} tokens per step)", flush=True)
    data["seconds"] = time.perf_counter() - t_start
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {path} ({data['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
