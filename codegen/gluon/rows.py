"""Per-row kept key intervals of a pattern, as the Gluon kernels read them.

The Gluon kernels are pattern-agnostic: instead of inlining the pattern's closed-form bounds
(what the ``tl`` kernels generate per pattern), they read each query row's kept keys as one or
two intervals ``[lo, hi]`` from int32 arrays ``[pieces, pattern heads, Lq]``, O(Lq) data built
once per (pattern, Lq, Lk, device) from the same interval analysis (``patterns/intervals.py``,
``codegen/tl/predicate.py``'s pieces). From them a program derives the blocks it visits and
which of those are FULL (``visit.py``). Served: patterns whose rows are one interval, and
unions of two (``causal & (sink(4) | sliding(w))``) whose pieces have non-decreasing bounds
(the dK/dV pass binary-searches them). Others (block tables, residue and strided-union
routes) stay with the ``tl`` kernels.

Packed documents keep the same kernels: where the pattern's bounds are closed forms of the
query position alone, a row's intervals inside its document are the pattern's at the row's
position in the document, shifted by the document's first key and cut at its last
(``document_rows``), built on the device per call from the document bounds. Positions other
than the default alignment (a static cache's fill level, a prompt placed at ``q_start``) keep
them too, where one pair of starts holds for every batch row: the closed forms evaluated at
the rows' positions, on the device, without reading the starts on the host
(``shifted_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
from sparse_compile.codegen.launch.tables import row_bounds as union_row_bounds
from sparse_compile.codegen.tl.predicate import interval_bounds, interval_pieces
from sparse_compile.patterns.intervals import row_bounds as interval_row_bounds
from sparse_compile.patterns.numeric import evaluate_expr
from sparse_compile.patterns.symbolic import Q


@dataclass(frozen=True)
class RowPieces:
    """Kept keys per row: ``lo``, ``hi`` int32 ``[pieces, pattern heads, Lq]`` (contiguous),
    clamped to ``[0, Lk - 1]``; an empty piece of a row has ``lo > hi``. The same pieces seen
    from the keys: ``key_lo``, ``key_hi`` int32 ``[pieces, pattern heads, Lk]``, the query rows
    whose piece keeps each key (one interval, since both bounds are non-decreasing: the
    dK/dV pass masks its PARTIAL blocks with them, two values per key instead of two per
    query column of the transposed tile)."""

    lo: torch.Tensor
    hi: torch.Tensor
    key_lo: torch.Tensor
    key_hi: torch.Tensor

    @property
    def pieces(self) -> int:
        return self.lo.shape[0]

    @property
    def pattern_heads(self) -> int:
        return self.lo.shape[1]


_ROWS: dict[tuple, RowPieces | None] = {}
_EMPTY = (sympy.Integer(1), sympy.Integer(0))


def interval_rows(pattern: Any, lq: int, lk: int, device: torch.device) -> RowPieces | None:
    """The rows of ``pattern`` at these lengths for the default alignment (query ``i`` at key
    position ``i + Lk - Lq``) as one or two intervals each, or None when they are not (see the
    module docstring). Cached."""
    key = (str(pattern), lq, lk, str(device))
    if key not in _ROWS:
        _ROWS[key] = _build(pattern, lq, lk, device) if lq > 0 and lk > 0 else None
    return _ROWS[key]


def _build(pattern: Any, lq: int, lk: int, device: torch.device) -> RowPieces | None:
    # Built on the CPU whatever the default device (a user's torch.set_default_device("cuda")
    # included), then moved to ``device`` once.
    q = torch.arange(lk - lq, lk, dtype=torch.int64, device="cpu")
    bounds = interval_bounds(pattern)
    with torch.device("cpu"):
        if bounds is not None:
            pieces = [[interval_row_bounds(iv, q, lk)] for iv in bounds]
        else:
            union = union_row_bounds(pattern, lq, lk, torch.device("cpu"))
            if union is not None:
                pieces = [[(union.lo[h].long(), union.hi[h].long())]
                          for h in range(union.lo.shape[0])]
            else:
                per_head = interval_pieces(pattern)
                if per_head is None:
                    return None
                pieces = [[interval_row_bounds(iv, q, lk) for iv in head + [_EMPTY] * (
                    2 - len(head))] for head in per_head]
                if not all(_monotone(lo, hi) for head in pieces for lo, hi in head):
                    return None
    n = max(len(head) for head in pieces)
    lo = torch.stack([torch.stack([head[p][0] for head in pieces]) for p in range(n)])
    hi = torch.stack([torch.stack([head[p][1] for head in pieces]) for p in range(n)])
    # An empty row's lower bound can be a large closed form (``prefix(n)``'s grows n keys a
    # row): capped at Lk it stays empty, non-decreasing and within int32.
    lo = lo.clamp(max=lk)
    key_lo, key_hi = _key_intervals(lo, hi, lk)
    return RowPieces(*(t.to(device=device, dtype=torch.int32).contiguous()
                       for t in (lo, hi, key_lo, key_hi)))


def document_rows(pattern: Any, start: torch.Tensor, end: torch.Tensor) -> RowPieces | None:
    """The rows of ``pattern`` inside packed documents, or None where the pattern's bounds
    depend on more than the query position (tables, lengths). ``start``, ``end``: each token's
    document as key indices ``[L]`` (``codegen/tl/documents.py``; padding tokens have the
    empty ``[i, i - 1]``), one batch row: positions count from each document's first token
    (the semantics of ``documents``), so row ``q`` of a document starting at ``s`` keeps the
    pattern's interval of row ``q - s``, shifted by ``s`` and cut at the document's end.
    Empty rows are then written in one form, ``hi >= s - 1`` and ``lo = hi + 1`` (a shifted
    empty row could otherwise keep a lower bound past the next document's first rows': a
    ``prefix(n)`` row's grows n keys a row). Kept rows lie inside their document and a later
    document starts after an earlier one ends, so both bounds are non-decreasing over the
    whole row, and the keys' intervals follow by binary search as for the plain rows."""
    if not position_only(pattern):
        return None
    length = start.shape[-1]
    base = interval_rows(pattern, length, length, start.device)
    if base is None:
        return None
    start, end = start.long(), end.long()
    within = (torch.arange(length, device=start.device) - start).clamp_(0, length - 1)
    within = within.expand(*base.lo.shape[:-1], length)
    lo = start + base.lo.long().gather(-1, within)
    hi = torch.minimum(start + base.hi.long().gather(-1, within), end)
    hi = torch.maximum(hi, start - 1)  # keys before the document: none kept either way
    lo = torch.minimum(lo, hi + 1)  # changes empty rows only (lo > hi + 1 before)
    key_lo, key_hi = _key_intervals(lo, hi, length)
    return RowPieces(*(t.to(torch.int32).contiguous() for t in (lo, hi, key_lo, key_hi)))


# Far beyond any key position: closed forms that are unbounded (``dense``'s ∞) are cut here
# before they are shifted to key indices.
_FAR = 1 << 40


def shifted_rows(pattern: Any, lq: int, lk: int, starts: torch.Tensor) -> RowPieces | None:
    """The rows of ``pattern`` with query row ``i`` at position ``q_start + i`` and key ``j``
    at ``k_start + j`` (``starts``: an integer tensor ``[1, 2]`` holding ``(q_start,
    k_start)``, on the kernels' device; keys at negative positions are never kept), or None
    where the pattern's bounds depend on more than the query position or its rows are not
    one or two intervals (``interval_rows``' conditions). Built on ``starts``' device with no
    host read of the starts (CUDA graphs replay it). Each bound is the closed form at the
    row's position, minus ``k_start``, clamped to the keys: the closed forms are
    non-decreasing in the position (what ``interval_rows`` checks), and so stay the clamped
    and shifted bounds, which the dK/dV pass's key intervals need."""
    if not position_only(pattern) or lq <= 0 or lk <= 0:
        return None
    if interval_rows(pattern, lq, lk, torch.device("cpu")) is None:
        return None
    device = starts.device
    q_pos = starts[0, 0].long() + torch.arange(lq, dtype=torch.int64, device=device)
    k_start = starts[0, 1].long()
    bounds = interval_bounds(pattern)
    heads = ([[iv] for iv in bounds] if bounds is not None
             else [head + [_EMPTY] * (2 - len(head)) for head in interval_pieces(pattern)])
    n = max(len(head) for head in heads)
    los, his = [], []
    for p in range(n):
        piece_lo, piece_hi = [], []
        for head in heads:
            lo, hi = (_bound_at(e, q_pos) for e in head[p])
            # keys at negative positions are never kept; then key indices, cut to the keys
            piece_lo.append((lo.clamp(min=0) - k_start).clamp(min=0, max=lk))
            piece_hi.append((hi.clamp(max=_FAR) - k_start).clamp(min=-1, max=lk - 1))
        los.append(torch.stack(piece_lo))
        his.append(torch.stack(piece_hi))
    lo, hi = torch.stack(los), torch.stack(his)
    key_lo, key_hi = _key_intervals(lo, hi, lk)
    return RowPieces(*(t.to(torch.int32).contiguous() for t in (lo, hi, key_lo, key_hi)))


def _bound_at(expr: Any, q_pos: torch.Tensor) -> torch.Tensor:
    """A closed-form bound at the positions ``q_pos`` (int64, on their device). The
    expression's constants stay Python scalars (``evaluate_expr``) and a constant bound is
    filled on the positions' device, whatever the default device: no tensor is copied to the
    device, which a CUDA graph capture would refuse."""
    value = evaluate_expr(expr, {Q: q_pos})
    if isinstance(value, torch.Tensor):
        return value.long().expand(q_pos.shape)
    return torch.full_like(q_pos, min(int(value), _FAR))


_POSITION_ONLY: dict[str, bool] = {}


def position_only(pattern: Any) -> bool:
    """Whether every interval bound of ``pattern`` is a closed form of the query position
    ``Q`` alone (cached: the symbolic analysis takes about a millisecond, every call asks)."""
    key = str(pattern)
    if key not in _POSITION_ONLY:
        _POSITION_ONLY[key] = _bounds_of_position_only(pattern)
    return _POSITION_ONLY[key]


def _bounds_of_position_only(pattern: Any) -> bool:
    bounds = interval_bounds(pattern)
    if bounds is None:
        per_head = interval_pieces(pattern)
        if per_head is None:
            return False
        bounds = [iv for head in per_head for iv in head]
    return all(isinstance(e, sympy.Expr) and {str(s) for s in e.free_symbols} <= {"Q"}
               for iv in bounds for e in iv)


def _key_intervals(lo: torch.Tensor, hi: torch.Tensor, lk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each piece, head and key ``k``: the query rows ``[first, last]`` whose piece keeps
    ``k``. With ``lo`` and ``hi`` non-decreasing over the rows, ``hi(q) >= k`` holds from
    ``first`` on and ``lo(q) <= k`` up to ``last``, so every row between keeps ``k`` (an empty
    row, ``lo > hi``, cannot satisfy both) and no other does."""
    keys = torch.arange(lk, dtype=lo.dtype, device=lo.device)
    keys = keys.expand(*lo.shape[:-1], lk).contiguous()
    first = torch.searchsorted(hi.contiguous(), keys)
    last = torch.searchsorted(lo.contiguous(), keys, right=True) - 1
    return first, last


def _monotone(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether both bounds are non-decreasing along the rows."""
    return bool((lo[1:] >= lo[:-1]).all()) and bool((hi[1:] >= hi[:-1]).all())
