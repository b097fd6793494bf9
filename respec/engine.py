"""Batched generation, plain or speculative, with one API: the single source of rollout tokens and logprobs.

The decode loop keeps every live row in one batch. Per step (speculative):
  1. the drafter catches up on the pairs (target feature, next token) it has not seen, then chains k drafts;
  2. the target verifies [last token, d_1 .. d_k] in one forward over k+1 positions per row;
  3. `rejection_sample` keeps a prefix of each row's drafts plus one correction/bonus token (exact);
  4. each row's target cache is rolled back past its rejected drafts, the drafter's past its chained guesses;
  5. rows that hit a stop token or their budget leave the batch.
Step 2's aux features and the emitted tokens become step 1's catch-up pairs, so the drafter always conditions
on true target features (EAGLE-3), at no extra target compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from respec.errors import ConfigError, DrafterMismatchError, PromptError
from respec.model import KVCache, Transformer
from respec.sampling import SamplingParams, SpecConfig, rejection_sample, sample, target_probs, token_logprobs


@dataclass
class SequenceOutput:
    """One generated sequence: the new tokens, the target's logprob of each, and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (stop/eos token, included in tokens) | "length" (max_new_tokens)


@dataclass
class StepStats:
    """One decode step: live batch, draft length (0 = plain), per-row accepted drafts, tokens out, seconds."""

    batch: int
    k: int
    accepted: list[int]
    emitted: int
    seconds: float


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
    def mean_emitted_per_step(self) -> float:
        """Returns tokens emitted per row per verify step (accepted drafts + 1); 1.0 for plain decoding."""
        rows = sum(s.batch for s in self.stats)
        return sum(s.emitted for s in self.stats) / max(rows, 1)


class Engine:
    """Generates from a target model, optionally accelerated by an EAGLE-3 drafter; the output distribution
    is the target's in every mode."""

    def __init__(self, target: Transformer, drafter: torch.nn.Module | None = None):
        self.target = target.eval()
        self.drafter = drafter.eval() if drafter is not None else None
        param = next(target.parameters())
        self.device, self.dtype = param.device, param.dtype
        if drafter is not None:
            cfg, dcfg = target.config, drafter.config
            if dcfg.hidden_size != cfg.hidden_size or dcfg.vocab_size != cfg.vocab_size:
                raise DrafterMismatchError(
                    f"drafter (hidden {dcfg.hidden_size}, vocab {dcfg.vocab_size}) does not fit the target "
                    f"(hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
            if max(drafter.aux_layer_ids) > cfg.num_hidden_layers:
                raise DrafterMismatchError(
                    f"drafter reads target layers {list(drafter.aux_layer_ids)} but the target has "
                    f"{cfg.num_hidden_layers} layers")

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams, extra: int) -> None:
        cfg = self.target.config
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise PromptError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise PromptError(f"prompt {i} holds token ids outside the vocabulary [0, {cfg.vocab_size})")
            if len(p) + params.max_new_tokens + extra > cfg.max_position_embeddings:
                raise PromptError(
                    f"prompt {i} ({len(p)} tokens) + max_new_tokens {params.max_new_tokens} exceeds the model "
                    f"context of {cfg.max_position_embeddings} tokens")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None) -> GenerationResult:
        """Returns one SequenceOutput per prompt (same order) and per-step stats."""
        params = params or SamplingParams()
        if spec is None:
            spec = SpecConfig(mode="static") if self.drafter is not None else SpecConfig(mode="off")
        if spec.mode != "off" and self.drafter is None:
            raise ConfigError("speculative decoding needs a drafter: pass one to Engine or use SpecConfig(mode='off')")
        k = spec.k if spec.mode != "off" else 0
        self._check_prompts(prompts, params, extra=0)
        return _Run(self, prompts, params, k).run()


