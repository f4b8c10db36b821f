"""Layout route for patterns that equal a q - k pattern outside a few k-block ranges per row.

Every built-in primitive splits into a *background* that depends on ``d = q - k`` only and,
per q-block, *exception* ranges of k-blocks outside which the pattern equals its background on
every entry of every tile:

* q - k patterns (causal, window, local, sliding, strided, fanout, dense, q - k predicates):
  background = the pattern itself, no exceptions;
* other interval patterns (sink, block, prefix, predicates with row bounds) and ``global(n)``:
  background = nothing kept, exceptions = the k-blocks that may hold a kept entry;
* ``axial(cols, offset)``: background = ``strided(cols)`` (same grid column <=> ``cols``
  divides ``q - k``); exceptions = the leading rows and columns and the tiles that share a grid
  row with the q-block (a band about ``cols / block_n`` tiles wide);
* ``a | b``, ``a & b``, ``~a``: background = the same composition of the backgrounds,
  exceptions = the union of both sides' (only one side's when its constant background decides
  the result: ``x & nothing``, ``x | everything``).

A full-size tile's background kind depends on ``v = i * block_m - j * block_n`` only (see
``diagonals.py``), so the ``nq x nk`` kinds are one strided copy of a per-``v`` vector; the
exception tiles and the ragged last row and column are then classified exactly
(``blocks.py``). Cost: ``nq * nk`` bytes written plus O(exception tiles); no per-tile analysis
of the whole grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import _KIND_OF_BITS, Tiles, classify, is_toeplitz, kept_in_tiles
from .candidates import candidate_ranges, classify_listed, tile_keys
from .nodes import And, Not, Or, Pattern
from .primitives import Axial, Dense, Global, Strided

EVERYTHING: Pattern = Dense()
NOTHING: Pattern = Not(EVERYTHING)


@dataclass(frozen=True)
class Split:
    """``pattern == background`` on every tile outside the exception ranges.

    ``background`` depends on ``q - k`` only; ``starts, ends``: int64 ``[nq, m]``, q-block ``i``
    has exception k-blocks ``[starts[i, c], ends[i, c])`` for each ``c`` (``m`` may be 0).
    """

    background: Pattern
    starts: torch.Tensor
    ends: torch.Tensor

    @property
    def size(self) -> int:
        """Total length of the exception ranges (an upper bound on the exception tiles)."""
        return int((self.ends - self.starts).clamp(min=0).sum())


def split_pattern(p: Pattern, lq: int, lk: int, bm: int, bn: int) -> Split | None:
    """The :class:`Split` of the head-resolved pattern ``p``, or None when some leaf admits no
    analysis (a custom predicate that is neither of ``q - k`` nor one interval per row)."""
    nq = -(-lq // bm)
    if is_toeplitz(p):
        none = torch.zeros((nq, 0), dtype=torch.int64)
        return Split(p, none, none)
    if isinstance(p, Not):
        s = split_pattern(p.inner, lq, lk, bm, bn)
        return None if s is None else Split(_negate(s.background), s.starts, s.ends)
    if isinstance(p, (And, Or)):
        a = split_pattern(p.left, lq, lk, bm, bn)
        b = split_pattern(p.right, lq, lk, bm, bn)
        if a is None or b is None:
            return None
        return _combine(a, b, isinstance(p, And))
    if isinstance(p, Axial):
        starts, ends = _axial_ranges(p, lq, lk, bm, bn)
        return Split(Strided(p.cols), starts, ends)
    if isinstance(p, Global) or p.interval() is not None:
        starts, ends = candidate_ranges(p, lq, lk, bm, bn)
        return Split(NOTHING, starts, ends)
    return None


def _negate(p: Pattern) -> Pattern:
    return p.inner if isinstance(p, Not) else Not(p)


def _combine(a: Split, b: Split, is_and: bool) -> Split:
    absorbing, neutral = (NOTHING, EVERYTHING) if is_and else (EVERYTHING, NOTHING)
    # Outside its exceptions an absorbing side decides alone: x & nothing, x | everything.
    deciding = [s for s in (a, b) if s.background == absorbing]
    if deciding:
        return min(deciding, key=lambda s: s.size)
    if a.background == neutral:
        background = b.background
    elif b.background == neutral:
        background = a.background
    else:
        background = (And if is_and else Or)(a.background, b.background)
    return Split(background, torch.cat([a.starts, b.starts], 1), torch.cat([a.ends, b.ends], 1))


def _axial_ranges(p: Axial, lq: int, lk: int, bm: int, bn: int):
    """Exception ranges of ``axial``: whole rows for q-blocks that start among the leading
    tokens, the leading key columns, and the k-blocks of the grid rows the q-block touches."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    i = torch.arange(nq, dtype=torch.int64)
    q0 = i * bm + (lk - lq)
    q1 = torch.clamp((i + 1) * bm, max=lq) - 1 + (lk - lq)
    lead_row = q0 < p.offset
    first_row = torch.div(q0 - p.offset, p.cols, rounding_mode="floor")
    last_row = torch.div(q1 - p.offset, p.cols, rounding_mode="floor")
    band_start = (p.offset + first_row * p.cols) // bn
    band_end = (p.offset + (last_row + 1) * p.cols - 1) // bn + 1
    band_start = torch.where(lead_row, 0, band_start)
    band_end = torch.where(lead_row, nk, band_end)
    lead_cols = torch.full_like(i, -(-min(p.offset, lk) // bn))
    return (torch.stack([band_start, torch.zeros_like(i)], 1),
            torch.stack([band_end, lead_cols], 1))


def split_kinds(p: Pattern, s: Split, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Exact kinds uint8 ``[nq, nk]`` of the head-resolved ``p`` from its split ``s``."""
    nk = -(-lk // bn)
    kinds = _background_kinds(s.background, lq, lk, bm, bn)
    keys = _exception_keys(s, lq, lk, bm, bn)
    kinds.view(-1)[keys] = classify_listed(p, lq, lk, bm, bn, keys // nk, keys % nk)
    return kinds


def split_kept(p: Pattern, s: Split, kinds: torch.Tensor, lq: int, lk: int, bm: int,
               bn: int) -> int:
    """Exact number of kept entries of ``p`` (kinds ``[nq, nk]`` from :func:`split_kinds`):
    background tiles through per-``v`` counts, exception tiles by area or evaluation."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    g = math.gcd(bm, bn)
    a, b = bm // g, bn // g
    count_v = _background_counts(s.background, lq, lk, bm, bn)  # per v index i*a + (nk-1-j)*b
    # Sum over every tile as if full-size: row i reads count_v at i*a + t*b, t in [0, nk).
    per_residue = torch.nn.functional.pad(count_v, (0, (-count_v.numel()) % b + (nk + 1) * b))
    prefix = torch.cumsum(per_residue.view(-1, b), 0)
    prefix = torch.cat([torch.zeros((1, b), dtype=torch.int64), prefix])  # prefix[t] = sum < t
    x0 = torch.arange(nq, dtype=torch.int64) * a
    r, t0 = x0 % b, x0 // b
    total = int((prefix[t0 + nk, r] - prefix[t0, r]).sum())
    # Exception tiles (and ragged ones): replace their background count by the exact one.
    keys = _exception_keys(s, lq, lk, bm, bn)
    i, j = keys // nk, keys % nk
    total -= int(count_v[i * a + (nk - 1 - j) * b].sum())
    return total + kept_in_tiles(p, lq, lk, bm, bn, i, j, kinds.view(-1)[keys])


def _exception_keys(s: Split, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Sorted tile keys ``i * nk + j`` of the exceptions plus the ragged last k-block column
    and q-block row (whose tiles are not full-size)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    starts, ends = [s.starts], [s.ends]
    rows = torch.arange(nq, dtype=torch.int64)[:, None]
    if lk % bn:
        starts.append(torch.full_like(rows, nk - 1))
        ends.append(torch.full_like(rows, nk))
    if lq % bm:
        starts.append(torch.zeros_like(rows))
        ends.append(torch.where(rows == nq - 1, nk, 0))
    return tile_keys(torch.cat(starts, 1), torch.cat(ends, 1), nq, nk)


def _diagonal_tiles(lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """``v = i * bm - j * bn`` of full-size tiles, ascending in steps of gcd(bm, bn)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    return torch.arange(-(nk - 1) * bn, (nq - 1) * bm + 1, math.gcd(bm, bn), dtype=torch.int64)


def _background_counts(bg: Pattern, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Kept entries int64 of a full-size tile of the q - k pattern ``bg`` per ``v``: a tile
    covers ``d = v + off + x - y`` for ``x < bm``, ``y < bn``, so two prefix sums of
    ``keep(d)`` give every tile's count."""
    v = _diagonal_tiles(lq, lk, bm, bn)
    d0 = int(v[0]) + lk - lq - (bn - 1)
    d = torch.arange(d0, int(v[-1]) + lk - lq + bm, dtype=torch.int64)
    keep = bg.evaluate(d, torch.zeros((), dtype=torch.int64)).to(torch.int64)
    s1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)])
    # window[u] = keep[u] + ... + keep[u - bn + 1] for u = bn - 1 ... (indices into d)
    window = s1[bn:] - s1[:-bn]
    s2 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(window, 0)])
    # Tile v: sum of window over u in [v + off - d0 + x] for x < bm, shifted by bn - 1.
    u0 = v + lk - lq - d0 - (bn - 1)
    return s2[u0 + bm] - s2[u0]


