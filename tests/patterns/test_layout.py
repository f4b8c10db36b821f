"""Layouts are exact against the dense mask, including ragged blocks, Lq != Lk and per-head."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layout_checks import check_layout
from pattern_defs import PREDICATES, patterns

lengths = st.integers(1, 300)
blocks = st.sampled_from([16, 32, 64, 128])


@settings(max_examples=120, deadline=None)
@given(p=patterns(), lq=lengths, lk=lengths, bm=blocks, bn=blocks)
def test_layout_exact_random(p, lq, lk, bm, bn):
    check_layout(p, lq, lk, bm, bn)


@settings(max_examples=25, deadline=None)
@given(p=patterns(max_leaves=3, per_head=False), lq=st.integers(300, 1000),
       lk=st.integers(300, 1000), bm=st.sampled_from([64, 128]), bn=st.sampled_from([64, 128]))
def test_layout_exact_long(p, lq, lk, bm, bn):
    check_layout(p, lq, lk, bm, bn)


SMALL_BLOCKS = [
    P.axial(4, 3), P.axial(5) & P.causal, P.block(6) & ~P.strided(2), P.fanout(2) | P.sink(3),
    P.global_(5) & ~P.causal, P.window(2, 0) & P.block(8), P.block(8) & P.window(0, 3),
    ~P.local(3) & P.sliding(9), PREDICATES[0] & P.axial(3), P.prefix(5) | P.causal,
]


@pytest.mark.parametrize("p", SMALL_BLOCKS, ids=str)
@pytest.mark.parametrize("bm,bn", [(1, 1), (2, 3), (4, 4), (3, 7)])
@pytest.mark.parametrize("lq,lk", [(13, 13), (11, 17), (17, 11)])
def test_layout_exact_tiny_tiles(p, bm, bn, lq, lk):
    check_layout(p, lq, lk, bm, bn)


@pytest.mark.parametrize("p", [
    P.causal, P.sliding(100), P.local(64) & P.causal, P.block(96), P.sink(10) & P.causal,
    P.prefix(200), P.causal & P.prefix(70), ~P.causal, ~P.sink(40), P.dense, P.window(300, 0),
], ids=str)
def test_interval_patterns_take_the_closed_form_route(p):
    layout = p.layout(500, 700, 64, 32)
    assert layout.is_interval and layout.kv_start.shape == (1, 8)
    check_layout(p, 500, 700, 64, 32)


def test_gap_rows_are_exact():
    # Rows of block(8) & window(-) style intersections can skip k-blocks inside one q-block.
    p = P.block(16) & P.window(0, 9) & ~P.sliding(1) & ~P.causal
    check_layout(p, 64, 64, 16, 2)


def test_layout_never_builds_dense(monkeypatch):
    # Layout of a 2**16-long sequence stays cheap for every built-in route.
    for p in (P.causal & P.sliding(1024), P.strided(4096) & P.causal, P.axial(256),
              P.fanout(2), P.global_(64) | P.local(512)):
        layout = p.layout(1 << 16, 1 << 16)
        assert layout.kinds.shape == (512, 512)


def test_per_head_layout_has_head_dim():
    p = P.heads(P.causal, P.sliding(64) & P.causal, P.strided(16))
    layout = p.layout(200, 200, 32, 32)
    assert layout.kinds.shape == (3, 7, 7) and layout.kv_partial_counts.shape == (3, 7)
    check_layout(p, 200, 200, 32, 32)


@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0)])
def test_empty_sequences(lq, lk):
    layout = P.causal.layout(lq, lk, 16, 16)
    assert layout.density == 0.0 and layout.kinds.numel() == 0


def test_layout_rejects_bad_sizes():
    with pytest.raises(P.PatternError, match="block_m"):
        P.causal.layout(10, 10, 0, 16)


@pytest.mark.parametrize("p", [
    P.sliding(40) | P.sink(20), P.global_(30) | P.local(50), P.global_(17),
    (P.causal & P.local(60)) | (P.sink(8) & ~P.strided(3)), P.sliding(64) & P.axial(9),
    P.local(30) & PREDICATES[1], P.heads(P.sliding(30) | P.sink(5), P.global_(9)),
    P.block(32) & (P.strided(5) | P.sink(3)),
], ids=str)
@pytest.mark.parametrize("lq,lk,bm,bn", [(400, 400, 16, 16), (333, 517, 32, 16),
                                         (517, 333, 16, 32)])
def test_candidate_route_is_exact(p, lq, lk, bm, bn):
    from sparse_compile.patterns.candidates import candidate_ranges

    assert all(candidate_ranges(p.for_head(h), lq, lk, bm, bn) is not None
               for h in range(p.num_heads))
    check_layout(p, lq, lk, bm, bn)


def test_layouts_are_cached():
    a = P.parse("causal & strided(8)").layout(300, 300, 32, 32)
    assert P.causal & P.strided(8) is not None
    assert (P.causal & P.strided(8)).layout(300, 300, 32, 32) is a


@pytest.mark.parametrize("p", [
    P.causal | P.prefix(37), P.local(9) | P.prefix(30), P.causal | P.sink(2) | P.local(9),
    P.heads(P.causal | P.prefix(20), P.block(8) | P.causal),
], ids=str)
@pytest.mark.parametrize("lq,lk,bm,bn", [(200, 200, 16, 16), (150, 233, 32, 16),
                                         (233, 150, 16, 32), (97, 97, 8, 128)])
def test_interval_union_route_is_exact(p, lq, lk, bm, bn):
    layout = p.layout(lq, lk, bm, bn)
    if lq <= lk:  # with lq > lk some rows sit before key 0 and are empty: another route
        assert type(layout._source).__name__ == "_IntervalSource" and not layout.is_interval
    check_layout(p, lq, lk, bm, bn)


@pytest.mark.parametrize("p", [P.causal, P.axial(40), P.strided(7) | P.sink(3), P.global_(9),
                               P.causal | P.prefix(100), PREDICATES[1]], ids=str)
def test_layouts_are_cpu_data_whatever_the_default_device(p):
    previous = torch.get_default_device()
    torch.set_default_device("meta")  # would fail on any layout tensor made on the default
    try:
        layout = p.layout(301, 299, 32, 16)  # sizes no other test uses: a fresh build
        tensors = (layout.kinds, layout.kv_partial_indices, layout.q_full_counts)
        density = layout.density
    finally:
        torch.set_default_device(previous)
    assert all(t.device.type == "cpu" for t in tensors)
    check_layout(p, 301, 299, 32, 16)
    assert density == layout.density
