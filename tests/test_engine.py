"""The engine: speculative decoding is exactly the target's distribution; greedy equality; logprobs; errors."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

import respec.engine.generate
from respec.engine.checkpoint import save_model
from respec.engine.drafter import init_drafter
from respec.engine.generate import Engine, SpecConfig
from respec.engine.model import ModelConfig, init_model
from respec.engine.sampling import SamplingParams, sample, target_probs
from respec.errors import ConfigError, DrafterMismatchError, PromptError

V = 8  # small vocabulary: the joint of 3 tokens has 512 cells, few enough to test exactly


@pytest.fixture(scope="module")
def target(sharp_target):
    return sharp_target(V, max_positions=128)


@pytest.fixture(scope="module")
def drafter(target):
    return init_drafter(target, seed=1)  # random: a deliberately poor drafter


PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]


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


def first3_counts(engine, params, spec, copies: int) -> list[torch.Tensor]:
    prompts = [p for p in PROMPTS for _ in range(copies)]
    out = engine.generate(prompts, params, spec)
    counts = []
    for i in range(len(PROMPTS)):
        codes = [s.tokens[0] * V * V + s.tokens[1] * V + s.tokens[2]
                 for s in out.sequences[i * copies:(i + 1) * copies]]
        counts.append(torch.bincount(torch.tensor(codes), minlength=V ** 3).double())
    return counts


# N = 6000 samples per prompt; the test accepts at significance 0.001 (false-failure rate 0.1% per cell of
# the parametrisation with fixed seeds, i.e. deterministic here), and the wrong rule below is rejected at 1e-6.
N = 6000


@pytest.mark.parametrize("temperature,top_p,k", [(1.0, 0.9, 2), (0.7, 0.9, 3), (1.0, 1.0, 4)])
def test_speculative_matches_target_distribution(target, drafter, temperature, top_p, k):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=3, seed=11, ignore_eos=True)
    engine = Engine(target, drafter)
    spec_counts = first3_counts(engine, params, SpecConfig(mode="static", k=k), N)
    plain_counts = first3_counts(engine, params, SpecConfig(mode="off"), N)
    for prompt, sc, pc in zip(PROMPTS, spec_counts, plain_counts, strict=False):
        exact = exact_joint(target, prompt, params)
        assert chi2_pvalue(sc, exact) > 1e-3, "speculative samples do not follow the target distribution"
        assert chi2_pvalue(pc, exact) > 1e-3, "plain samples do not follow the target distribution"


def test_statistical_test_catches_a_wrong_rule(target, drafter, monkeypatch):
    """Always accepting the drafts (a classic bug) must fail the same test."""
    def always_accept(p, q, drafts, generator):
        k = drafts.shape[1]
        return torch.full((drafts.shape[0],), k), sample(p[:, k], generator)

    monkeypatch.setattr(respec.engine.generate, "rejection_sample", always_accept)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3, seed=11, ignore_eos=True)
    counts = first3_counts(Engine(target, drafter), params, SpecConfig(mode="static", k=2), N)
    assert chi2_pvalue(counts[0], exact_joint(target, PROMPTS[0], params)) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_greedy_plain(target, drafter, k):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 1, 2], [3], [7, 7, 7, 2]]
    params = SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True)
    engine = Engine(target, drafter)
    plain = engine.generate(prompts, params, SpecConfig(mode="off"))
    spec = engine.generate(prompts, params, SpecConfig(mode="static", k=k))
    assert [s.tokens for s in spec.sequences] == [s.tokens for s in plain.sequences]
    assert all(len(s.tokens) == 25 for s in spec.sequences)


def test_greedy_plain_equals_transformers_generate(target, tmp_path):
    save_model(target, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    out = Engine(target).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, out.sequences, strict=False):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert seq.tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", ["off", "static"])
def test_logprobs_equal_a_fresh_forward(target, drafter, mode):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=20, seed=3, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [2], [5, 4, 3]]
    out = Engine(target, drafter).generate(prompts, params, SpecConfig(mode=mode, k=3))
    for prompt, seq in zip(prompts, out.sequences, strict=False):
        with torch.no_grad():
            logits = target.logits(torch.tensor([prompt + seq.tokens]))[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(seq.tokens)[:, None]).squeeze(-1)
        assert (ref - torch.tensor(seq.logprobs)).abs().max() <= 1e-4


def test_stop_tokens_budgets_and_compaction(target, drafter):
    """Rows finish at different steps (stop token or budget) and leave the batch; the rest are unaffected."""
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    engine = Engine(target, drafter)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 1, 2], [3], [7, 7, 7, 2]]
    full = engine.generate(prompts, params, SpecConfig(mode="off")).sequences
    stop = full[0].tokens[4]  # a token row 0 emits early
    stopped = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=(stop,), ignore_eos=True)
    for spec in [SpecConfig(mode="off"), SpecConfig(mode="static", k=4)]:
        out = engine.generate(prompts, stopped, spec)
        for ref, seq in zip(full, out.sequences, strict=False):
            if stop in ref.tokens:
                cut = ref.tokens.index(stop) + 1
                assert seq.tokens == ref.tokens[:cut] and seq.finish_reason == "stop"
            else:
                assert seq.tokens == ref.tokens and seq.finish_reason == "length"
        batches = [s.batch for s in out.stats]
        assert batches == sorted(batches, reverse=True) and batches[-1] < len(prompts)


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
    assert 1.0 <= out.mean_emitted_per_step <= 4.0
    assert out.num_tokens == 8 * 16


def test_seed_reproducibility(target, drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, ignore_eos=True)
    engine = Engine(target, drafter)
    a = engine.generate(PROMPTS, params, SpecConfig(k=2))
    b = engine.generate(PROMPTS, params, SpecConfig(k=2))
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]


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
    with pytest.raises(ConfigError, match="needs a drafter"):
        Engine(target).generate([[1]], SamplingParams(), SpecConfig(mode="static"))
    other = sharp_target(V + 3, max_positions=128)
    with pytest.raises(DrafterMismatchError):
        Engine(other, drafter)


def test_all_cells_reachable_in_joint(target):
    """Sanity of the exact joint used above: it sums to one and top-p removes mass."""
    params = SamplingParams(temperature=1.0, top_p=0.9)
    joint = exact_joint(target, PROMPTS[0], params)
    assert abs(joint.sum() - 1) < 1e-6 and (joint == 0).sum() > 0
