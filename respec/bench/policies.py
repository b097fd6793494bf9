"""The k choosers that ReSpec's tuner is measured against, re-implemented on our engine's chooser protocol
(`choose(batch, k_max) -> (k, None)` before each decode step, `observe(StepStats)` after it):

- `TablePolicy`: vLLM's dynamic speculative decoding, a fixed k per live-batch-size range filled in offline
  (`table_from_cells` fills it from a `respec bench spec` grid, as a vLLM user would from a static sweep);
- `BanditPolicy`: TLT/FastRL's epsilon-greedy bandit over draft lengths, one bandit per batch-size group, with
  SD gated off until the batch has been small for a while.

Both are exact (any k is); they differ from `respec.engine.tuner.Tuner` only in how k is chosen.
"""

from __future__ import annotations

import random
import statistics
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from respec.errors import ConfigError

if TYPE_CHECKING:
    from respec.engine.generate import StepStats


class TablePolicy:
    """Chooses k from a static batch-size table: vLLM's `num_speculative_tokens_per_batch_size`.

    vLLM (vllm-project/vllm, `SpeculativeConfig.num_speculative_tokens_per_batch_size` in
    vllm/config/speculative.py; lookup built by `build_dynamic_sd_schedule_lookup` in
    vllm/v1/spec_decode/dynamic/utils.py) takes a list of inclusive `(range_start, range_end, k)` entries:
    ranges sorted and non-overlapping, the first starting at 1, k >= 0 with k = 0 turning SD off for that range,
    k clamped to `num_speculative_tokens`; a gap between ranges, and every batch beyond the last range, inherits
    the previous range's k. The scheduler looks the table up every step with the number of requests scheduled in
    that step (`dynamic_sd_lookup[len(num_scheduled_tokens)]` in vllm/v1/core/sched/scheduler.py), i.e. the live
    batch. (Newer vLLM also accepts 5-item entries with a context-length range; not mirrored here.)

    Because gaps inherit, a table is fully described by the start of each range: `table` maps each range's
    lower bound to its k, and `choose(batch)` returns the k of the largest bound <= batch (clamped to k_max).
    """

    def __init__(self, table: dict[int, int]):
        if not table:
            raise ConfigError("TablePolicy needs a table {lowest batch size of a range: k}, got an empty one")
        if any(not isinstance(b, int) or b < 1 for b in table) or \
                any(not isinstance(k, int) or k < 0 for k in table.values()):
            raise ConfigError(f"TablePolicy table maps batch sizes >= 1 to k >= 0, got {table}")
        if min(table) != 1:
            raise ConfigError(f"TablePolicy's first range must start at batch 1 (as vLLM requires, so every batch "
                              f"size has a k), got bounds {sorted(table)}")
        self.bounds = sorted(table)
        self.ks = [table[b] for b in self.bounds]

    @property
    def table(self) -> dict[int, int]:
        return dict(zip(self.bounds, self.ks, strict=True))

    def k_for(self, batch: int) -> int:
        """Returns the table's k for a live batch of `batch` rows (before clamping to k_max)."""
        return self.ks[max(bisect_right(self.bounds, batch) - 1, 0)]

    def vllm_schedule(self) -> list[tuple[int, int, int]]:
        """Returns the table in vLLM's format: inclusive (range_start, range_end, k); the last range is open in
        vLLM anyway (batches beyond it inherit its k), so it ends at its own start."""
        ends = [b - 1 for b in self.bounds[1:]] + [self.bounds[-1]]
        return list(zip(self.bounds, ends, self.ks, strict=True))

    def choose(self, batch: int, k_max: int) -> tuple[int, None]:
        return min(self.k_for(batch), k_max), None

    def observe(self, stats: StepStats) -> None:
        """A static table learns nothing."""