def _background_kinds(bg: Pattern, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Kinds ``[nq, nk]`` of the q - k pattern ``bg`` as if every tile were full-size."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    if bg in (EVERYTHING, NOTHING):
        return torch.full((nq, nk), 2 if bg == EVERYTHING else 0, dtype=torch.uint8)
    g = math.gcd(bm, bn)
    a, b = bm // g, bn // g
    v = _diagonal_tiles(lq, lk, bm, bn)
    diag = Tiles(q0=(v + lk - lq)[:, None], q1=(v + lk - lq + bm - 1)[:, None],
                 k0=torch.zeros((1, 1), dtype=torch.int64),
                 k1=torch.full((1, 1), bn - 1, dtype=torch.int64))
    kind_v = _KIND_OF_BITS[classify(bg, diag)[:, 0].to(torch.int64)]
    # Tile (i, j) has v index i * a + (nk - 1 - j) * b, i.e. index (nq - 1 - i) * a + j * b of
    # the reversed vector: a strided view (negative row stride, which numpy allows; rows are
    # contiguous runs when b == 1) copied once.
    reversed_v = kind_v.flip(0).numpy()
    view = np.lib.stride_tricks.as_strided(reversed_v[(nq - 1) * a:], (nq, nk), (-a, b))
    return torch.from_numpy(view.copy(order="C"))
