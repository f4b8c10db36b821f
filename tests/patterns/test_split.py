"""The split route (q - k background plus exception ranges, ``split.py``) is exact.

Checked three ways against the dense mask: the decomposition itself (outside its exception
ranges a pattern equals its background on every entry), the kinds the route builds for random
patterns whatever route ``layout`` would pick, and whole layouts (kinds, tables, densities) of
axial and of compositions that take this route.
"""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layout_checks import check_layout, kinds_from_mask
from pattern_defs import PREDICATES, patterns
from sparse_compile.patterns.blocks import is_toeplitz
from sparse_compile.patterns.split import split_kinds, split_pattern

blocks = st.sampled_from([16, 32, 64, 128])


def covered(ranges, nq: int, nk: int) -> torch.Tensor:
    """Bool ``[nq, nk]``: tiles inside some range of ``ranges``."""
    j = torch.arange(nk)
    inside = (j >= ranges.starts[:, :, None]) & (j < ranges.ends[:, :, None])  # [nq, m, nk]
    return inside.any(1)


def entries(tiles: torch.Tensor, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Bool ``[lq, lk]``: the entries of the marked tiles."""
    return tiles.repeat_interleave(bm, 0)[:lq].repeat_interleave(bn, 1)[:, :lk]


def check_split(p, lq: int, lk: int, bm: int, bn: int) -> None:
    """The split of every head of ``p`` is a true decomposition and gives the exact kinds."""
    for h in range(p.num_heads):
        ph = p.for_head(h)
        s = split_pattern(ph, lq, lk, bm, bn)
        if s is None:
            # Only custom predicates that are neither of q - k nor row intervals admit none.
            assert any(isinstance(n, type(PREDICATES[0])) and not n.toeplitz
                       and n.interval() is None for n in ph.walk())
            continue
        assert is_toeplitz(s.background)
        mask = ph.mask(lq, lk)
        nq, nk = -(-lq // bm), -(-lk // bn)
        # The decomposition: on each layer's tiles the pattern equals the layer's q - k
        # pattern, on every other tile outside the exceptions it equals the background.
        special = covered(s.exceptions, nq, nk)
        for layer in s.layers:
            assert is_toeplitz(layer.pattern)
            tiles = covered(layer.ranges, nq, nk)
            inside = entries(tiles, lq, lk, bm, bn)
            assert torch.equal(mask[inside], layer.pattern.mask(lq, lk)[inside])
            special |= tiles
        rest = entries(~special, lq, lk, bm, bn)
        assert torch.equal(mask[rest], s.background.mask(lq, lk)[rest])
        # The kinds built from it.
        assert torch.equal(split_kinds(ph, s, lq, lk, bm, bn), kinds_from_mask(mask, bm, bn))


@settings(max_examples=80, deadline=None)
@given(p=patterns(max_leaves=4), lq=st.integers(1, 300), lk=st.integers(1, 300), bm=blocks,
       bn=blocks)
def test_split_is_exact_for_random_patterns(p, lq, lk, bm, bn):
    check_split(p, lq, lk, bm, bn)


# Primitives wide enough for whole FULL tiles inside axial bands, blocks and global rows, mixed
# with q - k patterns (the ranges the split route fills without classifying).
_WIDE = st.one_of(
    st.builds(P.axial, st.integers(16, 300), st.integers(0, 150)),
    st.builds(P.block, st.integers(16, 300)), st.builds(P.global_, st.integers(1, 200)),
    st.builds(P.sink, st.integers(1, 200)), st.builds(P.prefix, st.integers(1, 300)),
    st.builds(P.strided, st.integers(1, 40)), st.builds(P.fanout, st.integers(2, 4)),
    st.sampled_from([P.causal, P.sliding(50), P.local(90)]),
)
_WIDE_PATTERNS = st.recursive(_WIDE, lambda c: st.one_of(
    st.tuples(c, c).map(lambda ab: ab[0] & ab[1]), st.tuples(c, c).map(lambda ab: ab[0] | ab[1]),
    c.map(lambda a: ~a)), max_leaves=3)


@settings(max_examples=60, deadline=None)
@given(p=_WIDE_PATTERNS, lq=st.integers(1, 400), lk=st.integers(1, 400),
       bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]))
def test_split_is_exact_with_wide_primitives(p, lq, lk, bm, bn):
    check_split(p, lq, lk, bm, bn)


SPLIT_PATTERNS = [
    P.axial(1), P.axial(7), P.axial(16), P.axial(50, 3), P.axial(128), P.axial(33, 130),
    P.axial(1000, 37), P.causal & P.axial(24), P.axial(40) | P.sink(9), ~P.axial(12, 5),
    P.axial(20) & ~P.strided(3), P.global_(9) | P.strided(11), ~P.block(48) & P.fanout(2),
    P.block(40) | P.fanout(3), ~P.global_(30) & P.causal, P.prefix(70) | ~P.strided(5),
    P.sliding(30) | P.axial(17, 2), P.axial(200, 7), P.block(96) | P.strided(5),
    P.global_(40) | P.fanout(2), ~(P.block(64) | P.strided(3)) & P.causal,
    ~P.axial(70, 20) | P.fanout(2), ~P.sink(100) & P.strided(9), P.causal & P.axial(150),
    P.heads(P.axial(9), P.causal & P.axial(13, 4),
                                            P.global_(5) | P.strided(7)),
]


@pytest.mark.parametrize("p", SPLIT_PATTERNS, ids=str)
@pytest.mark.parametrize("lq,lk,bm,bn", [
    (257, 257, 16, 16), (300, 417, 32, 16), (417, 300, 16, 32), (333, 333, 64, 128),
    (515, 299, 128, 64), (129, 641, 128, 128),
])
def test_split_route_layouts_are_exact(p, lq, lk, bm, bn):
    layout = p.layout(lq, lk, bm, bn)
    # With lq > lk causal's candidate ranges can be tight enough for the candidate route.
    assert layout._source.route == "split" or (lq > lk and layout._source.route == "candidates")
    check_layout(p, lq, lk, bm, bn)


@pytest.mark.parametrize("p", [P.axial(1024), P.causal & P.axial(1024), P.axial(1000, 37),
                               P.global_(64) | P.strided(4096), P.block(512) | P.fanout(2)],
                         ids=str)
def test_built_ins_take_the_split_route_at_length(p):
    # 2**15 tokens in 128 x 128 tiles: 256 x 256 tiles, no per-tile analysis of the grid.
    layout = p.layout(1 << 15, 1 << 15)
    assert layout._source.route == "split" and layout.kinds.shape == (256, 256)
    # Spot-check q-blocks against the dense rows of those blocks.
    for i in (0, 8, 255):
        q = torch.arange(i * 128, (i + 1) * 128)[:, None]
        rows = p.evaluate(q, torch.arange(1 << 15)[None, :]).reshape(128, 256, 128)
        some, every = rows.any(2).any(0), rows.all(2).all(0)
        want = torch.where(every, 2, torch.where(some, 1, 0)).to(torch.uint8)
        assert torch.equal(layout.kinds[i], want), i


def test_opaque_predicates_keep_the_tiles_route():
    p = PREDICATES[1] | P.axial(8)
    assert p.layout(200, 200, 32, 32)._source.route == "tiles"
    check_layout(p, 200, 200, 32, 32)
