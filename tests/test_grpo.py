"""GRPO math on hand-computed examples: advantages, the clipped policy loss and its metrics, every aggregation
mode, every KL kind, entropy, gradients and input validation."""

import math

import pytest
import torch

from respec.errors import ConfigError
from respec.rl.grpo import (
    KL_KINDS,
    LOSS_AGGS,
    agg_loss,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
)


def t64(*rows):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float64)


def close(actual, expected, tol=1e-9):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64),
                          atol=tol, rtol=tol), f"{actual} != {expected}"


# ---- advantages ----------------------------------------------------------------------------------------------------

def test_group_advantages_group_scale_uses_unbiased_std():
    rewards = t64([1, 0, 0, 0, 1, 1, 0, 0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 2: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3)
    s = math.sqrt(3) / 2
    close(group_advantages(rewards, 4, eps=0.0), [1.5, -0.5, -0.5, -0.5, s, s, -s, -s])
    eps = 1e-6
    close(group_advantages(rewards, 4), [0.75 / (0.5 + eps)] + [-0.25 / (0.5 + eps)] * 3
          + [0.5 / (1 / math.sqrt(3) + eps)] * 2 + [-0.5 / (1 / math.sqrt(3) + eps)] * 2)


def test_group_advantages_none_scale_is_dr_grpo():
    rewards = t64([1, 0, 0, 0, 1, 1, 0, 0])
    close(group_advantages(rewards, 4, scale="none"), [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])


def test_group_advantages_ties_give_zero():
    rewards = t64([1, 1, 1, 0.3, 0.3, 0.3])
    for scale in ("group", "none"):
        close(group_advantages(rewards, 3, scale=scale), [0.0] * 6)


def test_group_advantages_singleton_groups_follow_verl():
    # verl: a group of one has mean 0 and std 1, so the advantage is the raw reward (over 1 + eps)
    rewards = t64([2.0, -1.0, 0.0])
    close(group_advantages(rewards, 1), [2 / (1 + 1e-6), -1 / (1 + 1e-6), 0.0])
    close(group_advantages(rewards, 1, scale="none"), [2.0, -1.0, 0.0])


def test_group_advantages_accepts_integer_rewards_and_detaches():
    adv = group_advantages(torch.tensor([1, 0]), 2, scale="none")
    assert adv.dtype == torch.float32
    close(adv, [0.5, -0.5])
    r = t64([1.0, 0.0]).requires_grad_()
    assert not group_advantages(r, 2).requires_grad


@pytest.mark.parametrize("kwargs", [dict(group_size=3), dict(group_size=0), dict(group_size=-2),
                                    dict(group_size=2.0), dict(group_size=2, scale="batch")])
def test_group_advantages_rejects_bad_config(kwargs):
    with pytest.raises(ConfigError):
        group_advantages(t64([1, 0, 1, 0]), **kwargs)


# ---- aggregation ---------------------------------------------------------------------------------------------------

LOSS_MAT = t64([1, 2, 3, 4], [5, 6, float("nan"), 100], [7, 7, 7, 7])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", 21 / 6),  # (10 + 11) / 6 valid tokens
    ("seq-mean-token-mean", (10 / 4 + 11 / 2) / 2),  # the empty row is left out of the mean
    ("seq-mean-token-sum", (10 + 11) / 2),
    ("seq-mean-token-sum-norm", (10 + 11) / 2 / 4),  # verl 0.9.1: the seq-mean-token-sum value / T
])
def test_agg_loss_modes(agg, expected):
    close(agg_loss(LOSS_MAT, MASK, agg), expected)
    close(agg_loss(LOSS_MAT, MASK.double(), agg), expected)  # a 0/1 float mask is the same


