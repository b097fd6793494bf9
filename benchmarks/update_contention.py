"""What a second busy core costs the policy update, and whether the GIL is why: the trainer's update (forward +
backward of the packed policy over minibatches shaped like one GRPO step's rollouts) timed alone and beside a
background load that stands in for the online learner:

- "thread-small": a thread of many small torch ops (GIL-heavy, as the drafter learner's step is on a small model);
- "thread-matmul": a thread of 1024 x 1024 matmuls (the GIL is released inside each op);
- "process-small": the small ops in a separate process (no shared GIL).

If only the GIL-heavy thread slowed the update, a learner process would fix it; if every load does, the cost is
the machine's (shared caches, memory bandwidth, or a hypervisor that does not give two full cores).

    python benchmarks/update_contention.py [--policy DIR] [--rounds 3] [--json runs/bench/update_contention.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from respec.bench.engine import write_results
from respec.engine.checkpoint import load_model
from respec.world.pretrain import PretrainConfig, pretrain

LOADS = ("alone", "thread-small", "thread-matmul", "process-small")


def small_ops(stop) -> None:
    torch.set_num_threads(1)
    x, w = torch.randn(64, 128), torch.randn(128, 128)
    while not stop.is_set():
        for _ in range(100):
            x = torch.tanh(x @ w) * 0.5 + 0.1


def matmul_ops(stop) -> None:
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a = (a @ a).clamp(-1, 1)


def minibatches(vocab: int, rows: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Returns `count` right-padded minibatches (ids [rows, S], seq_lens [rows]) with lengths drawn like the
    notation world's rollouts (prompt ~12 + completion 5-70 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lens = torch.randint(17, 82, (rows,), generator=gen)
        out.append((torch.randint(3, vocab, (rows, int(lens.max())), generator=gen), lens))
    return out


def update_seconds(model, batches) -> float:
    t0 = time.perf_counter()
    for ids, lens in batches:
        model.zero_grad(set_to_none=True)
        model(ids, seq_lens=lens)[0].pow(2).mean().backward()
    return time.perf_counter() - t0


def timed_beside(load: str, model, batches) -> float:
    """Returns the update's seconds with `load` running in the background."""
    if load == "alone":
        return update_seconds(model, batches)
    if load == "process-small":
        spawn = mp.get_context("spawn")
        stop = spawn.Event()
        worker = spawn.Process(target=small_ops, args=(stop,))
    else:
        stop = threading.Event()
        worker = threading.Thread(target=small_ops if load == "thread-small" else matmul_ops, args=(stop,))
    worker.start()
    time.sleep(1.0 if load == "process-small" else 0.2)  # the load is running before the clock starts
    try:
        return update_seconds(model, batches)
    finally:
        stop.set()
        worker.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="HF policy directory (default: the embedded default)")
    ap.add_argument("--rows", type=int, default=32, help="rows per minibatch")
    ap.add_argument("--minibatches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated subset of {','.join(LOADS)}")
    ap.add_argument("--json", default="runs/bench/update_contention.json")
    args = ap.parse_args()
    unknown = sorted(set(args.loads.split(",")) - set(LOADS))
    if unknown:
        ap.error(f"unknown load {', '.join(unknown)}: choose from {', '.join(LOADS)}")
    torch.set_num_threads(1)
    policy = Path(args.policy) if args.policy else pretrain(PretrainConfig(), log=print)
    model = load_model(policy).train()
    batches = minibatches(model.config.vocab_size, args.rows, args.minibatches, seed=0)
    update_seconds(model, batches[:1])  # warm-up
    loads = ["alone", *(x for x in args.loads.split(",") if x != "alone")]
    times: dict[str, list[float]] = {load: [] for load in loads}
    for _ in range(args.rounds):  # interleaved, so drift spreads over every load
        for load in loads:
            times[load].append(timed_beside(load, model, batches))
    med = {load: statistics.median(v) for load, v in times.items()}
    for load in loads:
        print(f"{load:14s} {med[load]:.3f} s per update ({med[load] / med['alone']:.2f}x alone; all: "
              f"{', '.join(f'{t:.3f}' for t in times[load])})")
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "args": vars(args),
              "seconds": times, "median_s": med, "vs_alone": {k: v / med["alone"] for k, v in med.items()}}
    json_path, png = write_results(result, Path(args.json), plot)
    print(f"wrote {json_path} and {png}")


def plot(result: dict, png: Path) -> Path:
    from matplotlib.figure import Figure

    from respec.bench.plot import save_figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    loads = list(result["seconds"])
    for i, load in enumerate(loads):
        ax.scatter([i] * len(result["seconds"][load]), result["seconds"][load], alpha=0.6)
        ax.hlines(result["median_s"][load], i - 0.2, i + 0.2, color="k")
    ax.set_xticks(range(len(loads)), [f"{load}\n{result['vs_alone'][load]:.2f}x" for load in loads], fontsize=8)
    ax.set_ylabel("seconds per update")
    ax.set_title("the update beside a background load (1 torch thread each)", fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return save_figure(fig, png)


if __name__ == "__main__":
    main()
