"""Exact block layouts: which (q-block, k-block) tiles are EMPTY, PARTIAL or FULL.

Routes, tried in this order, all exact and none building an ``lq x lk`` tensor (see each module):

* interval patterns -> ``intervals.py``: per q-block loop bounds in closed form, O(nq);
* unions of interval patterns whose rows stay single intervals at the given lengths
  (prefix-LM ``causal | prefix(n)``, ``sliding(w) | sink(n)``) -> the same bounds computed from
  the rows numerically, O(lq);
* patterns of ``q - k`` only -> ``diagonals.py``: one classification per tile diagonal,
  O(nq + nk), the ragged last row and column classified tile by tile;
* every other composition of built-in primitives (axial, sink/global/block with q - k
  patterns, negations, ...) -> ``split.py``: the pattern's ``q - k`` background, layers of
  tiles where it equals another q - k pattern, and the few exception tiles classified exactly;
* compositions with no split (an opaque custom predicate) but known candidate ranges (``&``
  with an interval or global side) -> ``candidates.py``: only tiles inside the candidate ranges
  are classified;
* patterns with an opaque custom predicate -> ``blocks.py``: per-tile analysis, a bounded chunk
  of q-blocks at a time, with tile-by-tile evaluation only where the analysis cannot decide.

The diagonal, split and candidates routes build no ``nq x nk`` grid: their compact tables
(``tables.Csr``) are listed straight from the background's sorted diagonals with the
classified tiles overlaid (``overlay.py``), O(listed blocks + classified tiles), each direction
on first access. ``kinds``, densities and tables a route does not produce directly are derived
on first access and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .blocks import Tiles, classify, is_toeplitz, kept_in_tiles, resolve_tiles
from .candidates import candidate_overrides, candidate_ranges
from .diagonals import toeplitz_overrides
from .errors import PatternError
from .intervals import interval_bounds, kept_entries, union_rows
from .nodes import And, Or, Pattern
from .overlay import overlay_tables
from .split import split_kept, split_overrides, split_pattern
from .tables import CHUNK, Csr, kind_rows_tables, ranges_rows, stack_heads, transpose

EMPTY, PARTIAL, FULL = 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _on_cpu(fn):
    """Run ``fn`` with CPU as the default device: layouts are CPU data whatever the caller's
    default device (``torch.set_default_device``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True, eq=False)