def test_agg_loss_constants():
    close(agg_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm", loss_scale_factor=8), 21 / 2 / 8)
    close(agg_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm", loss_scale_factor=8, global_batch_size=3), 21 / 3 / 8)
    close(agg_loss(LOSS_MAT, MASK, "token-mean", batch_num_tokens=12), 21 / 12)
    close(agg_loss(LOSS_MAT, MASK, "seq-mean-token-mean", global_batch_size=4), 8 / 4)
    close(agg_loss(LOSS_MAT, MASK, "seq-mean-token-sum", global_batch_size=3), 21 / 3)
    with pytest.raises(ConfigError):
        agg_loss(LOSS_MAT, MASK, "seq-mean-token-sum-norm", loss_scale_factor=0)


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_agg_loss_micro_batches_sum_to_the_batch(agg):
    gen = torch.Generator().manual_seed(0)
    loss_mat = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) < 0.7
    mask[2] = False
    whole = agg_loss(loss_mat, mask, agg)
    counts = dict(batch_num_tokens=mask.sum(), global_batch_size=(mask.sum(-1) > 0).sum(), loss_scale_factor=5)
    parts = sum(agg_loss(loss_mat[rows], mask[rows], agg, **counts) for rows in (slice(0, 2), slice(2, 6)))
    close(parts, whole)


# verl 0.9.1 `verl.trainer.ppo.core_algos.agg_loss` on a tiny batch, computed with verl itself (float64):
# loss_mat [[1, 2, 3], [4, 5, 6], [7, 8, 9]], loss_mask [[1, 1, 0], [1, 0, 0], [0, 0, 0]], loss_agg_mode=agg,
# then with loss_scale_factor=8, then with batch_num_tokens=5, global_batch_size=4. seq-mean-token-mean differs
# from the exact (1.5 + 4) / 2 by verl's 1e-8 in the per-sequence token count.
TINY_LOSS = t64([1, 2, 3], [4, 5, 6], [7, 8, 9])
TINY_MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
VERL_091_AGG = {  # agg: (default, loss_scale_factor=8, batch_num_tokens=5 and global_batch_size=4)
    "token-mean": (2.3333333333333335, 2.3333333333333335, 1.4),
    "seq-mean-token-mean": (2.7499999762500003, 2.7499999762500003, 1.3749999881250001),
    "seq-mean-token-sum": (3.5, 3.5, 1.75),
    "seq-mean-token-sum-norm": (1.1666666666666667, 0.4375, 0.5833333333333334),
}


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_agg_loss_matches_verl_0_9_1(agg):
    default, scaled, global_counts = VERL_091_AGG[agg]
    close(agg_loss(TINY_LOSS, TINY_MASK, agg), default, tol=1e-7)
    close(agg_loss(TINY_LOSS, TINY_MASK, agg, loss_scale_factor=8), scaled, tol=1e-7)
    close(agg_loss(TINY_LOSS, TINY_MASK, agg, batch_num_tokens=5, global_batch_size=4), global_counts, tol=1e-7)


def test_seq_mean_token_sum_norm_is_the_sequence_mean_over_a_constant():
    # Dr. GRPO as verl 0.9.1 and TRL's dr_grpo: sum of token losses / (sequences * max length). With no empty
    # sequence this is TRL's (per_token_loss * mask).sum() / (N * max_completion_length).
    gen = torch.Generator().manual_seed(5)
    loss_mat = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < t64([6, 1, 3, 4])[:, None]
    close(agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=10),
          (loss_mat * mask).sum() / (4 * 10))
    close(agg_loss(loss_mat, mask, "seq-mean-token-sum-norm"), agg_loss(loss_mat, mask, "seq-mean-token-sum") / 6)
    mask[1] = False  # an empty sequence is not counted, as in every seq-mean mode
    close(agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=10),
          (loss_mat * mask).sum() / (3 * 10))


def test_agg_loss_and_masked_mean_of_an_empty_mask_are_zero():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    x = torch.ones(2, 3)
    for agg in LOSS_AGGS:
        assert agg_loss(x, empty, agg).item() == 0.0
    assert masked_mean(x, empty).item() == 0.0


def test_masked_mean():
    x = t64([1, 2, 3], [4, float("inf"), 6])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(mask), dim=-1), [0.0, 0.0])


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="token-mean"):
        agg_loss(LOSS_MAT, MASK, "sample-mean")


# ---- policy loss ---------------------------------------------------------------------------------------------------

RATIOS = [0.5, 0.9, 1.1, 1.5, 4.0]


def two_rows(ratios=RATIOS):
    """Row 0 has advantage +1, row 1 advantage -1; both with the given ratios (old logp 0)."""
    logp = torch.log(t64(ratios, ratios))
    return logp, torch.zeros_like(logp), t64([1.0, -1.0]), torch.ones_like(logp, dtype=torch.bool)


