"""The online drafter learner: keeps the EAGLE-3 drafter aligned with the moving policy (ReSpec's second and third
ideas: online distillation on the rollouts RL produces anyway, weighted by reward, run asynchronously).

Data. After each update the trainer submits the step's rollouts as its own forward saw them (`StepRollouts`):
token ids, the actor's aux features at the drafter's layers, the actor's next-token log-distribution on the draft
vocab, and each sequence's reward and advantage. No extra target forward is run. The buffer keeps the last
`buffer_steps` steps; a share of each step's prompts (whole groups) is held out for the guard.

Loss. `world.distill.distill_loss` (TTT-unrolled forward KL to the target), with per-sequence weights.

Reward weighting (ReSpec publishes no formula; this is ours). The policy update moves probability towards
sequences with positive advantage. The KL-regularised improvement step has the closed form
    pi_{t+1}(y | x) = pi_t(y | x) exp(A(x, y) / tau) / Z(x),
so the distillation loss under the *next* policy's rollouts (where the drafter will be used) is, by importance
sampling from the rollouts we have (drawn from pi_t),
    E_{y ~ pi_{t+1}}[KL_y] = E_{y ~ pi_t}[w(y) KL_y],   w(y) = exp(A(x, y) / tau) / mean_{y' in group(x)} exp(A / tau).
Normalising within the prompt's group estimates Z(x) and keeps every prompt's total weight at G (the prompt
distribution does not move). The weights are clipped to `max_weight` to bound the estimator's variance. tau is
`weight_temperature`; tau -> infinity (or weighting="uniform") is plain online KD. With GRPO's group-normalised
advantages (|A| <= ~2.5 for G = 8) and tau = 1 a correct answer among mostly wrong ones weighs up to 4x.
The targets are full distributions at every position, so weights only choose contexts, and their variance costs
effective samples; whether their aim gains more than that is measured per world (docs/results.md), and the
default is uniform where it does not.

Lookahead targets (`lookahead` = eta > 0; also ours). Sequence weights only choose which contexts count; at a
position the target stays p_t, the policy that produced the rollouts, one to a few updates behind the policy the
drafter will serve. For a softmax over logits z, the policy-gradient step on a sampled token y with advantage A is
dz = A (onehot(y) - p), so the targets are moved one such step ahead: p' = softmax(log p_t + eta A (onehot(y) - p_t)).
Averaged over the buffer the drafter learns the expected shift, which points where the update moves the policy
(towards what was rewarded); eta sets how far ahead, 0 turns it off.

Guard. Every `publish_every` learner steps the candidate's expected tokens per verify step (static k = guard_k,
T = 1, `teacher_forced_emitted`) on the held-out rows of the newest two steps is compared with the published drafter's
on the same rows; a candidate that is worse is not published (it keeps training).

Parts. `ReplayBuffer` (the last `buffer_steps` steps, their held-out split, weights and sampling),
`DrafterTrainer` (the training copy of the drafter: one step, the guard, publishing, crash recovery) and
`Scheduler` (when a step may start), composed by `Learner`, which the trainer talks to.

When it runs. One control: the scheduler's budget, the number of learner steps that may still start. A
submission grants `steps_per_rollout` (unused steps of a slow learner do not pile up); with `schedule="update"`
the trainer opens the budget for the policy update only (`update_window`), so the learner never starts a step
while the engine runs: on a machine where the learner's core shares caches and memory bandwidth with the
rollout's, this trades learner steps for a rollout without a neighbour (docs/rl.md). `paused()` sets the budget
to 0, waits for the step in flight and gives the budget back afterwards: checkpoints take the learner's state
and the engine's drafter as of one moment this way, and `respec experiment` keeps a learner to its own
trainer's steps.

Where it runs. mode "async" trains in a daemon thread: torch ops release the GIL, so with the trainer's torch
thread count (1 by default) the learner occupies the core that rollout and the update leave idle. mode "sync"
runs the same steps in the trainer's thread inside `submit` (deterministic). With `trainer.backend=ray` an async
learner runs this class in a Ray actor on a CPU of its own (`respec.cluster.learner_actor`). Publication:
`publish(drafter, version)` gets a copy in the engine's dtype (the trainer passes `Engine.set_drafter`, which
takes effect between decode steps). A crash is logged, the learner restarts from the last published weights with a fresh optimiser; after
`max_restarts` consecutive crashes it stops and training goes on with the last good drafter.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from respec.engine.drafter import Eagle3Drafter, inv_freq_fp32
from respec.errors import TrainingError
from respec.rl.config import LearnerConfig
from respec.world.distill import DistillBatch, distill_loss, ttt_logits

Publish = Callable[[Eagle3Drafter, int], None]  # (drafter copy in the engine's dtype, version) -> None
Log = Callable[..., None]


@dataclass
class StepRollouts:
    """One RL step's rollouts as the actor's forward saw them, in the layout of `world.distill.DistillBatch`
    (position t of a row pairs the aux feature at t with the next token x_{t+1})."""

    step: int  # the RL step whose rollouts these are (1-based)
    input_ids: torch.Tensor  # [N, L] prompt + completion ids, right-padded with 0
    prompt_lens: torch.Tensor  # [N]
    loss_mask: torch.Tensor  # [N, L] bool: x_{t+1} is a completion token
    features: torch.Tensor | None  # [N, L, 3H] the actor's aux states at the drafter's layers (first epoch's
    # forward, detached; minibatch i's rows after i updates), None without a drafter
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    group_size: int = 1  # rows are consecutive groups of this many samples of one prompt
    target_logp: torch.Tensor | None = None  # [N, L, Vd] log p_t on the draft vocab (T = 1, renormalised), from
    # the same forward as `features`; None when no learner asked for it
    embed_weight: torch.Tensor | None = None  # [V, H] the policy's token embedding at that forward


def lookahead_targets(target_logp: torch.Tensor, input_ids: torch.Tensor, advantages: torch.Tensor, eta: float,
                      draft_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the distillation targets moved one policy-gradient step ahead (see the module docstring):
    log softmax(log p_t + eta * A * (onehot(x_{t+1}) - p_t)) [N, T, Vd], for target_logp [N, T, Vd] (p_t predicts
    x_{t+1}), input_ids [N, T], advantages [N] and the draft vocab's target ids (None: the full vocab). Positions
    whose next token lies outside the draft vocab keep p_t; eta = 0 returns target_logp unchanged."""
    if eta == 0:
        return target_logp
    N, T, Vd = target_logp.shape
    nxt = input_ids.roll(-1, 1)  # [N, T] x_{t+1} (the last column wraps and is never masked in)
    if draft_ids is not None:  # target id -> draft index, -1 outside the draft vocab
        to_draft = torch.full((int(draft_ids.max()) + 1,), -1, dtype=torch.long, device=nxt.device)
        to_draft[draft_ids] = torch.arange(draft_ids.numel(), device=nxt.device)
        nxt = torch.where(nxt < to_draft.numel(), to_draft[nxt.clamp(max=to_draft.numel() - 1)], -1)
    inside = (nxt >= 0) & (nxt < Vd)  # [N, T]
    onehot = F.one_hot(nxt.clamp(0, Vd - 1), Vd).to(target_logp.dtype)  # [N, T, Vd]
    step = advantages.to(target_logp.dtype)[:, None, None] * (onehot - target_logp.exp())
    moved = torch.log_softmax(target_logp + eta * step, -1)
    return torch.where(inside[..., None], moved, target_logp)


