"""Tests of respec/rl/learner.py: the reward weights, the guard's acceptance estimate (against the engine's
measurement), the loss falls, crashes leave training running with the last good drafter, the guard refuses a
worse candidate, resume restores the learner, sampling stays exact while drafters are published from another
thread, and async mode trains in its own thread."""

import copy
import threading
import time
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch
from test_generate import RandomChooser, chi2_pvalue, exact_joint
from test_trainer import digit_share

import respec.rl.learner
from respec.engine.checkpoint import load_model
from respec.engine.drafter import init_drafter, inv_freq_fp32, load_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError
from respec.rl.config import (
    AlgorithmConfig,
    DataConfig,
    LearnerConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
)
from respec.rl.learner import (
    Learner,
    StepRollouts,
    lookahead_targets,
    sequence_weights,
    teacher_forced_emitted,
)
from respec.rl.trainer import Trainer
from respec.world.distill import DistillBatch, DistillConfig, target_batch, train_drafter, ttt_logits

pytestmark = pytest.mark.usefixtures("per_test_cache")


def learner_config(world, **sections) -> TrainConfig:
    """Returns a few-second RL run on the tiny world with a sync learner that checks and publishes often."""
    policy, drafter = world
    base = TrainConfig(
        trainer=TrainerConfig(model=str(policy), steps=3, lr=3e-3, warmup_steps=1, eval_every=0,
                              eval_before_train=False, save_every=0),
        algorithm=AlgorithmConfig(ppo_mini_batch_size=8),
        rollout=RolloutConfig(group_size=8, max_new_tokens=8, spec="static", k=2, k_max=3, drafter=str(drafter)),
        data=DataConfig(prompts_per_step=8, eval_problems=8),
        learner=LearnerConfig(mode="sync", steps_per_rollout=2, publish_every=1, batch_size=16))
    return replace(base, **{name: replace(getattr(base, name), **kw) for name, kw in sections.items()})


def as_batch(r: StepRollouts) -> DistillBatch:
    return DistillBatch(r.input_ids, r.features, r.target_logp, r.loss_mask)


def wait_idle(learner: Learner, timeout: float = 60.0) -> None:
    """Waits until an async learner has used the steps its last submission granted (or stopped)."""
    assert learner.wait_idle(timeout), f"the learner did not finish its steps in {timeout} s"


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture(scope="module")
def rollouts(world, tmp_path_factory):
    """(the engine's target, the tiny world's drafter as the engine loaded it, the StepRollouts of two
    sync-learner RL steps)."""
    trainer = Trainer.start(learner_config(world, learner=dict(steps_per_rollout=1, publish_every=1000)),
                            tmp_path_factory.mktemp("rollouts") / "run", reward_fn=digit_share)
    drafter = copy.deepcopy(trainer.engine.drafter)
    steps = []
    for _ in range(2):
        trainer.step()
        steps.append(trainer.last_features)
    return trainer.engine.target, drafter, steps


# -- reward weights --------------------------------------------------------------------------------------------

def test_sequence_weights_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, 0.0, -2.0])  # 2 groups of G = 4
    a = adv.numpy().reshape(2, 4).astype(np.float64)
    torch.testing.assert_close(sequence_weights(adv, 4, "uniform"), torch.ones(8))
    assert sequence_weights(adv, 4, "uniform").dtype == torch.float32

    for tau in (1.0, 2.0):
        e = np.exp(a / tau)
        expected = (e / e.mean(1, keepdims=True)).flatten()  # exp(A / tau) / mean_group exp(A / tau)
        w = sequence_weights(adv, 4, "reward", temperature=tau, max_weight=100.0)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(w.view(2, 4).mean(1).numpy(), [1.0, 1.0], rtol=1e-5)  # nothing clipped
    # Clipping: tau = 1 gives 3.28 for the best answer of group 2 (and 1.89, 1.17 in group 1).
    e = np.exp(a)
    unclipped = (e / e.mean(1, keepdims=True)).flatten()
    w = sequence_weights(adv, 4, "reward", temperature=1.0, max_weight=1.5)
    np.testing.assert_allclose(w.numpy(), np.minimum(unclipped, 1.5), rtol=1e-5)
    assert w.max().item() == pytest.approx(1.5) and (unclipped > 1.5).sum() == 2
    # tau -> infinity is plain KD; equal advantages (even huge ones at small tau) weigh 1.
    torch.testing.assert_close(sequence_weights(adv, 4, temperature=1e6), torch.ones(8), atol=1e-5, rtol=0)
    flat = torch.tensor([500.0] * 4 + [-3.0] * 4)
    torch.testing.assert_close(sequence_weights(flat, 4, temperature=0.1), torch.ones(8))
    with pytest.raises(ValueError, match="weighting"):
        sequence_weights(adv, 4, "advantage")


