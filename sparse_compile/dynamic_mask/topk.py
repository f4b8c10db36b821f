"""``topk(k, block=...)``: training-free dynamic block selection, run by the DMA gather kernels.

For pretrained models that never learned a DMA score: per query block of ``block`` rows, estimate
the attention mass of every key block by the product of the mean query and the mean key of the
blocks (``mean(q_block) · mean(k_block)``), keep the ``k`` best key blocks allowed by causality,
plus the key blocks holding the query block's own positions (the diagonal), and attend to their
keys exactly (causal inside). Query heads of one kv head share the selection (their pooled
queries are averaged), so a kv head's gather list serves its whole GQA group.

The kept keys of a query block form the same kind of gather list as DMA's selection, with every
listed key kept (rank 0, threshold 0, delta 0), so the forward and backward are the DMA kernels.
"""

from __future__ import annotations

import math

import torch
import triton

from sparse_compile.codegen.tl.dma.backward import dma_backward
from sparse_compile.codegen.tl.dma.forward import dma_forward
from sparse_compile.codegen.tl.dma.select import DmaSelection
from sparse_compile.dynamic_mask.masked import causal_padding_keys
from sparse_compile.dynamic_mask.op import _interpreter_dtype, block_sizes

__all__ = ["topk_blocks", "topk_attention", "topk_attention_masked"]


def topk_blocks(q: torch.Tensor, k: torch.Tensor, k_blocks: int, block: int, causal: bool
                ) -> torch.Tensor:
    """Kept key blocks per query block: bool ``[B, Hkv, nq_blocks, nk_blocks]``.

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``. Scores are ``mean(q) · mean(k)`` per block pair
    (query heads of a group averaged); the top ``k_blocks`` allowed blocks (ties: lower index)
    plus the diagonal blocks are kept.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    nbq, nbk = triton.cdiv(lq, block), triton.cdiv(lk, block)
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, nbq * block - lq))
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, nbk * block - lk))
    q_rows = torch.clamp(lq - torch.arange(nbq, device=q.device) * block, max=block)
    k_rows = torch.clamp(lk - torch.arange(nbk, device=q.device) * block, max=block)
    q_mean = qp.reshape(b, hq, nbq, block, d).sum(3) / q_rows[:, None]
    k_mean = kp.reshape(b, hkv, nbk, block, d).sum(3) / k_rows[:, None]
    q_mean = q_mean.reshape(b, hkv, hq // hkv, nbq, d).mean(2)
    scores = q_mean @ k_mean.transpose(-1, -2)  # [B, Hkv, nbq, nbk]
    first = torch.arange(nbq, device=q.device) * block + (lk - lq)
    last = torch.clamp(first + block - 1, max=lk - 1)
    key_start = torch.arange(nbk, device=q.device) * block
    allowed = (key_start[None, :] <= last[:, None]) if causal else torch.ones(
        nbq, nbk, dtype=torch.bool, device=q.device)
    diagonal = (key_start[None, :] + block - 1 >= first[:, None]) & (
        key_start[None, :] <= last[:, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    take = min(k_blocks, nbk)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept.scatter_(-1, order[..., :take], True)
    return (kept & allowed) | diagonal


def _selection(kept: torch.Tensor, lq: int, lk: int, block: int, block_m: int) -> DmaSelection:
    """Gather lists of the kept blocks' keys for query blocks of ``block_m`` rows."""
    b, h, nbq, nbk = kept.shape
    n_kept = kept.sum(-1)
    width = int(n_kept.max()) if n_kept.numel() else 0
    ids = torch.where(kept, torch.arange(nbk, device=kept.device), nbk)
    ids = torch.sort(ids, dim=-1).values[..., : max(width, 1)]  # kept blocks first, ascending
    keys = ids[..., None] * block + torch.arange(block, device=kept.device)
    keys = keys.reshape(b * h, nbq, -1)
    valid = keys < lk  # padding blocks (id nbk) and the tail of the last block
    count = valid.sum(-1).to(torch.int32)
    keys = torch.where(valid, keys, 0).to(torch.int32)
    repeat = block // block_m
    nq = triton.cdiv(lq, block_m)
    keys = keys.repeat_interleave(repeat, dim=1)[:, :nq].contiguous()
    count = count.repeat_interleave(repeat, dim=1)[:, :nq].contiguous()
    zeros_rank = torch.zeros_like(keys)
    thr = torch.zeros(b * h, lq, dtype=torch.int32, device=kept.device)
    shift = torch.zeros(b * h, lq, dtype=torch.float32, device=kept.device)
    return DmaSelection(thr, keys, zeros_rank, count, block_m, shift)


