"""Generation, plain or speculative, for one request or many: the single source of rollout tokens and logprobs.

The engine batches continuously over a slot table (`slots.py`), with vLLM's names: `add_request` queues a request,
`step` prefills waiting requests into free slots, runs one decode step over every running request and returns
what each one generated; `generate` is that loop over a list of prompts.

One decode step runs over the running requests padded to a batch bucket, with one k for every row:
  k >= 1 (speculative):
    1. the drafter catches up on the (target feature, next token) pairs it has not seen (its backlog), then
       chains k - 1 more drafts on its own hidden states;
    2. the target verifies [last token, d_1 .. d_k] in one forward over k + 1 positions per row;
    3. `rejection_sample` keeps a prefix of each row's drafts plus one correction/bonus token (exact);
    4. each row's target cache is rolled back past its rejected drafts, the drafter's past its chained guesses;
  k = 0 (plain): one target forward over the last token; its aux features and the sampled token join the
    drafter's backlog, so speculation can switch on at any later step without a re-prefill;
  then rows that hit a stop token or their budget finish and free their slots. The host syncs once per step.
Verify-forward features and emitted tokens become the next catch-up's pairs, so the drafter always conditions
on true target features (EAGLE-3) at no extra target compute. A new request's prompt is its first backlog: the
step after its prefill has the drafter consume it (as it does the whole history after a drafter swap).

Who picks k: `SpecConfig.mode` "off" (always 0), "static" (always k), "replay" (a logged trace), or
"adaptive" (the engine's `Tuner`, or any chooser passed to `generate`, asked before each step with the live
batch and told each step's stats). Every mode samples the target's distribution exactly.

Environment turns (multi-turn tool use): `generate(..., env=...)` asks `env` after a row stops on a stop token; an
observation it returns is appended to the row, and the row continues as a new request over its whole context, on
the same random stream, back in the slot that still holds that context (only the stop token and the observation
are prefilled; the whole context when another request took the slot meanwhile). The call is synchronous, between
steps.

Randomness: each request draws from its own counter-based stream (`sampling.uniforms`), keyed by its seed and
fixed per sequence position, so its tokens depend on its seed, its prompt and the sequence of k only: not on the
requests beside it, when they arrived or which slot it holds (up to floating-point differences between batch
shapes). Replaying a logged trace therefore reproduces a rollout token for token.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from respec.engine.checkpoint import check_finite, check_tensors
from respec.engine.compile import check_compile_mode
from respec.engine.drafter import Eagle3Drafter, check_fits
from respec.engine.model import Transformer, fused_state
from respec.engine.outputs import (
    K_LIMIT,
    GenerationResult,
    KChooser,
    RequestOutput,
    SequenceOutput,
    SpecConfig,
    StepStats,
)
from respec.engine.sampling import (
    ACCEPT,
    DRAFT,
    SAMPLE,
    SamplingParams,
    rejection_sample,
    request_key,
    sample,
    target_probs,
    token_logprobs,
    uniforms,
)
from respec.engine.slots import Batch, SlotKV, SlotTable, attention_span
from respec.errors import (
    CheckpointError,
    ConfigError,
    DrafterMismatchError,
    DuplicateRequestError,
    PromptError,
    UnknownRequestError,
)

if TYPE_CHECKING:
    from respec.engine.tuner import CostModel

__all__ = ["BACKLOG_FLUSH", "K_LIMIT", "Engine", "GenerationResult", "KChooser", "RequestOutput", "SequenceOutput",
           "SpecConfig", "StepStats"]

BACKLOG_FLUSH = 32  # during plain (k = 0) steps the drafter consumes its backlog once it is this wide
MAX_RUNNING = 256  # default slots (vLLM's max_num_seqs)
Env = Callable[[int, list[int]], "list[int] | None"]  # (row's stream, its tokens after the prompt) -> observation


@dataclass
class _Held:
    """A freed slot that still holds a finished request's entries: valid while no request was prefilled into it
    (`fills`), its drafter entries only under the same drafter (`epoch`)."""

    slot: int
    fills: int  # the slot's fill count when it was freed
    dentries: int  # drafter cache entries (consumed history pairs) known valid
    epoch: int  # the table's drafter epoch then
    entries: int = 0  # target cache entries a continuation starts from (its context but the last token)


class _Request:
    """A request's host-side record: its prompt and parameters, and the tokens it has generated so far."""

    def __init__(self, request_id, prompt: list[int], params: SamplingParams, key: int, stops: list[int]):
        self.request_id, self.prompt, self.params, self.key, self.stops = request_id, prompt, params, key, stops
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.row = None  # generate's row index (continuations of one row share it)
        self.freed: _Held | None = None  # the slot it left, when it finished
        self.reuse: _Held | None = None  # a continuation's old slot, whose entries it starts from

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, list(self.tokens), list(self.logprobs), self.finish_reason is not None,
                             self.finish_reason)


