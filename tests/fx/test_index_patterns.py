"""Comparisons of query and key indices as patterns (``sparse_compile.fx.index_patterns``):
each translation keeps exactly the entries its expression keeps, and is made of the primitives
the expression is made of where there is one."""

from __future__ import annotations

import pytest
import sympy
import torch

from sparse_compile.fx.index_patterns import index_pattern
from sparse_compile.fx.index_values import AXES

Q, K = AXES[1], AXES[0]
L = 12


@pytest.mark.parametrize(("expr", "text"), [
    (K <= Q, "causal"),
    (sympy.And(K <= Q, Q - K < 4), "sliding(4)"),
    (sympy.And(K <= Q + 2, Q - K <= 3), "window(3, 2)"),
    (sympy.Or(K <= Q, sympy.And(Q < 5, K < 5)), "causal | prefix(5)"),
    (sympy.Or(K <= Q, K < 3), "causal | sink(3)"),
    (K < 4, "sink(4)"),
    (K >= 3, "~sink(3)"),
    (sympy.Eq(Q, K), "sliding(1)"),
    (sympy.Ne(Q, K), "~sliding(1)"),
    (sympy.Not(K <= Q), "predicate(q - k <= -1)"),
    (Q > 5, "predicate(q > 5)"),
    (sympy.Eq(sympy.Mod(Q - K, 3), 0), "predicate"),
])
def test_translation_keeps_what_the_expression_keeps(expr, text):
    pattern = index_pattern(expr, Q, K)
    assert str(pattern).startswith(text)
    keep = torch.tensor([[bool(expr.subs({Q: i, K: j})) for j in range(L)] for i in range(L)])
    assert torch.equal(pattern.mask(L, L), keep)


def test_everything_nothing_and_other_symbols():
    assert index_pattern(sympy.true, Q, K) is None
    with pytest.raises(ValueError, match="keeps nothing"):
        index_pattern(sympy.And(K <= Q, Q - K < 0), Q, K)
    with pytest.raises(ValueError, match="not a comparison"):
        index_pattern(K <= Q + sympy.Symbol("n", integer=True), Q, K)
