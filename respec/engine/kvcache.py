"""The KV cache of one batch: preallocated keys and values with one length per row, and the masks and positions
derived from those lengths (cached forwards outside the engine: the verify-cost benchmark, the drafter's own
cache in tests). It is a `SlotView` over all slots of its own storage; the engine keeps its requests in the slot
table of `slots.py`, whose views the models call the same way.

Invariant: row b holds valid entries at positions [0, lengths[b]); anything beyond is stale and masked out, so
rolling back rejected draft tokens is lowering lengths[b] (no copy). `extent` is a host-side integer with
extent >= lengths.max(): attention reads cached positions [0, extent) only (and the new tokens apart), and
knowing it on the host avoids a device sync per forward.
"""

from __future__ import annotations

import torch

from respec.engine.slots import SlotKV, SlotView


class KVCache(SlotView):
    """Keys and values of every layer [L, B, Hkv, capacity, D] with a length per row: a view over all slots of
    its own slot storage, row b = slot b, whose attention span is the extent."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        kv = SlotKV(num_layers, batch, num_kv_heads, capacity, head_dim, dtype, device)
        super().__init__(kv, torch.arange(batch, device=device), True,
                         torch.zeros(batch, dtype=torch.long, device=device), span=0)
        self.capacity = capacity

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                  num_layers: int | None = None) -> KVCache:
        """Returns an empty cache shaped for model config `cfg` (or `num_layers` layers of its attention shape)."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        return cls(layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim, dtype, device)

    @property
    def k(self) -> torch.Tensor:
        return self.kv.k

    @property
    def v(self) -> torch.Tensor:
        return self.kv.v

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def extent(self) -> int:
        """Host-side upper bound of lengths.max(): attention reads cached positions [0, extent)."""
        return self.span

    def is_empty(self) -> bool:
        """Returns whether no row holds an entry (host-side: no sync)."""
        return self.span == 0

    def positions(self, T: int) -> torch.Tensor:
        """Returns the positions [B, T] that T new tokens per row take: lengths[b] .. lengths[b] + T - 1."""
        if self.span + T > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.span + T} positions needed, capacity {self.capacity}")
        return super().positions(T)

    def advance(self, T: int) -> None:
        """Records that a forward appended T entries to every row."""
        super().advance(T)
        self.span += T

    def set_lengths(self, lengths: torch.Tensor, extent: int | None = None) -> None:
        """Moves each row's length (prompt lengths, or a rollback); `extent` must bound max(lengths) from above.

        Without `extent` the old one is kept when it still bounds the new lengths, which holds for any rollback
        (lengths only fall); pass it when lengths may grow, or sync once with `max_length`.
        """
        self.lengths = lengths.to(self.lengths.device, torch.long)
        if extent is not None:
            self.span = int(extent)

    def shrink_extent(self, max_length: int) -> None:
        """Lowers `extent` to a host-side max(lengths) read in the caller's one sync per step."""
        self.span = int(max_length)

    def reset(self) -> None:
        """Empties every row (stale entries stay, masked)."""
        self.lengths = torch.zeros_like(self.lengths)
        self.span = 0
