"""Tests of respec/engine/generate.py: every k schedule (static, adaptive, replay, drafter swaps) samples exactly the
target's distribution; greedy equality; the drafts come from the drafter's true conditioning; logprobs; weight and
drafter swaps; errors."""

import copy
import random
import time
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

import respec.engine.generate
from respec.engine.checkpoint import load_model, save_model
from respec.engine.drafter import init_drafter
from respec.engine.generate import BACKLOG_FLUSH, K_LIMIT, Engine, GenerationResult, SpecConfig
from respec.engine.model import ModelConfig, hf_state, init_model
from respec.engine.sampling import SamplingParams, accept_prob, sample, target_probs
from respec.errors import CheckpointError, ConfigError, DrafterMismatchError, PromptError

V = 8  # small vocabulary: the joint of 3 tokens has 512 cells, few enough to test exactly


PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]
GREEDY_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 1, 2], [3], [7, 7, 7, 2]]


class RandomChooser:
    """Picks k uniformly in 0..k_max every step (seeded), predicts k milliseconds, and keeps what it is told."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.observed = []

    def choose(self, batch, k_max):
        k = self.rng.randint(0, k_max)
        return k, k / 1000

    def observe(self, stats):
        self.observed.append(stats)


class ScriptedChooser:
    """Returns the k of `ks` step by step (the last one from then on)."""

    def __init__(self, ks):
        self.ks, self.step = list(ks), 0

    def choose(self, batch, k_max):
        k = self.ks[min(self.step, len(self.ks) - 1)]
        self.step += 1
        return k, None

    def observe(self, stats):
        pass


def tokens(result):
    return [s.tokens for s in result.sequences]


@torch.no_grad()
def exact_joint(model, prompt: list[int], params: SamplingParams, n: int = 3) -> torch.Tensor:
    """Returns the exact distribution [V]*n of the first n sampled tokens after `prompt` (all prefixes)."""
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])
    for _ in range(n):
        p = target_probs(model.logits(prefixes)[:, -1], params).double()  # [P, V]
        joint = (joint[:, None] * p).reshape(-1)
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
    return joint


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Returns the chi-square goodness-of-fit p-value; cells expected < 5 times are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue


def first3_counts(engine, params, spec, copies: int, runs: int = 1, chooser=lambda run: None,
                  on_step=lambda run: None) -> list[torch.Tensor]:
    """Returns per prompt the counts [V^3] of its first 3 tokens over `copies` samples, drawn in `runs` generate
    calls; run r uses seed params.seed + r, chooser(r) and on_step(r), so each run can follow its own k schedule."""
    counts = [torch.zeros(V ** 3, dtype=torch.float64) for _ in PROMPTS]
    per_run = copies // runs
    for run in range(runs):
        prompts = [p for p in PROMPTS for _ in range(per_run)]
        out = engine.generate(prompts, replace(params, seed=params.seed + run), spec, chooser=chooser(run),
                              on_step=on_step(run))
        for i in range(len(PROMPTS)):
            codes = [s.tokens[0] * V * V + s.tokens[1] * V + s.tokens[2]
                     for s in out.sequences[i * per_run:(i + 1) * per_run]]
            counts[i] += torch.bincount(torch.tensor(codes), minlength=V ** 3).double()
    return counts


def assert_follows_target(target, counts, params):
    for prompt, c in zip(PROMPTS, counts, strict=True):
        assert chi2_pvalue(c, exact_joint(target, prompt, params)) > 1e-3, \
            "samples do not follow the target distribution"


# N = 3000 samples per prompt; the test accepts at significance 0.001 (false-failure rate 0.1% per cell of
# the parametrisation with fixed seeds, i.e. deterministic here). The wrong rules below must be rejected at 1e-6;
# at this N both give p < 1e-60 (measured), so a larger N would only add runtime.
N = 3000
CHI_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3, seed=11, ignore_eos=True)


@pytest.mark.parametrize("temperature,top_p,k,plain", [(1.0, 0.9, 2, False), (0.7, 0.9, 3, True),
                                                       (1.0, 1.0, 4, True)])
def test_speculative_matches_target_distribution(target, drafter, temperature, top_p, k, plain):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=3, seed=11, ignore_eos=True)
    engine = Engine(target, drafter)
    assert_follows_target(target, first3_counts(engine, params, SpecConfig(mode="static", k=k), N), params)
    if plain:
        assert_follows_target(target, first3_counts(engine, params, SpecConfig(mode="off"), N), params)


def always_accept(p, q, drafts, u_accept, u_sample):
    """A classic bug: every draft is accepted."""
    k = drafts.shape[1]
    return torch.full((drafts.shape[0],), k), sample(p[:, k], u_sample[:, k])


def resample_from_target(p, q, drafts, u_accept, u_sample):
    """A subtler bug: the right acceptance test, but a rejection resamples from p instead of norm(max(p - q, 0))."""
    B, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (u_accept < accept_prob(p_draft, q_draft)).long().cumprod(-1).sum(-1)
    return accepted, sample(p[torch.arange(B), accepted], u_sample.gather(1, accepted[:, None]).squeeze(1))


@pytest.mark.parametrize("wrong_rule", [always_accept, resample_from_target], ids=lambda f: f.__name__)
def test_statistical_test_catches_a_wrong_rule(target, drafter, monkeypatch, wrong_rule):
    """A wrong rejection rule must fail the same test, by a wide margin."""
    monkeypatch.setattr(respec.engine.generate, "rejection_sample", wrong_rule)
    counts = first3_counts(Engine(target, drafter), CHI_PARAMS, SpecConfig(mode="static", k=2), N)
    assert chi2_pvalue(counts[0], exact_joint(target, PROMPTS[0], CHI_PARAMS)) < 1e-6


def test_adaptive_random_k_matches_target_distribution(target, drafter):
    """A chooser that picks any k in 0..k_max (0 included) at every step; 6 runs of 6 different k schedules."""
    engine = Engine(target, drafter)
    choosers = [RandomChooser(seed) for seed in range(6)]
    counts = first3_counts(engine, CHI_PARAMS, SpecConfig(mode="adaptive", k_max=4), N, runs=6,
                           chooser=lambda run: choosers[run])
    schedules = {tuple(s.k for s in c.observed) for c in choosers}
    assert len(schedules) > 1 and any(0 in s for s in schedules) and any(s[0] > 0 for s in schedules)
    assert_follows_target(target, counts, CHI_PARAMS)


def test_drafter_swaps_keep_the_target_distribution(target, drafter, drafter2):
    """on_step swaps the drafter after every step (alternating two drafters); the samples stay exact."""
    engine = Engine(target, drafter)
    versions = []

    def swapper(run):
        def on_step(stats):
            versions.append(stats.drafter_version)
            nxt = (stats.drafter_version + 1) % 2
            engine.set_drafter([drafter, drafter2][nxt], version=nxt)
        return on_step

    counts = first3_counts(engine, CHI_PARAMS, SpecConfig(mode="static", k=2), N, runs=2, on_step=swapper)
    assert versions[:2] == [0, 1] and set(versions) == {0, 1}
    assert_follows_target(target, counts, CHI_PARAMS)



def test_step_stats_name_the_drafter_that_drafted(target, drafter, drafter2, monkeypatch):
    """A swap from another thread may land right after a step releases the engine: the step's stats must still
    name the drafter that drafted it. Simulated deterministically by swapping inside the engine's clock reads,
    which happen outside the step (before it and when its stats are built)."""
    engine = Engine(target, drafter)
    ran = []
    hooks = [d.register_forward_pre_hook(lambda m, args, v=v: ran.append(v)) for v, d in enumerate([drafter, drafter2])]

    class SwappingClock:
        @staticmethod
        def perf_counter():
            nxt = 1 - engine.drafter_version
            engine.set_drafter([drafter, drafter2][nxt], version=nxt)
            return time.perf_counter()

    steps = []

    def on_step(stats):
        steps.append((stats.drafter_version, set(ran)))
        ran.clear()

    monkeypatch.setattr(respec.engine.generate, "time", SwappingClock)
    try:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, seed=0), SpecConfig(mode="static", k=2),
                        on_step=on_step)
    finally:
        for h in hooks:
            h.remove()
    assert len(steps) > 2 and all(drafted == {version} for version, drafted in steps), steps

@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_greedy_plain(target, drafter, k):
    params = SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True)
    engine = Engine(target, drafter)
    plain = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off"))
    spec = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="static", k=k))
    assert tokens(spec) == tokens(plain)
    assert all(len(s.tokens) == 25 for s in spec.sequences)


def test_greedy_adaptive_random_k_equals_greedy_plain(target, drafter):
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    engine = Engine(target, drafter)
    plain = tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off")))
    for seed in range(3):
        out = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="adaptive", k_max=6), RandomChooser(seed))
        assert tokens(out) == plain
        assert 0 in out.trace and len(set(out.trace)) > 2


def test_greedy_with_drafter_swaps_equals_greedy_plain(target, drafter, drafter2):
    """Swaps every third step, under a random k schedule; each step reports the drafter that drafted it."""
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    engine = Engine(target, drafter)
    plain = tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off")))
    steps = []

    def on_step(stats):
        steps.append(stats)
        if len(steps) % 3 == 0:
            version = len(steps) // 3 % 2
            engine.set_drafter([drafter, drafter2][version], version=version)

    out = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="adaptive", k_max=4), RandomChooser(7), on_step)
    assert tokens(out) == plain and steps == out.stats
    for i, s in enumerate(out.stats):
        assert s.drafter_version == (i // 3 % 2 if s.k else None)


def test_plain_steps_then_speculation_need_no_reprefill(target, drafter):
    """40 plain steps (more than the drafter's backlog flush width) then k = 3: the target sees one prefill and
    then one or k+1 tokens per step; the drafter catches up in chunks of at most BACKLOG_FLUSH; greedy is exact."""
    params = SamplingParams(temperature=0, max_new_tokens=70, ignore_eos=True)
    engine = Engine(target, drafter)
    plain = tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off")))
    target_widths, drafter_widths = [], []
    hooks = [target.register_forward_pre_hook(lambda m, args: target_widths.append(args[0].shape[1])),
             drafter.register_forward_pre_hook(lambda m, args: drafter_widths.append(args[0].shape[1]))]
    try:
        out = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="adaptive", k_max=3),
                              ScriptedChooser([0] * 40 + [3]))
    finally:
        for h in hooks:
            h.remove()
    assert tokens(out) == plain
    assert out.trace[:40] == (0,) * 40 and set(out.trace[40:]) == {3}
    assert target_widths == [max(map(len, GREEDY_PROMPTS))] + [1] * 40 + [4] * (len(out.trace) - 40)
    assert max(drafter_widths) <= BACKLOG_FLUSH and len(drafter_widths) > 3 * (len(out.trace) - 40)
    assert sum(a for s in out.stats[40:] for a in s.accepted) > 0


def sensitive_drafter(target, draft_vocab: int):
    """Returns a drafter with 10x its init weights: peaked draft distributions, so conditioning errors show."""
    counts = torch.arange(V, 0, -1)
    d = init_drafter(target, seed=3, draft_vocab_size=draft_vocab, token_frequencies=counts)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10)
    return d.eval()


@torch.no_grad()
def teacher_forced_q(drafter, seq: list[int], features: torch.Tensor, drafts: list[int],
                     params: SamplingParams) -> torch.Tensor:
    """Returns the draft distributions [k, V] for k chained drafts after the sequence `seq` (n tokens), by cacheless
    drafter forwards: position t < n-1 pairs the target feature at t with token t+1, each chained position pairs
    the drafter's own output at the previous position with the previous draft."""
    ids = seq[1:]
    fused = drafter.fc(features[: len(seq) - 1])  # [n-1, H]
    qs = []
    for d in drafts:
        hidden, logits = drafter(torch.tensor([ids]), fused[None])  # [1, T, H], [1, T, Vd]
        qs.append(drafter.expand_probs(target_probs(logits[0, -1], params)))
        ids = ids + [d]
        fused = torch.cat([fused, hidden[0, -1:]])
    return torch.stack(qs)


@pytest.mark.parametrize("draft_vocab", [V, 5])
def test_draft_distributions_equal_a_teacher_forced_drafter_forward(target, draft_vocab, monkeypatch):
    """At every speculative step, the q handed to the rejection rule is the drafter's cacheless forward over the
    true target features of the sequence so far, chained on its own hidden states; across k = 0 runs longer
    than the backlog flush, rows of different lengths, and rows leaving the batch."""
    drafter = sensitive_drafter(target, draft_vocab)
    captured = []
    real = respec.engine.generate.rejection_sample

    def spy(p, q, drafts, u_accept, u_sample):
        captured.append((q.clone(), drafts.clone()))
        return real(p, q, drafts, u_accept, u_sample)

    monkeypatch.setattr(respec.engine.generate, "rejection_sample", spy)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [3, 1, 4]]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=64, seed=4, ignore_eos=True)
    ks = [3, 0, 2, 4, 0, 0, 1] + [0] * (BACKLOG_FLUSH + 2) + [4, 2, 0, 3, 1, 4]
    out = Engine(target, drafter).generate(prompts, params, SpecConfig(mode="adaptive", k_max=4),
                                           ScriptedChooser(ks))
    seqs = [p + s.tokens for p, s in zip(prompts, out.sequences, strict=True)]
    with torch.no_grad():
        features = [target(torch.tensor([s]), aux_layers=drafter.aux_layer_ids)[1][0] for s in seqs]  # [T, 3H]
    # Replay the batch bookkeeping from the stats: live rows and tokens emitted so far per row.
    rows, emitted = list(range(len(prompts))), [1] * len(prompts)
    calls, checked, peak = iter(captured), 0, 0.0
    for s in out.stats:
        assert s.batch == len(rows)
        if s.k:
            q, drafts = next(calls)
            assert q.shape == (len(rows), s.k, V) and drafts.shape == (len(rows), s.k)
            for i, b in enumerate(rows):
                n = len(prompts[b]) + emitted[b]
                ref = teacher_forced_q(drafter, seqs[b][:n], features[b], drafts[i].tolist(), params)
                torch.testing.assert_close(q[i], ref, atol=1e-5, rtol=0)
                checked += 1
                peak = max(peak, float(q[i].max()))
        for i, b in enumerate(rows):
            emitted[b] = min(emitted[b] + s.accepted[i] + 1, params.max_new_tokens)
        rows = [b for b in rows if emitted[b] < params.max_new_tokens]
    assert next(calls, None) is None and rows == []
    assert checked > 20 and peak > 0.5  # many steps checked, on distributions far from uniform


