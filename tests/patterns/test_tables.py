"""Compact block tables (offsets + flat indices) equal the tables listed from the dense mask,
for every route (diagonal, split, candidates, interval, stored kinds), forward and transposed,
and their size follows the visited blocks, not the longest row."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layout_checks import check_compact, expected_compact, kinds_from_mask
from pattern_defs import PREDICATES, patterns
from sparse_compile.patterns.candidates import candidate_overrides, candidate_ranges
from sparse_compile.patterns.overlay import overlay_tables
from sparse_compile.patterns.tables import Csr, stack_heads, transpose

blocks = st.sampled_from([16, 32, 64, 128])


@settings(max_examples=100, deadline=None)
@given(p=patterns(), lq=st.integers(1, 400), lk=st.integers(1, 400), bm=blocks, bn=blocks)
def test_compact_tables_equal_the_mask_tables(p, lq, lk, bm, bn):
    layout = p.layout(lq, lk, bm, bn)
    check_compact(layout, kinds_from_mask(p.mask(lq, lk), bm, bn))


# Kernel-like rectangular tiles at lengths that are not multiples of them.
@pytest.mark.parametrize("p", [
    P.strided(37), P.causal & P.strided(50), P.fanout(2), P.axial(45, 7), P.global_(20),
    P.sliding(90) | P.sink(11), P.causal & P.axial(60), ~P.global_(30) & P.local(100),
    P.heads(P.axial(9), P.strided(5) | P.sink(3), P.causal), PREDICATES[1] | P.axial(8),
    P.local(40) & PREDICATES[1], P.causal | P.prefix(70),
], ids=str)
@pytest.mark.parametrize("lq,lk,bm,bn", [(517, 517, 64, 64), (333, 777, 32, 64),
                                         (777, 333, 32, 64), (450, 450, 16, 128)])
def test_kernel_tile_shapes(p, lq, lk, bm, bn):
    check_compact(p.layout(lq, lk, bm, bn), kinds_from_mask(p.mask(lq, lk), bm, bn))


@pytest.mark.parametrize("p", [
    P.sliding(40) | P.sink(20), P.global_(17), P.local(30) & PREDICATES[1],
    P.block(32) & (P.strided(5) | P.sink(3)), P.global_(9) & PREDICATES[0],
], ids=str)
@pytest.mark.parametrize("lq,lk,bm,bn", [(400, 400, 16, 16), (333, 517, 32, 16),
                                         (517, 333, 16, 32)])
def test_candidate_tables_equal_the_mask_tables(p, lq, lk, bm, bn):
    # The candidates route itself (layout may prefer the split route for these patterns).
    kinds = kinds_from_mask(p.mask(lq, lk), bm, bn)[None]
    ranges = candidate_ranges(p, lq, lk, bm, bn)
    assert ranges is not None
    o = candidate_overrides(p, lq, lk, bm, bn, ranges)
    for side, grid in (("kv", kinds), ("q", kinds.transpose(1, 2))):
        for rows, kind in zip(overlay_tables(o, lq, lk, bm, bn, side), (1, 2), strict=True):
            table = stack_heads([rows])
            offsets, indices = expected_compact(grid, kind)
            assert torch.equal(table.offsets.long(), offsets)
            assert torch.equal(table.indices.long(), indices)


def test_transpose_of_random_tables():
    g = torch.Generator().manual_seed(0)
    kinds = (torch.rand((3, 23, 41), generator=g) < 0.3).to(torch.uint8)
    offsets, indices = expected_compact(kinds, 1)
    table = transpose(Csr(offsets.int(), indices.int()), 41)
    want_off, want_idx = expected_compact(kinds.transpose(1, 2), 1)
    assert torch.equal(table.offsets.long(), want_off)
    assert torch.equal(table.indices.long(), want_idx)


@pytest.mark.parametrize("bm,bn", [(128, 128), (64, 64), (32, 64)])
def test_global_tables_follow_the_visited_blocks(bm, bn):
    # One full block row and one full block column: 2n - 1 visited tiles of n x n. Padded
    # tables would be n x n wide; the compact ones hold exactly the visited tiles.
    length = 1 << 16
    layout = P.global_(64).layout(length, length, bm, bn)
    nq, nk = length // bm, length // bn
    rows_of_global = -(-64 // bm)  # q-blocks holding global queries list every k-block
    cols_of_global = -(-64 // bn)
    visited = rows_of_global * nk + (nq - rows_of_global) * cols_of_global
    assert layout.block_density == pytest.approx(visited / (nq * nk))
    for a, b, rows in ((layout.kv_partial, layout.kv_full, nq),
                       (layout.q_partial, layout.q_full, nk)):
        assert a.entries + b.entries == visited
        assert a.offsets.shape == b.offsets.shape == (1, rows + 1)
        assert int(a.offsets[0, -1]) == a.entries and int(b.offsets[0, -1]) == b.entries
    # Spot-check the full row and a plain row against the pattern itself.
    first_row = layout.kv_full if bm <= 64 else layout.kv_partial
    listed = first_row.indices[first_row.offsets[0, 0]:first_row.offsets[0, 1]].tolist()
    assert listed == list(range(nk))  # q-block 0 visits every k-block
    assert int(layout.kv_full.counts[0, rows_of_global]) == (1 if bn <= 64 else 0)