def test_lookahead_targets_by_hand():
    # One row of 3 positions over a 3-token vocab; p_t predicts x_{t+1}.
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]])
    ids = torch.tensor([[2, 0, 1]])  # x_1 = 0 (sampled at position 0), x_2 = 1 (at position 1)
    logp = p.log()
    eta, adv = 0.5, torch.tensor([2.0])
    out = lookahead_targets(logp, ids, adv, eta)
    for t, y in ((0, 0), (1, 1)):
        z = np.log(p[0, t].numpy().astype(np.float64)) + eta * 2.0 * (np.eye(3)[y] - p[0, t].numpy())
        np.testing.assert_allclose(out[0, t].exp().numpy(), np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    assert out[0, 0, 0] > logp[0, 0, 0] and out[0, 1, 1] > logp[0, 1, 1]  # positive advantage: towards y
    # A negative advantage moves the same step away from the sampled token; eta = 0 or A = 0 changes nothing.
    assert lookahead_targets(logp, ids, -adv, eta)[0, 0, 0] < logp[0, 0, 0]
    assert lookahead_targets(logp, ids, adv, 0.0) is logp
    torch.testing.assert_close(lookahead_targets(logp, ids, torch.zeros(1), eta), logp)
    # A draft vocab (target ids 5, 7, 9): x_1 = 7 is draft index 1; a next token outside it (8) keeps p_t.
    ids_d = torch.tensor([[9, 7, 8]])
    out_d = lookahead_targets(logp, ids_d, adv, eta, draft_ids=torch.tensor([5, 7, 9]))
    z = np.log(p[0, 0].numpy().astype(np.float64)) + eta * 2.0 * (np.eye(3)[1] - p[0, 0].numpy())
    np.testing.assert_allclose(out_d[0, 0].exp().numpy(), np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    torch.testing.assert_close(out_d[0, 1], logp[0, 1])


# -- the guard's estimate --------------------------------------------------------------------------------------

def test_teacher_forced_emitted_bounds_identity_and_ranking(rollouts):
    target, drafter, steps = rollouts
    batch = as_batch(steps[-1])
    values = [teacher_forced_emitted(drafter, batch, k) for k in (1, 2, 3, 4)]
    for k, v in zip((1, 2, 3, 4), values, strict=True):
        assert 1.0 <= v <= k + 1
    assert values == sorted(values)  # each longer chain adds a non-negative term

    # A target equal to the drafter's own first draft distribution (p_{t+1} = q_0(t)): every first draft is
    # accepted, so k = 1 emits exactly 2 per step (an off-by-one in the alignment would not).
    with torch.no_grad():
        logq0 = torch.log_softmax(ttt_logits(drafter, batch.input_ids, batch.features, 1)[0].float(), -1)
    own = torch.zeros_like(batch.target_logp)
    own[:, 1:] = logq0[:, :-1]
    mirrored = replace(batch, target_logp=own)
    assert teacher_forced_emitted(drafter, mirrored, 1) == pytest.approx(2.0, abs=1e-5)
    assert 2.0 <= teacher_forced_emitted(drafter, mirrored, 3) <= 4.0

    # The tiny world's (briefly) distilled drafter beats a fresh one on the same rows (measured 1.34 vs 1.28).
    fresh = init_drafter(target, seed=7)
    assert teacher_forced_emitted(drafter, batch, 1) > teacher_forced_emitted(fresh, batch, 1) + 0.02


V = 8  # the sharp target's vocabulary: the joint of 3 tokens has 512 cells, few enough for a chi-square test


@pytest.fixture(scope="module")
def sharp(sharp_target):
    """(a peaky V = 8 target, a drafter distilled on it for 30 steps, a random drafter)."""
    target = sharp_target(V, max_positions=128)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(48)]
    cfg = DistillConfig(num_rollouts=48, max_new_tokens=24, steps=30, batch_size=16, lr=5e-3, warmup_steps=5,
                        ttt_steps=4, eval_prompts=8, eval_max_new_tokens=16, eval_ks=(3,))
    torch.manual_seed(0)
    return target, train_drafter(target, prompts, cfg, log=None), init_drafter(target, seed=2)


def test_a_drafter_swapped_in_mid_run_drafts_with_the_whole_context(sharp):
    """Swapping in an identical copy every 4 steps changes nothing: the copy catches up on the recorded history
    (prompt, plain and verified steps), so every step accepts exactly what the run without swaps accepts. A copy
    that started from an empty cache would draft from the tokens since the swap only, and accept less."""
    target, drafter, _ = sharp
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(16)]
    params = SamplingParams(temperature=1.0, max_new_tokens=60, seed=4, ignore_eos=True)
    chooser = lambda: RandomChooser(3)  # noqa: E731  (plain and speculative steps, k = 0..4)
    engine = Engine(target, drafter)
    alone = engine.generate(prompts, params, SpecConfig(mode="adaptive", k_max=4), chooser())
    twin = copy.deepcopy(drafter)
    steps = []

    def on_step(stats):
        steps.append(stats)
        if len(steps) % 4 == 0:
            engine.set_drafter([drafter, twin][len(steps) // 4 % 2], version=len(steps) // 4)

    swapped = engine.generate(prompts, params, SpecConfig(mode="adaptive", k_max=4), chooser(), on_step)
    engine.set_drafter(drafter, version=0)
    assert len({s.drafter_version for s in swapped.stats if s.k}) > 3
    assert [s.accepted for s in swapped.stats] == [s.accepted for s in alone.stats]
    assert [s.tokens for s in swapped.sequences] == [s.tokens for s in alone.sequences]


@pytest.mark.parametrize("k", [2, 4])
def test_teacher_forced_emitted_matches_the_engine(sharp, k):
    """The teacher-forced estimate on the engine's own T = 1 rollouts agrees with the emitted tokens per verify
    step the engine measures (measured ratios 0.98-1.01 for k = 1..4)."""
    target, drafter, _ = sharp
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(64)]
    params = SamplingParams(temperature=1.0, max_new_tokens=32, seed=1, ignore_eos=True)
    result = Engine(target, drafter).generate(prompts, params, SpecConfig(mode="static", k=k))
    batch = target_batch(target, [p + s.tokens for p, s in zip(prompts, result.sequences, strict=True)],
                         [len(p) for p in prompts], drafter.aux_layer_ids)
    estimate, measured = teacher_forced_emitted(drafter, batch, k), result.mean_emitted_per_step
    assert measured > 1.5 and estimate == pytest.approx(measured, rel=0.1), (estimate, measured)


# -- training --------------------------------------------------------------------------------------------------

def test_loss_falls_on_a_fixed_buffer(rollouts):
    _, drafter, steps = rollouts
    published = []
    cfg = LearnerConfig(mode="sync", steps_per_rollout=8, publish_every=1000, batch_size=32)
    learner = Learner(cfg, drafter, publish=lambda d, v: published.append(v), seed=0)
    assert learner._thread is None  # sync: no thread
    losses = []
    for _ in range(5):
        learner.submit(steps[-1])
        m = learner.metrics()
        losses.append(m["learner/loss"])
    assert learner.steps == 40 and m["learner/steps"] == 40 and not published  # no check was due
    assert len(learner.buffer) == 4  # buffer_steps: the oldest submissions went
    # measured 2.77, 1.93, 1.22, 0.67, 0.31 (lr 1e-3)
    assert losses[-1] < 0.5 * losses[0] and all(b < a for a, b in pairwise(losses)), losses


def test_lookahead_moves_training_targets_only(rollouts):
    _, drafter, steps = rollouts
    r = steps[-1]
    plain = Learner(LearnerConfig(mode="sync", steps_per_rollout=1), drafter, publish=lambda d, v: None, seed=0)
    ahead = Learner(LearnerConfig(mode="sync", steps_per_rollout=1, lookahead=1.0), drafter,
                    publish=lambda d, v: None, seed=0)
    plain.buffer.add(r)
    ahead.buffer.add(r)
    (a,), (b,) = plain.buffer.entries(), ahead.buffer.entries()  # same seed: the same held-out groups
    torch.testing.assert_close(a.held_out.target_logp, b.held_out.target_logp)  # the guard reads p_t
    mask = a.train.loss_mask
    assert not torch.allclose(a.train.target_logp[mask], b.train.target_logp[mask])
    rows = [i for i in range(len(r.advantages)) if any(torch.equal(r.input_ids[i], x) for x in a.train.input_ids)]
    assert len(rows) == len(a.train)
    expected = lookahead_targets(a.train.target_logp, a.train.input_ids, r.advantages[rows], 1.0)
    torch.testing.assert_close(b.train.target_logp, expected)
    with pytest.raises(ConfigError, match="lookahead"):
        LearnerConfig(lookahead=-1.0)


# -- crashes ---------------------------------------------------------------------------------------------------

def failing_loss(monkeypatch, fail) -> list[str]:
    """Replaces the learner's distill_loss by one that raises on the calls `fail(n)` (n = 1, 2, ...) selects;
    returns the list of thread names the calls ran in."""
    real, threads, lock = respec.rl.learner.distill_loss, [], threading.Lock()

    def loss(*args, **kwargs):
        with lock:
            threads.append(threading.current_thread().name)
            n = len(threads)
        if fail(n):
            raise RuntimeError(f"injected failure at call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(respec.rl.learner, "distill_loss", loss)
    return threads


def recorded_publish(learner: Learner) -> list[tuple[int, int]]:
    """Wraps the learner's publish callback; returns the list of (version, learner crashes so far) it gets."""
    calls, publish = [], learner.publish_fn

    def record(drafter, version):
        calls.append((version, learner.error_count))
        publish(drafter, version)

    learner.publish_fn = record
    return calls


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_crash_is_survived(world, tmp_path, monkeypatch, mode):
    threads = failing_loss(monkeypatch, lambda n: n == 3)
    # 6 steps per rollout: even an async learner that only ran after the last submission crashes and goes on.
    cfg = learner_config(world, trainer=dict(steps=4), learner=dict(mode=mode, steps_per_rollout=6))
    trainer = Trainer.start(cfg, tmp_path / "run", reward_fn=digit_share)
    calls = recorded_publish(trainer.learner)
    messages = []
    try:
        rows = trainer.train(log=lambda message, fraction=None: messages.append(message))
        wait_idle(trainer.learner)
        learner, metrics = trainer.learner, trainer.learner.metrics()
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and trainer.global_step == 4
        assert metrics["learner/errors"] == 1 and metrics["learner/alive"] == 1 and learner.alive
        assert len(learner.errors) == 1 and "injected failure at call 3" in learner.errors[0]
        assert any("restarting from drafter version" in m for m in messages), messages
        assert metrics["learner/steps"] == len(threads) - 1 >= 5  # one call crashed
        versions = [v for v, _ in calls]
        assert versions == list(range(1, len(calls) + 1)) and trainer.engine.drafter_version == versions[-1]
        assert any(errors == 1 for _, errors in calls), calls  # it published again after the restart
        if mode == "sync":
            assert len(threads) == 24 and rows[-1]["learner/errors"] == 1 and set(threads) == {"MainThread"}
    finally:
        trainer.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_learner_that_always_crashes_stops_and_the_run_goes_on(world, tmp_path, monkeypatch, mode):
    failing_loss(monkeypatch, lambda n: True)
    trainer = Trainer.start(learner_config(world, learner=dict(mode=mode, max_restarts=2)), tmp_path / "run",
                            reward_fn=digit_share)
    engine = trainer.engine
    first, weights = engine.drafter, copy.deepcopy(engine.drafter)
    calls = recorded_publish(trainer.learner)
    messages = []
    try:
        rows = trainer.train(log=lambda message, fraction=None: messages.append(message))
        wait_idle(trainer.learner)
        metrics = trainer.learner.metrics()
        assert trainer.global_step == 3 and [r["step"] for r in rows] == [1, 2, 3]
        assert metrics["learner/errors"] == 3 and metrics["learner/alive"] == 0  # max_restarts + 1 crashes
        assert metrics["learner/steps"] == 0 and not calls
        assert any("2 restarts failed, the learner stops" in m for m in messages), messages
        assert engine.drafter is first and engine.drafter_version == 0 and states_equal(engine.drafter, weights)
        if mode == "async":
            trainer.learner._thread.join(10)
            assert not trainer.learner._thread.is_alive()  # the thread ended itself
        else:
            assert rows[-1]["learner/alive"] == 0 and rows[-1]["drafter/version"] == 0
    finally:
        trainer.close()


# -- the guard -------------------------------------------------------------------------------------------------

@pytest.fixture
def bf16_engine(world):
    """An engine in bf16 (a GPU run's rollout dtype) on the tiny world's policy and drafter."""
    target = load_model(world[0], torch.bfloat16).requires_grad_(False)
    return Engine(target, load_drafter(world[1], target))


def test_the_guard_refuses_a_worse_candidate(rollouts, bf16_engine):
    _, _, steps = rollouts
    engine, first = bf16_engine, bf16_engine.drafter
    calls = []
    cfg = LearnerConfig(mode="sync", steps_per_rollout=4, publish_every=2, batch_size=16)
    learner = Learner(cfg, engine.drafter, publish=lambda d, v: calls.append(v), seed=0)
    with torch.no_grad():  # a candidate far worse than the published drafter: large random weights
        gen = torch.Generator().manual_seed(0)
        for p in learner.drafter_trainer.drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    learner.submit(steps[0])
    trainer = learner.drafter_trainer
    candidate, published = trainer.guard_last
    assert candidate < published, trainer.guard_last
    assert trainer.rejected_count == 2 and learner.version == 0 and trainer.published_count == 0 and not calls
    assert engine.drafter is first and engine.drafter_version == 0
    assert learner.steps == 4  # a refused candidate keeps training


def test_a_better_candidate_is_published_in_the_engines_dtype(rollouts, bf16_engine):
    _, _, steps = rollouts
    engine = bf16_engine
    calls = []

    def publish(drafter, version):
        calls.append((drafter, version))
        engine.set_drafter(drafter, version)

    cfg = LearnerConfig(mode="sync", steps_per_rollout=4, publish_every=2, batch_size=16)
    learner = Learner(cfg, engine.drafter, publish=publish, seed=0)
    for r in steps:
        learner.submit(r)
    versions = [v for _, v in calls]
    assert versions == list(range(1, len(calls) + 1)) and len(calls) >= 2, (versions, learner.rejected_count)
    assert learner.version == versions[-1] == engine.drafter_version and learner.trained_through == 2
    drafter = engine.drafter
    assert drafter is calls[-1][0] and drafter.embed_tokens is engine.target.embed_tokens
    assert drafter.fc.weight.dtype == torch.bfloat16 and not drafter.fc.weight.requires_grad
    # RoPE's frequencies stay fp32, as load_drafter gives them (a bf16 round would move every angle).
    assert drafter.inv_freq.dtype == torch.float32 and torch.equal(drafter.inv_freq, inv_freq_fp32(drafter))
    ours = learner.drafter_trainer.published.state_dict()
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, ours[name].to(tensor.dtype)), name
    assert all(p.data_ptr() != q.data_ptr() for p in drafter.parameters() for q in learner.drafter_trainer.drafter.parameters())
    out = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6, seed=0),
                          SpecConfig(mode="static", k=2))
    assert all(s.tokens for s in out.sequences) and {s.drafter_version for s in out.stats} == {versions[-1]}


