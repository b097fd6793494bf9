"""Tests of respec/engine/slots.py: buckets and spans, slot views read and write each slot's own region (gathered
or through views) exactly as a fresh forward sees the sequence, pads touch nothing live, and the batch of a step
is the live slots padded with the lowest free ones."""

import pytest
import torch

from respec.engine.sampling import SamplingParams
from respec.engine.slots import SPAN_BLOCK, SlotKV, SlotTable, SlotView, attention_span, bucket_size

V = 16


@pytest.fixture(scope="module")
def model(sharp_target):
    return sharp_target(V, max_positions=64)


def test_bucket_sizes_are_1_2_4_then_multiples_of_8_up_to_the_table_size():
    assert [bucket_size(n, 64) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert [bucket_size(n, 256) for n in (16, 17, 24, 25, 33, 63, 64, 65, 250)] == [16, 24, 24, 32, 40, 64, 64, 72, 256]
    assert [bucket_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert bucket_size(0, 8) == 1


def test_attention_spans_are_blocks_within_the_capacity():
    assert attention_span(1, 100) == SPAN_BLOCK and attention_span(SPAN_BLOCK, 100) == SPAN_BLOCK
    assert attention_span(SPAN_BLOCK + 1, 100) == 2 * SPAN_BLOCK and attention_span(99, 100) == 100


@pytest.mark.parametrize("slots", [[0, 1, 2], [5, 1, 3]], ids=["contiguous", "gathered"])
@torch.no_grad()
def test_views_decode_like_a_fresh_forward(model, slots):
    """Prefill three prompts into `slots` of an 8-slot cache holding garbage elsewhere, decode two steps through
    views (one and three tokens per row), and compare with a cacheless forward over each whole sequence."""
    gen = torch.Generator().manual_seed(0)
    kv = SlotKV.for_model(model.config, 8, 40, torch.float32, "cpu")
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)  # stale entries must never be read
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    L = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    index = torch.tensor(slots)
    contiguous = slots == [0, 1, 2]
    lengths = torch.tensor([len(p) for p in prompts])
    model(ids, SlotView(kv, index, contiguous, torch.zeros(3, dtype=torch.long), L, empty=True))
    seqs = [list(p) for p in prompts]
    for T in (1, 3):
        new = torch.randint(0, V, (3, T), generator=gen)
        view = SlotView(kv, index, contiguous, lengths, attention_span(int(lengths.max()) + T, kv.capacity))
        hidden, _ = model(new, view)
        assert view.lengths.tolist() == (lengths + T).tolist()
        for b in range(3):
            seqs[b] += new[b].tolist()
            ref, _ = model(torch.tensor([seqs[b]]))
            torch.testing.assert_close(hidden[b], ref[0, -T:], atol=1e-5, rtol=0)
        lengths = lengths + T


@pytest.mark.parametrize("span", [SPAN_BLOCK, 3 * SPAN_BLOCK], ids=["rows-spans", "whole-slots"])
def test_a_gathered_read_is_each_rows_slot_up_to_the_span(span):
    """Both ways of gathering scattered slots (the rows' spans, or whole slots cut after) read the same entries."""
    gen = torch.Generator().manual_seed(0)
    kv = SlotKV(3, 8, 2, 4 * SPAN_BLOCK, 4, torch.float32, "cpu")
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)
    view = SlotView(kv, torch.tensor([6, 1, 3]), False, torch.zeros(3, dtype=torch.long), span)
    keys, values = view.read_all()
    assert torch.equal(keys, kv.k[:, [6, 1, 3], :, :span]) and torch.equal(values, kv.v[:, [6, 1, 3], :, :span])
    assert all(torch.equal(a, b) for a, b in zip(view.read(1), (keys[1], values[1]), strict=True))


@torch.no_grad()
def test_a_pad_row_changes_no_live_slot(model):
    kv = SlotKV.for_model(model.config, 4, 16, torch.float32, "cpu")
    model(torch.tensor([[1, 2, 3]]), SlotView(kv, torch.tensor([2]), False, torch.zeros(1, dtype=torch.long), 3,
                                              empty=True))
    before_k, before_v = kv.k[:, 2].clone(), kv.v[:, 2].clone()
    # A step over slots [0, 2]: slot 0 is a pad read from length 0.
    model(torch.tensor([[4], [5]]), SlotView(kv, torch.tensor([0, 2]), False, torch.tensor([0, 3]), kv.capacity))
    assert torch.equal(kv.k[:, 2, :, :3], before_k[:, :, :3]) and torch.equal(kv.v[:, 2, :, :3], before_v[:, :, :3])


def table(model, slots=8, speculative=False):
    return SlotTable(model.config, slots, 32, 4, torch.float32, "cpu",
                     draft_layer=model.config if speculative else None, feature_size=3 * 32, backlog=8)