# per-token losses at RATIOS with clip_low 0.2, clip_high 0.28:
#   A = +1: -min(r, clip(r))       -> [-0.5, -0.9, -1.1, -1.28, -1.28]   (1.5 and 4.0 clipped high)
#   A = -1:  max(r, clip(r))       -> [ 0.8,  0.9,  1.1,  1.5,   4.0 ]   (0.5 clipped low)
#            then min(., clip_c=3) -> [ 0.8,  0.9,  1.1,  1.5,   3.0 ]   (4.0 dual-clipped)
POS = [-0.5, -0.9, -1.1, -1.28, -1.28]
NEG_DUAL = [0.8, 0.9, 1.1, 1.5, 3.0]
NEG_NO_DUAL = [0.8, 0.9, 1.1, 1.5, 4.0]


def test_policy_loss_asymmetric_and_dual_clip():
    loss, metrics = policy_loss(*two_rows(), clip_low=0.2, clip_high=0.28, clip_c=3.0)
    close(loss, (sum(POS) + sum(NEG_DUAL)) / 10)
    close(metrics["pg_clipfrac"], 3 / 10, tol=1e-6)  # two high (A > 0) and one low (A < 0)
    close(metrics["pg_clipfrac_lower"], 1 / 10, tol=1e-6)  # ratio 4 > clip_c with A < 0
    close(metrics["clip_ratio/low_mean"], 1 / 10, tol=1e-6)
    close(metrics["clip_ratio/high_mean"], 2 / 10, tol=1e-6)
    close(metrics["clip_ratio/region_mean"], 3 / 10, tol=1e-6)
    close(metrics["ppo_kl"], -2 * math.log(0.5 * 0.9 * 1.1 * 1.5 * 4.0) / 10, tol=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


def test_policy_loss_without_dual_clip():
    loss, metrics = policy_loss(*two_rows(), clip_low=0.2, clip_high=0.28, clip_c=None)
    close(loss, (sum(POS) + sum(NEG_NO_DUAL)) / 10)
    assert metrics["pg_clipfrac_lower"] == 0.0
    close(metrics["pg_clipfrac"], 3 / 10, tol=1e-6)


def test_policy_loss_symmetric_clip():
    # clip 0.2 both sides: A = +1 row -> [-0.5, -0.9, -1.1, -1.2, -1.2]
    loss, _ = policy_loss(*two_rows(), clip_c=None)
    close(loss, (-0.5 - 0.9 - 1.1 - 1.2 - 1.2 + sum(NEG_NO_DUAL)) / 10)


def test_policy_loss_dual_clip_only_when_ratio_passes_clip_c():
    # A = -1, ratio 2.5 < clip_c = 3: unbounded PPO loss 2.5 is kept; ratio 3.5: bounded at 3
    logp = torch.log(t64([[2.5, 3.5]]))
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), t64([-1.0]), torch.ones(1, 2))
    close(loss, (2.5 + 3.0) / 2)
    close(metrics["pg_clipfrac_lower"], 0.5, tol=1e-6)
    close(metrics["pg_clipfrac"], 0.0, tol=1e-6)  # a ratio above 1 + clip_high is not clipped for a negative advantage


def test_policy_loss_token_advantages_and_mask():
    logp, old_logp, adv, mask = two_rows()
    adv_tok = adv[:, None].expand(2, 5).clone()
    mask[1, 4] = False  # drop the dual-clipped token
    logp[1, 4] = float("nan")  # and poison it: it must not reach the loss
    loss, metrics = policy_loss(logp, old_logp, adv_tok, mask, clip_high=0.28)
    close(loss, (sum(POS) + sum(NEG_DUAL[:4])) / 9)
    assert metrics["pg_clipfrac_lower"] == 0.0
    close(metrics["pg_clipfrac"], 3 / 9, tol=1e-6)