# -- checkpoints -----------------------------------------------------------------------------------------------

def test_resume_restores_the_learner(world, tmp_path):
    run = tmp_path / "run"
    cfg = learner_config(world, trainer=dict(steps=4, save_every=2), learner=dict(buffer_steps=3, publish_every=2))
    trainer = Trainer.start(cfg, run, reward_fn=digit_share)
    trainer.train()  # checkpoints at steps 2 and 4
    saved = trainer.learner
    assert saved.version >= 1 and saved.steps == 8 and [e.step for e in saved.buffer] == [2, 3, 4]

    resumed = Trainer.resume(run, reward_fn=digit_share)
    learner = resumed.learner
    assert resumed.global_step == 4 and learner.config == saved.config
    for name in ("version", "trained_through", "steps", "error_count"):
        assert getattr(learner, name) == getattr(saved, name), name
    ours_t, theirs_t = learner.drafter_trainer, saved.drafter_trainer
    for name in ("published_count", "rejected_count"):
        assert getattr(ours_t, name) == getattr(theirs_t, name), name
    assert [e.step for e in learner.buffer] == [2, 3, 4]
    for ours, theirs in zip(learner.buffer, saved.buffer, strict=True):
        assert torch.equal(ours.weights, theirs.weights)
        for part in ("train", "held_out"):
            mine, original = vars(getattr(ours, part)), vars(getattr(theirs, part))
            for name, tensor in original.items():
                assert torch.equal(mine[name], tensor), (part, name)
    assert states_equal(ours_t.drafter, theirs_t.drafter) and states_equal(ours_t.published, theirs_t.published)
    assert torch.equal(ours_t.embed.weight, theirs_t.embed.weight)
    assert torch.equal(learner.buffer.gen.get_state(), saved.buffer.gen.get_state())
    ours, theirs = ours_t.optimizer.state_dict(), theirs_t.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        for key, value in state.items():
            assert torch.equal(ours["state"][i][key], value), (i, key)
    # The engine drafts with the published version (checkpoint/drafter), and knows its number.
    assert resumed.engine.drafter_version == learner.version == trainer.engine.drafter_version
    assert states_equal(resumed.engine.drafter, trainer.engine.drafter)

    # Continuing trains further, and (sync mode is deterministic) exactly as the uninterrupted run does.
    rows = resumed.train(steps=6)
    trainer.train(steps=6)
    assert [r["step"] for r in rows] == [5, 6] and learner.steps == 12
    assert [e.step for e in learner.buffer] == [4, 5, 6]
    assert learner.version == saved.version and states_equal(ours_t.drafter, theirs_t.drafter)


