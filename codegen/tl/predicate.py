"""Triton source for one pattern's predicate and interval bounds.

``predicate_source(pattern)`` returns the text of two ``@triton.jit`` functions that every kernel
of the generated module calls on PARTIAL blocks only:

- ``_keep(q_pos, k_pos, hp)``: bool tensor, broadcast of ``q_pos`` ([BM, 1] or [1, BM], absolute
  query positions) and ``k_pos`` (key indices); ``hp`` is the pattern head (query head % n).
- ``_bounds(q_pos, hp)``: (lo, hi) int32 tensors shaped like ``q_pos`` with
  ``keep(q, k) <=> lo <= k <= hi``. Emitted only for interval patterns (``INTERVAL`` is then
  True in the module); otherwise it returns an empty range and is never called.
- ``_hull(q_pos, hp)``: (lo, hi) of an interval that holds every key the row keeps (the
  bounds themselves for interval patterns): what the general route visits when the block
  tables cannot be used (positions known only on the device, documents).
- ``_pieces(q_pos, hp)``: (lo1, hi1, lo2, hi2), two intervals whose union is exactly the row's
  kept keys, for patterns that are a union of at most two interval patterns
  (``causal & (sink(4) | sliding(w))``); what the decoding kernels visit.

Bounds are key positions; the kernels turn them into key indices (``visit.py``).
"""

from __future__ import annotations

from typing import Any

import sympy
from sparse_compile.codegen.tl.printer import TritonPrinter


def _per_head_select(texts: list[str]) -> str:
    """Nested tl.where choosing texts[hp] (hp a scalar)."""
    out = texts[-1]
    for i in range(len(texts) - 2, -1, -1):
        out = f"tl.where(hp == {i}, {texts[i]}, {out})"
    return out


def _keep_text(printer: TritonPrinter, expr: sympy.Basic) -> str:
    text = printer(expr)
    # Constant predicates still have to be tensors of the broadcast shape.
    if text == "True":
        return "((q_pos * 0 + k_pos * 0) == 0)"
    if text == "False":
        return "((q_pos * 0 + k_pos * 0) != 0)"
    return text


def _bound_text(printer: TritonPrinter, expr: sympy.Basic) -> str:
    return f"(({printer(expr)}) + q_pos * 0)"


def pattern_heads(pattern: Any) -> int:
    """Number of distinct pattern heads (n for heads(p0..p_{n-1}), else 1)."""
    return int(pattern.num_heads) if getattr(pattern, "per_head", False) else 1


def interval_bounds(pattern: Any) -> list[tuple[sympy.Expr, sympy.Expr]] | None:
    """Per pattern head (lo, hi), or None when some head is not one interval per row."""
    n = pattern_heads(pattern)
    heads = [None] if n == 1 and not getattr(pattern, "per_head", False) else list(range(n))
    bounds = []
    for h in heads:
        iv = pattern.interval(h) if h is not None else pattern.interval()
        if iv is None:
            return None
        bounds.append(iv)
    return bounds


def _hull(pattern: Any, head: int | None) -> tuple[sympy.Expr, sympy.Expr]:
    """An interval ``(lo, hi)`` of key positions holding every key a row keeps: the exact
    interval where there is one, the intersection (``&``) or the span (``|``) of the parts'
    hulls, else all keys. Non-decreasing in ``Q`` like the intervals it is made of."""
    iv = pattern.interval(head) if head is not None or not pattern.per_head else None
    if iv is not None:
        return iv
    kind = type(pattern).__name__
    if kind in ("And", "Or"):
        (a_lo, a_hi), (b_lo, b_hi) = (_hull(part, head) for part in pattern.children())
        if kind == "And":
            return sympy.Max(a_lo, b_lo), sympy.Min(a_hi, b_hi)
        return sympy.Min(a_lo, b_lo), sympy.Max(a_hi, b_hi)
    if kind == "Heads":
        return _hull(pattern.for_head(head or 0), head)
    return sympy.Integer(0), sympy.oo


