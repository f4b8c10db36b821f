"""Layout route for patterns that depend on ``d = q - k`` only (Toeplitz patterns).

causal, window, local, sliding, strided, fanout, compositions of them and custom predicates
of ``q - k`` alone. A full-size tile ``(i, j)`` covers exactly the diagonals
``d in [v + off - (block_n - 1), v + off + block_m - 1]`` with ``v = i * block_m - j * block_n``
and ``off = lk - lq``, so its kind depends on ``v`` only: there are O((lq + lk) / gcd) distinct
values, each classified exactly by a prefix sum of ``keep(d)``. The CSR tables are then listed
per row straight from the sorted ``v`` of each kind; only the ragged last q-block row and
k-block column are classified tile by tile. Nothing of size ``nq x nk`` is built besides the
tables themselves.
"""

from __future__ import annotations

import math

import torch

from .blocks import FULL_BIT, PARTIAL_BIT, Tiles, classify
from .nodes import Pattern

PARTIAL, FULL = 1, 2
_BIT = {PARTIAL: PARTIAL_BIT, FULL: FULL_BIT}


def toeplitz_tables(p: Pattern, lq: int, lk: int, bm: int, bn: int):
    """``{"kv": ((pc, pi), (fc, fi)), "q": ((pc, pi), (fc, fi))}`` int32 CSR tables (no head
    dim) of the head-resolved Toeplitz pattern ``p``; see the module docstring."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    nq_full, nk_full = lq // bm, lk // bn
    off = lk - lq
    g = math.gcd(bm, bn)
    v = torch.arange(-(nk - 1) * bn, (nq - 1) * bm + 1, g, dtype=torch.int64)
    # Classify every v through a one-column grid whose tiles have the full-size geometry.
    diag = Tiles(q0=(v + off)[:, None], q1=(v + off + bm - 1)[:, None],
                 k0=torch.zeros((1, 1), dtype=torch.int64),
                 k1=torch.full((1, 1), bn - 1, dtype=torch.int64))
    kind_v = classify(p, diag)[:, 0]
    rows = torch.arange(nq, dtype=torch.int64)
    cols = torch.arange(nk, dtype=torch.int64)
    # Ragged edges: the last k-block column (for every q-block) and the last q-block row.
    last_col = last_row = None
    if nk_full < nk:
        last_col = classify(p, _grid(lq, lk, bm, bn, rows, cols[-1:]))[:, 0]
    if nq_full < nq:
        last_row = classify(p, _grid(lq, lk, bm, bn, rows[-1:], cols))[0]
    out = {}
    for side in ("kv", "q"):
        tables = []
        for kind in (PARTIAL, FULL):
            s = v[kind_v == _BIT[kind]]
            if side == "kv":
                counts, idx = _rows_from_diagonals(s, nq, nk_full, bm, bn)
                extra_col, extra_row = last_col, last_row
            else:
                counts, idx = _rows_from_diagonals(-s.flip(0), nk, nq_full, bn, bm)
                extra_col, extra_row = last_row, last_col
            last_index = (nk if side == "kv" else nq) - 1
            counts, idx = _patch_edges(counts, idx, extra_col, extra_row, _BIT[kind], last_index)
            tables.append((counts.to(torch.int32), idx.to(torch.int32)))
        out[side] = tuple(tables)
    return out


def _grid(lq, lk, bm, bn, i, j) -> Tiles:
    off = lk - lq
    q1 = torch.clamp((i + 1) * bm, max=lq) - 1 + off
    return Tiles(q0=(i * bm + off)[:, None], q1=q1[:, None],
                 k0=(j * bn)[None, :], k1=(torch.clamp((j + 1) * bn, max=lk) - 1)[None, :])


def _rows_from_diagonals(s: torch.Tensor, rows: int, cols_full: int, a: int, b: int):
    """Row ``r`` lists columns ``c = (r * a - x) / b`` in ``[0, cols_full)`` for ``x`` in the
    ascending ``s`` with ``r * a - x`` divisible by ``b``, ascending in ``c``."""
    g = math.gcd(a, b)
    r = torch.arange(rows, dtype=torch.int64)
    ra = r * a
    counts = torch.zeros(rows, dtype=torch.int64)
    spans = []
    for c in range(0, b, g):
        mine = torch.remainder(ra, b) == c
        sc = s[torch.remainder(s, b) == c]
        rr = r[mine]
        if rr.numel() == 0 or sc.numel() == 0 or cols_full == 0:
            continue
        lo = torch.searchsorted(sc, ra[mine] - (cols_full - 1) * b, right=False)
        hi = torch.searchsorted(sc, ra[mine], right=True)
        counts[mine] = hi - lo
        spans.append((rr, sc, hi))
    width = int(counts.max()) if rows else 0
    idx = torch.zeros((rows, max(1, width + 1)), dtype=torch.int64)
    t = torch.arange(max(1, width))
    for rr, sc, hi in spans:
        take = (hi[:, None] - 1 - t).clamp(min=0)
        cols = (rr[:, None] * a - sc[take]) // b
        ok = t < counts[rr][:, None]
        idx[rr[:, None], t.expand(len(rr), -1)] = torch.where(ok, cols, 0)
    return counts, idx


def _patch_edges(counts, idx, extra_col, extra_row, bit, last_index):
    """Append column ``last_index`` (the ragged last one) to rows whose tile there has kind
    ``bit``; replace the ragged last row by its own listing."""
    counts, idx = counts.clone(), idx.clone()
    if extra_col is not None:
        r = (extra_col == bit).nonzero().flatten()
        idx[r, counts[r]] = last_index  # a free slot was reserved past the widest row
        counts[r] += 1
    if extra_row is not None:
        js = (extra_row == bit).nonzero().flatten()
        if js.numel() > idx.shape[1]:
            idx = torch.nn.functional.pad(idx, (0, js.numel() - idx.shape[1]))
        idx[-1] = 0
        idx[-1, :js.numel()] = js
        counts[-1] = js.numel()
    width = max(1, int(counts.max()) if counts.numel() else 1)
    return counts, idx[:, :width]
