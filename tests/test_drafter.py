"""Tests of respec/engine/drafter.py: the EAGLE-3 forward, its KV cache, vocab maps and vLLM/SGLang checkpoints."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from respec.engine.drafter import (
    DrafterConfig,
    default_aux_layers,
    init_drafter,
    load_drafter,
    save_drafter,
    vocab_maps,
)
from respec.engine.model import ModelConfig, hf_state, init_model
from respec.errors import CheckpointError, ConfigError, DrafterMismatchError

EXPECTED_TENSORS = {
    "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
}


def make_target(layers=8, hidden=64, vocab=96, seed=0, **kw):
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=10000.0, **kw)
    return init_model(cfg, seed=seed).eval()


def randomize(drafter, seed=1):
    """Gives norms non-unit weights so that a swapped norm shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return drafter


@pytest.fixture(scope="module")
def pair():
    target = make_target()
    return target, randomize(init_drafter(target, seed=3))


def features(target, ids, drafter):
    return target(ids, aux_layers=drafter.aux_layer_ids)[1]  # [B, T, 3H]


def rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_forward(d, ids, feats):
    """The EAGLE-3 layer written out op by op after vLLM/SGLang llama_eagle3 (no cache, positions 0..T-1)."""
    c, m = d.config, d.midlayer
    eps, H, D = c.rms_norm_eps, c.num_attention_heads, c.head_dim
    B, T = ids.shape
    fused = feats @ d.fc.weight.T if feats.shape[-1] == 3 * c.hidden_size else feats
    emb = d.embed_tokens.weight[ids]
    x = torch.cat([rms(emb, m.input_layernorm.weight, eps), rms(fused, m.hidden_norm.weight, eps)], -1)
    a = m.self_attn
    w = hf_state(d, d.state_dict())  # the HF-named (unfused) tensors the engines load
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // c.num_key_value_heads, 1)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // c.num_key_value_heads, 1)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):
        return t * cos + torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1) * sin

    scores = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ a.o_proj.weight.T
    h = fused + attn  # the residual is the fused feature, before hidden_norm
    hn = rms(h, m.post_attention_layernorm.weight, eps)
    gate, up = w["midlayer.mlp.gate_proj.weight"], w["midlayer.mlp.up_proj.weight"]
    h = h + (F.silu(hn @ gate.T) * (hn @ up.T)) @ m.mlp.down_proj.weight.T
    return h, rms(h, d.norm.weight, eps) @ d.lm_head.weight.T


def test_default_aux_layers():
    for L in range(7, 80):
        assert default_aux_layers(L) == (2, L // 2, L - 3)
    for L in range(2, 80):
        ids = default_aux_layers(L)
        assert len(set(ids)) == 3 and list(ids) == sorted(ids) and 0 <= ids[0] and ids[2] <= L
    with pytest.raises(ConfigError):
        default_aux_layers(1)


@torch.no_grad()
def test_shapes_and_reference(pair):
    target, d = pair
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    feats = features(target, ids, d)
    assert feats.shape == (3, 9, 3 * 64)
    hidden, logits = d(ids, feats)
    assert hidden.shape == (3, 9, 64) and logits.shape == (3, 9, 96)
    ref_hidden, ref_logits = reference_forward(d, ids, feats)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # Chaining: the drafter's own [B, T, H] output is a valid feature, used without fc.
    h2, l2 = d(ids, hidden)
    ref_h2, ref_l2 = reference_forward(d, ids, hidden)
    torch.testing.assert_close(h2, ref_h2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, ref_l2, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fc_only_for_target_features(pair):
    target, d = pair
    d = copy.deepcopy(d)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    feats = features(target, ids, d)
    fused = d.fc(feats)
    torch.testing.assert_close(d(ids, feats)[1], d(ids, fused)[1])
    d.fc.weight.fill_(float("nan"))  # an H-wide feature must not touch fc
    assert torch.isfinite(d(ids, fused)[1]).all()
    with pytest.raises(ValueError):
        d(ids, feats[..., :100])


def test_embedding_is_shared_not_copied(pair):
    target, d = pair
    assert d.embed_tokens is target.embed_tokens
    assert not any("embed" in n for n, _ in d.named_parameters())
    assert copy.deepcopy(d).embed_tokens is target.embed_tokens


@torch.no_grad()
def test_cached_steps_match_full_forward(pair):
    target, d = pair
    B, T = 2, 10
    ids = torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(2))
    feats = features(target, ids, d)
    full_h, full_l = d(ids, feats)
    cache = d.new_cache(B, 16)
    outs = [d(ids[:, t:t + 1], feats[:, t:t + 1], cache) for t in range(3)]  # one at a time
    outs.append(d(ids[:, 3:7], feats[:, 3:7], cache))  # a chunk
    outs += [d(ids[:, t:t + 1], feats[:, t:t + 1], cache) for t in range(7, T)]
    assert cache.lengths.tolist() == [T, T] and cache.extent == T
    step_h = torch.cat([h for h, _ in outs], 1)  # [B, T, H]
    step_l = torch.cat([logits for _, logits in outs], 1)  # [B, T, V]
    assert step_h.shape == full_h.shape and step_l.shape == full_l.shape
    # The hidden states are what the next chained draft consumes: every position must match, not just the logits.
    torch.testing.assert_close(step_h, full_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_l, full_l, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rollback_then_refeed_matches_fresh_forward(pair):
    target, d = pair
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 8), generator=gen)
    other = torch.randint(0, 96, (2, 8), generator=gen)
    feats, other_feats = features(target, ids, d), features(target, other, d)
    cache = d.new_cache(2, 16)
    d(ids, feats, cache)  # 8 positions per row
    keep = torch.tensor([5, 3])  # roll rows back by different amounts
    cache.set_lengths(keep)
    # Row b continues at its own position keep[b] with other tokens/features.
    _, step_l = d(other[:, :3], other_feats[:, :3], cache)
    for b in range(2):
        k = int(keep[b])
        seq_ids = torch.cat([ids[b:b + 1, :k], other[b:b + 1, :3]], 1)
        seq_feats = torch.cat([feats[b:b + 1, :k], other_feats[b:b + 1, :3]], 1)
        _, fresh_l = d(seq_ids, seq_feats)
        assert (step_l[b] - fresh_l[0, k:]).abs().max() <= 1e-5


