"""Tests of respec/engine/kvcache.py (and the masks of model.py that read it): positions, masks, writes, advance,
rollback."""

import pytest
import torch

from respec.engine.kvcache import KVCache
from respec.engine.model import ModelConfig, cache_masks

L, B, HKV, CAP, D = 2, 3, 2, 10, 4


def make_cache(lengths=(0, 0, 0)) -> KVCache:
    cache = KVCache(L, B, HKV, CAP, D, torch.float32, "cpu")
    cache.set_lengths(torch.tensor(lengths), extent=max(lengths))
    return cache


def kv(T: int, offset: float = 0.0) -> torch.Tensor:
    """Returns k or v [B, Hkv, T, D] whose entry (b, h, t, :) is 100 b + 10 h + t + offset."""
    b = torch.arange(B)[:, None, None, None] * 100
    h = torch.arange(HKV)[None, :, None, None] * 10
    t = torch.arange(T)[None, None, :, None]
    return (b + h + t + offset).float().expand(B, HKV, T, D).clone()


def test_for_model_shapes_and_empty_state():
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    cache = KVCache.for_model(cfg, batch=5, capacity=7, dtype=torch.bfloat16, device="cpu")
    assert cache.k.shape == cache.v.shape == (3, 5, 2, 7, 8) and cache.k.dtype == torch.bfloat16
    assert cache.batch == 5 and cache.is_empty() and cache.lengths.tolist() == [0] * 5
    assert KVCache.for_model(cfg, 2, 7, torch.float32, "cpu", num_layers=1).k.shape[0] == 1


def test_positions_follow_each_rows_length():
    cache = make_cache((2, 5, 0))
    assert cache.positions(3).tolist() == [[2, 3, 4], [5, 6, 7], [0, 1, 2]]


def test_masks_let_new_tokens_see_each_rows_valid_entries_and_each_other_causally():
    cache = make_cache((2, 5, 0))
    mask, causal = cache_masks(cache.lengths, cache.span, 2, torch.float32)
    assert mask.shape == (B, 1, 1, 5) and causal.shape == (2, 2)
    visible = (mask[:, 0, 0] == 0).long().tolist()  # [B, S]
    assert visible == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert (causal == 0).tolist() == [[True, False], [True, True]]
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert cache_masks(cache.lengths, 5, 1, torch.bfloat16)[0].dtype == torch.bfloat16
    assert cache_masks(cache.lengths, 5, 1, torch.float32)[1] is None  # one new token sees itself


def test_positions_raise_on_overflow():
    cache = make_cache((8, 8, 8))
    cache.positions(2)  # exactly full
    with pytest.raises(RuntimeError, match="overflow"):
        cache.positions(3)


def test_write_places_each_row_at_its_length_and_read_returns_the_extent():
    cache = make_cache((2, 5, 0))
    cache.write(1, kv(2), kv(2, offset=0.5))
    for b, n in enumerate((2, 5, 0)):
        torch.testing.assert_close(cache.k[1, b, :, n:n + 2], kv(2)[b])
        torch.testing.assert_close(cache.v[1, b, :, n:n + 2], kv(2, 0.5)[b])
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    assert cache.lengths.tolist() == [2, 5, 0] and cache.extent == 5  # only advance moves lengths
    keys, values = cache.read(1)
    assert keys.shape == values.shape == (B, HKV, 5, D)  # the cached positions [0, extent)
    cache.advance(2)
    assert cache.lengths.tolist() == [4, 7, 2] and cache.extent == 7 and cache.read(1)[0].shape[2] == 7


def test_rollback_keeps_extent_as_an_upper_bound_and_refeed_overwrites():
    cache = make_cache((3, 3, 3))
    cache.write(0, kv(4, offset=1000), kv(4, offset=1000))  # drafts that will be rejected
    cache.advance(4)
    cache.set_lengths(torch.tensor([4, 3, 6]))  # keep 1, 0 and 3 of them
    assert cache.extent == 7 and cache.extent >= int(cache.lengths.max())
    # Rejected entries stay in memory but are masked out: a new token of row 1 sees positions 0..3 only.
    visible = (cache_masks(cache.lengths, cache.span, 1, torch.float32)[0][1, 0, 0] == 0).tolist()
    assert visible == [True] * 3 + [False] * 4
    cache.write(0, kv(1), kv(1))
    assert cache.k[0, 1, 0, 3, 0] == 100  # row 1's token at its own length, over the rejected entry
    assert cache.k[0, 0, 0, 4, 0] == 0 and cache.k[0, 2, 0, 6, 0] == 200
    cache.shrink_extent(6)
    assert cache.extent == 6 and cache.read(0)[0].shape[2] == 6
    cache.set_lengths(torch.tensor([9, 9, 9]), extent=9)  # growing lengths need an explicit extent
    assert cache.extent == 9


def test_reset_empties_every_row():
    cache = make_cache((1, 2, 3))
    cache.reset()
    assert cache.is_empty() and cache.lengths.tolist() == [0, 0, 0] and cache.span == 0
