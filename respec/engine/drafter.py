"""The EAGLE-3 drafter: one decoder layer over (target token embedding, fused target features), its own KV
cache, a head over a reduced draft vocabulary, and checkpoints in the layout vLLM and SGLang serve.

Data flow of one drafter position (checked against vLLM `vllm/model_executor/models/llama_eagle3.py` and
SGLang `python/sglang/srt/models/llama_eagle3.py`)::

    feature  = fc(cat(aux_a, aux_b, aux_c))      # [B, T, 3H] -> [B, T, H]; a [B, T, H] feature is used as-is
    residual = feature                           # vLLM: norm_before_residual=False (its default), SGLang: same
    x   = cat(input_layernorm(embed(ids)), hidden_norm(feature))   # [B, T, 2H], embeddings first
    x   = residual + o_proj(attention(q/k/v_proj(x)))             # q/k/v take 2H inputs, o_proj gives H
    out = x + mlp(post_attention_layernorm(x))   # [B, T, H] pre-norm: the next chained step's feature
    logits = lm_head(norm(out))                  # [B, T, draft_vocab]

Position t of the drafter pairs the target feature at position t with the token at position t + 1 and
predicts the token at position t + 2; its RoPE position is t, the feature's position, as in vLLM's proposer.
The decode loop that chains these steps (drafter output -> next feature) lives in `generate.py`, not here.

Checkpoint facts, from the engines' loaders:
- Tensor names (vLLM `Eagle3LlamaForCausalLM.load_weights` maps `midlayer.` to `layers.0.` and prefixes
  `model.`; SGLang `LlamaForCausalLMEagle3.load_weights` reads `midlayer.*`, `fc.*`, `norm.*`, `lm_head.*`):
  `fc.weight`, `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
  `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`,
  `lm_head.weight`, `d2t`, `t2d`. `embed_tokens.weight` is optional: both engines share the target's
  embedding when it is absent; we never write it and ignore it (after a shape check) when present.
- `d2t` holds offsets: target id = draft id + d2t[draft id] (SGLang: `hot_token_id = d2t + arange`; vLLM:
  `targets = arange + draft_id_to_target_id`). `t2d` is a bool mask over the target vocab; both skip it.
- config.json: `architectures: ["LlamaForCausalLMEagle3"]`, `draft_vocab_size`, `tie_word_embeddings: false`
  (SGLang ties lm_head to the embedding when true).
- Aux layer ids: aux id j is the residual stream entering target layer j (HF `hidden_states[j]`), the same
  convention as `Transformer.forward(aux_layers=...)`. With no ids in the config both engines capture
  [2, L//2, L-3]. Explicit ids: vLLM reads the top-level `eagle_aux_hidden_state_layer_ids` as-is
  (`vllm/v1/worker/gpu_model_runner.py::_get_eagle3_aux_layers_from_config`); SGLang reads
  `eagle_config["eagle_aux_hidden_state_layer_ids"]` (`python/sglang/srt/model_executor/model_runner.py`)
  and captures id + 1 (`set_eagle3_layers_to_capture` in its model files). So `save_drafter` writes no ids
  for the default layers, and otherwise writes j at the top level for vLLM and j - 1 under `eagle_config`
  for SGLang. Caveat: aux id L (the last layer's output) is accepted here but captured by neither engine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from respec.engine.checkpoint import (
    atomic_directory,
    check_finite,
    check_tensors,
    commit_directory,
    read_config,
    read_safetensors,
    resolve_dtype,
)
from respec.engine.compile import run_layer
from respec.engine.kvcache import KVCache
from respec.engine.model import (
    MLP,
    Attention,
    Cached,
    ModelConfig,
    RMSNorm,
    Transformer,
    cache_masks,
    fused_state,
    hf_state,
    rope_cos_sin,
    rope_inv_freq,
)
from respec.errors import CheckpointError, ConfigError, DrafterMismatchError

ARCHITECTURE = "LlamaForCausalLMEagle3"


def engine_default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """Returns the aux ids vLLM and SGLang use when a drafter config names none: (2, L//2, L-3)."""
    return (2, num_layers // 2, num_layers - 3)


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """Returns three distinct increasing aux ids in [0, L] for an L-layer target: (2, L//2, L-3) when valid.

    That triple is what vLLM and SGLang assume without explicit ids; it is distinct and increasing from
    L = 7 on. Tiny targets get low / middle / high ids spread over [1, L-1] (or [0, L] when that is too
    narrow), which must then be written explicitly into the checkpoint.
    """
    ids = engine_default_aux_layers(num_layers)
    if 0 <= ids[0] < ids[1] < ids[2] <= num_layers:
        return ids
    if num_layers < 2:
        raise ConfigError(f"EAGLE-3 needs three distinct aux layers; a {num_layers}-layer target has too few")
    pool = list(range(1, num_layers)) if num_layers >= 4 else list(range(num_layers + 1))
    return (pool[0], pool[len(pool) // 2], pool[-1])


@dataclass(frozen=True)
class DrafterConfig:
    """The drafter's architecture; field names follow the config.json keys vLLM and SGLang read."""

    hidden_size: int = 128  # must equal the target's hidden size (features and embeddings are H wide)
    intermediate_size: int = 384
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # as in ModelConfig
    max_position_embeddings: int = 2048
    vocab_size: int = 256  # the target's vocabulary
    draft_vocab_size: int = 256  # <= vocab_size; the head predicts only these tokens
    aux_layer_ids: tuple[int, int, int] = (1, 2, 3)  # target layers whose entering residual streams are fused
    target_num_layers: int = 0  # the target's depth, to tell default aux ids from explicit ones (0 = unknown)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(
                f"draft_vocab_size {self.draft_vocab_size} must be in [1, vocab_size={self.vocab_size}]")
        ids = self.aux_layer_ids
        if len(ids) != 3 or not 0 <= ids[0] < ids[1] < ids[2]:
            # The target concatenates aux states in layer order, so the ids must be increasing.
            raise ConfigError(f"aux_layer_ids {ids} must be three distinct increasing layer ids >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    def layer_config(self) -> ModelConfig:
        """Returns the Llama config of the drafter's decoder layer (attention shape, RoPE, MLP)."""
        return ModelConfig(
            model_type="llama", vocab_size=self.draft_vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings)

    def to_hf(self) -> dict:
        """Returns the config.json dict that vLLM and SGLang load as an EAGLE-3 drafter."""
        hf = {
            "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "num_hidden_layers": 1, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False,
        }
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        ids = list(self.aux_layer_ids)
        if not self.target_num_layers or tuple(ids) != engine_default_aux_layers(self.target_num_layers):
            hf["eagle_aux_hidden_state_layer_ids"] = ids  # vLLM: read as-is
            hf["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}  # SGLang adds 1
        return hf

    @classmethod
    def from_hf(cls, hf: dict, target_num_layers: int) -> DrafterConfig:
        """Returns the config of a drafter config.json dict (aux ids default to the engines' default)."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
                   if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        layer = ModelConfig.from_hf({**hf, "model_type": "llama"})  # parses rope_theta / rope_parameters
        ids = hf.get("eagle_aux_hidden_state_layer_ids")
        if not ids and isinstance(hf.get("eagle_config"), dict):
            sglang_ids = hf["eagle_config"].get("eagle_aux_hidden_state_layer_ids")
            ids = [i + 1 for i in sglang_ids] if sglang_ids else None
        if not ids:
            ids = engine_default_aux_layers(target_num_layers)
            if not 0 <= ids[0] < ids[1] < ids[2]:
                raise DrafterMismatchError(
                    f"the drafter config names no aux layer ids and the engines' default {list(ids)} is not "
                    f"valid for a {target_num_layers}-layer target; use a drafter trained for this target")
        return cls(
            hidden_size=layer.hidden_size, intermediate_size=layer.intermediate_size,
            num_attention_heads=layer.num_attention_heads, num_key_value_heads=layer.num_key_value_heads,
            head_dim=layer.head_dim, rms_norm_eps=layer.rms_norm_eps, rope_theta=layer.rope_theta,
            rope_scaling=layer.rope_scaling, max_position_embeddings=layer.max_position_embeddings,
            vocab_size=layer.vocab_size, draft_vocab_size=int(hf.get("draft_vocab_size") or layer.vocab_size),
            aux_layer_ids=tuple(ids), target_num_layers=target_num_layers)


def check_fits(cfg: DrafterConfig, target: ModelConfig, where: str = "") -> None:
    """Raises DrafterMismatchError unless a drafter of `cfg` can serve `target`: the same hidden size and
    vocabulary, and aux layers that the target has. The one fit check (load, init, engine, weight swaps)."""
    if cfg.hidden_size != target.hidden_size:
        raise DrafterMismatchError(
            f"{where}drafter hidden_size {cfg.hidden_size} != target hidden_size {target.hidden_size}; "
            "use a drafter trained for this target")
    if cfg.vocab_size != target.vocab_size:
        raise DrafterMismatchError(
            f"{where}drafter vocab_size {cfg.vocab_size} != target vocab_size {target.vocab_size}; "
            "use a drafter trained for this target's tokenizer")
    if max(cfg.aux_layer_ids) > target.num_hidden_layers:
        raise DrafterMismatchError(
            f"{where}drafter aux layer ids {list(cfg.aux_layer_ids)} exceed the target's "
            f"{target.num_hidden_layers} layers; use a drafter trained for this target")


def vocab_maps(token_ids_by_frequency, draft_vocab_size: int,
               target_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d2t int64 [Vd] offsets, t2d bool [V]) for the first `draft_vocab_size` distinct ids given.

    `token_ids_by_frequency` lists target ids, most frequent first; too few ids are topped up with the
    lowest unused ids. The kept ids are sorted, so draft id order follows target id order (as SpecForge
    builds them) and target id = draft id + d2t[draft id].
    """
    if not 0 < draft_vocab_size <= target_vocab:
        raise ConfigError(f"draft_vocab_size {draft_vocab_size} must be in [1, {target_vocab}]")
    ids = torch.as_tensor(token_ids_by_frequency, dtype=torch.long).flatten()
    if ids.numel() and (ids.min() < 0 or ids.max() >= target_vocab):
        raise ConfigError(f"token ids must lie in [0, {target_vocab})")
    chosen = torch.zeros(target_vocab, dtype=torch.bool)
    first = []  # distinct ids in order of first appearance
    for i in ids.tolist():
        if len(first) == draft_vocab_size:
            break
        if not chosen[i]:
            chosen[i] = True
            first.append(i)
    if len(first) < draft_vocab_size:
        unused = (~chosen).nonzero().flatten()[: draft_vocab_size - len(first)]
        chosen[unused] = True
    target_ids = chosen.nonzero().flatten()  # [Vd], sorted
    d2t = target_ids - torch.arange(draft_vocab_size)
    return d2t, chosen


class _Shared:
    """Holds a module by reference: not registered as a submodule, not copied by deepcopy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class Eagle3Layer(nn.Module):
    """The drafter's decoder layer: attention over [embedding, feature] (2H inputs), residual = feature."""

    def __init__(self, layer_cfg: ModelConfig):
        super().__init__()
        h = layer_cfg.hidden_size
        self.input_layernorm = RMSNorm(h, layer_cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, layer_cfg.rms_norm_eps)
        self.self_attn = Attention(layer_cfg, input_size=2 * h)  # q/k/v read [embedding, feature]
        self.post_attention_layernorm = RMSNorm(h, layer_cfg.rms_norm_eps)
        self.mlp = MLP(layer_cfg)

    def forward(self, embeds: torch.Tensor, feature: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cached: Cached | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (the layer's output [B, T, H], its new keys and values for the caller to cache)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(feature)], dim=-1)  # [B, T, 2H]
        out, k, v = self.self_attn(x, cos, sin, cached)
        x = feature + out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v  # [B, T, H]


class Eagle3Drafter(nn.Module):
    """EAGLE-3 draft model over a target's features and (shared, frozen) token embedding."""

    def __init__(self, config: DrafterConfig, embed_tokens: nn.Embedding):
        super().__init__()
        if embed_tokens.weight.shape != (config.vocab_size, config.hidden_size):
            raise DrafterMismatchError(
                f"target embedding is {tuple(embed_tokens.weight.shape)}, drafter expects "
                f"({config.vocab_size}, {config.hidden_size}); pair the drafter with the target it was built for")
        self.config = config
        self.aux_layer_ids = config.aux_layer_ids
        self.layer_config = config.layer_config()
        h = config.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = Eagle3Layer(self.layer_config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        # Until `set_vocab_maps`, the draft vocab is the first Vd target ids.
        d2t = torch.zeros(config.draft_vocab_size, dtype=torch.long)
        t2d = torch.arange(config.vocab_size) < config.draft_vocab_size
        self.register_buffer("d2t", d2t)  # [Vd] int64 offsets: target id = draft id + d2t[draft id]
        self.register_buffer("t2d", t2d)  # [V] bool: target token is in the draft vocab
        inv_freq, self.rope_scale = rope_inv_freq(self.layer_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The target's embedding, shared (vLLM/SGLang do the same): kept out of parameters(), state_dict()
        # and deepcopy, so training never updates it and weight swaps of the target are seen at once.
        self._embed = _Shared(embed_tokens)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._embed.module

    def bind_target(self, target: Transformer) -> None:
        """Shares `target`'s token embedding (after the engine swaps in a new target module)."""
        self.bind_embedding(target.embed_tokens)

    def bind_embedding(self, emb: nn.Embedding) -> None:
        """Reads tokens through `emb` (shared, not a parameter of the drafter): a target's, or a frozen copy."""
        if emb.weight.shape != (self.config.vocab_size, self.config.hidden_size):
            raise DrafterMismatchError(
                f"target embedding is {tuple(emb.weight.shape)}, drafter expects "
                f"({self.config.vocab_size}, {self.config.hidden_size})")
        self._embed = _Shared(emb)

    def set_vocab_maps(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Installs draft-vocab maps (as built by `vocab_maps`)."""
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    # The named steps (SpecForge style) that forward composes; the trainer may call them one by one.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns the target's embeddings [B, T, H] of input_ids [B, T], in the drafter's dtype."""
        return self.embed_tokens(input_ids).to(self.fc.weight.dtype)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Returns the layer input [B, T, H]: fc(features) for target features [B, T, 3H], else features."""
        h = self.config.hidden_size
        if features.shape[-1] == 3 * h:
            return self.fc(features.to(self.fc.weight.dtype))
        if features.shape[-1] == h:  # the drafter's own previous output, already fused
            return features.to(self.fc.weight.dtype)
        raise ValueError(f"features must be [.., {3 * h}] (target aux states) or [.., {h}], got {features.shape}")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns draft logits [.., Vd] of pre-norm drafter outputs [.., H]."""
        return self.lm_head(self.norm(hidden))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos, sin [B, T, 1, D] for positions [B, T], computed like the target's."""
        return rope_cos_sin(positions, self.inv_freq, self.rope_scale, dtype)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [B, T, H] pre-norm output for chaining, draft logits [B, T, draft_vocab]).

        Entry t pairs features[:, t] (target aux states [3H], or the drafter's previous hidden [H]) with
        input_ids[:, t], the token one position later. Without a cache this is a causal forward from
        position 0; with one, row b takes positions lengths[b] .. lengths[b] + T - 1 and the cache advances
        by T (roll back with `cache.set_lengths`).
        """
        B, T = input_ids.shape
        embeds = self.embed(input_ids)  # [B, T, H]
        feature = self.project(features)  # [B, T, H]
        cached = None
        if cache is None or cache.is_empty():
            positions = torch.arange(T, device=embeds.device).expand(B, T)
        else:
            positions = cache.positions(T)
            cached = Cached(*cache.read(0), *cache_masks(cache.lengths, cache.span, T, embeds.dtype))
        cos, sin = self.rope(positions, embeds.dtype)
        compiled = cache is not None and cache.compiled
        hidden, k, v = run_layer(self.midlayer, (embeds, feature, cos, sin, cached), compiled)  # [B, T, H]
        if cache is not None:
            cache.write(0, k, v)
            cache.advance(T)
        return hidden, self.compute_logits(hidden)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """Returns an empty one-layer KV cache for `batch` rows of up to `capacity` positions."""
        w = self.fc.weight
        return KVCache.for_model(self.layer_config, batch, capacity, w.dtype, w.device, num_layers=1)

    def draft_ids_in_target(self) -> torch.Tensor:
        """Returns the target id of every draft id [Vd]."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Returns target ids for draft ids (any shape)."""
        return draft_ids + self.d2t[draft_ids]

    def expand_probs(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """Returns draft-vocab probabilities [.., Vd] scattered into the target vocab [.., V] (zeros elsewhere)."""
        out = draft_probs.new_zeros(*draft_probs.shape[:-1], self.config.vocab_size)
        return out.index_copy_(-1, self.draft_ids_in_target(), draft_probs)

    def restrict_to_draft(self, target_values: torch.Tensor) -> torch.Tensor:
        """Returns target-vocab values [.., V] (logits, probabilities) at the draft vocab's ids [.., Vd]."""
        return target_values.index_select(-1, self.draft_ids_in_target())


def init_drafter(target: Transformer, seed: int = 0, draft_vocab_size: int | None = None,
                 aux_layer_ids: tuple[int, int, int] | None = None,
                 token_frequencies: torch.Tensor | None = None) -> Eagle3Drafter:
    """Returns a randomly initialised drafter for `target` (normal(0, 0.02) weights, unit norms).

    The attention shape, RoPE and MLP width copy the target's. A reduced draft vocabulary keeps the
    `draft_vocab_size` most frequent target tokens of `token_frequencies` (counts [V], e.g. over the
    training data); `aux_layer_ids` default to `default_aux_layers(L)`.
    """
    tc = target.config
    vocab = tc.vocab_size
    draft_vocab_size = vocab if draft_vocab_size is None else draft_vocab_size
    if draft_vocab_size < vocab and token_frequencies is None:
        raise ConfigError("a reduced draft vocabulary needs token_frequencies (token counts over the target vocab)")
    num_layers = tc.num_hidden_layers
    ids = default_aux_layers(num_layers) if aux_layer_ids is None else tuple(aux_layer_ids)
    if max(ids) > num_layers:
        raise DrafterMismatchError(f"aux layer ids {list(ids)} exceed the target's {num_layers} layers")
    cfg = DrafterConfig(
        hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim, rms_norm_eps=tc.rms_norm_eps, rope_theta=tc.rope_theta,
        rope_scaling=copy.deepcopy(tc.rope_scaling), max_position_embeddings=tc.max_position_embeddings,
        vocab_size=vocab, draft_vocab_size=draft_vocab_size, aux_layer_ids=ids, target_num_layers=num_layers)
    emb = target.embed_tokens
    drafter = Eagle3Drafter(cfg, emb)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        if token_frequencies is not None:
            counts = torch.as_tensor(token_frequencies).flatten().cpu()
            if counts.numel() != vocab:
                raise ConfigError(f"token_frequencies has {counts.numel()} entries, the target vocab {vocab}")
            order = torch.sort(-counts.double(), stable=True).indices  # most frequent first, ties by id
            drafter.set_vocab_maps(*vocab_maps(order, draft_vocab_size, vocab))
    drafter = drafter.to(device=emb.weight.device, dtype=emb.weight.dtype)
    drafter.inv_freq = inv_freq_fp32(drafter)
    return drafter


def inv_freq_fp32(drafter: Eagle3Drafter) -> torch.Tensor:
    """Returns the RoPE inverse frequencies in fp32 on the drafter's device (`.to(bf16)` would round them)."""
    return rope_inv_freq(drafter.layer_config)[0].to(drafter.fc.weight.device)


def save_drafter(drafter: Eagle3Drafter, path: str | os.PathLike) -> Path:
    """Writes `drafter` atomically as a vLLM/SGLang EAGLE-3 checkpoint (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = atomic_directory(path)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in hf_state(drafter, drafter.state_dict()).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = drafter.config.to_hf()
        hf["torch_dtype"] = str(drafter.fc.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        commit_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_drafter(path: str | os.PathLike, target: Transformer, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> Eagle3Drafter:
    """Returns the EAGLE-3 drafter stored at `path`, bound to `target`'s embedding, in eval mode.

    dtype and device default to the target embedding's. Raises DrafterMismatchError when the drafter does
    not fit `target` and CheckpointError when the directory is missing, corrupt or incomplete.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: drafter directory does not exist")
    hf = read_config(path)
    if not isinstance(hf, dict) or ARCHITECTURE not in (hf.get("architectures") or [ARCHITECTURE]):
        archs = hf.get("architectures") if isinstance(hf, dict) else None
        raise CheckpointError(f"{path}: not an EAGLE-3 drafter (architectures {archs}, expected {ARCHITECTURE})")
    tc = target.config
    try:
        cfg = DrafterConfig.from_hf(hf, tc.num_hidden_layers)
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}/config.json: invalid drafter config ({e})") from None
    check_fits(cfg, tc, where=f"{path}: ")

    tensors = read_safetensors(path)
    check_finite(tensors, path)
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    emb = tensors.pop("embed_tokens.weight", None)
    if emb is not None and tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"{path}: embed_tokens.weight has shape {tuple(emb.shape)}, "
                              f"config implies ({cfg.vocab_size}, {cfg.hidden_size})")
    with torch.device("meta"):
        drafter = Eagle3Drafter(cfg, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
    expected = hf_state(drafter, drafter.state_dict())  # checked under the HF names vLLM/SGLang use
    if cfg.draft_vocab_size == cfg.vocab_size:  # both engines accept a full-vocab drafter without maps
        tensors.setdefault("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    if "d2t" in tensors and "t2d" not in tensors:
        tensors["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        target_ids = torch.arange(len(tensors["d2t"])) + tensors["d2t"].long()
        if target_ids.numel() and 0 <= int(target_ids.min()) and int(target_ids.max()) < cfg.vocab_size:
            tensors["t2d"][target_ids] = True
    check_tensors(expected, tensors, path, "drafter checkpoint")
    d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
    target_ids = torch.arange(cfg.draft_vocab_size) + d2t
    if (target_ids.min() < 0 or target_ids.max() >= cfg.vocab_size
            or target_ids.unique().numel() != cfg.draft_vocab_size
            or not torch.equal(t2d.nonzero().flatten(), target_ids.sort().values)):
        raise CheckpointError(f"{path}: d2t/t2d do not describe {cfg.draft_vocab_size} distinct target tokens")

    target_emb = target.embed_tokens
    device = target_emb.weight.device if device is None else device
    dtype = target_emb.weight.dtype if dtype is None else resolve_dtype(dtype, device)
    state = {k: tensors[k].to(dtype) if tensors[k].is_floating_point() else tensors[k] for k in expected}
    state["d2t"], state["t2d"] = d2t, t2d
    drafter.load_state_dict(fused_state(drafter, state), strict=True, assign=True)
    drafter.inv_freq = inv_freq_fp32(drafter)  # replaces the meta buffer; .to(device) keeps it fp32
    drafter.bind_target(target)
    return drafter.to(device).eval()