def test_vocab_maps_offsets():
    d2t, t2d = vocab_maps([7, 3, 3, 9, 0, 5], draft_vocab_size=4, target_vocab=12)
    assert (torch.arange(4) + d2t).tolist() == [0, 3, 7, 9]  # sorted, offsets not ids
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and t2d.shape == (12,)
    assert t2d.nonzero().flatten().tolist() == [0, 3, 7, 9]
    # Too few ids are topped up with the lowest unused ones.
    d2t, _ = vocab_maps([5], 3, 12)
    assert (torch.arange(3) + d2t).tolist() == [0, 1, 5]
    d2t, t2d = vocab_maps([], 12, 12)
    assert d2t.eq(0).all() and t2d.all()


@torch.no_grad()
def test_reduced_vocab_draft_to_target_and_expand():
    target = make_target()
    counts = torch.zeros(96)
    hot = torch.tensor([90, 4, 17, 55, 60, 2, 33, 71])
    counts[hot] = torch.arange(8, 0, -1).float()
    d = init_drafter(target, draft_vocab_size=8, token_frequencies=counts)
    assert d.lm_head.weight.shape == (8, 64)
    expected = hot.sort().values
    assert d.draft_to_target(torch.arange(8)).tolist() == expected.tolist()
    assert d.draft_to_target(torch.tensor([[0, 7], [1, 1]])).tolist() == [[2, 90], [4, 4]]
    assert d.t2d.nonzero().flatten().tolist() == expected.tolist()
    ids = torch.randint(0, 96, (2, 4))
    _, logits = d(ids, features(target, ids, d))
    q = logits.softmax(-1)
    full = d.expand_probs(q)
    assert full.shape == (2, 4, 96)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 4))
    assert full[..., ~d.t2d].eq(0).all()
    torch.testing.assert_close(d.restrict_to_draft(full), q)
    with pytest.raises(ConfigError):
        init_drafter(target, draft_vocab_size=8)  # no frequencies to choose the vocab from


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    from safetensors import safe_open

    target = make_target()
    counts = torch.arange(96).flip(0).float()
    d = randomize(init_drafter(target, seed=5, draft_vocab_size=40, token_frequencies=counts))
    path = save_drafter(d, tmp_path / "drafter")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == EXPECTED_TENSORS
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["model_type"] == "llama"
    assert hf["num_hidden_layers"] == 1 and hf["tie_word_embeddings"] is False
    assert hf["vocab_size"] == 96 and hf["draft_vocab_size"] == 40 and hf["hidden_size"] == 64
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "max_position_embeddings"):
        assert key in hf
    # Default layers (2, L//2, L-3) are left implicit: both engines then pick the same ones.
    assert "eagle_aux_hidden_state_layer_ids" not in hf and "eagle_config" not in hf

    loaded = load_drafter(path, target)
    assert loaded.aux_layer_ids == d.aux_layer_ids == (2, 4, 5)
    assert loaded.embed_tokens is target.embed_tokens
    ids = torch.randint(0, 96, (2, 6))
    feats = features(target, ids, d)
    for a, b in zip(d(ids, feats), loaded(ids, feats), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.d2t, d.d2t) and torch.equal(loaded.t2d, d.t2d)
    # Saving over an existing directory replaces it.
    save_drafter(loaded, path)
    assert load_drafter(path, target, dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


def test_explicit_aux_ids_written_per_engine(tmp_path):
    target = make_target(layers=4)  # too shallow for the engines' default: ids must be written
    d = init_drafter(target)
    assert d.aux_layer_ids == (1, 2, 3)
    hf = json.loads((save_drafter(d, tmp_path / "d") / "config.json").read_text())
    assert hf["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # vLLM reads these as-is
    assert hf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]  # SGLang adds 1
    assert load_drafter(tmp_path / "d", target).aux_layer_ids == (1, 2, 3)
    # A config holding only the SGLang key is read with SGLang's +1.
    del hf["eagle_aux_hidden_state_layer_ids"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(hf))
    assert load_drafter(tmp_path / "d", target).aux_layer_ids == (1, 2, 3)


def test_checkpoint_with_embeddings_and_without_maps(tmp_path):
    from safetensors.torch import load_file, save_file

    target = make_target()
    path = save_drafter(init_drafter(target), tmp_path / "d")
    state = load_file(str(path / "model.safetensors"))
    del state["d2t"], state["t2d"]  # a full-vocab drafter may omit the maps
    state["embed_tokens.weight"] = torch.zeros(96, 64)
    save_file(state, str(path / "model.safetensors"))
    loaded = load_drafter(path, target)
    assert loaded.embed_tokens is target.embed_tokens and loaded.d2t.eq(0).all() and loaded.t2d.all()
    state["embed_tokens.weight"] = torch.zeros(96, 32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError):
        load_drafter(path, target)


def test_mismatch_errors(tmp_path):
    target = make_target()
    path = save_drafter(init_drafter(target), tmp_path / "d")
    with pytest.raises(DrafterMismatchError, match="hidden_size"):
        load_drafter(path, make_target(hidden=32))
    with pytest.raises(DrafterMismatchError, match="vocab_size"):
        load_drafter(path, make_target(vocab=100))
    hf = json.loads((path / "config.json").read_text())
    hf["eagle_aux_hidden_state_layer_ids"] = [2, 4, 9]  # target has 8 layers
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DrafterMismatchError, match="aux layer"):
        load_drafter(path, target)
    deep = save_drafter(init_drafter(make_target(layers=12)), tmp_path / "deep")  # default ids (2, 6, 9)
    with pytest.raises(DrafterMismatchError):
        load_drafter(deep, make_target(layers=4))
    with pytest.raises(DrafterMismatchError):
        init_drafter(target, aux_layer_ids=(1, 2, 9))


