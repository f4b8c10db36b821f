"""Layout route for interval patterns: per q-block loop bounds from closed-form row bounds.

Rows of an interval pattern keep ``[lo(q), hi(q)]`` with ``lo``, ``hi`` non-decreasing in ``q``
(guaranteed by how ``Pattern.interval`` is built). For a q-block with first row ``a`` and last
row ``b`` (bounds clamped to the keys):

* ``lo(b) <= hi(a)``: every row contains ``[lo(b), hi(a)]``, so rows are non-empty and their
  union is ``[lo(a), hi(b)]``; a tile is FULL iff ``lo(b) <= k0`` and ``hi(a) >= k1``.
* ``lo(a) > hi(b)``: every row is empty.
* otherwise (bands narrower than a block, rows that become empty inside the block): the block's
  rows are evaluated one by one, vectorised over all such blocks.

So the cost is O(number of q-blocks) plus O(block_m) per undecided block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .numeric import evaluate_expr
from .symbolic import Q

PARTIAL, FULL = 1, 2


@dataclass(frozen=True)
class Bounds:
    """Per q-block ranges of k-blocks, int64 ``[nq]``: visited ``[start, end)``, FULL
    ``[full_start, full_end)``; ``gap_rows`` maps q-blocks whose visited k-blocks are not one
    range (rare) to their exact kinds ``uint8 [nk]``."""

    start: torch.Tensor
    end: torch.Tensor
    full_start: torch.Tensor
    full_end: torch.Tensor
    gap_rows: dict[int, torch.Tensor]


@dataclass(frozen=True)
class RowTable:
    """Row bounds held as arrays: rows at absolute positions ``first, first + 1, ...`` keep
    ``[lo[r], hi[r]]`` (int64 ``[lq]``, clamped, non-decreasing). Used where the bounds are
    known numerically for one (lq, lk) only, e.g. a union of intervals."""

    first: int
    lo: torch.Tensor
    hi: torch.Tensor


def row_bounds(iv, q: torch.Tensor, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lo, hi`` (int64, shaped like ``q``) clamped to the keys ``[0, lk - 1]``."""
    if isinstance(iv, RowTable):
        # Rows past the ends (padding of a ragged last block) read the nearest row; callers
        # mask them out.
        r = (q - iv.first).clamp(0, iv.lo.numel() - 1)
        return iv.lo[r], iv.hi[r]
    lo = torch.as_tensor(evaluate_expr(iv[0], {Q: q}), dtype=torch.int64).expand(q.shape)
    hi = torch.as_tensor(evaluate_expr(iv[1], {Q: q}), dtype=torch.int64).expand(q.shape)
    return lo.clamp(min=0), hi.clamp(max=lk - 1)


def kept_entries(iv, lq: int, lk: int) -> int:
    """Exact number of kept entries (one pass over the rows, in chunks)."""
    total = 0
    for r0 in range(0, lq, 1 << 22):
        q = torch.arange(r0, min(lq, r0 + (1 << 22)), dtype=torch.int64) + (lk - lq)
        lo, hi = row_bounds(iv, q, lk)
        total += int((hi - lo + 1).clamp(min=0).sum())
    return total