def sequence_weights(advantages: torch.Tensor, group_size: int, weighting: str = "reward",
                     temperature: float = 1.0, max_weight: float = 4.0) -> torch.Tensor:
    """Returns the distillation weight of each sequence [N] (see the module docstring): ones for "uniform";
    for "reward", exp(A / temperature) normalised to mean 1 within each group of `group_size`, clipped to
    max_weight."""
    if weighting == "uniform":
        return torch.ones_like(advantages, dtype=torch.float32)
    if weighting != "reward":
        raise ValueError(f"weighting must be 'reward' or 'uniform', got {weighting!r}")
    a = advantages.float().view(-1, group_size) / temperature  # [P, G]
    w = torch.softmax(a, dim=1) * group_size  # exp(a) / mean_group exp(a), computed stably
    return w.clamp(max=max_weight).flatten()


@torch.no_grad()
def teacher_forced_emitted(drafter: Eagle3Drafter, batch: DistillBatch, k: int) -> float:
    """Returns the expected tokens emitted per verify step of static-k SD at T = 1, estimated teacher-forced.

    For a catch-up ending at position t, the j-th chained draft is accepted with probability
    a_j(t) = sum_v min(p_{t+j+1}(v), q_j(v)) (the chain rule's acceptance at T = 1), and the step emits
    1 + sum_{j<k} prod_{i<=j} a_i(t) tokens in expectation. The unroll conditions on the rollout's own tokens
    (target samples) rather than on accepted drafts, and positions past a sequence's end count as rejections:
    an estimate that ranks drafters on the same rows, which is what the guard needs.
    """
    logits = ttt_logits(drafter, batch.input_ids, batch.features, k)  # k x [B, T, Vd]
    mask0 = batch.loss_mask.roll(-1, 1)  # step 0 at t reads p_{t+1}: valid iff x_{t+2} is a completion token
    mask0[:, -1] = False
    chain = torch.ones(batch.loss_mask.shape, device=batch.loss_mask.device)  # [B, T]
    emitted = torch.ones_like(chain)
    for j, step_logits in enumerate(logits):
        logp = batch.target_logp.roll(-(j + 1), 1)  # [B, T, Vd] p_{t+j+1}
        valid = batch.loss_mask.roll(-(j + 1), 1)
        valid[:, batch.loss_mask.shape[1] - j - 1:] = False
        overlap = torch.minimum(logp.exp(), F.softmax(step_logits.float(), -1)).sum(-1)  # [B, T]
        chain = chain * overlap * valid
        emitted = emitted + chain
    n = mask0.sum()
    return float((emitted * mask0).sum() / n) if n else 0.0


