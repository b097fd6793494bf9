"""Sampling parameters, the target distribution they define, per-request random numbers, and the exact
speculative rejection rule.

Everything here is a pure tensor function so tests can call it on hand-made distributions. Randomness comes in
as uniforms: the engine draws them from each request's counter-based stream (`uniforms`), so a request's tokens
do not depend on the other requests that share its batch; tests may pass `torch.rand` values.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

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
    seed: int | None = 0  # keys the request's random stream; None = nondeterministic
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
        if self.seed is not None:
            if not isinstance(self.seed, numbers.Integral):
                raise SamplingError(f"seed must be an integer or None, got {self.seed!r}")
            object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RowParams:
    """The sampling parameters of a batch whose rows may belong to different requests: tensors [B], plus flags
    known on the host (no device sync) that let the common cases skip the sort and the one-hot. Each row's
    result does not depend on the flags: they only skip work that would not change it."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    any_greedy: bool
    all_greedy: bool
    truncate: bool  # some row has top_p < 1 or top_k > 0
    divisor: torch.Tensor = field(init=False)  # [B] what logits are divided by: the temperature, 1 for greedy

    def __post_init__(self) -> None:
        object.__setattr__(self, "divisor", torch.where(self.temperature > 0, self.temperature, 1.0))

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> RowParams:
        """Returns the row parameters of one SamplingParams per row."""
        return cls(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
                   **row_flags(params))


def row_flags(params: list[SamplingParams]) -> dict[str, bool]:
    """Returns RowParams' host-side flags for the parameters of a batch's rows."""
    return {"any_greedy": any(p.greedy for p in params), "all_greedy": all(p.greedy for p in params),
            "truncate": any(p.top_p < 1 or p.top_k > 0 for p in params)}


def target_probs(logits: torch.Tensor, params: SamplingParams | RowParams) -> torch.Tensor:
    """Returns the distribution [..., V] that `params` samples from: temperature, then top-k, then top-p.

    Greedy (temperature 0) is the one-hot of the argmax, so the rejection rule below needs no special case:
    a greedy draft is accepted exactly when it equals the target's argmax. With RowParams, logits are [B, ..., V]
    and row b follows row b's parameters, exactly as SamplingParams would.
    """
    if isinstance(params, RowParams):
        return _row_probs(logits, params)
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


