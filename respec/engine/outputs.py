"""The engine's configuration and result types: the speculative setting (`SpecConfig`), what a request returns
per step (`RequestOutput`) and per rollout (`SequenceOutput`, `GenerationResult`), the stats of one decode step,
and the protocol of whatever chooses k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from respec.errors import ConfigError

SPEC_MODES = ("off", "static", "adaptive", "replay")
K_LIMIT = 16  # the largest draft length any mode accepts


@dataclass(frozen=True)
class SpecConfig:
    """How many draft tokens each decode step verifies; the engine's setting, not the sampler's."""

    mode: str = "static"  # "off" (plain) | "static" (k every step) | "adaptive" (tuner) | "replay" (trace)
    k: int = 4  # static: draft tokens per step
    k_max: int = 8  # adaptive: the tuner picks k in 0..k_max per step (buffers and caches are sized by it)
    trace: tuple[int, ...] = ()  # replay: k of every decode step, e.g. GenerationResult.trace of a logged run

    def __post_init__(self) -> None:
        if self.mode not in SPEC_MODES:
            raise ConfigError(f"SpecConfig mode must be one of {', '.join(SPEC_MODES)}, got '{self.mode}'")
        if not isinstance(self.k, int) or not 1 <= self.k <= K_LIMIT:
            raise ConfigError(f"SpecConfig k must be an integer in [1, {K_LIMIT}], got {self.k}")
        if not isinstance(self.k_max, int) or not 1 <= self.k_max <= K_LIMIT:
            raise ConfigError(f"SpecConfig k_max must be an integer in [1, {K_LIMIT}], got {self.k_max}")
        object.__setattr__(self, "trace", tuple(self.trace))
        if any(not isinstance(k, int) or not 0 <= k <= K_LIMIT for k in self.trace):
            raise ConfigError(f"SpecConfig trace must hold integers in [0, {K_LIMIT}]")
        if self.mode == "replay" and not self.trace:
            raise ConfigError("SpecConfig mode 'replay' needs a trace (GenerationResult.trace of the run to replay)")

    @property
    def largest_k(self) -> int:
        """Returns the largest k this config can use in a step (what buffers are sized by)."""
        return {"off": 0, "static": self.k, "adaptive": self.k_max,
                "replay": max(self.trace, default=0)}[self.mode]


@dataclass
class SequenceOutput:
    """One generated sequence: the new tokens, the target's logprob of each, and why it ended."""

    tokens: list[int]
    logprobs: list[float]  # 0.0 at observation tokens (not sampled: never train on them)
    finish_reason: str  # "stop" (stop/eos token, included in tokens) | "length" (max_new_tokens or a full slot)
    # Per token: True where the target sampled it, False where an environment put it (`Engine.generate`'s env);
    # None means all True.
    generated: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.generated is None:
            self.generated = [True] * len(self.tokens)


@dataclass
class StepStats:
    """One decode step: live batch, chosen k (0 = plain), per-row accepted drafts, tokens out, seconds."""

    batch: int
    k: int
    accepted: list[int]  # per live row (in slot order), leading drafts accepted (all 0 when k = 0)
    emitted: int  # tokens produced by the step over all rows (before stop/budget truncation)
    seconds: float  # measured wall time of the step, one host sync and the booking of its tokens included (not the
    # prefill of new requests)
    predicted_seconds: float | None = None  # the chooser's prediction for this (batch, k), if it made one
    drafter_version: int | None = None  # the drafter that drafted (Engine.set_drafter's version)
    kept: list[int] | None = None  # per live row, the tokens it kept: accepted + 1, or fewer where its stop token
    # or budget ended it within the step (what followed is discarded); None = as accepted + 1


class KChooser(Protocol):
    """What adaptive mode asks for k before each step and tells about each step (see `respec.engine.tuner`)."""

    def choose(self, batch: int, k_max: int) -> tuple[int, float | None]:
        """Returns (k in 0..k_max, predicted seconds of the step or None)."""
        ...

    def observe(self, stats: StepStats) -> None:
        ...


@dataclass
class GenerationResult:
    """What `Engine.generate` returns: one sequence per prompt, the stats of every decode step, and the seconds
    spent prefilling prompts (between steps)."""

    sequences: list[SequenceOutput]
    stats: list[StepStats] = field(default_factory=list)
    prefill_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def num_generated(self) -> int:
        """Tokens the model sampled: num_tokens less an environment's observation tokens."""
        return sum(sum(s.generated) for s in self.sequences)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + sum(s.seconds for s in self.stats)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    @property
    def trace(self) -> tuple[int, ...]:
        """Returns the k of every decode step: `SpecConfig(mode="replay", trace=...)` reproduces this run."""
        return tuple(s.k for s in self.stats)

    @property
    def mean_emitted_per_step(self) -> float:
        """Returns tokens emitted per row per speculative verify step (accepted drafts + 1); 1.0 when no step
        speculated."""
        spec = [s for s in self.stats if s.k > 0]
        rows = sum(s.batch for s in spec)
        return sum(s.emitted for s in spec) / rows if rows else 1.0

    @property
    def mean_k(self) -> float:
        """Returns the mean chosen k over decode steps."""
        return sum(s.k for s in self.stats) / max(len(self.stats), 1)


@dataclass
class RequestOutput:
    """What one request has generated so far (vLLM's RequestOutput, for one sequence): returned by `Engine.step`
    for every request that advanced, with the tokens and logprobs since its prompt."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]  # the target's logprob of each token, as in SequenceOutput
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: str | None = None  # the stop string that ended it (vLLM's stop_reason; set by the server)