def test_replay_reproduces_an_adaptive_run(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=9, ignore_eos=True)
    engine = Engine(target, drafter)
    prompts = PROMPTS * 3
    logged = engine.generate(prompts, params, SpecConfig(mode="adaptive", k_max=5), RandomChooser(3))
    assert len(set(logged.trace)) > 2
    replayed = engine.generate(prompts, params, SpecConfig(mode="replay", trace=logged.trace))
    assert replayed.trace == logged.trace
    assert tokens(replayed) == tokens(logged)
    assert [s.logprobs for s in replayed.sequences] == [s.logprobs for s in logged.sequences]
    assert [s.accepted for s in replayed.stats] == [s.accepted for s in logged.stats]
    # Another schedule draws other random numbers: the same seed alone does not reproduce the rollout.
    other = engine.generate(prompts, params, SpecConfig(mode="adaptive", k_max=5), RandomChooser(4))
    assert tokens(other) != tokens(logged)
    with pytest.raises(ConfigError, match="replay trace has"):
        engine.generate(prompts, params, SpecConfig(mode="replay", trace=logged.trace[:-1]))


def test_trace_mean_k_and_step_stats(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0, ignore_eos=True)
    chooser = RandomChooser(5)
    out = Engine(target, drafter).generate(PROMPTS * 2, params, SpecConfig(mode="adaptive", k_max=3), chooser)
    assert chooser.observed == out.stats
    assert out.trace == tuple(s.k for s in out.stats) and set(out.trace) <= {0, 1, 2, 3}
    assert out.mean_k == pytest.approx(sum(out.trace) / len(out.trace))
    for s in out.stats:
        assert s.predicted_seconds == s.k / 1000  # the chooser's prediction, passed through
        assert s.drafter_version == (0 if s.k else None)
        assert len(s.accepted) == s.batch and all(0 <= a <= s.k for a in s.accepted)
        assert s.emitted == s.batch + sum(s.accepted) and s.seconds > 0
    plain = Engine(target).generate(PROMPTS, params)
    assert plain.mean_k == 0 and set(plain.trace) == {0} and plain.mean_emitted_per_step == 1.0
    assert GenerationResult(sequences=[]).mean_k == 0


