"""The slot table: a fixed number of slots, each one running request's region of the target's and the drafter's KV
cache and its decode state, kept on the device.

A request holds a slot from its prefill to its last token. A finished request frees its slot and a waiting request
is prefilled into it while the others keep decoding; before a step, `compact` moves the highest live slots into the
holes below them (one request's entries per move), so the live slots are 0..n-1 and the step reads views. A decode step
runs over the active slots padded with free ones to a batch bucket (1, 2, 4, 8, 16, 24, 32, ...: multiples of 8, at
most the table size), so every tensor of a step has a shape fixed by (bucket, verify width, attention span). The span is the host-known longest row
padded to a multiple of SPAN_BLOCK positions (a step never reads positions no row has written); a compiled step would pin it
to the slot capacity instead.

Invariants:
- slot s holds valid target cache entries at positions [0, lengths[s]) and drafter entries at [0, dlengths[s]);
  beyond them everything is stale and masked, so rolling back rejected drafts is lowering a length;
- the host mirrors each active slot's lengths exactly (`host_len`, `host_pend`), from the one sync per step,
  so it picks shapes (bucket, span, catch-up width) without reading the device;
- a bucket's rows are its slots in increasing order; pads are the lowest free slots, read with length 0, so they
  compute harmless garbage that no one reads. When a bucket's slots are exactly 0..B-1 the caches are read
  through views; otherwise its rows' keys and values are gathered (a FlashAttention `cache_batch_idx` kernel
  would read them in place).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from respec.engine.sampling import (
    SAMPLE,
    RowParams,
    SamplingParams,
    row_flags,
    sample,
    target_probs,
    token_logprobs,
    uniforms,
)

SPAN_BLOCK = 32  # attention spans are multiples of this many positions (few distinct shapes)


def bucket_size(n: int, num_slots: int) -> int:
    """Returns the batch a step over n active slots runs at: 1, 2, 4, then the next multiple of 8 (vLLM's CUDA
    graph capture sizes), at most the table size. Pads are wasted rows: with power-of-two buckets a draining batch
    of 64 computes about a third more rows than are live, with multiples of 8 about a tenth."""
    bucket = 1 << max(n - 1, 0).bit_length() if n <= 4 else -(-n // 8) * 8
    return min(bucket, num_slots)


def attention_span(needed: int, capacity: int) -> int:
    """Returns the cache positions a step attends over: `needed` padded to a multiple of SPAN_BLOCK, at most
    `capacity`."""
    return min(-(-needed // SPAN_BLOCK) * SPAN_BLOCK, capacity)


class SlotKV:
    """Keys and values of every layer [L, S, Hkv, capacity, D]: one region per slot."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_slots, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, capacity, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity

    @classmethod
    def for_model(cls, cfg, num_slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                  num_layers: int | None = None) -> SlotKV:
        """Returns empty slots shaped for model config `cfg` (or `num_layers` layers of its attention shape)."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        return cls(layers, num_slots, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype, device)


class SlotView:
    """The KV cache a forward over some slots sees (what the models call; `KVCache` is one over all slots): row b is
    slot index[b], its new tokens take positions lengths[b] .., and attention reads cached positions [0, span).

    `empty` marks a prefill (every length 0): the model then runs plain causal attention and only writes.
    `compiled` runs the forward's layers through the shared compiled graph (`compile.py`).
    """

    def __init__(self, kv: SlotKV, index: torch.Tensor, contiguous: bool, lengths: torch.Tensor, span: int,
                 empty: bool = False, compiled: bool = False):
        self.kv, self.index, self.contiguous, self.span, self.empty = kv, index, contiguous, span, empty
        self.compiled = compiled
        self.lengths = lengths  # [B]

    def is_empty(self) -> bool:
        return self.empty

    def positions(self, T: int) -> torch.Tensor:
        """Returns the positions [B, T] that T new tokens per row take."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the rows' keys and values [B, Hkv, span, D] of `layer` (views when the slots are 0..B-1)."""
        keys, values = self._read(slice(layer, layer + 1))
        return keys[0], values[0]

    def read_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns every layer's `read`, stacked: keys and values [L, B, Hkv, span, D] (one gather, not one per
        layer, when the slots are not 0..B-1)."""
        return self._read(slice(None))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [B, Hkv, T, D] at each row's positions."""
        self._write(slice(layer, layer + 1), k[None], v[None])

    def write_all(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes every layer's k, v [L, B, Hkv, T, D] at each row's positions, in one write each."""
        self._write(slice(None), k, v)

    def _read(self, layers: slice) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.k[layers], self.kv.v[layers]  # [l, S, Hkv, capacity, D]
        if self.contiguous:
            B = len(self.index)
            return keys[:, :B, :, : self.span], values[:, :B, :, : self.span]
        # Selecting slots from a view already cut to the span copies every slot first (torch makes the strided
        # source contiguous): 10-20x the rows' own bytes at a small live batch. Whole slots are copied instead
        # (plain row copies) while the span is most of the capacity, else just the rows' spans.
        if 2 * self.span >= self.kv.capacity:
            return keys.index_select(1, self.index)[:, :, :, : self.span], \
                values.index_select(1, self.index)[:, :, :, : self.span]
        return keys[:, self.index, :, : self.span], values[:, self.index, :, : self.span]

    def _write(self, layers: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [l, B, Hkv, T, D] into the cache's `layers` (l of them) at each row's positions."""
        L, B, H, T, D = k.shape
        pos = self.positions(T)  # [B, T]
        keys, values = self.kv.k[layers], self.kv.v[layers]  # [l, S, Hkv, capacity, D] views
        if self.contiguous:
            idx = pos[None, :, None, :, None].expand(L, B, H, T, D)
            keys[:, :B].scatter_(3, idx, k)
            values[:, :B].scatter_(3, idx, v)
            return
        dev = k.device
        where = (torch.arange(L, device=dev)[:, None, None, None], self.index[None, :, None, None],
                 torch.arange(H, device=dev)[None, None, :, None], pos[None, :, None, :])
        keys.index_put_(where, k)
        values.index_put_(where, v)

    def advance(self, T: int) -> None:
        self.lengths = self.lengths + T


@dataclass
class Batch:
    """The rows of the decode steps over one set of active slots, padded with free slots to a bucket.

    The per-row state advances in these tensors from step to step while the set of slots stays the same, and is
    written back to the table when it changes (a request joins or leaves); the rest is fixed for the set's life.
    """

    slots: list[int]  # [B] host: the bucket's slots, increasing
    live: list[int]  # host: positions in `slots` of the active ones (the others are pads)
    index: torch.Tensor  # [B] the slots, on the device
    active: torch.Tensor  # [B] bool
    contiguous: bool  # slots == 0..B-1: caches are read through views
    params: RowParams
    key: torch.Tensor  # [B] int64 random keys
    budget: torch.Tensor  # [B] tokens the request may generate
    stop_ids: torch.Tensor  # [B, M] stop token ids, -1 padded
    done: torch.Tensor  # [B] bool: finished at the prefill (its first token), reported with the next step
    stopped: torch.Tensor  # [B] bool: ... by a stop token
    lengths: torch.Tensor  # [B] target cache entries; the last token sits at position lengths[b]
    last: torch.Tensor  # [B] the last sampled token (not yet in the target cache)
    gen_len: torch.Tensor  # [B] tokens generated so far
    dlengths: torch.Tensor | None  # [B] drafter cache entries (consumed history pairs)
    pend: torch.Tensor | None  # [B] history pairs the drafter has not consumed (its backlog), >= 1 between steps

    @property
    def size(self) -> int:
        return len(self.slots)


DYNAMIC = ("lengths", "last", "gen_len", "dlengths", "pend")  # the Batch fields a step advances
# Every per-slot state tensor of a SlotTable (dim 0: the slot), besides the caches and the drafter's history.
SLOT_STATE = ("lengths", "last", "gen_len", "budget", "key", "done", "stopped", "temperature", "top_p", "top_k",
              "stop_ids", "first_token", "first_logprob", "dlengths", "pend")


class SlotTable:
    """Per-slot decode state of up to `num_slots` running requests, on the device, with host-side mirrors.

    Target cache: `max_tokens` positions per slot (prompt plus generated tokens) plus k_max + 1 for a verify
    forward's rejected drafts. With a drafter (`draft_layer` its layer config) the table also holds the drafter's
    cache and each slot's history of (target feature at t, token at t + 1) pairs: the drafter's input, kept whole
    so a drafter swapped in mid-rollout can re-read it; `backlog` bounds the pairs a plain step lets pend.
    """

    def __init__(self, target_cfg, num_slots: int, max_tokens: int, k_max: int, dtype: torch.dtype,
                 device: torch.device | str, draft_layer=None, feature_size: int = 0, backlog: int = 0):
        S = num_slots
        self.num_slots, self.max_tokens, self.k_max, self.device = S, max_tokens, k_max, torch.device(device)
        self.capacity = max_tokens + k_max + 1
        self.kv = SlotKV.for_model(target_cfg, S, self.capacity, dtype, device)

        def zeros(dtype=torch.long):
            return torch.zeros(S, dtype=dtype, device=device)

        self.lengths, self.last, self.gen_len, self.budget, self.key = zeros(), zeros(), zeros(), zeros(), zeros()
        self.done, self.stopped = zeros(torch.bool), zeros(torch.bool)
        self.temperature, self.top_p, self.top_k = zeros(torch.float32) + 1, zeros(torch.float32) + 1, zeros()
        self.stop_ids = torch.full((S, 0), -1, dtype=torch.long, device=device)
        self.first_token, self.first_logprob = zeros(), zeros(torch.float32)  # sampled at the prefill
        self.draws = torch.arange(3, device=device)  # DRAFT, ACCEPT, SAMPLE: the draws of a speculative position
        self.speculative = draft_layer is not None
        self.dlengths = self.pend = None
        if self.speculative:
            # Drafter: its consumed prefix, a backlog (up to `backlog` plain steps or k_max + 1 verified pairs) and
            # k_max - 1 chained drafts.
            self.dcapacity = max_tokens + backlog + 2 * k_max + 2
            self.draft_layer = draft_layer
            self.dkv = SlotKV.for_model(draft_layer, S, self.dcapacity, dtype, device, num_layers=1)
            self.dlengths, self.pend = zeros(), zeros()
            self.hist_tok = torch.zeros(S, self.dcapacity, dtype=torch.long, device=device)  # [S, Cd]
            self.hist_feat = torch.zeros(S, self.dcapacity, feature_size, dtype=dtype, device=device)  # [S, Cd, 3H]
        self.drafter_epoch = 0  # the engine's drafter epoch whose cache the table holds
        self.shape: tuple = ()  # what the engine built it for (slots, tokens, k_max, speculative)
        # Host side.
        self.owner: list[object | None] = [None] * S  # the request in each slot
        self.params: list[SamplingParams | None] = [None] * S
        self.free = list(range(S))  # a heap: the lowest free slot first
        self.fills = [0] * S  # prefills into each slot so far: a freed slot keeps its entries until the next
        self.host_len = [0] * S  # == lengths, for active slots
        self.host_pend = [0] * S  # == pend, for active slots
        self.fresh: set[int] = set()  # prefilled since the last step: their first token goes out with the next
        self.needs_prefill: set[int] = set()  # their drafter backlog is a whole prompt (or history)
        self.batch: Batch | None = None
        self._tensors: dict[tuple[int, ...], torch.Tensor] = {}

    # -- slots -----------------------------------------------------------------------------------------------------
    def active(self) -> list[int]:
        """Returns the occupied slots, increasing."""
        return [s for s, r in enumerate(self.owner) if r is not None]

    def num_active(self) -> int:
        return self.num_slots - len(self.free)

    def take(self, n: int) -> list[int]:
        """Returns the n lowest free slots, now taken (the caller fills them)."""
        return [heapq.heappop(self.free) for _ in range(n)]

    def take_slots(self, slots: list[int]) -> None:
        """Takes the given free slots (the caller fills them)."""
        taken = set(slots)
        self.free = [s for s in self.free if s not in taken]
        heapq.heapify(self.free)

    def holds(self, slot: int, fills: int) -> bool:
        """Whether `slot` is free and still holds the entries of its `fills`-th prefill's request (no request was
        prefilled into it since)."""
        return self.owner[slot] is None and self.fills[slot] == fills

    def release(self, slot: int) -> None:
        """Frees `slot`: its entries stay, masked, until a new request is prefilled into it."""
        self.owner[slot] = self.params[slot] = None
        self.fresh.discard(slot)
        self.needs_prefill.discard(slot)
        heapq.heappush(self.free, slot)

    def compact(self) -> list[tuple[int, int]]:
        """Moves the highest occupied slots into the free slots below them until the occupied ones are 0..n-1, so
        that a step's caches are read through views instead of gathered; returns the moves (from, to) so that the
        owner can follow its request. Each move copies one request's valid entries (target and drafter cache,
        history) and state; both slots count a fill, so no continuation reuses either one's old entries."""
        n = self.num_active()
        holes = sorted(s for s in self.free if s < n)
        if not holes:
            return []
        self.flush()
        movers = [s for s in self.active() if s >= n]  # as many as the holes
        moves = list(zip(movers, holes, strict=True))
        src, dst = self.long_tensor(movers), self.long_tensor(holes)
        width = min(max(self.host_len[s] for s in movers) + 1, self.capacity)
        for t in (self.kv.k, self.kv.v):
            t[:, dst, :, :width] = t[:, src, :, :width]
        if self.speculative:
            dwidth = min(width, self.dcapacity)
            for t in (self.dkv.k, self.dkv.v):
                t[:, dst, :, :dwidth] = t[:, src, :, :dwidth]
            self.hist_tok[dst, :dwidth] = self.hist_tok[src, :dwidth]
            self.hist_feat[dst, :dwidth] = self.hist_feat[src, :dwidth]
        for name in SLOT_STATE:
            t = getattr(self, name)
            if t is not None:
                t.index_copy_(0, dst, t[src])
        for a, b in moves:
            self.owner[b], self.params[b] = self.owner[a], self.params[a]
            self.host_len[b], self.host_pend[b] = self.host_len[a], self.host_pend[a]
            for marks in (self.fresh, self.needs_prefill):
                if a in marks:
                    marks.discard(a)
                    marks.add(b)
            self.owner[a] = self.params[a] = None
            self.fills[a] += 1
            self.fills[b] += 1
        self.free = [s for s in self.free if s >= n] + movers
        heapq.heapify(self.free)
        return moves

    def long_tensor(self, values: list[int]) -> torch.Tensor:
        """Returns values as an int64 device tensor, reused while the same values come back (slot index lists)."""
        key = tuple(values)
        t = self._tensors.get(key)
        if t is None:
            if len(self._tensors) > 64:
                self._tensors.clear()
            t = self._tensors[key] = torch.tensor(values, dtype=torch.long, device=self.device)
        return t

    def set_stop_width(self, m: int) -> None:
        """Widens every slot's stop-id row to at least m entries (requests with many stop ids)."""
        if m > self.stop_ids.shape[1]:
            self.flush()
            pad = torch.full((self.num_slots, m - self.stop_ids.shape[1]), -1, dtype=torch.long, device=self.device)
            self.stop_ids = torch.cat([self.stop_ids, pad], 1)

    # -- filling slots ---------------------------------------------------------------------------------------------
    def prefill(self, target, slots: list[int], prompts: list[list[int]], params: list[SamplingParams],
                keys: list[int], stops: list[list[int]], aux_layers: tuple[int, ...],
                starts: list[int] | None = None, dstarts: list[int] | None = None) -> None:
        """Runs `prompts` through `target` (right-padded, one forward) into `slots`, samples each one's first token
        (at position len(prompt), from stream keys[i]) and writes the slots' state; with a drafter the prompt
        becomes the drafter's backlog. A request whose first token ends it is marked done for the next step.

        `starts[i]` > 0: slot i already holds the target's entries (and the drafter's history pairs) of the
        prompt's first starts[i] tokens, from the request that held it before (`holds`): only the rest is run,
        attending to them. The caller keeps starts[i] + the longest rest within the capacity. `dstarts[i]` <=
        starts[i]: the slot's drafter cache holds the entries of those first pairs too, so the drafter's backlog
        is only the rest."""
        dev, B = self.device, len(prompts)
        lens = [len(p) for p in prompts]
        starts = starts or [0] * B
        dstarts = dstarts or [0] * B
        for s, p, n, d in zip(slots, params, lens, dstarts, strict=True):
            self.params[s], self.host_len[s], self.host_pend[s] = p, n, n - d
            self.fills[s] += 1
            self.fresh.add(s)
            if self.speculative:
                self.needs_prefill.add(s)
        rest = [p[c:] for p, c in zip(prompts, starts, strict=True)]
        L = max(map(len, rest))
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rest], device=dev)  # [B, L]
        index = self.long_tensor(slots)
        contiguous = slots == list(range(B))
        lengths = torch.tensor(lens, device=dev)
        start = torch.tensor(starts, device=dev)
        if any(starts):
            view = SlotView(self.kv, index, contiguous, start, attention_span(max(starts) + L, self.capacity))
        else:
            view = SlotView(self.kv, index, contiguous, start, L, empty=True)
        hidden, aux = target(ids, view, aux_layers)  # [B, L, H], [B, L, 3H]
        last = lengths - start - 1  # each row's last prompt token in `rest`
        logits = target.lm_head(hidden[torch.arange(B, device=dev), last])  # [B, V]
        rows = RowParams.of(params, dev)
        key = torch.tensor(keys, dtype=torch.long, device=dev)
        first = sample(target_probs(logits, rows), uniforms(key, lengths, SAMPLE))  # [B]
        budget = torch.tensor([min(p.max_new_tokens, self.max_tokens - n) for p, n in zip(params, lens, strict=True)],
                              device=dev)
        self.set_stop_width(max(map(len, stops)))
        M = self.stop_ids.shape[1]
        stop_ids = torch.tensor([s + [-1] * (M - len(s)) for s in stops], dtype=torch.long, device=dev).view(B, M)
        stopped = (first[:, None] == stop_ids).any(1)
        for name, value in (("lengths", lengths), ("last", first), ("gen_len", torch.ones_like(first)),
                            ("budget", budget), ("key", key), ("temperature", rows.temperature),
                            ("top_p", rows.top_p), ("top_k", rows.top_k), ("stop_ids", stop_ids),
                            ("stopped", stopped), ("done", stopped | (budget <= 1)), ("first_token", first),
                            ("first_logprob", token_logprobs(logits, first, rows))):
            getattr(self, name).index_copy_(0, index, value)
        if self.speculative:
            # History pair t is (target feature at t, token t + 1): the prompt shifted left, the first token last.
            tokens = ids.roll(-1, dims=1).scatter(1, last[:, None], first[:, None])
            self.write_history(index, contiguous, start, tokens, aux)
            dstart = torch.tensor(dstarts, device=dev)
            self.dlengths.index_copy_(0, index, dstart)
            self.pend.index_copy_(0, index, lengths - dstart)

    # -- the batch of a step ---------------------------------------------------------------------------------------
    def batch_for(self, live_slots: list[int]) -> Batch:
        """Returns the batch over `live_slots` (increasing), padded to its bucket: the current one if it covers
        the same slots, else a new one (the current one's state written back first)."""
        b = self.batch
        if b is not None and [b.slots[i] for i in b.live] == live_slots:
            return b
        self.flush()
        B = bucket_size(len(live_slots), self.num_slots)
        slots = sorted(live_slots + heapq.nsmallest(B - len(live_slots), self.free))
        is_live = set(live_slots)
        live = [i for i, s in enumerate(slots) if s in is_live]
        contiguous = slots == list(range(B))
        index = self.long_tensor(slots)
        active = torch.tensor([s in is_live for s in slots], device=self.device)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t[:B] if contiguous else t.index_select(0, index)

        params = RowParams(rows(self.temperature), rows(self.top_p), rows(self.top_k),
                           **row_flags([self.params[s] for s in live_slots]))
        lengths = rows(self.lengths).masked_fill(~active, 0)  # pads read and write from position 0
        dlengths = pend = None
        if self.speculative:
            dlengths = rows(self.dlengths).masked_fill(~active, 0)
            pend = rows(self.pend).masked_fill(~active, 1)
        self.batch = Batch(slots, live, index, active, contiguous, params, rows(self.key), rows(self.budget),
                           rows(self.stop_ids), rows(self.done), rows(self.stopped), lengths, rows(self.last),
                           rows(self.gen_len), dlengths, pend)
        return self.batch

    def flush(self) -> None:
        """Writes the current batch's advancing state back to the slots (before the slots change)."""
        b, self.batch = self.batch, None
        if b is None:
            return
        for name in DYNAMIC:
            value = getattr(b, name)
            if value is None:
                continue
            if b.contiguous:  # the value may still be a view of these very slots
                getattr(self, name)[: b.size].copy_(value)
            else:
                getattr(self, name).index_copy_(0, b.index, value)
        # A request's done flag is only read by the first step after its prefill.
        self.done.index_fill_(0, b.index, False)
        self.stopped.index_fill_(0, b.index, False)

    def reset_pads(self, b: Batch) -> None:
        """Puts the pads back at length 0 with one pending pair (they advance with the step like any row)."""
        if len(b.live) == b.size:
            return
        b.lengths = b.lengths.masked_fill(~b.active, 0)
        if b.dlengths is not None:
            b.dlengths = b.dlengths.masked_fill(~b.active, 0)
            b.pend = b.pend.masked_fill(~b.active, 1)

    def target_view(self, b: Batch, span: int, compiled: bool = False) -> SlotView:
        return SlotView(self.kv, b.index, b.contiguous, b.lengths, span, compiled=compiled)

    def drafter_view(self, index: torch.Tensor, contiguous: bool, lengths: torch.Tensor, span: int,
                     compiled: bool = False) -> SlotView:
        return SlotView(self.dkv, index, contiguous, lengths, span, compiled=compiled)

    # -- the drafter's history -------------------------------------------------------------------------------------
    def read_history(self, index: torch.Tensor, contiguous: bool, start: torch.Tensor,
                     width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the history pairs (tokens [B, P], target features [B, P, 3H]) at positions start[b] + 0..P-1."""
        pos = start[:, None] + torch.arange(width, device=start.device)  # [B, P]
        if contiguous:
            B = len(index)
            return (self.hist_tok[:B].gather(1, pos),
                    self.hist_feat[:B].gather(1, pos[..., None].expand(-1, -1, self.hist_feat.shape[-1])))
        return self.hist_tok[index[:, None], pos], self.hist_feat[index[:, None], pos]

    def write_history(self, index: torch.Tensor, contiguous: bool, start: torch.Tensor, tokens: torch.Tensor,
                      features: torch.Tensor) -> None:
        """Writes (tokens [B, n], features [B, n, 3H]) at history positions start[b] + 0..n-1 of each row's slot
        (entries past a row's valid ones are padding, overwritten later)."""
        pos = start[:, None] + torch.arange(tokens.shape[1], device=start.device)  # [B, n]
        if contiguous:
            B = len(index)
            self.hist_tok[:B].scatter_(1, pos, tokens)
            self.hist_feat[:B].scatter_(1, pos[..., None].expand(-1, -1, features.shape[-1]), features)
            return
        self.hist_tok[index[:, None], pos] = tokens
        self.hist_feat[index[:, None], pos] = features.to(self.hist_feat.dtype)
