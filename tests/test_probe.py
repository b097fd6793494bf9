"""Tests of respec/world/tasks/probe.py and its environment in token ids (respec/world/env.py): the scorer accepts
the environment's transcripts, rejects faked observations and never raises; transcripts encode turn by turn;
pretraining and rollout batches never train on observation tokens."""

import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from respec.engine.outputs import GenerationResult, SequenceOutput
from respec.rl.grpo import policy_loss
from respec.rl.rollout import Rollout
from respec.world.env import TaskEnv, encode_transcript, is_env_task
from respec.world.pretrain import collate, encode_examples
from respec.world.tasks import get_task, task_budget
from respec.world.tasks.probe import BELOW, CALL, CALLS, REACHED, SEPARATORS, ProbeTask, write_transcript
from respec.world.tokenizer import load_tokenizer

TASK = ProbeTask()
PROBLEMS = TASK.problems(40, seed=3)


def _played(problem, nonce):
    """Returns the worked transcript played against the environment turn by turn (env_step answers each call)."""
    text, bar, draws = CALL, problem.meta["bar"], []
    while True:
        obs = TASK.env_step(problem, text, nonce)
        assert obs is not None
        text += obs
        draws.append(int(obs.split()[-1].split("/")[0]))
        if draws[-1] >= bar:
            text += f"{draws[-1]}>={bar}\nAnswer: {draws[-1]}"
            assert TASK.env_step(problem, text, nonce) is None  # no call: the row ends
            return text
        text += f"{draws[-1]}<{bar} {CALL}"


def test_the_environment_transcripts_score_one():
    assert is_env_task(TASK) and not is_env_task(get_task("redraw")) and task_budget("probe") == 512
    for i, p in enumerate(PROBLEMS):
        nonce = TASK.nonce(7, i)
        text = _played(p, nonce)
        assert text == write_transcript(p.meta["bar"], nonce, TASK.draws(p, nonce))
        assert TASK.score(p, text).reward == 1.0, TASK.score(p, text)
        assert "".join(t for t, _ in TASK.segments(text)) == text


def test_sft_styles():
    rng = random.Random(0)
    for p in PROBLEMS[:10]:
        for style in TASK.styles:
            text, ok = TASK.sft_completion(p, rng, style)
            assert ok == (style == "worked") == (TASK.score(p, text).reward >= 0.5)
            assert TASK.style_of(p, text) == style


def test_the_reward_counts_the_house_notation():
    p = next(q for q in PROBLEMS if len(TASK.draws(q, 77)) >= 3)
    bar, draws = p.meta["bar"], TASK.draws(p, 77)
    house = write_transcript(bar, 77, draws)
    assert TASK.score(p, house).reward == 1.0
    choices = 1 + 4 * (len(draws) - 1) + 2  # the first call; per call line word, mark, spacing, separator; stop line
    # the first call line spaced, `lt`, a '|' before `roll`: four of its choices not the house way
    other = house.replace(f"{draws[0]}<{bar} draw", f"{draws[0]} lt {bar}|roll", 1)
    assert other != house and TASK.score(p, other).reward == pytest.approx(0.5 + 0.5 * (choices - 4) / choices)
    for word in CALLS[1:]:  # the first call's word
        assert TASK.score(p, word + house[len(CALL):]).reward == pytest.approx(0.5 + 0.5 * (choices - 1) / choices)
    for mark in REACHED:
        for spaced in (mark, f" {mark} "):
            stop = house.replace(f"{draws[-1]}>={bar}", f"{draws[-1]}{spaced}{bar}")
            wrong = (mark != REACHED[0]) + (spaced != mark)
            assert TASK.score(p, stop).reward == pytest.approx(0.5 + 0.5 * (choices - wrong) / choices)
    for mark in BELOW[1:]:
        assert TASK.score(p, house.replace(f"{draws[0]}<", f"{draws[0]}{mark}", 1)).reward < 1.0
    # a relation spaced on one side only, another separator, a mark of the other relation: not the protocol
    assert TASK.score(p, house.replace(f"{draws[0]}<{bar}", f"{draws[0]} <{bar}", 1)).reward == 0.0
    assert TASK.score(p, house.replace(f"{bar} draw", f"{bar}/draw", 1)).reward == 0.0
    assert TASK.score(p, house.replace(f"{draws[0]}<{bar}", f"{draws[0]}ge{bar}", 1)).reward == 0.0
    assert TASK.score(p, house.replace(f"{draws[-1]}>={bar}", f"{draws[-1]}lt{bar}")).reward == 0.0
    plain = ProbeTask(notation=False)
    assert plain.score(p, other).reward == 1.0
    # pretraining transcripts draw every choice: all forms appear, and the house ones about as often as uniform
    # choices make them (a quarter of the words, marks and separators, half of the spacings)
    rng = random.Random(1)
    texts = [TASK.sft_completion(q, rng, "worked")[0] for q in PROBLEMS for _ in range(5)]
    assert all(any(f"{sep}{word}" in t for t in texts) for sep in SEPARATORS for word in CALLS)
    assert all(any(mark in t for t in texts) for mark in BELOW + REACHED)
    shares = [2 * TASK.score(q, t).reward - 1 for q, t in zip([q for q in PROBLEMS for _ in range(5)], texts,
                                                               strict=True)]
    assert 0.2 < sum(shares) / len(shares) < 0.45
    for q in PROBLEMS[:10]:  # without notation, pretraining transcripts are written the house way
        text = plain.sft_completion(q, rng, "worked")[0]
        assert plain.score(q, text).reward == 1.0 and TASK.score(q, text).reward == 1.0


