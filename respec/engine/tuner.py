"""The adaptive SD tuner: at every decode step, the draft length k (0 = plain decoding) that maximises expected
emitted tokens per second for the live batch, from a profiled cost model and a live acceptance estimate.

    rate(B, k) = B * E(k) / t(B, k),   E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i,
    t(B, 0) = s(B, 0) * c_plain(B),   t(B, k) = s(B, k) * c_spec(B)

- s(B, k): the seconds of the engine's own decode step with k drafts at batch B (drafter catch-up and chain,
  verify, acceptance, bookkeeping, the host sync), profiled once per (target, drafter architecture, dtype,
  device, threads, compile mode) on the grid of batch buckets by running real steps on scratch slots,
  interpolated in B, cached on disk (a corrupt cache file is rebuilt with a warning). Under compile="auto" both
  the eager and the compiled path are timed per cell and the faster one is kept: the engine runs that cell so.
- c_plain(B), c_spec(B): what the profile misses (longer contexts than profiled, other processes on the
  machine), learnt online as the median measured / profiled ratio of recent steps in each
  power-of-two batch bucket (robust to a preempted step); an unvisited bucket borrows its nearest neighbour's.
- a_j: the probability that draft j is accepted and kept given drafts 1..j-1 were (a draft past the row's stop
  token is discarded, so it counts as rejected), from the per-row accepted counts of each step (a row with c
  accepted of k tried positions 1..min(c+1, k) and accepted 1..c), as exponentially decayed counts shrunk
  towards a prior: position 1 towards `prior_accept`, position j towards a_{j-1} (so a position never tried
  inherits its neighbour's estimate). A drafter swap decays the evidence. A step counts at
  most `step_rows` rows: its rows share their phase (right after a prefill every row drafts its first,
  high-entropy tokens at once), so one wide step must not outweigh many narrow ones. Positions beyond the
  step's k fade faster (`untried_decay`): a draft length judged by a few unlucky steps drifts back to its
  neighbour's estimate and is tried again, instead of being ruled out for good by evidence nothing refreshes.
- Hysteresis: the k in use is kept unless another k is predicted `hysteresis` faster, so the choice does not
  flap when the live batch hovers at a break-even point (vLLM issue #49548).
- Exploration: while k = 0 the acceptance estimate would freeze; every `probe_every` consecutive plain steps the
  tuner probes the best k >= 1 for two steps, which measures the current drafter honestly at a bounded cost. The
  first speculative step after plain ones also has the drafter consume their backlog, so its time is left out of
  c_spec; the second step's is what a steady speculative step costs.
  The first time it would speculate (or decode plainly) in a batch bucket where that kind of step was never
  measured, it takes one step of the other kind there too, so both costs are measured rather than borrowed.
  Symmetrically, every `probe_every` consecutive speculative steps it takes one plain step where plain
  decoding is predicted within `plain_probe_margin` of the chosen k: c_plain is otherwise learnt from a single
  step and the profile's plain cost stands, and a profile that overprices plain steps by more than the predicted
  gain keeps the tuner speculating where it loses.
Decisions depend on measured times, so adaptive runs are reproducible in distribution only; the engine logs
every step's k (GenerationResult.trace) and `SpecConfig(mode="replay")` reproduces a run token for token.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import warnings
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from respec.engine.checkpoint import atomic_write_text, cache_root
from respec.engine.outputs import K_LIMIT
from respec.engine.sampling import SamplingParams
from respec.errors import ConfigError

if TYPE_CHECKING:
    from respec.engine.generate import Engine, StepStats

COST_FORMAT = 8  # bump when profiling or the steps change, so cached cost models are re-measured (8: costs
# relative to plain made nondecreasing in the batch size)


@dataclass(frozen=True)
class TunerConfig:
    """How the tuner profiles costs and weighs evidence; the defaults work for the embedded policy and on GPU."""

    batch_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # live batch sizes profiled (interpolated between)
    context: int = 64  # cached positions per row while profiling (attention cost at a typical rollout length)
    repeats: int = 5  # timed forwards per profiled cell; the fastest is kept
    prior_accept: float = 0.6  # a_1 before any evidence
    prior_weight: float = 8.0  # pseudo-rows of the prior
    decay: float = 0.95  # per observed step, old acceptance evidence is multiplied by this
    swap_decay: float = 0.1  # a drafter swap multiplies the acceptance evidence by this
    untried_decay: float = 0.7  # per step, evidence of positions beyond its k is multiplied by this too
    step_rows: int = 32  # the most rows one step's acceptance evidence counts for
    calibration_window: int = 16  # recent steps per batch bucket whose measured/profiled ratio is kept
    hysteresis: float = 0.05  # switch k only when another is predicted this much faster
    probe_every: int = 16  # after this many consecutive k = 0 steps, one probe step at the best k >= 1 (and
    # after this many k >= 1 steps, one plain step where plain is predicted within plain_probe_margin)
    plain_probe_margin: float = 0.25  # 0 = no plain probes
    use_disk_cache: bool = True  # keep profiled costs in cache_dir
    cache_dir: str | None = None  # None = $RESPEC_CACHE/tuner (default ~/.cache/respec/tuner)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_grid", tuple(sorted(set(int(b) for b in self.batch_grid))))
        if not self.batch_grid or self.batch_grid[0] < 1:
            raise ConfigError(f"batch_grid must hold batch sizes >= 1, got {list(self.batch_grid)}")
        if self.context < 1 or self.repeats < 1 or self.probe_every < 1 or self.step_rows < 1:
            raise ConfigError("context, repeats, probe_every and step_rows must be >= 1")
        if not 0 < self.prior_accept < 1 or self.prior_weight <= 0:
            raise ConfigError("prior_accept must be in (0, 1) and prior_weight > 0")
        if self.calibration_window < 1:
            raise ConfigError(f"calibration_window must be >= 1, got {self.calibration_window}")
        for name in ("decay", "swap_decay", "untried_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("hysteresis", "plain_probe_margin"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class CostModel:
    """Profiled seconds of whole decode steps (the engine's own step: drafts, verify, acceptance, bookkeeping, the
    host sync) with k = 0..k_max drafts at each grid batch size, on the faster of the eager and compiled paths
    where both were measured."""

    batches: list[int]  # increasing grid of batch sizes (batch buckets)
    steps: list[list[float]]  # [len(batches)][k_max + 1] seconds of a decode step with k drafts (k = 0: plain)
    compiled: list[list[bool]] | None = None  # [len(batches)][k_max + 1] whether that step runs compiled
    key: dict = field(default_factory=dict)  # what it was measured on
    measured: dict = field(default_factory=dict)  # path ("eager", "compiled") -> raw seconds, as `steps`

    @classmethod
    def from_parts(cls, batches: list[int], target: list[list[float]], draft: list[float], key: dict | None = None
                   ) -> CostModel:
        """Returns the model of steps costing target[b][k] (a verify forward over k + 1 tokens) + k * draft[b]."""
        steps = [[row[k] + k * d for k in range(len(row))] for row, d in zip(target, draft, strict=True)]
        return cls(list(batches), steps, key=key or {})

    @property
    def k_max(self) -> int:
        return len(self.steps[0]) - 1

    def _interp(self, values: list[float], batch: int) -> float:
        """Returns values at `batch`, linear between grid points and linear extrapolation beyond the ends."""
        bs = self.batches
        if len(bs) == 1:
            return values[0] * batch / bs[0] if batch > bs[0] else values[0]
        i = min(max(bisect_left(bs, batch), 1), len(bs) - 1)
        b0, b1, v0, v1 = bs[i - 1], bs[i], values[i - 1], values[i]
        if batch < b0:  # below the grid: no cheaper than the smallest batch
            return v0
        value = v0 + (v1 - v0) * (batch - b0) / (b1 - b0)
        # Beyond the grid a noisy last segment must not make larger batches cheaper than the largest profiled.
        return max(value, v1, 1e-9) if batch > b1 else max(value, 1e-9)

    def step_s(self, batch: int, k: int) -> float:
        """Returns the profiled seconds of one decode step with k drafts at live batch `batch`."""
        return self._interp([row[k] for row in self.steps], batch)

    def runs_compiled(self, batch: int, k: int) -> bool:
        """Returns whether a step at batch bucket `batch` with k drafts runs compiled (the grid batch nearest in
        log scale decides for buckets between grid points)."""
        if self.compiled is None or k > self.k_max:
            return False
        i = min(range(len(self.batches)), key=lambda j: (abs(math.log(self.batches[j] / batch)), -self.batches[j]))
        return self.compiled[i][k]


def expected_emitted(accept: list[float], k: int) -> float:
    """Returns E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i, the expected tokens a row emits in a step with k drafts."""
    total, run = 1.0, 1.0
    for a in accept[:k]:
        run *= a
        total += run
    return total


class _Calibration:
    """measured / profiled seconds of plain and of speculative steps, per power-of-two batch bucket.

    Each bucket keeps the log ratios of its last `window` steps of each kind and predicts with their median,
    taken together with two pseudo-steps at ratio 1 (the profile): one step preempted by another process moves
    nothing, a sustained slowdown (sampling and bookkeeping overhead, a longer context than profiled, a busy
    machine) moves the bucket within a few steps, and an unmeasured option is never judged worse than its
    profile (optimism, so it gets tried). An unvisited bucket borrows its nearest visited neighbour's ratio.
    """

    PRIOR = (0.0, 0.0)  # two pseudo-steps at the profiled cost

    def __init__(self, window: int):
        self.window = window
        self.stats: dict[tuple[bool, int], list[float]] = {}  # (speculative, bucket) -> recent log ratios

    @staticmethod
    def bucket(batch: int) -> int:
        return max(batch, 1).bit_length() - 1  # floor(log2 batch)

    def add(self, speculative: bool, batch: int, ratio: float) -> None:
        if not math.isfinite(ratio) or ratio <= 0:
            return
        recent = self.stats.setdefault((speculative, self.bucket(batch)), [])
        recent.append(math.log(ratio))
        del recent[: -self.window]

    def has(self, speculative: bool, batch: int) -> bool:
        """Returns whether steps of this kind were measured in this batch's bucket."""
        return (speculative, self.bucket(batch)) in self.stats

    def factor(self, speculative: bool, batch: int) -> float:
        """Returns the expected measured / profiled ratio of a step (1.0 before any evidence)."""
        b = self.bucket(batch)
        for kind in (speculative, not speculative):  # the other kind's ratio beats none: contention is shared
            seen = [bb for (sp, bb) in self.stats if sp == kind]
            if seen:
                recent = self.stats[(kind, min(seen, key=lambda bb: (abs(bb - b), bb)))]
                return math.exp(statistics.median([*recent, *self.PRIOR]))
        return 1.0


