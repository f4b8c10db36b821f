"""DMA's selection for FlexAttention: per-key row ranges and a BlockMask built from them.

Causality and a key-only score make each key kept by one contiguous range of query rows
``[start(k), end(k))``: ``dma_select``'s rank threshold ``thr[row]`` is non-increasing, so the
rows that keep a key of rank ``r`` are the visible rows before the first one with ``thr < r``.
``mask_mod = (q >= start[kv]) & (q < end[kv])`` is therefore the exact DMA mask, ties included
(the ranks carry the tie rule), and the BlockMask comes straight from the ranges, without
evaluating an Lq x Lk mask: a FlexAttention baseline that runs the very same selection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparse_compile.codegen.tl.dma.select import dma_select

__all__ = ["dma_key_ranges", "dma_block_mask"]


def dma_key_ranges(
    delta: torch.Tensor, key_allowed: torch.Tensor | None, lq: int, keep: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[start, end)`` keeping each key: two int32 ``[B * Hkv, Lk]`` tensors (empty
    ranges, ``start >= end``, for keys no row keeps). delta ``[B, Hkv, Lk]``, key_allowed bool
    ``[B, Lk]`` or None; causal is bottom-right (row ``q`` sees keys ``<= q + Lk - Lq``)."""
    lk = delta.shape[-1]
    block_m = 64 if delta.is_cuda else 16  # thresholds do not depend on it
    sel = dma_select(delta.contiguous(), key_allowed, lq, keep, causal, block_m)
    keys = torch.arange(lk, device=delta.device, dtype=torch.int32)
    rank = torch.empty_like(sel.order).scatter_(-1, sel.order.long(), keys.expand_as(sel.order))
    # first row whose threshold is below the key's rank (-thr is non-decreasing)
    end = torch.searchsorted((-sel.thr).contiguous(), (-rank).contiguous(), right=True)
    first_row = (keys - (lk - lq)).clamp(min=0) if causal else torch.zeros_like(keys)
    return first_row.expand_as(rank).contiguous(), end.to(torch.int32)


def _block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of the set blocks of each row of ``blocks`` bool ``[..., nk]``, the set
    ones first in ascending order."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    return count, order.to(torch.int32)


def dma_block_mask(
    start: torch.Tensor, end: torch.Tensor, batch: int, heads: int, lq: int, block: int = 128
):
    """FlexAttention ``BlockMask`` (with its ``mask_mod``) of the ranges of ``dma_key_ranges``
    for ``heads`` query heads per batch (a multiple of the kv heads: GQA groups share ranges).
    A (query block, key block) tile is full when every key of the key block keeps every row of
    the query block, partial when some row keeps some key, absent otherwise."""
    from torch.nn.attention.flex_attention import BlockMask

    bh_kv, lk = start.shape
    group = heads // (bh_kv // batch)
    nq, nk = -(-lq // block), -(-lk // block)
    pad = nk * block - lk
    s = F.pad(start, (0, pad), value=lq)  # padding keys: empty ranges
    e = F.pad(end, (0, pad), value=0)
    live = (s < e).to(torch.int32)
    # +1 at each key's first query block, -1 after its last, summed per key block
    first = torch.where(live.bool(), s // block, nq).long()
    after = torch.where(live.bool(), (e - 1) // block + 1, nq).long()
    kblock = torch.arange(nk * block, device=start.device) // block
    diff = torch.zeros(bh_kv, nk * (nq + 1), dtype=torch.int32, device=start.device)
    diff.scatter_add_(1, kblock * (nq + 1) + first, live)
    diff.scatter_add_(1, kblock * (nq + 1) + after, -live)
    touched = diff.view(bh_kv, nk, nq + 1).cumsum(-1)[..., :nq] > 0
    row0 = torch.arange(nq, device=start.device) * block
    row1 = (row0 + block).clamp(max=lq)
    s_max = s.view(bh_kv, nk, block).amax(-1)
    e_min = e.view(bh_kv, nk, block).amin(-1)
    full = (s_max[..., None] <= row0) & (e_min[..., None] >= row1)
    full, partial = full.transpose(1, 2), (touched & ~full).transpose(1, 2)  # [BH, nq, nk]

    def per_head(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(batch, bh_kv // batch, *t.shape[1:])
        return t.repeat_interleave(group, dim=1).contiguous()

    count, idx = _block_lists(partial)
    full_count, full_idx = _block_lists(full)
    return BlockMask.from_kv_blocks(
        per_head(count), per_head(idx), per_head(full_count), per_head(full_idx),
        BLOCK_SIZE=block, mask_mod=_range_mask_mod(start, end, heads, group),
        seq_lengths=(lq, lk),
    )


def _range_mask_mod(start: torch.Tensor, end: torch.Tensor, heads: int, group: int) -> Callable:
    """``mask_mod(b, h, q, kv)``: row ``q`` keeps key ``kv`` of query head ``h``."""
    kv_heads = heads // group

    def mask_mod(b, h, q_idx, kv_idx):
        row = b * kv_heads + h // group
        return (q_idx >= start[row, kv_idx]) & (q_idx < end[row, kv_idx])

    return mask_mod
