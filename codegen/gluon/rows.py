"""Per-row key intervals ``[lo, hi]`` of an interval pattern, as the Gluon kernels read them.

The Gluon kernels are pattern-agnostic: instead of inlining the pattern's closed-form bounds
(what the ``tl`` kernels generate per pattern), they read each query row's kept keys from two
int32 arrays ``[pattern heads, Lq]``, O(Lq) data built once per (pattern, Lq, Lk, device) from
the same interval analysis (``patterns/intervals.py``). From them a program derives the key
blocks it visits and which of those are FULL (no mask arithmetic) itself. Patterns whose rows
are not one interval (block tables, residue and strided-union routes) are not served here.
"""

from __future__ import annotations

from typing import Any

import torch
from sparse_compile.codegen.launch.tables import RowBounds, row_bounds
from sparse_compile.codegen.tl.predicate import interval_bounds
from sparse_compile.patterns.intervals import row_bounds as interval_row_bounds

_ROWS: dict[tuple, RowBounds | None] = {}


def interval_rows(pattern: Any, lq: int, lk: int, device: torch.device) -> RowBounds | None:
    """Row bounds ``[lo, hi]`` (int32 ``[pattern heads, Lq]``, clamped to ``[0, Lk - 1]``; an
    empty row has ``lo > hi``) of a pattern whose rows are one interval at these lengths, for
    the default alignment (query ``i`` at key position ``i + Lk - Lq``); None otherwise.
    Cached."""
    key = (str(pattern), lq, lk, str(device))
    if key in _ROWS:
        return _ROWS[key]
    result = None
    if lq > 0 and lk > 0:
        bounds = interval_bounds(pattern)
        if bounds is not None:
            q = torch.arange(lk - lq, lk, dtype=torch.int64)
            with torch.device("cpu"):
                pairs = [interval_row_bounds(iv, q, lk) for iv in bounds]
            lo = torch.stack([p[0] for p in pairs]).to(device=device, dtype=torch.int32)
            hi = torch.stack([p[1] for p in pairs]).to(device=device, dtype=torch.int32)
            result = RowBounds(lo.contiguous(), hi.contiguous())
        else:
            result = row_bounds(pattern, lq, lk, device)
    _ROWS[key] = result
    return result
