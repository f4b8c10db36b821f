"""Layout route for sparse compositions: classify only tiles that may hold a kept entry.

Each q-block gets a few candidate k-block ranges that are guaranteed to contain all its
non-EMPTY tiles: an interval sub-pattern contributes its exact visited range
(``intervals.py``), ``global(n)`` its rows, ``a | b`` the ranges of both sides, ``a & b`` those of
the tighter side. Only the tiles in these ranges are classified (``blocks.py``, exact), and the
compact tables are listed from them directly (``overlay.py``). Patterns with no such bound
(``~``, strided, fanout, axial, custom predicates at the top) return None and take another
route.
"""

from __future__ import annotations

import torch

from .blocks import Tiles, classify, resolve_tiles
from .intervals import interval_bounds
from .nodes import And, Or, Pattern
from .primitives import Global
from .tables import CHUNK


def candidate_ranges(p: Pattern, lq: int, lk: int, bm: int, bn: int):
    """``(starts, ends)`` int64 ``[nq, m]``: k-block ranges ``[start, end)`` covering every
    non-EMPTY tile of each q-block; None when no useful bound is known."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    iv = p.interval()
    if iv is not None:
        b = interval_bounds(iv, lq, lk, bm, bn)
        extra = torch.tensor(sorted(b.gap_rows), dtype=torch.int64)
        start, end = b.start.clone(), b.end.clone()
        if extra.numel():  # rows with gaps: cover them fully (still exact after classifying)
            start[extra], end[extra] = 0, nk
        return start[:, None], end[:, None]
    if isinstance(p, Global):
        i = torch.arange(nq, dtype=torch.int64)
        first_q = i * bm + (lk - lq)
        end = torch.where(first_q < p.n, nk, -(-min(p.n, lk) // bn))
        return torch.zeros_like(end)[:, None], end[:, None]
    if isinstance(p, Or):
        a = candidate_ranges(p.left, lq, lk, bm, bn)
        b = candidate_ranges(p.right, lq, lk, bm, bn)
        if a is None or b is None:
            return None
        return torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    if isinstance(p, And):
        a = candidate_ranges(p.left, lq, lk, bm, bn)
        b = candidate_ranges(p.right, lq, lk, bm, bn)
        if a is None or b is None:
            return a if b is None else b
        size = [int((r[1] - r[0]).clamp(min=0).sum()) for r in (a, b)]
        return a if size[0] <= size[1] else b
    return None


def candidate_overrides(p: Pattern, lq: int, lk: int, bm: int, bn: int, ranges) -> tuple:
    """``overlay.Overrides`` of the head-resolved ``p``: an empty background and the candidate
    tiles, classified exactly."""
    nk = -(-lk // bn)
    keys = tile_keys(ranges[0], ranges[1], -(-lq // bm), nk)
    i, j = keys // nk, keys % nk
    kinds = classify_listed(p, lq, lk, bm, bn, i, j)
    return None, i, j, kinds


def tile_keys(starts: torch.Tensor, ends: torch.Tensor, nq: int, nk: int,
              unique: bool = True) -> torch.Tensor:
    """Tile keys ``i * nk + j`` of the k-block ranges ``[starts, ends)`` (int64 ``[nq, m]``,
    clipped to ``[0, nk)``): sorted and distinct (row-major, k-blocks ascending within a row)
    unless ``unique`` is False (then in range order, overlaps repeated)."""
    lengths = (ends.clamp(max=nk) - starts.clamp(min=0)).clamp(min=0)
    rows = torch.arange(nq, dtype=torch.int64)[:, None].expand_as(starts)
    flat_len = lengths.flatten()
    first = starts.clamp(min=0).flatten().repeat_interleave(flat_len)
    offset = torch.arange(int(flat_len.sum())) - (torch.cumsum(flat_len, 0) - flat_len
                                                  ).repeat_interleave(flat_len)
    keys = rows.flatten().repeat_interleave(flat_len) * nk + first + offset
    return torch.unique(keys) if unique else keys


def classify_listed(p: Pattern, lq: int, lk: int, bm: int, bn: int, i: torch.Tensor,
                    j: torch.Tensor) -> torch.Tensor:
    """Exact kinds uint8 ``[c]`` of the listed tiles ``(i, j)`` (int64 ``[c]``), ``CHUNK`` at a
    time; diagonal prefix sums of q - k sub-patterns are sized once for the whole grid."""
    off = lk - lq
    everything = Tiles(q0=torch.tensor([[off]]), q1=torch.tensor([[lk - 1]]),
                       k0=torch.tensor([[0]]), k1=torch.tensor([[lk - 1]]))
    prefixes: dict = {}
    classify(p, everything, prefixes)
    kinds = torch.empty(i.numel(), dtype=torch.uint8)
    for s in range(0, i.numel(), CHUNK):
        ii, jj = i[s:s + CHUNK, None], j[s:s + CHUNK, None]
        t = Tiles(q0=ii * bm + off, q1=torch.clamp((ii + 1) * bm, max=lq) - 1 + off,
                  k0=jj * bn, k1=torch.clamp((jj + 1) * bn, max=lk) - 1)
        kinds[s:s + CHUNK] = resolve_tiles(p, t, classify(p, t, prefixes), bm, bn)[:, 0]
    return kinds
