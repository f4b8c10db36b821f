"""Relative-position bias tables (T5 / Swin style): the one definition every path shares.

A table ``[Hq or 1, Lq + Lk - 1]`` (``[1, ...]`` or ``[Lq + Lk - 1]``: one row for every head)
adds to the logits of query head ``h`` at query position ``p`` and key position ``j``

    table[h, clamp(p - j + Lq - 1, 0, Lq + Lk - 2)]

at the positions the op defines (sparse_compile.positions). In the default alignment (query
row ``i`` at ``i + Lk - Lq``, key ``j`` at ``j``) the index is ``i - j + Lk - 1``: entry 0 is
the first query row against the last key, the last entry the last row against the first key,
every entry is reached and none is clamped. Inside packed documents (``Lq = Lk = L``) the index
is ``i - j + L - 1`` too (both positions count from the document's first token). With
``q_start`` / ``k_start`` the differences can leave the table: they are clamped to its ends
(the nearest entry, as T5 buckets every far distance into its last bucket). The table is
differentiable: its gradient is the sum of dS over every (query, key) whose index it is.
"""

from __future__ import annotations

import torch


def table_length(lq: int, lk: int) -> int:
    """Entries of a relative-bias table for ``Lq`` queries and ``Lk`` keys."""
    return lq + lk - 1


def relative_index(q_pos: torch.Tensor, k_pos: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """Table index of each (query position, key position) pair (broadcast), int64."""
    return (q_pos - k_pos + (lq - 1)).clamp(0, lq + lk - 2).to(torch.int64)


def check_table(rel_bias: torch.Tensor, hq: int, lq: int, lk: int) -> torch.Tensor:
    """``rel_bias`` as ``[Hq or 1, Lq + Lk - 1]`` (a view, still differentiable); raises
    ``ValueError`` for anything else."""
    if not isinstance(rel_bias, torch.Tensor) or not rel_bias.is_floating_point():
        raise ValueError(f"rel_bias must be a float tensor [Hq or 1, Lq + Lk - 1], got "
                         f"{rel_bias!r}")
    n = table_length(lq, lk)
    table = rel_bias.reshape(1, -1) if rel_bias.dim() == 1 else rel_bias
    if table.dim() != 2 or table.shape[-1] != n or table.shape[0] not in (1, hq):
        raise ValueError(f"rel_bias has shape {tuple(rel_bias.shape)}; expected [{hq} or 1, "
                         f"{n}] (Hq, Lq + Lk - 1 for Lq={lq}, Lk={lk})")
    return table
