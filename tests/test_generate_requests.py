"""Tests of the request API of respec/engine/generate.py (continuous batching): requests queue, join a running
batch between steps and leave it; every step's tensors have shapes fixed by (bucket, k); bad input is one clear
error and the engine keeps serving; a seeded request's tokens do not depend on its batch; and the exactness
checks of test_generate.py (sampled joint, greedy equality with plain decoding and with `transformers`, logprobs,
drafter swaps) hold for requests that joined while others decoded."""

import random
from dataclasses import replace

import pytest
import torch
from test_generate import GREEDY_PROMPTS, PROMPTS, RandomChooser, ScriptedChooser, V, chi2_pvalue, exact_joint
from transformers import AutoModelForCausalLM

import respec.engine.generate
from respec.engine.checkpoint import save_model
from respec.engine.generate import BACKLOG_FLUSH, Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.engine.slots import SPAN_BLOCK
from respec.errors import ConfigError, DuplicateRequestError, PromptError, UnknownRequestError


def serve(engine, requests, arrive, between=None):
    """Runs requests [(id, prompt, params)] through engine.step(), adding request i before step arrive[i];
    `between(step)` runs after every step. Returns the last RequestOutput of each request, by id."""
    order = sorted(range(len(requests)), key=lambda i: arrive[i])
    final, step, nxt = {}, 0, 0
    while nxt < len(order) or engine.has_unfinished_requests():
        while nxt < len(order) and arrive[order[nxt]] <= step:
            engine.add_request(*requests[order[nxt]])
            nxt += 1
        for out in engine.step():
            assert out.request_id not in final
            if out.finished:
                final[out.request_id] = out
        if between is not None:
            between(step)
        step += 1
    return final


def background(n, seed, max_new=40):
    """Returns n requests at T = 1 with various budgets, prompts and parameters: others to share a batch with."""
    rng = random.Random(seed)
    return [(f"bg{seed}-{i}", [rng.randrange(V) for _ in range(rng.randint(1, 9))],
             SamplingParams(temperature=rng.choice([1.0, 0.7, 0]), top_p=rng.choice([1.0, 0.9]),
                            max_new_tokens=rng.randint(2, max_new), seed=None, ignore_eos=True))
            for i in range(n)]


# ---- the API ----


def test_requests_queue_join_and_leave_as_slots_free(target, drafter):
    engine = Engine(target, drafter, spec=SpecConfig(mode="static", k=2), max_running=2)
    assert not engine.has_unfinished_requests() and engine.step() == []
    params = SamplingParams(max_new_tokens=6, seed=1, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", [1 + i, 2], params)
    seen, finished = {}, []
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert 1 <= len(outs) <= 2  # two slots: the others wait
        for out in outs:
            assert out.token_ids[:len(seen.get(out.request_id, []))] == seen.get(out.request_id, [])
            assert len(out.token_ids) == len(out.logprobs) <= 6
            seen[out.request_id] = out.token_ids
            if out.finished:
                assert out.finish_reason == "length" and len(out.token_ids) == 6
                finished.append(out.request_id)
    assert sorted(finished) == [f"r{i}" for i in range(5)] and finished[:2] == ["r0", "r1"]
    assert engine.step() == []


def test_a_request_added_mid_run_joins_at_the_next_step(target, drafter):
    engine = Engine(target, drafter, spec=SpecConfig(mode="static", k=2))
    engine.add_request("long", [1, 2, 3], SamplingParams(max_new_tokens=40, ignore_eos=True))
    for _ in range(3):
        assert [o.request_id for o in engine.step()] == ["long"]
    engine.add_request("late", [4], SamplingParams(max_new_tokens=40, ignore_eos=True))
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == {"long", "late"} and len(outs["late"].token_ids) >= 2  # prefilled and decoded


def test_bad_input_is_one_clear_error_and_the_engine_keeps_serving(target, drafter):
    with pytest.raises(ConfigError, match="max_running"):
        Engine(target, drafter, max_running=0)
    with pytest.raises(ConfigError, match="max_model_len"):
        Engine(target, max_model_len=1000)
    with pytest.raises(ConfigError, match="needs a drafter"):
        Engine(target, spec=SpecConfig(mode="static"))
    engine = Engine(target, drafter, max_model_len=16)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)
    engine.step()
    with pytest.raises(DuplicateRequestError, match="'a' is already in use"):
        engine.add_request("a", [4], params)
    with pytest.raises(PromptError, match="a slot holds 16"):
        engine.add_request("b", [1] * 16, params)
    with pytest.raises(PromptError, match="empty"):
        engine.add_request("b", [], params)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.add_request("b", [V], params)
    with pytest.raises(UnknownRequestError, match="'nope'"):
        engine.abort_request("nope")
    with pytest.raises(ConfigError, match="idle engine"):
        engine.generate([[1]], params)
    engine.add_request("b", [5, 6], params)
    final = serve(engine, [], [])
    # Both ran to their end: a full slot (16 tokens with the prompt) ends "a" and "b" with reason "length".
    assert {k: (len(v.token_ids), v.finish_reason) for k, v in final.items()} == {"a": (13, "length"),
                                                                                 "b": (14, "length")}
    alone = Engine(target).generate([[5, 6]], replace(params, max_new_tokens=14)).sequences[0].tokens
    assert final["b"].token_ids == alone
    engine.add_request("a", [1], params)  # a finished request's id is free again
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()