def test_corrupt_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    target = make_target()
    good = save_drafter(init_drafter(target), tmp_path / "good")

    def fresh(name):
        return save_drafter(init_drafter(target), tmp_path / name)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_drafter(tmp_path / "missing", target)
    p = fresh("noconfig")
    (p / "config.json").unlink()
    with pytest.raises(CheckpointError):
        load_drafter(p, target)
    p = fresh("badjson")
    (p / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_drafter(p, target)
    p = fresh("notdrafter")
    hf = json.loads((p / "config.json").read_text())
    hf["architectures"] = ["Qwen2ForCausalLM"]
    (p / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="EAGLE-3"):
        load_drafter(p, target)
    p = fresh("noweights")
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        load_drafter(p, target)
    p = fresh("truncated")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_drafter(p, target)
    state = load_file(str(good / "model.safetensors"))
    p = fresh("missingtensor")
    save_file({k: v for k, v in state.items() if k != "midlayer.hidden_norm.weight"}, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks"):
        load_drafter(p, target)
    p = fresh("nan")
    bad = dict(state)
    bad["fc.weight"] = bad["fc.weight"].clone()
    bad["fc.weight"][0, 0] = float("nan")
    save_file(bad, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_drafter(p, target)
    p = fresh("baddt")
    bad = dict(state)
    bad["d2t"] = torch.full_like(state["d2t"], 200)
    save_file(bad, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match="d2t"):
        load_drafter(p, target)


def test_config_validation():
    with pytest.raises(ConfigError):
        DrafterConfig(vocab_size=10, draft_vocab_size=11)
    with pytest.raises(ConfigError):
        DrafterConfig(aux_layer_ids=(3, 2, 1))
