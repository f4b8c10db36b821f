"""The fused DMA op: ``torch.ops.sparse_compile.dma_attention_fwd`` / ``_bwd`` with autograd.

Registered with ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd`` so that
Dynamo, AOTAutograd and Inductor treat it as one opaque differentiable node. The selection
(``codegen.dma_select``) runs once, in the forward: its tensors are extra outputs of the
forward op, saved for the backward (``DmaSelection.nbytes``: about 8 * Lq * (keep + 64) / 64 bytes
per batch and kv head, 145 MB per layer at B=1, 16 heads, 32k tokens, keep=2048).
"""

from __future__ import annotations

import torch

from sparse_compile.codegen.tl.dma.backward import KvPass, dma_backward
from sparse_compile.codegen.tl.dma.forward import dma_forward
from sparse_compile.codegen.tl.dma.select import DmaSelection, dma_select, gather_capacity

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
    """How the backward computes dK/dV: the span pass (``codegen.dma_backward_kv``, 2048-row
    spans of 32-row steps, 3 stages: H100-tuned, bench/NOTES.md version 10) on the GPU; atomics
    inside the dQ kernel under the CPU interpreter (fewer kernels to interpret)."""
    if device.type != "cuda":
        return None
    return KvPass(rows=2048, block_m=32, block_n=64, num_warps=4, num_stages=3)


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides with a unit last dim: copy only when that does not hold
    (a model's ``[B, L, H, D].transpose(1, 2)`` passes through without a copy)."""
    t = _interpreter_dtype(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def _selection_fake(delta: torch.Tensor, lq: int, keep: int) -> list[torch.Tensor]:
    """Shapes and dtypes of ``DmaSelection.tensors()`` for the forward's block size."""
    b, h, lk = delta.shape
    block_m = block_sizes(delta.device)[0]
    nq = -(-lq // block_m)
    cap = gather_capacity(keep, lk, block_m)
    new = delta.new_empty
    return [new((b * h, lq), dtype=torch.int32), new((b * h, lq), dtype=torch.float32),
            new((b * h, nq, cap), dtype=torch.int32), new((b * h, nq, cap), dtype=torch.int32),
            new((b * h, nq), dtype=torch.int32), new((b * h, nq), dtype=torch.int32),
            new((b * h, lk), dtype=torch.int32), new((b * h,), dtype=torch.int32)]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, Lq, D], lse [B, Hq, Lq] float32 base 2, *selection)``, where
    ``selection`` is ``DmaSelection.tensors()`` (saved so the backward does not select again);
    see ``dma_attention_fused``."""
    block_m, block_n, warps = block_sizes(q.device)
    selection = dma_select(delta.contiguous(), key_allowed, q.shape[2], keep, causal, block_m)
    qc, kc, vc = (_contiguous_rows(t) for t in (q, k, v))
    dc = _interpreter_dtype(delta).contiguous()
    out, lse = dma_forward(qc, kc, vc, dc, key_add, selection, causal, scale, block_n, warps,
                           forward_stages(q.device))
    return out.to(q.dtype), lse, *selection.tensors()


@dma_attention_fwd.register_fake
def _fwd_fake(q, k, v, delta, key_allowed, key_add, keep, causal, scale):
    # Outputs are always contiguous, whatever the inputs' strides.
    out = _contiguous_like(q)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32), *_selection_fake(
        delta, q.shape[2], keep)


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
    selection: list[torch.Tensor],
    keep: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, ddelta)`` shaped and typed like ``(q, k, v, delta)``.
    ``selection``: the forward's (``DmaSelection.tensors()``), or ``[]`` to select again."""
    block_m, block_n, warps = block_sizes(q.device, backward=True)
    if selection and block_m == block_sizes(q.device)[0]:
        sel = DmaSelection.from_tensors(list(selection), block_m, keep, causal)
    else:
        sel = dma_select(delta.contiguous(), key_allowed, q.shape[2], keep, causal, block_m)
    go, qc, kc, vc, oc = (_contiguous_rows(t) for t in (grad_out, q, k, v, out))
    dc = _interpreter_dtype(delta).contiguous()
    grads = dma_backward(
        go, qc, kc, vc, dc, key_add, oc, lse, sel, causal, scale, block_n, warps,
        kv_pass=backward_span(q.device),
    )
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, delta), strict=True))


@dma_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, delta, key_allowed, key_add, out, lse, selection, keep, causal,
              scale):
    return tuple(_contiguous_like(t) for t in (q, k, v, delta))


def _setup_context(ctx, inputs, output):
    q, k, v, delta, key_allowed, key_add, keep, causal, scale = inputs
    out, lse, *selection = output
    ctx.mark_non_differentiable(lse, *selection)
    ctx.save_for_backward(q, k, v, delta, key_allowed, key_add, out, lse, *selection)
    ctx.keep, ctx.causal, ctx.scale = keep, causal, scale


def _backward(ctx, grad_out, *unused_grads):
    q, k, v, delta, key_allowed, key_add, out, lse, *selection = ctx.saved_tensors
    dq, dk, dv, ddelta = dma_attention_bwd(
        grad_out, q, k, v, delta, key_allowed, key_add, out, lse, selection, ctx.keep,
        ctx.causal, ctx.scale,
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