def test_greedy_plain_equals_transformers_generate(target, tmp_path):
    save_model(target, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    out = Engine(target).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, out.sequences, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert seq.tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", ["off", "static", "adaptive"])
def test_logprobs_equal_a_fresh_forward(target, drafter, mode):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=20, seed=3, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [2], [5, 4, 3]]
    out = Engine(target, drafter).generate(prompts, params, SpecConfig(mode=mode, k=3, k_max=4), RandomChooser(0))
    for prompt, seq in zip(prompts, out.sequences, strict=True):
        with torch.no_grad():
            logits = target.logits(torch.tensor([prompt + seq.tokens]))[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(seq.tokens)[:, None]).squeeze(-1)
        assert (ref - torch.tensor(seq.logprobs)).abs().max() <= 1e-4


def test_stop_tokens_budgets_and_compaction(target, drafter):
    """Rows finish at different steps (stop token or budget) and leave the batch; the rest are unaffected."""
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    engine = Engine(target, drafter)
    full = engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off")).sequences
    stop = full[0].tokens[4]  # a token row 0 emits early
    stopped = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=(stop,), ignore_eos=True)
    for spec in [SpecConfig(mode="off"), SpecConfig(mode="static", k=4)]:
        out = engine.generate(GREEDY_PROMPTS, stopped, spec)
        for ref, seq in zip(full, out.sequences, strict=True):
            if stop in ref.tokens:
                cut = ref.tokens.index(stop) + 1
                assert seq.tokens == ref.tokens[:cut] and seq.finish_reason == "stop"
            else:
                assert seq.tokens == ref.tokens and seq.finish_reason == "length"
        batches = [s.batch for s in out.stats]
        assert batches == sorted(batches, reverse=True) and batches[-1] < len(GREEDY_PROMPTS)
        # `kept` counts the tokens each row kept: not the drafts accepted past its stop token or budget (each row's
        # first token comes from its prefill).
        assert sum(sum(s.kept) for s in out.stats) + len(GREEDY_PROMPTS) == out.num_tokens
        assert all(c <= a + 1 for s in out.stats for a, c in zip(s.accepted, s.kept, strict=True))