class _Row:
    """One row of a generate call with environment turns: its tokens after the prompt over all its turns."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.generated: list[bool] = []  # True where the policy sampled the token, False in observations
        self.finish_reason: str | None = None
        self.turns = 0

    def add(self, tokens: list[int], logprobs: list[float], generated: bool) -> None:
        self.tokens += tokens
        self.logprobs += logprobs
        self.generated += [generated] * len(tokens)


class _Run:
    """How steps choose k and whom they report to: one generate call, or the engine's own step() loop."""

    def __init__(self, spec: SpecConfig, chooser: KChooser | None, on_step: Callable[[StepStats], None] | None,
                 keep_stats: bool):
        self.spec, self.chooser, self.on_step = spec, chooser, on_step
        self.k_max = spec.largest_k
        self.stats: list[StepStats] | None = [] if keep_stats else None
        self.steps = 0
        self.prefill_seconds = 0.0

    def choose(self, batch: int) -> tuple[int, float | None]:
        """Returns (k for the next step, predicted seconds or None) under the spec mode."""
        mode = self.spec.mode
        if mode == "off":
            return 0, None
        if mode == "static":
            return self.spec.k, None
        if mode == "replay":
            if self.steps >= len(self.spec.trace):
                raise ConfigError(f"replay trace has {len(self.spec.trace)} steps but this rollout needs more: "
                                  "replay with the prompts, sampling params and seed of the logged run")
            return self.spec.trace[self.steps], None
        k, predicted = self.chooser.choose(batch, self.k_max)
        if not 0 <= k <= self.k_max:
            raise ConfigError(f"the k chooser returned k={k}, outside 0..k_max={self.k_max}")
        return k, predicted

    def record(self, stats: StepStats, prefill_seconds: float) -> None:
        self.steps += 1
        self.prefill_seconds += prefill_seconds
        if self.stats is not None:
            self.stats.append(stats)
        if self.chooser is not None:
            self.chooser.observe(stats)
        if self.on_step is not None:
            self.on_step(stats)