def _cat_batches(parts: list[DistillBatch]) -> DistillBatch:
    """Returns the rows of several batches in one, right-padded to the longest."""
    T = max(p.input_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]))

    return DistillBatch(torch.cat([pad(p.input_ids) for p in parts]), torch.cat([pad(p.features) for p in parts]),
                        torch.cat([pad(p.target_logp) for p in parts]), torch.cat([pad(p.loss_mask) for p in parts]))


@dataclass
class _Entry:
    step: int
    train: DistillBatch
    weights: torch.Tensor  # [n_train]
    held_out: DistillBatch


class ReplayBuffer:
    """The rollouts of the last `buffer_steps` RL steps, each split by whole groups into training rows (with their
    weights and, with lookahead, moved targets) and held-out rows for the guard. Thread-safe: the trainer adds
    while the learner samples."""

    def __init__(self, config: LearnerConfig, device: torch.device, draft_ids: torch.Tensor | None, seed: int):
        self.config, self.device, self.draft_ids = config, device, draft_ids
        self.gen = torch.Generator().manual_seed(seed)  # the held-out split and the sampling
        self._entries: deque[_Entry] = deque(maxlen=config.buffer_steps)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self.entries())

    def entries(self) -> list[_Entry]:
        """Returns the entries, oldest first (a snapshot)."""
        with self._lock:
            return list(self._entries)

    def add(self, r: StepRollouts) -> None:
        """Adds one RL step's rollouts (the oldest step goes when the buffer is full)."""
        if r.features is None or r.target_logp is None:
            raise TrainingError("the learner needs the step's features and target distributions (the trainer "
                                "collects them when a drafter and learner.mode != off are set)")
        mask = r.loss_mask
        batch = DistillBatch(r.input_ids.to(self.device), r.features.to(self.device).float(),
                             r.target_logp.to(self.device).float(), mask.to(self.device))
        N, G = r.input_ids.shape[0], r.group_size
        groups = N // G
        n_held = max(1, round(self.config.holdout_fraction * groups)) if groups > 1 else 0
        with self._lock:
            order = torch.randperm(groups, generator=self.gen)
        held_groups, train_groups = order[:n_held], order[n_held:]

        def rows(g: torch.Tensor) -> torch.Tensor:
            return (g[:, None] * G + torch.arange(G)[None]).flatten().sort().values.to(self.device)

        weights = sequence_weights(r.advantages.to(self.device), G, self.config.weighting,
                                   self.config.weight_temperature, self.config.max_weight)
        train_rows = rows(train_groups)
        held_rows = rows(held_groups) if n_held else train_rows  # a single group: the guard sees training rows
        train = _take(batch, train_rows)
        if self.config.lookahead:  # the guard keeps p_t: it measures the drafter against the policy it serves
            train = DistillBatch(train.input_ids, train.features,
                                 lookahead_targets(train.target_logp, train.input_ids,
                                                   r.advantages.to(self.device)[train_rows], self.config.lookahead,
                                                   self.draft_ids), train.loss_mask)
        entry = _Entry(r.step, train, weights[train_rows], _take(batch, held_rows))
        with self._lock:
            self._entries.append(entry)

    def sample(self, entries: list[_Entry]) -> tuple[DistillBatch, torch.Tensor]:
        """Returns batch_size training rows drawn uniformly from `entries`, and their weights."""
        sizes = torch.tensor([len(e.train) for e in entries])
        total = int(sizes.sum())
        with self._lock:
            pick = torch.randperm(total, generator=self.gen)[: self.config.batch_size].sort().values
        starts = torch.cumsum(sizes, 0) - sizes
        parts, weights = [], []
        for i, e in enumerate(entries):
            local = pick[(pick >= starts[i]) & (pick < starts[i] + sizes[i])] - starts[i]
            if len(local):
                local = local.to(self.device)
                parts.append(_take(e.train, local))
                weights.append(e.weights[local])
        return _cat_batches(parts), torch.cat(weights)

    def state_dict(self) -> dict:
        with self._lock:
            return {"entries": [(e.step, _batch_tensors(e.train), e.weights.clone(), _batch_tensors(e.held_out))
                                for e in self._entries],
                    "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._entries.clear()
            for step, train, weights, held in state["entries"]:
                self._entries.append(_Entry(step, DistillBatch(*train), weights, DistillBatch(*held)))
            self.gen.set_state(state["gen"])


class DrafterTrainer:
    """Owns the training copy of the drafter, its optimiser, the published version (the guard's reference) and
    the learner's own token embedding; `step(entries)` runs one learner step, guard and publication included."""

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, publish: Publish,
                 sample: Callable[[list[_Entry]], tuple[DistillBatch, torch.Tensor]]):
        self.config, self.publish_fn, self.sample = config, publish, sample
        self.device = drafter.fc.weight.device
        self.publish_dtype = drafter.fc.weight.dtype
        # The learner's own embedding: the shared one is the engine's, updated in place while the learner reads.
        emb = drafter.embed_tokens
        self.embed = torch.nn.Embedding(emb.num_embeddings, emb.embedding_dim, device=self.device)
        self.embed.weight.data.copy_(emb.weight.detach().float())
        self.embed.requires_grad_(False)
        self.drafter = self._own_copy(drafter).train().requires_grad_(True)
        self.published = self._own_copy(drafter).eval().requires_grad_(False)
        self.optimizer = self._new_optimizer()
        self.version = 0  # of the published drafter (0 = the one training started with)
        self.trained_through = 0  # newest RL step in the buffer when the published drafter was chosen
        self.steps = 0  # learner optimiser steps
        self.published_count = self.rejected_count = 0
        self.guard_last: tuple[float, float] | None = None  # (candidate, published) at the last check

    def _own_copy(self, drafter: Eagle3Drafter) -> Eagle3Drafter:
        """Returns an fp32 copy of `drafter` reading the learner's own embedding."""
        out = copy.deepcopy(drafter).float()  # the copy still shares the engine's embedding until rebound
        out.bind_embedding(self.embed)
        return out

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0, betas=(0.9, 0.95))

    def step(self, entries: list[_Entry], embed: torch.Tensor | None) -> float:
        """Runs one optimiser step on a sample of `entries` (with the policy's newest embedding, if given), and
        every publish_every steps the guard; returns the loss."""
        cfg = self.config
        if embed is not None:
            self.embed.weight.data.copy_(embed)
        batch, weights = self.sample(entries)
        self.drafter.train()
        loss, _ = distill_loss(self.drafter, batch, cfg.ttt_steps, weights, cfg.step_decay)
        if not torch.isfinite(loss):
            raise TrainingError(f"learner loss is {float(loss)}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
        self.optimizer.step()
        self.steps += 1
        if self.steps % cfg.publish_every == 0:
            self._check_and_publish(entries)
        return loss.item()

    def restart(self) -> None:
        """Goes back to the published weights with a fresh optimiser (after a crash)."""
        self.drafter.load_state_dict(self.published.state_dict())
        self.optimizer = self._new_optimizer()

    def _check_and_publish(self, entries: list[_Entry]) -> None:
        """The guard: publishes the candidate if its expected emitted per step on the newest held-out rows is at
        least the published drafter's (+ margin)."""
        held = _cat_batches([e.held_out for e in entries[-2:]])
        self.drafter.eval()
        candidate = teacher_forced_emitted(self.drafter, held, self.config.guard_k)
        current = teacher_forced_emitted(self.published, held, self.config.guard_k)
        self.drafter.train()
        self.guard_last = (candidate, current)
        if candidate < current + self.config.guard_margin:
            self.rejected_count += 1
            return
        self.published.load_state_dict(self.drafter.state_dict())
        self.version += 1
        self.trained_through = entries[-1].step
        self.published_count += 1
        self.publish_fn(self.publication(), self.version)

    def publication(self) -> Eagle3Drafter:
        """Returns a copy of the published drafter in the engine's dtype."""
        out = copy.deepcopy(self.published).to(self.device, self.publish_dtype)
        out.inv_freq = inv_freq_fp32(out)  # .to(bf16) rounds RoPE's frequencies; init/load_drafter keep them fp32
        return out

    def state_dict(self) -> dict:
        return {"drafter": {k: v.clone() for k, v in self.drafter.state_dict().items()},
                "published": {k: v.clone() for k, v in self.published.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "embed": self.embed.weight.detach().clone(),
                "counters": {"version": self.version, "trained_through": self.trained_through, "steps": self.steps,
                             "published": self.published_count, "rejected": self.rejected_count}}

    def load_state_dict(self, state: dict) -> None:
        self.drafter.load_state_dict(state["drafter"])
        self.published.load_state_dict(state["published"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.embed.weight.data.copy_(state["embed"])
        c = state["counters"]
        self.version, self.trained_through, self.steps = c["version"], c["trained_through"], c["steps"]
        self.published_count, self.rejected_count = c["published"], c["rejected"]


class Scheduler:
    """Says when a learner step may start: while its budget (steps that may still start) is positive and there is
    something to train on. The budget is the one control; `paused()` and `update_window` are made of it."""

    def __init__(self, config: LearnerConfig, has_work: Callable[[], bool]):
        self.config, self.has_work = config, has_work
        self.budget = 0
        self.in_flight = False
        self.stopped = False
        self.cond = threading.Condition()

    def grant(self, steps: int) -> int:
        """Lets `steps` more learner steps start from now on, replacing the budget left (0: none after the step in
        flight); returns the budget it replaced."""
        with self.cond:
            left, self.budget = self.budget, steps
            self.cond.notify_all()
            return left

    def submitted(self) -> None:
        """A step's rollouts arrived: under schedule "always", grants steps_per_rollout."""
        if self.config.schedule == "always":
            self.grant(self.config.steps_per_rollout)

    def update_window(self, open_: bool) -> None:
        """The policy update starts (True) or ends (False): under schedule "update", the learner's only window."""
        if self.config.schedule == "update":
            self.grant(self.config.steps_per_rollout if open_ else 0)

    def acquire(self) -> bool:
        """Blocks until a step may start, then takes one from the budget and returns True; False once stopped."""
        with self.cond:
            while not self.stopped and (self.budget <= 0 or not self.has_work()):
                self.cond.wait()
            if self.stopped:
                return False
            self.budget -= 1
            self.in_flight = True
            return True

    def finished(self) -> None:
        """The step in flight ended (done or crashed)."""
        with self.cond:
            self.in_flight = False
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Returns True once no step is in flight and none may start (no budget, nothing to train on, or stopped);
        False after timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.in_flight and (self.budget <= 0 or self.stopped
                                                                      or not self.has_work()), timeout)

    def wait_step(self, timeout: float | None = None) -> bool:
        """Returns True once no step is in flight; False after timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.in_flight, timeout)


class Learner:
    """The online learner: a `ReplayBuffer`, a `DrafterTrainer` and a `Scheduler`, and the thread that runs
    learner steps (mode "async"; "sync" runs them inside `submit`).

    `submit(rollouts)` after each RL update; `metrics()` once per step; `paused()` around anything that must see
    the learner at rest; `state_dict()` / `load_state_dict()` for checkpoints; `close()` at the end of training.
    """

    def __init__(self, config: LearnerConfig, drafter: Eagle3Drafter, publish: Publish, seed: int = 0,
                 log: Log | None = None):
        self.config, self.log = config, log
        draft_ids = None if drafter.config.draft_vocab_size == drafter.config.vocab_size \
            else drafter.draft_ids_in_target()
        self.draft_ids = draft_ids
        self.buffer = ReplayBuffer(config, drafter.fc.weight.device, draft_ids, seed)
        self.drafter_trainer = DrafterTrainer(config, drafter, publish, self.buffer.sample)
        self.scheduler = Scheduler(config, lambda: len(self.buffer) > 0)
        self.error_count = 0
        self.errors: list[str] = []
        self.alive = True
        self._consecutive = 0  # crashes since the last good step
        self._pending_embed: torch.Tensor | None = None
        self._window = {"loss": 0.0, "steps": 0, "busy_s": 0.0}
        self._lock = threading.Lock()  # one step, or one state_dict / load_state_dict, at a time
        self._thread: threading.Thread | None = None
        if config.mode == "async":
            self._thread = threading.Thread(target=self._run, name="respec-learner", daemon=True)
            self._thread.start()

    # -- what the trainer reads --------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.drafter_trainer.version

    @property
    def trained_through(self) -> int:
        return self.drafter_trainer.trained_through

    @property
    def steps(self) -> int:
        return self.drafter_trainer.steps

    @property
    def publish_fn(self) -> Publish:
        return self.drafter_trainer.publish_fn

    @publish_fn.setter
    def publish_fn(self, fn: Publish) -> None:
        self.drafter_trainer.publish_fn = fn

    # -- the trainer's side ---------------------------------------------------------------------------------------
    def submit(self, rollouts: StepRollouts) -> None:
        """Adds one RL step's rollouts to the buffer and tells the scheduler; in sync mode runs the granted steps
        now."""
        self.buffer.add(rollouts)
        if rollouts.embed_weight is not None:
            with self.scheduler.cond:
                self._pending_embed = rollouts.embed_weight.detach().to(self.buffer.device, torch.float32).clone()
        self.scheduler.submitted()
        if self.config.mode == "sync":
            while self.alive and self.scheduler.budget > 0 and self.scheduler.acquire():
                self._guarded_step()

    def grant(self, steps: int) -> int:
        """`Scheduler.grant`: lets `steps` more learner steps start (0: none after the step in flight); returns
        the budget it replaced. Benchmarks use it to keep the learner busy or idle."""
        return self.scheduler.grant(steps)

    def update_window(self, open_: bool) -> None:
        """`Scheduler.update_window`: the trainer calls it around each policy update."""
        self.scheduler.update_window(open_)

    def paused(self):
        """Returns a context in which no learner step runs: the budget is set to 0, the step in flight (if any)
        ends, and the budget left is given back on exit."""
        return _Paused(self.scheduler)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Returns True once no learner step is in flight and none can start before the next submission or grant
        (out of budget or stopped); False after `timeout` seconds. Tests and benchmarks wait on this, not on a
        sleep."""
        return self._thread is None or not self._thread.is_alive() or self.scheduler.wait_idle(timeout)

    def metrics(self) -> dict:
        """Returns the learner's metrics for the trainer's step line (window values since the previous call)."""
        with self.scheduler.cond:
            w, self._window = self._window, {"loss": 0.0, "steps": 0, "busy_s": 0.0}
        t = self.drafter_trainer
        out = {"learner/steps": t.steps, "learner/version": t.version,
               "learner/published": t.published_count, "learner/rejected": t.rejected_count,
               "learner/errors": self.error_count, "learner/alive": int(self.alive),
               "learner/busy_s": w["busy_s"],
               "learner/steps_per_s": w["steps"] / w["busy_s"] if w["busy_s"] > 0 else 0.0}
        if w["steps"]:
            out["learner/loss"] = w["loss"] / w["steps"]
        if t.guard_last is not None:
            out["learner/guard_candidate"], out["learner/guard_published"] = t.guard_last
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stops the thread (after its current step)."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the learner's side -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while self.alive and self.scheduler.acquire():
            self._guarded_step()

    def _guarded_step(self) -> None:
        """Runs one learner step; a crash is logged and the learner restarts from the published weights."""
        try:
            with self._lock:
                t0 = time.perf_counter()
                with self.scheduler.cond:
                    embed, self._pending_embed = self._pending_embed, None
                loss = self.drafter_trainer.step(self.buffer.entries(), embed)
                busy = time.perf_counter() - t0
            self._consecutive = 0
            with self.scheduler.cond:
                self._window["loss"] += loss
                self._window["steps"] += 1
                self._window["busy_s"] += busy
        except Exception as e:  # noqa: BLE001 (any crash of the learner must leave training running)
            self._crashed(e)
        finally:
            self.scheduler.finished()

    def _crashed(self, e: Exception) -> None:
        self.error_count += 1
        self._consecutive += 1
        version = self.drafter_trainer.version
        message = f"learner crashed at its step {self.drafter_trainer.steps} ({type(e).__name__}: {e})"
        self.errors.append(message)
        if self._consecutive > self.config.max_restarts:
            self.alive = False
            self.scheduler.stop()
            self._emit(f"{message}; {self.config.max_restarts} restarts failed, the learner stops and training "
                       f"goes on with drafter version {version}")
            return
        self._emit(f"{message}; restarting from drafter version {version}")
        with self._lock:
            self.drafter_trainer.restart()

    def _emit(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Returns everything a resumed run needs to continue the learner (waits for its current step)."""
        with self._lock:
            return {**self.drafter_trainer.state_dict(), "buffer": self.buffer.state_dict(),
                    "errors": self.error_count}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.drafter_trainer.load_state_dict(state)
            self.buffer.load_state_dict(state["buffer"])
            self.error_count = state["errors"]
        self.scheduler.grant(0)  # the next submission grants steps


class _Paused:
    """`Learner.paused()`'s context: budget 0 and the step in flight ended inside, the budget left given back after."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.left = scheduler, 0

    def __enter__(self) -> None:
        self.left = self.scheduler.grant(0)
        self.scheduler.wait_step()

    def __exit__(self, *exc) -> None:
        self.scheduler.grant(self.left)


def _take(batch: DistillBatch, rows: torch.Tensor) -> DistillBatch:
    """Returns rows of a batch (no trimming: entries keep their step's length)."""
    return DistillBatch(batch.input_ids[rows], batch.features[rows], batch.target_logp[rows], batch.loss_mask[rows])


def _batch_tensors(b: DistillBatch) -> tuple[torch.Tensor, ...]:
    return (b.input_ids, b.features, b.target_logp, b.loss_mask)
