"""GRPO math as verl and TRL compute it: group advantages, the clipped policy loss, KL penalties, entropy.

Pure tensor functions: no I/O, no state, no config objects. Each option names the verl / TRL setting it
reproduces, so a number printed here means what it means there. The verl reference is release 0.9.1:
`verl/trainer/ppo/core_algos.py` (`compute_grpo_outcome_advantage`, `compute_policy_loss_vanilla`, `agg_loss`,
`kl_penalty_forward`, `compute_entropy_loss`) and `verl/utils/torch_functional.py` (`masked_mean`,
`entropy_from_logits`); TRL's is `trl/trainer/grpo_trainer.py` (`_compute_loss`) at f2cd577.

Shapes: N sequences (rows), T completion positions; `mask` [N, T] is bool or 0/1 and marks the completion
tokens that count. Values at masked positions never reach a result or a gradient, even if NaN or infinite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from respec.errors import ConfigError

ADV_SCALES = ("group", "none")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# verl's kl_loss_type names and their aliases -> the estimator (Schulman, "Approximating KL divergence", 2020)
KL_KINDS = {"low_var_kl": "k3", "k3": "k3", "k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "abs": "abs"}

# verl clamps log-ratios to [-20, 20] before exp "for numerical stability" (policy ratio and k3 alike), and the
# k3 estimate itself to [-10, 10].
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Returns the sum of `x` where `mask` is set (over `dim`, or everything); masked values are ignored even if NaN."""
    return torch.where(mask.bool(), x, 0).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Returns the mean of `x` where `mask` is set (over `dim`, or everything); 0 where nothing is set.

    verl 0.9.1's `masked_mean` divides by (count + 1e-8); max(count, 1) gives the same 0 for an empty mask and
    differs by a relative 1e-8 / count at most otherwise (not at all in float32), so hand-computed values are exact.
    """
    return masked_sum(x, mask, dim) / mask.sum(dim=dim).clamp(min=1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Returns the GRPO advantage [N] of each sample: its reward against the other samples of its prompt.

    rewards: [N] scalar outcome rewards; rows are consecutive groups of `group_size` samples of one prompt
        (verl groups by the `uid` index, TRL by `num_generations` consecutive rows, as here).
    group_size: samples per prompt (verl `actor_rollout_ref.rollout.n`, TRL `num_generations`).
    scale: "group" = (r - group mean) / (unbiased group std + eps), verl `algorithm.norm_adv_by_std_in_grpo=True`,
        TRL `scale_rewards="group"`; "none" = r - group mean (Dr. GRPO), verl `norm_adv_by_std_in_grpo=False`,
        TRL `scale_rewards="none"`.
    eps: verl 0.9.1 `compute_grpo_outcome_advantage`'s epsilon, 1e-6 (TRL adds 1e-4 instead).

    A group whose rewards all tie has std 0 and advantage 0 (it carries no learning signal). A group of one
    sample follows verl: its mean is taken as 0 and its std as 1, so its advantage is r / (1 + eps) or r
    (TRL instead sets std 0, giving r - r = 0; verl's choice is kept). The result is detached: advantages are
    constants of the loss.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be an integer >= 1 (samples per prompt), got {group_size!r}")
    if scale not in ADV_SCALES:
        raise ConfigError(f"advantage scale must be one of {', '.join(ADV_SCALES)}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}: give every prompt "
                          f"exactly {group_size} samples")
    r = rewards.detach()
    r = r if r.is_floating_point() else r.float()
    groups = r.view(-1, group_size)  # [N / G, G]
    if group_size == 1:
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)  # unbiased, as torch.std
    adv = groups - mean
    if scale == "group":
        adv = adv / (std + eps)
    return adv.reshape(-1)


def agg_loss(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean", *, loss_scale_factor: float | None = None,
             batch_num_tokens: float | Tensor | None = None,
             global_batch_size: float | Tensor | None = None) -> Tensor:
    """Returns the scalar that aggregates the per-token losses `loss_mat` [N, T] over the tokens in `mask` [N, T].

    agg is verl `actor.loss_agg_mode`:
      "token-mean": sum over all valid tokens / their count (verl's default). TRL `loss_type="dapo"` (its
        default; count over the global accumulated batch) and "bnpo" (count over the local batch).
      "seq-mean-token-mean": each sequence's token mean, then the mean over sequences that have a token.
        TRL `loss_type="grpo"` (the original GRPO loss).
      "seq-mean-token-sum": each sequence's token sum, then the mean over sequences that have a token.
      "seq-mean-token-sum-norm": Dr. GRPO's length-unbiased loss, as verl 0.9.1's `agg_loss`: the
        "seq-mean-token-sum" value (mean over the sequences that have a token of each one's token sum), divided
        by the constant `loss_scale_factor`, i.e. sum of token losses / (sequences * loss_scale_factor). TRL
        `loss_type="dr_grpo"` divides by N * max_completion_length: the same with loss_scale_factor =
        max_completion_length when no sequence is empty.
    loss_scale_factor: verl `actor.loss_scale_factor`; None = T, the padded response length of `mask` (verl's
        default, `loss_mask.shape[-1]`). Pass the maximum response length (verl `data.max_response_length`, TRL
        `max_completion_length`) to keep the divisor constant through training, as Dr. GRPO intends.
    batch_num_tokens, global_batch_size: the global token / sequence counts when one batch is split into
        micro-batches (verl `global_batch_info`), so the micro-batch losses sum to the whole batch's loss;
        None = this call's own counts (valid tokens; sequences with at least one valid token).

    Sequences with no valid token contribute 0 to every sum and are not counted as sequences. A mask with no
    valid token at all gives 0 (verl 0.9.1 divides 0 by 0 there and returns NaN, which would poison the step).
    """
    if agg not in LOSS_AGGS:
        raise ConfigError(f"loss aggregation must be one of {', '.join(LOSS_AGGS)}, got {agg!r}")
    if loss_scale_factor is not None and not (math.isfinite(loss_scale_factor) and loss_scale_factor > 0):
        raise ConfigError(f"loss_scale_factor must be a finite number > 0 (the max response length), "
                          f"got {loss_scale_factor!r}")
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat and mask must both be [N, T], got {tuple(loss_mat.shape)} and {tuple(mask.shape)}")
    if agg == "token-mean":
        num_tokens = mask.sum().clamp(min=1) if batch_num_tokens is None else batch_num_tokens
        return masked_sum(loss_mat, mask) / num_tokens
    seq_sums = masked_sum(loss_mat, mask, dim=-1)  # [N]
    seq_tokens = mask.sum(dim=-1)  # [N]
    seq_losses = seq_sums / seq_tokens.clamp(min=1) if agg == "seq-mean-token-mean" else seq_sums
    # sequences with no valid token are left out of the mean (they contribute 0 to the sum)
    num_seqs = (seq_tokens > 0).sum().clamp(min=1) if global_batch_size is None else global_batch_size
    loss = seq_losses.sum() / num_seqs
    if agg == "seq-mean-token-sum-norm":
        # verl 0.9.1 divides the sequence mean, not the plain sum, by the length constant
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _check_clip(clip_low: float, clip_high: float, clip_c: float | None) -> None:
    for name, value, hint in (("clip_low", clip_low, "verl clip_ratio_low, TRL epsilon; default 0.2"),
                              ("clip_high", clip_high, "verl clip_ratio_high, TRL epsilon_high; 0.2, DAPO 0.28")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0 ({hint}), got {value!r}")
    if clip_c is not None and (isinstance(clip_c, bool) or not isinstance(clip_c, (int, float))
                               or not math.isfinite(clip_c) or clip_c <= 1):
        raise ConfigError(f"clip_c must be a finite number > 1 (verl clip_ratio_c, default 3.0) or None to turn the "
                          f"dual clip off, got {clip_c!r}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, clip_c: float | None = 3.0, agg: str = "token-mean", *,
                loss_scale_factor: float | None = None, batch_num_tokens: float | Tensor | None = None,
                global_batch_size: float | Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Returns (the scalar PPO-clip policy loss with its graph, metrics as floats), as verl 0.9.1's
    `compute_policy_loss_vanilla` computes them (aggregated by `agg_loss`, as verl 0.9.1's `agg_loss`).

    Per token, with ratio = exp(logp - old_logp) and A the advantage:
        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))      (PPO, asymmetric clip)
        loss = min(loss, -A * clip_c)   where A < 0                               (dual clip, Ye et al. 2019)
    The dual clip bounds the loss of a negative-advantage token whose ratio has grown past clip_c: PPO's
    max() leaves it unbounded there.

    logp: [N, T] log-probs of the sampled tokens under the policy being trained (carries the gradient).
    old_logp: [N, T] the same under the policy that sampled them (verl `old_log_prob`, TRL `old_per_token_logps`).
    advantages: [N] (one per sequence, broadcast over its tokens) or [N, T].
    mask: [N, T] bool or 0/1, the completion tokens (verl `response_mask`, TRL `completion_mask`).
    clip_low: verl `actor.clip_ratio_low` (0.2), TRL `epsilon` (0.2).
    clip_high: verl `actor.clip_ratio_high` (0.2), TRL `epsilon_high` (defaults to epsilon); DAPO's clip-higher
        is 0.28.
    clip_c: verl `actor.clip_ratio_c` (3.0, must be > 1); None turns the dual clip off, as TRL's GRPO loss has none.
    agg, loss_scale_factor, batch_num_tokens, global_batch_size: how the token losses become a scalar; see
        `agg_loss` (verl `actor.loss_agg_mode`, TRL `loss_type`).

    Metrics (token means over `mask`):
      "pg_clipfrac": tokens where the clipped PPO term was chosen, i.e. A > 0 with ratio > 1 + clip_high or
        A < 0 with ratio < 1 - clip_low (verl `actor/pg_clipfrac`; it equals TRL's clip_ratio/region_mean).
      "pg_clipfrac_lower": tokens the dual clip bounded (verl `actor/pg_clipfrac_lower`; 0 when clip_c is None).
      "ppo_kl": mean of old_logp - logp, the k1 estimate of KL(old || new) (verl `actor/ppo_kl`).
      "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean": TRL's `is_low_clipped`
        (ratio < 1 - clip_low and A < 0), `is_high_clipped` (ratio > 1 + clip_high and A > 0) and either.
    """
    _check_clip(clip_low, clip_high, clip_c)
    if agg not in LOSS_AGGS:
        raise ConfigError(f"loss aggregation must be one of {', '.join(LOSS_AGGS)}, got {agg!r}")
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp, old_logp and mask must all be [N, T], got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)} and {tuple(mask.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [N] or [N, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    valid = mask.bool()
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    adv = torch.where(valid, adv, 0)  # [N, T]
    # Zeroing the log-ratio at masked positions before exp keeps padding garbage (NaN, -inf) out of the gradient.
    log_ratio = torch.where(valid, logp - old_logp, 0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [N, T]
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    negative = adv < 0
    if clip_c is None:
        loss_mat = loss_ppo
        dual_clipped = torch.zeros_like(valid)
    else:
        loss_dual = -adv * clip_c
        loss_mat = torch.where(negative, torch.minimum(loss_ppo, loss_dual), loss_ppo)
        dual_clipped = negative & (loss_ppo > loss_dual)
    loss = agg_loss(loss_mat, mask, agg, loss_scale_factor=loss_scale_factor, batch_num_tokens=batch_num_tokens,
                    global_batch_size=global_batch_size)

    with torch.no_grad():
        low = (ratio < 1 - clip_low) & negative
        high = (ratio > 1 + clip_high) & (adv > 0)
        stats = {
            "pg_clipfrac": (loss_clipped > loss_unclipped).float(),
            "pg_clipfrac_lower": dual_clipped.float(),
            "ppo_kl": -log_ratio,
            "clip_ratio/low_mean": low.float(),
            "clip_ratio/high_mean": high.float(),
            "clip_ratio/region_mean": (low | high).float(),
        }
        values = torch.stack([masked_mean(v.to(torch.promote_types(v.dtype, torch.float32)), mask).double()
                              for v in stats.values()]).tolist()  # one host sync
    return loss, dict(zip(stats, values, strict=True))


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Returns the per-token estimate [N, T] of KL(policy || reference) from the sampled tokens' log-probs.

    kind is verl `actor.kl_loss_type` (used with `actor.use_kl_loss=True`, weight `actor.kl_loss_coef`; TRL's
    weight is `beta`, default 0 = no KL term):
      "low_var_kl" (= "k3"): exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to [-20, 20] before exp
        and the result clamped to [-10, 10], as verl 0.9.1's `kl_penalty_forward`. TRL's GRPO KL is the same
        k3 without either clamp.
      "k1" (= "kl"): logp - ref.   "k2" (= "mse"): 0.5 (logp - ref)^2.   "abs": |logp - ref|.
    Aggregate it with `agg_loss` and the policy loss's mode, as verl does (TRL adds beta * k3 to each token's
    loss before aggregating, which is the same sum).
    """
    estimator = KL_KINDS.get(kind)
    if estimator is None:
        raise ConfigError(f"KL kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp must have the same shape, got {tuple(logp.shape)} and "
                         f"{tuple(ref_logp.shape)}")
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "abs":
        return (logp - ref_logp).abs()
    log_ratio = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-_K3_CLAMP, _K3_CLAMP)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Returns the entropy [N, T] in nats of softmax(logits [N, T, V]), as verl 0.9.1's `entropy_from_logits`.

    H = logsumexp(z) - sum softmax(z) * z never exponentiates a large logit (verl's stable form). Half-precision
    logits are computed in float32; -inf logits (a masked vocabulary) count as probability 0 instead of 0 * -inf.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