def test_aborting_frees_the_slot_and_leaves_the_others_untouched(target, drafter):
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    ref = Engine(target).generate(GREEDY_PROMPTS, params).sequences
    engine = Engine(target, drafter, spec=SpecConfig(mode="static", k=3), max_running=3)
    for i, p in enumerate(GREEDY_PROMPTS):
        engine.add_request(i, p, params)
    engine.add_request("x", [1, 1], params)
    engine.step()
    engine.abort_request(1)  # running
    engine.abort_request("x")  # waiting
    final = serve(engine, [], [])
    assert set(final) == {0, 2, 3} and all(final[i].token_ids == ref[i].tokens for i in final)


def test_every_decode_step_has_shapes_fixed_by_bucket_and_k(target, drafter):
    """With 8 slots, the target's decode forwards run at the bucket of the live batch (8, then 4, 2, 1 as
    requests finish) over k + 1 tokens, and attend over a whole number of span blocks; the live rows are moved
    into the lowest slots as others finish, so every step reads the caches through views."""
    shapes, contiguous = [], []

    def record(module, args, kwargs):
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        if not cache.is_empty():
            shapes.append((*args[0].shape, cache.span))
            contiguous.append(cache.contiguous)

    engine = Engine(target, drafter, spec=SpecConfig(mode="static", k=3), max_running=8)
    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        budgets = [3, 3, 3, 5, 5, 9, 17, 30]
        serve(engine, [(i, [1, 2], SamplingParams(max_new_tokens=n, ignore_eos=True)) for i, n in enumerate(budgets)],
              [0] * 8)
    finally:
        hook.remove()
    assert {(b, t) for b, t, _ in shapes} <= {(8, 4), (4, 4), (2, 4), (1, 4)} and (1, 4) in {s[:2] for s in shapes}
    assert all(span % SPAN_BLOCK == 0 for *_, span in shapes)
    assert [b for b, _, _ in shapes] == sorted((b for b, _, _ in shapes), reverse=True)
    assert all(contiguous)


@pytest.mark.parametrize("spec", [SpecConfig(mode="off"), SpecConfig(mode="static", k=3),
                                  SpecConfig(mode="adaptive", k_max=4)], ids=["plain", "static", "adaptive"])