# -- exactness while drafters are published from another thread ------------------------------------------------

PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]
N = 3000  # samples per prompt, as tests/test_generate.py (a wrong rejection rule gives p < 1e-60 there)
RUNS = 6  # generate calls (seeds) per test: more decode steps for swaps to land between
CHI_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3, seed=11, ignore_eos=True)


class Publisher(threading.Thread):
    """Publishes drafters to the engine in turn from its own thread every `every_s` seconds, as the async
    learner does through Engine.set_drafter (calls made while a decode step runs wait for it to end)."""

    def __init__(self, engine: Engine, drafters: list, every_s: float = 0.0005):
        super().__init__(daemon=True)
        self.engine, self.drafters, self.every_s = engine, drafters, every_s
        self.stop, self.version = threading.Event(), 0  # version: of the last drafter set_drafter has taken
        self.published = threading.Condition()

    def run(self):
        while not self.stop.is_set():
            version = self.version + 1
            self.engine.set_drafter(self.drafters[version % len(self.drafters)], version=version)
            with self.published:
                self.version = version
                self.published.notify_all()
            self.stop.wait(self.every_s)

    def wait_for_new_drafter(self, timeout: float = 30.0) -> None:
        """Returns once a drafter published after this call is in the engine. Two publications, as one may have
        been set before the last decode step and counted only after it."""
        with self.published:
            seen = self.version
            assert self.published.wait_for(lambda: self.version >= seen + 2, timeout), "the publisher stalled"


