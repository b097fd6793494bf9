"""Tests of respec/engine/compile.py and the engine's compiled path: compiled decode steps sample exactly the
target's distribution, give the eager path's greedy tokens (with requests joining a running batch and drafter
swaps), logprobs and transformers' tokens; `compile="auto"` runs each cell the way its profile says; bad modes
are one clear error.

Most tests compile with the "eager" backend: it runs what the engine's compiled path adds (dynamo's capture and
guards over the shared layer functions, every shape class of a step, the cache written outside the graph) without
AOT tracing and C++ code generation, which cost seconds to tens of seconds per graph on a small CPU. Inductor's
own code (functionalised, generated C++) is checked against eager and transformers by the `inductor` tests."""

from dataclasses import replace

import pytest
import torch
from test_generate import (
    CHI_PARAMS,
    GREEDY_PROMPTS,
    N,
    ScriptedChooser,
    assert_follows_target,
    first3_counts,
    tokens,
)
from transformers import AutoModelForCausalLM

import respec.engine.compile
import respec.engine.tuner
from respec.engine.checkpoint import save_model
from respec.engine.generate import Engine, SpecConfig
from respec.engine.sampling import SamplingParams
from respec.engine.tuner import CostModel, TunerConfig, load_or_profile
from respec.errors import ConfigError

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)

needs_compiler = pytest.mark.skipif(respec.engine.compile.compile_unavailable(torch.device("cpu")) is not None,
                                    reason="torch.compile cannot run on this machine")


@pytest.fixture(scope="module")
def target(sharp_target):
    """Two layers: a compiled graph holds the whole layer stack, and tracing costs time per layer."""
    return sharp_target(8, max_positions=128, layers=2)


@pytest.fixture(autouse=True)
def dynamo_only(monkeypatch, request):
    if "inductor" not in request.node.name:
        monkeypatch.setenv("RESPEC_COMPILE_BACKEND", "eager")


class CountCompiled:
    """Counts forwards (the target's layer stack, the drafter's layer) that go through a compiled graph."""

    def __init__(self, monkeypatch):
        self.calls = 0
        run_layer, run_stack = respec.engine.compile.run_layer, respec.engine.compile.run_stack

        def counting_layer(layer, args, compiled):
            self.calls += compiled
            return run_layer(layer, args, compiled)

        def counting_stack(*args):
            self.calls += args[-1]
            return run_stack(*args)

        monkeypatch.setattr(respec.engine.drafter, "run_layer", counting_layer)
        monkeypatch.setattr(respec.engine.model, "run_stack", counting_stack)


def test_compiled_speculative_sampling_matches_the_target(target, drafter, monkeypatch):
    counter = CountCompiled(monkeypatch)
    engine = Engine(target, drafter, compile="on")
    assert_follows_target(target, first3_counts(engine, CHI_PARAMS, SpecConfig(mode="static", k=2), N), CHI_PARAMS)
    assert counter.calls > 0  # (plain compiled steps: the greedy equalities below and the inductor test)


@pytest.mark.parametrize("spec", [SpecConfig(mode="off"), SpecConfig(mode="static", k=3)], ids=["plain", "k3"])
def test_compiled_greedy_equals_eager_for_requests_joining_a_running_batch(target, drafter, spec):
    """Requests added while others decode (at different steps) get the eager engine's tokens and logprobs."""

    def serve(engine):
        out, pending, step = {}, list(enumerate(GREEDY_PROMPTS)), 0
        while pending or engine.has_unfinished_requests():
            if pending and step % 3 == 0:
                i, p = pending.pop(0)
                engine.add_request(i, p, GREEDY)
            for o in engine.step():
                out[o.request_id] = o
            step += 1
        return out

    eager = serve(Engine(target, drafter, spec=spec, max_running=4))
    compiled = serve(Engine(target, drafter, spec=spec, max_running=4, compile="on"))
    assert {i: o.token_ids for i, o in compiled.items()} == {i: o.token_ids for i, o in eager.items()}
    for i, o in compiled.items():
        assert max(abs(a - b) for a, b in zip(o.logprobs, eager[i].logprobs, strict=True)) <= 1e-4


def test_compiled_greedy_with_drafter_swaps_equals_plain(target, drafter, drafter2):
    plain = Engine(target).generate(GREEDY_PROMPTS, GREEDY, SpecConfig(mode="off"))
    engine = Engine(target, drafter, compile="on")
    swaps = iter([drafter2, drafter, drafter2])

    def on_step(stats):
        nxt = next(swaps, None)
        if nxt is not None:
            engine.set_drafter(nxt)

    out = engine.generate(GREEDY_PROMPTS, GREEDY, SpecConfig(mode="adaptive", k_max=4),
                          chooser=ScriptedChooser([3, 0, 2, 4, 1]), on_step=on_step)
    assert tokens(out) == tokens(plain)