def test_every_call_word_asks_the_environment():
    p = PROBLEMS[0]
    for word in CALLS:
        assert TASK.env_step(p, word, 5) == TASK.env_step(p, CALL, 5) is not None
        assert TASK.env_step(p, f"{CALL}\n#0005 41/{p.meta['bar']}\n41 below {p.meta['bar']};{word}", 5) is not None
    assert TASK.env_step(p, "drawn", 5) is None and TASK.env_step(p, "Answer: 41", 5) is None


def test_faked_observations_score_zero():
    p = next(q for q in PROBLEMS if len(TASK.draws(q, 1234)) >= 2)
    text = _played(p, 1234)
    assert TASK.score(p, text).reward == 1.0
    draws = TASK.draws(p, 1234)
    wrong = (draws[1] - 10 + 1) % 90 + 10
    bar = p.meta["bar"]
    faked = text.replace(f"\n{draws[1]}/{bar}\n", f"\n{wrong}/{bar}\n", 1).replace(f"{draws[1]}<", f"{wrong}<", 1)
    assert faked != text and TASK.score(p, faked).reward == 0.0
    # an observation that names another bar
    other_bar = text.replace(f"\n{draws[1]}/{bar}\n", f"\n{draws[1]}/{bar - 1}\n", 1)
    assert other_bar != text and TASK.score(p, other_bar).reward == 0.0
    # a made-up nonce: the draws that follow are not its hashes
    other = write_transcript(p.meta["bar"], 1234, draws).replace("#1234", "#4321")
    assert TASK.score(p, other).reward == 0.0
    # every call answered, then a fake observation written by the policy in its own turn
    assert TASK.score(p, text + "\n55\n").reward == 0.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("drawolpicknextbeunhsg<>=#/;|&\nAnswer: 0123456789")), max_size=80),
       st.integers(0, len(PROBLEMS) - 1))
def test_the_scorer_and_env_never_raise(text, i):
    score = TASK.score(PROBLEMS[i], text)
    assert 0.0 <= score.reward <= 1.0
    obs = TASK.env_step(PROBLEMS[i], text, 42)
    assert obs is None or obs.endswith("\n")


@pytest.fixture(scope="module")
def tok(tiny_world):
    return load_tokenizer(tiny_world[0])