def interval_bounds(iv, lq: int, lk: int, bm: int, bn: int) -> Bounds:
    """Exact per q-block bounds of the interval ``iv`` (see the module docstring)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    i = torch.arange(nq, dtype=torch.int64)
    a = i * bm + (lk - lq)
    b = torch.clamp((i + 1) * bm, max=lq) - 1 + (lk - lq)
    lo_a, hi_a = row_bounds(iv, a, lk)
    lo_b, hi_b = row_bounds(iv, b, lk)
    overlap = lo_b <= hi_a
    empty = lo_a > hi_b
    start = torch.where(overlap, lo_a // bn, 0)
    end = torch.where(overlap, hi_b // bn + 1, 0)
    full_start = torch.where(overlap, (lo_b + bn - 1) // bn, 0)
    full_end = torch.where(overlap, torch.where(hi_a == lk - 1, nk, (hi_a + 1) // bn), 0)
    gap_rows: dict[int, torch.Tensor] = {}
    undecided = (~overlap & ~empty).nonzero().flatten()
    if undecided.numel():
        for s in range(0, undecided.numel(), max(1, (1 << 20) // bm)):
            blocks = undecided[s:s + max(1, (1 << 20) // bm)]
            st, en, fs, fe, gaps = _by_rows(iv, blocks, a, b, lk, bm, bn, nk)
            start[blocks], end[blocks], full_start[blocks], full_end[blocks] = st, en, fs, fe
            gap_rows.update(gaps)
    full_end = torch.maximum(full_end, full_start)
    return Bounds(start, end, full_start, full_end, gap_rows)


def _by_rows(iv, blocks, a, b, lk, bm, bn, nk):
    """Bounds of the q-blocks ``blocks`` from each of their rows."""
    q = a[blocks, None] + torch.arange(bm)  # [u, bm]
    real = q <= b[blocks, None]
    lo, hi = row_bounds(iv, q, lk)
    ne = (lo <= hi) & real
    jlo, jhi = lo // bn, hi // bn
    big = nk + 1
    any_row = ne.any(1)
    start = torch.where(any_row, torch.where(ne, jlo, big).amin(1), 0)
    end = torch.where(any_row, torch.where(ne, jhi, -1).amax(1) + 1, 0)
    # FULL k-blocks of a row lie inside [lo, hi]; the ragged last block counts when hi == lk-1.
    f0 = torch.where(ne, (lo + bn - 1) // bn, big)
    f1 = torch.where(ne, torch.where(hi == lk - 1, nk, (hi + 1) // bn), 0)
    f0 = torch.where(real, f0, 0)
    f1 = torch.where(real, f1, nk)
    fs, fe = f0.amax(1), f1.amin(1)
    # Rows are sorted by lo, so visited k-blocks form one range unless a row starts past
    # everything seen before it in the block.
    seen = torch.cummax(torch.where(ne, jhi, -1), 1).values
    gap = ne[:, 1:] & (seen[:, :-1] >= 0) & (jlo[:, 1:] > seen[:, :-1] + 1)
    gaps = {}
    for u in gap.any(1).nonzero().flatten().tolist():
        row = torch.zeros(nk, dtype=torch.uint8)
        for x, y in zip(jlo[u][ne[u]].tolist(), jhi[u][ne[u]].tolist(), strict=True):
            row[x:y + 1] = PARTIAL
        if fe[u] > fs[u]:
            row[int(fs[u]):int(fe[u])] = FULL
        gaps[int(blocks[u])] = row
    return start, end, fs, fe, gaps


def union_rows(ivs: list, lq: int, lk: int) -> RowTable | None:
    """The rows of ``ivs[0] | ivs[1] | ...`` as one :class:`RowTable`, or None when, for these
    lengths, some row is not a single non-empty interval or the bounds are not monotone.

    Intervals are merged in order; each merge needs the next interval to touch or overlap the
    hull so far (or one of them to be empty), so the check is exact but may miss unions whose
    order matters. One O(lq) pass per interval.
    """
    q = torch.arange(lk - lq, lk, dtype=torch.int64)
    lo, hi = row_bounds(ivs[0], q, lk)
    for iv in ivs[1:]:
        lo2, hi2 = row_bounds(iv, q, lk)
        ne1, ne2 = lo <= hi, lo2 <= hi2
        apart = ne1 & ne2 & ((lo2 > hi + 1) | (lo > hi2 + 1))
        if bool(apart.any()):
            return None
        lo = torch.where(ne1 & ne2, torch.minimum(lo, lo2), torch.where(ne1, lo, lo2))
        hi = torch.where(ne1 & ne2, torch.maximum(hi, hi2), torch.where(ne1, hi, hi2))
    if bool((lo > hi).any()) or bool((lo[1:] < lo[:-1]).any()) or bool((hi[1:] < hi[:-1]).any()):
        return None
    return RowTable(lk - lq, lo, hi)
