"""The adaptive SD tuner: cost model, acceptance and overhead estimates, the k decision, the disk cache, and the
engine's adaptive mode. Decision tests use hand-built costs and simulated step stats, so they are exact."""

import json
import random

import pytest
import torch

import respec.engine.tuner
from respec.engine.drafter import init_drafter
from respec.engine.generate import Engine, SpecConfig, StepStats
from respec.engine.model import ModelConfig, init_model
from respec.engine.sampling import SamplingParams
from respec.engine.tuner import (
    CostModel,
    Tuner,
    TunerConfig,
    cost_key,
    expected_emitted,
    load_or_profile,
    nondecreasing,
    smooth_across_batches,
    smooth_verify_costs,
)
from respec.errors import ConfigError

GRID = [1, 2, 4, 8, 16, 32, 64, 128]
BASE = 0.01  # seconds of a memory-bound target forward


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs this module on one torch thread: the tiny models gain nothing from more, and on a busy machine two
    threads spin-wait on each other (the engine tests here take ~10x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def roofline(k_max: int = 8, draft: float = 0.001, knee: int = 64) -> CostModel:
    """Returns costs of a roofline target: flat (memory-bound) until B * n tokens reach `knee`, then linear in
    B * n (compute-bound); the drafter step is flat until B reaches `knee`."""
    target = [[BASE * max(1.0, b * n / knee) for n in range(1, k_max + 2)] for b in GRID]
    return CostModel.from_parts(list(GRID), target, [draft * max(1.0, b / knee) for b in GRID])


def simulate_rows(rng: random.Random, accept: float, k: int, batch: int) -> list[int]:
    """Returns per-row accepted counts: each row accepts draft j with probability `accept` until a rejection."""
    out = []
    for _ in range(batch):
        c = 0
        while c < k and rng.random() < accept:
            c += 1
        out.append(c)
    return out


def step(costs: CostModel, batch: int, k: int, accepted: list[int] | None = None, extra: float = 0.0) -> StepStats:
    """Returns the stats of a step that took exactly the raw cost (+ extra seconds)."""
    accepted = [0] * batch if accepted is None else accepted
    return StepStats(batch, k, accepted, sum(accepted) + batch, costs.step_s(batch, k) + extra)


def feed(tuner: Tuner, rng: random.Random, accept: float, steps: int, batch: int, k: int | None = None) -> None:
    """Feeds `steps` simulated steps at acceptance `accept` (k = the tuner's k_max unless given)."""
    k = tuner.k_max if k is None else k
    for _ in range(steps):
        stats = step(tuner.costs, batch, k, simulate_rows(rng, accept, k, batch))
        stats.drafter_version = tuner.drafter_version  # drafted by the drafter the tuner currently models
        tuner.observe(stats)


# -- the cost model and E(k) ----------------------------------------------------------------------------------

def test_expected_emitted_hand_values():
    assert expected_emitted([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_emitted([0.5, 0.5, 0.5], 1) == 1.5
    assert expected_emitted([0.5, 0.5, 0.5], 3) == 1.875
    assert expected_emitted([0.9, 0.5], 2) == pytest.approx(1 + 0.9 + 0.45)
    assert expected_emitted([1.0] * 4, 4) == 5.0
    assert expected_emitted([0.0, 1.0], 2) == 1.0  # nothing past a sure rejection


def test_cost_model_interpolates_and_extrapolates():
    costs = CostModel.from_parts([2, 4], [[1.0, 2.0], [4.0, 6.0]], [0.5, 1.0])
    assert costs.k_max == 1 and costs.steps == [[1.0, 2.5], [4.0, 7.0]]  # target + k * draft
    assert costs.step_s(2, 0) == 1.0 and costs.step_s(4, 1) == 7.0  # on the grid
    assert costs.step_s(3, 0) == pytest.approx(2.5) and costs.step_s(3, 1) == pytest.approx(4.75)
    assert costs.step_s(1, 1) == 2.5  # below the grid: the smallest batch's
    assert costs.step_s(8, 0) == pytest.approx(10.0)  # linear beyond
    single = CostModel([4], [[2.0]])
    assert single.step_s(2, 0) == 2.0 and single.step_s(8, 0) == pytest.approx(4.0)  # proportional beyond
    falling = CostModel([1, 2], [[2.0], [1.0]])
    assert falling.step_s(10, 0) == 1.0  # a noisy falling last segment never makes larger batches cheaper


def test_cost_model_says_which_path_each_cell_runs():
    costs = CostModel([1, 8, 64], [[1.0, 2.0]] * 3, [[True, False], [False, True], [False, False]])
    assert costs.runs_compiled(1, 0) and not costs.runs_compiled(1, 1)
    assert costs.runs_compiled(2, 0) and costs.runs_compiled(16, 1)  # the grid batch nearest in log scale
    assert not costs.runs_compiled(128, 1) and not costs.runs_compiled(1, 5)  # beyond the profiled k: eager
    assert not CostModel([1], [[1.0]]).runs_compiled(1, 0)  # no paths recorded: eager


# -- the decision ---------------------------------------------------------------------------------------------

def test_dear_drafting_gives_plain_and_cheap_drafting_speculates():
    assert Tuner(roofline(draft=BASE), 8).choose(4)[0] == 0
    assert Tuner(roofline(draft=BASE / 100), 8).choose(4)[0] >= 3


def test_low_acceptance_gives_plain():
    tuner = Tuner(roofline(), 8)
    assert tuner.choose(16)[0] >= 1  # the prior alone speculates
    feed(tuner, random.Random(0), 0.0, steps=60, batch=16, k=4)
    assert tuner.acceptance()[0] < 0.03
    tuner.current_k = None  # the decision itself, without hysteresis from the first choice
    assert tuner.choose(16)[0] == 0


def measure_plain(tuner: Tuner) -> None:
    """Records plain and speculative steps at exactly their profiled cost in every batch bucket, so that the
    decision is not a first-visit probe."""
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        tuner.calibration.add(False, b, 1.0)
        tuner.calibration.add(True, b, 1.0)


def test_first_plain_choice_in_an_unmeasured_bucket_measures_speculation_once():
    tuner = Tuner(roofline(draft=BASE), 4)  # drafting as dear as the target: plain is the choice
    tuner.observe(step(tuner.costs, 64, 0))
    k = tuner.choose(64)[0]
    assert k >= 1  # measured plain, never speculation, at batch 64-127: a probe of two steps
    tuner.observe(step(tuner.costs, 64, k, [0] * 64, extra=1.0))  # also consumed the plain step's backlog
    assert not tuner.calibration.has(True, 64)  # ...so its time is not what a speculative step costs
    assert tuner.choose(64)[0] == k
    tuner.observe(step(tuner.costs, 64, k, [0] * 64))
    assert tuner.calibration.has(True, 64) and tuner.calibration.factor(True, 64) == 1.0
    assert tuner.choose(64)[0] == 0
    tuner.observe(step(tuner.costs, 64, 0))
    k = tuner.choose(8)[0]
    assert k >= 1  # speculation never measured at batch 8-15: a probe
    tuner.observe(step(tuner.costs, 8, k, [0] * 8))
    assert tuner.choose(8)[0] == k
    tuner.observe(step(tuner.costs, 8, k, [0] * 8))
    assert tuner.choose(8)[0] == 0


def test_first_speculative_choice_in_an_unmeasured_bucket_measures_plain_once():
    tuner = Tuner(roofline(), 8)
    feed(tuner, random.Random(3), 0.9, steps=20, batch=4)
    assert tuner.choose(2)[0] == 0  # plain never measured at batch 2-3: one plain step
    tuner.observe(step(tuner.costs, 2, 0))
    assert tuner.choose(2)[0] >= 1  # measured now (at its profile): back to speculating
    assert tuner.choose(3)[0] >= 1  # same bucket


def test_k_grows_with_acceptance():
    ks = []
    for accept in (0.02, 0.2, 0.5, 0.8, 0.95):
        tuner = Tuner(roofline(), 8)
        feed(tuner, random.Random(1), accept, steps=200, batch=32)
        measure_plain(tuner)
        ks.append(tuner.choose(4)[0])
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 6, ks
    assert len(set(ks)) >= 4, ks


def test_k_grows_as_the_batch_shrinks():
    ks = []
    for batch in (128, 64, 32, 16, 8, 1):
        tuner = Tuner(roofline(), 8)
        feed(tuner, random.Random(2), 0.8, steps=100, batch=32)
        measure_plain(tuner)
        ks.append(tuner.choose(batch)[0])
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 5, ks
    tuner = Tuner(roofline(), 8)
    assert tuner.choose(1, k_max=2)[0] <= 2  # the engine's k_max bounds the choice


def tied_costs() -> CostModel:
    """Returns costs t_target(B, n) = BASE * (1 + s * B * n), no draft cost, with s chosen so that k = 2 and
    k = 3 are predicted equally fast at B = 16 under the prior acceptance: k = 3 wins below 16, k = 2 above."""
    accept = [TunerConfig().prior_accept] * 3
    e2, e3 = expected_emitted(accept, 2), expected_emitted(accept, 3)
    x = (e3 - e2) / (4 * e2 - 3 * e3)  # E3 / (1 + 4x) == E2 / (1 + 3x), x = s * 16
    batches = [1, 64]
    return CostModel.from_parts(batches, [[BASE * (1 + x / 16 * b * n) for n in range(1, 6)] for b in batches],
                                [0.0, 0.0])


def test_hysteresis_holds_k_at_a_break_even_batch():
    costs = tied_costs()
    flappy = Tuner(costs, 4, TunerConfig(hysteresis=0.0))
    ks = [flappy.choose(b)[0] for b in [15, 17] * 10]
    assert ks == [3, 2] * 10  # the set-up: the best k alternates with the batch
    rates = flappy.rates(17)
    assert rates[2] / rates[3] < 1.01  # ...and the two are nearly tied
    steady = Tuner(costs, 4)
    ks = [steady.choose(b)[0] for b in [15, 17] * 10]
    assert ks == [3] * 20
    assert steady.choose(40)[0] < 3  # a clear change of regime still switches


def test_probe_after_probe_every_plain_steps():
    tuner = Tuner(roofline(draft=BASE), 4, TunerConfig(probe_every=4))
    ks = [tuner.choose(8)[0] for _ in range(15)]
    assert ks[:4] == [0] * 4 and ks[4] >= 1
    assert [k > 0 for k in ks] == ([False] * 4 + [True] * 2) * 2 + [False] * 3  # a probe is two steps
    assert tuner.current_k == 0  # the probe does not become the k in use
    once = Tuner(roofline(draft=BASE), 4, TunerConfig(probe_every=1))
    assert [once.choose(8)[0] > 0 for _ in range(6)] == [False, True, True] * 2


@pytest.mark.parametrize("margin, plain", [(0.25, True), (0.0, False)])
def test_plain_probes_find_a_plain_step_cheaper_than_profiled(margin, plain):
    """Plain steps really take 0.8x their profile and speculation is predicted only 7% faster: plain probes
    measure plain decoding and the tuner turns to it; without them one plain step is all c_plain ever sees."""
    costs = CostModel(list(GRID), [[BASE * (1 + 0.5 * k) for k in range(5)] for _ in GRID])
    tuner, rng = Tuner(costs, 4, TunerConfig(plain_probe_margin=margin)), random.Random(12)
    chosen = []
    for _ in range(200):
        k, _ = tuner.choose(32)
        real = costs.step_s(32, k) * (0.8 if k == 0 else 1.0)
        stats = StepStats(32, k, simulate_rows(rng, 0.6, k, 32) if k else [0] * 32, 0, real)
        stats.drafter_version = tuner.drafter_version
        tuner.observe(stats)
        chosen.append(k)
    assert (chosen[-40:].count(0) > 30) == plain, chosen[-40:]


def test_a_new_tuner_learns_from_the_engines_drafter_whatever_its_version():
    tuner, rng = Tuner(roofline(), 4), random.Random(8)
    for _ in range(30):
        stats = step(tuner.costs, 8, 4, simulate_rows(rng, 0.9, 4, 8))
        stats.drafter_version = 0  # the engine numbers its first drafter 0; the tuner was built knowing none
        tuner.observe(stats)
    assert tuner.drafter_version == 0 and tuner.acceptance()[0] > 0.8


def test_steps_of_a_swapped_out_drafter_are_ignored():
    tuner, rng = Tuner(roofline(), 4), random.Random(9)
    tuner.on_drafter_change(2)
    before = list(tuner.tried)
    stale = step(tuner.costs, 8, 4, simulate_rows(rng, 0.9, 4, 8))
    stale.drafter_version = 1  # drafted before the swap, observed after it
    tuner.observe(stale)
    assert tuner.tried == before


def test_decisions_are_deterministic():
    def run() -> list[int]:
        tuner, rng, ks = Tuner(roofline(), 6), random.Random(3), []
        for i in range(300):
            batch = 1 + (i * 7) % 48
            accept = 0.9 if i < 150 else 0.2
            k, _ = tuner.choose(batch)
            tuner.observe(step(tuner.costs, batch, k, simulate_rows(rng, accept, k, batch), rng.random() * 1e-3))
            ks.append(k)
        return ks

    a, b = run(), run()
    assert a == b
    assert len(set(a)) >= 3  # the stream does move the decision
    assert sum(a[-50:]) < sum(a[100:150])  # and lower acceptance lowers k


# -- estimates ------------------------------------------------------------------------------------------------

def test_acceptance_converges_and_recovers_after_a_drafter_change():
    tuner, rng = Tuner(roofline(), 4), random.Random(4)
    assert tuner.acceptance()[0] == pytest.approx(TunerConfig().prior_accept)
    feed(tuner, rng, 0.8, steps=300, batch=128)
    assert all(abs(a - 0.8) < 0.03 for a in tuner.acceptance()), tuner.acceptance()
    stale = Tuner(roofline(), 4)
    stale.load_state_dict(tuner.state_dict())
    tuner.on_drafter_change(7)
    assert tuner.drafter_version == 7
    assert tuner.tried[0] == pytest.approx(0.1 * stale.tried[0])  # swap_decay
    for t in (tuner, stale):
        feed(t, random.Random(5), 0.3, steps=10, batch=128)
    assert abs(tuner.acceptance()[0] - 0.3) < abs(stale.acceptance()[0] - 0.3)  # the swap speeds recovery
    feed(tuner, random.Random(6), 0.3, steps=40, batch=128)
    assert abs(tuner.acceptance()[0] - 0.3) < 0.03 and abs(tuner.acceptance()[1] - 0.3) < 0.05, \
        tuner.acceptance()
    assert tuner.choose(8)[0] <= 1


def test_untried_positions_inherit_their_neighbour():
    tuner = Tuner(roofline(), 4)
    feed(tuner, random.Random(7), 0.9, steps=100, batch=32, k=1)
    a = tuner.acceptance()
    assert abs(a[0] - 0.9) < 0.03 and a[1] == pytest.approx(a[0]) and a[3] == pytest.approx(a[0])


def test_drafts_past_a_stop_count_as_rejected():
    """Rows that accepted all 4 drafts but kept 2 tokens (a stop token second) tried position 2 and lost it."""
    tuner = Tuner(roofline(), 4)
    tuner.observe(StepStats(8, 4, [4] * 8, 40, tuner.costs.step_s(8, 4), kept=[2] * 8))
    assert tuner.tried == pytest.approx([8, 8, 0, 0]) and tuner.accepted == pytest.approx([8, 0, 0, 0])


def test_one_wide_step_counts_at_most_step_rows():
    tuner = Tuner(roofline(), 4)
    tuner.observe(step(tuner.costs, 128, 1, [1] * 128))
    assert tuner.tried[0] == pytest.approx(TunerConfig().step_rows)  # 128 rows in lockstep count as 32
    assert tuner.accepted[0] == pytest.approx(TunerConfig().step_rows)
    narrow = Tuner(roofline(), 4)
    narrow.observe(step(narrow.costs, 8, 1, [1] * 8))
    assert narrow.tried[0] == pytest.approx(8.0)


@pytest.mark.parametrize("config, retried", [(TunerConfig(), True),
                                              (TunerConfig(untried_decay=1.0, step_rows=10**6), False)])
def test_a_draft_length_ruled_out_by_one_unlucky_wide_step_is_tried_again(config, retried):
    """A wide step whose rows all rejected their second draft (right after a prefill every row drafts its
    first, high-entropy token at once) must not keep k at 1 for good: nothing at k = 1 refreshes position 2.
    Without the per-step cap and the faster fading of untried positions, it does."""
    costs = CostModel(list(GRID), [[BASE * (1 + 0.25 * k) for k in range(5)] for _ in GRID])  # k = 4 is best
    tuner, rng = Tuner(costs, 4, config), random.Random(11)
    feed(tuner, rng, 0.9, steps=30, batch=4)  # the tail of a rollout: a few rows, every draft tried
    tuner.observe(step(tuner.costs, 128, 3, [1] * 128))  # everyone accepts draft 1 and rejects draft 2
    chosen = []
    for _ in range(20):  # the drafter is as good as ever: 0.9 at every position
        k, _ = tuner.choose(16)
        stats = step(tuner.costs, 16, k, simulate_rows(rng, 0.9, k, 16))
        stats.drafter_version = tuner.drafter_version
        tuner.observe(stats)
        chosen.append(k)
    assert (max(chosen) >= 3) == retried, chosen


def test_slowdown_is_learnt_online_per_batch_bucket():
    costs = roofline()
    tuner = Tuner(costs, 4)
    assert tuner.predict_s(8, 2) == costs.step_s(8, 2)  # no evidence: the raw cost
    for _ in range(20):  # every speculative step at batch 8-15 takes 1.5x its profile, plain ones 1.2x
        tuner.observe(step(costs, 9, 3, extra=0.5 * costs.step_s(9, 3)))
    for _ in range(20):
        tuner.observe(step(costs, 12, 0, extra=0.2 * costs.step_s(12, 0)))
    assert tuner.predict_s(8, 2) == pytest.approx(1.5 * costs.step_s(8, 2))
    assert tuner.predict_s(15, 0) == pytest.approx(1.2 * costs.step_s(15, 0))
    assert tuner.predict_s(100, 4) == pytest.approx(1.5 * costs.step_s(100, 4))  # nearest visited bucket
    for _ in range(20):  # batch 64-127 becomes its own bucket once visited
        tuner.observe(step(costs, 100, 2, extra=-0.1 * costs.step_s(100, 2)))
    assert tuner.predict_s(70, 4) == pytest.approx(0.9 * costs.step_s(70, 4))
    assert tuner.predict_s(8, 2) == pytest.approx(1.5 * costs.step_s(8, 2))
    k, predicted = tuner.choose(16)
    assert predicted == pytest.approx(tuner.predict_s(16, k), abs=1e-12)


def test_a_preempted_step_moves_nothing_and_recent_steps_dominate():
    costs = roofline()
    tuner = Tuner(costs, 4)
    tuner.observe(step(costs, 4, 2, extra=1e3))  # a step preempted for a second
    assert tuner.predict_s(4, 2) == pytest.approx(costs.step_s(4, 2))  # the median with the prior ignores it
    for _ in range(20):
        tuner.observe(step(costs, 4, 2, extra=costs.step_s(4, 2)))  # then steps really take twice the profile
    assert tuner.predict_s(4, 2) == pytest.approx(2 * costs.step_s(4, 2))
    for _ in range(20):
        tuner.observe(step(costs, 4, 2))  # and back: only the last window counts
    assert tuner.predict_s(4, 2) == pytest.approx(costs.step_s(4, 2))


# -- checkpointing --------------------------------------------------------------------------------------------

def test_state_dict_round_trip():
    tuner, rng = Tuner(roofline(), 4), random.Random(8)
    for i in range(60):
        batch = 1 + i % 20
        k, _ = tuner.choose(batch)
        tuner.observe(step(tuner.costs, batch, k, simulate_rows(rng, 0.7, k, batch), 0.001 * rng.random()))
    tuner.on_drafter_change(3)
    state = json.loads(json.dumps(tuner.state_dict()))  # plain JSON values
    snapshot = json.dumps(state, sort_keys=True)
    other = Tuner(roofline(), 4)
    other.load_state_dict(state)
    assert json.dumps(other.state_dict(), sort_keys=True) == snapshot
    assert other.acceptance() == tuner.acceptance() and other.drafter_version == 3
    for batch in (1, 5, 17, 64, 200):
        assert other.predict_s(batch, 2) == tuner.predict_s(batch, 2)
    assert [other.choose(b) for b in range(1, 40)] == [tuner.choose(b) for b in range(1, 40)]
    kept = tuner.state_dict()
    before = json.dumps(kept, sort_keys=True)
    feed(tuner, rng, 0.1, steps=5, batch=8)
    assert json.dumps(kept, sort_keys=True) == before  # a state dict is a snapshot, not a view
    with pytest.raises(ConfigError, match="k_max"):
        Tuner(roofline(), 3).load_state_dict(state)


# -- bad input ------------------------------------------------------------------------------------------------

def test_k_max_must_fit_the_cost_model():
    costs = roofline(k_max=4)  # target forwards over up to 5 tokens
    Tuner(costs, 4)
    for k_max in (0, 5):
        with pytest.raises(ConfigError, match="k_max"):
            Tuner(costs, k_max)


@pytest.mark.parametrize("kwargs", [
    {"batch_grid": ()}, {"batch_grid": (0, 4)}, {"context": 0}, {"repeats": 0}, {"probe_every": 0},
    {"prior_accept": 0.0}, {"prior_accept": 1.0}, {"prior_weight": 0.0}, {"decay": 0.0}, {"decay": 1.5},
    {"swap_decay": 0.0}, {"calibration_window": 0}, {"hysteresis": -0.1}, {"untried_decay": 0.0},
    {"untried_decay": 1.5}, {"step_rows": 0}, {"plain_probe_margin": -0.1},
])
def test_tuner_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        TunerConfig(**kwargs)


def test_tuner_config_normalises_the_grid():
    assert TunerConfig(batch_grid=(4, 1, 4)).batch_grid == (1, 4)


# -- profiling and the disk cache -----------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def target():
    return init_model(CFG, seed=0).eval()


@pytest.fixture(scope="module")
def drafter(target):
    return init_drafter(target, seed=1)


def quick(tmp_path, **kwargs) -> TunerConfig:
    return TunerConfig(**{"batch_grid": (1, 4), "context": 8, "repeats": 1, "cache_dir": str(tmp_path), **kwargs})


def test_profile_times_the_engines_steps_and_is_cached_on_disk(target, drafter, tmp_path, monkeypatch):
    config = quick(tmp_path)
    engine = Engine(target, drafter, max_running=4)
    costs = load_or_profile(engine, 3, config)
    assert costs.batches == [1, 4] and costs.k_max == 3 and costs.compiled == [[False] * 4] * 2
    assert all(x > 0 for row in costs.steps for x in row) and list(costs.measured) == ["eager"]
    assert not engine.has_unfinished_requests() and engine._table is None  # scratch slots only
    files = list(tmp_path.glob("costs-*.json"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("profiled again despite a cached cost model")

    monkeypatch.setattr(respec.engine.tuner, "profile_costs", fail)
    again = load_or_profile(engine, 3, config)
    assert (again.batches, again.steps, again.compiled) == (costs.batches, costs.steps, costs.compiled)
    assert again.key == json.loads(json.dumps(costs.key))
    with pytest.raises(AssertionError, match="profiled again"):  # another k_max is another cost model
        load_or_profile(engine, 4, config)


def test_profile_grid_stops_at_the_engines_slots(target, drafter, tmp_path):
    costs = load_or_profile(Engine(target, drafter, max_running=2), 1, quick(tmp_path, batch_grid=(1, 2, 4)))
    assert costs.batches == [1, 2]


def test_cost_key_tells_setups_apart(target, drafter, tmp_path):
    config = quick(tmp_path)

    def key_of(t, d, k_max=3, cfg=config, **kwargs):
        return cost_key(Engine(t, d, max_running=4, **kwargs), k_max, cfg)

    key = key_of(target, drafter)
    other_target = init_model(ModelConfig(**{**vars(CFG), "num_hidden_layers": 5}), seed=0)
    assert key_of(other_target, init_drafter(other_target)) != key
    other_drafter = init_drafter(target, seed=1, aux_layer_ids=(0, 1, 2))
    assert key_of(target, other_drafter) != key
    target64 = init_model(CFG, seed=0, dtype=torch.float64)
    key64 = key_of(target64, init_drafter(target64))
    assert key64 != key and key64["dtype"] == "torch.float64"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key_of(target, drafter) != key
    finally:
        torch.set_num_threads(threads)
    assert key_of(target, drafter) == key
    assert key_of(target, drafter, cfg=quick(tmp_path, prior_accept=0.5)) == key  # estimates are not costs
    assert key_of(target, drafter, k_max=4) != key
    assert key_of(target, drafter, compile="auto") != key
    # Each setup gets its own file.
    for t, d in ((target, drafter), (target64, init_drafter(target64)), (target, other_drafter)):
        load_or_profile(Engine(t, d, max_running=4), 2, config)
    assert len(list(tmp_path.glob("costs-*.json"))) == 3


@pytest.mark.parametrize("garbage", [
    b"\x00\xffnot json", b'{"batches": [1, 4]', b"[1, 2]", b"null",
    b'{"batches": [1, 4], "steps": [[1.0], [2.0]], "compiled": null, "key": {}}',  # k_max 0, not 2
    b'{"batches": [1, 4], "steps": [[1, 1, 1], [1, 1, -1]], "compiled": null, "key": {}}',  # a negative time
    b'{"batches": [1, 4], "steps": [[1, 1, 1], [1, 1, "x"]], "compiled": null, "key": {}}',
    b'{"batches": [], "steps": [], "compiled": null, "key": {}}',  # empty: would break Tuner later
    b'{"batches": [4, 1], "steps": [[1, 1, 1], [1, 1, 1]], "compiled": null, "key": {}}',  # not the key's grid
    b'{"batches": [1, 4], "steps": [[1, 1, 1], [1, 1, 1]], "compiled": [[true]], "key": {}}',  # paths misshaped
])
def test_corrupt_cache_is_reprofiled_with_a_warning(target, drafter, tmp_path, garbage, monkeypatch):
    calls = []

    def profile(engine, k_max, config):  # a stand-in: real profiling is tested above
        calls.append(k_max)
        grid = list(config.batch_grid)
        return CostModel(grid, [[0.01 * len(calls)] * (k_max + 1) for _ in grid], None,
                         cost_key(engine, k_max, config))

    monkeypatch.setattr(respec.engine.tuner, "profile_costs", profile)
    config = quick(tmp_path)
    engine = Engine(target, drafter, max_running=4)
    load_or_profile(engine, 2, config)
    (path,) = tmp_path.glob("costs-*.json")
    path.write_bytes(garbage)
    with pytest.warns(UserWarning, match="unreadable"):
        costs = load_or_profile(engine, 2, config)
    assert calls == [2, 2] and costs.steps == [[0.02] * 3] * 2
    data = json.loads(path.read_text())  # rewritten
    assert data["steps"] == costs.steps and data["batches"] == [1, 4]
    assert load_or_profile(engine, 2, config).steps == costs.steps and len(calls) == 2
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_no_disk_cache(target, drafter, tmp_path):
    load_or_profile(Engine(target, drafter, max_running=4), 2, quick(tmp_path, use_disk_cache=False))
    assert list(tmp_path.iterdir()) == []


# -- the engine's adaptive mode -------------------------------------------------------------------------------

def test_adaptive_engine(target, drafter, tmp_path):
    engine = Engine(target, drafter)
    engine.tuner = Tuner.for_engine(engine, 4, quick(tmp_path))
    assert engine.default_tuner(4) is engine.tuner  # no re-profiling for a k_max the tuner covers
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 11, 12]]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    plain = engine.generate(prompts, params, SpecConfig(mode="off"))
    adaptive = engine.generate(prompts, params, SpecConfig(mode="adaptive", k_max=4))
    assert [s.tokens for s in adaptive.sequences] == [s.tokens for s in plain.sequences]
    assert adaptive.stats and all(0 <= s.k <= 4 for s in adaptive.stats)
    assert all(s.predicted_seconds is not None and s.predicted_seconds > 0 for s in adaptive.stats)
    assert all(len(s.accepted) == s.batch and max(s.accepted) <= s.k for s in adaptive.stats)
    assert engine.tuner.calibration.stats  # it observed the steps
    replay = engine.generate(prompts, params, SpecConfig(mode="replay", trace=adaptive.trace))
    assert [s.tokens for s in replay.sequences] == [s.tokens for s in plain.sequences]
    engine.set_drafter(init_drafter(target, seed=2), version=1)
    assert engine.tuner.drafter_version == 1


def test_engine_uses_the_tuner_it_was_given(target, drafter):
    tuner = Tuner(roofline(k_max=4), 4)
    engine = Engine(target, drafter, tuner=tuner)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    out = engine.generate([[1, 2, 3], [5]], params, SpecConfig(mode="adaptive", k_max=4))
    assert engine.tuner is tuner and all(0 <= s.k <= 4 for s in out.stats)
    first = out.stats[0]  # before any evidence the prediction is the raw cost; later ones add learnt overhead
    assert first.predicted_seconds == pytest.approx(tuner.costs.step_s(first.batch, first.k))
    assert all(s.predicted_seconds is not None for s in out.stats)


def test_adaptive_needs_a_drafter(target):
    with pytest.raises(ConfigError, match="drafter"):
        Engine(target).generate([[1, 2]], SamplingParams(max_new_tokens=4), SpecConfig(mode="adaptive"))
    with pytest.raises(ConfigError, match="drafter"):
        Tuner.for_engine(Engine(target), 4)


def test_nondecreasing_pools_adjacent_violators_to_their_mean():
    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert nondecreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert nondecreasing([1.0, 2.0]) == [1.0, 2.0]


def test_a_batch_size_whose_drafts_look_cheaper_than_at_both_neighbours_is_smoothed():
    # Relative costs of k = 1, 2: 1.5, 2.0 at batch 16; a disturbed 1.1, 1.2 at batch 32; 1.7, 2.4 at batch 64.
    rows = [[4.0, 6.0, 8.0], [6.0, 6.6, 7.2], [10.0, 17.0, 24.0]]
    smoothed = smooth_across_batches(rows)
    assert [row[0] for row in smoothed] == [4.0, 6.0, 10.0]  # plain costs as measured
    ratios = [[t / row[0] for t in row] for row in smoothed]
    assert ratios[0][1] == ratios[1][1] == pytest.approx(1.3) and ratios[2][1] == pytest.approx(1.7)
    assert all(a[k] <= b[k] + 1e-12 for a, b in zip(ratios, ratios[1:], strict=False) for k in range(3))
    assert smooth_across_batches([[2.0, 3.0], [4.0, 7.0]]) == [[2.0, 3.0], [4.0, 7.0]]  # already monotone
    assert smooth_verify_costs([4.5, 4.0, 5.0]) == [4.5, 4.5, 5.0]  # along k: a line, never below plain