def test_a_step_reads_the_device_once(target, drafter, spec, monkeypatch):
    """Every step, with admissions, finishing requests, plain steps that flush the drafter's backlog and drafter
    swaps, reads tensors back to the host exactly once."""
    engine = Engine(target, drafter, spec=spec, max_running=4)
    engine.tuner = ScriptedChooser([3, 0, 2] + [0] * (BACKLOG_FLUSH + 4) + [4, 1, 0, 2])
    flushes = []
    monkeypatch.setattr(respec.engine.generate, "catch_up", lambda *a, _real=respec.engine.generate.catch_up:
                        (flushes.append(a[3]), _real(*a))[1])
    reads, per_step = [], []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **kw:
                            (reads.append(_name), _real(self, *a, **kw))[1])
    step = engine.step

    def counted_step():
        before = len(reads)
        out = step()
        per_step.append(len(reads) - before)
        return out

    engine.step = counted_step

    def between(i):
        if i == 6:
            engine.set_drafter(drafter, version=1)

    serve(engine, background(10, seed=5, max_new=60), list(range(10)), between)
    monkeypatch.undo()
    assert len(per_step) > 20 and set(per_step) == {1}, per_step
    if spec.mode == "adaptive":
        assert BACKLOG_FLUSH in flushes  # a plain step flushed the backlog


# ---- per-request randomness ----


def seeded_requests(n=12):
    rng = random.Random(7)
    return [(f"s{i}", [rng.randrange(V) for _ in range(rng.randint(1, 6))],
             SamplingParams(temperature=rng.choice([1.0, 0.8]), top_p=rng.choice([1.0, 0.9]), max_new_tokens=30,
                            seed=100 + i, ignore_eos=True)) for i in range(n)]


def token_identical_share(target, drafter, spec) -> tuple[float, float]:
    """Returns (share of seeded requests whose tokens are identical, share of identical tokens) between each
    seeded request run alone and the same requests mixed with others arriving at other steps, in other slots."""
    seeded = seeded_requests()
    alone = {}
    for req in seeded:
        alone.update(serve(Engine(target, drafter, spec=spec), [req], [0]))
    mixed_engine = Engine(target, drafter, spec=spec, max_running=6)
    others = background(30, seed=3)
    arrive = [0, 0, 1, 3, 3, 5, 8, 8, 13, 21, 34, 40] + [random.Random(i).randrange(45) for i in range(30)]
    mixed = serve(mixed_engine, seeded + others, arrive)
    same_seq = sum(mixed[r[0]].token_ids == alone[r[0]].token_ids for r in seeded) / len(seeded)
    same_tok = sum(a == b for r in seeded for a, b in zip(mixed[r[0]].token_ids, alone[r[0]].token_ids, strict=True))
    return same_seq, same_tok / sum(len(alone[r[0]].token_ids) for r in seeded)


@pytest.mark.parametrize("spec", [SpecConfig(mode="off"), SpecConfig(mode="static", k=3)], ids=["plain", "static"])
def test_a_seeded_request_gets_the_same_tokens_alone_and_in_a_changing_batch(target, drafter, spec):
    """Each request draws from its own stream, keyed by its seed and position; only floating-point differences
    between batch shapes could flip a token (none measured here)."""
    same_seq, same_tok = token_identical_share(target, drafter, spec)
    assert same_tok >= 0.99 and same_seq >= 0.9, (same_seq, same_tok)


def test_generate_row_i_draws_stream_i_of_the_seed(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, ignore_eos=True)
    spec = SpecConfig(mode="static", k=2)
    first = Engine(target, drafter).generate([[3, 1, 4], [1, 5]], params, spec).sequences[0].tokens
    assert serve(Engine(target, drafter, spec=spec), [("a", [3, 1, 4], params)], [0])["a"].token_ids == first


# ---- exactness for requests that join a running batch ----