def test_eos_from_config_stops(target):
    eos = Engine(target).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=10,
                                                            ignore_eos=True)).sequences[0].tokens[2]
    cfg = ModelConfig(**{**target.config.__dict__, "eos_token_id": eos})
    model = init_model(cfg)
    model.load_state_dict(target.state_dict())
    seq = Engine(model).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=10)).sequences[0]
    assert seq.tokens[-1] == eos and seq.finish_reason == "stop" and len(seq.tokens) <= 3


def test_speculative_stats(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0, ignore_eos=True)
    out = Engine(target, drafter).generate(PROMPTS * 4, params, SpecConfig(mode="static", k=3))
    assert all(s.k == 3 and len(s.accepted) == s.batch and all(0 <= a <= 3 for a in s.accepted)
               for s in out.stats)
    assert 1.0 <= out.mean_emitted_per_step <= 4.0 and out.mean_k == 3
    assert out.num_tokens == 8 * 16


def test_seed_reproducibility(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, ignore_eos=True)
    engine = Engine(target, drafter)
    a = engine.generate(PROMPTS, params, SpecConfig(k=2))
    b = engine.generate(PROMPTS, params, SpecConfig(k=2))
    assert tokens(a) == tokens(b)


# ---- weight and drafter swaps ----


@pytest.fixture
def fresh(target):
    """A copy of the target (load_weights changes weights in place) with its own drafter."""
    model = copy.deepcopy(target)
    return model, init_drafter(model, seed=1)


