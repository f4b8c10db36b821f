"""Layout block tables on the device, cached per (pattern, Lq, Lk, tile, device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BlockTables:
    """CSR block lists for one direction of one layout.

    partial_counts, full_counts: int32 [n, rows]; partial_indices, full_indices: int32
    [n, rows, W] (same W for both, so one pair of strides addresses either).
    rows are query blocks (kv tables) or key blocks (transposed q tables).
    """

    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    full_counts: torch.Tensor
    full_indices: torch.Tensor


_CACHE: dict[tuple, tuple[BlockTables, BlockTables]] = {}
_LAYOUTS: dict[tuple, Any] = {}


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _tables(pc, pi, fc, fi, device: torch.device) -> BlockTables:
    width = max(pi.shape[-1], fi.shape[-1], 1)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.int32).contiguous()

    return BlockTables(dev(pc), dev(_pad(pi, width)), dev(fc), dev(_pad(fi, width)))


def layout_for(pattern: Any, lq: int, lk: int, block_m: int, block_n: int) -> Any:
    """The pattern's Layout for these sizes (cached)."""
    key = (str(pattern), lq, lk, block_m, block_n)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = pattern.layout(lq, lk, block_m=block_m, block_n=block_n)
    return _LAYOUTS[key]


def block_tables(
    pattern: Any, lq: int, lk: int, block_m: int, block_n: int, device: torch.device
) -> tuple[BlockTables, BlockTables]:
    """(kv tables per query block, q tables per key block) of the layout, on ``device``."""
    key = (str(pattern), lq, lk, block_m, block_n, str(device))
    hit = _CACHE.get(key)
    if hit is None:
        lay = layout_for(pattern, lq, lk, block_m, block_n)
        kv = _tables(lay.kv_partial_counts, lay.kv_partial_indices,
                     lay.kv_full_counts, lay.kv_full_indices, device)
        qt = _tables(lay.q_partial_counts, lay.q_partial_indices,
                     lay.q_full_counts, lay.q_full_indices, device)
        hit = (kv, qt)
        _CACHE[key] = hit
    return hit