def _pieces(pattern: Any, head: int | None) -> list[tuple[sympy.Expr, sympy.Expr]] | None:
    """Intervals whose union is exactly the pattern's row (at most two), or None: an interval
    pattern is one piece, ``a | b`` the pieces of both, ``a & b`` the pairwise intersections
    (intersections distribute over unions)."""
    iv = pattern.interval(head) if head is not None or not pattern.per_head else None
    if iv is not None:
        return [iv]
    kind = type(pattern).__name__
    if kind == "Heads":
        return _pieces(pattern.for_head(head or 0), head)
    if kind not in ("And", "Or"):
        return None
    parts = [_pieces(part, head) for part in pattern.children()]
    if any(p is None for p in parts):
        return None
    if kind == "Or":
        pieces = parts[0] + parts[1]
    else:
        pieces = [(sympy.Max(a_lo, b_lo), sympy.Min(a_hi, b_hi))
                  for a_lo, a_hi in parts[0] for b_lo, b_hi in parts[1]]
    return pieces if len(pieces) <= 2 else None


def interval_pieces(pattern: Any) -> list[list[tuple[sympy.Expr, sympy.Expr]]] | None:
    """Per pattern head, at most two intervals whose union is the row (``_pieces``), or None
    when some head is not such a union."""
    if getattr(pattern, "per_head", False):
        heads = [_pieces(pattern.for_head(h), h) for h in range(pattern_heads(pattern))]
    else:
        heads = [_pieces(pattern, None)]
    return None if any(p is None for p in heads) else heads


def hull_bounds(pattern: Any) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """Per pattern head, the hull ``(lo, hi)`` of the kept keys (see ``_hull``)."""
    if getattr(pattern, "per_head", False):
        return [_hull(pattern.for_head(h), h) for h in range(pattern_heads(pattern))]
    return [_hull(pattern, None)]


def predicate_source(pattern: Any) -> tuple[str, bool]:
    """(source of ``_keep`` and ``_bounds``, whether the pattern is an interval pattern)."""
    printer = TritonPrinter()
    n = pattern_heads(pattern)
    if getattr(pattern, "per_head", False):
        keeps = [_keep_text(printer, pattern.keep_expr(h)) for h in range(n)]
    else:
        keeps = [_keep_text(printer, pattern.keep_expr())]
    bounds = interval_bounds(pattern)
    if bounds is not None:
        los = _per_head_select([_bound_text(printer, lo) for lo, _ in bounds])
        his = _per_head_select([_bound_text(printer, hi) for _, hi in bounds])
    else:
        los, his = "(q_pos * 0)", "(q_pos * 0 - 1)"
    hulls = hull_bounds(pattern)
    hull_los = _per_head_select([_bound_text(printer, lo) for lo, _ in hulls])
    hull_his = _per_head_select([_bound_text(printer, hi) for _, hi in hulls])
    empty = (sympy.Integer(1), sympy.Integer(0))
    pieces = interval_pieces(pattern) or [[h] for h in hulls]
    pieces = [p + [empty] * (2 - len(p)) for p in pieces]
    piece_texts = [_per_head_select([_bound_text(printer, p[i][j]) for p in pieces])
                   for i in range(2) for j in range(2)]
    src = f'''
@triton.jit
def _keep(q_pos, k_pos, hp):
    return {_per_head_select(keeps)}


@triton.jit
def _bounds(q_pos, hp):
    lo = {los}
    hi = {his}
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _hull(q_pos, hp):
    lo = {hull_los}
    hi = {hull_his}
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _pieces(q_pos, hp):
    lo1 = {piece_texts[0]}
    hi1 = {piece_texts[1]}
    lo2 = {piece_texts[2]}
    hi2 = {piece_texts[3]}
    return lo1.to(tl.int32), hi1.to(tl.int32), lo2.to(tl.int32), hi2.to(tl.int32)
'''
    return src, bounds is not None
