"""`respec.rl.rollout_shape`: response-length quantiles and the share of decode time per live-batch range, on
hand-made step lists."""

import math

import pytest

from respec.engine.outputs import StepStats
from respec.rl.rollout_shape import (
    RANGE_LABELS,
    batch_range,
    batch_seconds,
    batch_shares,
    drain_seconds,
    drain_shape,
    length_stats,
    quantile,
    rollout_shape,
    small_batch_share,
)


def step(batch: int, seconds: float) -> StepStats:
    return StepStats(batch=batch, k=0, accepted=[0] * batch, emitted=batch, seconds=seconds)


def test_ranges_cover_every_batch_once_from_the_full_batch_to_the_tail():
    assert RANGE_LABELS == ("97+", "33-96", "17-32", "9-16", "1-8")
    expected = {1: "1-8", 8: "1-8", 9: "9-16", 16: "9-16", 17: "17-32", 32: "17-32", 33: "33-96", 96: "33-96",
                97: "97+", 128: "97+", 512: "97+"}
    assert {b: batch_range(b) for b in expected} == expected
    with pytest.raises(ValueError):
        batch_range(0)


def test_quantiles_interpolate_between_ranks_as_numpy_does():
    assert quantile([3, 1, 2], 0.5) == 2
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile(list(range(101)), 0.99) == pytest.approx(99.0)
    assert quantile([1, 2], 0.9) == pytest.approx(1.9)
    assert math.isnan(quantile([], 0.5))
    stats = length_stats([10] * 98 + [100, 400])
    assert stats["median"] == 10 and stats["max"] == 400 and stats["p90"] == 10
    assert stats["p99"] == pytest.approx(100 + 0.01 * 300)  # rank 98.01 of 0..99
    assert stats["mean"] == pytest.approx((980 + 500) / 100)
    assert all(math.isnan(v) for v in length_stats([]).values())


def test_a_draining_rollout_splits_its_decode_time_by_live_batch():
    # 128 rows for 10 steps of 0.1 s, then 40 rows, 20 rows, and a tail of 12 and 3 rows; prefill is not a step.
    steps = ([step(128, 0.1)] * 10 + [step(40, 0.05)] * 4 + [step(20, 0.05)] * 2 + [step(12, 0.02)] * 10
             + [step(3, 0.01)] * 50)
    seconds = batch_seconds(steps)
    assert seconds == pytest.approx({"97+": 1.0, "33-96": 0.2, "17-32": 0.1, "9-16": 0.2, "1-8": 0.5})
    shares = batch_shares(seconds)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["97+"] == pytest.approx(1.0 / 2.0)
    assert small_batch_share(shares) == pytest.approx(0.7 / 2.0)
    assert small_batch_share(shares, at_most=8) == pytest.approx(0.5 / 2.0)
    assert small_batch_share(shares, at_most=32) == pytest.approx(0.8 / 2.0)
    with pytest.raises(ValueError, match="top of a live-batch range"):
        small_batch_share(shares, at_most=10)


def test_rollout_shape_of_no_steps_is_nan_not_an_error():
    shape = rollout_shape([], [])
    assert set(shape) == {"length", "batch_s", "batch_share", "small_batch_share"}
    assert shape["batch_s"] == dict.fromkeys(RANGE_LABELS, 0.0)
    assert math.isnan(shape["small_batch_share"])


def test_rollout_shape_pools_rollouts():
    shape = rollout_shape([5, 7, 300], [step(3, 0.3), step(2, 0.1), step(100, 0.4)])
    assert shape["length"]["median"] == 7 and shape["length"]["max"] == 300
    assert shape["batch_share"]["1-8"] == pytest.approx(0.5)
    assert shape["small_batch_share"] == pytest.approx(0.5)


def test_a_set_of_lengths_drains_one_row_per_ended_response_priced_per_live_batch():
    # 20 rows of one token and one of three: step 0 runs 21 rows, steps 1 and 2 the long row alone
    seconds = drain_seconds([1] * 20 + [3], lambda batch: float(batch))
    assert seconds == {"97+": 0.0, "33-96": 0.0, "17-32": 21.0, "9-16": 0.0, "1-8": 2.0}
    assert drain_seconds([0, 0], lambda batch: 1.0) == dict.fromkeys(RANGE_LABELS, 0.0)
    assert drain_seconds([2, 5], lambda batch: 1.0)["1-8"] == 5.0  # 2 steps of 2 rows, 3 of one


def test_drain_shape_pools_rollouts_and_keeps_the_mean_of_their_own_shares():
    flat = lambda batch: 1.0  # noqa: E731
    # rollout 1: 17 rows for 1 step, then 1 row for 3 more (3 of 4 steps small); rollout 2: 40 rows for 4 steps
    shape = drain_shape([[1] * 16 + [4], [4] * 40], flat)
    assert shape["batch_s"] == {"97+": 0.0, "33-96": 4.0, "17-32": 1.0, "9-16": 0.0, "1-8": 3.0}
    assert shape["small_batch_share"] == pytest.approx(3 / 8)
    assert shape["small_batch_share_mean"] == pytest.approx((3 / 4 + 0) / 2)
    assert shape["length"]["max"] == 4 and shape["length"]["median"] == 4
    assert math.isnan(drain_shape([], flat)["small_batch_share_mean"])