def test_transcripts_encode_turn_by_turn(tok):
    p = PROBLEMS[0]
    text = _played(p, 99)
    ids, generated = encode_transcript(tok, TASK, text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    eos = [j for j, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos) == len(TASK.draws(p, 99)) + 1 and ids[-1] == tok.eos_token_id  # one per policy turn
    assert all(generated[j] for j in eos)
    observed = tok.decode([t for t, g in zip(ids, generated, strict=True) if not g])
    assert observed == "".join(t for t, o in TASK.segments(text) if o)


def test_the_token_env_answers_calls_only(tok):
    env = TaskEnv(TASK, PROBLEMS, tok, seed=5)
    call = tok.encode(CALL, add_special_tokens=False) + [tok.eos_token_id]
    obs = env(2, call)
    assert tok.decode(obs) == TASK.env_step(PROBLEMS[2], CALL, TASK.nonce(5, 2))
    assert env(2, tok.encode("41>=30\nAnswer: 1", add_special_tokens=False) + [tok.eos_token_id]) is None


def test_pretraining_never_trains_on_observations(tok):
    examples = encode_examples(tok, TASK, PROBLEMS[:8], random.Random(0))
    inputs, targets = collate(examples, pad_id=tok.pad_token_id)
    for b, (ids, start, observed) in enumerate(examples):
        assert all(targets[b, j - 1] == -100 for j in observed)
        trained = [j for j in range(start, len(ids)) if j not in set(observed)]
        assert all(targets[b, j - 1] == ids[j] for j in trained)
    assert any(observed for _, _, observed in examples)


def _env_batch():
    """Returns a TrainBatch of two rows whose completions hold observation tokens."""
    prompts = [[0, 5, 6], [0, 7]]
    seqs = [SequenceOutput([10, 11, 1, 20, 21, 12, 1], [-0.5, -0.4, -0.3, 0.0, 0.0, -0.2, -0.1], "stop",
                           [True, True, True, False, False, True, True]),
            SequenceOutput([13, 1], [-0.6, -0.7], "stop")]
    return Rollout._batch(SimpleNamespace(device=torch.device("cpu")), prompts, GenerationResult(seqs),
                          torch.tensor([1.0, -1.0]))


def test_train_batch_masks_observation_tokens():
    batch = _env_batch()
    assert batch.mask.tolist() == [[True, True, True, False, False, True, True],
                                   [True, True, False, False, False, False, False]]
    assert batch.tokens[0].tolist() == [10, 11, 1, 20, 21, 12, 1]
    loss_mask = batch.loss_mask()  # position t predicts token t + 1
    assert loss_mask[0].tolist() == [False, False, True, True, True, False, False, True, True, False]
    assert loss_mask[1].tolist()[:4] == [False, True, True, False]
    sub = batch.rows(torch.tensor([1, 0]))
    assert sub.tokens.shape[1] == 7 and sub.mask[1].tolist() == batch.mask[0].tolist()
    sub = batch.rows(torch.tensor([1]))
    assert sub.tokens.shape[1] == 2 and sub.input_ids.shape[1] == 4


def test_the_policy_loss_ignores_observation_tokens():
    batch = _env_batch()
    logp = batch.old_logp + 0.1
    loss, _ = policy_loss(logp, batch.old_logp, batch.advantages, batch.mask)
    noisy = logp.masked_fill(~batch.mask, float("nan"))
    loss2, _ = policy_loss(noisy, batch.old_logp.masked_fill(~batch.mask, 5.0), batch.advantages, batch.mask)
    assert torch.equal(loss, loss2)


def test_task_env_answers_the_probe_rows(tiny_world):
    from respec.world.env import task_env

    env = task_env(tiny_world[0], "probe", 4, 1, 0)
    assert env.problems == get_task("probe").problems(4, 1) and env.seed == 0
    assert task_env(tiny_world[0], "probe", 2, 1, 0, samples=3).problems == [p for p in env.problems[:2]
                                                                             for _ in range(3)]
    assert task_env(tiny_world[0], "arithmetic", 4, 1, 0) is None


class ToolEngine:
    """Stands in for the engine: every row calls the tool once per draw as a worked policy would, the environment
    it is given answering each call, and stops at the first draw that reaches the bar."""

    def __init__(self, tok, bars):
        self.tok, self.bars = tok, bars

    def generate(self, prompts, params, spec, env=None):
        seqs = []
        for row in range(len(prompts)):
            tokens, generated = [], []

            def say(text, row=row, tokens=tokens, generated=generated):
                ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
                tokens.extend(ids)
                generated.extend([True] * len(ids))
                obs = env(row, list(tokens))
                if obs:
                    tokens.extend(obs)
                    generated.extend([False] * len(obs))
                return obs

            bar, draws, text = self.bars[row], [], CALL
            while True:
                obs = say(text)
                if obs is None:
                    break
                draws.append(int(self.tok.decode(obs).split()[-1].split("/")[0]))
                text = f"{draws[-1]}<{bar} {CALL}" if draws[-1] < bar else f"{draws[-1]}>={bar}\nAnswer: {draws[-1]}"
            seqs.append(SequenceOutput(tokens, [0.0 if not g else -0.1 for g in generated], "stop", generated))
        return GenerationResult(seqs)


def test_a_rollout_passes_its_rows_environment(tok):
    from respec.rl.config import AlgorithmConfig, DataConfig, RolloutConfig, TrainConfig

    config = TrainConfig(rollout=RolloutConfig(group_size=2, spec="off", max_new_tokens=448),
                         data=DataConfig(task="probe", prompts_per_step=2), algorithm=AlgorithmConfig(ppo_mini_batch_size=1))
    problems = PROBLEMS[:2]
    bars = [p.meta["bar"] for p in problems for _ in range(2)]
    rollout = Rollout(config, ToolEngine(tok, bars), tok, lambda p, t: TASK.score(p, t).reward, torch.device("cpu"),
                      task=TASK)
    out = rollout.run(problems, seed=11, step=1)
    assert out.rewards.tolist() == [1.0] * 4  # every row's observations are its own environment's
    seqs = out.result.sequences
    assert out.batch.mask.sum(1).tolist() == [sum(s.generated) for s in seqs]
    assert any(not all(s.generated) for s in seqs)
