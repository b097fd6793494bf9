"""What skipping padding saves in the policy update: one GRPO step's rollouts, trained on as `respec train` does
(random minibatches, right-padded to their longest sequence), with the padded forward and with the packed one
(`Transformer(ids, seq_lens=...)`: every layer but attention on the real tokens only), timed side by side.

The rollouts are the embedded policy's own (P prompts x G samples at T = 1, plain decoding); each round runs every
minibatch's forward + backward of the policy-gradient surrogate (logprob of each completion token, times a random
advantage) once padded and once packed, interleaved, and the summary is the median over rounds. The two modes
compute the same gradients (tests/test_model.py); this measures only their cost.

    python benchmarks/update_padding.py [--policy DIR] [--prompts 16 --group 8 --minibatch 4 --rounds 5]
        [--json runs/bench/update_padding.json]          # a .png beside it
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from respec.bench.engine import write_results
from respec.engine.checkpoint import load_model
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.world.pretrain import PretrainConfig, pretrain
from respec.world.prompts import encode_prompt
from respec.world.tasks import get_task
from respec.world.tokenizer import load_tokenizer

MODES = ("padded", "packed")


def rollout_minibatches(policy: Path, prompts: int, group: int, minibatch: int, max_new: int,
                        seed: int) -> tuple[list[dict], float]:
    """Returns one step's rollouts cut into random minibatches of `minibatch` prompts x G samples (each right-padded
    to its longest sequence: ids [n, S], seq_lens [n], completion positions and tokens) and the padding share."""
    model = load_model(policy)
    tokenizer = load_tokenizer(policy)
    problems = get_task("arithmetic").problems(prompts, seed=seed)
    encoded = [encode_prompt(tokenizer, p.prompt) for p in problems for _ in range(group)]
    out = Engine(model).generate(encoded, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed),
                                 SpecConfig(mode="off"))
    seqs = [p + s.tokens for p, s in zip(encoded, out.sequences, strict=True)]
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    batches, real, total = [], 0, 0
    for lo in range(0, len(order), minibatch * group):
        rows = order[lo: lo + minibatch * group]
        lens = torch.tensor([len(seqs[r]) for r in rows])
        ids = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(seqs[r])] = torch.tensor(seqs[r])
            # Completion token j of a row sits at prompt_len + j and is predicted at the position before it.
            completion[i, len(encoded[r]) - 1: len(seqs[r]) - 1] = True
        batches.append({"ids": ids, "seq_lens": lens, "completion": completion,
                        "advantages": torch.randn(len(rows), generator=torch.Generator().manual_seed(lo))})
        real, total = real + int(lens.sum()), total + ids.numel()
    return batches, 1 - real / total


def update_seconds(model, batches: list[dict], packed: bool) -> float:
    """Returns the seconds of forward + backward over every minibatch (gradients are computed, not applied)."""
    t0 = time.perf_counter()
    for b in batches:
        model.zero_grad(set_to_none=True)
        hidden, _ = model(b["ids"], seq_lens=b["seq_lens"] if packed else None)  # [n, S, H]
        logp = torch.log_softmax(model.lm_head(hidden[:, :-1]), -1).gather(-1, b["ids"][:, 1:, None]).squeeze(-1)
        mask = b["completion"][:, :-1]
        loss = -(logp * b["advantages"][:, None] * mask).sum() / mask.sum()
        loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="HF policy directory (default: the embedded default)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--minibatch", type=int, default=4, help="prompts per optimiser step (ppo_mini_batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/bench/update_padding.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = Path(args.policy) if args.policy else pretrain(PretrainConfig(), log=print)  # built or cached
    batches, padding = rollout_minibatches(policy, args.prompts, args.group, args.minibatch,
                                           args.max_new_tokens, args.seed)
    model = load_model(policy).train()
    update_seconds(model, batches[:1], packed=True)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(update_seconds(model, batches, packed=mode == "packed"))
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["padded"] / med["packed"]
    print(f"{len(batches)} minibatches of {args.minibatch} x {args.group} rollouts; padding {padding:.0%} of positions")
    for m in MODES:
        print(f"  {m:7s} {med[m]:.3f} s per update (median of {args.rounds}; all: "
              f"{', '.join(f'{t:.3f}' for t in times[m])})")
    print(f"  packed is {ratio:.2f}x faster")
    result = {"command": "python benchmarks/update_padding.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform()},
        "padding_fraction": padding, "seconds": times, "median_s": med, "speedup": ratio}
    json_path, png = write_results(result, Path(args.json), plot)
    print(f"wrote {json_path} and {png}")


def plot(result: dict, png: Path) -> Path:
    from matplotlib.figure import Figure

    from respec.bench.plot import save_figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for i, m in enumerate(MODES):
        ax.scatter([i] * len(result["seconds"][m]), result["seconds"][m], alpha=0.6)
        ax.hlines(result["median_s"][m], i - 0.2, i + 0.2, color="k")
    ax.set_xticks(range(len(MODES)), [f"{m}\n{result['median_s'][m]:.2f} s" for m in MODES])
    ax.set_ylabel("seconds per update (one RL step)")
    ax.set_title(f"skipping padding ({result['padding_fraction']:.0%} of positions): "
                 f"{result['speedup']:.2f}x", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return save_figure(fig, png)


if __name__ == "__main__":
    main()
