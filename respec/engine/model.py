"""The target model: one PyTorch decoder for the Llama / Qwen2 / Qwen2.5 / Qwen3 family (its KV cache is in
`kvcache.py`, Hugging Face checkpoint loading and saving in `checkpoint.py`).

Module and parameter names mirror `transformers` (`model.layers.3.self_attn.q_proj.weight`), so a checkpoint
maps onto this model by stripping the `model.` prefix, and `save_model` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from respec.engine.compile import run_stack
from respec.engine.kvcache import KVCache
from respec.errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder; field names follow the HF config.json keys."""

    model_type: str = "qwen2"  # "llama" | "qwen2" | "qwen3"
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | "yarn", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o bias (Llama, Qwen3); Qwen2 always has q/k/v bias and no o bias
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture '{self.model_type}': respec supports {', '.join(ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope_scaling type '{rope_type}': respec supports {', '.join(ROPE_TYPES)}")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Returns the config described by an HF config.json dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = hf.get("architectures") or [model_type]
            raise ConfigError(
                f"unsupported architecture '{archs[0]}': respec supports {', '.join(ARCHITECTURES.values())}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act '{hf['hidden_act']}' (only silu)")
        if hf.get("use_sliding_window"):
            raise ConfigError("sliding-window attention is not supported; set use_sliding_window to false")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "rope_scaling", "rope_theta")}
        fields = {k: hf[k] for k in known if k in hf and hf[k] is not None}
        skip = known | {"rope_theta", "rope_scaling", "rope_parameters", "architectures", "transformers_version"}
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(**fields, rope_theta=float(theta), rope_scaling=scaling, extra=extra)

    def to_hf(self) -> dict:
        """Returns the config.json dict for this config, readable by transformers 4.x and 5.x."""
        d = asdict(self)
        extra = d.pop("extra")
        d = {k: v for k, v in d.items() if v is not None}
        return {**extra, **d, "architectures": [ARCHITECTURES[self.model_type]], "hidden_act": "silu"}


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [D/2], attention scaling of cos/sin) for the config's RoPE variant."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, ramp in between.
    old_len = scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    attn = scaling.get("attention_factor")
    if attn is None:
        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(attn)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns cos, sin [*, 1, D] for integer positions [*] ([B, T] or packed [N]): token-major, they broadcast
    over the heads of [*, heads, D]. Computed in fp32 like transformers (in bf16 the products position x
    frequency would lose the low bits that distinguish neighbouring positions)."""
    freqs = positions[..., None].float() * inv_freq.float()  # [*, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [*, 1, D]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right-padded batch [B, T] sit: the training forward runs its linear layers on
    those tokens only (verl's use_remove_padding), and pads them back only for attention."""

    index: torch.Tensor  # [N] flat positions b * T + t of the real tokens, in row-major order
    batch: int
    length: int
    # Rows of similar lengths, each group with its longest row's length: attention runs per group over that many
    # positions, not over the batch's longest row (a long-tailed batch would pad most rows' attention 10x).
    groups: tuple[tuple[torch.Tensor, int], ...] = ()

    @classmethod
    def of(cls, seq_lens: torch.Tensor, length: int) -> Packing:
        """Returns the packing of rows whose first seq_lens[b] of `length` tokens are real."""
        real = torch.arange(length, device=seq_lens.device)[None] < seq_lens[:, None]  # [B, T]
        return cls(real.flatten().nonzero().squeeze(1), len(seq_lens), length,
                   length_groups(seq_lens.tolist(), seq_lens.device))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Returns causal attention [B, H, T, D] of padded q [B, H, T, D], k, v [B, Hkv, T, D], run per length
        group over its own length (zeros past it, at positions that are all padding)."""
        if len(self.groups) == 1 and self.groups[0][1] == self.length:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        out = q.new_zeros(q.shape)
        for rows, n in self.groups:
            out[rows, :, :n] = F.scaled_dot_product_attention(q[rows, :, :n], k[rows, :, :n], v[rows, :, :n],
                                                              is_causal=True, enable_gqa=gqa)
        return out

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Returns x [B, T, ...] at the real tokens [N, ...]."""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Returns packed x [N, ...] scattered back to [B, T, ...], zeros at the padding."""
        full = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return full.index_copy(0, self.index, x).unflatten(0, (self.batch, self.length))


GROUP_SHARE = 0.75  # a length group holds the rows at least this share of its longest row's length


def length_groups(seq_lens: list[int], device: torch.device | str) -> tuple[tuple[torch.Tensor, int], ...]:
    """Returns (rows, length) groups covering every row with a real token: rows sorted by length, a group is the
    longest row left and every row at least GROUP_SHARE of its length (padding at most 1 / GROUP_SHARE^2 of a
    row's own attention work)."""
    order = sorted((n, b) for b, n in enumerate(seq_lens) if n > 0)[::-1]
    groups, at = [], 0
    while at < len(order):
        n = order[at][0]
        end = at
        while end < len(order) and order[end][0] >= GROUP_SHARE * n:
            end += 1
        groups.append((torch.tensor(sorted(b for _, b in order[at:end]), device=device), n))
        at = end
    return tuple(groups)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        # Normalise in fp32 and scale after the cast back, as transformers does; the order shows in bf16.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Returns x [*, heads, D] rotated by cos/sin [*, 1, D] (the rotate-half convention of HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: Cached) -> torch.Tensor:
    """Returns attention [B, H, T, D] of q [B, H, T, D] over a row's cached entries and its T new ones (k, v
    [B, Hkv, T, D], causal among themselves).

    The two parts are scored apart and share one softmax, so the cache is only read: its write happens outside
    (after the layer), which keeps this function pure for `torch.compile` (an in-place write into a graph input
    makes inductor copy the whole cache every call). The G = H / Hkv query heads sharing a key head are stacked
    into one matmul instead of repeating k and v.
    """
    B, H, T, D = q.shape
    Hkv, S = cached.keys.shape[1], cached.keys.shape[2]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D) * D ** -0.5
    old = torch.matmul(q, cached.keys.transpose(-1, -2)) + cached.mask  # [B, Hkv, G*T, S]; mask [B, 1, 1, S]
    new = torch.matmul(q, k.transpose(-1, -2)).view(B, Hkv, G, T, T)  # [B, Hkv, G, T, T]
    if cached.causal is not None:
        new = new + cached.causal  # [T, T]
    probs = torch.softmax(torch.cat([old.view(B, Hkv, G, T, S), new], dim=-1), dim=-1)  # [B, Hkv, G, T, S + T]
    out = torch.matmul(probs[..., :S].reshape(B, Hkv, G * T, S), cached.values) + \
        torch.matmul(probs[..., S:].reshape(B, Hkv, G * T, T), v)
    return out.view(B, H, T, D)


