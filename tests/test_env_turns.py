"""Tests of environment turns in respec/engine/generate.py (`Engine.generate(env=...)`): observations land where
the environment put them, the generated mask marks them, seeded rows do not depend on their batch-mates, "length"
never calls the environment, and plain and speculative decoding agree."""

import pytest

from respec.engine.drafter import init_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams

STOP = 3
PROMPTS = [[1, 2, 4], [5, 6], [7, 1, 2, 5, 6], [4]]


class Env:
    """Answers a row's first `turns(row)` stops with [6, 7, row % 8] and records every call."""

    def __init__(self, turns=lambda row: 1 + row % 3):
        self.turns, self.calls = turns, []

    def __call__(self, row, tokens):
        self.calls.append((row, list(tokens)))
        done = sum(r == row for r, _ in self.calls) - 1
        return [6, 7, row % 8] if done < self.turns(row) else None


@pytest.fixture(scope="module")
def target(sharp_target):
    return sharp_target(8, max_positions=128)


def _params(**kw):
    return SamplingParams(**{"temperature": 1.0, "max_new_tokens": 40, "stop_token_ids": (STOP,), "seed": 5, **kw})


def test_observations_sit_where_the_env_put_them(target):
    env = Env()
    out = Engine(target).generate(PROMPTS, _params(), SpecConfig(mode="off"), env=env)
    for row, seq in enumerate(out.sequences):
        assert len(seq.tokens) == len(seq.logprobs) == len(seq.generated) <= 40
        calls = [t for r, t in env.calls if r == row]
        for n, seen in enumerate(calls):
            assert seq.tokens[:len(seen)] == seen and seen[-1] == STOP  # env sees every token so far, after a stop
            if n < len(calls) - 1 or len(seq.tokens) > len(seen):
                obs = seq.tokens[len(seen):len(seen) + 3]
                assert obs == [6, 7, row % 8][:len(obs)]
                assert seq.generated[len(seen):len(seen) + len(obs)] == [False] * len(obs)
                assert seq.logprobs[len(seen):len(seen) + len(obs)] == [0.0] * len(obs)
        observed = sum(not g for g in seq.generated)
        assert observed == 3 * (len(calls) - (seq.finish_reason == "stop")) or seq.finish_reason == "length"
        assert all(lp < 0 or lp == 0 for lp in seq.logprobs)
    assert any(not all(s.generated) for s in out.sequences)


def test_length_finishes_never_call_the_env(target):
    env = Env(turns=lambda row: 100)
    out = Engine(target).generate(PROMPTS, _params(max_new_tokens=12), SpecConfig(mode="off"), env=env)
    assert all(t[-1] == STOP for _, t in env.calls)
    for row, seq in enumerate(out.sequences):
        assert len(seq.tokens) <= 12
        if seq.finish_reason == "length":
            assert all(len(t) < len(seq.tokens) for r, t in env.calls if r == row)


def test_a_seeded_row_is_the_same_alone_and_in_a_batch(target):
    eng = Engine(target)
    batch = eng.generate(PROMPTS, _params(), SpecConfig(mode="off"), env=Env())
    for i in (1, 3):
        alone = eng.generate([PROMPTS[i]], _params(), SpecConfig(mode="off"), first_stream=i, env=Env())
        assert alone.sequences[0].tokens == batch.sequences[i].tokens
        assert alone.sequences[0].generated == batch.sequences[i].generated


def test_no_env_marks_every_token_generated(target):
    out = Engine(target).generate(PROMPTS, _params(), SpecConfig(mode="off"))
    assert all(s.generated == [True] * len(s.tokens) for s in out.sequences)


def test_plain_and_speculative_agree_greedily(target):
    drafter = init_drafter(target, seed=1)
    greedy = _params(temperature=0.0)
    plain = Engine(target).generate(PROMPTS, greedy, SpecConfig(mode="off"), env=Env())
    spec = Engine(target, drafter).generate(PROMPTS, greedy, SpecConfig(mode="static", k=3), env=Env())
    assert [s.tokens for s in plain.sequences] == [s.tokens for s in spec.sequences]
    assert [s.generated for s in plain.sequences] == [s.generated for s in spec.sequences]
    assert any(not all(s.generated) for s in plain.sequences)


def test_drafter_distillation_skips_observation_tokens():
    import torch

    from respec.engine.outputs import SequenceOutput
    from respec.world.distill import drop_observations

    mask = torch.ones(2, 8, dtype=torch.bool)
    outputs = [SequenceOutput([1, 2, 3, 4], [0.0] * 4, "stop", [True, False, False, True]),
               SequenceOutput([5, 6], [0.0] * 2, "stop")]
    drop_observations(mask, [3, 2], outputs)
    assert mask.tolist() == [[True, True, True, False, False, True, True, True], [True] * 8]


