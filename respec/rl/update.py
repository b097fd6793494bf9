"""The actor update: GRPO's optimiser steps on one step's rollouts, and the learner's feature tap.

`ppo_epochs` passes over minibatches of `ppo_mini_batch_size` prompts (with their G samples) in an order drawn
from the run's generator; the clipped policy loss against the rollout logprobs (`grpo.policy_loss`), an optional
KL term to a frozen reference, gradient clipping, AdamW. The actor's forward over prompt + completion also
returns the drafter's features (aux hidden states) at no extra cost: with a tap set, the first epoch's forward
is kept as the step's `StepRollouts` for the online learner (features, and the next-token distributions on the
draft vocab), so the learner needs no target forward of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec.engine.model import Transformer
from respec.errors import TrainingError
from respec.rl.config import TrainConfig
from respec.rl.grpo import agg_loss, entropy_from_logits, kl_penalty, masked_mean, policy_loss
from respec.rl.learner import StepRollouts
from respec.rl.rollout import TrainBatch
from respec.world.pretrain import lr_schedule


@dataclass(frozen=True)
class FeatureTap:
    """What the learner reads from the update's forward: the drafter's target layers and, for distillation
    targets, the draft vocabulary (its target ids, None = the full vocabulary, and its size)."""

    aux_layers: tuple[int, ...]
    draft_vocab_size: int | None = None  # None: no learner, features only
    draft_ids: torch.Tensor | None = None


class ActorUpdate:
    """Owns the actor (fp32 master weights), its AdamW optimiser and the optional reference."""

    def __init__(self, config: TrainConfig, actor: Transformer, reference: Transformer | None = None,
                 autocast: torch.dtype | None = None, tap: FeatureTap | None = None):
        self.config, self.actor, self.reference, self.autocast = config, actor.train(), reference, autocast
        self.tap = tap
        self.device = next(actor.parameters()).device
        t = config.trainer
        decay = [p for p in actor.parameters() if p.ndim >= 2]
        no_decay = [p for p in actor.parameters() if p.ndim < 2]
        # torch's AdamW defaults (betas 0.9/0.999, eps 1e-8) are what verl and TRL use.
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)

    def lr(self, step: int) -> float:
        """Returns the learning rate of the update of RL step step + 1 (warm-up, then cosine decay)."""
        t = self.config.trainer
        return lr_schedule(min(step, t.steps - 1), t.steps, t.lr, t.warmup_steps, t.min_lr_ratio)

    def run(self, batch: TrainBatch, rewards: torch.Tensor, step: int,
            generator: torch.Generator) -> tuple[dict, StepRollouts | None]:
        """Runs the ppo_epochs x minibatches optimiser steps of RL step `step` (1-based), minibatch order drawn
        from `generator`; returns (the actor/* metrics, the step's StepRollouts when a tap is set, else None).
        A non-finite loss or gradient norm raises TrainingError before it reaches the weights."""
        cfg = self.config
        alg = cfg.algorithm
        N = batch.tokens.shape[0]
        mini = alg.ppo_mini_batch_size * cfg.rollout.group_size
        max_new = cfg.rollout.max_new_tokens
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step - 1)
        aux_layers = self.tap.aux_layers if self.tap is not None else ()
        distill = self.tap is not None and self.tap.draft_vocab_size is not None
        features = target_logp = in_draft = None
        L = batch.input_ids.shape[1]
        if aux_layers:
            H = self.actor.config.hidden_size
            features = torch.zeros(N, L, len(aux_layers) * H, device=self.device)
        if distill:
            target_logp = torch.zeros(N, L, self.tap.draft_vocab_size, device=self.device)
            in_draft = torch.zeros(N, L, dtype=torch.bool, device=self.device)
        sums: dict[str, list[float]] = {}
        diff_max = 0.0
        for epoch in range(alg.ppo_epochs):
            order = torch.randperm(N, generator=generator).to(self.device)
            for i, rows in enumerate(order.split(mini)):
                mb = batch.rows(rows)
                mask = mb.mask
                raw, aux = self._completion_logits(self.actor, mb, aux_layers)
                if epoch == 0 and distill:
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
                _check_finite(loss, "loss", step, epoch, i)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.trainer.grad_clip)
                _check_finite(grad_norm, "gradient norm", step, epoch, i)
                self.optimizer.step()
                metrics["actor/grad_norm"] = grad_norm
                values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                                      for v in metrics.values()])
                for key, v in zip(metrics, values.tolist(), strict=True):  # one host sync for them all
                    sums.setdefault(key, []).append(v)
        self.optimizer.zero_grad(set_to_none=True)
        out = {**{k: sum(v) / len(v) for k, v in sums.items()}, "rollout/logprob_diff_max": diff_max,
               "actor/lr": self.lr(step - 1)}
        if self.tap is None:
            return out, None
        loss_mask = batch.loss_mask()
        if in_draft is not None:  # SpecForge skips positions whose target argmax the draft vocab cannot say
            loss_mask &= in_draft
        tapped = StepRollouts(step, batch.input_ids, batch.prompt_lens, loss_mask, features, rewards,
                              batch.advantages, cfg.rollout.group_size, target_logp,
                              self.actor.embed_tokens.weight.detach().clone() if distill else None)
        return out, tapped

    def _completion_logits(self, model: Transformer, batch: TrainBatch, aux_layers: tuple[int, ...]):
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

    def _keep_targets(self, target_logp: torch.Tensor, in_draft: torch.Tensor, rows: torch.Tensor, mb: TrainBatch,
                      raw: torch.Tensor) -> None:
        """Writes minibatch rows' next-token log-distributions at T = 1 on the draft vocab into target_logp
        [N, L, Vd] at their sequence positions (completion token j is predicted at prompt_len - 1 + j), and
        whether the target's argmax is in the draft vocab into in_draft [N, L]: the learner's distillation targets,
        from the forward the update runs anyway."""
        draft_ids = self.tap.draft_ids
        logits = raw if draft_ids is None else raw.index_select(-1, draft_ids)  # [n, Tc, Vd]
        valid = mb.mask  # [n, Tc]
        pos = mb.prompt_lens[:, None] - 1 + torch.arange(valid.shape[1], device=self.device)[None]  # [n, Tc]
        b = rows[:, None].expand_as(pos)
        target_logp[b[valid], pos[valid]] = torch.log_softmax(logits, -1)[valid]
        ok = valid if draft_ids is None else valid & torch.isin(raw.argmax(-1), draft_ids)
        in_draft[b[valid], pos[valid]] = ok[valid]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def _check_finite(value: torch.Tensor, what: str, step: int, epoch: int, minibatch: int) -> None:
    if not bool(torch.isfinite(value)):
        raise TrainingError(f"{what} is {float(value.detach())} at step {step} (epoch {epoch}, minibatch "
                            f"{minibatch}), before the update")


def _metric_name(key: str) -> str:
    """Returns the metrics-line name of a policy_loss metric: verl's under actor/, TRL's clip_ratio/* as they are."""
    return key if "/" in key else f"actor/{key}"
