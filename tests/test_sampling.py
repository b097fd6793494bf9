"""Tests of respec/engine/sampling.py: the rejection rule on hand-made distributions, exact (analytic) and sampled;
per-row parameters equal the scalar ones row by row; the per-request random streams and inverse-CDF sampling;
parameter validation."""

import itertools

import pytest
import torch
from scipy.stats import chisquare, kstest

from respec.engine.sampling import (
    ACCEPT,
    DRAFT,
    SAMPLE,
    RowParams,
    SamplingParams,
    accept_prob,
    mix64,
    rejection_sample,
    request_key,
    residual,
    sample,
    target_probs,
    token_logprobs,
    uniforms,
)
from respec.errors import SamplingError

V = 5


def rand_dist(gen: torch.Generator, n: int = V, zeros: int = 0) -> torch.Tensor:
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    w[:zeros] = 0  # tokens the distribution cannot produce
    return w[torch.randperm(n, generator=gen)] / w.sum()


def emitted_joint_k2(p1, p2, q1, q2) -> torch.Tensor:
    """Returns the exact joint [V, V] of the first two emitted tokens of one speculative step with k = 2
    followed (after a rejection) by one plain step, using the library's acceptance and residual pieces.
    p2[y1] / q2[x1] are the second-position distributions given the first token (they may depend on it)."""
    joint = torch.zeros(V, V, dtype=torch.float64)
    for x1, x2 in itertools.product(range(V), range(V)):
        pq = q1[x1] * q2[x1][x2]
        if pq == 0:
            continue
        a1 = accept_prob(p1[x1], q1[x1])
        a2 = accept_prob(p2[x1][x2], q2[x1][x2])
        # both accepted: (x1, x2); x1 accepted, x2 rejected: (x1, residual of position 2)
        joint[x1, x2] += pq * a1 * a2
        joint[x1] += pq * a1 * (1 - a2) * residual(p2[x1], q2[x1])
        # x1 rejected: y1 from the residual, y2 from the target at the next step
        r1 = residual(p1, q1)
        joint += pq * (1 - a1) * r1[:, None] * torch.stack([p2[y] for y in range(V)])
    return joint


@pytest.mark.parametrize("seed", range(6))
def test_rejection_rule_is_exact_analytically(seed):
    gen = torch.Generator().manual_seed(seed)
    p1 = rand_dist(gen, zeros=seed % 3)  # some cases with tokens p cannot emit
    q1 = rand_dist(gen, zeros=(seed + 1) % 3)  # and tokens q cannot draft
    p2 = [rand_dist(gen, zeros=seed % 2) for _ in range(V)]
    q2 = [rand_dist(gen) for _ in range(V)]
    joint = emitted_joint_k2(p1, p2, q1, q2)
    expected = p1[:, None] * torch.stack(p2)
    assert torch.allclose(joint, expected, atol=1e-12)


def test_truncated_and_greedy_targets_are_reproduced_exactly():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=gen, dtype=torch.float64) * 2
    q1, q2 = rand_dist(gen), [rand_dist(gen) for _ in range(V)]
    for params in [SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.0, top_k=2),
                   SamplingParams(temperature=0)]:
        p = target_probs(logits, params).double()
        assert (p == 0).any()  # truncation removed tokens
        joint = emitted_joint_k2(p, [p] * V, q1, q2)
        assert torch.allclose(joint, p[:, None] * p[None], atol=1e-12)
    # greedy drafts against a greedy target: accepted exactly when the draft is the argmax
    p = target_probs(logits, SamplingParams(temperature=0)).double()
    assert accept_prob(p[logits.argmax()], torch.tensor(1.0)) == 1
    assert accept_prob(p[(logits.argmax() + 1) % V], torch.tensor(1.0)) == 0


def test_target_probs_top_p_keeps_the_crossing_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = target_probs(probs.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]))
    p = target_probs(probs.log(), SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.allclose(p, torch.tensor([1.0, 0, 0, 0]))


def test_rejection_sample_matches_target_by_sampling():
    """The batched sampler (not just its pieces): first emitted token and accept counts over 200k rows."""
    gen = torch.Generator().manual_seed(1)
    k, N = 3, 200_000
    p = torch.stack([rand_dist(gen) for _ in range(k + 1)]).float()  # [k+1, V], independent of the prefix
    q = torch.stack([rand_dist(gen) for _ in range(k)]).float()
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).T  # [N, k]
    u_accept, u_sample = torch.rand(N, k, generator=gen), torch.rand(N, k + 1, generator=gen)
    accepted, nxt = rejection_sample(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, u_accept, u_sample)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    counts = torch.bincount(first, minlength=V).double()
    assert chisquare(counts, p[0].double() * N).pvalue > 1e-3
    # P(accept draft 1) = sum_x min(p, q)
    rate = (accepted > 0).double().mean()
    assert abs(rate - torch.minimum(p[0], q[0]).sum()) < 4e-3
    # a wrong rule (always accept) fails the same test
    wrong = torch.bincount(drafts[:, 0], minlength=V).double()
    assert chisquare(wrong, p[0].double() * N).pvalue < 1e-6