def test_slots_are_taken_lowest_first_and_freed_without_moving(model):
    tab = table(model)
    assert tab.take(3) == [0, 1, 2] and tab.num_active() == 3
    tab.release(1)
    assert tab.take(2) == [1, 3]


def test_the_batch_pads_live_slots_with_the_lowest_free_ones(model):
    tab = table(model)
    taken = tab.take(6)
    for s in taken:
        tab.owner[s], tab.params[s] = object(), SamplingParams(temperature=0.5)
    for s in (1, 4, 5):
        tab.release(s)
    b = tab.batch_for(tab.active())  # live 0, 2, 3: bucket 4 with pad 1
    assert b.slots == [0, 1, 2, 3] and b.live == [0, 2, 3] and b.contiguous
    assert b.active.tolist() == [True, False, True, True] and b.params.truncate is False
    assert tab.batch_for([0, 2, 3]) is b  # the same live slots keep the batch (and its state)
    tab.owner[7], tab.params[7] = object(), SamplingParams(top_p=0.5)
    tab.free.remove(7)
    b2 = tab.batch_for(tab.active())  # live 0, 2, 3, 7: bucket 4, no pad, gathered
    assert b2 is not b and b2.slots == [0, 2, 3, 7] and not b2.contiguous and b2.params.truncate


def test_flush_writes_the_batch_state_back_to_its_slots(model):
    tab = table(model, speculative=True)
    for s in tab.take(4):
        tab.owner[s], tab.params[s] = object(), SamplingParams()
    tab.release(1)
    b = tab.batch_for(tab.active())  # slots [0, 1, 2, 3], slot 1 a pad
    tab.flush()  # nothing advanced: the state is still the slots' own
    b = tab.batch_for(tab.active())
    b.lengths = torch.tensor([7, 9, 5, 6])
    b.pend = torch.tensor([2, 4, 3, 1])
    tab.reset_pads(b)
    assert b.lengths.tolist() == [7, 0, 5, 6] and b.pend.tolist() == [2, 1, 3, 1]
    tab.flush()
    assert tab.batch is None and tab.lengths[[0, 2, 3]].tolist() == [7, 5, 6]
    assert tab.pend[[0, 2, 3]].tolist() == [2, 3, 1]


def test_compacting_moves_the_highest_live_slots_into_the_holes_with_their_entries(model):
    tab = table(model, speculative=True)
    gen = torch.Generator().manual_seed(0)
    for t in (tab.kv.k, tab.kv.v, tab.dkv.k, tab.dkv.v, tab.hist_feat):
        t.copy_(torch.randn(t.shape, generator=gen))
    tab.hist_tok.copy_(torch.randint(0, 50, tab.hist_tok.shape, generator=gen))
    tab.lengths.copy_(torch.arange(8) + 3)
    tab.key.copy_(torch.arange(8) * 100)
    owners = [object() for _ in range(6)]
    for s in tab.take(6):
        tab.owner[s], tab.params[s], tab.host_len[s], tab.host_pend[s] = owners[s], SamplingParams(), s + 3, 1
    tab.fresh.add(5)
    before = {name: getattr(tab, name).clone() for name in ("lengths", "key", "hist_tok", "hist_feat")}
    kv = [t.clone() for t in (tab.kv.k, tab.kv.v, tab.dkv.k, tab.dkv.v)]
    fills = list(tab.fills)
    for s in (1, 3):
        tab.release(s)
    moves = tab.compact()  # live 0, 2, 4, 5 -> 0..3: 4 -> 1 and 5 -> 3
    assert moves == [(4, 1), (5, 3)] and tab.active() == [0, 1, 2, 3] and sorted(tab.free) == [4, 5, 6, 7]
    assert tab.owner[1] is owners[4] and tab.owner[3] is owners[5] and tab.fresh == {3}
    assert [tab.host_len[s] for s in range(4)] == [3, 7, 5, 8]
    assert all(tab.fills[s] == fills[s] + 1 for s in (1, 3, 4, 5))
    for a, b in moves:
        n = tab.host_len[b]
        assert tab.lengths[b] == before["lengths"][a] and tab.key[b] == before["key"][a]
        assert torch.equal(tab.hist_tok[b, :n], before["hist_tok"][a, :n])
        assert torch.equal(tab.hist_feat[b, :n], before["hist_feat"][a, :n])
        for now, then in zip((tab.kv.k, tab.kv.v, tab.dkv.k, tab.dkv.v), kv, strict=True):
            assert torch.equal(now[:, b, :, :n], then[:, a, :, :n])
    assert tab.batch_for(tab.active()).contiguous and tab.compact() == []
