"""DMA under a model's dense ``[B, 1, Lq, Lk]`` mask, fused whenever that mask allows it.

Models such as Doge hand attention a materialised mask. Most of the time it is exactly
"causal and key padding", which the fused kernels take as ``causal=True`` plus a ``[B, Lk]`` key
mask; whether it is can only be seen in the data. ``torch.ops.sparse_compile.dma_attention_masked``
looks inside its implementation (where data-dependent checks are allowed, also under
``torch.compile``) and runs the fused kernels or the chunked path accordingly, forward and
backward.
"""

from __future__ import annotations

import torch

from sparse_compile.dynamic_mask.chunked import dma_attention_chunked, dma_chunked_grads
from sparse_compile.dynamic_mask.op import dma_attention_bwd, dma_attention_fwd
from sparse_compile.dynamic_mask.reference import bias_allows

__all__ = ["dma_attention_masked", "causal_padding_keys"]


def causal_padding_keys(mask: torch.Tensor) -> torch.Tensor | None:
    """``[B, Lk]`` allowed keys if ``mask`` ``[B, 1, Lq, Lk]`` (bool, or additive with 0 on
    every allowed entry) equals bottom-right causal & key padding, else None."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        return None
    lq, lk = mask.shape[-2:]
    allowed = bias_allows(mask)[:, 0]
    keys = allowed[:, -1, :]  # the last row sees every key under bottom-right causality
    pos = torch.arange(lq, device=mask.device)[:, None] + (lk - lq)
    causal = torch.arange(lk, device=mask.device)[None, :] <= pos
    if not torch.equal(allowed, causal[None] & keys[:, None, :]):
        return None
    if mask.dtype != torch.bool and bool((mask[:, 0][allowed] != 0).any()):
        return None  # additive values on kept entries (position biases): not a plain mask
    return keys.contiguous()


def _fusable(q: torch.Tensor) -> bool:
    import os

    return q.shape[-1] >= 16 and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("sparse_compile::dma_attention_masked", mutates_args=())
def dma_attention_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
    mask: torch.Tensor, keep: int, scale: float,
) -> torch.Tensor:
    """DMA with the model's mask ``[B, 1, Lq, Lk]``; q ``[B, Hq, Lq, D]``, k/v
    ``[B, Hkv, Lk, D]``, delta ``[B, Hkv, Lk]``. Returns ``[B, Hq, Lq, D]``."""
    keys = causal_padding_keys(mask) if _fusable(q) else None
    if keys is not None:
        return dma_attention_fwd(q, k, v, delta, keys, None, keep, True, scale)[0]
    return dma_attention_chunked(q, k, v, delta, keep, False, mask, scale).contiguous()


@dma_attention_masked.register_fake
def _fake(q, k, v, delta, mask, keep, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("sparse_compile::dma_attention_masked_bwd", mutates_args=())
def dma_attention_masked_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    delta: torch.Tensor, mask: torch.Tensor, keep: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, ddelta)``; the forward is recomputed (fused or chunked)."""
    keys = causal_padding_keys(mask) if _fusable(q) else None
    if keys is not None:
        out, lse, *selection = dma_attention_fwd(q, k, v, delta, keys, None, keep, True, scale)
        return dma_attention_bwd(grad_out, q, k, v, delta, keys, None, out, lse, selection, keep,
                                 True, scale)
    grads = dma_chunked_grads(grad_out, q, k, v, delta, keep, False, mask, scale)
    return tuple(g.contiguous() for g in grads)  # the fake promises contiguous outputs


@dma_attention_masked_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, delta, mask, keep, scale):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, delta))


def _setup_context(ctx, inputs, output):
    q, k, v, delta, mask, keep, scale = inputs
    ctx.save_for_backward(q, k, v, delta, mask)
    ctx.keep, ctx.scale = keep, scale


def _backward(ctx, grad_out):
    q, k, v, delta, mask = ctx.saved_tensors
    grads = dma_attention_masked_bwd(grad_out, q, k, v, delta, mask, ctx.keep, ctx.scale)
    return *grads, None, None, None


dma_attention_masked.register_autograd(_backward, setup_context=_setup_context)