class Layout:
    """Block structure of a static pattern for ``lq`` queries, ``lk`` keys and
    ``block_m x block_n`` tiles; ``n = num_heads`` (1 unless per-head), ``nq = cdiv(lq,
    block_m)``, ``nk = cdiv(lk, block_n)``. Row ``i`` of a q-block holds query ``i`` at absolute
    position ``i + lk - lq``. Head ``h`` of a model uses layout head ``h % n``.

    Computed when the layout is built:
        is_interval: rows are single intervals; the kernels then need no tables, and
        kv_start, kv_end: int32 ``[n, nq]``: k-blocks ``[kv_start, kv_end)`` hold every kept
            entry of the q-block (None unless ``is_interval``);
        kv_full_start, kv_full_end: int32 ``[n, nq]``: the FULL k-blocks are exactly
            ``[kv_full_start, kv_full_end)`` (an empty range when start == end).
            (Rarely, an interval q-block visits k-blocks with EMPTY ones between them; the
            tables and ``kinds`` say so exactly, the range is then a superset.)
    Computed on first access, then cached:
        kinds: uint8 ``[nq, nk]`` (``[n, nq, nk]`` when per-head): 0 EMPTY, 1 PARTIAL, 2 FULL.
        density: kept fraction of the ``n * lq * lk`` entries; block_density: visited
            (non-EMPTY) fraction of the ``n * nq * nk`` tiles.
        Compact block tables (``tables.Csr``: offsets ``[n, rows + 1]`` into one flat int32
        index array, memory proportional to the listed blocks), CPU tensors:
            kv_partial, kv_full: per q-block, the PARTIAL / FULL k-blocks, ascending;
            q_partial, q_full: the transpose (per k-block, the q-blocks; for dK/dV).
        The same in padded form, for inspecting small layouts (a padded table is as wide as
        its longest row; built from the compact one on first access):
            kv_partial_counts, kv_full_counts int32 ``[n, nq]``, kv_partial_indices,
            kv_full_indices int32 ``[n, nq, max(1, max count)]`` (padding 0), and
            q_partial_counts, ... ``[n, nk]``, ``[n, nk, max(1, max count)]``.
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
    _source: object = field(default=None, repr=False)

    @property
    def nq(self) -> int:
        return _cdiv(self.lq, self.block_m)

    @property
    def nk(self) -> int:
        return _cdiv(self.lk, self.block_n)

    @_on_cpu
    def kind_rows(self, head: int, i0: int, i1: int) -> torch.Tensor:
        """Kinds of q-blocks ``[i0, i1)`` for layout head ``head``: uint8 ``[i1 - i0, nk]``."""
        return self._source.kind_rows(self, head, i0, i1)

    @functools.cached_property
    @_on_cpu
    def _all_kinds(self) -> torch.Tensor:
        return torch.stack([self.kind_rows(h, 0, self.nq) for h in range(self.num_heads)])

    @property
    def kinds(self) -> torch.Tensor:
        return self._all_kinds if self.per_head else self._all_kinds[0]

    @functools.cached_property
    @_on_cpu
    def density(self) -> float:
        total = self.num_heads * self.lq * self.lk
        return self._source.kept(self) / total if total else 0.0

    @functools.cached_property
    @_on_cpu
    def block_density(self) -> float:
        tiles = self.num_heads * self.nq * self.nk
        visited = self.kv_partial.entries + self.kv_full.entries
        return visited / tiles if tiles else 0.0

    @functools.cached_property
    @_on_cpu
    def _forward(self) -> tuple[Csr, Csr]:
        return self._source.forward(self)

    @functools.cached_property
    @_on_cpu
    def _backward(self) -> tuple[Csr, Csr]:
        return self._source.backward(self)

    kv_partial = property(lambda self: self._forward[0])
    kv_full = property(lambda self: self._forward[1])
    q_partial = property(lambda self: self._backward[0])
    q_full = property(lambda self: self._backward[1])

    @functools.cached_property
    @_on_cpu
    def _padded(self):
        return tuple(t.padded() for t in (*self._forward, *self._backward))

    kv_partial_counts = property(lambda self: self._padded[0][0])
    kv_partial_indices = property(lambda self: self._padded[0][1])
    kv_full_counts = property(lambda self: self._padded[1][0])
    kv_full_indices = property(lambda self: self._padded[1][1])
    q_partial_counts = property(lambda self: self._padded[2][0])
    q_partial_indices = property(lambda self: self._padded[2][1])
    q_full_counts = property(lambda self: self._padded[3][0])
    q_full_indices = property(lambda self: self._padded[3][1])

    def __repr__(self) -> str:
        return (
            f"Layout(lq={self.lq}, lk={self.lk}, block_m={self.block_m}, "
            f"block_n={self.block_n}, num_heads={self.num_heads}, "
            f"is_interval={self.is_interval})"
        )


def build_layout(pattern: Pattern, lq: int, lk: int, block_m: int, block_n: int) -> Layout:
    """The exact :class:`Layout` of a static ``pattern`` (see the module docstring).

    Cached per (pattern, lq, lk, block_m, block_n): a model calls it with the same shapes on
    every step, and layouts are immutable. Sizes must be Python ints (not symbolic sizes).
    """
    for name, v, low in (("lq", lq, 0), ("lk", lk, 0), ("block_m", block_m, 1),
                         ("block_n", block_n, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise PatternError(f"layout: {name} must be an integer >= {low}, got {v!r}")
    # Layouts are CPU data whatever the caller's default device (torch.set_default_device).
    with torch.device("cpu"):
        return _build(pattern, int(lq), int(lk), int(block_m), int(block_n))


@functools.lru_cache(maxsize=32)
def _build(pattern: Pattern, lq: int, lk: int, block_m: int, block_n: int) -> Layout:
    if pattern.is_dynamic:
        raise PatternError(
            f"'{pattern}' is dynamic (dma/topk): its blocks depend on the data, so it has no "
            "static layout"
        )
    n = pattern.num_heads
    heads = [pattern.for_head(h) for h in range(n)]
    common = dict(lq=lq, lk=lk, block_m=block_m, block_n=block_n, num_heads=n,
                  per_head=pattern.per_head)
    if lq == 0 or lk == 0:
        kinds = torch.zeros((n, _cdiv(lq, block_m), _cdiv(lk, block_n)), dtype=torch.uint8)
        return Layout(is_interval=False, _source=_KindsSource(heads, kinds), **common)
    intervals = [p.interval() for p in heads]
    if all(iv is not None for iv in intervals):
        bounds = [interval_bounds(iv, lq, lk, block_m, block_n) for iv in intervals]
        i32 = torch.int32
        return Layout(
            is_interval=True,
            kv_start=torch.stack([b.start for b in bounds]).to(i32),
            kv_end=torch.stack([b.end for b in bounds]).to(i32),
            kv_full_start=torch.stack([b.full_start for b in bounds]).to(i32),
            kv_full_end=torch.stack([b.full_end for b in bounds]).to(i32),
            _source=_IntervalSource(intervals, bounds), **common,
        )
    unions = [_interval_union(p, lq, lk) for p in heads]
    if all(u is not None for u in unions):
        bounds = [interval_bounds(u, lq, lk, block_m, block_n) for u in unions]
        return Layout(is_interval=False, _source=_IntervalSource(unions, bounds, "interval union"),
                      **common)
    if all(is_toeplitz(p) for p in heads):
        return Layout(is_interval=False, _source=_OverlaySource(
            heads, "diagonal", lambda h: toeplitz_overrides(heads[h], lq, lk, block_m, block_n)),
            **common)
    splits = [split_pattern(p, lq, lk, block_m, block_n) for p in heads]
    if all(s is not None for s in splits):
        return Layout(is_interval=False, _source=_OverlaySource(
            heads, "split",
            lambda h: split_overrides(heads[h], splits[h], lq, lk, block_m, block_n), splits),
            **common)
    ranges = [candidate_ranges(p, lq, lk, block_m, block_n) for p in heads]
    nq, nk = _cdiv(lq, block_m), _cdiv(lk, block_n)
    if all(r is not None and int((r[1] - r[0]).clamp(min=0).sum()) <= nq * nk // 2
           for r in ranges):
        return Layout(is_interval=False, _source=_OverlaySource(
            heads, "candidates",
            lambda h: candidate_overrides(heads[h], lq, lk, block_m, block_n, ranges[h])),
            **common)
    kinds = _stack([_tile_kinds(p, lq, lk, block_m, block_n) for p in heads])
    return Layout(is_interval=False, _source=_KindsSource(heads, kinds), **common)


def _stack(per_head: list[torch.Tensor]) -> torch.Tensor:
    """``[n, nq, nk]`` kinds; one head is a view (no copy of a possibly large grid)."""
    return per_head[0][None] if len(per_head) == 1 else torch.stack(per_head)


def _chain_leaves(p: Pattern, operator: type) -> list[Pattern]:
    """The operands of a chain of one binary ``operator`` node type, left to right."""
    leaves, stack = [], [p]
    while stack:
        node = stack.pop()
        if isinstance(node, operator):
            stack += [node.right, node.left]
        else:
            leaves.append(node)
    return leaves


def union_leaves(p: Pattern) -> list[Pattern]:
    """The operands of a chain of ``|`` (``p`` itself when it is no union), left to right."""
    return _chain_leaves(p, Or)


def intersection_leaves(p: Pattern) -> list[Pattern]:
    """The operands of a chain of ``&`` (``p`` itself when it is no intersection)."""
    return _chain_leaves(p, And)


def _interval_union(p: Pattern, lq: int, lk: int):
    """Row bounds of a union of interval patterns when, at these lengths, every row is one
    interval (e.g. prefix-LM ``causal | prefix(n)``, ``sliding(w) | sink(n)``); else None.
    Not ``is_interval``: the rows are one interval only for these lengths, with no closed form."""
    leaves = union_leaves(p)
    if len(leaves) < 2:
        return None
    ivs = [leaf.interval() for leaf in leaves]
    if any(iv is None for iv in ivs):
        return None
    return union_rows(ivs, lq, lk)


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
    step = max(1, CHUNK // nk)
    # Diagonal prefix sums sized for the whole grid, shared by all chunks.
    everything = Tiles(q0=torch.tensor([[lk - lq]]), q1=torch.tensor([[lk - 1]]),
                       k0=torch.tensor([[0]]), k1=torch.tensor([[lk - 1]]))
    prefixes: dict = {}
    classify(p, everything, prefixes)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        t = _tiles(lq, lk, bm, bn, i0, i1)
        kinds[i0:i1] = resolve_tiles(p, t, classify(p, t, prefixes), bm, bn)
    return kinds


def _transposed_tables(layout: Layout) -> tuple[Csr, Csr]:
    return tuple(transpose(t, layout.nk) for t in layout._forward)


def _tables_from_rows(layout: Layout) -> tuple[Csr, Csr]:
    per_head = [kind_rows_tables(layout.kind_rows, h, layout.nq, layout.nk)
                for h in range(layout.num_heads)]
    return tuple(stack_heads([t[k] for t in per_head]) for k in (0, 1))


def _kinds_from_tables(layout: Layout, head: int, i0: int, i1: int) -> torch.Tensor:
    rows = torch.zeros((i1 - i0, layout.nk), dtype=torch.uint8)
    for kind, table in zip((PARTIAL, FULL), layout._forward, strict=True):
        r, c = table.row_ids(head, i0, i1)
        rows[r - i0, c] = kind
    return rows


class _IntervalSource:
    """Kinds and tables derived from per q-block bounds."""

    def __init__(self, intervals, bounds, route: str = "interval"):
        self.intervals, self.bounds, self.route = intervals, bounds, route

    def kind_rows(self, layout, head, i0, i1):
        b = self.bounds[head]
        j = torch.arange(layout.nk, dtype=torch.int64)
        start, end = b.start[i0:i1, None], b.end[i0:i1, None]
        fs, fe = b.full_start[i0:i1, None], b.full_end[i0:i1, None]
        rows = torch.where((j >= fs) & (j < fe), FULL,
                           torch.where((j >= start) & (j < end), PARTIAL, EMPTY)).to(torch.uint8)
        for i, row in b.gap_rows.items():
            if i0 <= i < i1:
                rows[i - i0] = row
        return rows

    def forward(self, layout):
        if any(b.gap_rows for b in self.bounds):
            return _tables_from_rows(layout)
        return _range_tables([(b.start, b.end, b.full_start, b.full_end) for b in self.bounds])

    def backward(self, layout):
        """Transposed tables from the bounds when they are monotone over q-blocks (then the
        q-blocks visiting a k-block form one range), else by transposing the forward tables."""
        per_head = []
        j = torch.arange(layout.nk, dtype=torch.int64)
        for b in self.bounds:
            fields = (b.start, b.end, b.full_start, b.full_end)
            if b.gap_rows or any(bool((f[1:] < f[:-1]).any()) for f in fields):
                return _transposed_tables(layout)
            first = torch.searchsorted(b.end, j, right=True)  # first q-block with end > j
            stop = torch.searchsorted(b.start, j, right=True)  # q-blocks with start <= j
            f_first = torch.searchsorted(b.full_end, j, right=True)
            f_stop = torch.maximum(torch.searchsorted(b.full_start, j, right=True), f_first)
            per_head.append((first, stop, f_first, f_stop))
        return _range_tables(per_head)

    def kept(self, layout):
        return sum(kept_entries(iv, layout.lq, layout.lk) for iv in self.intervals)


def _range_tables(per_head) -> tuple[Csr, Csr]:
    """(PARTIAL, FULL) tables of rows visiting ``[start, end)`` whose FULL blocks are ``[fs,
    fe)`` (inside it, or empty), per head ``(start, end, fs, fe)`` int ``[rows]``."""
    partial, full = [], []
    for start, end, fs, fe in per_head:
        start, end, fs, fe = (x.to(torch.int64) for x in (start, end, fs, fe))
        has_full = fe > fs
        left_end = torch.where(has_full, fs, end)
        right_start = torch.where(has_full, fe, end)
        partial.append(ranges_rows(torch.stack([start, right_start], 1),
                                   torch.stack([left_end, end], 1)))
        full.append(ranges_rows(fs[:, None], fe[:, None]))
    return stack_heads(partial), stack_heads(full)


class _OverlaySource:
    """Tables listed straight from a q - k background and exactly classified override tiles
    (``overlay.py``; routes "diagonal", "candidates", "split"), one direction at a time; kinds
    scattered from the forward tables on demand."""

    def __init__(self, heads, route: str, overrides, splits=None):
        self.heads, self.route, self.splits = heads, route, splits
        self._overrides, self._cache = overrides, {}

    def overrides(self, head: int):
        if head not in self._cache:
            self._cache[head] = self._overrides(head)
        return self._cache[head]

    def _tables(self, layout, side: str) -> tuple[Csr, Csr]:
        sizes = (layout.lq, layout.lk, layout.block_m, layout.block_n)
        per_head = [overlay_tables(self.overrides(h), *sizes, side)
                    for h in range(layout.num_heads)]
        return tuple(stack_heads([t[k] for t in per_head]) for k in (0, 1))

    def kind_rows(self, layout, head, i0, i1):
        return _kinds_from_tables(layout, head, i0, i1)

    def forward(self, layout):
        return self._tables(layout, "kv")

    def backward(self, layout):
        return self._tables(layout, "q")

    def kept(self, layout):
        sizes = (layout.lq, layout.lk, layout.block_m, layout.block_n)
        if self.route == "diagonal":
            return sum(_toeplitz_kept(p, layout.lq, layout.lk) for p in self.heads)
        if self.route == "split":
            return sum(split_kept(p, s, *sizes)
                       for p, s in zip(self.heads, self.splits, strict=True))
        total = 0
        for h, p in enumerate(self.heads):
            for kind, table in zip((PARTIAL, FULL), layout._forward, strict=True):
                i, j = table.row_ids(h, 0, layout.nq)
                total += kept_in_tiles(p, *sizes, i, j, torch.full_like(i, kind, dtype=torch.uint8))
        return total


def _toeplitz_kept(p: Pattern, lq: int, lk: int) -> int:
    """Kept entries of a pattern of ``d = q - k``: sum over d of keep(d) times the number of
    rows ``q`` in ``[lk - lq, lk - 1]`` whose key ``q - d`` lies in ``[0, lk - 1]``."""
    qa, qb = lk - lq, lk - 1
    total = 0
    for d0 in range(qa - (lk - 1), qb + 1, 1 << 22):
        d = torch.arange(d0, min(qb + 1, d0 + (1 << 22)), dtype=torch.int64)
        keep = p.evaluate(d, torch.zeros((), dtype=torch.int64))
        rows = (torch.minimum(torch.full_like(d, qb), d + lk - 1)
                - torch.maximum(torch.full_like(d, qa), d) + 1).clamp(min=0)
        total += int(rows[keep].sum())
    return total


class _KindsSource:
    """Kinds computed and stored (route "tiles": per-tile analysis of every tile, for opaque
    custom predicates; empty sequences); tables and densities derived from them."""

    def __init__(self, heads, kinds, route: str = "tiles"):
        self.heads, self.kinds, self.route = heads, kinds, route

    def kind_rows(self, layout, head, i0, i1):
        return self.kinds[head, i0:i1]

    def forward(self, layout):
        return _tables_from_rows(layout)

    def backward(self, layout):
        # Listing the transposed kinds row by row is cheaper than sorting the forward tables'
        # entries (no argsort over every listed tile).
        columns = _Transposed(self.kinds)
        per_head = [kind_rows_tables(columns.rows, h, layout.nk, layout.nq)
                    for h in range(layout.num_heads)]
        return tuple(stack_heads([t[k] for t in per_head]) for k in (0, 1))

    def kept(self, layout):
        return sum(_count_kept(p, self.kinds[h], layout) for h, p in enumerate(self.heads))


class _Transposed:
    """Rows of the transposed kinds ``[n, nk, nq]``, one head's contiguous copy at a time."""

    def __init__(self, kinds: torch.Tensor):
        self.kinds, self.head, self.copy = kinds, None, None

    def rows(self, head: int, j0: int, j1: int) -> torch.Tensor:
        if head != self.head:
            self.head, self.copy = head, None  # drop the previous copy before making the next
            self.copy = self.kinds[head].t().contiguous()
        return self.copy[j0:j1]


def _count_kept(p: Pattern, kinds: torch.Tensor, layout: Layout) -> int:
    """Kept entries: FULL tiles by area, PARTIAL tiles by evaluation (bounded batches)."""
    i, j = (kinds > 0).nonzero().unbind(1)
    return kept_in_tiles(p, layout.lq, layout.lk, layout.block_m, layout.block_n, i, j,
                         kinds[i, j])