def test_token_logprobs_use_temperature_and_ignore_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    lp = token_logprobs(logits, torch.tensor([1]), SamplingParams(temperature=0.5, top_k=1))
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1)[:, 1])
    lp = token_logprobs(logits, torch.tensor([0]), SamplingParams(temperature=0))
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[:, 0])


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": -1}, {"max_new_tokens": 0},
])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


ROW_PARAMS = [SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=0), SamplingParams(temperature=1.3), SamplingParams(top_p=0.5, top_k=3)]


@pytest.mark.parametrize("rows", [ROW_PARAMS, ROW_PARAMS[3:4] * 2, ROW_PARAMS[2:3] * 2], ids=["mixed", "plain", "greedy"])
def test_row_params_equal_the_scalar_params_row_by_row(rows):
    """Each row of a batch with per-row parameters gets exactly what its own SamplingParams give, whatever the
    other rows ask for (the flags only skip work); logits [B, n, V] broadcast the row's parameters over n."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), 3, 7, generator=gen) * 2
    params = RowParams.of(rows)
    probs, logps = target_probs(logits, params), token_logprobs(logits, torch.zeros(len(rows), 3).long(), params)
    for b, p in enumerate(rows):
        torch.testing.assert_close(probs[b], target_probs(logits[b], p), atol=1e-7, rtol=0)
        torch.testing.assert_close(logps[b], token_logprobs(logits[b], torch.zeros(3).long(), p))
    alone = [target_probs(logits[b:b + 1], RowParams.of([p]))[0] for b, p in enumerate(rows)]
    assert all(torch.equal(probs[b], a) for b, a in enumerate(alone))  # bitwise: the batch does not matter


def test_mix64_is_splitmix64():
    """The tensor mix equals the reference splitmix64 output function, including its known first outputs."""
    def reference(state):  # Vigna's splitmix64.c: the output for state (after the increment)
        z = state & (2 ** 64 - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
        return z ^ (z >> 31)

    states = [0x9E3779B97F4A7C15 * i for i in range(1, 200)] + [2 ** 64 - 1, 2 ** 63, 12345]
    signed = [(x & (2 ** 64 - 1)) - (2 ** 64 if x & (2 ** 63) else 0) for x in states]
    mixed = mix64(torch.tensor(signed)).tolist()
    assert [m % 2 ** 64 for m in mixed] == [reference(x) for x in states]
    assert reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64 seeded with 0, first output


def test_uniforms_are_uniform_and_keyed_by_stream_position_and_draw():
    keys = torch.tensor([request_key(s) for s in range(64)])
    pos = torch.arange(500).expand(64, -1)
    u = uniforms(keys, pos, SAMPLE)
    assert u.dtype == torch.float64 and u.shape == (64, 500) and 0 <= float(u.min()) and float(u.max()) < 1
    assert kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(u, uniforms(keys, pos, SAMPLE))  # a function of its arguments, no hidden state
    assert torch.equal(u[5:6, 7:9], uniforms(keys[5:6], pos[5:6, 7:9], SAMPLE))  # per row, per position
    draws = torch.stack([uniforms(keys, pos, d).flatten() for d in (DRAFT, ACCEPT, SAMPLE)])
    assert abs(float(torch.corrcoef(draws)[0, 1:].abs().max())) < 0.01  # draws at one position: independent
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.01
    assert request_key(3) == request_key(3, 0) != request_key(3, 1) != request_key(4, 1)
    assert request_key(None) != request_key(None)


def test_sample_is_the_inverse_cdf_and_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(7, -1)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1 - 2 ** -52, 0.5, 1.0], dtype=torch.float64)
    assert sample(probs, u).tolist() == [1, 1, 3, 3, 3, 3, 3]
    # A grid of uniforms reproduces a distribution exactly, mass for mass.
    gen = torch.Generator().manual_seed(2)
    p = rand_dist(gen, zeros=2).float()
    N = 100_000
    drawn = sample(p.expand(N, -1), (torch.arange(N, dtype=torch.float64) + 0.5) / N)
    torch.testing.assert_close(torch.bincount(drawn, minlength=V).double() / N, p.double(), atol=2e-5, rtol=0)
    assert sample(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([0.999999])).item() == 1  # greedy one-hot