@pytest.mark.parametrize("spec", [SpecConfig(mode="static", k=2), SpecConfig(mode="adaptive", k_max=3)],
                         ids=["static", "adaptive"])
def test_sampling_stays_exact_while_drafters_are_published(sharp, spec):
    target, trained, untrained = sharp
    perturbed = copy.deepcopy(trained)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std())
    engine = Engine(target, trained)
    counts = [torch.zeros(V ** 3, dtype=torch.float64) for _ in PROMPTS]
    per_run = N // RUNS
    prompts = [p for p in PROMPTS for _ in range(per_run)]
    traces = []  # per run, the drafter version of each speculative step

    def on_step(stats, trace):
        if stats.k:
            trace.append(stats.drafter_version)
        # Every next step drafts with another drafter (runs have only 2-3 steps: left to chance, a loaded machine
        # could land every swap between runs); the publisher's other calls land while steps run.
        publisher.wait_for_new_drafter()

    publisher = Publisher(engine, [trained, untrained, perturbed])
    publisher.start()
    try:
        for run in range(RUNS):
            trace = []
            # Adaptive: any k in 0..k_max at every step (the tuner would choose plain steps on this tiny target).
            chooser = RandomChooser(run) if spec.mode == "adaptive" else None
            out = engine.generate(prompts, replace(CHI_PARAMS, seed=CHI_PARAMS.seed + run), spec, chooser=chooser,
                                  on_step=lambda s, trace=trace: on_step(s, trace))
            traces.append(trace)
            for i in range(len(PROMPTS)):
                codes = [s.tokens[0] * V * V + s.tokens[1] * V + s.tokens[2]
                         for s in out.sequences[i * per_run:(i + 1) * per_run]]
                counts[i] += torch.bincount(torch.tensor(codes), minlength=V ** 3).double()
    finally:
        publisher.stop.set()
        publisher.join()
    consecutive = [(a, b) for t in traces for a, b in pairwise(t)]
    assert len(consecutive) >= 2 and all(a != b for a, b in consecutive), traces  # a swap between every two steps
    for prompt, c in zip(PROMPTS, counts, strict=True):
        # 1e-4, not test_generate's 1e-3: the swap timing makes this run's samples differ from run to run.
        assert chi2_pvalue(c, exact_joint(target, prompt, CHI_PARAMS)) > 1e-4, "samples do not follow the target"