class Cached(NamedTuple):
    """What one layer's attention reads of the cache in a cached forward."""

    keys: torch.Tensor  # [B, Hkv, S, D] entries before this forward (positions >= a row's length are stale)
    values: torch.Tensor  # [B, Hkv, S, D]
    mask: torch.Tensor  # [B, 1, 1, S] additive: 0 at a row's valid positions, -inf at stale ones
    causal: torch.Tensor | None  # [T, T] additive causal mask among the new tokens (None for T = 1)


def cache_masks(lengths: torch.Tensor, span: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (the mask [B, 1, 1, span] of cached positions < lengths[b], the causal mask [T, T] or None)."""
    stale = torch.arange(span, device=lengths.device)[None, :] >= lengths[:, None]  # [B, span]
    mask = torch.zeros(stale.shape, dtype=dtype, device=lengths.device).masked_fill_(stale, float("-inf"))
    causal = None
    if T > 1:
        later = torch.ones(T, T, dtype=torch.bool, device=lengths.device).triu(1)
        causal = torch.zeros(T, T, dtype=dtype, device=lengths.device).masked_fill_(later, float("-inf"))
    return mask[:, None, None], causal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, input_size: int | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        # q, k and v in one matmul (HF stores them as q_proj/k_proj/v_proj: `hf_state` splits, `fused_state`
        # joins); at batch 1 a decode step is a chain of tiny matmuls, so fewer calls is directly faster.
        self.qkv_proj = nn.Linear(input_size or h, (self.n_heads + 2 * self.n_kv) * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (q|k heads [*, H + Hkv, D] with RoPE applied, v heads [*, Hkv, D]) of x [*, in], token-major
        with cos/sin [*, 1, D]. RoPE runs once over the joint q|k slab: half the elementwise kernels of rotating
        q and k apart, which a decode step (a chain of tiny ops) and the update both feel."""
        heads = self.qkv_proj(x).unflatten(-1, (-1, self.head_dim))  # [*, H + 2Hkv, D]
        qk, v = heads.split([self.n_heads + self.n_kv, self.n_kv], dim=-2)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before RoPE
            q, k = qk.split([self.n_heads, self.n_kv], dim=-2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-2)
        return apply_rope(qk, cos, sin), v

    def heads_first(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns q [B, H, T, D], k and v [B, Hkv, T, D] (views) of token-major qk [B, T, H + Hkv, D], v."""
        q, k = qk.transpose(1, 2).split([self.n_heads, self.n_kv], dim=1)
        return q, k, v.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: Cached | None = None,
                packing: Packing | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (the attention output [B, T, H] of x [B, T, in], or [N, H] of packed x [N, in]; this
        forward's keys and values [B, Hkv, T, D], for the caller to cache). Without `cached` the attention is
        causal over the new tokens (no cache, or the prefill of an empty one)."""
        qk, v = self.qkv(x, cos, sin)
        if packing is not None:  # attention needs rows: the padding gets zero q/k/v, after every real token
            qk, v = packing.pad(qk), packing.pad(v)
        q, k, v = self.heads_first(qk, v)
        if packing is not None:
            out = packing.attention(q, k, v, self.n_kv != self.n_heads)
        elif cached is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            out = cached_attention(q, k, v, cached)
        out = out.transpose(1, 2)  # [B, T, H, D]
        if packing is not None:
            out = packing.pack(out)  # [N, H, D]
        return self.o_proj(out.flatten(-2)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=cfg.mlp_bias)  # HF's gate_proj and up_proj, stacked
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _fused_parts(module: nn.Module) -> dict[str, tuple[str, list[str], list[int]]]:
    """Returns, per fused tensor name of `module`'s state dict, (fused name, HF part names, part sizes)."""
    parts = {}
    for name, m in module.named_modules():
        p = f"{name}." if name else ""
        for kind in ("weight", "bias"):
            if isinstance(m, Attention) and getattr(m.qkv_proj, kind) is not None:
                d = m.head_dim
                parts[f"{p}qkv_proj.{kind}"] = ([f"{p}{x}_proj.{kind}" for x in "qkv"],
                                               [m.n_heads * d, m.n_kv * d, m.n_kv * d])
            if isinstance(m, MLP) and getattr(m.gate_up_proj, kind) is not None:
                i = m.down_proj.in_features
                parts[f"{p}gate_up_proj.{kind}"] = ([f"{p}gate_proj.{kind}", f"{p}up_proj.{kind}"], [i, i])
    return parts


def hf_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns `state` (of `module`) with fused projections split into HF's q/k/v_proj and gate/up_proj."""
    out = dict(state)
    for fused, (names, sizes) in _fused_parts(module).items():
        if fused in out:
            out.update(zip(names, out.pop(fused).split(sizes, dim=0), strict=True))
    return out


def fused_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns HF-named `state` with q/k/v_proj and gate/up_proj joined into `module`'s fused tensors."""
    out = dict(state)
    for fused, (names, _) in _fused_parts(module).items():
        if all(n in out for n in names):
            out[fused] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cached=None, packing=None):
        """Returns (x after the layer, the layer's new keys and values); see Attention.forward."""
        out, k, v = self.self_attn(self.input_layernorm(x), cos, sin, cached, packing)
        x = x + out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Transformer(nn.Module):
    """Decoder-only LM: embed -> L x (attention + SwiGLU) -> norm; `lm_head` gives logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos, sin [*, 1, D] for integer positions [*]."""
        return rope_cos_sin(positions, self.inv_freq, self.rope_scale, dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, aux_layers: tuple[int, ...] = (),
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (final-normed hidden states [B, T, H], aux features [B, T, len(aux_layers) * H] or None).

        Without a cache the batch is a plain causal forward from position 0 (right padding is harmless).
        With `seq_lens` [B] as well (row b's first seq_lens[b] tokens are real), every layer but attention runs
        on the real tokens only, packed: the training forward of a rollout batch, whose padding can be half of
        its positions; outputs are zero at the padding. With a cache, row b's tokens take positions lengths[b]
        .. lengths[b] + T - 1, are written to the cache, and the cache lengths advance by T. Aux feature j is
        the residual stream entering layer j (HF's `hidden_states[j]`), the EAGLE-3 input, gathered in the same
        forward.
        """
        B, T = input_ids.shape
        packing = None
        masks = None
        if seq_lens is not None:
            if cache is not None:
                raise ValueError("seq_lens packs a forward without cache; a cached forward pads")
            packing = Packing.of(seq_lens, T)
            positions = packing.index % T  # [N]
            input_ids = packing.pack(input_ids)  # [N]
        elif cache is None or cache.is_empty():
            # From position 0 (a forward without cache, or the prefill of an empty one): causal attention
            # needs no mask, and right padding only adds positions that no real token attends to.
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            positions = cache.positions(T)
            masks = cache_masks(cache.lengths, cache.span, T, self.embed_tokens.weight.dtype)
        x = self.embed_tokens(input_ids)  # [B, T, H] or packed [N, H]
        cos, sin = self.rope(positions, x.dtype)
        if masks is not None:  # decode or verify: the layers only read the cache; their entries are written after
            keys, values = cache.read_all()  # [L, B, Hkv, span, D]
            cached = [Cached(keys[i], values[i], *masks) for i in range(len(self.layers))]
            x, aux, keys, values = run_stack(self.layers, x, cos, sin, cached, aux_layers, cache.compiled)
            cache.write_all(keys, values)
        else:
            aux = []
            for i, layer in enumerate(self.layers):
                if i in aux_layers:
                    aux.append(x)
                x, k, v = layer(x, cos, sin, None, packing)
                if cache is not None:
                    cache.write(i, k, v)
            if len(self.layers) in aux_layers:
                aux.append(x)
        if cache is not None:
            cache.advance(T)
        hidden, features = self.norm(x), (torch.cat(aux, dim=-1) if aux else None)
        if packing is not None:
            hidden = packing.pad(hidden)
            features = packing.pad(features) if features is not None else None
        return hidden, features

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns logits [B, T, V] of a full causal forward (no cache)."""
        return self.lm_head(self(input_ids)[0])


def init_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """Returns a randomly initialised model (normal(0, 0.02) weights, unit norms), reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype)