@needs_compiler
def test_inductor_greedy_equals_transformers_generate(sharp_target, tmp_path):
    target = sharp_target(8, max_positions=128, layers=1)  # inductor compiles C++ per layer of the stack
    save_model(target, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    prompt = [1, 2, 3, 4]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    out = Engine(target, compile="on").generate([prompt], replace(GREEDY, max_new_tokens=20), SpecConfig(mode="off"))
    assert out.sequences[0].tokens == ref


def test_auto_runs_each_cell_the_way_its_profile_says(target, drafter, monkeypatch):
    engine = Engine(target, drafter, compile="auto", max_running=8)
    # Compiled at batch 1 and eager at batch 8, for every k.
    engine._costs = CostModel([1, 8], [[1.0] * 4] * 2, [[True] * 4, [False] * 4])
    counter = CountCompiled(monkeypatch)
    engine.generate([[1, 2]] * 8, GREEDY, SpecConfig(mode="static", k=3))  # all rows finish together: batch 8
    assert counter.calls == 0
    engine.generate([[1, 2]], GREEDY, SpecConfig(mode="static", k=3))
    assert counter.calls > 0


def test_auto_profile_times_both_paths_and_keeps_the_faster(target, drafter, tmp_path, monkeypatch):
    engine = Engine(target, drafter, compile="auto", max_running=4)
    # Relative costs rise with the batch on each path (as the smoothing across batch sizes expects).
    timed = {"eager": [[1.0, 1.2, 1.4], [4.0, 5.0, 6.0]], "compiled": [[0.5, 0.55, 0.6], [4.5, 4.95, 5.4]]}
    calls = []

    def profile_steps(engine, batches, k_max, paths, context, repeats):
        calls.append(paths)
        return {p: timed[p] for p in paths}

    monkeypatch.setattr(respec.engine.tuner, "profile_steps", profile_steps)
    costs = load_or_profile(engine, 2, TunerConfig(batch_grid=(1, 4), context=8, repeats=1, cache_dir=str(tmp_path)))
    assert calls == [("eager",), ("compiled",)] and costs.key["compile"] == "auto"
    assert costs.compiled == [[True, True, True], [False, True, True]]
    assert costs.steps == [pytest.approx([0.5, 0.55, 0.6]), pytest.approx([4.0, 4.95, 5.4])]


def test_auto_falls_back_to_eager_when_compiling_fails(target, drafter, tmp_path, monkeypatch):
    engine = Engine(target, drafter, compile="auto", max_running=4)

    def profile_steps(engine, batches, k_max, paths, context, repeats):
        if paths == ("compiled",):
            raise RuntimeError("inductor: C++ compile failed")
        return {"eager": [[1.0, 2.0]]}

    monkeypatch.setattr(respec.engine.tuner, "profile_steps", profile_steps)
    with pytest.warns(UserWarning, match="C\\+\\+ compile failed.*running eagerly"):
        costs = load_or_profile(engine, 1, TunerConfig(batch_grid=(1,), context=8, repeats=1, cache_dir=str(tmp_path)))
    assert costs.compiled == [[False, False]]


def test_bad_compile_modes_are_one_clear_error(target, monkeypatch):
    with pytest.raises(ConfigError, match="compile must be one of auto, off, on"):
        Engine(target, compile="fast")
    monkeypatch.setattr(respec.engine.compile, "compile_unavailable", lambda device: "no C++ compiler here")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler here; use compile='auto' or 'off'"):
        Engine(target, compile="on")
    Engine(target, compile="auto")  # auto measures instead of failing


def test_auto_profiles_while_requests_wait_and_serves_them(target, drafter, monkeypatch):
    """Under add_request/step the profile runs at the first step, beside the queued requests, on slots of its
    own; the requests then run to the end with the eager engine's tokens."""
    calls = []

    def profile_steps(engine, batches, k_max, paths, context, repeats):
        calls.append(paths)
        return {p: [[1.0 if p == "compiled" else 2.0] * (k_max + 1) for _ in batches] for p in paths}

    monkeypatch.setattr(respec.engine.tuner, "profile_steps", profile_steps)
    spec = SpecConfig(mode="static", k=2)
    eager = Engine(target, drafter, spec=spec, max_running=4).generate(GREEDY_PROMPTS, GREEDY)
    engine = Engine(target, drafter, spec=spec, max_running=4, compile="auto")
    for i, p in enumerate(GREEDY_PROMPTS):
        engine.add_request(i, p, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert calls == [("eager",), ("compiled",)]
    assert [done[i] for i in range(len(GREEDY_PROMPTS))] == tokens(eager)


def test_inductor_cache_goes_under_respec_cache_unless_chosen(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes there on first use
    respec.engine.compile.use_disk_cache()
    assert cache_dir() == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice is kept
    respec.engine.compile.use_disk_cache()
    assert cache_dir() == str(tmp_path / "mine")