def _row_probs(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Returns target_probs for per-row parameters: logits [B, ..., V] -> probs [B, ..., V]."""
    logits = logits.float()
    onehot = None
    if params.any_greedy:
        onehot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        if params.all_greedy:
            return onehot
    shape = (-1,) + (1,) * (logits.dim() - 1)  # a [B] tensor broadcast over [B, ..., V]
    logits = logits / params.divisor.view(shape)
    if not params.truncate:
        probs = torch.softmax(logits, dim=-1)
    else:
        top_k, top_p = params.top_k.view(shape), params.top_p.view(shape)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        kth = sorted_logits.gather(-1, (top_k - 1).clamp(min=0).expand(*logits.shape[:-1], 1))
        logits = logits.masked_fill((top_k > 0) & (logits < kth), -math.inf)
        probs = torch.softmax(logits, dim=-1)
        # Softmax keeps the order of the logits (masked ones are last), so `order` sorts the probabilities too.
        sorted_p = probs.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill((before >= top_p) & (top_p < 1), 0.0)
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = torch.where(top_p < 1, kept / kept.sum(-1, keepdim=True), probs)
    if onehot is not None:
        probs = torch.where(params.temperature.view(shape) == 0, onehot, probs)
    return probs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams | RowParams) -> torch.Tensor:
    """Returns log softmax(logits / temperature) at `tokens` (temperature 1 for greedy), untruncated by top-p/k.

    This is the quantity RL trainers (verl, OpenRLHF) recompute for the old-policy ratio, so the engine returns
    it from the verifying forward.
    """
    if isinstance(params, RowParams):
        temperature = params.divisor.view((-1,) + (1,) * (logits.dim() - 1))
    else:
        temperature = params.temperature if params.temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


# -- per-request random numbers ----------------------------------------------------------------------------------
# A request's uniforms form a counter-based stream: the uniform of draw d at sequence position t is a hash of
# (request key, t, d), computed with integer ops on tensors (torch has no per-row generator). A request's tokens
# then depend on its seed, its prompt and the sequence of k only: not on the requests beside it in the batch,
# when they arrived, or which slot it holds. The hash is splitmix64 (Steele et al. 2014), a bijective 64-bit mix
# that passes BigCrush on consecutive counters; torch's int64 arithmetic wraps, as the mix needs.
DRAFT, ACCEPT, SAMPLE = 0, 1, 2  # the draws at one position: the drafted token, its acceptance test, the
_DRAWS = 3  # target's token (plain step, correction or bonus)
_MASK64 = (1 << 64) - 1


def _int64(c: int) -> int:
    """Returns the int64 with the bits of the unsigned 64-bit integer c."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Returns the logical right shift of int64 x by s (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """Returns splitmix64's finaliser of int64 x, elementwise."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def request_key(seed: int | None, index: int = 0) -> int:
    """Returns the int64 key of a random stream: stream `index` of `seed` (None: fresh OS entropy). A request
    added with seed s uses stream 0; `Engine.generate` gives its row i stream i of the call's seed."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    x = mix64(torch.tensor([_int64(seed + 0x9E3779B97F4A7C15)], dtype=torch.long))
    return int(mix64(x + _int64(index * 0x9E3779B97F4A7C15) + _GOLDEN)[0])


def uniforms(keys: torch.Tensor, positions: torch.Tensor, draw: int | torch.Tensor) -> torch.Tensor:
    """Returns uniforms in [0, 1) (float64, 52 random bits) shaped like positions [B, ...]: draw `draw` at each
    sequence position of row b's stream keys[b]. `draw` may be a tensor broadcast against positions (several
    draws in one hash: positions [B, n, 1] with draws [3] give [B, n, 3])."""
    keys = keys.view((-1,) + (1,) * (positions.dim() - 1))
    counter = positions.long() * _DRAWS + (draw + 1)
    return _shr(mix64(keys + counter * _GOLDEN), 12).double() * 2.0 ** -52


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Returns one token id per row of probs [..., V] for uniforms u [...] in [0, 1): the inverse CDF, i.e. the
    first token whose cumulative mass exceeds u times the row's total (a zero-probability token never is).

    With u <= 1 - 2^-52 and a total near 1, u * total stays below the total in float64, so some token qualifies
    (u is clamped there: a float32 uniform may be stored as 1.0); the index clamp only guards against the impossible.
    """
    cdf = probs.double().cumsum(-1)  # [..., V]
    x = (u.double().clamp(max=1 - 2.0 ** -52) * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


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


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                     u_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (accepted [B], next_token [B]) of the exact chain rejection rule.

    p: target probs [B, k+1, V] at the positions that verify drafts 1..k plus the bonus position.
    q: draft probs [B, k, V] that drafts [B, k] were sampled from.
    u_accept [B, k]: the uniform of each draft's acceptance test; u_sample [B, k+1]: the uniform that draws the
    token emitted at each position if the chain stops there. Both must be independent of the drafts.
    Draft i is accepted with probability min(1, p_i(x)/q_i(x)); the first rejection at i samples from
    norm(max(p_i - q_i, 0)); after k acceptances the bonus comes from p_k. Each emitted token is then
    distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023). Rows run in parallel; accepted counts
    the leading accepted drafts, and next_token is the correction or bonus token that follows them.
    """
    B, k = drafts.shape
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    accept = u_accept < accept_prob(p_draft, q_draft)  # [B, k]
    accepted = accept.long().cumprod(-1).sum(-1)  # [B] leading accepts
    # A zero row for q at the bonus position turns the residual max(p - q, 0) into p itself.
    q_full = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # [B, k+1, V]
    rows = torch.arange(B, device=p.device)
    u = u_sample.gather(1, accepted[:, None]).squeeze(1)  # [B]
    return accepted, sample(residual(p[rows, accepted], q_full[rows, accepted]), u)
