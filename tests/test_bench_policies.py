"""The baseline k choosers: vLLM's batch-size table and TLT/FastRL's bandit, on synthetic step stats."""

import random

import pytest

from respec.bench.policies import (
    BanditPolicy,
    TablePolicy,
    batch_group,
    sd_threshold_from_table,
    table_from_cells,
)
from respec.engine.generate import StepStats
from respec.errors import ConfigError


def stats(batch: int, k: int, accepted_per_row: int, seconds: float) -> StepStats:
    """Returns the StepStats of a step where every row accepted the same number of drafts."""
    return StepStats(batch, k, [accepted_per_row] * batch, batch * (accepted_per_row + 1), seconds)


# -- TablePolicy -------------------------------------------------------------------------------------------------

def test_table_lookup_uses_the_largest_bound_at_or_below_the_batch():
    policy = TablePolicy({1: 4, 4: 2, 16: 0})
    got = {b: policy.choose(b, k_max=8)[0] for b in (1, 2, 3, 4, 15, 16, 17, 500)}
    assert got == {1: 4, 2: 4, 3: 4, 4: 2, 15: 2, 16: 0, 17: 0, 500: 0}
    assert policy.choose(1, k_max=3) == (3, None)  # clamped like vLLM's min(num_speculative_tokens, k)
    assert policy.vllm_schedule() == [(1, 3, 4), (4, 15, 2), (16, 16, 0)]
    policy.observe(stats(4, 2, 1, 0.01))  # learns nothing
    assert policy.table == {1: 4, 4: 2, 16: 0}


@pytest.mark.parametrize("table", [{}, {2: 1}, {1: -1}, {0: 1, 1: 2}, {1: 1.5}])
def test_table_rejects_bad_tables(table):
    with pytest.raises(ConfigError):
        TablePolicy(table)


def cell(batch, mode, k, tps, temperature=0.0):
    return {"batch": batch, "temperature": temperature, "mode": mode, "k": k, "tokens_per_s": tps}


def test_table_from_cells_picks_the_fastest_k_per_measured_batch():
    cells = [cell(2, "plain", 0, 100), cell(2, "static", 1, 150), cell(2, "static", 4, 180),
             cell(8, "plain", 0, 300), cell(8, "static", 1, 310), cell(8, "static", 4, 250),
             cell(32, "plain", 0, 900), cell(32, "static", 1, 800), cell(32, "static", 4, 600),
             cell(32, "adaptive", 1.3, 5000)]  # other modes are not part of the offline grid
    assert table_from_cells(cells) == {1: 4, 8: 1, 32: 0}  # the smallest measured batch's range starts at 1
    # ties go to the smaller k; plain counts as k = 0
    assert table_from_cells([cell(1, "plain", 0, 10), cell(1, "static", 2, 10)]) == {1: 0}
    with pytest.raises(ConfigError):
        table_from_cells([cell(1, "plain", 0, 10), cell(1, "plain", 0, 10, temperature=1.0)])
    with pytest.raises(ConfigError):
        table_from_cells([cell(1, "adaptive", 1, 10)])


def test_sd_threshold_from_table():
    assert sd_threshold_from_table({1: 4, 8: 1, 32: 0}) == 31
    assert sd_threshold_from_table({1: 4, 8: 0, 32: 0}) == 7
    assert sd_threshold_from_table({1: 4, 8: 2}) is None  # speculates at every batch: no gate
    assert sd_threshold_from_table({1: 0, 8: 0}) == 0  # never


# -- BanditPolicy ------------------------------------------------------------------------------------------------

def test_batch_groups_follow_fastrl():
    assert [batch_group(b) for b in (1, 31, 32, 39, 40, 127, 128, 159, 160, 256, 1000)] == \
        [1, 31, 32, 32, 40, 120, 128, 128, 160, 256, 256]