class Tuner:
    """Chooses each decode step's k from costs and acceptance; fed by the engine with every step's stats."""

    def __init__(self, costs: CostModel, k_max: int, config: TunerConfig | None = None):
        if not 1 <= k_max <= costs.k_max:
            raise ConfigError(f"k_max must be in [1, {costs.k_max}] for this cost model, got {k_max}")
        self.costs, self.k_max, self.config = costs, k_max, config or TunerConfig()
        self.accepted = [0.0] * k_max  # decayed count of rows that accepted draft j (given j - 1 accepted)
        self.tried = [0.0] * k_max  # decayed count of rows that tried draft j
        self.calibration = _Calibration(self.config.calibration_window)
        self.current_k: int | None = None
        self.plain_run = 0  # consecutive k = 0 decisions
        self.spec_run = 0  # consecutive k >= 1 decisions
        self.drafter_version: int | None = None
        self.last_k: int | None = None  # the k of the last observed step
        self.probe_k: int | None = None  # set while a probe's second step is due

    @classmethod
    def for_engine(cls, engine: Engine, k_max: int, config: TunerConfig | None = None) -> Tuner:
        """Returns a tuner for the engine's target and drafter, profiling costs (or loading them from disk)."""
        config = config or TunerConfig()
        if engine.drafter is None:
            raise ConfigError("adaptive speculative decoding needs a drafter: pass one to Engine")
        return cls(engine.step_costs(k_max, config), k_max, config)

    # -- estimates ---------------------------------------------------------------------------------------------
    def acceptance(self) -> list[float]:
        """Returns a_j for j = 1..k_max (see the module docstring)."""
        cfg, out, prior = self.config, [], self.config.prior_accept
        for acc, tried in zip(self.accepted, self.tried, strict=True):
            a = (acc + cfg.prior_weight * prior) / (tried + cfg.prior_weight)
            out.append(min(max(a, 1e-4), 1 - 1e-4))
            prior = out[-1]
        return out

    def predict_s(self, batch: int, k: int) -> float:
        """Returns the predicted seconds of a step at live batch `batch` with k drafts."""
        return self.costs.step_s(batch, k) * self.calibration.factor(k > 0, batch)

    def rates(self, batch: int) -> list[float]:
        """Returns the predicted emitted tokens per second for k = 0..k_max at live batch `batch`."""
        accept = self.acceptance()
        plain, spec = self.calibration.factor(False, batch), self.calibration.factor(True, batch)
        return [batch * expected_emitted(accept, k) / (self.costs.step_s(batch, k) * (spec if k else plain))
                for k in range(self.k_max + 1)]

    # -- the engine's interface ------------------------------------------------------------------------------
    def choose(self, batch: int, k_max: int | None = None) -> tuple[int, float]:
        """Returns (k, predicted seconds) for the next step at live batch `batch`, k <= min(k_max, self.k_max)."""
        limit = self.k_max if k_max is None else min(k_max, self.k_max)
        if self.probe_k is not None:  # the probe's second step: the first consumed the plain steps' backlog
            k, self.probe_k = min(self.probe_k, limit), None
            return k, self.predict_s(batch, k)
        rates = self.rates(batch)[: limit + 1]
        best = max(range(len(rates)), key=lambda k: (rates[k], -k))  # ties: the smaller k
        k = best
        if self.current_k is not None and self.current_k <= limit and \
                rates[self.current_k] * (1 + self.config.hysteresis) >= rates[best]:
            k = self.current_k
        self.current_k = k
        if k == 0:
            self.plain_run, self.spec_run = self.plain_run + 1, 0
            unmeasured = bool(self.calibration.stats) and not self.calibration.has(True, batch)
            if limit >= 1 and (self.plain_run > self.config.probe_every or unmeasured):
                self.plain_run = 0
                k = max(range(1, limit + 1), key=lambda j: (rates[j], -j))  # probe; current_k stays 0
                self.probe_k = k  # two steps: only the second times a steady speculative step
        else:
            self.plain_run, self.spec_run = 0, self.spec_run + 1
            if self.calibration.stats and not self.calibration.has(False, batch):
                # Plain decoding has never been measured at this batch size: its cost is only borrowed, and a
                # speculative choice would never correct it. One plain step measures it.
                k, self.spec_run = 0, 0
            elif self.spec_run > self.config.probe_every and \
                    rates[k] < rates[0] * (1 + self.config.plain_probe_margin):
                k, self.spec_run = 0, 0  # a plain probe: keeps c_plain measured where the choice is close
        return k, self.predict_s(batch, k)

    def observe(self, stats: StepStats) -> None:
        """Learns from one step: acceptance per position (k >= 1) and the overhead beyond the raw costs."""
        B, k = stats.batch, stats.k
        after_plain, self.last_k = self.last_k == 0, k
        # The first speculative step after plain ones also has the drafter consume the pairs those left behind
        # (up to BACKLOG_FLUSH): its time says nothing about a steady speculative step, which the profile times.
        # Counted, it made speculation look dear exactly where it was only probed, and kept it off there.
        if not (k > 0 and after_plain):
            self.calibration.add(k > 0, B, stats.seconds / self.costs.step_s(B, k))
        if k == 0:
            return
        if self.drafter_version is None:
            self.drafter_version = stats.drafter_version  # a new tuner models the drafter it first sees
        elif stats.drafter_version != self.drafter_version:
            return  # a step drafted by a drafter swapped out since says nothing about the current one
        cfg, tried = self.config, min(k, self.k_max)
        decay = [cfg.decay if j < tried else cfg.decay * cfg.untried_decay for j in range(self.k_max)]
        self.accepted = [v * d for v, d in zip(self.accepted, decay, strict=True)]
        self.tried = [v * d for v, d in zip(self.tried, decay, strict=True)]
        w = min(1.0, cfg.step_rows / max(len(stats.accepted), 1))  # one step counts at most step_rows rows
        # A row that accepted c drafts tried positions 1..min(c+1, k) and accepted 1..c: count rows by c once.
        rows_with = [0] * (k + 2)  # rows_with[c] = rows that accepted exactly c
        # Drafts accepted past a row's stop token or budget are discarded: they count as rejected, or the tuner
        # would draft past every stop of a multi-turn rollout for nothing.
        accepted = stats.accepted if stats.kept is None else \
            [min(a, max(c - 1, 0)) for a, c in zip(stats.accepted, stats.kept, strict=True)]
        for c in accepted:
            rows_with[min(c, k)] += 1
        at_least = len(accepted)  # rows that accepted >= j drafts, for j = 0, 1, ...
        for j in range(tried):
            self.tried[j] += w * at_least  # position j + 1 was tried by rows that accepted >= j
            at_least -= rows_with[j]
            self.accepted[j] += w * at_least  # and accepted by rows that accepted >= j + 1

    def on_drafter_change(self, version: int | None, keep_evidence: float | None = None) -> None:
        """Decays the acceptance evidence, which described the previous drafter, by `keep_evidence` (default
        config.swap_decay). A guarded successor (the online learner publishes only a drafter at least as good on
        recent rollouts) keeps it whole: its acceptance is at least the old estimate's."""
        self.drafter_version = version
        s = self.config.swap_decay if keep_evidence is None else keep_evidence
        self.accepted = [v * s for v in self.accepted]
        self.tried = [v * s for v in self.tried]

    # -- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Returns the learnt state (acceptance and overhead evidence, current k) as plain JSON-able values."""
        return {"accepted": self.accepted, "tried": self.tried, "current_k": self.current_k,
                "plain_run": self.plain_run, "spec_run": self.spec_run, "drafter_version": self.drafter_version,
                "last_k": self.last_k,
                "calibration": [[sp, b, list(v)] for (sp, b), v in self.calibration.stats.items()]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["accepted"]) != self.k_max:
            raise ConfigError(f"tuner state is for k_max={len(state['accepted'])}, this tuner has {self.k_max}")
        self.accepted, self.tried = list(state["accepted"]), list(state["tried"])
        self.current_k, self.plain_run = state["current_k"], state["plain_run"]
        self.spec_run = state.get("spec_run", 0)
        self.drafter_version = state.get("drafter_version")
        self.last_k = state.get("last_k")
        self.calibration.stats = {(bool(sp), int(b)): list(v) for sp, b, v in state["calibration"]}