def test_policy_loss_zero_advantage_is_never_clipped():
    logp = torch.log(t64([[0.1, 5.0]]))
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), t64([0.0]), torch.ones(1, 2))
    assert loss.item() == 0.0
    assert metrics["pg_clipfrac"] == metrics["clip_ratio/region_mean"] == metrics["pg_clipfrac_lower"] == 0.0


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_policy_loss_aggregation(agg):
    logp, old_logp, adv, mask = two_rows()
    mask[0, 3:] = False  # row 0 keeps 3 tokens, row 1 all 5
    row0, row1 = sum(POS[:3]), sum(NEG_DUAL)
    expected = {"token-mean": (row0 + row1) / 8, "seq-mean-token-mean": (row0 / 3 + row1 / 5) / 2,
                "seq-mean-token-sum": (row0 + row1) / 2, "seq-mean-token-sum-norm": (row0 + row1) / 2 / 5}[agg]
    loss, _ = policy_loss(logp, old_logp, adv, mask, clip_high=0.28, agg=agg)
    close(loss, expected)
    loss, _ = policy_loss(logp, old_logp, adv, mask, clip_high=0.28, agg=agg, loss_scale_factor=10)
    close(loss, (row0 + row1) / 2 / 10 if agg == "seq-mean-token-sum-norm" else expected)