# -- the thread ------------------------------------------------------------------------------------------------

def test_async_mode_trains_in_its_own_thread_and_close_stops_it(world, tmp_path, monkeypatch):
    threads = failing_loss(monkeypatch, lambda n: False)  # records where the learner's steps run
    trainer = Trainer.start(learner_config(world, learner=dict(mode="async")), tmp_path / "run",
                            reward_fn=digit_share)
    thread = trainer.learner._thread
    try:
        assert thread.name == "respec-learner" and thread.daemon and thread.is_alive()
        assert thread in threading.enumerate()
        rows = trainer.train()
        wait_idle(trainer.learner)
        metrics = trainer.learner.metrics()
        assert [r["step"] for r in rows] == [1, 2, 3] and metrics["learner/alive"] == 1
        assert metrics["learner/steps"] > 0
        assert len(threads) == metrics["learner/steps"] and set(threads) == {"respec-learner"}
        before = trainer.learner.steps
        trainer.learner.grant(3)  # extra steps on the buffer it holds, then idle again
        wait_idle(trainer.learner)
        assert trainer.learner.steps == before + 3
    finally:
        trainer.close()
    assert not thread.is_alive() and thread not in threading.enumerate()
    steps = trainer.learner.steps
    # A closed learner trains no more: its thread, the only one an async learner trains in, has ended (above).
    trainer.learner.submit(trainer.last_features)
    assert trainer.learner.steps == steps and trainer.learner.wait_idle(0)


