"""Tests of respec/distill.py: TTT conditioning equals the engine's chained drafting, the weighted loss, training
raises acceptance, and build_drafter's cache."""

import json

import pytest
import torch

import respec.world.distill
from respec.engine.checkpoint import save_model
from respec.engine.drafter import init_drafter, load_drafter
from respec.engine.model import ModelConfig, init_model
from respec.errors import ConfigError
from respec.world.artifacts import MARKER, cache_path
from respec.world.distill import (
    DistillConfig,
    acceptance,
    build_drafter,
    distill_loss,
    target_batch,
    train_drafter,
    ttt_logits,
)
from respec.world.tokenizer import build_tokenizer, save_tokenizer

V = 16


@pytest.fixture(scope="module")
def target(sharp_target):
    torch.manual_seed(0)
    return sharp_target(V)


@pytest.fixture(scope="module")
def batch(target):
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (14, 9, 12, 7)]
    drafter = init_drafter(target, seed=1)
    return target_batch(target, seqs, [3, 2, 4, 3], drafter.aux_layer_ids)


def test_target_batch_alignment(target, batch):
    assert batch.features.shape == (4, 14, 3 * 32) and batch.target_logp.shape == (4, 14, V)
    # Row 1: 9 tokens, prompt 2: p_t predicts a completion token for t = 1..7; padding and prompt excluded.
    assert batch.loss_mask[1].nonzero().flatten().tolist() == list(range(1, 8))
    logits = target.logits(batch.input_ids[1:2, :9])[0]
    torch.testing.assert_close(batch.target_logp[1, :9], torch.log_softmax(logits, -1), atol=1e-5, rtol=0)


def test_reduced_draft_vocab_is_renormalised(target):
    counts = torch.arange(V, 0, -1)
    drafter = init_drafter(target, seed=1, draft_vocab_size=6, token_frequencies=counts)
    seqs = [list(range(10))]
    b = target_batch(target, seqs, [2], drafter.aux_layer_ids, drafter.draft_ids_in_target())
    assert b.target_logp.shape == (1, 10, 6)
    torch.testing.assert_close(b.target_logp.exp().sum(-1), torch.ones(1, 10))
    loss, _ = distill_loss(drafter, b, ttt_steps=2)
    assert torch.isfinite(loss)


def test_ttt_steps_condition_like_the_engine(target):
    """Unroll step j at index t equals the engine's j-th chained draft after a catch-up through t."""
    drafter = init_drafter(target, seed=1).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(10)  # a random drafter at 0.02 init is almost constant; make the check sensitive
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    _, feats = target(ids, aux_layers=drafter.aux_layer_ids)
    with torch.no_grad():
        steps = ttt_logits(drafter, ids, feats, 3)
        for t in (0, 3, 6):
            cache = drafter.new_cache(2, 32)
            hidden, logits = drafter(ids[:, 1:t + 2], feats[:, :t + 1], cache)  # catch-up on true features
            torch.testing.assert_close(logits[:, -1], steps[0][:, t], atol=1e-4, rtol=1e-4)
            hidden = hidden[:, -1:]
            for j in (1, 2):
                hidden, logits = drafter(ids[:, t + j + 1:t + j + 2], hidden, cache)  # chained on own state
                torch.testing.assert_close(logits[:, 0], steps[j][:, t], atol=1e-4, rtol=1e-4)


def test_loss_finite_and_decreases(target, batch):
    drafter = init_drafter(target, seed=2)
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, metrics = distill_loss(drafter, batch, ttt_steps=3)
        assert torch.isfinite(loss)
        assert set(metrics) >= {"loss_0", "acc_0", "accept_0", "loss_2", "acc_2", "accept_2"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def grads(drafter, batch, weights):
    drafter.zero_grad()
    loss, _ = distill_loss(drafter, batch, ttt_steps=2, weights=weights)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in drafter.parameters()]