def test_set_drafter_validates(fresh, sharp_target):
    model, d = fresh
    engine = Engine(model, d)
    narrow = init_model(ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    wider_vocab = sharp_target(V + 3, max_positions=128)
    with pytest.raises(DrafterMismatchError, match="hidden_size"):
        engine.set_drafter(init_drafter(narrow), version=1)
    with pytest.raises(DrafterMismatchError, match="vocab_size"):
        engine.set_drafter(init_drafter(wider_vocab), version=1)
    with pytest.raises(DrafterMismatchError, match="same layers"):
        engine.set_drafter(init_drafter(model, aux_layer_ids=(0, 1, 2)), version=1)
    with pytest.raises(DrafterMismatchError, match="move it"):
        engine.set_drafter(init_drafter(model).to(torch.float64), version=1)
    assert engine.drafter is d and engine.drafter_version == 0 and engine.drafter_epoch == 1
    # A drafter built on another target instance of the same shape is rebound to this target's embedding.
    other = init_drafter(sharp_target(V, seed=3, max_positions=128), seed=2)
    engine.set_drafter(other, version=7)
    assert engine.drafter is other and other.embed_tokens is model.embed_tokens
    assert engine.drafter_version == 7 and engine.drafter_epoch == 2


def test_load_weights_equals_an_engine_on_the_saved_model(fresh, sharp_target, tmp_path):
    model, d = fresh
    other = sharp_target(V, seed=7, max_positions=128)
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    engine = Engine(model, d)
    before = tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off")))
    engine.load_weights(other.state_dict())
    ref = tokens(Engine(load_model(save_model(other, tmp_path / "other"))).generate(GREEDY_PROMPTS, params))
    assert ref != before
    assert tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="off"))) == ref
    assert tokens(engine.generate(GREEDY_PROMPTS, params, SpecConfig(mode="static", k=3))) == ref
    assert torch.equal(d.embed_tokens.weight, other.embed_tokens.weight)  # the drafter reads the new embedding