class Engine:
    """Generates from a target model, optionally accelerated by an EAGLE-3 drafter; the output distribution
    is the target's in every mode.

    `spec` is the speculative setting of requests added with `add_request` (default: static k = 4 with a
    drafter, plain without); `max_running` bounds the requests decoding at once (the slots; more wait in a queue);
    `max_model_len` bounds a request's prompt plus generated tokens (default: the model's context), past which it
    finishes with reason "length". `compile` runs decode steps through `torch.compile` ("on"), eagerly ("off"),
    or each (batch bucket, k) the way a start-up profile measured faster ("auto"; the profile is cached on disk
    per machine, see `tuner.py`); prefills run eagerly. Every path samples the same distribution.
    `add_request`, `abort_request`, `step` and `generate` are called from one thread; `set_drafter` and `load_weights` may come from another: they wait for the current decode step to end
    and take effect from the next one.
    """

    def __init__(self, target: Transformer, drafter: Eagle3Drafter | None = None, tuner: KChooser | None = None, *,
                 spec: SpecConfig | None = None, max_running: int = MAX_RUNNING, max_model_len: int | None = None,
                 compile: str = "off"):
        self.target = target.eval()
        param = next(target.parameters())
        self.device, self.dtype = param.device, param.dtype
        check_compile_mode(compile, self.device)
        self.compile = compile
        self._costs: CostModel | None = None  # profiled step costs (and, under "auto", each cell's path)
        if not isinstance(max_running, int) or max_running < 1:
            raise ConfigError(f"max_running must be an integer >= 1 (the requests decoding at once), got {max_running}")
        context = target.config.max_position_embeddings
        max_model_len = context if max_model_len is None else max_model_len
        if not isinstance(max_model_len, int) or not 2 <= max_model_len <= context:
            raise ConfigError(f"max_model_len must be an integer in [2, {context}] (the model's context), "
                              f"got {max_model_len}")
        self.max_running, self.max_model_len = max_running, max_model_len
        self.drafter: Eagle3Drafter | None = None
        self.drafter_version: int | None = None
        self.drafter_epoch = 0  # bumped by every swap; running requests re-read their history on change
        self.tuner = tuner  # adaptive mode's chooser; built (profiled) on first use when None
        self._step_lock = threading.Lock()
        if drafter is not None:
            self.set_drafter(drafter, version=0)
        self.spec = spec if spec is not None else self._default_spec()
        self._check_spec(self.spec)
        self._requests: dict[object, _Request] = {}  # unfinished: waiting or running
        self._waiting: deque[_Request] = deque()
        self._table: SlotTable | None = None
        self._serving: _Run | None = None  # the run of step() calls

    # -- models ----------------------------------------------------------------------------------------------------
    def set_drafter(self, drafter: Eagle3Drafter, version: int | None = None,
                    keep_evidence: float | None = None) -> None:
        """Swaps in `drafter` (validated against the target) from the next decode step on.

        Running requests keep their tokens and target cache; at the next step the new drafter catches up on each
        one's whole sequence so far (one drafter forward over the recorded target features, like a prefill), so
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
        copied. Running requests keep their KV cache, so in RL call this between rollouts.
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

    def default_tuner(self, k_max: int) -> KChooser:
        """Returns the engine's tuner, built for drafts up to k_max (profiling or loading cached costs) on first
        use. A tuner given to the engine is kept as it is; it never picks more than its own k_max."""
        from respec.engine.tuner import Tuner

        if self.tuner is None:
            self.tuner = Tuner.for_engine(self, k_max)
            self.tuner.drafter_version = self.drafter_version
        return self.tuner

    def step_costs(self, k_max: int, config=None) -> CostModel:
        """Returns the profiled costs of this engine's decode steps with up to k_max drafts (measured on first
        use, or loaded from the per-machine cache; see `tuner.load_or_profile`)."""
        from respec.engine.tuner import TunerConfig, load_or_profile

        if self._costs is None or self._costs.k_max < k_max:
            self._costs = load_or_profile(self, k_max, config or TunerConfig())
        return self._costs

    def _runs_compiled(self, bucket: int, k: int) -> bool:
        if self.compile == "auto":
            return self.step_costs(k).runs_compiled(bucket, k)
        return self.compile == "on"

    # -- requests (vLLM's LLMEngine names) --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queues a request; it is prefilled into a free slot at a coming `step` and decodes from then on.

        Raises DuplicateRequestError if `request_id` belongs to an unfinished request, PromptError for an empty
        prompt, ids outside the vocabulary, or a prompt that leaves no room in a slot of max_model_len tokens.
        With `params.seed` set, the request's tokens are reproducible whatever else runs beside it.
        """
        if request_id in self._requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use by an unfinished request: "
                                        "choose another id, or abort that request first")
        params = params if params is not None else SamplingParams()
        prompt = self._check_prompt(prompt_token_ids, f"request {request_id!r}")
        if len(prompt) >= self.max_model_len:
            raise PromptError(f"request {request_id!r}: its prompt has {len(prompt)} tokens but a slot holds "
                              f"{self.max_model_len} (prompt and generated tokens together): shorten the prompt or "
                              "raise Engine(max_model_len=...)")
        self._queue(request_id, prompt, params, request_key(params.seed))

    def abort_request(self, request_id: str) -> None:
        """Drops an unfinished request (waiting or running); its slot is free for the next step. Raises
        UnknownRequestError if no unfinished request has this id."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise UnknownRequestError(f"no unfinished request has id {request_id!r} (finished requests are "
                                      "forgotten once their last output is returned)")
        if req.slot is None:
            self._waiting.remove(req)
        else:
            self._table.release(req.slot)
            req.slot = None
        req.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admits waiting requests into free slots, runs one decode step over every running request, and returns
        one RequestOutput per request that advanced (its tokens and logprobs so far; finished ones for the last
        time). Returns [] when nothing is queued or running."""
        if not self._requests:
            return []
        return [r.output() for r in self._step(self._serving_run())]

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None, chooser: KChooser | None = None,
                 on_step: Callable[[StepStats], None] | None = None, first_stream: int = 0,
                 env: Env | None = None) -> GenerationResult:
        """Returns one SequenceOutput per prompt (same order) and per-step stats.

        The prompts run as requests on an idle engine, at most max_running at a time; row i draws from stream
        first_stream + i of `params.seed`, so a call's tokens are reproducible, and a batch split into shards that
        pass their first row's index generates what the whole batch would (up to floating-point differences
        between batch shapes). In adaptive mode `chooser` (default: the engine's
        tuner) picks each step's k; `on_step` is called after every decode step (progress reporting).

        `env` (environment turns, multi-turn tool use): when row i's request ends on a stop token (eos or a stop
        id; never on "length"), `env(first_stream + i, tokens)` is called with every token the row holds after its
        prompt (the policy's and earlier observations). None or [] ends the row; a list of token ids is appended
        to the row as an observation (logprob 0.0, `SequenceOutput.generated` False) and the row goes on as a new
        request whose prompt is the prompt plus everything so far, admitted at the next step into the slot it
        left, whose entries still hold that context, so only the stop token and the observation are prefilled (if
        a waiting request took the slot meanwhile: any free slot, the whole context prefilled), drawing from the
        row's own stream at the same positions, so a seeded row's tokens still do not depend on its batch-mates.
        `env` runs synchronously between decode steps, so no row ever waits in a slot on it. `params.max_new_tokens` bounds the row's
        policy and observation tokens together: an observation is cut at the budget, and a row that reaches it
        finishes with "length".
        """
        params = params if params is not None else SamplingParams()
        spec = spec if spec is not None else self._default_spec()
        self._check_spec(spec)
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            self._check_prompt(p, f"prompt {i}")
            if len(p) + params.max_new_tokens > self.target.config.max_position_embeddings:
                raise PromptError(
                    f"prompt {i} ({len(p)} tokens) + max_new_tokens {params.max_new_tokens} exceeds the model "
                    f"context of {self.target.config.max_position_embeddings} tokens")
        if self._requests:
            raise ConfigError(f"generate needs an idle engine, and {len(self._requests)} requests added with "
                              "add_request are unfinished: step them to the end or abort them first")
        if spec.mode == "adaptive" and chooser is None:
            chooser = self.default_tuner(spec.k_max)
        if self.compile == "auto":
            self.step_costs(spec.largest_k)  # profiled before the run, not inside its first step
        run = _Run(spec, chooser, on_step, keep_stats=True)
        # Compiled layers are specialised on the cache's strides, which its positions per slot set: compiled, a
        # table holds max_model_len per slot whatever the call needs.
        max_tokens = self.max_model_len if self.compile != "off" else \
            max(map(len, prompts)) + params.max_new_tokens
        self._table_for(min(len(prompts), self.max_running), max_tokens, spec)
        requests = [self._queue(i, list(p), params, request_key(params.seed, first_stream + i))
                    for i, p in enumerate(prompts)]
        rows = [_Row(list(p)) for p in prompts]
        try:
            while self._requests:
                for req in self._step(run):
                    if req.finish_reason is not None and env is not None:
                        requests[req.row] = self._env_turn(req, rows[req.row], env, first_stream + req.row,
                                                           params)
        finally:
            for r in requests:
                if r.request_id in self._requests:
                    self.abort_request(r.request_id)  # an error mid-run leaves the engine idle
        if env is None:
            seqs = [SequenceOutput(r.tokens, r.logprobs, r.finish_reason) for r in requests]
        else:
            seqs = [SequenceOutput(row.tokens, row.logprobs, row.finish_reason, row.generated) for row in rows]
        return GenerationResult(seqs, run.stats, run.prefill_seconds)

    def _env_turn(self, req: _Request, row: _Row, env: Env, stream: int, params: SamplingParams) -> _Request:
        """Books a finished request's tokens on its row and asks `env` for an observation after a stop; returns
        the row's request from now on (a queued continuation, or `req` when the row has ended)."""
        row.add(req.tokens, req.logprobs, True)
        row.finish_reason = req.finish_reason
        if req.finish_reason != "stop":
            return req
        obs = env(stream, list(row.tokens))
        if not obs:
            return req
        obs = self._check_prompt(obs, f"the observation of row {req.row}")
        room = params.max_new_tokens - len(row.tokens)
        row.add(obs[:room], [0.0] * min(len(obs), room), False)
        # The continuation's whole context must leave room in a slot for one more token.
        room = min(params.max_new_tokens, self._table.max_tokens - len(row.prompt)) - len(row.tokens)
        if room < 1:
            row.finish_reason = "length"
            return req
        row.turns += 1
        cont = self._queue((req.row, row.turns), row.prompt + row.tokens, replace(params, max_new_tokens=room),
                           req.key, row=req.row)
        # Its slot still holds the entries of every token but the last (the stop token, never fed back).
        cont.reuse = replace(req.freed, entries=len(req.prompt) + len(req.tokens) - 1)
        return cont

    # -- checks and setup ------------------------------------------------------------------------------------------
    def _default_spec(self) -> SpecConfig:
        return SpecConfig(mode="static") if self.drafter is not None else SpecConfig(mode="off")

    def _check_spec(self, spec: SpecConfig) -> None:
        if spec.mode != "off" and self.drafter is None:
            raise ConfigError(f"speculative decoding (mode '{spec.mode}') needs a drafter: pass one to Engine or "
                              "use SpecConfig(mode='off')")

    def _check_prompt(self, prompt, name: str) -> list[int]:
        prompt = [int(t) for t in prompt]
        vocab = self.target.config.vocab_size
        if not prompt:
            raise PromptError(f"{name} is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise PromptError(f"{name} holds token ids outside the vocabulary [0, {vocab})")
        return prompt

    def _queue(self, request_id, prompt: list[int], params: SamplingParams, key: int, row: int | None = None
               ) -> _Request:
        eos = () if params.ignore_eos else self.target.config.eos_ids
        req = _Request(request_id, prompt, params, key, sorted(set(params.stop_token_ids) | set(eos)))
        req.row = request_id if row is None else row
        self._requests[request_id] = req
        self._waiting.append(req)
        return req

    def _table_for(self, num_slots: int, max_tokens: int, spec: SpecConfig) -> SlotTable:
        """Returns the slot table for this shape and spec, built anew if the current one differs (and is idle)."""
        speculative = spec.mode != "off"
        shape = (num_slots, max_tokens, speculative)
        tab = self._table
        if tab is not None and (tab.shape == shape or tab.num_active()):
            return tab  # a table with requests running is kept until they end
        self._table = tab = self._new_table(num_slots, max_tokens, speculative)
        tab.shape = shape
        return tab

    def _new_table(self, num_slots: int, max_tokens: int, speculative: bool) -> SlotTable:
        """Returns empty slots, with room for drafts of any k <= K_LIMIT: a table's strides then depend on its
        tokens only, so a replay runs on the very layout of the run it replays (matmul rounding can depend on
        strides) and compiled layers, specialised on strides, serve every k."""
        drafter = self.drafter if speculative else None
        cfg = self.target.config
        tab = SlotTable(cfg, num_slots, max_tokens, K_LIMIT, self.dtype, self.device,
                        draft_layer=drafter.layer_config if drafter is not None else None,
                        feature_size=len(drafter.aux_layer_ids) * cfg.hidden_size if drafter is not None else 0,
                        backlog=BACKLOG_FLUSH)
        tab.drafter_epoch = self.drafter_epoch
        return tab

    def _serving_run(self) -> _Run:
        """Returns the run of step() calls under the engine's spec (a changed spec applies once the engine is
        idle: the running requests' slots are sized for the old one)."""
        run = self._serving
        busy = self._table is not None and self._table.num_active() > 0
        if run is None or (run.spec != self.spec and not busy):
            self._check_spec(self.spec)
            chooser = self.default_tuner(self.spec.k_max) if self.spec.mode == "adaptive" else None
            if self.compile == "auto":
                self.step_costs(self.spec.largest_k)
            run = self._serving = _Run(self.spec, chooser, None, keep_stats=False)
        self._table_for(self.max_running, self.max_model_len, run.spec)
        return run

    # -- one step ----------------------------------------------------------------------------------------------------
    def _step(self, run: _Run) -> list[_Request]:
        """Admits what fits, runs one decode step, books its tokens; returns the requests that advanced."""
        tab = self._table
        new = min(len(self._waiting), len(tab.free))
        batch = tab.num_active() + new
        if batch == 0:
            return []
        t0 = time.perf_counter()
        k, predicted = run.choose(batch)  # before anything changes: a bad k leaves the engine as it was
        t1 = time.perf_counter()
        if new:
            with self._step_lock:
                self._admit(tab, [self._waiting.popleft() for _ in range(new)])
        t2 = time.perf_counter()  # a drafter swapped in from now on drafts this step
        with self._step_lock:
            self._sync_drafter(tab)
            for _, slot in tab.compact():  # live rows in slots 0..n-1: the step reads the caches through views
                tab.owner[slot].slot = slot
            b = tab.batch_for(tab.active())
            host, flushed = self._decode(tab, b, k, self._runs_compiled(b.size, k))
            version = self.drafter_version if k else None  # read before a waiting swap can land
        accepted, kept, advanced = self._book(tab, b, k, host, flushed)
        t3 = time.perf_counter()  # booking is part of the step: a plain step pays it for one token per row
        run.record(StepStats(batch, k, accepted, sum(accepted) + batch, (t1 - t0) + (t3 - t2), predicted, version,
                             kept),
                   t2 - t1)
        return advanced

    def _admit(self, tab: SlotTable, reqs: list[_Request]) -> None:
        """Prefills `reqs` into the lowest free slots in one target forward, and continuations whose old slots still
        hold their context back into those in another; their first tokens stay on the device and are reported with
        the step."""
        tab.flush()  # the batch state goes back to the slots before new requests write theirs
        # A continuation (environment turns) whose old slot still holds its entries runs only its new tokens there.
        again = [r for r in reqs if r.reuse is not None and tab.holds(r.reuse.slot, r.reuse.fills)]
        rest = max((len(r.prompt) - r.reuse.entries for r in again), default=0)
        again = [r for r in again if r.reuse.entries + rest <= tab.capacity]
        tab.take_slots([r.reuse.slot for r in again])
        # The drafter's entries stay valid up to what it had consumed (its history pairs before the stop token are
        # the continuation's too), under the same drafter.
        kept = [min(r.reuse.dentries, r.reuse.entries) if r.reuse.epoch == tab.drafter_epoch else 0
                for r in again]
        fresh = [r for r in reqs if r not in again]
        aux_layers = tuple(self.drafter.aux_layer_ids) if tab.speculative else ()
        for group, slots, starts, dstarts in ((again, [r.reuse.slot for r in again],
                                               [r.reuse.entries for r in again], kept),
                                              (fresh, tab.take(len(fresh)), None, None)):
            if not group:
                continue
            for req, s in zip(group, slots, strict=True):
                req.slot, tab.owner[s] = s, req
            tab.prefill(self.target, slots, [r.prompt for r in group], [r.params for r in group],
                        [r.key for r in group], [r.stops for r in group], aux_layers, starts, dstarts)

    def _sync_drafter(self, tab: SlotTable) -> None:
        """Adopts a drafter swapped in by set_drafter since the last step: a fresh drafter cache, and every
        running request's whole history becomes its backlog, so the new drafter's first catch-up reads every
        position, as a prefill. Target features do not depend on the drafter, so they stay valid."""
        if not tab.speculative or tab.drafter_epoch == self.drafter_epoch:
            return
        tab.drafter_epoch = self.drafter_epoch
        tab.flush()
        layer = self.drafter.layer_config
        if (layer.num_key_value_heads, layer.head_dim) != (tab.draft_layer.num_key_value_heads,
                                                           tab.draft_layer.head_dim):
            tab.dkv = SlotKV.for_model(layer, tab.num_slots, tab.dcapacity, self.dtype, self.device, num_layers=1)
            tab.draft_layer = layer
        tab.pend += tab.dlengths
        tab.dlengths.zero_()
        for s in tab.active():
            tab.host_pend[s] = tab.host_len[s]
            tab.needs_prefill.add(s)

    def _decode(self, tab: SlotTable, b: Batch, k: int, compiled: bool) -> tuple[list[float], bool]:
        """Runs one decode step with k drafts over batch `b` (its forwards compiled or eager); returns (its outcome
        read back in one sync, whether a plain step flushed the drafter's backlog)."""
        drafter = self.drafter if tab.speculative else None
        aux_layers = tuple(drafter.aux_layer_ids) if drafter is not None else ()
        live = [b.slots[i] for i in b.live]
        tab.reset_pads(b)
        if drafter is not None and tab.needs_prefill:
            drafter_prefill(drafter, tab, b, [i for i in b.live if b.slots[i] in tab.needs_prefill])
        span = attention_span(max(tab.host_len[s] for s in live) + k + 1, tab.capacity)
        flushed = False
        if drafter is not None:
            width = max(tab.host_pend[s] for s in live)
            dspan = attention_span(max(tab.host_len[s] - tab.host_pend[s] for s in live) + width + k, tab.dcapacity)
        if k == 0:
            flushed = drafter is not None and width >= BACKLOG_FLUSH
            emitted, logprobs, count, accepted = plain_step(self.target, drafter, tab, b, span, aux_layers,
                                                            flush=(width, dspan) if flushed else None,
                                                            compiled=compiled)
        else:
            emitted, logprobs, count, accepted = spec_step(self.target, drafter, tab, b, k, span, width, dspan,
                                                           aux_layers, compiled)
        count, done, stopped = finish(b, emitted, count)
        # One float32 tensor for the one sync (token ids below 2^24 are exact in float32, logprobs are float32).
        out = [torch.cat([accepted[:, None], count[:, None], done[:, None], stopped[:, None], emitted, logprobs],
                         1).flatten()]  # [B * (4 + 2n)]
        fresh = [s for s in live if s in tab.fresh]
        if fresh:
            index = tab.long_tensor(fresh)
            out.append(torch.stack([tab.first_token[index].float(), tab.first_logprob[index]], 1).flatten())
        return torch.cat(out).tolist(), flushed  # the step's one host sync

    def _book(self, tab: SlotTable, b: Batch, k: int, host: list[float],
              flushed: bool) -> tuple[list[int], list[int], list[_Request]]:
        """Appends each live row's new tokens to its request, finishes and frees the rows that ended, and moves
        the host mirrors; returns (accepted drafts per live row, tokens each kept, the requests that advanced)."""
        n = k + 1
        w = 4 + 2 * n
        fresh = iter(host[b.size * w:])
        accepted, advanced, kept = [], [], []
        for i in b.live:
            s = b.slots[i]
            req = tab.owner[s]
            row = host[i * w: (i + 1) * w]
            acc, count = int(row[0]), int(row[1])
            accepted.append(acc)
            kept.append(count)  # fewer than acc + 1 where the row ended within the step
            if s in tab.fresh:
                req.tokens.append(int(next(fresh)))
                req.logprobs.append(next(fresh))
            req.tokens.extend(int(t) for t in row[4: 4 + count])
            req.logprobs.extend(row[4 + n: 4 + n + count])
            advanced.append(req)
            if row[2]:
                req.finish_reason = "stop" if row[3] else "length"
                del self._requests[req.request_id]
                tab.release(s)
                # Before this step's update, the host mirrors give the drafter entries consumed before it.
                req.slot, req.freed = None, _Held(s, tab.fills[s], tab.host_len[s] - tab.host_pend[s],
                                                  tab.drafter_epoch)
            else:
                tab.host_len[s] += acc + 1 if k else 1
                tab.host_pend[s] = acc + 1 if k else 1 if flushed else tab.host_pend[s] + 1
        tab.fresh.clear()
        return accepted, kept, advanced


# -- the step's tensor work ------------------------------------------------------------------------------------------

def drafter_prefill(drafter: Eagle3Drafter, tab: SlotTable, b: Batch, rows: list[int]) -> None:
    """Has the drafter consume all but the last pair of the backlog of batch rows `rows` (a new request's prompt,
    or the whole history after a drafter swap), so that every row enters the step with one pending pair."""
    slots = [b.slots[i] for i in rows]
    width = max(tab.host_pend[s] for s in slots) - 1
    start_max = max(tab.host_len[s] - tab.host_pend[s] for s in slots)
    for s in slots:
        tab.host_pend[s] = 1
    tab.needs_prefill.difference_update(slots)
    if width <= 0:
        return
    if len(rows) == b.size:
        index, contiguous, sel = b.index, b.contiguous, None
        start, pend = b.dlengths, b.pend
    else:
        sel = tab.long_tensor(rows)
        index, contiguous = b.index[sel], False
        start, pend = b.dlengths[sel], b.pend[sel]
    tokens, features = tab.read_history(index, contiguous, start, width)  # [R, P], [R, P, 3H]
    drafter(tokens, features, tab.drafter_view(index, contiguous, start, attention_span(start_max + width,
                                                                                       tab.dcapacity)))
    consumed, one = start + pend - 1, torch.ones_like(pend)
    if sel is None:
        b.dlengths, b.pend = consumed, one
    else:
        b.dlengths, b.pend = b.dlengths.index_copy(0, sel, consumed), b.pend.index_copy(0, sel, one)


def catch_up(drafter: Eagle3Drafter, tab: SlotTable, b: Batch, width: int, span: int,
             compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the drafter over each row's backlog (padded to `width` pairs) and empties it; returns (hidden
    [B, 1, H], draft logits [B, Vd]) at each row's last backlog pair: the start of the next chain of drafts."""
    start = b.dlengths
    tokens, features = tab.read_history(b.index, b.contiguous, start, width)  # [B, P], [B, P, 3H]
    hidden, dlogits = drafter(tokens, features, tab.drafter_view(b.index, b.contiguous, start, span, compiled))
    rows, at = torch.arange(b.size, device=start.device), b.pend - 1
    b.dlengths, b.pend = start + b.pend, torch.zeros_like(b.pend)  # rows with a shorter backlog drop the padding
    return hidden[rows, at][:, None], dlogits[rows, at]


def plain_step(target: Transformer, drafter: Eagle3Drafter | None, tab: SlotTable, b: Batch, span: int,
               aux_layers: tuple[int, ...], flush: tuple[int, int] | None, compiled: bool = False):
    """One target forward over each row's last token; the sampled token and its feature join the backlog (after
    a catch-up of width flush[0] when the backlog has grown BACKLOG_FLUSH wide)."""
    n = b.lengths
    hidden, aux = target(b.last[:, None], tab.target_view(b, span, compiled), aux_layers)  # [B, 1, H], [B, 1, 3H]
    logits = target.lm_head(hidden[:, 0])  # [B, V]
    if b.params.all_greedy:
        token = logits.argmax(-1)
    else:
        token = sample(target_probs(logits, b.params), uniforms(b.key, n + 1, SAMPLE))  # [B], at position n + 1
    b.lengths = n + 1
    if drafter is not None:
        if flush is not None:
            catch_up(drafter, tab, b, *flush, compiled)
        tab.write_history(b.index, b.contiguous, b.dlengths + b.pend, token[:, None], aux)
        b.pend = b.pend + 1
    b.last = token
    return token[:, None], token_logprobs(logits, token, b.params)[:, None], torch.ones_like(token), \
        torch.zeros_like(token)


def spec_step(target: Transformer, drafter: Eagle3Drafter, tab: SlotTable, b: Batch, k: int, span: int,
              width: int, dspan: int, aux_layers: tuple[int, ...], compiled: bool = False):
    """Drafts k tokens per row, verifies them in one target forward over k + 1 positions, keeps the accepted
    prefix plus a correction or bonus token; returns (emitted [B, k+1], their logprobs, valid count, accepted)."""
    h, dlogits = catch_up(drafter, tab, b, width, dspan, compiled)  # [B, 1, H], [B, Vd]
    n = b.lengths  # the last token sits at position n; draft i at n + i, the bonus at n + k + 1
    pos = n[:, None] + 1 + torch.arange(k + 1, device=n.device)  # [B, k+1]
    u = uniforms(b.key, pos[..., None], tab.draws)  # [B, k+1, 3]: every draw of the step, one hash
    dview = tab.drafter_view(b.index, b.contiguous, b.dlengths, dspan, compiled)
    drafts, qs = [], []
    for i in range(k):
        q_draft = target_probs(dlogits, b.params)  # [B, Vd]
        draft = dlogits.argmax(-1) if b.params.all_greedy else sample(q_draft, u[:, i, DRAFT])
        token = drafter.draft_to_target(draft)  # [B]
        drafts.append(token)
        qs.append(drafter.expand_probs(q_draft))  # [B, V]
        if i + 1 < k:
            h, dl = drafter(token[:, None], h, dview)  # chain on the drafter's own hidden state
            dlogits = dl[:, 0]
    # b.dlengths stays: the chained entries are forgotten, the next catch-up re-feeds their positions with the
    # target's true features.
    drafts, q = torch.stack(drafts, 1), torch.stack(qs, 1)  # [B, k], [B, k, V]
    tokens = torch.cat([b.last[:, None], drafts], 1)  # [B, k+1]
    hidden, aux = target(tokens, tab.target_view(b, span, compiled), aux_layers)  # [B, k+1, H], [B, k+1, 3H]
    logits = target.lm_head(hidden)  # [B, k+1, V]
    accepted, nxt = rejection_sample(target_probs(logits, b.params), q, drafts, u[:, :k, ACCEPT], u[:, :, SAMPLE])
    emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # [B, k+1]
    # Keep the last token and the accepted drafts in the target cache; the rejected ones roll back.
    b.lengths = n + 1 + accepted
    tab.write_history(b.index, b.contiguous, b.dlengths, emitted, aux)  # the catch-up emptied the backlog
    b.pend, b.last = accepted + 1, nxt
    return emitted, token_logprobs(logits, emitted, b.params), accepted + 1, accepted


def finish(b: Batch, emitted: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Applies stop tokens and budgets to emitted tokens [B, n] (first count[b] valid): returns (tokens kept per
    row, done, stopped by a stop token). A row that finished at its prefill keeps nothing."""
    j = torch.arange(emitted.shape[1], device=emitted.device)
    valid = j[None] < count[:, None]
    is_stop = (emitted[:, :, None] == b.stop_ids[:, None, :]).any(-1) & valid  # [B, n]
    has_stop = is_stop.any(1)
    # Tokens after a stop token are discarded; so are tokens beyond the budget.
    first_stop = torch.where(has_stop, is_stop.long().argmax(1) + 1, count)
    budget = (b.budget - b.gen_len).masked_fill(b.done, 0)
    count = torch.minimum(first_stop, budget)
    stopped = (has_stop & (first_stop <= budget)) | b.stopped
    b.gen_len = b.gen_len + count
    return count, b.done | stopped | (b.gen_len >= b.budget), stopped