class _Run:
    """The state of one generate call: caches, live rows, output buffers."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, k: int):
        self.engine, self.params, self.k = engine, params, k
        self.target, self.drafter = engine.target, (engine.drafter if k else None)
        dev = engine.device
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        B = len(prompts)
        self.prompt_lens = torch.tensor([len(p) for p in prompts], device=dev)
        # The drafter writes up to 2k positions past the accepted prefix (k+1 catch-up, k-1 chained).
        self.capacity = max(len(p) for p in prompts) + params.max_new_tokens + 2 * k + 2
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.target.config.eos_ids))
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=dev)
        width = params.max_new_tokens + k + 1
        self.out_tokens = torch.zeros(B, width, dtype=torch.long, device=dev)  # [B0, width] by original row
        self.out_logprobs = torch.zeros(B, width, dtype=torch.float32, device=dev)
        self.finish = ["length"] * B
        self.rows = torch.arange(B, device=dev)  # live row -> original row
        self.gen_len = torch.zeros(B, dtype=torch.long, device=dev)  # tokens emitted so far per live row
        self.gen_len_final = torch.zeros(B, dtype=torch.long, device=dev)  # by original row, set as rows finish
        self.prompts = prompts
        self.stats: list[StepStats] = []
        self.aux_layers = tuple(self.drafter.aux_layer_ids) if self.drafter is not None else ()

    def run(self) -> GenerationResult:
        t0 = time.perf_counter()
        live = self.prefill()
        prefill_s = time.perf_counter() - t0
        while live:
            t0 = time.perf_counter()
            batch = len(self.rows)
            emitted, logprobs, count, accepted = self.spec_step() if self.k else self.plain_step()
            accepted_host, live = self.commit(emitted, logprobs, count, accepted)
            self.stats.append(StepStats(batch, self.k, accepted_host, sum(accepted_host) + batch if self.k
                                        else batch, time.perf_counter() - t0))
        lens = self.gen_len_final.tolist()
        toks, lps = self.out_tokens.tolist(), self.out_logprobs.tolist()
        seqs = [SequenceOutput(toks[b][:n], lps[b][:n], self.finish[b]) for b, n in enumerate(lens)]
        return GenerationResult(seqs, self.stats, prefill_s)

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
            # Drafter position t pairs the target feature at t with token t+1: the prompt shifted left, with the
            # sampled first token at the end of each row.
            self.dcache = self.drafter.new_cache(B, self.capacity)
            self.pend_tok = ids.roll(-1, dims=1).scatter(1, last[:, None], first[:, None])  # [B, L]
            self.pend_feat = aux  # [B, L, 3H]
            self.pend_len = self.prompt_lens.clone()
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
        hidden, _ = self.target(self.last[:, None], self.cache)  # [B, 1, H]
        logits = self.target.lm_head(hidden[:, 0])  # [B, V]
        token = self.sample(logits)
        self.last = token
        ones = torch.ones_like(token)
        return token[:, None], token_logprobs(logits, token, self.params)[:, None], ones, None

    def draft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns k chained drafts [B, k] (target ids) and the draft distributions [B, k, V] they came from."""
        drafter, B = self.drafter, len(self.rows)
        start = self.dcache.lengths
        hidden, dlogits = drafter(self.pend_tok, self.pend_feat, self.dcache)  # catch-up: [B, P, H], [B, P, Vd]
        self.dcache.set_lengths(start + self.pend_len, extent=self.dcache.extent)
        rows = torch.arange(B, device=self.engine.device)
        at = self.pend_len - 1
        h, logits = hidden[rows, at][:, None], dlogits[rows, at]  # [B, 1, H], [B, Vd]
        drafts, qs = [], []
        for i in range(self.k):
            q_draft = target_probs(logits, self.params)  # [B, Vd]
            token = drafter.draft_to_target(sample(q_draft, self.gen))  # [B]
            drafts.append(token)
            qs.append(drafter.expand_probs(q_draft))  # [B, V]
            if i + 1 < self.k:
                h, dl = drafter(token[:, None], h, self.dcache)  # chain on the drafter's own hidden state
                logits = dl[:, 0]
        # Forget the chained entries: next step re-feeds these positions with the target's true features.
        self.dcache.set_lengths(start + self.pend_len, extent=self.dcache.extent)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def spec_step(self):
        drafts, q = self.draft()  # [B, k], [B, k, V]
        n = self.cache.lengths
        tokens = torch.cat([self.last[:, None], drafts], 1)  # [B, k+1]
        hidden, aux = self.target(tokens, self.cache, self.aux_layers)  # [B, k+1, H], [B, k+1, 3H]
        logits = self.target.lm_head(hidden)  # [B, k+1, V]
        accepted, nxt = rejection_sample(target_probs(logits, self.params), q, drafts, self.gen)
        emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # [B, k+1]
        # Keep the last token and the accepted drafts in the target cache; the rejected ones roll back.
        self.cache.set_lengths(n + 1 + accepted, extent=self.cache.extent)
        self.pend_tok, self.pend_feat, self.pend_len = emitted, aux, accepted + 1
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
        extents = [self.cache.lengths.max()[None]]
        if self.drafter is not None:
            extents.append(self.dcache.lengths.max()[None])
        host = torch.cat([acc, done.long(), stopped.long(), *extents]).tolist()
        B = len(self.rows)
        acc_host, done_host, stopped_host = host[:B], host[B:2 * B], host[2 * B:3 * B]
        # Exact extents keep attention over [0, max live length) only.
        self.cache.extent = host[3 * B]
        if self.drafter is not None:
            self.dcache.extent = host[3 * B + 1]
        if not any(done_host):
            return acc_host, True
        orig = self.rows.tolist()
        for i in range(B):  # only over rows that finished this step: bookkeeping, not the hot path
            if done_host[i]:
                self.finish[orig[i]] = "stop" if stopped_host[i] else "length"
        keep = torch.tensor([i for i in range(B) if not done_host[i]], dtype=torch.long, device=emitted.device)
        self.gen_len_final[self.rows] = self.gen_len
        self._keep(keep)
        return acc_host, len(keep) > 0

    def _keep(self, keep: torch.Tensor) -> None:
        """Compacts every per-row tensor and cache to the rows in `keep`."""
        self.rows, self.gen_len, self.last = self.rows[keep], self.gen_len[keep], self.last[keep]
        self.cache.keep(keep)
        if self.drafter is not None:
            self.dcache.keep(keep)
            self.pend_tok, self.pend_feat, self.pend_len = self.pend_tok[keep], self.pend_feat[keep], \
                self.pend_len[keep]