def simulate(policy: BanditPolicy, batch: int, steps: int, accept: float, cost, seed: int = 0) -> list[int]:
    """Runs `steps` decode steps against a synthetic engine where each draft is accepted with probability
    `accept` (given the previous one was) and a step with k drafts takes cost(k) seconds; returns the ks."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(steps):
        k, predicted = policy.choose(batch, k_max=8)
        assert predicted is None and 0 <= k <= 8
        accepted = []
        for _ in range(batch):
            n = 0
            while n < k and rng.random() < accept:
                n += 1
            accepted.append(n)
        policy.observe(StepStats(batch, k, accepted, sum(accepted) + batch, cost(k) * rng.uniform(0.9, 1.1)))
        chosen.append(k)
    return chosen


def expected_rate(k: int, accept: float, cost) -> float:
    return sum(accept ** j for j in range(k + 1)) / cost(k)


@pytest.mark.parametrize("stable_accept", [True, False])
def test_bandit_converges_to_the_best_arm(stable_accept):
    seconds = {1: 0.012, 2: 0.010, 4: 0.016, 8: 0.030}  # a synthetic machine on which k = 2 is the fastest step

    def cost(k):
        return seconds[k]
    ks = tuple(seconds)
    rates = {k: expected_rate(k, 0.5, cost) for k in ks}  # tokens/s per row: 125, 175, 121, 67
    best = max(rates, key=rates.get)
    assert best == 2
    policy = BanditPolicy(ks, sd_batch_threshold=None, stable_accept=stable_accept, seed=1)
    # FastRL's stable accept length (an arm's median over its history, refreshed on 10% of steps) can keep early,
    # unlucky rewards in a rarely explored arm's window for a few hundred steps; by 1000 steps every seed of 40
    # tried had converged
    chosen = simulate(policy, batch=4, steps=1000, accept=0.5, cost=cost)
    assert set(chosen[:8]) == set(ks)  # every arm is tried early (no reward yet scores +inf)
    tail = chosen[-300:]
    assert tail.count(best) / len(tail) > 0.85  # greedy 90% + its share of the 10% exploration
    assert max(ks, key=lambda k: policy.score(4, k)) == best


def test_bandit_keeps_separate_statistics_per_batch_group():
    policy = BanditPolicy((1, 4), epsilon=0.0, sd_batch_threshold=None)
    for _ in range(5):  # at batch 2, k = 1 is faster; at batch 40 (group 40), k = 4 is
        policy.observe(stats(2, 1, 1, 0.01))
        policy.observe(stats(2, 4, 1, 0.05))
        policy.observe(stats(40, 1, 1, 0.02))
        policy.observe(stats(40, 4, 4, 0.01))
    assert policy.choose(2, 8) == (1, None)
    assert policy.choose(40, 8) == (4, None)
    assert policy.choose(47, 8) == (4, None)  # same group as 40
    assert policy.choose(3, 8) == (1, None)  # group 3 has no data: arms score +inf, the first wins
    assert set(policy.rewards) == {2, 40}
    assert policy.choose(40, 2) == (1, None)  # arms above the engine's k_max are not valid


def test_bandit_reward_window_forgets_old_rewards():
    policy = BanditPolicy((1, 2), epsilon=0.0, window=300, sd_batch_threshold=None, stable_accept=False)
    policy.observe(stats(4, 1, 1, 0.010))  # k = 1: 8 tokens / 10 ms = 800 tok/s
    for _ in range(300):  # k = 2 was fast ...
        policy.observe(stats(4, 2, 2, 0.010))  # 1200 tok/s
    assert policy.choose(4, 8)[0] == 2
    for _ in range(151):  # ... then slow: a majority of the window is slow, and the median follows
        policy.observe(stats(4, 2, 2, 0.030))  # 400 tok/s
    assert len(policy.rewards[4][2]) == 300
    assert policy.choose(4, 8)[0] == 1
    for _ in range(300):
        policy.observe(stats(4, 2, 2, 0.030))
    assert set(policy.rewards[4][2]) == {12 / 0.030}  # the fast rewards left the window


def test_bandit_gates_sd_until_the_batch_is_small_for_ten_steps():
    policy = BanditPolicy((2,), epsilon=0.0, sd_batch_threshold=8, seed=0)
    assert [policy.choose(b, 8)[0] for b in (64, 64, 32, 16)] == [0, 0, 0, 0]  # large batch: plain
    small = [policy.choose(8, 8)[0] for _ in range(5)]
    assert small == [0] * 5
    policy.choose(7, 8)
    policy.last_batch = None  # pretend the batch grew back inside one rollout (a continuous-batching server)
    assert policy.choose(9, 8)[0] == 0 and policy.small_steps == 0  # a large step resets the count
    ks = [policy.choose(6, 8)[0] for _ in range(12)]
    assert ks == [0] * 10 + [2, 2]  # the 10th small step opens the gate and still runs plain
    assert policy.choose(5, 8)[0] == 2  # open for the rest of the rollout
    policy.reset_gate()
    assert policy.choose(5, 8)[0] == 0
    policy.choose(4, 8)
    assert policy.choose(6, 8)[0] == 0 and policy.small_steps == 1  # a larger batch = a new generate call
    assert BanditPolicy((2,), sd_batch_threshold=None).choose(512, 8)[0] == 2  # no threshold: SD always on
    never = BanditPolicy((2,), sd_batch_threshold=0)
    assert all(never.choose(1, 8)[0] == 0 for _ in range(20))


def test_bandit_is_reproducible_and_validates():
    def cost(k):
        return 0.01 + 0.002 * k
    a = simulate(BanditPolicy(sd_batch_threshold=None, seed=3), 8, 200, 0.7, cost)
    b = simulate(BanditPolicy(sd_batch_threshold=None, seed=3), 8, 200, 0.7, cost)
    assert a == b
    for kwargs in ({"ks": (0, 2)}, {"ks": ()}, {"epsilon": 1.5}, {"window": 0}, {"sd_batch_threshold": -1}):
        with pytest.raises(ConfigError):
            BanditPolicy(**kwargs)