def _cacheless_greedy(target, prompt, env, row, budget):
    """Greedy decoding with environment turns by full forwards over the whole context (no cache): the reference."""
    import torch

    tokens, logprobs = [], []
    while len(tokens) < budget:
        hidden, _ = target(torch.tensor([prompt + tokens]))
        logp = torch.log_softmax(target.lm_head(hidden[0, -1]).float(), -1)
        token = int(logp.argmax())
        tokens.append(token)
        logprobs.append(float(logp[token]))
        if token != STOP:
            continue
        obs = env(row, list(tokens))
        if not obs:
            break
        obs = obs[:budget - len(tokens)]
        tokens += obs
        logprobs += [0.0] * len(obs)
    return tokens, logprobs


@pytest.fixture
def prefills(monkeypatch):
    """Records every row of every slot prefill as (the cached entries it starts from, its prompt's length, the
    drafter entries it starts from)."""
    from respec.engine.slots import SlotTable

    seen = []
    prefill = SlotTable.prefill

    def recording(self, target, slots, prompts, params, keys, stops, aux_layers, starts=None, dstarts=None):
        zeros = [0] * len(prompts)
        seen.extend(zip(starts or zeros, map(len, prompts), dstarts or zeros, strict=True))
        return prefill(self, target, slots, prompts, params, keys, stops, aux_layers, starts, dstarts)

    monkeypatch.setattr(SlotTable, "prefill", recording)
    return seen


@pytest.mark.parametrize("spec", [SpecConfig(mode="off"), SpecConfig(mode="static", k=3)], ids=["plain", "k3"])
def test_a_continuation_runs_only_its_new_tokens_in_its_old_slot(target, spec, prefills):
    """Every continuation goes back into the slot that holds its context and prefills only the stop token and the
    observation (and its drafter re-reads only what it had not consumed); the tokens and logprobs equal full
    forwards over the whole context."""
    import torch

    drafter = init_drafter(target, seed=1) if spec.mode != "off" else None
    params = _params(temperature=0.0)
    with torch.no_grad():
        out = Engine(target, drafter).generate(PROMPTS, params, spec, env=Env())
        for row, seq in enumerate(out.sequences):
            tokens, logprobs = _cacheless_greedy(target, PROMPTS[row], Env(), row, params.max_new_tokens)
            assert seq.tokens == tokens
            assert max(abs(a - b) for a, b in zip(seq.logprobs, logprobs, strict=True)) <= 1e-4
    again = [(start, n, dstart) for start, n, dstart in prefills if start]
    assert len(again) == sum(len(s.tokens) - sum(s.generated) for s in out.sequences) // 3 > 0  # one per turn
    assert all(n - start == 4 for start, n, _ in again)  # the stop token and a 3-token observation
    if drafter is not None:  # its entries before the last step's pairs stay
        assert all(0 < dstart <= start for start, _, dstart in again)


def test_a_continuation_whose_slot_was_taken_prefills_its_whole_context(target, prefills):
    """Two slots for four rows: a freed slot goes to a waiting row first, so a continuation lands elsewhere and
    runs its whole context; the tokens still equal full forwards over it."""
    import torch

    params = _params(temperature=0.0)
    with torch.no_grad():
        out = Engine(target, max_running=2).generate(PROMPTS, params, SpecConfig(mode="off"), env=Env())
        for row, seq in enumerate(out.sequences):
            assert seq.tokens == _cacheless_greedy(target, PROMPTS[row], Env(), row, params.max_new_tokens)[0]
    turns = sum(len(s.tokens) - sum(s.generated) for s in out.sequences) // 3
    starts = [start for start, *_ in prefills]
    assert len(starts) == len(PROMPTS) + turns and 0 < starts.count(0) - len(PROMPTS) < turns  # some of each


def test_a_continuations_drafter_drafts_as_after_rereading_its_whole_history(target, monkeypatch):
    """The drafter entries a continuation keeps are the ones a drafter that re-reads the whole history computes:
    every drafting forward of a greedy rollout gives the same logits either way."""
    import torch

    import respec.engine.generate as gen
    from respec.engine.slots import SlotTable

    drafter = init_drafter(target, seed=1)
    params = _params(temperature=0.0)
    spec = SpecConfig(mode="static", k=3)
    outputs, prefilling = [], [False]
    drafter_prefill = gen.drafter_prefill

    def flagged(*args):
        prefilling[0] = True
        try:
            return drafter_prefill(*args)
        finally:
            prefilling[0] = False

    monkeypatch.setattr(gen, "drafter_prefill", flagged)
    hook = drafter.register_forward_hook(lambda m, a, out: None if prefilling[0] else outputs.append(out[1]))

    def run():
        outputs.clear()
        with torch.no_grad():
            seqs = Engine(target, drafter).generate(PROMPTS, params, spec, env=Env()).sequences
        return [s.tokens for s in seqs], list(outputs)

    kept = run()
    prefill = SlotTable.prefill
    monkeypatch.setattr(SlotTable, "prefill", lambda self, *args: prefill(self, *args[:8]))  # no drafter starts
    whole = run()
    hook.remove()
    assert kept[0] == whole[0] and len(kept[1]) == len(whole[1]) > 0
    for a, b in zip(kept[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
