"""Exact block layouts: which (q-block, k-block) tiles are EMPTY, PARTIAL or FULL.

Two routes, both exact and neither building an ``lq x lk`` tensor:

* interval patterns (``Pattern.interval()`` is not None: causal, window, local, sliding, block,
  sink, prefix, their intersections, ...): the per-row bounds ``lo(q), hi(q)`` are evaluated in
  closed form and reduced per q-block to loop bounds ``kv_start/kv_end`` (visited k-blocks) and
  ``kv_full_start/kv_full_end`` (FULL k-blocks). ``kinds`` and the CSR tables are derived from
  them lazily, on first access.
* everything else: per-tile analysis (``blocks.py``), a bounded chunk of q-blocks at a time, with
  tile-by-tile evaluation only where the analysis cannot decide (opaque custom predicates,
  PARTIAL-with-PARTIAL in non-Toeplitz compositions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .blocks import Tiles, classify, is_toeplitz, resolve_tiles
from .errors import PatternError
from .nodes import Pattern
from .numeric import INT_INF, evaluate_expr
from .symbolic import Q

EMPTY, PARTIAL, FULL = 0, 1, 2
_CHUNK = 1 << 22  # tiles (or entries) handled per step: bounds temporary memory


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class Layout:
    """Block structure of a static pattern for ``lq`` queries, ``lk`` keys and
    ``block_m x block_n`` tiles; ``n = num_heads`` (1 unless per-head), ``nq = cdiv(lq,
    block_m)``, ``nk = cdiv(lk, block_n)``. Row ``i`` of a q-block holds query ``i`` at absolute
    position ``i + lk - lq``.

    Always available (computed when the layout is built):
        is_interval: rows are single intervals; then the kernels need no tables:
        kv_start, kv_end: int32 ``[n, nq]``, the k-blocks ``[kv_start, kv_end)`` hold every kept
            entry of the q-block (only for ``is_interval``; None otherwise);
        kv_full_start, kv_full_end: int32 ``[n, nq]``, the FULL k-blocks
            ``[kv_full_start, kv_full_end)`` (empty range when start >= end; ``is_interval`` only).
    Computed on first access (cached):
        kinds: uint8 ``[nq, nk]`` (``[n, nq, nk]`` when per-head): 0 EMPTY, 1 PARTIAL, 2 FULL.
        density: kept fraction of the ``lq * lk`` entries; block_density: visited (non-EMPTY)
            fraction of the tiles.
        CSR tables, int32, always with the leading head dim n:
            kv_partial_counts/kv_full_counts ``[n, nq]``, kv_partial_indices/kv_full_indices
            ``[n, nq, max(1, max count)]`` (k-block indices, ascending, padding 0);
            q_partial_counts/q_full_counts ``[n, nk]``, q_partial_indices/q_full_indices
            ``[n, nk, max(1, max count)]`` (the transpose: q-blocks per k-block, for dK/dV).
    """

    lq: int
    lk: int
    block_m: int
    block_n: int
    num_heads: int
    per_head: bool
    is_interval: bool
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None
    kv_full_start: torch.Tensor | None = None
    kv_full_end: torch.Tensor | None = None
    # Exact kinds for q-blocks whose visited k-blocks are not one contiguous range (rare).
    _gap_rows: dict = field(default_factory=dict, repr=False)
    _kept: int | None = field(default=None, repr=False)
    _kinds: torch.Tensor | None = field(default=None, repr=False)
    _pattern: Pattern | None = field(default=None, repr=False)

    @property
    def nq(self) -> int:
        return _cdiv(self.lq, self.block_m)

    @property
    def nk(self) -> int:
        return _cdiv(self.lk, self.block_n)

    # -- kinds -------------------------------------------------------------------------------
    def kind_rows(self, head: int, i0: int, i1: int) -> torch.Tensor:
        """Kinds of q-blocks ``[i0, i1)`` for head ``head``: uint8 ``[i1 - i0, nk]``."""
        if self._kinds is not None:
            return self._kinds[head, i0:i1]
        j = torch.arange(self.nk, dtype=torch.int32)
        start, end = self.kv_start[head, i0:i1, None], self.kv_end[head, i0:i1, None]
        fs, fe = self.kv_full_start[head, i0:i1, None], self.kv_full_end[head, i0:i1, None]
        rows = torch.where((j >= fs) & (j < fe), FULL, torch.where((j >= start) & (j < end),
                                                                   PARTIAL, EMPTY))
        rows = rows.to(torch.uint8)
        for (h, i), row in self._gap_rows.items():
            if h == head and i0 <= i < i1:
                rows[i - i0] = row
        return rows

    @functools.cached_property
    def _all_kinds(self) -> torch.Tensor:
        if self._kinds is not None:
            return self._kinds
        return torch.stack([self.kind_rows(h, 0, self.nq) for h in range(self.num_heads)])

    @property
    def kinds(self) -> torch.Tensor:
        k = self._all_kinds
        return k if self.per_head else k[0]

    # -- densities ---------------------------------------------------------------------------
    @functools.cached_property
    def density(self) -> float:
        total = self.num_heads * self.lq * self.lk
        if total == 0:
            return 0.0
        kept = self._kept if self._kept is not None else _count_kept(self)
        return kept / total

    @functools.cached_property
    def block_density(self) -> float:
        tiles = self.num_heads * self.nq * self.nk
        if tiles == 0:
            return 0.0
        visited = sum(
            int((self.kind_rows(h, i, min(i + self._row_chunk, self.nq)) != EMPTY).sum())
            for h in range(self.num_heads) for i in range(0, self.nq, self._row_chunk)
        )
        return visited / tiles

    @property
    def _row_chunk(self) -> int:
        return max(1, _CHUNK // max(1, self.nk))

    # -- CSR tables --------------------------------------------------------------------------
    @functools.cached_property
    def _forward_tables(self):
        return _csr(self, transpose=False)

    @functools.cached_property
    def _backward_tables(self):
        return _csr(self, transpose=True)

    @property
    def kv_partial_counts(self) -> torch.Tensor:
        return self._forward_tables[0][0]

    @property
    def kv_partial_indices(self) -> torch.Tensor:
        return self._forward_tables[0][1]

    @property
    def kv_full_counts(self) -> torch.Tensor:
        return self._forward_tables[1][0]

    @property
    def kv_full_indices(self) -> torch.Tensor:
        return self._forward_tables[1][1]

    @property
    def q_partial_counts(self) -> torch.Tensor:
        return self._backward_tables[0][0]

    @property
    def q_partial_indices(self) -> torch.Tensor:
        return self._backward_tables[0][1]

    @property
    def q_full_counts(self) -> torch.Tensor:
        return self._backward_tables[1][0]

    @property
    def q_full_indices(self) -> torch.Tensor:
        return self._backward_tables[1][1]

    def __repr__(self) -> str:
        return (
            f"Layout(lq={self.lq}, lk={self.lk}, block_m={self.block_m}, "
            f"block_n={self.block_n}, num_heads={self.num_heads}, "
            f"is_interval={self.is_interval})"
        )


def build_layout(pattern: Pattern, lq: int, lk: int, block_m: int, block_n: int) -> Layout:
    """The exact :class:`Layout` of a static ``pattern`` (see the module docstring)."""
    for name, v, low in (("lq", lq, 0), ("lk", lk, 0), ("block_m", block_m, 1),
                         ("block_n", block_n, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise PatternError(f"layout: {name} must be an integer >= {low}, got {v!r}")
    if pattern.is_dynamic:
        raise PatternError(
            f"'{pattern}' is dynamic (dma/topk): its blocks depend on the data, so it has no "
            "static layout"
        )
    n = pattern.num_heads
    heads = [pattern.for_head(h) for h in range(n)]
    intervals = [p.interval() for p in heads]
    common = dict(lq=lq, lk=lk, block_m=block_m, block_n=block_n, num_heads=n,
                  per_head=pattern.per_head, _pattern=pattern)
    if all(iv is not None for iv in intervals):
        per_head = [_interval_bounds(iv, lq, lk, block_m, block_n) for iv in intervals]
        if all(b is not None for b in per_head):
            stacked = [torch.stack([b[f] for b in per_head]) for f in range(4)]
            gaps = {(h, i): row for h, b in enumerate(per_head) for i, row in b[4].items()}
            return Layout(
                is_interval=True, kv_start=stacked[0], kv_end=stacked[1],
                kv_full_start=stacked[2], kv_full_end=stacked[3], _gap_rows=gaps,
                _kept=sum(b[5] for b in per_head), **common,
            )
    kinds = torch.stack([_tile_kinds(p, lq, lk, block_m, block_n) for p in heads])
    return Layout(is_interval=False, _kinds=kinds, **common)


def _interval_bounds(iv, lq: int, lk: int, bm: int, bn: int):
    """Per q-block loop bounds from per-row interval bounds (one int64 pass over the rows).

    Returns (kv_start, kv_end, full_start, full_end, gap_rows, kept) or None when the bounds
    are not monotone (then the tile analysis takes over).
    """
    nq, nk = _cdiv(lq, bm), _cdiv(lk, bn)
    q = torch.arange(lk - lq, lk, dtype=torch.int64)
    lo = torch.as_tensor(evaluate_expr(iv[0], {Q: q}), dtype=torch.int64).expand(lq)
    hi = torch.as_tensor(evaluate_expr(iv[1], {Q: q}), dtype=torch.int64).expand(lq)
    lo = lo.clamp(min=0)
    hi = hi.clamp(max=lk - 1)
    nonempty = lo <= hi
    kept = int(torch.where(nonempty, hi - lo + 1, 0).sum()) if lq else 0
    if lq > 1:
        lo_ne = lo[nonempty]
        if bool((lo_ne[1:] < lo_ne[:-1]).any()):
            return None
    pad = nq * bm - lq
    big = INT_INF
    lo_p = torch.nn.functional.pad(lo, (0, pad), value=big).view(nq, bm)
    hi_p = torch.nn.functional.pad(hi, (0, pad), value=-1).view(nq, bm)
    ne = torch.nn.functional.pad(nonempty, (0, pad), value=False).view(nq, bm)
    real = torch.nn.functional.pad(torch.ones(lq, dtype=torch.bool), (0, pad)).view(nq, bm)
    jlo, jhi = lo_p // bn, hi_p // bn
    any_row = ne.any(1)
    start = torch.where(ne, jlo, big).amin(1)
    end = torch.where(ne, jhi, -1).amax(1) + 1
    start = torch.where(any_row, start, 0)
    end = torch.where(any_row, end, 0)
    # FULL k-blocks of a row: those inside [lo, hi]; the ragged last block counts when hi == lk-1.
    f0 = (lo_p + bn - 1) // bn
    f1 = torch.where(hi_p == lk - 1, nk, (hi_p + 1) // bn)
    f0 = torch.where(real, torch.where(ne, f0, nk), 0)
    f1 = torch.where(real, torch.where(ne, f1, 0), nk)
    fs, fe = f0.amax(1), f1.amin(1)
    fe = torch.maximum(fe, fs)
    # Rows are sorted by lo, so a q-block's visited k-blocks are one range unless a row starts
    # past everything seen before it in the block.
    seen = torch.cummax(torch.where(ne, jhi, -1), 1).values
    gap = ne[:, 1:] & (seen[:, :-1] >= 0) & (jlo[:, 1:] > seen[:, :-1] + 1)
    gap_rows = {}
    for i in gap.any(1).nonzero().flatten().tolist():
        row = torch.zeros(nk, dtype=torch.uint8)
        for a, b in zip(jlo[i][ne[i]].tolist(), jhi[i][ne[i]].tolist(), strict=True):
            row[a:b + 1] = PARTIAL
        row[int(fs[i]):int(fe[i])] = FULL
        gap_rows[i] = row
    i32 = torch.int32
    return start.to(i32), end.to(i32), fs.to(i32), fe.to(i32), gap_rows, kept


def _tiles(lq: int, lk: int, bm: int, bn: int, i0: int, i1: int) -> Tiles:
    off = lk - lq
    i = torch.arange(i0, i1, dtype=torch.int64)[:, None]
    j = torch.arange(_cdiv(lk, bn), dtype=torch.int64)[None, :]
    return Tiles(
        q0=i * bm + off, q1=torch.clamp((i + 1) * bm, max=lq) - 1 + off,
        k0=j * bn, k1=torch.clamp((j + 1) * bn, max=lk) - 1,
    )


def _tile_kinds(p: Pattern, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Exact kinds ``[nq, nk]`` of a head-resolved pattern, a chunk of q-blocks at a time."""
    nq, nk = _cdiv(lq, bm), _cdiv(lk, bn)
    kinds = torch.empty((nq, nk), dtype=torch.uint8)
    if nq == 0 or nk == 0:
        return kinds
    step = max(1, _CHUNK // nk)
    toeplitz = is_toeplitz(p)
    if toeplitz:
        step = nq  # one prefix sum over all diagonals serves every chunk: do it once
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        t = _tiles(lq, lk, bm, bn, i0, i1)
        kinds[i0:i1] = resolve_tiles(p, t, classify(p, t), bm, bn)
    return kinds


def _count_kept(layout: Layout) -> int:
    """Exact kept entries of a non-interval layout: FULL tiles by area, PARTIAL tiles by
    evaluation, bounded memory."""
    p = layout._pattern
    total = 0
    bm, bn = layout.block_m, layout.block_n
    for h in range(layout.num_heads):
        ph = p.for_head(h)
        kinds = layout.kind_rows(h, 0, layout.nq)
        t = _tiles(layout.lq, layout.lk, bm, bn, 0, layout.nq)
        area = (t.q1 - t.q0 + 1) * (t.k1 - t.k0 + 1)
        total += int(area[kinds == FULL].sum())
        if is_toeplitz(ph):
            total += _toeplitz_partial_count(ph, t, kinds)
            continue
        i, j = (kinds == PARTIAL).nonzero().unbind(1)
        per_batch = max(1, _CHUNK // (bm * bn))
        rm, rn = torch.arange(bm), torch.arange(bn)
        for s in range(0, i.numel(), per_batch):
            ii, jj = i[s:s + per_batch], j[s:s + per_batch]
            qpos = t.q0[ii, 0, None] + rm
            kpos = t.k0[0, jj, None] + rn
            valid = (qpos <= t.q1[ii, 0, None])[:, :, None] & (kpos <= t.k1[0, jj, None])[:, None]
            total += int((ph.evaluate(qpos[:, :, None], kpos[:, None, :]) & valid).sum())
    return total


def _toeplitz_partial_count(p: Pattern, t: Tiles, kinds: torch.Tensor) -> int:
    """Kept entries in PARTIAL tiles of a pattern that depends on d = q - k only: each tile
    holds, for every d, the number of its rows q with q - d inside its key range."""
    total = 0
    i, j = (kinds == PARTIAL).nonzero().unbind(1)
    for s in range(0, i.numel(), 4096):
        ii, jj = i[s:s + 4096], j[s:s + 4096]
        q0, q1 = t.q0[ii, 0], t.q1[ii, 0]
        k0, k1 = t.k0[0, jj], t.k1[0, jj]
        d_lo, d_hi = int((q0 - k1).min()), int((q1 - k0).max())
        d = torch.arange(d_lo, d_hi + 1)
        kept = p.evaluate(d, torch.zeros((), dtype=torch.int64))
        dd = d[kept][None, :]
        mult = (torch.minimum(q1[:, None], dd + k1[:, None])
                - torch.maximum(q0[:, None], dd + k0[:, None]) + 1).clamp(min=0)
        total += int(mult.sum())
    return total


def _csr(layout: Layout, transpose: bool):
    """((partial_counts, partial_indices), (full_counts, full_indices)) int32, head dim first."""
    n, nq, nk = layout.num_heads, layout.nq, layout.nk
    rows = nk if transpose else nq
    kinds_all = layout._all_kinds if transpose else None
    out = []
    for kind in (PARTIAL, FULL):
        counts = torch.zeros((n, rows), dtype=torch.int32)
        chunks = []
        for h in range(n):
            if transpose:
                chunks.append(kinds_all[h].t() == kind)
                counts[h] = chunks[-1].sum(1, dtype=torch.int32)
            else:
                for i in range(0, nq, layout._row_chunk):
                    i1 = min(nq, i + layout._row_chunk)
                    counts[h, i:i1] = (layout.kind_rows(h, i, i1) == kind).sum(1, dtype=torch.int32)
        width = max(1, int(counts.max()) if counts.numel() else 1)
        indices = torch.zeros((n, rows, width), dtype=torch.int32)
        for h in range(n):
            step = layout._row_chunk if not transpose else max(1, _CHUNK // max(1, nq))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                m = chunks[h][r0:r1] if transpose else layout.kind_rows(h, r0, r1) == kind
                r, c = m.nonzero().unbind(1)
                if r.numel() == 0:
                    continue
                first = torch.cumsum(m.sum(1), 0) - m.sum(1)
                pos = torch.arange(r.numel()) - first[r]
                indices[h, r0 + r, pos] = c.to(torch.int32)
        out.append((counts, indices))
    return out[0], out[1]