def test_paused_holds_an_async_learner_between_steps_and_gives_its_budget_back(rollouts):
    _, drafter, steps = rollouts
    cfg = LearnerConfig(mode="async", steps_per_rollout=2, publish_every=1000, batch_size=4)
    learner = Learner(cfg, drafter, publish=lambda d, v: None, seed=0)
    try:
        learner.submit(steps[-1])
        wait_idle(learner)
        assert learner.steps == 2  # the submission's budget, then it waits
        learner.grant(10 ** 6)  # busy for far longer than this test
        with learner.paused():  # entered after the step in flight
            held = learner.steps
            assert not learner.scheduler.in_flight and learner.scheduler.budget == 0
            time.sleep(0.2)
            assert learner.steps == held  # nothing starts while paused
        assert learner.scheduler.budget > 0  # the budget left is given back
        assert learner.grant(3) > 0
        wait_idle(learner)
        assert learner.steps >= held + 3  # it went on: the steps granted (and any that started before)
    finally:
        learner.close()


def test_schedule_update_keeps_the_learner_off_the_engine(world, tmp_path, monkeypatch):
    """learner.schedule=update: no learner step starts while the engine generates; steps run beside updates."""
    starts, real_step = [], Learner._guarded_step

    def step(self):
        starts.append(time.perf_counter())
        return real_step(self)

    monkeypatch.setattr(Learner, "_guarded_step", step)
    trainer = Trainer.start(learner_config(world, trainer=dict(steps=4),
                                           learner=dict(mode="async", schedule="update", steps_per_rollout=1000)),
                            tmp_path / "run", reward_fn=digit_share)
    spans, generate = [], trainer.engine.generate

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            spans.append((t0, time.perf_counter()))

    trainer.engine.generate = timed
    try:
        assert trainer.learner.scheduler.budget == 0  # nothing granted before the first update
        trainer.train()
        assert trainer.learner.scheduler.budget == 0 and trainer.learner.alive  # closed after each update
        assert trainer.learner.wait_idle(30), "the learner did not come to rest"
        assert len(starts) == trainer.learner.steps
    finally:
        trainer.close()
    assert len(spans) == 4 and len(starts) >= 2  # it trained (during steps 2-4's updates)
    inside = [t for t in starts for a, b in spans if a < t < b]
    assert not inside, f"{len(inside)} learner steps started during a rollout"