def table_from_cells(cells: Iterable[dict]) -> dict[int, int]:
    """Returns {range start: k} with, for each measured batch size, the fastest k of the grid (0 when plain won).

    `cells` are `bench_spec` cells of one temperature (dicts with batch, mode, k and tokens_per_s or
    speedup_vs_plain); only "plain" and "static" cells count. Ranges start at each measured batch size, the
    smallest at 1, so a live batch between two measured sizes uses the smaller size's k. Ties go to the
    smaller k (plain over speculative).
    """
    best: dict[int, tuple[float, int]] = {}
    temperatures = set()
    for c in cells:
        if c["mode"] not in ("plain", "static"):
            continue
        temperatures.add(c.get("temperature"))
        score = c["tokens_per_s"] if "tokens_per_s" in c else c["speedup_vs_plain"]
        k = 0 if c["mode"] == "plain" else int(c["k"])
        b = int(c["batch"])
        if b not in best or (score, -k) > (best[b][0], -best[b][1]):
            best[b] = (score, k)
    if not best:
        raise ConfigError("table_from_cells needs 'plain' or 'static' cells (run bench spec with those modes)")
    if len(temperatures) > 1:
        raise ConfigError(f"table_from_cells got cells of temperatures {sorted(temperatures, key=str)}: "
                          "pass one temperature's cells (a table is filled per workload)")
    bounds = sorted(best)
    return {(1 if i == 0 else b): best[b][1] for i, b in enumerate(bounds)}


def sd_threshold_from_table(table: dict[int, int]) -> int | None:
    """Returns the largest live batch at which the table speculates (the end of its last k > 0 range): the
    `bs_threshold` a FastRL user would set from the same grid. None when the open-ended last range speculates
    (no gate), 0 when no range does (never speculate)."""
    bounds = sorted(table)
    on = [i for i, b in enumerate(bounds) if table[b] > 0]
    if not on:
        return 0
    last = on[-1]
    return None if last == len(bounds) - 1 else bounds[last + 1] - 1


# FastRL's batch-size groups (MABGroupManager.__init__): one bandit per group, a batch uses the largest
# group <= its size, so rewards measured at batch 40 and batch 47 are pooled but batch 31 and 32 are not.
BATCH_GROUPS = (*range(1, 32), *range(32, 128, 8), *range(128, 257, 32))
STABLE_REFRESH = 0.1  # FastRL recomputes an arm's cross-group median accept length on 10% of steps


def batch_group(batch: int) -> int:
    """Returns FastRL's batch-size group of a live batch: the largest group <= batch (the smallest below it)."""
    return BATCH_GROUPS[max(bisect_right(BATCH_GROUPS, batch) - 1, 0)]


