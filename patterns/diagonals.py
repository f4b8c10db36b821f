"""Layout route for patterns that depend on ``d = q - k`` only (Toeplitz patterns).

causal, window, local, sliding, strided, fanout, compositions of them and custom predicates
of ``q - k`` alone. A full-size tile ``(i, j)`` covers exactly the diagonals
``d in [v + off - (block_n - 1), v + off + block_m - 1]`` with ``v = i * block_m - j * block_n``
and ``off = lk - lq``, so its kind depends on ``v`` only: there are O((lq + lk) / gcd) distinct
values, each classified exactly by a prefix sum of ``keep(d)``. The compact tables are then
listed per row straight from the sorted ``v`` of each kind (``overlay.py``); only the ragged
last q-block row and k-block column are classified tile by tile. Nothing of size ``nq x nk`` is
built besides the tables themselves.
"""

from __future__ import annotations

import math

import torch

from .blocks import _KIND_OF_BITS, Tiles, classify
from .nodes import Pattern


def toeplitz_overrides(p: Pattern, lq: int, lk: int, bm: int, bn: int) -> tuple:
    """``overlay.Overrides`` of the head-resolved Toeplitz pattern ``p``: its kinds per ``v``
    and its ragged tiles, classified (see the module docstring)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    off = lk - lq
    v = torch.arange(-(nk - 1) * bn, (nq - 1) * bm + 1, math.gcd(bm, bn), dtype=torch.int64)
    # Classify every v through a one-column grid whose tiles have the full-size geometry.
    diag = Tiles(q0=(v + off)[:, None], q1=(v + off + bm - 1)[:, None],
                 k0=torch.zeros((1, 1), dtype=torch.int64),
                 k1=torch.full((1, 1), bn - 1, dtype=torch.int64))
    kind_v = _KIND_OF_BITS[classify(p, diag)[:, 0].to(torch.int64)]
    i, j = ragged_tiles(lq, lk, bm, bn)
    kinds = torch.zeros(0, dtype=torch.uint8)
    if i.numel():
        kinds = _KIND_OF_BITS[classify(p, grid(lq, lk, bm, bn, i, j))[:, 0].to(torch.int64)]
    return kind_v, i, j, kinds


def ragged_tiles(lq: int, lk: int, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``(i, j)`` int64 of the tiles that are not full-size (last column, last row)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    i, j = [], []
    if lk % bn:
        i.append(torch.arange(nq, dtype=torch.int64))
        j.append(torch.full((nq,), nk - 1, dtype=torch.int64))
    if lq % bm:
        cols = nk - 1 if lk % bn else nk
        i.append(torch.full((cols,), nq - 1, dtype=torch.int64))
        j.append(torch.arange(cols, dtype=torch.int64))
    if not i:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(i), torch.cat(j)


def grid(lq: int, lk: int, bm: int, bn: int, i: torch.Tensor, j: torch.Tensor) -> Tiles:
    """The listed tiles ``(i, j)`` (int64 ``[c]``) as a ``[c, 1]`` column of tiles."""
    off = lk - lq
    q1 = torch.clamp((i + 1) * bm, max=lq) - 1 + off
    return Tiles(q0=(i * bm + off)[:, None], q1=q1[:, None],
                 k0=(j * bn)[:, None], k1=(torch.clamp((j + 1) * bn, max=lk) - 1)[:, None])
