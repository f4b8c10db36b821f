"""Every primitive against its independent numpy definition (conftest.NUMPY)."""

from __future__ import annotations

import numpy as np
import pytest
import sparse_compile.patterns as P
from pattern_defs import BUILDERS, NUMPY, grid

CASES = [
    ("dense", ()), ("causal", ()), ("window", (3, 5)), ("window", (0, 0)), ("local", (7,)),
    ("local", (1,)), ("sliding", (4,)), ("block", (5,)), ("axial", (4,)), ("axial", (3, 2)),
    ("axial", (1, 0)), ("strided", (3,)), ("fanout", (2,)), ("fanout", (3,)), ("sink", (4,)),
    ("global", (3,)), ("prefix", (6,)),
]
SHAPES = [(1, 1), (17, 17), (9, 23), (23, 9), (40, 33)]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
@pytest.mark.parametrize("lq,lk", SHAPES)
def test_mask_matches_numpy(name, params, lq, lk):
    pattern = BUILDERS[name](*params)
    q, k = grid(lq, lk)
    expected = NUMPY[name](q, k, *params)
    np.testing.assert_array_equal(pattern.mask(lq, lk).numpy(), expected)


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
def test_builder_equals_text(name, params):
    text = name if not params else f"{name}({', '.join(map(str, params))})"
    assert BUILDERS[name](*params) == P.parse(text)


def test_global_builder_name():
    assert P.global_(4) == P.parse("global(4)")
    assert str(P.global_(4)) == "global(4)"


def test_dynamic_primitives_carry_parameters():
    d, t = P.parse("dma(keep=512)"), P.parse("topk(8, block=64)")
    assert (d.keep, t.k, t.block) == (512, 8, 64)
    assert d.is_dynamic and (t & P.causal).is_dynamic and not P.causal.is_dynamic
    for p in (d, t & P.causal):
        with pytest.raises(P.PatternError, match="dynamic"):
            p.layout(64, 64)
        with pytest.raises(P.PatternError, match="dynamic"):
            p.mask(8, 8)
        with pytest.raises(P.PatternError, match="dynamic"):
            p.keep_expr()


def test_heads_cycle_over_query_heads():
    p = P.heads(P.causal, P.sliding(2), P.sink(1))
    assert p.per_head and p.num_heads == 3
    m = p.mask(6, 6, heads=7).numpy()
    q, k = grid(6, 6)
    defs = [NUMPY["causal"](q, k), NUMPY["sliding"](q, k, 2), NUMPY["sink"](q, k, 1)]
    for h in range(7):
        np.testing.assert_array_equal(m[h], defs[h % 3])
    assert (p & P.heads(P.dense, P.causal)).num_heads == 6


def test_heads_mapping():
    p = P.heads({range(0, 2): P.causal, 2: "sliding(4)"})
    assert p == P.heads(P.causal, P.causal, P.sliding(4))
    with pytest.raises(P.PatternError, match="cover"):
        P.heads({0: P.causal, 2: P.causal})


def test_patterns_are_immutable_and_hashable():
    p = P.causal & P.sliding(8)
    assert hash(p) == hash(P.parse("causal & sliding(8)"))
    assert len({p, P.parse("causal&sliding(w=8)"), P.causal}) == 2
    with pytest.raises(AttributeError):
        p.left = P.dense