@torch.library.custom_op("sparse_compile::topk_attention_fwd", mutates_args=())
def topk_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_add: torch.Tensor | None,
    k_blocks: int, block: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, Lq, D], lse [B, Hq, Lq] float32, kept blocks bool)``."""
    kept = topk_blocks(q.detach(), k.detach(), k_blocks, block, causal)
    block_m, block_n, warps = block_sizes(q.device)
    block_m = math.gcd(block_m, block)
    sel = _selection(kept, q.shape[2], k.shape[2], block, block_m)
    qc, kc, vc = (_interpreter_dtype(t).contiguous() for t in (q, k, v))
    delta = torch.zeros(k.shape[:3], dtype=qc.dtype, device=q.device)
    out, lse = dma_forward(qc, kc, vc, delta, key_add, sel, causal, scale, block_n, warps)
    return out.to(q.dtype).contiguous(), lse, kept


@topk_attention_fwd.register_fake
def _fwd_fake(q, k, v, key_add, k_blocks, block, causal, scale):
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    kept = q.new_empty((b, hkv, -(-lq // block), -(-lk // block)), dtype=torch.bool)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(
        (b, hq, lq), dtype=torch.float32), kept


@torch.library.custom_op("sparse_compile::topk_attention_bwd", mutates_args=())
def topk_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_add: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor,
    block: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the blocks the forward kept."""
    block_m, block_n, warps = block_sizes(q.device, backward=True)
    block_m = math.gcd(block_m, block)
    sel = _selection(kept, q.shape[2], k.shape[2], block, block_m)
    tensors = (grad_out, q, k, v, out)
    go, qc, kc, vc, oc = (_interpreter_dtype(t).contiguous() for t in tensors)
    delta = torch.zeros(k.shape[:3], dtype=qc.dtype, device=q.device)
    dq, dk, dv, _ = dma_backward(go, qc, kc, vc, delta, key_add, oc, lse, sel, causal, scale,
                                 block_n, warps)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip((dq, dk, dv), (q, k, v), strict=True))


@topk_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, key_add, out, lse, kept, block, causal, scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_add, _, block, causal, scale = inputs
    out, lse, kept = output
    ctx.save_for_backward(q, k, v, key_add, out, lse, kept)
    ctx.args = (block, causal, scale)


def _backward(ctx, grad_out, grad_lse, grad_kept):
    q, k, v, key_add, out, lse, kept = ctx.saved_tensors
    dq, dk, dv = topk_attention_bwd(grad_out, q, k, v, key_add, out, lse, kept, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


topk_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: int,
    block: int = 128,
    causal: bool = True,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over the ``k_blocks`` best key blocks (plus the diagonal) of each query block.

    q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``; ``block`` a multiple of 16; key_padding
    bool ``[B, Lk]`` (True = keep) or None: removed keys get no weight (the block choice still
    pools every key). Differentiable in q, k, v (the choice itself is not). Returns
    ``[B, Hq, Lq, D]`` in q's dtype; rows with no kept key are 0.
    """
    if k_blocks < 1 or block < 16 or block % 16:
        raise ValueError(f"need k >= 1 and block a multiple of 16, got k={k_blocks}, {block=}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_add = None
    if key_padding is not None:
        key_padding = key_padding.expand(q.shape[0], k.shape[2])
        key_add = torch.where(key_padding, 0.0, float("-inf")).float().contiguous()
    return topk_attention_fwd(q, k, v, key_add, k_blocks, block, causal, scale)[0]


@torch.library.custom_op("sparse_compile::topk_mask_keys", mutates_args=())
def topk_mask_keys(mask: torch.Tensor) -> torch.Tensor:
    """Additive key mask ``[B, Lk]`` float32 (0 kept, -inf removed) of a ``[B, 1, Lq, Lk]``
    mask that is bottom-right causal & key padding; raises ``ValueError`` for any other mask
    (topk's kernels take only that structure)."""
    keys = causal_padding_keys(mask)
    if keys is None:
        raise ValueError("topk patterns support causal and key-padding masks only; this "
                         "model's mask is neither")
    return torch.where(keys, 0.0, float("-inf")).float().contiguous()


@topk_mask_keys.register_fake
def _mask_keys_fake(mask):
    return mask.new_empty((mask.shape[0], mask.shape[-1]), dtype=torch.float32)


def topk_attention_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, k_blocks: int,
    block: int = 128, scale: float | None = None,
) -> torch.Tensor:
    """``topk_attention`` under a model's dense ``[B, 1, Lq, Lk]`` mask, which must be causal
    and key padding (checked when it runs)."""
    if k_blocks < 1 or block < 16 or block % 16:
        raise ValueError(f"need k >= 1 and block a multiple of 16, got k={k_blocks}, {block=}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_add = topk_mask_keys(mask)
    return topk_attention_fwd(q, k, v, key_add, k_blocks, block, True, scale)[0]
