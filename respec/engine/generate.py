"""Batched generation, plain or speculative, with one API: the single source of rollout tokens and logprobs.

The decode loop keeps every live row in one batch and runs one `step(k)` at a time, k chosen per step:
  k >= 1 (speculative):
    1. the drafter catches up on the (target feature, next token) pairs it has not seen (its backlog), then
       chains k - 1 more drafts on its own hidden states;
    2. the target verifies [last token, d_1 .. d_k] in one forward over k + 1 positions per row;
    3. `rejection_sample` keeps a prefix of each row's drafts plus one correction/bonus token (exact);
    4. each row's target cache is rolled back past its rejected drafts, the drafter's past its chained guesses;
  k = 0 (plain): one target forward over the last token; its aux features and the sampled token join the
    drafter's backlog, so speculation can switch on at any later step without a re-prefill;
  then rows that hit a stop token or their budget leave the batch (compaction).
Verify-forward features and emitted tokens become the next catch-up's pairs, so the drafter always conditions
on true target features (EAGLE-3) at no extra target compute.

Who picks k: `SpecConfig.mode` "off" (always 0), "static" (always k), "replay" (a logged trace), or
"adaptive" (the engine's `Tuner`, or any chooser passed to `generate`, asked before each step and told each
step's stats). Every mode samples the target's distribution exactly; the random draws depend only on the
prompts, the sampling params and the sequence of k, so replaying a trace reproduces a rollout token for token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from respec.engine.checkpoint import check_finite, check_tensors
from respec.engine.drafter import Eagle3Drafter, check_fits
from respec.engine.kvcache import KVCache, fill_holes, keep_rows
from respec.engine.model import Transformer, fused_state
from respec.engine.sampling import SamplingParams, rejection_sample, sample, target_probs, token_logprobs
from respec.errors import CheckpointError, ConfigError, DrafterMismatchError, PromptError

SPEC_MODES = ("off", "static", "adaptive", "replay")
K_LIMIT = 16  # the largest draft length any mode accepts
BACKLOG_FLUSH = 32  # during plain (k = 0) steps the drafter consumes its backlog once it is this wide


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
    logprobs: list[float]
    finish_reason: str  # "stop" (stop/eos token, included in tokens) | "length" (max_new_tokens)


@dataclass
class StepStats:
    """One decode step: live batch, chosen k (0 = plain), per-row accepted drafts, tokens out, seconds."""

    batch: int
    k: int
    accepted: list[int]  # per live row, leading drafts accepted (all 0 when k = 0)
    emitted: int  # tokens produced by the step over all rows (before stop/budget truncation)
    seconds: float  # measured wall time of the step, one host sync included
    predicted_seconds: float | None = None  # the chooser's prediction for this (batch, k), if it made one
    drafter_version: int | None = None  # the drafter that drafted (Engine.set_drafter's version)


class KChooser(Protocol):
    """What adaptive mode asks for k before each step and tells about each step (see `respec.engine.tuner`)."""

    def choose(self, batch: int, k_max: int) -> tuple[int, float | None]:
        """Returns (k in 0..k_max, predicted seconds of the step or None)."""
        ...

    def observe(self, stats: StepStats) -> None:
        ...


@dataclass
class GenerationResult:
    sequences: list[SequenceOutput]
    stats: list[StepStats] = field(default_factory=list)
    prefill_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

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


class Engine:
    """Generates from a target model, optionally accelerated by an EAGLE-3 drafter; the output distribution
    is the target's in every mode.

    `set_drafter` and `load_weights` may be called from another thread while `generate` runs: they wait for
    the current decode step to end and take effect from the next one.
    """

    def __init__(self, target: Transformer, drafter: Eagle3Drafter | None = None, tuner: KChooser | None = None):
        self.target = target.eval()
        param = next(target.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.drafter: Eagle3Drafter | None = None
        self.drafter_version: int | None = None
        self.drafter_epoch = 0  # bumped by every swap; a running generate rebuilds its drafter cache on change
        self.tuner = tuner  # adaptive mode's chooser; built (profiled) on first use when None
        self._step_lock = threading.Lock()
        if drafter is not None:
            self.set_drafter(drafter, version=0)

    def set_drafter(self, drafter: Eagle3Drafter, version: int | None = None,
                    keep_evidence: float | None = None) -> None:
        """Swaps in `drafter` (validated against the target) from the next decode step on.

        A rollout in progress keeps its tokens and target cache; at its next step the new drafter catches up on
        the whole sequence so far (one drafter forward over the recorded target features, like a prefill), so
        it drafts with full context. Exactness is unaffected (any drafter is exact).
        `keep_evidence` is the share of the tuner's acceptance evidence kept (None = its swap_decay; 1.0 for a
        successor known to be at least as good, as the online learner's guarded versions are).
        """
        check_fits(drafter.config, self.target.config)
        if drafter.embed_tokens is not self.target.embed_tokens:
            drafter.bind_target(self.target)
        w = drafter.fc.weight
        if w.device != self.device or w.dtype != self.dtype:
            raise DrafterMismatchError(f"drafter is on {w.device}/{w.dtype}, the target on {self.device}/"
                                       f"{self.dtype}: move it with drafter.to(device, dtype)")
        if self.drafter is not None and tuple(drafter.aux_layer_ids) != tuple(self.drafter.aux_layer_ids):
            raise DrafterMismatchError(
                f"the new drafter reads target layers {list(drafter.aux_layer_ids)}, the current one "
                f"{list(self.drafter.aux_layer_ids)}: a swapped-in drafter must read the same layers")
        with self._step_lock:
            swap = self.drafter is not None
            self.drafter = drafter.eval()
            self.drafter_version = version
            self.drafter_epoch += 1
            if swap and self.tuner is not None and hasattr(self.tuner, "on_drafter_change"):
                self.tuner.on_drafter_change(version, keep_evidence)  # the first is what the tuner starts with

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copies new target weights in place (e.g. the trainer's actor after an update), from the next step on.

        `state` is a state dict of a `Transformer` of the same config, or HF-named tensors (`q_proj`, an optional
        `model.` prefix). A missing or misshaped tensor, or a NaN/Inf, raises CheckpointError before anything is
        copied. Rows in flight keep their KV cache, so in RL call this between rollouts.
        """
        state = {k.removeprefix("model."): v for k, v in state.items()}
        state = fused_state(self.target, state)
        expected = self.target.state_dict()
        if self.target.config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            state.pop("lm_head.weight", None)
        check_tensors(expected, state, "load_weights", "state dict")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise CheckpointError(f"load_weights: tensors the target does not have, e.g. {unexpected[:3]}")
        check_finite(state, "load_weights")
        with self._step_lock, torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        cfg = self.target.config
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise PromptError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise PromptError(f"prompt {i} holds token ids outside the vocabulary [0, {cfg.vocab_size})")
            if len(p) + params.max_new_tokens > cfg.max_position_embeddings:
                raise PromptError(
                    f"prompt {i} ({len(p)} tokens) + max_new_tokens {params.max_new_tokens} exceeds the model "
                    f"context of {cfg.max_position_embeddings} tokens")

    def default_tuner(self, k_max: int) -> KChooser:
        """Returns the engine's tuner, built for drafts up to k_max (profiling or loading cached costs) on first
        use. A tuner given to the engine is kept as it is; it never picks more than its own k_max."""
        from respec.engine.tuner import Tuner

        if self.tuner is None:
            self.tuner = Tuner.for_engine(self, k_max)
            self.tuner.drafter_version = self.drafter_version
        return self.tuner

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None, chooser: KChooser | None = None,
                 on_step: Callable[[StepStats], None] | None = None) -> GenerationResult:
        """Returns one SequenceOutput per prompt (same order) and per-step stats.

        In adaptive mode `chooser` (default: the engine's tuner) picks each step's k; `on_step` is called after
        every decode step (progress reporting).
        """
        params = params or SamplingParams()
        if spec is None:
            spec = SpecConfig(mode="static") if self.drafter is not None else SpecConfig(mode="off")
        if spec.mode != "off" and self.drafter is None:
            raise ConfigError(f"speculative decoding (mode '{spec.mode}') needs a drafter: pass one to Engine or "
                              "use SpecConfig(mode='off')")
        self._check_prompts(prompts, params)
        if spec.mode == "adaptive" and chooser is None:
            chooser = self.default_tuner(spec.k_max)
        return _Run(self, prompts, params, spec, chooser, on_step).run()


