"""How the kernels find their blocks, on the device, cached per (pattern, Lq, Lk, tile, device).

Three ways (the kernels' ``RANGES`` constexpr):

* 1, closed form: interval patterns; bounds computed in-kernel, nothing to pass;
* 2, row bounds: unions of intervals that are one interval per row at these lengths
  (prefix-LM ``causal | prefix(n)``): int32 ``lo``/``hi`` arrays ``[heads, Lq]`` (O(Lq), no
  tables, monotone so the dK/dV pass binary-searches them);
* 0, block tables: compact CSR (offsets + flat indices), O(visited blocks) whatever the longest
  row, taken as the layout builds them (``Layout.kv_partial`` ..., ``q_full``); each direction
  is built when a launch first reads it (the dK/dV pass only reads the transposed tables of
  its own tile shape);
* 3, hull: where rows sit somewhere the tables were not built for (positions read on the
  device, documents: ``positions.py``), patterns without a closed form visit the hull of their
  kept keys, computed in-kernel, with the predicate on every block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sparse_compile.patterns.intervals import union_rows
from sparse_compile.patterns.layout import union_leaves

CLOSED_FORM, ROW_BOUNDS, TABLES, HULL = 1, 2, 0, 3


class BlockTables:
    """Compact CSR block lists for one direction of one layout, built on first use.

    partial_offsets, full_offsets: int32 [n, rows + 1] into partial_indices, full_indices
    (int32, flat). rows are query blocks (kv tables) or key blocks (transposed q tables).
    A launch reads one direction only (the dK/dV pass the transposed tables of its own tiles),
    so each is built when its arrays are first read.
    """

    def __init__(self, build: Callable[[], tuple[torch.Tensor, ...]]):
        self._build: Callable[[], tuple[torch.Tensor, ...]] | None = build
        self._arrays: tuple[torch.Tensor, ...] | None = None

    def _get(self) -> tuple[torch.Tensor, ...]:
        if self._arrays is None:
            self._arrays, self._build = self._build(), None
        return self._arrays

    partial_offsets = property(lambda self: self._get()[0])
    partial_indices = property(lambda self: self._get()[1])
    full_offsets = property(lambda self: self._get()[2])
    full_indices = property(lambda self: self._get()[3])

    @property
    def row_stride(self) -> int:
        return self.partial_offsets.shape[1]


@dataclass(frozen=True)
class RowBounds:
    """Per-row kept keys ``[lo, hi]`` (int32 [n, Lq], clamped to the keys, non-decreasing)."""

    lo: torch.Tensor
    hi: torch.Tensor


_CACHE: dict[tuple, tuple[BlockTables, BlockTables]] = {}
_ROWS: dict[tuple, RowBounds | None] = {}
_LAYOUTS: dict[tuple, Any] = {}


def layout_for(pattern: Any, lq: int, lk: int, block_m: int, block_n: int) -> Any:
    """The pattern's Layout for these sizes (cached)."""
    key = (str(pattern), lq, lk, block_m, block_n)
    if key not in _LAYOUTS:
        # Layouts are CPU data whatever the caller's default device (torch.set_default_device).
        with torch.device("cpu"):
            _LAYOUTS[key] = pattern.layout(lq, lk, block_m=block_m, block_n=block_n)
    return _LAYOUTS[key]


def row_bounds(pattern: Any, lq: int, lk: int, device: torch.device) -> RowBounds | None:
    """Row bounds of a union of interval patterns that stays one monotone interval per row at
    these lengths (every pattern head), else None."""
    key = (str(pattern), lq, lk, str(device))
    if key in _ROWS:
        return _ROWS[key]
    result = None
    with torch.device("cpu"):
        rows = _union_rows(pattern, lq, lk) if lq > 0 and lk > 0 else None
    if rows is not None:
        def dev(name: str) -> torch.Tensor:
            t = torch.stack([getattr(r, name) for r in rows])
            return t.to(device=device, dtype=torch.int32).contiguous()

        result = RowBounds(dev("lo"), dev("hi"))
    _ROWS[key] = result
    return result


def _union_rows(pattern: Any, lq: int, lk: int) -> list[Any] | None:
    """Per pattern head, the RowTable of a union of interval leaves, or None."""
    rows = []
    for h in range(pattern.num_heads):
        leaves = union_leaves(pattern.for_head(h))
        ivs = [leaf.interval() for leaf in leaves]
        if len(leaves) < 2 or any(iv is None for iv in ivs):
            return None
        table = union_rows(ivs, lq, lk)
        if table is None:
            return None
        rows.append(table)
    return rows


def _dev(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device=device, dtype=torch.int32).contiguous()
    # A zero-length array still needs a valid pointer.
    return t if t.numel() else torch.zeros(1, device=device, dtype=torch.int32)


def block_tables(
    pattern: Any, lq: int, lk: int, block_m: int, block_n: int, device: torch.device
) -> tuple[BlockTables, BlockTables]:
    """(kv tables per query block, q tables per key block) of the layout, on ``device``; each
    built on first use, straight from the layout's compact tables."""
    key = (str(pattern), lq, lk, block_m, block_n, str(device))
    hit = _CACHE.get(key)
    if hit is None:
        def build(transposed: bool) -> tuple[torch.Tensor, ...]:
            lay = layout_for(pattern, lq, lk, block_m, block_n)
            partial, full = ((lay.q_partial, lay.q_full) if transposed
                             else (lay.kv_partial, lay.kv_full))
            return tuple(_dev(t, device) for t in (partial.offsets, partial.indices,
                                                   full.offsets, full.indices))

        hit = (BlockTables(lambda: build(False)), BlockTables(lambda: build(True)))
        _CACHE[key] = hit
    return hit


@dataclass(frozen=True)
class Visit:
    """How one kernel launch finds its blocks: ``ranges`` (CLOSED_FORM, ROW_BOUNDS, TABLES, HULL)
    with the tables (for this kernel's tiles and direction) or row bounds it reads."""

    ranges: int
    tables: BlockTables | None = None
    rows: RowBounds | None = None


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def placeholder(device: torch.device) -> torch.Tensor:
    """One int32 placeholder per device for the pointer arguments a launch does not read
    (made once: a fresh allocation per launch costs host time on every call)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = torch.zeros(1, device=device, dtype=torch.int32)
        # One made during CUDA-graph capture lives in the graph's private pool: not kept.
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _DUMMIES[device] = t
    return t


def visit_args(visit: Visit, like: torch.Tensor) -> tuple:
    """Kernel arguments (PO, PI, FO, FI, t_rows, RLO, RHI); placeholders where unused."""
    dummy = placeholder(like.device)
    t = visit.tables
    po, pi, fo, fi, t_rows = (
        (t.partial_offsets, t.partial_indices, t.full_offsets, t.full_indices, t.row_stride)
        if t is not None else (dummy, dummy, dummy, dummy, 1))
    rlo, rhi = (visit.rows.lo, visit.rows.hi) if visit.rows is not None else (dummy, dummy)
    return po, pi, fo, fi, t_rows, rlo, rhi
