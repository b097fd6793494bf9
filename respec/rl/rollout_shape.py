"""The shape of a rollout: how long its responses are, and how its decode time splits over the live batch.

Why: speculative decoding pays where the live batch is small (the forward is overhead or memory bound) and loses
where it is large (compute bound). A GRPO rollout starts at P x G rows and drains as responses end, so how much
of its time it spends at a small batch is set by the tail of its response lengths (TLT, arXiv 2511.16665: a few
long responses take most of a step's rollout time). These statistics say which regime a rollout is in, from the
engine's per-step stats, without any model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from respec.engine.outputs import StepStats

# Live-batch ranges (lowest, highest rows; None = no upper end), from the full batch of a 128-row rollout down to
# its tail. SMALL_BATCH rows or fewer is where a draft pays on the embedded policy (docs/results.md).
LIVE_RANGES: tuple[tuple[int, int | None], ...] = ((97, None), (33, 96), (17, 32), (9, 16), (1, 8))
SMALL_BATCH = 16


def range_label(low: int, high: int | None) -> str:
    """Returns the label of a live-batch range: "33-96", or "97+" for the open top range."""
    return f"{low}+" if high is None else f"{low}-{high}"


RANGE_LABELS = tuple(range_label(lo, hi) for lo, hi in LIVE_RANGES)


def quantile(values: Sequence[float], q: float) -> float:
    """Returns the q-quantile of `values` (numpy's linear interpolation between the closest ranks); NaN for no
    values."""
    return float(np.quantile(values, q)) if len(values) else math.nan


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """Returns {"mean", "median", "p90", "p99", "max"} of response lengths (NaN for none)."""
    if not lengths:
        return {k: math.nan for k in ("mean", "median", "p90", "p99", "max")}
    return {"mean": sum(lengths) / len(lengths), "median": quantile(lengths, 0.5), "p90": quantile(lengths, 0.9),
            "p99": quantile(lengths, 0.99), "max": float(max(lengths))}


def batch_seconds(stats: Iterable[StepStats]) -> dict[str, float]:
    """Returns {range label: decode seconds of the steps whose live batch lies in that range}, every range present
    (0.0 where no step fell). Prefill seconds are not steps and are not counted."""
    out = dict.fromkeys(RANGE_LABELS, 0.0)
    for s in stats:
        out[batch_range(s.batch)] += s.seconds
    return out


def batch_range(batch: int) -> str:
    """Returns the label of the live-batch range holding `batch` (>= 1)."""
    for (low, high), label in zip(LIVE_RANGES, RANGE_LABELS, strict=True):
        if batch >= low and (high is None or batch <= high):
            return label
    raise ValueError(f"live batch must be >= 1, got {batch}")


def batch_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Returns `batch_seconds`-style seconds per range as shares of their total (NaN everywhere for no time)."""
    total = sum(seconds.values())
    return {label: (seconds.get(label, 0.0) / total if total > 0 else math.nan) for label in RANGE_LABELS}


def small_batch_share(shares: dict[str, float], at_most: int = SMALL_BATCH) -> float:
    """Returns the share of decode time at `at_most` live rows or fewer (a boundary of LIVE_RANGES) from
    `batch_shares`."""
    tops = {hi for _, hi in LIVE_RANGES}
    if at_most not in tops:
        raise ValueError(f"at_most must be the top of a live-batch range ({sorted(t for t in tops if t)}), "
                         f"got {at_most}")
    return sum(shares[label] for (lo, hi), label in zip(LIVE_RANGES, RANGE_LABELS, strict=True)
               if hi is not None and hi <= at_most)


def rollout_shape(lengths: Sequence[float], stats: Iterable[StepStats]) -> dict:
    """Returns {"length": length_stats, "batch_s": seconds per live-batch range, "batch_share": their shares,
    "small_batch_share": the share at <= SMALL_BATCH rows} of one rollout or a pool of rollouts (pass every
    rollout's lengths and steps together)."""
    seconds = batch_seconds(stats)
    shares = batch_shares(seconds)
    return {"length": length_stats(lengths), "batch_s": seconds, "batch_share": shares,
            "small_batch_share": small_batch_share(shares)}


def drain_seconds(lengths: Sequence[int], step_seconds: Callable[[int], float]) -> dict[str, float]:
    """Returns `batch_seconds`-style decode seconds per live-batch range of a plain rollout whose rows end after
    `lengths` tokens (one token per row per step), each step costing step_seconds(live rows): the drain that a set
    of response lengths implies under a measured cost of a step, without a model."""
    out = dict.fromkeys(RANGE_LABELS, 0.0)
    ends = sorted(int(n) for n in lengths if n > 0)
    live, done = len(ends), 0
    for step in range(ends[-1] if ends else 0):
        while done < len(ends) and ends[done] <= step:
            done += 1
        out[batch_range(live - done)] += step_seconds(live - done)
    return out


def drain_shape(batches: Sequence[Sequence[int]], step_seconds: Callable[[int], float]) -> dict:
    """Returns the `rollout_shape` layout of rollouts with these rows' lengths (one list per rollout), their
    decode time priced by `step_seconds` (`drain_seconds`) and pooled; "small_batch_share_mean" is the mean of
    the rollouts' own shares at <= SMALL_BATCH rows (each RL step is one rollout)."""
    per = [drain_seconds(lengths, step_seconds) for lengths in batches]
    seconds = {label: sum(s[label] for s in per) for label in RANGE_LABELS}
    shares = batch_shares(seconds)
    own = [small_batch_share(batch_shares(s)) for s in per if sum(s.values()) > 0]
    return {"length": length_stats([n for lengths in batches for n in lengths]), "batch_s": seconds,
            "batch_share": shares, "small_batch_share": small_batch_share(shares),
            "small_batch_share_mean": sum(own) / len(own) if own else math.nan}