def test_load_weights_accepts_hf_names(fresh, sharp_target):
    model, _ = fresh
    other = sharp_target(V, seed=7, max_positions=128)
    hf = {(k if k == "lm_head.weight" else "model." + k): v for k, v in hf_state(other, other.state_dict()).items()}
    assert "model.layers.0.self_attn.q_proj.weight" in hf and "model.layers.0.mlp.gate_proj.weight" in hf
    Engine(model).load_weights(hf)
    for name, tensor in other.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("corruption,message", [("missing", "lacks"), ("shape", "shape"), ("nan", "NaN"),
                                                ("unexpected", "does not have")])
def test_load_weights_rejects_bad_state_and_changes_nothing(fresh, corruption, message):
    model, _ = fresh
    engine = Engine(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 for k, v in model.state_dict().items()}  # would change every tensor
    if corruption == "missing":
        del state["layers.1.mlp.down_proj.weight"]
    elif corruption == "shape":
        state["norm.weight"] = state["norm.weight"][:-1]  # the last tensors: checks run before any copy
    elif corruption == "nan":
        state["lm_head.weight"][0, 0] = float("nan")
    else:
        state["layers.4.mlp.down_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=message):
        engine.load_weights(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# ---- bad input ----


def test_bad_prompts(target):
    engine = Engine(target)
    params = SamplingParams(max_new_tokens=10)
    with pytest.raises(PromptError, match="empty"):
        engine.generate([[1], []], params)
    with pytest.raises(PromptError, match="no prompts"):
        engine.generate([], params)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.generate([[1, V]], params)
    with pytest.raises(PromptError, match="exceeds the model context"):
        engine.generate([[1] * 120], params)


def test_drafter_required_and_must_match(target, drafter, sharp_target):
    for spec in [SpecConfig(mode="static"), SpecConfig(mode="adaptive"), SpecConfig(mode="replay", trace=(1,))]:
        with pytest.raises(ConfigError, match="needs a drafter"):
            Engine(target).generate([[1]], SamplingParams(), spec, chooser=RandomChooser(0))
    other = sharp_target(V + 3, max_positions=128)
    with pytest.raises(DrafterMismatchError):
        Engine(other, drafter)


@pytest.mark.parametrize("bad_k", [5, -1])
def test_chooser_outside_0_to_k_max_is_an_error(target, drafter, bad_k):
    with pytest.raises(ConfigError, match="outside 0..k_max=4"):
        Engine(target, drafter).generate(PROMPTS, SamplingParams(max_new_tokens=8),
                                         SpecConfig(mode="adaptive", k_max=4), ScriptedChooser([1, bad_k]))


@pytest.mark.parametrize("kwargs", [{"mode": "fast"}, {"mode": "static", "k": 0}, {"mode": "static", "k": 17},
                                    {"mode": "adaptive", "k_max": 0}, {"mode": "adaptive", "k_max": K_LIMIT + 1},
                                    {"mode": "adaptive", "k_max": 2.5}, {"mode": "replay"},
                                    {"mode": "replay", "trace": (1, -1)}, {"mode": "replay", "trace": (1, 17)}])
def test_invalid_spec_config(kwargs):
    with pytest.raises(ConfigError):
        SpecConfig(**kwargs)


def test_spec_config_largest_k():
    assert SpecConfig(mode="off").largest_k == 0 and SpecConfig(mode="static", k=3).largest_k == 3
    assert SpecConfig(mode="adaptive", k_max=K_LIMIT).largest_k == K_LIMIT
    assert SpecConfig(mode="replay", trace=[0, 5, 2]).largest_k == 5


def test_exact_joint_sums_to_one_and_top_p_empties_cells(target):
    """Sanity of the exact joint used above: it sums to one, and top-p leaves some 3-token cells unreachable."""
    params = SamplingParams(temperature=1.0, top_p=0.9)
    joint = exact_joint(target, PROMPTS[0], params)
    assert abs(joint.sum() - 1) < 1e-6 and (joint == 0).sum() > 0
    assert (exact_joint(target, PROMPTS[0], SamplingParams(temperature=1.0)) > 0).all()
