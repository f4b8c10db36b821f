"""keep_expr, interval and traced predicates agree with the numeric evaluation."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pattern_defs import CONDITIONS, evaluate_tree, patterns, tree_text
from sparse_compile.patterns.numeric import evaluate_expr
from sparse_compile.patterns.symbolic import IsPowerOf, K, Q, Term


def positions(lq: int, lk: int):
    q = torch.arange(lq)[:, None] + (lk - lq)
    k = torch.arange(lk)[None, :]
    return q, k


@settings(max_examples=150, deadline=None)
@given(p=patterns(max_leaves=5), lq=st.integers(1, 90), lk=st.integers(1, 90),
       head=st.integers(0, 7))
def test_keep_expr_and_interval_match_evaluate(p, lq, lk, head):
    q, k = positions(lq, lk)
    h = torch.tensor(head)
    expected = p.evaluate(q, k, h if p.per_head else None)
    expr = p.keep_expr(head if p.per_head else None)
    allowed = {Q, K}
    assert expr.free_symbols <= allowed
    got = torch.as_tensor(evaluate_expr(expr, {Q: q, K: k})).expand(lq, lk)
    assert torch.equal(got, expected), str(p)
    iv = p.interval(head if p.per_head else None)
    if iv is not None:
        assert (iv[0].free_symbols | iv[1].free_symbols) <= {Q}
        lo = torch.as_tensor(evaluate_expr(iv[0], {Q: q}))
        hi = torch.as_tensor(evaluate_expr(iv[1], {Q: q}))
        assert torch.equal(((lo <= k) & (k <= hi)).expand(lq, lk), expected), str(p)


@settings(max_examples=150, deadline=None)
@given(tree=CONDITIONS, lq=st.integers(1, 60), lk=st.integers(1, 60),
       points=st.lists(st.tuples(st.integers(-60, 60), st.integers(0, 60)), max_size=6))
def test_random_predicates_match_numpy(tree, lq, lk, points):
    # The same random condition three ways: traced from Python, parsed from DSL text, and
    # evaluated by numpy on the positions (the oracle); the sympy expression checked by
    # substitution at a few points too.
    import numpy as np

    q, k = positions(lq, lk)
    expected = np.broadcast_to(
        evaluate_tree(tree, q.numpy(), k.numpy(), np.int64, np.minimum, np.maximum), (lq, lk))
    traced = P.predicate(lambda q, k: evaluate_tree(tree, q, k, Term, P.minimum, P.maximum))
    np.testing.assert_array_equal(traced.mask(lq, lk).numpy(), expected)
    parsed = P.parse(f"predicate({tree_text(tree)})")
    np.testing.assert_array_equal(parsed.mask(lq, lk).numpy(), expected)
    expr = traced.keep_expr()
    for qi, ki in points:
        want = evaluate_tree(tree, np.int64(qi), np.int64(ki), np.int64, np.minimum, np.maximum)
        assert bool(expr.subs({Q: qi, K: ki})) == bool(want), (qi, ki)


@pytest.mark.parametrize("p", [
    P.causal, P.window(3, 4), P.local(9), P.sliding(5), P.block(7), P.sink(3), P.prefix(6),
    P.dense, P.causal & P.sliding(4), P.block(8) & P.causal, ~P.causal, ~P.sink(3),
    P.sink(4) & P.local(20), P.prefix(3) & P.window(1, 1),
], ids=str)
def test_interval_primitives_have_intervals(p):
    assert p.interval() is not None


@pytest.mark.parametrize("p", [
    P.strided(4), P.fanout(2), P.axial(8), P.global_(4), P.causal | P.sink(4),
    P.predicate(lambda q, k: k <= q), ~P.local(3),
], ids=str)
def test_other_patterns_have_no_interval(p):
    assert p.interval() is None


def test_predicate_operators():
    fn = P.predicate(lambda q, k: ((q - k) // 3 * 2 % 5 != 1) & ~(-q + abs(k - 7) > 2)
                     | (P.maximum(q, k) == P.minimum(q + 1, k + 1)))
    q, k = positions(40, 40)
    qq, kk = q.numpy(), k.numpy()
    import numpy as np
    expected = ((((qq - kk) // 3 * 2) % 5 != 1) & ~(-qq + np.abs(kk - 7) > 2)) | (
        np.maximum(qq, kk) == np.minimum(qq + 1, kk + 1))
    assert (fn.mask(40, 40).numpy() == expected).all()
    assert P.parse(str(fn)) == fn


def test_predicate_with_heads_and_batch():
    p = P.predicate(lambda b, q, k, h: k <= q - h, heads=2)
    assert p.per_head and p.num_heads == 2
    m = p.mask(6, 6, heads=4)
    q, k = positions(6, 6)
    for h in range(4):
        assert torch.equal(m[h], k <= q - (h % 2))
    with pytest.raises(P.PatternError, match="batch"):
        P.predicate(lambda q, k, b: k < b)
    with pytest.raises(P.PatternError, match="named q, k, h, b"):
        P.predicate(lambda x, y: x < y)


def test_builtin_min_max_and_bool_fail_clearly():
    with pytest.raises(TypeError, match="minimum/maximum"):
        P.predicate(lambda q, k: min(q, k) > 3)
    with pytest.raises(TypeError, match="&, \\|, ~"):
        P.predicate(lambda q, k: (q > 1) and (k > 2))
    with pytest.raises(TypeError, match="//"):
        P.predicate(lambda q, k: q / 2 < k)


def test_constant_predicates():
    assert torch.equal(P.predicate(lambda q, k: True).mask(3, 4), torch.ones(3, 4, dtype=bool))
    assert not P.predicate(lambda q, k: False).mask(3, 4).any()


def test_is_power_of():
    assert [bool(IsPowerOf(sympy.Integer(d), 2)) for d in range(-1, 10)] == [
        False, False, True, True, False, True, False, False, False, True, False]
    assert bool(IsPowerOf(sympy.Integer(27), 3)) and not bool(IsPowerOf(sympy.Integer(6), 3))


def test_keep_expr_uses_printable_operations():
    printable = (sympy.Symbol, sympy.Integer, sympy.Add, sympy.Mul, sympy.floor, sympy.Mod,
                 sympy.Min, sympy.Max, sympy.core.relational.Relational, sympy.And, sympy.Or,
                 sympy.Not, IsPowerOf, sympy.logic.boolalg.BooleanAtom, sympy.Rational)
    p = (P.axial(16, 1) | P.fanout(3) | P.block(8) | P.strided(5)) & ~P.prefix(4) & P.global_(2)
    for node in sympy.preorder_traversal(p.keep_expr()):
        assert isinstance(node, printable), node


def test_per_head_keep_expr_needs_head():
    p = P.heads(P.causal, P.sink(2))
    with pytest.raises(P.PatternError, match="per-head"):
        p.keep_expr()
    assert p.keep_expr(3) == P.sink(2).keep_expr()
    assert p.interval(2) == P.causal.interval()
