"""The KV cache of one batch: preallocated keys and values with one length per row, and the masks and positions
derived from those lengths (cached forwards outside the engine: the tuner's profiling, tests). The engine keeps
its requests in the slot table of `slots.py`, whose views offer the same interface to the models.

Invariant: row b holds valid entries at positions [0, lengths[b]); anything beyond is stale and masked out, so
rolling back rejected draft tokens is lowering lengths[b] (no copy). `extent` is a host-side integer with
extent >= lengths.max(): attention reads cached positions [0, extent) only (and the new tokens apart), and
knowing it on the host avoids a device sync per forward.
"""

from __future__ import annotations

import torch

from respec.engine.slots import SlotKV


class KVCache:
    """Keys and values of every layer [L, B, Hkv, capacity, D] with a length per row."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # The slot table's storage, one slot per row: [L, B, Hkv, capacity, D] each.
        kv = SlotKV(num_layers, batch, num_kv_heads, capacity, head_dim, dtype, device)
        self.k, self.v = kv.k, kv.v
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.extent = 0  # host-side upper bound of lengths.max()
        self.capacity = capacity

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                  num_layers: int | None = None) -> KVCache:
        """Returns an empty cache shaped for model config `cfg` (or `num_layers` layers of its attention shape)."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        return cls(layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def is_empty(self) -> bool:
        """Returns whether no row holds an entry (host-side: no sync)."""
        return self.extent == 0

    compiled = False  # forwards over a KVCache run eager

    @property
    def span(self) -> int:
        """Returns the cached positions a forward reads: [0, extent)."""
        return self.extent

    def positions(self, T: int) -> torch.Tensor:
        """Returns the positions [B, T] that T new tokens per row take: lengths[b] .. lengths[b] + T - 1."""
        if self.extent + T > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.extent + T} positions needed, capacity {self.capacity}")
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the layer's keys and values over [0, extent) [B, Hkv, S, D] (views)."""
        return self.k[layer, :, :, : self.extent], self.v[layer, :, :, : self.extent]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [B, Hkv, T, D] of `layer` at each row's positions lengths[b] + t (lengths move only in
        `advance`, after the last layer)."""
        B, H, T, D = k.shape
        idx = self.positions(T)[:, None, :, None].expand(B, H, T, D)
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def advance(self, T: int) -> None:
        """Records that a forward appended T entries to every row."""
        self.lengths = self.lengths + T
        self.extent += T

    def set_lengths(self, lengths: torch.Tensor, extent: int | None = None) -> None:
        """Moves each row's length (prompt lengths, or a rollback); `extent` must bound max(lengths) from above.

        Without `extent` the old one is kept when it still bounds the new lengths, which holds for any rollback
        (lengths only fall); pass it when lengths may grow, or sync once with `max_length`.
        """
        self.lengths = lengths.to(self.lengths.device, torch.long)
        if extent is not None:
            self.extent = int(extent)

    def shrink_extent(self, max_length: int) -> None:
        """Lowers `extent` to a host-side max(lengths) read in the caller's one sync per step."""
        self.extent = int(max_length)

    def reset(self) -> None:
        """Empties every row (stale entries stay, masked)."""
        self.lengths = torch.zeros_like(self.lengths)
        self.extent = 0
