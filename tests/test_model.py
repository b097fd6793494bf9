"""Model parity with transformers (full prompt and cached decoding), checkpoint round trip, bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from respec.engine.checkpoint import load_model, save_model
from respec.engine.kvcache import KVCache
from respec.engine.model import Cached, ModelConfig, cache_masks, cached_attention, init_model, length_groups
from respec.errors import CheckpointError

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=24),
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "llama-bias-linear-rope": lambda: LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-rope": lambda: LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "qwen2-yarn-rope": lambda: Qwen2Config(**SHAPE, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_checkpoint(name: str, path) -> AutoModelForCausalLM:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: perturb everything so all paths count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_checkpoint(request.param, path)
    return hf, load_model(path), path


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    assert (ours.logits(ids) - hf(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_cached_decoding_matches_transformers(pair):
    """Prompt of different lengths per row (right-padded prefill), then one token at a time with the cache."""
    hf, ours, _ = pair
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 30), generator=gen)
    prompt_lens = torch.tensor([7, 12])
    cache = KVCache.for_model(ours.config, 2, 64, torch.float32, "cpu")
    ours(ids[:, :12], cache)
    cache.set_lengths(prompt_lens)
    ref = hf(ids).logits
    steps = []
    for t in range(12):
        tok = ids[torch.arange(2), prompt_lens + t][:, None]
        h, _ = ours(tok, cache)
        steps.append(ours.lm_head(h)[:, 0])
    steps = torch.stack(steps, 1)  # [2, 12, V]
    for b in range(2):
        n = int(prompt_lens[b])
        assert (steps[b] - ref[b, n:n + 12]).abs().max() <= 1e-4


@torch.no_grad()
def test_rollback_then_refeed_is_exact(pair):
    _, ours, _ = pair
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 20), generator=gen)
    cache = KVCache.for_model(ours.config, 2, 64, torch.float32, "cpu")
    ours(ids[:, :10], cache)
    ours(torch.randint(0, 97, (2, 5), generator=gen), cache)  # drafts that get rejected
    cache.set_lengths(torch.tensor([10, 10]))
    h, _ = ours(ids[:, 10:], cache)
    assert (ours.lm_head(h) - ours.logits(ids)[:, 10:]).abs().max() <= 1e-5


@torch.no_grad()
def test_aux_hidden_states_are_transformers_hidden_states(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = hf(ids, output_hidden_states=True).hidden_states
    _, aux = ours(ids, aux_layers=(0, 1, 2))
    assert (aux - torch.cat([ref[0], ref[1], ref[2]], -1)).abs().max() <= 1e-5


def test_length_groups_cover_every_real_row_once_within_the_share_of_their_longest():
    groups = length_groups([25, 9, 0, 17, 24, 19, 8], "cpu")
    assert [(rows.tolist(), n) for rows, n in groups] == [([0, 4, 5], 25), ([3], 17), ([1, 6], 9)]


def test_packed_forward_equals_padded_forward(pair):
    """seq_lens runs the layers on the real tokens only (the trainer's forward), attention per group of similar
    lengths: same hidden states, aux features and gradients at the real tokens as the padded forward, zeros at the
    padding; and transformers' logits."""
    hf, ours, _ = pair
    ids = torch.randint(0, 97, (3, 25), generator=torch.Generator().manual_seed(5))
    seq_lens = torch.tensor([25, 9, 17])
    real = torch.arange(25)[None] < seq_lens[:, None]  # [3, 25]
    hidden, aux = ours(ids, aux_layers=(0, 2, 3))
    packed, packed_aux = ours(ids, aux_layers=(0, 2, 3), seq_lens=seq_lens)
    assert (packed - hidden)[real].abs().max() <= 1e-5 and (packed_aux - aux)[real].abs().max() <= 1e-5
    assert not packed[~real].any() and not packed_aux[~real].any()
    with torch.no_grad():
        ref = hf(ids, attention_mask=real.long()).logits
    assert (ours.lm_head(packed) - ref)[real].abs().max() <= 1e-4
    weights = torch.randn(3, 25, ours.config.hidden_size, generator=torch.Generator().manual_seed(6)) * real[..., None]
    grads = []
    for lens in (None, seq_lens):
        ours.zero_grad()
        (ours(ids, seq_lens=lens)[0] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-4 * (1 + grads[0][name].abs().max()), name
    ours.zero_grad()


@torch.no_grad()
def test_save_model_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    save_model(ours, tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    assert (again(ids).logits - hf(ids).logits).abs().max() <= 1e-5
    assert (load_model(tmp_path / "ckpt").logits(ids) - ours.logits(ids)).abs().max() == 0


def test_init_model_is_reproducible_and_saves(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    a, b = init_model(cfg, seed=3), init_model(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False))
    save_model(a, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (hf(ids).logits - a.logits(ids)).abs().max() <= 1e-5


def test_sharded_checkpoint(tmp_path):
    hf = hf_checkpoint("qwen2", tmp_path / "full")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert (load_model(tmp_path / "sharded").logits(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.fixture
def ckpt(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return save_model(init_model(cfg), tmp_path / "ckpt")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config.json"):
        load_model(ckpt)


def test_corrupt_weights(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_model(ckpt)


def test_truncated_weights(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(ckpt)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(ckpt)


def test_nan_weights(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj.weight' holds NaN"):
        load_model(ckpt)


def test_missing_tensor_and_wrong_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1" not in k}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks"):
        load_model(ckpt)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(ckpt)


@pytest.mark.parametrize("B,H,Hkv,T,S", [(3, 8, 2, 5, 20), (2, 4, 4, 1, 9), (16, 4, 2, 2, 30)])
def test_cached_attention_equals_sdpa_over_cache_and_new_tokens(B, H, Hkv, T, S):
    """Cached entries (the last 3 of row 0 stale: rolled-back drafts) and the new tokens scored apart under one
    softmax give SDPA over their concatenation with the causal mask."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, 16, generator=gen) for h, n in [(H, T), (Hkv, T), (Hkv, T)])
    kc, vc = (torch.randn(B, Hkv, S, 16, generator=gen) for _ in range(2))
    lengths = torch.full((B,), S)
    lengths[0] = S - 3
    cached = Cached(kc, vc, *cache_masks(lengths, S, T, torch.float32))
    full = torch.zeros(B, 1, T, S + T)
    full[0, :, :, S - 3: S] = float("-inf")
    full[:, :, :, S:] = full[:, :, :, S:].masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([kc, k], 2), torch.cat([vc, v], 2),
                                                           attn_mask=full, enable_gqa=True)
    assert (cached_attention(q, k, v, cached) - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_batched_cached_decoding_matches_a_full_forward(pair):
    """A cached forward at batch 16 gives the logits of a full forward."""
    _, ours, _ = pair
    ids = torch.randint(0, 97, (16, 12), generator=torch.Generator().manual_seed(6))
    cache = KVCache.for_model(ours.config, 16, 32, torch.float32, "cpu")
    ours(ids[:, :8], cache)
    h, _ = ours(ids[:, 8:], cache)
    assert (ours.lm_head(h) - ours.logits(ids)[:, 8:]).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_formula(dtype):
    from respec.engine.model import RMSNorm

    norm = RMSNorm(64, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # HF's order
    assert torch.equal(norm(x), ref) if dtype == torch.bfloat16 else (norm(x) - ref).abs().max() <= 1e-6
