"""Comparisons of query and key indices as patterns.

Masks are built by comparing indices: ``q - k`` against constants (causal, sliding windows,
bands), ``k`` against a constant (attention sinks, a prefix), and ``&`` / ``|`` / ``~`` of
such comparisons (a prefix-LM's ``causal | prefix(n)``). ``difference_pattern`` names the band
``lo <= q - k <= hi``; ``index_pattern`` turns a truth value of the two indices alone (sympy,
no tensors, no other symbols) into the pattern primitives it is made of, and into a
``predicate`` where it is none of them. Indices are taken as positions: the caller places the
queries and keys so.
"""

from __future__ import annotations

from typing import Any

import sympy
from sympy.core.function import AppliedUndef


def difference_pattern(lo: Any, hi: Any) -> Any:
    """The pattern keeping ``lo <= q - k <= hi`` (sympy bounds, ``±oo`` for none); None when
    it keeps everything. Raises ValueError when it keeps nothing."""
    from sparse_compile.patterns import causal, predicate, sliding, window

    if lo == -sympy.oo and hi == sympy.oo:
        return None
    if lo > hi:
        raise ValueError("mask keeps nothing")
    if lo == 0 and hi == sympy.oo:
        return causal
    if lo == 0:
        return sliding(int(hi) + 1)
    if lo <= 0 <= hi and hi != sympy.oo and lo != -sympy.oo:
        return window(int(hi), int(-lo))
    low = None if lo == -sympy.oo else int(lo)
    high = None if hi == sympy.oo else int(hi)

    def keep(q: Any, k: Any) -> Any:
        if low is None:
            return q - k <= high
        if high is None:
            return q - k >= low
        return (q - k >= low) & (q - k <= high)

    return predicate(keep)


def index_pattern(expr: sympy.Basic, q: sympy.Symbol, k: sympy.Symbol) -> Any:
    """The pattern keeping ``(q, k)`` where ``expr`` (a truth value of the symbols ``q`` and
    ``k`` only) holds; None when it keeps everything. Raises ValueError when it keeps
    nothing or uses anything but ``q`` and ``k``."""
    if expr.free_symbols - {q, k} or expr.atoms(AppliedUndef):
        raise ValueError(f"{expr} is not a comparison of query and key indices")
    if expr in (sympy.true, True):
        return None
    if expr in (sympy.false, False):
        raise ValueError("mask keeps nothing")
    return _translate(expr, q, k)


def _translate(expr: sympy.Basic, q: sympy.Symbol, k: sympy.Symbol) -> Any:
    from sparse_compile.patterns import dense, prefix, sink

    if isinstance(expr, sympy.And):
        n = _prefix_length(expr, q, k)
        if n is not None:
            return prefix(n)
        return _conjunction(expr.args, q, k)
    if isinstance(expr, sympy.Or):
        return _combine([_translate(a, q, k) for a in expr.args], "|")
    if isinstance(expr, sympy.Not):
        return ~_translate(expr.args[0], q, k)
    if isinstance(expr, sympy.Ne):
        return ~_translate(sympy.Eq(expr.lhs, expr.rhs), q, k)
    bounds = _bounds(expr, q, k)
    if bounds is not None:
        on, lo, hi = bounds
        if on == "q - k":
            return difference_pattern(lo, hi) or dense
        if on == "k" and lo <= hi and hi >= 0:
            # Keys are never negative: k <= hi is sink(hi + 1), k >= lo the complement of sink(lo).
            parts = [] if hi == sympy.oo else [sink(int(hi) + 1)]
            parts += [] if lo <= 0 else [~sink(int(lo))]
            return _combine(parts, "&") if parts else dense
    return _predicate(expr, q, k)


def _conjunction(args: tuple[sympy.Basic, ...], q: sympy.Symbol, k: sympy.Symbol) -> Any:
    """``&`` of ``args``, the bounds on ``q - k`` merged into one band (``causal`` and
    ``q - k < w`` are ``sliding(w)``)."""
    from sparse_compile.patterns import dense

    lo, hi, band, parts = -sympy.oo, sympy.oo, False, []
    for arg in args:
        bounds = _bounds(arg, q, k)
        if bounds is not None and bounds[0] == "q - k":
            lo, hi, band = max(lo, bounds[1]), min(hi, bounds[2]), True
        else:
            parts.append(_translate(arg, q, k))
    if band:
        parts.insert(0, difference_pattern(lo, hi) or dense)
    return _combine(parts, "&")


def _combine(parts: list[Any], op: str) -> Any:
    out = parts[0]
    for p in parts[1:]:
        out = out & p if op == "&" else out | p
    return out


def _bounds(expr: sympy.Basic, q: sympy.Symbol, k: sympy.Symbol
            ) -> tuple[str, Any, Any] | None:
    """``(what, lo, hi)`` meaning ``lo <= what <= hi``, for a comparison of ``q - k``, ``k``
    or ``q`` with an integer; None for any other truth value."""
    if not isinstance(expr, sympy.Le | sympy.Lt | sympy.Ge | sympy.Gt | sympy.Eq):
        return None
    diff = sympy.expand(expr.lhs - expr.rhs)
    cq, ck = diff.coeff(q), diff.coeff(k)
    constant = sympy.expand(diff - cq * q - ck * k)
    if not constant.is_Integer:
        return None
    if cq in (1, -1) and ck == -cq:
        on, sign = "q - k", cq        # diff = sign * (q - k) + constant
    elif cq == 0 and ck in (1, -1):
        on, sign = "k", ck
    elif ck == 0 and cq in (1, -1):
        on, sign = "q", cq
    else:
        return None
    # sign * x + constant REL 0  <=>  x REL' -constant / sign
    bound = -constant * sign
    rel = type(expr)
    if sign < 0:
        rel = {sympy.Le: sympy.Ge, sympy.Lt: sympy.Gt, sympy.Ge: sympy.Le,
               sympy.Gt: sympy.Lt}.get(rel, rel)
    lo, hi = -sympy.oo, sympy.oo
    if rel in (sympy.Le, sympy.Eq):
        hi = bound
    if rel is sympy.Lt:
        hi = bound - 1
    if rel in (sympy.Ge, sympy.Eq):
        lo = bound
    if rel is sympy.Gt:
        lo = bound + 1
    return on, lo, hi


def _prefix_length(expr: sympy.And, q: sympy.Symbol, k: sympy.Symbol) -> int | None:
    """``n`` when ``expr`` is ``q < n & k < n`` (``prefix(n)``), else None."""
    bounds = [_bounds(a, q, k) for a in expr.args]
    if len(bounds) != 2 or None in bounds:
        return None
    ends = {on: hi for on, lo, hi in bounds if lo <= 0 and hi != sympy.oo}
    if set(ends) == {"q", "k"} and ends["q"] == ends["k"] and ends["q"] >= 0:
        return int(ends["q"]) + 1
    return None


def _predicate(expr: sympy.Basic, q: sympy.Symbol, k: sympy.Symbol) -> Any:
    from sparse_compile.patterns.predicate import Predicate
    from sparse_compile.patterns.symbolic import K, Q

    return Predicate(expr.xreplace({q: Q, k: K}))