# verl 0.9.1 `verl.trainer.ppo.core_algos.compute_policy_loss_vanilla` on a tiny batch, computed with verl itself
# (float64; clip_ratio_low 0.2, clip_ratio_high 0.28, clip_ratio_c 3.0): response_mask [[1, 1, 0], [1, 0, 0],
# [0, 0, 0]], old_log_prob 0, ratios [[0.5, 1.5, -], [4.0, -, -], [-, -, -]], advantages +1, -1, +2 per row.
# Per token: row 0 -> -0.5, -1.28 (clipped high); row 1 -> 3.0 (ratio 4 dual-clipped at clip_ratio_c).
VERL_091_PG_LOSS = {  # loss_agg_mode: (pg_loss, pg_loss with loss_scale_factor=8)
    "token-mean": (0.4066666666666667, 0.4066666666666667),
    "seq-mean-token-mean": (1.0549999872250002, 1.0549999872250002),
    "seq-mean-token-sum": (0.61, 0.61),
    "seq-mean-token-sum-norm": (0.20333333333333334, 0.07625),
}
VERL_091_PG_METRICS = {"pg_clipfrac": 0.3333333322222222, "ppo_kl": -0.3662040950020229,
                       "pg_clipfrac_lower": 0.3333333322222222}


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_policy_loss_matches_verl_0_9_1(agg):
    ratios = t64([0.5, 1.5, 1.0], [4.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    logp = torch.log(ratios)
    logp[~TINY_MASK] = float("nan")  # padding never reaches the loss
    args = (logp, torch.zeros_like(logp), t64([1.0, -1.0, 2.0]), TINY_MASK)
    for lsf, expected in zip((None, 8), VERL_091_PG_LOSS[agg], strict=True):
        loss, metrics = policy_loss(*args, clip_low=0.2, clip_high=0.28, clip_c=3.0, agg=agg, loss_scale_factor=lsf)
        close(loss, expected, tol=1e-7)
        for name, value in VERL_091_PG_METRICS.items():
            close(metrics[name], value, tol=1e-7)


def test_policy_loss_log_ratio_is_clamped_like_verl():
    # verl clamps logp - old_logp to [-20, 20] before exp: ppo_kl sees the clamped value, the loss stays finite
    logp = t64([[-1000.0, 1000.0]])
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), t64([-1.0]), torch.ones(1, 2), clip_c=None)
    close(metrics["ppo_kl"], 0.0, tol=1e-6)
    close(loss, (0.8 + math.exp(20)) / 2)


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_policy_loss_gradient_only_on_valid_tokens(agg):
    gen = torch.Generator().manual_seed(1)
    old_logp = -torch.rand(3, 6, generator=gen, dtype=torch.float64)
    logp = (old_logp + 0.05 * torch.randn(3, 6, generator=gen, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logp[~mask] = -float("inf")  # padding garbage
    logp.requires_grad_()
    adv = t64([1.0, -0.5, 2.0])
    loss, _ = policy_loss(logp, old_logp, adv, mask, agg=agg)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    assert (logp.grad[mask] != 0).all()  # ratios within 1 +- 0.2: nothing clipped


def test_policy_loss_gradient_matches_the_formula():
    # unclipped token-mean: d loss / d logp_ij = -A_i * ratio_ij / n_tokens; clipped tokens get no gradient
    logp = torch.log(t64([[0.9, 1.1, 1.5], [0.9, 1.1, 0.5]])).requires_grad_()
    adv = t64([1.0, -2.0])
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(2, 3), clip_c=None)
    loss.backward()
    close(logp.grad, t64([-0.9, -1.1, 0.0], [1.8, 2.2, 0.0]) / 6)


@pytest.mark.parametrize("kwargs", [dict(clip_low=0.0), dict(clip_low=-0.1), dict(clip_high=0.0),
                                    dict(clip_high=float("inf")), dict(clip_c=1.0), dict(clip_c=0.5),
                                    dict(agg="sum"), dict(clip_low=True)])
def test_policy_loss_rejects_bad_config(kwargs):
    with pytest.raises(ConfigError):
        policy_loss(*two_rows(), **kwargs)


def test_policy_loss_rejects_mismatched_shapes():
    logp, old_logp, adv, mask = two_rows()
    with pytest.raises(ValueError):
        policy_loss(logp, old_logp[:, :3], adv, mask)
    with pytest.raises(ValueError):
        policy_loss(logp, old_logp, adv[:1], mask)


# ---- KL and entropy ------------------------------------------------------------------------------------------------

def test_kl_kinds():
    logp, ref = t64([0.0, -1.0, -2.0]), t64([-1.0, -1.0, 0.0])
    close(kl_penalty(logp, ref, "k1"), [1.0, 0.0, -2.0])
    close(kl_penalty(logp, ref, "k2"), [0.5, 0.0, 2.0])
    close(kl_penalty(logp, ref, "abs"), [1.0, 0.0, 2.0])
    # k3 with x = ref - logp = [-1, 0, 2]: exp(x) - x - 1
    close(kl_penalty(logp, ref, "low_var_kl"), [math.exp(-1), 0.0, math.exp(2) - 3])
    close(kl_penalty(logp, ref), [math.exp(-1), 0.0, math.exp(2) - 3])


@pytest.mark.parametrize("alias, kind", [("kl", "k1"), ("mse", "k2"), ("k3", "low_var_kl")])
def test_kl_aliases(alias, kind):
    gen = torch.Generator().manual_seed(2)
    logp, ref = -torch.rand(2, 2, 4, generator=gen)
    assert torch.equal(kl_penalty(logp, ref, alias), kl_penalty(logp, ref, kind))


def test_k3_clamps_like_verl():
    # ref - logp: 2.5 -> exp(2.5) - 3.5 = 8.68 (inside); 3 -> 17.1 clamped to 10; -15 -> exp(-15) + 14 clamped to 10
    # +-inf: the log-ratio is clamped to +-20 before exp, so the result is 10, not NaN
    logp = t64([0.0, 0.0, 0.0, -float("inf"), 0.0])
    ref = t64([2.5, 3.0, -15.0, 0.0, -float("inf")])
    close(kl_penalty(logp, ref, "low_var_kl"), [math.exp(2.5) - 3.5, 10.0, 10.0, 10.0, 10.0])


def test_k3_is_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(3)
    logp, ref = -3 * torch.rand(2, 50, generator=gen, dtype=torch.float64)
    assert (kl_penalty(logp, ref) >= 0).all()
    assert (kl_penalty(logp, logp) == 0).all()


def test_kl_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="low_var_kl"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "full")
    assert set(KL_KINDS) >= {"low_var_kl", "k1", "k2", "k3", "kl", "mse"}


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 4, dtype=torch.float64)), torch.full((2, 3), math.log(4), dtype=torch.float64))
    gen = torch.Generator().manual_seed(4)
    logits = 5 * torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_entropy_is_stable():
    # a one-hot distribution (the rest -inf) has entropy 0, huge logits do not overflow, half precision is upcast
    logits = torch.tensor([[[0.0, -float("inf"), -float("inf")], [1e4, -1e4, 0.0]]])
    close(entropy_from_logits(logits), [[0.0, 0.0]], tol=1e-6)
    out = entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    close(out, torch.full((1, 2), math.log(8)), tol=1e-6)