class BanditPolicy:
    """Chooses k like TLT/FastRL's adaptive SD: SD gated off while the batch is large, then an epsilon-greedy
    bandit over draft lengths, one per batch-size group, scored on the median of a sliding reward window.

    Learnt from mit-han-lab/fastrl (commit bce3df7), third-party/sglang/python/sglang/srt/speculative/:
    - eagle_mab.py `EpsilonGreedyMAB` (the server default algorithm "EG"): with probability epsilon = 0.1 a
      uniformly random arm, else the arm with the highest median reward in its window; an arm with no reward
      yet scores +inf, so every arm is tried once first (ties: the first arm, here the smallest k).
      `MABStrategyMetrics`: rewards and accept lengths per arm in deques of `window` entries; window = 300 is
      `--speculative-mab-window-size`'s default (server_args.py). `MABGroupManager`: one bandit per batch-size
      group (BATCH_GROUPS), the group being the largest <= the live batch.
    - eagle_worker.py `record_mab_strategy_metrics`: reward = accept_length x batch / step seconds, where a
      step's accept length is mean accepted drafts + 1 (our emitted / batch); with several arms the accept length
      in the reward is the arm's "stable" one (`get_stable_accept_length`): the median over its accept-length
      windows in all groups, refreshed on 10% of steps, so acceptance noise does not swamp the timing signal.
      FastRL's first pull of an arm gets a stable accept length of 0 (no history), hence reward 0; we use that
      step's own accept length instead (`stable_accept=False` uses the step's own one always: emitted / seconds).
    - eagle_worker.py `should_enable_sd`: with `bs_threshold` set (verl/trainer/config/fastrl_trainer.yaml:
      `speculative.bs_threshold: 32`; sglang's default None = SD always on), SD is off until the decode batch
      has been <= threshold for 10 consecutive steps (`adaptive_spec_warmup_checks`), the 10th of which still
      runs plain; then it stays on until the gate is reset, which the scheduler's `flush_cache` does between
      rollouts. Call `reset_gate()` at the start of each rollout (generate call); a live batch larger than the
      previous step's also resets it, since within one of our generate calls the batch only shrinks.
    Arms are k >= 1 only: FastRL's arms are "steps_topk_draft_tokens" strategies that MABConfig validates as
    positive, so the bandit itself never turns SD off; only the gate does. FastRL's tree drafts (topk > 1) map to
    our chain drafts as steps = draft tokens = k. Not mirrored: its OOM filter (draft tokens x batch <= 2048)
    and the "BEG" variant (a predefined draft-token bucket per batch range, i.e. a table as in `TablePolicy`,
    with epsilon-greedy only among strategies sharing that bucket). Exploration draws from `random.Random(seed)`.
    """

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 6, 8), epsilon: float = 0.1, window: int = 300,
                 sd_batch_threshold: int | None = 32, warmup_steps: int = 10, stable_accept: bool = True,
                 seed: int = 0):
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ConfigError(f"BanditPolicy arms are draft lengths k >= 1 (the gate turns SD off), got {list(ks)}")
        if not 0 <= epsilon <= 1:
            raise ConfigError(f"epsilon must be in [0, 1], got {epsilon}")
        if window < 1 or warmup_steps < 1:
            raise ConfigError("window and warmup_steps must be >= 1")
        if sd_batch_threshold is not None and sd_batch_threshold < 0:
            raise ConfigError(f"sd_batch_threshold must be >= 0 or None (no gate), got {sd_batch_threshold}")
        self.arms = sorted(set(ks))
        self.epsilon, self.window, self.warmup_steps = epsilon, window, warmup_steps
        self.sd_batch_threshold, self.stable_accept = sd_batch_threshold, stable_accept
        self.rng = random.Random(seed)
        self.rewards: dict[int, dict[int, deque[float]]] = {}  # group -> arm -> the last `window` rewards
        self.accept_lengths: dict[int, dict[int, deque[float]]] = {}  # group -> arm -> last accept lengths
        self._stable: dict[int, float] = {}  # arm -> cached cross-group median accept length
        self.reset_gate()

    # -- the gate: SD off until the batch has been small for warmup_steps consecutive steps ----------------------
    def reset_gate(self) -> None:
        """Closes the SD gate (a new rollout starts with a large batch); the bandits keep their statistics."""
        self.sd_on = self.sd_batch_threshold is None
        self.small_steps = 0
        self.last_batch: int | None = None

    def _gate(self, batch: int) -> bool:
        if self.last_batch is not None and batch > self.last_batch:
            self.reset_gate()  # a new generate call: our batch never grows within one
        self.last_batch = batch
        if self.sd_on:
            return True
        if batch <= self.sd_batch_threshold:
            self.small_steps += 1
            self.sd_on = self.small_steps >= self.warmup_steps  # the step that opens the gate is still plain
        else:
            self.small_steps = 0
        return False

    # -- the bandit --------------------------------------------------------------------------------------------
    def _windows(self, table: dict[int, dict[int, deque[float]]], group: int) -> dict[int, deque[float]]:
        if group not in table:
            table[group] = {k: deque(maxlen=self.window) for k in self.arms}
        return table[group]

    def score(self, batch: int, k: int) -> float:
        """Returns the median reward (tokens/s) of arm k in the batch's group, +inf while it has none."""
        rewards = self.rewards.get(batch_group(batch), {}).get(k)
        return statistics.median(rewards) if rewards else float("inf")

    def choose(self, batch: int, k_max: int) -> tuple[int, None]:
        if not self._gate(batch):
            return 0, None
        valid = [k for k in self.arms if k <= k_max]
        if not valid:
            return min(self.arms[0], k_max), None
        if self.rng.random() < self.epsilon:
            return self.rng.choice(valid), None
        return max(valid, key=lambda k: self.score(batch, k)), None  # max keeps the first (smallest k) of ties

    def _stable_accept_length(self, k: int, own: float) -> float:
        """Returns arm k's median accept length over all groups (cached; refreshed on STABLE_REFRESH of calls)."""
        if self.rng.random() < STABLE_REFRESH or not self._stable.get(k):
            values = [v for arms in self.accept_lengths.values() for v in arms[k]]
            self._stable[k] = statistics.median(values) if values else 0.0
        return self._stable[k] or own

    def observe(self, stats: StepStats) -> None:
        """Records a speculative step's reward (accept length x batch / seconds) in its group's window."""
        k = stats.k
        if k == 0 or k not in self.arms or stats.seconds <= 0:
            return
        accept_length = stats.emitted / stats.batch  # mean accepted drafts + 1
        if self.stable_accept and len(self.arms) > 1:
            accept = self._stable_accept_length(k, accept_length)
        else:
            accept = accept_length
        group = batch_group(stats.batch)
        self._windows(self.rewards, group)[k].append(accept * stats.batch / stats.seconds)
        self._windows(self.accept_lengths, group)[k].append(accept_length)
