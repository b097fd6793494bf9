"""Sampling parameters, the target distribution they define, and the exact speculative rejection rule.

Everything here is a pure tensor function so tests can call it on hand-made distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from respec.errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are sampled from the target; the same values drive plain and speculative decoding."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = no top-k truncation
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos ids
    seed: int | None = 0  # None = nondeterministic
    ignore_eos: bool = False  # keep generating past eos (benchmarks)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Returns the distribution [..., V] that `params` samples from: temperature, then top-k, then top-p.

    Greedy (temperature 0) is the one-hot of the argmax, so the rejection rule below needs no special case:
    a greedy draft is accepted exactly when it equals the target's argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p (the token that crosses
        # the threshold is kept), as vLLM and transformers do.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Returns log softmax(logits / temperature) at `tokens` (temperature 1 for greedy), untruncated by top-p/k.

    This is the quantity RL trainers (verl, OpenRLHF) recompute for the old-policy ratio, so the engine returns
    it from the verifying forward.
    """
    temperature = params.temperature if params.temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Returns one token id per row of probs [..., V], drawn with `generator`."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def accept_prob(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """Returns min(1, p(x)/q(x)), the probability of accepting a draft x drawn from q."""
    return (p_draft / q_draft.clamp_min(1e-30)).clamp(max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Returns norm(max(p - q, 0)) [..., V], the distribution sampled after a rejection.

    A rejection implies p(x) < q(x) for the drafted x, so p != q and the residual has mass; where it has
    none (p == q, or fp underflow) p itself is returned, which is never reached by a rejection.
    """
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 1e-12, r / mass.clamp_min(1e-30), p)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (accepted [B], next_token [B]) of the exact chain rejection rule.

    p: target probs [B, k+1, V] at the positions that verify drafts 1..k plus the bonus position.
    q: draft probs [B, k, V] that drafts [B, k] were sampled from.
    Draft i is accepted with probability min(1, p_i(x)/q_i(x)); the first rejection at i samples from
    norm(max(p_i - q_i, 0)); after k acceptances the bonus comes from p_k. Each emitted token is then
    distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023). Rows run in parallel; accepted counts
    the leading accepted drafts, and next_token is the correction or bonus token that follows them.
    """
    B, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    u = torch.rand(B, k, generator=generator, device=p.device)
    accept = u < accept_prob(p_draft, q_draft)  # [B, k]
    accepted = accept.long().cumprod(-1).sum(-1)  # [B] leading accepts
    # A zero row for q at the bonus position turns the residual max(p - q, 0) into p itself.
    q_full = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # [B, k+1, V]
    rows = torch.arange(B, device=p.device)
    return accepted, sample(residual(p[rows, accepted], q_full[rows, accepted]), generator)
