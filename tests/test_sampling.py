"""The rejection rule on hand-made distributions: exact (analytic) and sampled; parameter validation."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from respec.engine.sampling import (
    SamplingParams,
    accept_prob,
    rejection_sample,
    residual,
    target_probs,
    token_logprobs,
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