def chi_requests(n, params):
    """Returns n requests per prompt of PROMPTS, each with its own seed, under per-prompt parameters."""
    return [(f"{j}-{i}", PROMPTS[j], replace(params[j], seed=10 ** 6 + 1000 * j + i)) for i in range(n) for j in range(2)]


CHI_PARAMS = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=3, max_new_tokens=3, ignore_eos=True)]
N = 3000


@pytest.mark.parametrize("mode", ["static", "adaptive", "swaps"])
def test_requests_joining_a_running_batch_sample_the_target_distribution(target, drafter, drafter2, mode):
    """3000 requests per prompt arrive in waves of 100 while long requests decode beside them (k = 2; any k in
    0..4 every step; or drafters swapped after every step); the joint of their first three tokens is the
    target's (each prompt under its own parameters, in one batch)."""
    spec = SpecConfig(mode="adaptive", k_max=4) if mode == "adaptive" else SpecConfig(mode="static", k=2)
    engine = Engine(target, drafter, spec=spec, max_running=160)
    if mode == "adaptive":
        engine.tuner = RandomChooser(0)
    tests = chi_requests(N, CHI_PARAMS)
    others = background(40, seed=1, max_new=60)
    arrive = [i // 100 for i in range(len(tests))] + [3 * i for i in range(len(others))]

    def swap(step):
        if mode == "swaps":
            engine.set_drafter([drafter, drafter2][step % 2], version=step % 2)

    final = serve(engine, tests + others, arrive, swap)
    for j, prompt in enumerate(PROMPTS):
        codes = [final[r[0]].token_ids for r in tests if r[1] is prompt]
        codes = torch.tensor([t[0] * V * V + t[1] * V + t[2] for t in codes])
        counts = torch.bincount(codes, minlength=V ** 3).double()
        assert chi2_pvalue(counts, exact_joint(target, prompt, CHI_PARAMS[j])) > 1e-3


@pytest.mark.parametrize("mode", ["static", "adaptive", "swaps"])
def test_greedy_requests_joining_a_running_batch_equal_greedy_plain_and_transformers(target, drafter, drafter2,
                                                                                    tmp_path, mode):
    params = SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True)
    plain = Engine(target).generate(GREEDY_PROMPTS, params).sequences
    spec = SpecConfig(mode="adaptive", k_max=5) if mode == "adaptive" else SpecConfig(mode="static", k=3)
    engine = Engine(target, drafter, spec=spec, max_running=5)
    if mode == "adaptive":
        engine.tuner = RandomChooser(1)

    def swap(step):
        if mode == "swaps" and step % 3 == 2:
            engine.set_drafter([drafter, drafter2][step // 3 % 2], version=step)

    reqs = [(i, p, params) for i, p in enumerate(GREEDY_PROMPTS)]
    final = serve(engine, reqs + background(12, seed=2), [2, 5, 5, 9] + list(range(12)), swap)
    save_model(target, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for i, prompt in enumerate(GREEDY_PROMPTS):
        assert final[i].token_ids == plain[i].tokens
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=25, min_new_tokens=25, do_sample=False)
        assert final[i].token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", ["off", "static", "adaptive"])
def test_logprobs_of_joined_requests_equal_a_fresh_forward(target, drafter, mode):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=20, seed=3, ignore_eos=True)
    engine = Engine(target, drafter, spec=SpecConfig(mode=mode, k=3, k_max=4), max_running=4)
    if mode == "adaptive":
        engine.tuner = RandomChooser(0)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [2], [5, 4, 3]]
    final = serve(engine, [(i, p, replace(params, seed=i)) for i, p in enumerate(prompts)] + background(8, seed=4),
                  [1, 4, 6] + list(range(8)))
    for i, prompt in enumerate(prompts):
        seq = final[i]
        with torch.no_grad():
            logits = target.logits(torch.tensor([prompt + seq.token_ids]))[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(seq.token_ids)[:, None]).squeeze(-1)
        assert (ref - torch.tensor(seq.logprobs)).abs().max() <= 1e-4