# -- profiling ---------------------------------------------------------------------------------------------------

def sync_device(device: torch.device) -> None:
    """Waits for the device's queued work (timings on CUDA are otherwise of the launch, not the work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_key(engine: Engine, k_max: int, config: TunerConfig) -> dict:
    """Returns what a cost model depends on: both architectures, dtype, device, threads, grid, compile mode,
    torch."""
    target, drafter = engine.target, engine.drafter
    param = next(target.parameters())
    device = param.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"format": COST_FORMAT, "target": target.config.to_hf(),
            "drafter": asdict(drafter.config) if drafter is not None and k_max else None,
            "dtype": str(param.dtype), "device": f"{device.type}:{name}", "threads": torch.get_num_threads(),
            "batches": profile_grid(engine, config), "k_max": k_max, "context": config.context,
            "compile": engine.compile, "torch": torch.__version__}


@torch.inference_mode()
def profile_steps(engine: Engine, batches: list[int], k_max: int, paths: tuple[str, ...], context: int,
                  repeats: int) -> dict[str, list[list[float]]]:
    """Returns {path: seconds[batch][k]}: the fastest of `repeats` decode steps with k = 0..k_max drafts over
    `batch` rows of `context` cached tokens each, run eagerly ("eager") or compiled ("compiled") on scratch
    slots (the engine's requests and table are untouched: the profile may run while requests wait). It drives
    the engine's own table builder and decode step, so it times exactly what the engine runs. Each cell is run
    once untimed first (compiling there)."""
    from respec.engine.generate import drafter_prefill
    from respec.engine.slots import DYNAMIC

    speculative = k_max > 0
    if speculative and engine.drafter is None:
        raise ConfigError("profiling speculative steps needs a drafter")
    drafter = engine.drafter if speculative else None
    cfg = engine.target.config
    S = max(batches)
    # Compiled layers are specialised on the cache's strides: profile them on the engine's own table layout.
    context = max(1, min(context, engine.max_model_len - K_LIMIT - 2))
    max_tokens = engine.max_model_len if engine.compile != "off" else context + K_LIMIT + 2
    tab = engine._new_table(S, max_tokens, speculative)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (S, context), generator=gen).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=tab.max_tokens - context, ignore_eos=True)
    slots = tab.take(S)
    for s in slots:
        tab.owner[s] = s
    tab.prefill(engine.target, slots, prompts, [params] * S, list(range(S)), [[]] * S,
                tuple(drafter.aux_layer_ids) if drafter is not None else ())
    if drafter is not None:  # the drafter consumes the prompts once, as in a running engine
        drafter_prefill(drafter, tab, tab.batch_for(slots), list(range(S)))
    tab.flush()
    tab.fresh.clear()  # the prompts' first tokens are not read back
    out = {path: [[0.0] * (k_max + 1) for _ in batches] for path in paths}
    for i, B in enumerate(batches):
        b = tab.batch_for(list(range(B)))
        state = {name: getattr(b, name) for name in DYNAMIC}
        for k in range(k_max + 1):
            for path in paths:
                times = []
                for r in range(repeats + 1):
                    for name, value in state.items():
                        setattr(b, name, value)
                    sync_device(engine.device)
                    t0 = time.perf_counter()
                    engine._decode(tab, b, k, path == "compiled")
                    if r:
                        times.append(time.perf_counter() - t0)
                out[path][i][k] = min(times)  # preemption by other processes only ever adds time
        for name, value in state.items():
            setattr(b, name, value)
    return out


def profile_grid(engine: Engine, config: TunerConfig) -> list[int]:
    """Returns the batch sizes profiled: the config's grid up to the engine's slots (at least the smallest)."""
    grid = [b for b in config.batch_grid if b <= engine.max_running]
    return grid or [min(config.batch_grid[0], engine.max_running)]


def profile_costs(engine: Engine, k_max: int, config: TunerConfig) -> CostModel:
    """Returns a CostModel measured now by running the engine's own decode steps on scratch slots (k = 0..k_max
    at every grid batch; both paths under compile="auto", the faster kept per cell)."""
    from respec.engine.compile import compile_unavailable

    batches = profile_grid(engine, config)
    paths = {"auto": ("eager", "compiled"), "on": ("compiled",), "off": ("eager",)}[engine.compile]
    if engine.compile == "auto" and compile_unavailable(engine.device) is not None:
        paths = ("eager",)
    measured = {}
    for path in paths:
        try:
            measured.update(profile_steps(engine, batches, k_max, (path,), config.context, config.repeats))
        except Exception as e:  # noqa: BLE001 - a compiler failure under "auto" leaves the eager path
            if path != "compiled" or engine.compile != "auto":
                raise
            warnings.warn(f"compiled decode steps failed ({type(e).__name__}: {e}); running eagerly", stacklevel=2)
    paths = tuple(measured)
    smoothed = {path: smooth_across_batches([smooth_verify_costs(row) for row in rows])
                for path, rows in measured.items()}
    steps, compiled = [], []
    for i in range(len(batches)):
        best = [min(paths, key=lambda p, k=k: smoothed[p][i][k]) for k in range(k_max + 1)]
        steps.append([smoothed[p][i][k] for k, p in enumerate(best)])
        compiled.append([p == "compiled" for p in best])
    return CostModel(batches, steps, compiled, cost_key(engine, k_max, config), measured)


def smooth_verify_costs(seconds: list[float]) -> list[float]:
    """Returns the step costs t(k), k = 0..k_max, of one batch size with noise removed: k = 0 as measured
    (plain decoding, the alternative to every k), k >= 1 on the least-squares line through k >= 1, and never
    below t(0). A speculative step costs a fixed part plus a part linear in k; one cell of the profile
    disturbed by another process would otherwise rank two draft lengths the wrong way round."""
    if len(seconds) < 3:
        return [max(seconds[0], s) if i else s for i, s in enumerate(seconds)]
    pts = list(enumerate(seconds[1:], start=1))
    mx, my = sum(n for n, _ in pts) / len(pts), sum(t for _, t in pts) / len(pts)
    slope = max(sum((n - mx) * (t - my) for n, t in pts) / sum((n - mx) ** 2 for n, _ in pts), 0.0)
    return [seconds[0]] + [max(my + slope * (n - mx), seconds[0]) for n, _ in pts]


def smooth_across_batches(rows: list[list[float]]) -> list[list[float]]:
    """Returns step costs t[batch][k] whose costs relative to plain, t(b, k) / t(b, 0), never fall as the batch
    grows (the least-squares nondecreasing fit over the batch sizes, per k; plain costs as given). Verifying k + 1
    tokens per row costs relatively more as a step moves from overhead bound to compute bound, so a batch size
    whose speculative steps look cheaper than at both neighbours was disturbed while it was profiled; left alone,
    it makes the tuner pick a k there that no neighbouring batch size would."""
    plain = [row[0] for row in rows]
    ratios = [nondecreasing([row[k] / row[0] for row in rows]) for k in range(len(rows[0]))]
    return [[t0 * ratios[k][i] for k in range(len(rows[0]))] for i, t0 in enumerate(plain)]


def nondecreasing(values: list[float]) -> list[float]:
    """Returns the nondecreasing sequence closest to `values` in least squares (scipy's isotonic regression)."""
    from scipy.optimize import isotonic_regression

    return [float(x) for x in isotonic_regression(values).x]


def load_or_profile(engine: Engine, k_max: int, config: TunerConfig) -> CostModel:
    """Returns the cached cost model of this engine's setup (see `cost_key`), profiling on a miss.

    A cache file that cannot be read is re-measured and rewritten, with a warning.
    """
    key = cost_key(engine, k_max, config)
    path = None
    if config.use_disk_cache:
        root = Path(config.cache_dir) if config.cache_dir else cache_root() / "tuner"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = root / f"costs-{digest}.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
                costs = CostModel(data["batches"], data["steps"], data["compiled"], data["key"],
                                  data.get("measured", {}))
                if costs.batches != key["batches"] or len(costs.steps) != len(costs.batches) or \
                        any(len(r) != k_max + 1 for r in costs.steps) or \
                        (costs.compiled is not None and [len(r) for r in costs.compiled] !=
                         [len(r) for r in costs.steps]) or \
                        not all(math.isfinite(x) and x > 0 for r in costs.steps for x in r):
                    raise ValueError("shape or values do not match the key")
                return costs
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                warnings.warn(f"tuner cost cache {path} is unreadable ({e}); re-profiling", stacklevel=2)
    costs = profile_costs(engine, k_max, config)
    if path is not None:
        atomic_write_text(path, json.dumps(asdict(costs), default=str) + "\n")
    return costs
