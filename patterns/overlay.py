"""Compact tables of a q - k background overlaid with a list of exactly classified tiles.

A full-size tile ``(i, j)`` of a q - k pattern has the kind of ``v = i * block_m - j *
block_n`` (``diagonals.py``), so the columns of one kind in row ``i`` are ``(i * block_m - v) /
block_n`` for the sorted ``v`` of that kind with the right residue: a contiguous, descending run
of that sorted vector for any column range, found by binary search. The *overrides* (exception,
layer and ragged tiles, with their exact kinds) cut each row into runs of consecutive override
tiles and the background gaps between them; every gap and run is a segment of the row, written
in order, so a row is listed without sorting and without looking at its EMPTY tiles. The
transposed tables are the same construction with the roles of rows and columns swapped.
Cost: O(listed entries + overrides), a bounded chunk of entries at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tables import Rows, fill_segments

PARTIAL, FULL = 1, 2


@dataclass(frozen=True)
class Diagonals:
    """Row ``r`` (of ``rows``) lists columns ``c = (r * a - x) / b`` in ``[0, cols_full)`` for
    the ``x`` of ``values`` (sorted int64) with ``r * a - x`` divisible by ``b``."""

    values: torch.Tensor
    a: int
    b: int
    cols_full: int


Overrides = tuple  # (kind_v uint8 [v] or None, i int64 [t], j int64 [t], kinds uint8 [t])


def overlay_tables(o: Overrides, lq: int, lk: int, bm: int, bn: int,
                   side: str) -> tuple[Rows, Rows]:
    """``(PARTIAL rows, FULL rows)`` (no head dim) per q-block (``side`` "kv") or per k-block
    ("q") of a background overlaid with override tiles ``o = (kind_v, i, j, kinds)``.

    ``kind_v``: kinds (uint8, 0/1/2) of full-size tiles per ``v`` ascending in steps of
    ``gcd(bm, bn)`` from ``-(nk - 1) * bn`` (None: an all-EMPTY background); ``(i, j)`` int64
    ``[t]``: distinct override tiles with their exact ``kinds``, which must include every
    ragged tile (last q-block row, last k-block column) when there is a background."""
    kind_v, i, j, kinds = o
    nq, nk = -(-lq // bm), -(-lk // bn)
    if side == "kv":
        rows, cols, keys = nq, nk, i * nk + j
    else:
        rows, cols, keys = nk, nq, j * nq + i
    order = torch.argsort(keys)
    keys, kinds = keys[order], kinds[order]
    if kind_v is not None:
        v = torch.arange(-(nk - 1) * bn, (nq - 1) * bm + 1, math.gcd(bm, bn), dtype=torch.int64)
    tables = []
    for kind in (PARTIAL, FULL):
        diag = None
        if kind_v is not None:
            s = v[kind_v == kind]
            diag = (Diagonals(s, bm, bn, lk // bn) if side == "kv"
                    else Diagonals(-s.flip(0), bn, bm, lq // bm))
        tables.append(overlay_rows(rows, cols, diag, keys, kinds == kind))
    return tables[0], tables[1]


def overlay_rows(rows: int, cols: int, diag: Diagonals | None, keys: torch.Tensor,
                 listed: torch.Tensor) -> Rows:
    """Rows of the background ``diag`` with the override tiles ``keys`` (sorted distinct int64
    ``r * cols + c``) replacing it: an override tile is listed when ``listed`` (bool) says so."""
    keys = keys.to(torch.int64)
    t = keys.numel()
    row_of = keys // max(cols, 1)
    brk = torch.ones(t, dtype=torch.bool)
    brk[1:] = (keys[1:] != keys[:-1] + 1) | (row_of[1:] != row_of[:-1])
    first = brk.nonzero().flatten()  # first override tile of each run
    run_id = torch.cumsum(brk, 0) - 1
    runs = first.numel()
    run_row = row_of[first]
    run_s = keys[first] - run_row * cols
    run_e = run_s + torch.diff(first, append=torch.tensor([t]))
    per_row = torch.bincount(run_row, minlength=rows)
    # Row r: gap 0, run 0, gap 1, ..., run k-1, gap k; gap ids row-major (runs + rows of them).
    u = torch.arange(runs, dtype=torch.int64)
    gap_row = torch.arange(rows, dtype=torch.int64).repeat_interleave(per_row + 1)
    gap_s = torch.zeros(runs + rows, dtype=torch.int64)
    gap_e = torch.full((runs + rows,), cols, dtype=torch.int64)
    gap_s[u + run_row + 1] = run_e
    gap_e[u + run_row] = run_s
    seg_of_gap = 2 * torch.arange(runs + rows, dtype=torch.int64) - gap_row
    seg_of_run = 2 * u + run_row + 1
    gap_len = torch.zeros(runs + rows, dtype=torch.int64)
    if diag is not None and diag.values.numel():
        lo, hi, sorted_x = _background_ranges(diag, gap_row, gap_s, gap_e)
        gap_len = hi - lo
    run_len = torch.bincount(run_id[listed], minlength=runs)
    seg_len = torch.empty(runs * 2 + rows, dtype=torch.int64)
    seg_len[seg_of_gap] = gap_len
    seg_len[seg_of_run] = run_len
    ends = torch.cumsum(seg_len, 0)
    seg_start = ends - seg_len
    out = torch.empty(int(ends[-1]) if ends.numel() else 0, dtype=torch.int32)
    if diag is not None and diag.values.numel():
        # Gap of row r: columns ascending = x descending from hi - 1, c = r*a//b - x//b (same
        # residue mod b). Runs get placeholder values here, overwritten below.
        y = torch.cat([(sorted_x // diag.b).flip(0), torch.zeros(cols, dtype=torch.int64)])
        seg_src = torch.full((runs * 2 + rows,), sorted_x.numel(), dtype=torch.int64)
        seg_src[seg_of_gap] = sorted_x.numel() - hi
        seg_rad = torch.zeros(runs * 2 + rows, dtype=torch.int64)
        seg_rad[seg_of_gap] = (gap_row * diag.a) // diag.b
        fill_segments(out, seg_start, seg_len, seg_src, seg_rad, y.to(torch.int32))
    kept = listed.nonzero().flatten()
    rid = run_id[kept]
    rank = torch.arange(kept.numel(), dtype=torch.int64) - (torch.cumsum(run_len, 0)
                                                             - run_len)[rid]
    out[seg_start[seg_of_run[rid]] + rank] = (keys[kept] - row_of[kept] * cols).to(torch.int32)
    row_first = 2 * (torch.cumsum(per_row, 0) - per_row) + torch.arange(rows)
    row_end = row_first + 2 * per_row + 1
    cum = torch.cat([torch.zeros(1, dtype=torch.int64), ends])
    return cum[row_end] - cum[row_first], out


def _background_ranges(diag: Diagonals, row: torch.Tensor, c0: torch.Tensor,
                       c1: torch.Tensor):
    """For each (row, column range ``[c0, c1)``): the index range ``[lo, hi)`` into the
    returned class-sorted values whose columns fall in the range (clipped to ``cols_full``)."""
    a, b = diag.a, diag.b
    g = math.gcd(a, b)
    x = diag.values
    cls = torch.remainder(x, b) // g
    lo_x, width = int(x.min()), int(x.max()) - int(x.min()) + 2
    key = cls * width + (x - lo_x)
    order = torch.argsort(key)
    key, x = key[order], x[order]
    ra = row * a
    rcls = torch.remainder(ra, b) // g
    c1 = torch.minimum(c1, torch.tensor(diag.cols_full))
    c0 = torch.minimum(c0, c1)

    def find(y):  # number of values of earlier classes, or of this class <= y
        return torch.searchsorted(key, rcls * width + (y - lo_x).clamp(-1, width - 1),
                                  right=True)

    lo = find(ra - c1 * b)  # x > ra - c1 * b  <=>  c < c1
    hi = find(ra - c0 * b)  # x <= ra - c0 * b  <=>  c >= c0
    return lo, hi, x

