"""The fused DMA op: ``torch.ops.sparse_compile.dma_attention_fwd`` / ``_bwd`` with autograd.

Registered with ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` so that
Dynamo, AOTAutograd and Inductor treat it as one opaque differentiable node. The selection
(``codegen.dma_select``) runs inside both halves; it is cheap next to the attention.
"""

from __future__ import annotations

import torch

from sparse_compile.codegen.dma_backward import KvPass, dma_backward
from sparse_compile.codegen.dma_forward import dma_forward
from sparse_compile.codegen.dma_select import dma_select

__all__ = ["dma_attention_fused", "block_sizes", "forward_stages", "backward_span"]


def _interpreter_dtype(t: torch.Tensor) -> torch.Tensor:
    """The CPU interpreter's ``tl.dot`` mishandles bfloat16: compute those in float32 there."""
    return t.float() if t.device.type != "cuda" and t.dtype == torch.bfloat16 else t


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def block_sizes(device: torch.device, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward or of the backward's dQ kernel: H100-tuned
    GPU tiles (``bench/dma.py --tune``, bench/results/dma-h100.md), or the smallest ``tl.dot``
    tiles for the CPU interpreter."""
    if device.type != "cuda":
        return 16, 16, 4
    return 64, 32, 4


def forward_stages(device: torch.device) -> int:
    """Software-pipelining stages of the forward (3 was fastest on the H100 at 32k)."""
    return 3 if device.type == "cuda" else 2


def backward_span(device: torch.device) -> KvPass | None:
    """How the backward computes dK/dV: the span pass (``codegen.dma_backward_kv``, 1024-row
    spans, H100-tuned) on the GPU; atomics inside the dQ kernel under the CPU interpreter
    (fewer kernels to interpret)."""
    if device.type != "cuda":
        return None
    return KvPass(rows=1024, block_m=64, block_n=64, num_warps=4)


@torch.library.custom_op("sparse_compile::dma_attention_fwd", mutates_args=())
def dma_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    key_allowed: torch.Tensor | None,
    key_add: torch.Tensor | None,
    keep: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, Lq, D], lse [B, Hq, Lq] float32, base 2)``; see
    ``dma_attention_fused``."""
    block_m, block_n, warps = block_sizes(q.device)
    selection = dma_select(delta.contiguous(), key_allowed, q.shape[2], keep, causal, block_m)
    qc, kc, vc, dc = (_interpreter_dtype(t).contiguous() for t in (q, k, v, delta))
    out, lse = dma_forward(qc, kc, vc, dc, key_add, selection, causal, scale, block_n, warps,
                           forward_stages(q.device))
    return out.to(q.dtype).contiguous(), lse


@dma_attention_fwd.register_fake
def _fwd_fake(q, k, v, delta, key_allowed, key_add, keep, causal, scale):
    # Outputs are always contiguous, whatever the inputs' strides.
    return _contiguous_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparse_compile::dma_attention_bwd", mutates_args=())
def dma_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    key_allowed: torch.Tensor | None,
    key_add: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, ddelta)`` shaped and typed like ``(q, k, v, delta)``."""
    block_m, block_n, warps = block_sizes(q.device, backward=True)
    selection = dma_select(delta.contiguous(), key_allowed, q.shape[2], keep, causal, block_m)
    tensors = (grad_out, q, k, v, delta, out)
    go, qc, kc, vc, dc, oc = (_interpreter_dtype(t).contiguous() for t in tensors)
    grads = dma_backward(
        go, qc, kc, vc, dc, key_add, oc, lse, selection, causal, scale, block_n, warps,
        kv_pass=backward_span(q.device),
    )
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, delta), strict=True))


@dma_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, delta, key_allowed, key_add, out, lse, keep, causal, scale):
    return tuple(_contiguous_like(t) for t in (q, k, v, delta))


def _setup_context(ctx, inputs, output):
    q, k, v, delta, key_allowed, key_add, keep, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, delta, key_allowed, key_add, out, lse)
    ctx.keep, ctx.causal, ctx.scale = keep, causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, delta, key_allowed, key_add, out, lse = ctx.saved_tensors
    dq, dk, dv, ddelta = dma_attention_bwd(
        grad_out, q, k, v, delta, key_allowed, key_add, out, lse, ctx.keep, ctx.causal, ctx.scale
    )
    return dq, dk, dv, ddelta, None, None, None, None, None


dma_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def dma_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    keep: int,
    causal: bool,
    key_allowed: torch.Tensor | None,
    key_add: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Fused DMA with a key-only mask. q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``,
    delta ``[B, Hkv, Lk]``, key_allowed bool ``[B, Lk]`` or None, key_add float32 ``[B, Lk]``
    (additive, 0 where removed) or None. Returns ``[B, Hq, Lq, D]``."""
    return dma_attention_fwd(q, k, v, delta, key_allowed, key_add, keep, causal, scale)[0]