class _Run:
    """The state of one generate call: caches, live rows, the drafter's backlog, output buffers."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, spec: SpecConfig,
                 chooser: KChooser | None, on_step: Callable[[StepStats], None] | None):
        self.engine, self.params, self.spec, self.chooser, self.on_step = engine, params, spec, chooser, on_step
        self.k_max = spec.largest_k
        self.target = engine.target
        self.speculative = spec.mode != "off"
        dev = engine.device
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        B = len(prompts)
        self.prompt_lens = torch.tensor([len(p) for p in prompts], device=dev)
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        # Target: the accepted prefix plus k_max + 1 verified positions. Drafter: its consumed prefix plus a
        # backlog (prompt, or up to BACKLOG_FLUSH plain steps, or k_max + 1 verified pairs) and k_max - 1 chained.
        self.capacity = max_len + self.k_max + 1
        self.dcapacity = max_len + BACKLOG_FLUSH + 2 * self.k_max + 2
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.target.config.eos_ids))
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=dev)
        width = params.max_new_tokens + self.k_max + 1
        self.out_tokens = torch.zeros(B, width, dtype=torch.long, device=dev)  # [B0, width] by original row
        self.out_logprobs = torch.zeros(B, width, dtype=torch.float32, device=dev)
        self.finish = ["length"] * B
        self.rows = torch.arange(B, device=dev)  # live row -> original row
        self.gen_len = torch.zeros(B, dtype=torch.long, device=dev)  # tokens emitted so far per live row
        self.gen_len_final = torch.zeros(B, dtype=torch.long, device=dev)  # by original row, set as rows finish
        self.prompts = prompts
        self.stats: list[StepStats] = []
        with engine._step_lock:  # a swap from another thread between the two reads would mislabel the drafter
            self.drafter = engine.drafter if self.speculative else None
            self.drafter_epoch = engine.drafter_epoch
        self.aux_layers = tuple(self.drafter.aux_layer_ids) if self.drafter is not None else ()

    def run(self) -> GenerationResult:
        t0 = time.perf_counter()
        live = self.prefill()
        prefill_s = time.perf_counter() - t0
        while live:
            t0 = time.perf_counter()
            batch = len(self.rows)
            k, predicted = self.choose(batch)
            with self.engine._step_lock:
                self.sync_drafter()
                accepted_host, live = self.step(k)
                version = self.engine.drafter_version if k else None  # read before a waiting swap can land
            stats = StepStats(batch, k, accepted_host, sum(accepted_host) + batch, time.perf_counter() - t0,
                              predicted, version)
            self.stats.append(stats)
            if self.chooser is not None:
                self.chooser.observe(stats)
            if self.on_step is not None:
                self.on_step(stats)
        lens = self.gen_len_final.tolist()
        toks, lps = self.out_tokens.tolist(), self.out_logprobs.tolist()
        seqs = [SequenceOutput(toks[b][:n], lps[b][:n], self.finish[b]) for b, n in enumerate(lens)]
        return GenerationResult(seqs, self.stats, prefill_s)

    def choose(self, batch: int) -> tuple[int, float | None]:
        """Returns (k for the next step, predicted seconds or None) under the spec mode."""
        mode = self.spec.mode
        if mode == "off":
            return 0, None
        if mode == "static":
            return self.spec.k, None
        if mode == "replay":
            step = len(self.stats)
            if step >= len(self.spec.trace):
                raise ConfigError(f"replay trace has {len(self.spec.trace)} steps but this rollout needs more: "
                                  "replay with the prompts, sampling params and seed of the logged run")
            return self.spec.trace[step], None
        k, predicted = self.chooser.choose(batch, self.k_max)
        if not 0 <= k <= self.k_max:
            raise ConfigError(f"the k chooser returned k={k}, outside 0..k_max={self.k_max}")
        return k, predicted

    def sync_drafter(self) -> None:
        """Adopts a drafter swapped in by Engine.set_drafter since the last step: a fresh drafter cache, and the
        whole history becomes the backlog, so the new drafter's first catch-up reads every position, as a
        prefill. Target features do not depend on the drafter, so they stay valid."""
        if self.drafter is None or self.engine.drafter_epoch == self.drafter_epoch:
            return
        self.drafter, self.drafter_epoch = self.engine.drafter, self.engine.drafter_epoch
        self.pend_width += self.dcache.extent  # host-side bound of max(consumed + pend_len)
        self.pend_len = self.dcache.lengths + self.pend_len
        self.dcache = self.drafter.new_cache(len(self.rows), self.dcapacity)

    def append_history(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Writes (next token [B, n], target feature [B, n, 3H]) pairs at each row's first free history position,
        consumed + pending (entries past a row's valid ones are padding, overwritten later, as in the drafter
        cache, which has the same capacity); the caller grows the backlog by the valid ones."""
        idx = (self.dcache.lengths + self.pend_len)[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        self.hist_tok.scatter_(1, idx, tokens)
        self.hist_feat.scatter_(1, idx[..., None].expand(-1, -1, features.shape[-1]), features)

    def step(self, k: int) -> tuple[list[int], bool]:
        """Runs one decode step with k drafts (0 = plain); returns (accepted per live row, whether any row is live)."""
        if k == 0:
            emitted, logprobs, count, accepted = self.plain_step()
        else:
            emitted, logprobs, count, accepted = self.spec_step(k)
        return self.commit(emitted, logprobs, count, accepted)

    def prefill(self) -> bool:
        """Runs the prompts through the target (right-padded, one forward), samples each row's first token."""
        dev, B = self.engine.device, len(self.prompts)
        L = int(self.prompt_lens.max())
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, p in enumerate(self.prompts):  # once per call, not per token
            ids[b, : len(p)] = torch.tensor(p, device=dev)
        self.cache = KVCache.for_model(self.target.config, B, self.capacity, self.engine.dtype, dev)
        hidden, aux = self.target(ids, self.cache, self.aux_layers)  # [B, L, H], [B, L, 3H]
        self.cache.set_lengths(self.prompt_lens, extent=L)
        last = self.prompt_lens - 1
        rows = torch.arange(B, device=dev)
        logits = self.target.lm_head(hidden[rows, last])  # [B, V]
        first = self.sample(logits)  # [B]
        self.last = first
        if self.drafter is not None:
            # The history holds every (target feature at t, token t+1) pair by drafter position t. Row b's first
            # dcache.lengths[b] pairs are consumed; the next pend_len[b] are the backlog, the next catch-up's
            # input. A drafter swapped in mid-run catches up on all of them (sync_drafter).
            self.dcache = self.drafter.new_cache(B, self.dcapacity)
            self.hist_tok = torch.zeros(B, self.dcapacity, dtype=torch.long, device=dev)  # [B, C]
            self.hist_feat = aux.new_zeros(B, self.dcapacity, aux.shape[-1])  # [B, C, 3H]
            # The prompt shifted left, with the sampled first token at the end of each row.
            self.hist_tok[:, :L] = ids.roll(-1, dims=1).scatter(1, last[:, None], first[:, None])
            self.hist_feat[:, :L] = aux
            self.pend_len = self.prompt_lens.clone()  # [B] backlog entries per row
            self.pend_width = L  # host-side bound of max(pend_len)
        emitted = first[:, None]
        logprobs = token_logprobs(logits, first, self.params)[:, None]
        _, live = self.commit(emitted, logprobs, torch.ones(B, dtype=torch.long, device=dev), None)
        return live

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns one token per row of logits [B, V] under the sampling params."""
        if self.params.greedy:
            return logits.argmax(-1)
        return sample(target_probs(logits, self.params), self.gen)

    def plain_step(self):
        hidden, aux = self.target(self.last[:, None], self.cache, self.aux_layers)  # [B, 1, H], [B, 1, 3H]
        logits = self.target.lm_head(hidden[:, 0])  # [B, V]
        token = self.sample(logits)
        self.last = token
        if self.drafter is not None:
            self.push_backlog(token, aux[:, 0])
        ones = torch.ones_like(token)
        return token[:, None], token_logprobs(logits, token, self.params)[:, None], ones, None

    def push_backlog(self, token: torch.Tensor, feature: torch.Tensor) -> None:
        """Appends one (feature [B, 3H], next token [B]) pair per row to the drafter's backlog, after letting
        the drafter consume a backlog that has grown BACKLOG_FLUSH wide (a bounded catch-up, amortised cost)."""
        if self.pend_width >= BACKLOG_FLUSH:
            self.catch_up()
        self.append_history(token[:, None], feature[:, None])
        self.pend_len = self.pend_len + 1
        self.pend_width += 1

    def catch_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the drafter over its backlog and empties it; returns (hidden [B, 1, H], draft logits [B, Vd]) at
        each row's last backlog entry: the start of the next chain of drafts."""
        drafter, B = self.drafter, len(self.rows)
        start = self.dcache.lengths
        idx = start[:, None] + torch.arange(self.pend_width, device=start.device)  # [B, P] the backlog's positions
        tokens = self.hist_tok.gather(1, idx)  # [B, P]
        features = self.hist_feat.gather(1, idx[..., None].expand(-1, -1, self.hist_feat.shape[-1]))  # [B, P, 3H]
        hidden, dlogits = drafter(tokens, features, self.dcache)  # [B, P, H], [B, P, Vd]
        self.dcache.set_lengths(start + self.pend_len)  # rows with a shorter backlog drop their padding
        rows = torch.arange(B, device=self.engine.device)
        at = self.pend_len - 1
        out = hidden[rows, at][:, None], dlogits[rows, at]
        self.pend_len = torch.zeros_like(self.pend_len)
        self.pend_width = 0
        return out

    def draft(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns k chained drafts [B, k] (target ids) and the draft distributions [B, k, V] they came from."""
        drafter = self.drafter
        h, logits = self.catch_up()  # [B, 1, H], [B, Vd]
        consumed = self.dcache.lengths
        drafts, qs = [], []
        for i in range(k):
            q_draft = target_probs(logits, self.params)  # [B, Vd]
            token = drafter.draft_to_target(sample(q_draft, self.gen))  # [B]
            drafts.append(token)
            qs.append(drafter.expand_probs(q_draft))  # [B, V]
            if i + 1 < k:
                h, dl = drafter(token[:, None], h, self.dcache)  # chain on the drafter's own hidden state
                logits = dl[:, 0]
        # Forget the chained entries: the next catch-up re-feeds these positions with the target's true features.
        self.dcache.set_lengths(consumed)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def spec_step(self, k: int):
        drafts, q = self.draft(k)  # [B, k], [B, k, V]
        n = self.cache.lengths
        tokens = torch.cat([self.last[:, None], drafts], 1)  # [B, k+1]
        hidden, aux = self.target(tokens, self.cache, self.aux_layers)  # [B, k+1, H], [B, k+1, 3H]
        logits = self.target.lm_head(hidden)  # [B, k+1, V]
        accepted, nxt = rejection_sample(target_probs(logits, self.params), q, drafts, self.gen)
        emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # [B, k+1]
        # Keep the last token and the accepted drafts in the target cache; the rejected ones roll back.
        self.cache.set_lengths(n + 1 + accepted)
        self.append_history(emitted, aux)  # the backlog was consumed by draft()'s catch-up
        self.pend_len, self.pend_width = accepted + 1, k + 1
        self.last = nxt
        return emitted, token_logprobs(logits, emitted, self.params), accepted + 1, accepted

    def commit(self, emitted: torch.Tensor, logprobs: torch.Tensor, count: torch.Tensor,
               accepted: torch.Tensor | None) -> tuple[list[int], bool]:
        """Writes emitted tokens [B, n] (first count[b] valid) to the outputs, applies stop tokens and budgets,
        drops finished rows. Returns (accepted per row, whether any row is live); one host sync."""
        n = emitted.shape[1]
        j = torch.arange(n, device=emitted.device)
        valid = j[None] < count[:, None]
        is_stop = torch.isin(emitted, self.stop_ids) & valid
        has_stop = is_stop.any(1)
        # Tokens after a stop token are discarded; so are tokens beyond max_new_tokens.
        first_stop = torch.where(has_stop, is_stop.long().argmax(1) + 1, count)
        budget = self.params.max_new_tokens - self.gen_len
        count = torch.minimum(first_stop, budget)
        pos = self.gen_len[:, None] + j[None]  # [B, n]
        self.out_tokens[self.rows[:, None], pos] = emitted
        self.out_logprobs[self.rows[:, None], pos] = logprobs.float()
        self.gen_len = self.gen_len + count
        stopped = has_stop & (first_stop <= budget)
        done = stopped | (self.gen_len >= self.params.max_new_tokens)
        acc = accepted if accepted is not None else torch.zeros_like(count)
        # Extents over the rows that stay (a finished row may hold positions past the live rows' budget).
        extents = [self.cache.lengths.masked_fill(done, 0).max()[None]]
        if self.drafter is not None:
            extents.append(self.dcache.lengths.masked_fill(done, 0).max()[None])
        host = torch.cat([acc, done.long(), stopped.long(), *extents]).tolist()
        B = len(self.rows)
        acc_host, done_host, stopped_host = host[:B], host[B:2 * B], host[2 * B:3 * B]
        # Exact extents keep attention over [0, max live length) only.
        self.cache.shrink_extent(host[3 * B])
        if self.drafter is not None:
            self.dcache.shrink_extent(host[3 * B + 1])
        if not any(done_host):
            return acc_host, True
        orig = self.rows.tolist()
        for i in range(B):  # only over rows that finished this step: bookkeeping, not the hot path
            if done_host[i]:
                self.finish[orig[i]] = "stop" if stopped_host[i] else "length"
        keep = fill_holes([bool(d) for d in done_host])
        self.gen_len_final[self.rows] = self.gen_len
        if keep:
            self._keep(keep)
        return acc_host, len(keep) > 0

    def _keep(self, keep: list[int]) -> None:
        """Compacts every per-row tensor and cache to the rows in `keep` (in place for the large ones)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self.rows, self.gen_len, self.last = self.rows[index], self.gen_len[index], self.last[index]
        self.cache.keep(keep)
        if self.drafter is not None:
            self.dcache.keep(keep)
            n = len(keep)
            for buf in (self.hist_tok, self.hist_feat):
                keep_rows(buf, keep, dim=0)
            self.hist_tok, self.hist_feat = self.hist_tok[:n], self.hist_feat[:n]
            self.pend_len = self.pend_len[index]
