"""GRPO on the speculative engine: the RL loop that rolls out, scores, updates the actor and pushes its weights.

One step (the loop slime fits on a screen):
  1. rollout: P prompts x G samples from the engine, which holds its own copy of the policy (as vLLM does) and
     returns, per token, the logprob of the verifying forward: the old-policy logprobs, never recomputed;
  2. reward: `reward_fn(problem, completion_text)` per sample (default: the task's scorer);
  3. advantages: group-normalised within each prompt's G samples (`grpo.group_advantages`);
  4. update: `ppo_epochs` passes over minibatches of `ppo_mini_batch_size` prompts; the actor's forward over
     prompt + completion also returns the drafter's features (aux hidden states) at no extra cost, kept per step
     in `Trainer.last_features` for the online learner;
  5. push: `engine.load_weights(actor.state_dict())`, in memory.
Every step appends one JSON line to run_dir/metrics.jsonl (verl's metric names, TRL's aliases); every
`save_every` steps run_dir/checkpoint is replaced atomically by one that resumes the run exactly where it was
(what the run directory holds and how a kill is survived: `respec.rl.checkpoint`).
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from respec.engine.checkpoint import load_model, resolve_dtype, torch_threads
from respec.engine.drafter import load_drafter
from respec.engine.generate import Engine, GenerationResult, SpecConfig
from respec.engine.model import Transformer
from respec.engine.sampling import SamplingParams
from respec.errors import CheckpointError, ConfigError, DataError, TrainingError
from respec.rl.checkpoint import (  # CHECKPOINT and METRICS re-exported: the CLI and benchmarks import them here
    CHECKPOINT,
    CONFIG,
    METRICS,
    load_state,
    recover_checkpoint,
    save_checkpoint,
    saved_step,
    truncate_lines,
    write_metrics,
)
from respec.rl.config import TrainConfig, load_config, save_config
from respec.rl.grpo import (
    agg_loss,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from respec.rl.learner import Learner, StepRollouts
from respec.rl.rollout_shape import rollout_shape
from respec.world.pretrain import lr_schedule
from respec.world.prompts import encode_prompt
from respec.world.tasks import DEFAULT_TASK, Problem, Task, get_task
from respec.world.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from respec.rl.learner_process import LearnerProcess

Log = Callable[..., None]  # log(message) or log(message, fraction_done)
RewardFn = Callable[[Problem, str], float]  # (problem, completion text) -> reward

EVAL_K = 4  # draft length of the sampled evaluation pass (the drafter's staleness measure)


@dataclass
class _Batch:
    """A step's rollouts as training tensors; completion tensors are [N, Tc] (token j of row b's completion)."""

    input_ids: torch.Tensor  # [N, L]
    prompt_lens: torch.Tensor  # [N]
    seq_lens: torch.Tensor  # [N] prompt + completion
    tokens: torch.Tensor  # [N, Tc] completion ids (0 past the end)
    old_logp: torch.Tensor  # [N, Tc] the engine's logprobs of them
    mask: torch.Tensor  # [N, Tc] bool
    advantages: torch.Tensor  # [N]

    def rows(self, index: torch.Tensor) -> _Batch:
        """Returns the sub-batch of rows `index`, trimmed to its longest sequence and completion."""
        S, Tc = int(self.seq_lens[index].max()), int(self.mask[index].sum(1).max())
        return _Batch(self.input_ids[index, :S], self.prompt_lens[index], self.seq_lens[index],
                      self.tokens[index, :Tc], self.old_logp[index, :Tc], self.mask[index, :Tc],
                      self.advantages[index])


class Trainer:
    """Owns the actor, its optimiser, the optional reference, the engine (with its policy copy, drafter and
    tuner), the data position, the RNG and the metrics writer of one run directory.

    Build with `Trainer.start(config, run_dir)` or `Trainer.resume(run_dir)`; then `train()` or `step()`.
    """

    def __init__(self, config: TrainConfig, run_dir: Path, actor: Transformer, engine: Engine, tokenizer,
                 task: Task, eval_problems: list[Problem], reward_fn: RewardFn,
                 reference: Transformer | None = None, policy_dir: Path | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        self.policy_dir = Path(policy_dir or config.trainer.model)  # where the tokenizer files come from
        self.actor = actor.train()
        self.engine = engine
        self.tokenizer, self.task, self.eval_problems, self.reward_fn = tokenizer, task, eval_problems, reward_fn
        self.reference = reference
        self.device = next(actor.parameters()).device
        self.autocast = engine.dtype if engine.dtype != torch.float32 else None  # the actor's forward dtype
        self.spec = config.rollout.spec_config()
        self.aux_layers = tuple(engine.drafter.aux_layer_ids) if engine.drafter is not None else ()
        self.held_out = {p.prompt for p in eval_problems}  # never trained on
        t = config.trainer
        decay = [p for p in actor.parameters() if p.ndim >= 2]
        no_decay = [p for p in actor.parameters() if p.ndim < 2]
        # torch's AdamW defaults (betas 0.9/0.999, eps 1e-8) are what verl and TRL use.
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
        self.global_step = 0  # RL steps done
        self.epoch, self.cursor = 0, 0  # data position: pass over the problems, index in that pass's order
        self.rng = torch.Generator().manual_seed(t.seed)  # rollout seeds and minibatch order
        self.metrics_lines = 0  # lines of metrics.jsonl that belong to this run's history
        self.last_features: StepRollouts | None = None
        self.learner: Learner | LearnerProcess | None = None
        if config.learner.mode != "off" and engine.drafter is not None:
            # A published version passed the guard (at least as good on recent rollouts): the tuner keeps its
            # acceptance evidence instead of falling back to its prior after every publication.
            publish = lambda drafter, version: engine.set_drafter(drafter, version, keep_evidence=1.0)  # noqa: E731
            if config.learner.mode == "process":
                from respec.rl.learner_process import LearnerProcess

                self.learner = LearnerProcess(config.learner, engine.drafter, publish, seed=t.seed,
                                              threads=t.num_threads or 1)
            else:
                self.learner = Learner(config.learner, engine.drafter, publish, seed=t.seed)
            if self._learner_off_engine():
                self.learner.hold()  # released for each update (step)
        self._pool: tuple[int, list[Problem]] | None = None
        self._eval_chooser = None
        self.tensorboard = None  # metrics writer's SummaryWriter once opened, False without tensorboard

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: TrainConfig, run_dir: str | os.PathLike, reward_fn: RewardFn | None = None,
              log: Log | None = None) -> Trainer:
        """Returns a trainer for a new run in `run_dir` (which must not hold one); writes run_dir/config.yaml.

        With no trainer.model the embedded default policy and drafter are built or reused from the cache; the
        config saved is the resolved one (their directories filled in).
        """
        run_dir = Path(run_dir)
        if any((run_dir / name).exists() for name in (CONFIG, METRICS, CHECKPOINT)):
            raise ConfigError(f"{run_dir} already holds a run: continue it with --resume {run_dir} "
                              "(Trainer.resume) or choose another --out")
        if config.trainer.model is None:
            from respec.world.defaults import resolve_models

            synthetic = config.data.task if config.data.task != "jsonl" else DEFAULT_TASK
            policy, drafter = resolve_models(None, config.rollout.drafter, synthetic, log=log)
            config = replace(config, trainer=replace(config.trainer, model=str(policy)),
                             rollout=replace(config.rollout, drafter=str(drafter)))
        trainer = cls._build(config, run_dir, None, reward_fn)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG)
        return trainer

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, reward_fn: RewardFn | None = None,
               overrides: dict[str, str] | None = None) -> Trainer:
        """Returns the trainer of the run in `run_dir` at its last checkpoint (at step 0 if it has none).

        metrics.jsonl is cut back to the lines the checkpoint had seen, so no step appears twice. `overrides`
        ({"trainer.steps": "300"}) change the saved config, which is rewritten.
        """
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG).is_file():
            raise CheckpointError(f"{run_dir}: not a run directory (no {CONFIG}); start one with --out")
        config = load_config(run_dir / CONFIG, overrides)
        checkpoint = recover_checkpoint(run_dir / CHECKPOINT)
        trainer = cls._build(config, run_dir, checkpoint, reward_fn)
        if overrides:
            save_config(config, run_dir / CONFIG)
        if checkpoint is not None:
            load_state(trainer, checkpoint)
        truncate_lines(run_dir / METRICS, trainer.metrics_lines)
        return trainer

    @classmethod
    def _build(cls, config: TrainConfig, run_dir: Path, checkpoint: Path | None,
               reward_fn: RewardFn | None) -> Trainer:
        t, r, d = config.trainer, config.rollout, config.data
        task, eval_task = _tasks(config)  # data errors first, before the (slow) model loads
        reward_fn = reward_fn or _reward_fn(d.reward_fn, task)
        device = torch.device(t.device)
        engine_dtype = resolve_dtype(t.dtype, device)
        policy_dir = checkpoint / "actor" if checkpoint is not None else Path(t.model)
        actor = load_model(policy_dir, torch.float32, device)  # fp32 master weights
        tokenizer = load_tokenizer(policy_dir)
        # The engine's own copy of the policy, loaded in its dtype (a .to(dtype) would round the RoPE buffers).
        rollout_model = load_model(policy_dir, engine_dtype, device).requires_grad_(False)
        drafter_dir = checkpoint / "drafter" if checkpoint is not None and (checkpoint / "drafter").is_dir() \
            else (Path(r.drafter) if r.drafter else None)
        drafter = load_drafter(drafter_dir, rollout_model) if drafter_dir is not None else None
        if drafter is not None:
            drafter.requires_grad_(False)
        reference = None
        if config.algorithm.kl_coef > 0:
            saved = checkpoint / "reference" if checkpoint is not None else None
            ref_dir = saved if saved is not None and saved.is_dir() else Path(t.model)  # the starting policy
            reference = load_model(ref_dir, torch.float32, device).requires_grad_(False)
        eval_problems = eval_task.problems(d.eval_problems, seed=d.eval_seed)
        return cls(config, run_dir, actor, Engine(rollout_model, drafter, compile=r.compile), tokenizer, task, eval_problems,
                   reward_fn, reference, policy_dir)

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, log: Log | None = None) -> list[dict]:
        """Runs steps until `global_step == steps` (default trainer.steps), checkpointing every save_every steps
        and at the end; returns this call's metrics rows."""
        total = self.config.trainer.steps if steps is None else steps
        with torch_threads(self.config.trainer.num_threads):
            rows = self.begin(log)
            while self.global_step < total:
                rows.append(self.advance(total, log))
        return rows

    def begin(self, log: Log | None = None) -> list[dict]:
        """Routes the learner's messages to `log` and runs the evaluation before training when it is due (a fresh
        run); returns its metrics row, if any. `train` calls it once; so does a driver that calls `advance`."""
        if self.learner is not None:
            self.learner.log = lambda message: _log(log, message)
        if not (self.config.trainer.eval_before_train and self.global_step == 0 and self.metrics_lines == 0):
            return []
        row = {"step": 0, **self.evaluate()}
        write_metrics(self, row)
        _log(log, f"eval  step 0: accuracy {row['val/accuracy']:.1%} (T={self.config.rollout.temperature:g}), "
                  f"{row['val/accuracy_greedy']:.1%} greedy")
        return [row]

    def advance(self, total: int, log: Log | None = None) -> dict:
        """Runs one step of a run of `total` steps, checkpoints when due and reports progress; returns its row."""
        save_every = self.config.trainer.save_every
        row = self.step()
        if self.global_step == total or (save_every and self.global_step % save_every == 0):
            self.save_checkpoint()
        _log(log, f"train step {self.global_step}/{total}: reward {row['critic/score/mean']:.3f}, "
                  f"{row['timing/step_s']:.2f} s (rollout {row['timing/rollout_s']:.2f} s, k "
                  f"{row['rollout/k_mean']:.1f})"
                  + (f", drafter v{row['drafter/version']}" if self.learner is not None else ""),
             self.global_step / total)
        if "val/accuracy" in row:
            _log(log, f"eval  step {self.global_step}: accuracy {row['val/accuracy']:.1%}, "
                      f"{row['val/accuracy_greedy']:.1%} greedy")
        return row

    def step(self) -> dict:
        """Runs one RL step (rollout, reward, update, weight push, and evaluation when due); appends its metrics
        line and returns it."""
        t0 = time.perf_counter()
        cfg = self.config
        G = cfg.rollout.group_size
        problems = self._next_problems(cfg.data.prompts_per_step)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.rng))
        prompts = [self._encode(p) for p in problems for _ in range(G)]  # consecutive groups of G
        params = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                                seed=seed)
        cpu0 = time.thread_time()
        result = self.engine.generate(prompts, params, self.spec)
        t_rollout = time.perf_counter()
        rollout_cpu = time.thread_time() - cpu0  # this thread's CPU time: what other processes cannot inflate

        texts = self.tokenizer.batch_decode([s.tokens for s in result.sequences], skip_special_tokens=True)
        rewards = []
        for i, text in enumerate(texts):
            reward = float(self.reward_fn(problems[i // G], text))
            if not math.isfinite(reward):
                raise TrainingError(f"the reward function returned {reward} for problem {problems[i // G].prompt!r} "
                                    f"at step {self.global_step + 1}: rewards must be finite numbers")
            rewards.append(reward)
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=self.device)  # [N]
        advantages = group_advantages(rewards_t, G, scale=cfg.algorithm.adv_scale)  # [N]
        batch = self._batch(prompts, result, advantages)
        t_reward = time.perf_counter()

        if self._learner_off_engine():  # learner.schedule=update: it trains while the policy updates
            self.learner.release()
        try:
            update = self._update(batch, rewards_t)
        finally:
            if self._learner_off_engine():
                self.learner.hold()  # its step in flight ends beside what follows; no new one starts
        t_update = time.perf_counter()
        self.engine.load_weights(self.actor.state_dict())  # in memory, from the next rollout on
        self.global_step += 1
        t_push = time.perf_counter()
        if self.learner is not None:  # async: hands the rollouts over; sync: also trains the drafter now
            self.learner.submit(self.last_features)
        t_learner = time.perf_counter()

        lengths = batch.mask.sum(1).float()  # [N]
        group_std = rewards_t.view(-1, G).std(1)  # [P]
        stats = {
            "critic/score/mean": rewards_t.mean(), "critic/score/std": rewards_t.std(),
            "critic/score/max": rewards_t.max(), "critic/score/min": rewards_t.min(),
            "critic/advantages/mean": advantages.mean(), "critic/advantages/max": advantages.max(),
            "critic/advantages/min": advantages.min(),
            "response_length/mean": lengths.mean(), "response_length/max": lengths.max(),
            # TRL's names (reward_std: the mean of the per-prompt stds, as TRL logs it)
            "reward": rewards_t.mean(), "reward_std": group_std.mean(),
            "frac_reward_zero_std": (group_std == 0).float().mean(), "completions/mean_length": lengths.mean(),
        }
        row = {"step": self.global_step, **dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True)),
               "response_length/clip_ratio": sum(s.finish_reason == "length" for s in result.sequences) / len(texts),
               **self._shape_metrics(result),
               **update,
               "actor/lr": self._lr(self.global_step - 1),
               "rollout/tokens_per_s": result.num_tokens / max(t_rollout - t0, 1e-9),
               "rollout/mean_emitted_per_step": result.mean_emitted_per_step,
               "rollout/k_mean": result.mean_k,
               "timing/rollout_s": t_rollout - t0,
               "timing/rollout_cpu_s": rollout_cpu,
               "timing/reward_s": t_reward - t_rollout,
               "timing/update_s": t_update - t_reward,
               "timing/push_s": t_push - t_update,
               "timing/learner_s": t_learner - t_push,
               "timing/step_s": t_learner - t0,
               **self._drafter_metrics()}
        every = cfg.trainer.eval_every
        if every and (self.global_step % every == 0 or self.global_step == cfg.trainer.steps):
            t_eval = time.perf_counter()
            row.update(self.evaluate())
            row["timing/eval_s"] = time.perf_counter() - t_eval
        write_metrics(self, row)
        return row

    @staticmethod
    def _shape_metrics(result: GenerationResult) -> dict[str, float]:
        """Returns the rollout's response-length quantiles and its decode seconds per live-batch range
        (`rollout_shape`): where the rollout's time went as its batch drained."""
        shape = rollout_shape([len(s.tokens) for s in result.sequences], result.stats)
        return {**{f"response_length/{k}": shape["length"][k] for k in ("median", "p90", "p99")},
                **{f"rollout/batch_s/{label}": v for label, v in shape["batch_s"].items()}}

    def _learner_off_engine(self) -> bool:
        """Whether the learner is held while the engine runs (learner.schedule=update; sync steps run in
        `submit` anyway)."""
        return self.learner is not None and self.config.learner.schedule == "update" and \
            self.config.learner.mode in ("async", "process")

    def _drafter_metrics(self) -> dict:
        """Returns the staleness metrics: the drafter's version and age in policy steps, the learner's state."""
        if self.engine.drafter is None:
            return {}
        through = self.learner.trained_through if self.learner is not None else 0
        out = {"drafter/version": self.engine.drafter_version or 0, "drafter/age_steps": self.global_step - through}
        return {**out, **(self.learner.metrics() if self.learner is not None else {})}

    def close(self) -> None:
        """Stops the learner's thread (a no-op without one); the trainer must not step afterwards."""
        if self.learner is not None:
            self.learner.close()

    def _batch(self, prompts: list[list[int]], result: GenerationResult, advantages: torch.Tensor) -> _Batch:
        """Returns the step's training tensors from the prompts and the engine's sequences (once per step)."""
        seqs = result.sequences
        N, dev = len(seqs), self.device
        prompt_lens = torch.tensor([len(p) for p in prompts])
        comp_lens = torch.tensor([len(s.tokens) for s in seqs])
        seq_lens = prompt_lens + comp_lens
        L, Tc = int(seq_lens.max()), max(int(comp_lens.max()), 1)
        input_ids = torch.zeros(N, L, dtype=torch.long)
        tokens = torch.zeros(N, Tc, dtype=torch.long)
        old_logp = torch.zeros(N, Tc, dtype=torch.float32)
        for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
            input_ids[b, : len(p) + len(s.tokens)] = torch.tensor(p + s.tokens)
            tokens[b, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
            old_logp[b, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        mask = torch.arange(Tc)[None] < comp_lens[:, None]
        return _Batch(input_ids.to(dev), prompt_lens.to(dev), seq_lens.to(dev), tokens.to(dev), old_logp.to(dev),
                      mask.to(dev), advantages)

    def _completion_logits(self, model: Transformer, batch: _Batch, aux_layers: tuple[int, ...]):
        """Returns (logits [n, Tc, V] at the completion tokens, before the temperature, aux features [n, S, 3H] or
        None, zero at the padding) of one causal forward over prompt + completion (right-padded; the layers skip
        the padding, which in a minibatch of rollouts is about half of its positions)."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            hidden, aux = model(batch.input_ids, aux_layers=aux_layers, seq_lens=batch.seq_lens)  # [n, S, H], [n, S, 3H]
            # Completion token j of row b sits at prompt_len + j and is predicted from the position before it.
            j = torch.arange(batch.tokens.shape[1], device=hidden.device)
            pos = (batch.prompt_lens[:, None] - 1 + j[None]).clamp(max=hidden.shape[1] - 1)  # [n, Tc]
            hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [n, Tc, H]
            logits = model.lm_head(hidden)  # [n, Tc, V]: the head only where a loss is taken
        return logits.float(), aux

    def _update(self, batch: _Batch, rewards: torch.Tensor) -> dict:
        """Runs the ppo_epochs x minibatches optimiser steps of one RL step; returns the actor/* metrics."""
        cfg = self.config
        alg = cfg.algorithm
        N = batch.tokens.shape[0]
        mini = alg.ppo_mini_batch_size * cfg.rollout.group_size
        max_new = cfg.rollout.max_new_tokens
        lr = self._lr(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        features = target_logp = in_draft = None
        L = batch.input_ids.shape[1]
        if self.aux_layers:
            H = self.actor.config.hidden_size
            features = torch.zeros(N, L, len(self.aux_layers) * H, device=self.device)
        if self.learner is not None:
            Vd = self.engine.drafter.config.draft_vocab_size
            target_logp = torch.zeros(N, L, Vd, device=self.device)
            in_draft = torch.zeros(N, L, dtype=torch.bool, device=self.device)
        sums: dict[str, list[float]] = {}
        diff_max = 0.0
        for epoch in range(alg.ppo_epochs):
            order = torch.randperm(N, generator=self.rng).to(self.device)
            for i, rows in enumerate(order.split(mini)):
                mb = batch.rows(rows)
                mask = mb.mask
                raw, aux = self._completion_logits(self.actor, mb, self.aux_layers)
                if epoch == 0 and target_logp is not None:
                    self._keep_targets(target_logp, in_draft, rows, mb, raw.detach())
                logits = raw / cfg.rollout.temperature
                logp = torch.log_softmax(logits, -1).gather(-1, mb.tokens[..., None]).squeeze(-1)  # [n, Tc]
                if epoch == 0:
                    if aux is not None:
                        features[rows, : aux.shape[1]] = aux.detach().float()
                    if i == 0:  # before any update: the trainer's logprobs must equal the verifier's
                        diff_max = (logp.detach() - mb.old_logp).abs().masked_fill(~mask, 0).max().item()
                # verl pads responses to max_response_length, the divisor of seq-mean-token-sum-norm (Dr. GRPO),
                # and counts every sequence of the mini-batch in its seq-mean modes, empty ones included.
                loss, metrics = policy_loss(logp, mb.old_logp, mb.advantages, mask, clip_low=alg.clip_low,
                                            clip_high=alg.clip_high, clip_c=alg.clip_c, agg=alg.loss_agg,
                                            loss_scale_factor=max_new, global_batch_size=mask.shape[0])
                metrics = {"actor/pg_loss": loss.detach(), **{_metric_name(k): v for k, v in metrics.items()}}
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logits, _ = self._completion_logits(self.reference, mb, ())
                        ref_logits = ref_logits / cfg.rollout.temperature
                        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, mb.tokens[..., None]).squeeze(-1)
                    kl_loss = agg_loss(kl_penalty(logp, ref_logp, kind=alg.kl_kind), mask, alg.loss_agg,
                                       loss_scale_factor=max_new, global_batch_size=mask.shape[0])
                    loss = loss + alg.kl_coef * kl_loss
                    metrics["actor/kl_loss"] = kl_loss.detach()
                with torch.no_grad():
                    metrics["actor/entropy"] = masked_mean(entropy_from_logits(logits.detach()), mask)
                self._check_finite(loss, "loss", epoch, i)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.trainer.grad_clip)
                self._check_finite(grad_norm, "gradient norm", epoch, i)
                self.optimizer.step()
                metrics["actor/grad_norm"] = grad_norm
                values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                                      for v in metrics.values()])
                for key, v in zip(metrics, values.tolist(), strict=True):  # one host sync for them all
                    sums.setdefault(key, []).append(v)
        loss_mask = _loss_mask(batch)
        if in_draft is not None:  # SpecForge skips positions whose target argmax the draft vocab cannot say
            loss_mask &= in_draft
        self.last_features = StepRollouts(
            self.global_step + 1, batch.input_ids, batch.prompt_lens, loss_mask, features, rewards,
            batch.advantages, self.config.rollout.group_size, target_logp,
            self.actor.embed_tokens.weight.detach().clone() if self.learner is not None else None)
        self.optimizer.zero_grad(set_to_none=True)
        return {**{k: sum(v) / len(v) for k, v in sums.items()}, "rollout/logprob_diff_max": diff_max}

    def _keep_targets(self, target_logp: torch.Tensor, in_draft: torch.Tensor, rows: torch.Tensor, mb: _Batch,
                      raw: torch.Tensor) -> None:
        """Writes minibatch rows' next-token log-distributions at T = 1 on the draft vocab into target_logp
        [N, L, Vd] at their sequence positions (completion token j is predicted at prompt_len - 1 + j), and
        whether the target's argmax is in the draft vocab into in_draft [N, L]: the learner's distillation targets,
        from the forward the update runs anyway."""
        draft_ids = self.learner.draft_ids
        logits = raw if draft_ids is None else raw.index_select(-1, draft_ids)  # [n, Tc, Vd]
        valid = mb.mask  # [n, Tc]
        pos = mb.prompt_lens[:, None] - 1 + torch.arange(valid.shape[1], device=self.device)[None]  # [n, Tc]
        b = rows[:, None].expand_as(pos)
        target_logp[b[valid], pos[valid]] = torch.log_softmax(logits, -1)[valid]
        ok = valid if draft_ids is None else valid & torch.isin(raw.argmax(-1), draft_ids)
        in_draft[b[valid], pos[valid]] = ok[valid]

    def _check_finite(self, value: torch.Tensor, what: str, epoch: int, minibatch: int) -> None:
        if not bool(torch.isfinite(value)):
            saved = saved_step(self.run_dir)
            kept = f"the last checkpoint (step {saved}) is intact" if saved is not None else "no checkpoint was saved"
            raise TrainingError(
                f"{what} is {float(value.detach())} at step {self.global_step + 1} (epoch {epoch}, minibatch "
                f"{minibatch}), before the update; {kept}: resume with a lower trainer.lr, or check the rewards "
                "and the weights")

    def _lr(self, step: int) -> float:
        t = self.config.trainer
        return lr_schedule(min(step, t.steps - 1), t.steps, t.lr, t.warmup_steps, t.min_lr_ratio)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Returns held-out metrics through the engine: mean reward at the rollout temperature (val/accuracy, verl's
        test score) and greedy (val/accuracy_greedy); the share of answers with a positive reward (val/correct,
        val/correct_greedy: the right answers of the embedded tasks, whose reward is 0 only when wrong); and the
        mean response length at that temperature.

        With a drafter, the sampled pass runs static SD with k = EVAL_K drafts (exact, so the accuracy is the
        policy's) and also returns `val/emitted_per_step_k4`: the current drafter's tokens per verify step on the
        held-out prompts, the staleness measure that does not depend on the tuner's choice of k."""
        d, r = self.config.data, self.config.rollout
        prompts = [self._encode(p) for p in self.eval_problems]
        budget = d.eval_max_new_tokens or r.max_new_tokens
        out = {}
        for name, temperature in (("", r.temperature), ("_greedy", 0.0)):
            params = SamplingParams(temperature=temperature, max_new_tokens=budget, seed=self.config.trainer.seed)
            if not name and self.engine.drafter is not None:
                result = self.engine.generate(prompts, params, SpecConfig(mode="static", k=EVAL_K))
                out[f"val/emitted_per_step_k{EVAL_K}"] = result.mean_emitted_per_step
            else:
                result = self.engine.generate(prompts, params, self.spec, chooser=self._eval_k_chooser())
            texts = self.tokenizer.batch_decode([s.tokens for s in result.sequences], skip_special_tokens=True)
            rewards = [float(self.reward_fn(p, t)) for p, t in zip(self.eval_problems, texts, strict=True)]
            out[f"val/accuracy{name}"] = sum(rewards) / len(rewards)
            out[f"val/correct{name}"] = sum(r > 0 for r in rewards) / len(rewards)
            if not name:
                out["val/response_length"] = result.num_tokens / len(prompts)
        return out

    def _eval_k_chooser(self):
        """Returns a tuner of its own for evaluation (adaptive mode), so that greedy acceptance rates do not leak
        into the rollout tuner's estimates; it shares the profiled costs."""
        if self.spec.mode != "adaptive":
            return None
        if self._eval_chooser is None:
            from respec.engine.tuner import Tuner

            tuner = self.engine.default_tuner(self.spec.k_max)
            self._eval_chooser = Tuner(tuner.costs, tuner.k_max, tuner.config)
        return self._eval_chooser

    # -- data ---------------------------------------------------------------------------------------------------
    def _encode(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tokenizer, problem.prompt)

    def _next_problems(self, n: int) -> list[Problem]:
        """Returns the next n training problems of the run's deterministic stream, advancing the data position."""
        out: list[Problem] = []
        while len(out) < n:
            pool = self._epoch_pool()
            if self.cursor >= len(pool):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            take = pool[self.cursor: self.cursor + n - len(out)]
            self.cursor += len(take)
            out.extend(take)
        return out

    def _epoch_pool(self) -> list[Problem]:
        """Returns the training problems of the current pass, in its order, held-out prompts removed."""
        if self._pool is None or self._pool[0] != self.epoch:
            all_problems = getattr(self.task, "all_problems", None)  # a file: one pass over all of it
            size = len(all_problems) if all_problems is not None else self.config.data.epoch_problems
            seed = self.config.trainer.seed * 1_000_003 + self.epoch
            pool = [p for p in self.task.problems(size, seed=seed) if p.prompt not in self.held_out]
            if not pool:
                raise DataError(f"every problem of {getattr(self.task, 'path', self.task.name)} is held out for "
                                "evaluation: lower data.eval_problems or give data.eval_path")
            self._pool = (self.epoch, pool)
        return self._pool[1]

    # -- persistence -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Writes run_dir/checkpoint atomically (the previous one stays whole until the new one is): the actor
        (HF layout with its tokenizer), optimiser, reference, drafter, tuner state, data position, RNG states and
        the metrics line count. Returns its path."""
        return save_checkpoint(self)


def _tasks(config: TrainConfig) -> tuple[Task, Task]:
    """Returns (training task, held-out task); a jsonl file is read and checked now."""
    d = config.data
    if d.task != "jsonl":
        task = get_task(d.task, **d.task_options)
        return task, task
    task = get_task("jsonl", path=d.path)
    return task, (get_task("jsonl", path=d.eval_path) if d.eval_path else task)


def _reward_fn(spec: str | None, task: Task) -> RewardFn:
    """Returns the reward function named by data.reward_fn ("module:function"), else the task's scorer."""
    if spec is None:
        return lambda problem, completion: task.score(problem, completion).reward
    module, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.reward_fn {spec!r} cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"data.reward_fn {spec!r} is not a function")
    return fn


def _loss_mask(batch: _Batch) -> torch.Tensor:
    """Returns [N, L] bool: position t predicts a completion token (prompt_len - 1 <= t < seq_len - 1)."""
    t = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)[None]
    return (t >= batch.prompt_lens[:, None] - 1) & (t < batch.seq_lens[:, None] - 1)


def _metric_name(key: str) -> str:
    """Returns the metrics-line name of a policy_loss metric: verl's under actor/, TRL's clip_ratio/* as they are."""
    return key if "/" in key else f"actor/{key}"


def _log(log: Log | None, message: str, fraction: float | None = None) -> None:
    if log is not None:
        log(message, fraction)