def test_weights(target, batch):
    drafter = init_drafter(target, seed=2)
    # A zero weight removes a sequence: same as the batch without it.
    keep = torch.tensor([0, 2, 3])
    loss_w, g_w = grads(drafter, batch, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    loss_s, g_s = grads(drafter, batch.rows(keep), None)
    torch.testing.assert_close(loss_w, loss_s)
    for a, b in zip(g_w, g_s, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # A weight of 2 equals the sequence twice.
    loss_w, g_w = grads(drafter, batch, torch.tensor([2.0, 1.0, 1.0, 1.0]))
    loss_d, g_d = grads(drafter, batch.rows(torch.tensor([0, 0, 1, 2, 3])), None)
    torch.testing.assert_close(loss_w, loss_d)
    for a, b in zip(g_w, g_d, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # Ones are the default; weights only matter relatively.
    torch.testing.assert_close(grads(drafter, batch, None)[0], grads(drafter, batch, torch.full((4,), 3.0))[0])
    with pytest.raises(ValueError):
        distill_loss(drafter, batch, 2, weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_unrolling_is_real(target, batch):
    drafter = init_drafter(target, seed=2)
    loss1, m1 = distill_loss(drafter, batch, ttt_steps=1)
    loss3, m3 = distill_loss(drafter, batch, ttt_steps=3)
    assert "loss_1" not in m1 and m3["loss_0"] == pytest.approx(m1["loss_0"])
    assert loss3.item() == pytest.approx(m3["loss_0"] + 0.8 * m3["loss_1"] + 0.64 * m3["loss_2"], rel=1e-5)
    assert m3["loss_1"] != pytest.approx(m3["loss_0"], rel=1e-3)


def test_config_validation():
    with pytest.raises(ConfigError, match="ttt_steps"):
        DistillConfig(ttt_steps=0)
    with pytest.raises(ConfigError, match="held-out"):
        DistillConfig(train_seed=3, eval_seed=3)
    with pytest.raises(ConfigError, match="step_decay"):
        DistillConfig(step_decay=0)


FAST = DistillConfig(num_rollouts=48, max_new_tokens=24, steps=60, batch_size=16, lr=5e-3, warmup_steps=5,
                     ttt_steps=3, eval_prompts=8, eval_max_new_tokens=16, eval_ks=(3,))


def peaky_target():
    """A random target whose lm_head is scaled up: sharp next-token distributions that depend mostly on the
    current token (plus context), so a few seconds of distillation visibly help."""
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = init_model(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model.eval()


def test_training_raises_acceptance():
    target = peaky_target()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(48)]
    held_out = [torch.randint(0, V, (4,), generator=gen).tolist() for _ in range(16)]
    torch.manual_seed(0)
    trained = train_drafter(target, prompts, FAST, log=None)
    untrained = init_drafter(target, seed=FAST.seed)
    before = acceptance(target, untrained, held_out, k=3, max_new_tokens=24)
    after = acceptance(target, trained, held_out, k=3, max_new_tokens=24)
    assert after > before + 0.5, (before, after)  # measured: 1.26 -> 2.59


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, target):
    path = tmp_path_factory.mktemp("target")
    save_model(target, path)
    tok = build_tokenizer(["Q: 12+34=?\nAnswer: 46"], vocab_size=V)  # V ids: 3 specials + printable chars
    save_tokenizer(tok, path)
    return path


def test_build_drafter_roundtrip_and_cache(target, target_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(respec.world.distill, "task_prompts",
                        lambda d, task, n, seed: [[0, 3 + seed % 5, 4 + i % 7, 5] for i in range(n)])
    cfg = DistillConfig(num_rollouts=8, max_new_tokens=8, steps=3, batch_size=4, warmup_steps=1, ttt_steps=2,
                        eval_prompts=2, eval_max_new_tokens=4, eval_ks=(1, 2))
    path = build_drafter(target_dir, cfg, log=None)
    assert (path / MARKER).is_file() and path.parent == tmp_path / "cache"
    report = json.loads((path / "eval.json").read_text())
    assert set(report["mean_emitted_per_step"]) == {"1", "2"}
    assert len((path / "train_metrics.jsonl").read_text().splitlines()) >= 2
    loaded = load_drafter(path, target)
    assert loaded.config.draft_vocab_size == V

    # A complete entry is reused without training.
    monkeypatch.setattr(respec.world.distill, "train_drafter", lambda *a, **k: pytest.fail("retrained"))
    assert build_drafter(target_dir, cfg, log=None) == path
    monkeypatch.undo()

    # An entry without its marker (a killed build) is rebuilt, never used.
    monkeypatch.setenv("RESPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(respec.world.distill, "task_prompts",
                        lambda d, task, n, seed: [[0, 3 + seed % 5, 4 + i % 7, 5] for i in range(n)])
    (path / MARKER).unlink()
    (path / "model.safetensors").write_bytes(b"garbage")
    calls = []
    real_train = respec.world.distill.train_drafter
    monkeypatch.setattr(respec.world.distill, "train_drafter", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    assert build_drafter(target_dir, cfg, log=None) == path
    assert calls == [1] and (path / MARKER).is_file()
    load_drafter(path, target)

    # Another config is another entry.
    other = DistillConfig(**{**cfg.__dict__, "seed": 1})
    assert cache_path("drafter", {"x": 1}).parent == path.parent
    assert build_drafter(target_dir, other, log=None) != path


def test_nan_loss_is_a_clear_error(tmp_path):
    """A drafter whose weights hold NaN makes the loss NaN: training stops with TrainingError, writes nothing."""
    from respec.errors import TrainingError

    target = peaky_target()
    drafter = init_drafter(target, seed=0)
    with torch.no_grad():
        drafter.fc.weight[0, 0] = float("nan")
    cfg = DistillConfig(num_rollouts=4, max_new_tokens=4, steps=2, batch_size=2, warmup_steps=1, ttt_steps=2,
                        eval_prompts=2, eval_max_new_tokens=4, eval_ks=(1,))
    with pytest.raises(TrainingError, match="train-drafter: loss is nan at step 0"):
        train_drafter(target, [[1, 2, 3]] * 4, cfg, drafter=drafter, log=None,
                      metrics_path=tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists() or (tmp_path / "m.jsonl").read_text() == ""
