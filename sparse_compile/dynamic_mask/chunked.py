"""Memory-bounded PyTorch path of DMA: query rows in chunks, keys in rank order.

Never holds more than ``chunk x Lk`` scores at once. Works for any mask (a bias of full
``[B, H, Lq, Lk]`` shape included) and any device; it is the fallback of the fused kernels and
their second reference. Selection and tie rule are those of ``dma_reference`` (``rule="index"``).
"""

from __future__ import annotations

import math

import torch

from sparse_compile.dynamic_mask.reference import bias_allows

__all__ = ["dma_attention_chunked", "dma_chunked_grads", "selection_order"]


def selection_order(delta: torch.Tensor, key_allowed: torch.Tensor | None) -> torch.Tensor:
    """Keys in selection order: allowed first, then delta descending, then index ascending.

    delta ``[B, H, Lk]``; key_allowed bool broadcastable to ``[B, H, Lk]`` or None.
    Returns int64 ``[B, H, Lk]`` (``order[..., r]`` = key of rank r).
    """
    order = torch.sort(delta, dim=-1, descending=True, stable=True).indices
    if key_allowed is not None:
        removed = (~key_allowed.expand_as(delta)).gather(-1, order)
        order = order.gather(-1, torch.sort(removed.to(torch.int8), dim=-1, stable=True).indices)
    return order


def _chunk_forward(
    q: torch.Tensor,
    k_sorted: torch.Tensor,
    v_sorted: torch.Tensor,
    delta_sorted: torch.Tensor,
    order: torch.Tensor,
    row_start: int,
    lq: int,
    keep: int,
    causal: bool,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Rows ``[row_start, row_start + C)`` of the output for q ``[B, Hq, C, D]``.

    k/v ``[B, Hkv, Lk, D]`` and delta ``[B, Hkv, Lk]`` are in rank order (``order``); lq is the
    total number of query rows (for the absolute positions of bottom-right alignment).
    """
    b, hq, c, _ = q.shape
    hkv, lk = k_sorted.shape[1], k_sorted.shape[2]
    group = hq // hkv
    order_q = order.repeat_interleave(group, dim=1)[:, :, None, :]
    allowed = torch.ones(b, hq, c, lk, dtype=torch.bool, device=q.device)
    if causal:
        p = torch.arange(row_start, row_start + c, device=q.device) + (lk - lq)
        allowed = allowed & (order_q <= p[:, None])
    bias_rows = None
    if bias is not None:
        bias_rows = bias if bias.shape[-2] == 1 else bias[..., row_start : row_start + c, :]
        bias_rows = bias_rows.expand(b, hq, c, lk).gather(-1, order_q.expand(b, hq, c, lk))
        allowed = allowed & bias_allows(bias_rows)
    # The selection of a kv head is the one of the first query head of its group.
    sel_allowed = allowed[:, ::group]
    kept = sel_allowed & (sel_allowed.cumsum(-1) <= keep) if lk > keep else sel_allowed
    kept = kept.repeat_interleave(group, dim=1) & allowed
    kk = k_sorted.repeat_interleave(group, dim=1).float()
    vv = v_sorted.repeat_interleave(group, dim=1).float()
    dd = delta_sorted.repeat_interleave(group, dim=1).float()
    # delta reaches 1e7 and more (exp of A * softplus): added to q.k in float32 it would leave
    # no bit of q.k. Each row first subtracts the largest delta it keeps (softmax is blind to a
    # per-row shift; detached, as its gradient sums to zero), as the fused kernels do.
    shift = torch.where(kept, dd[:, :, None, :], float("-inf")).amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0).detach()
    logits = scale * (q.float() @ kk.transpose(-1, -2)) + (dd[:, :, None, :] - shift)
    if bias_rows is not None and bias_rows.dtype != torch.bool:
        logits = logits + torch.where(allowed, bias_rows.float(), 0.0)
    logits = logits.masked_fill(~kept, float("-inf"))
    row_max = logits.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, 1.0)
    return (probs @ vv).to(q.dtype)


class _ChunkedDMA(torch.autograd.Function):
    """Forward by row chunks; backward recomputes each chunk and differentiates it locally."""

    @staticmethod
    def forward(ctx, q, k, v, delta, keep, causal, bias, scale, chunk):
        ctx.save_for_backward(q, k, v, delta)
        ctx.args = (keep, causal, bias, scale, chunk)
        with torch.no_grad():
            return _run(q, k, v, delta, keep, causal, bias, scale, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, delta = ctx.saved_tensors
        keep, causal, bias, scale, chunk = ctx.args
        # Contiguous gradients: traced (fake) and real strides must agree under AOTAutograd.
        grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                 for t in (q, k, v, delta)]
        key_allowed = _key_allowed(bias)
        order = selection_order(delta.detach(), key_allowed)
        lq = q.shape[2]
        for start in range(0, lq, chunk):
            rows = slice(start, min(start + chunk, lq))
            with torch.enable_grad():
                qc = q[:, :, rows].detach().requires_grad_()
                kc, vc, dc = (t.detach().requires_grad_() for t in (k, v, delta))
                idx = order[..., None].expand(*order.shape, k.shape[-1])
                out = _chunk_forward(
                    qc, kc.gather(2, idx), vc.gather(2, idx), dc.gather(-1, order), order,
                    start, lq, keep, causal, bias, scale,
                )
                gq, gk, gv, gd = torch.autograd.grad(out, (qc, kc, vc, dc), grad_out[:, :, rows])
            grads[0][:, :, rows] += gq
            grads[1] += gk
            grads[2] += gv
            grads[3] += gd
        dq, dk, dv, dd = (
            g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, delta), strict=True)
        )
        return dq, dk, dv, dd, None, None, None, None, None


def dma_chunked_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    keep: int,
    causal: bool,
    bias: torch.Tensor | None,
    scale: float,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, ddelta)`` of the chunked path by ``torch.func.vjp`` per row chunk.

    Usable where autograd is not (inside a custom op's implementation); shapes as
    ``dma_attention_chunked``, bias 4-D or None.
    """
    lq = q.shape[2]
    order = selection_order(delta, _key_allowed(bias))
    idx = order[..., None].expand(*order.shape, k.shape[-1])
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v, delta)]
    for start in range(0, lq, chunk):
        rows = slice(start, min(start + chunk, lq))

        def rows_out(qc, kk, vv, dd, start=start):
            return _chunk_forward(qc, kk.gather(2, idx), vv.gather(2, idx), dd.gather(-1, order),
                                  order, start, lq, keep, causal, bias, scale)

        _, pullback = torch.func.vjp(rows_out, q[:, :, rows], k, v, delta)
        gq, gk, gv, gd = pullback(grad_out[:, :, rows].contiguous())
        grads[0][:, :, rows] += gq
        grads[1] += gk
        grads[2] += gv
        grads[3] += gd
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, delta), strict=True))


def _key_allowed(bias: torch.Tensor | None) -> torch.Tensor | None:
    """``[B|1, 1, Lk]`` allowed keys when the bias depends on the key only, else None."""
    if bias is None or bias.dim() < 2 or bias.shape[-2] != 1:
        return None
    full = bias_allows(bias)
    while full.dim() < 4:
        full = full.unsqueeze(0)
    if full.shape[1] != 1:
        return None
    return full[:, :, 0, :]


def _run(q, k, v, delta, keep, causal, bias, scale, chunk):
    lq = q.shape[2]
    order = selection_order(delta, _key_allowed(bias))
    idx = order[..., None].expand(*order.shape, k.shape[-1])
    k_sorted, v_sorted, d_sorted = k.gather(2, idx), v.gather(2, idx), delta.gather(-1, order)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, lq, chunk):
        rows = slice(start, min(start + chunk, lq))
        out[:, :, rows] = _chunk_forward(
            q[:, :, rows], k_sorted, v_sorted, d_sorted, order, start, lq, keep, causal, bias,
            scale,
        )
    return out


def dma_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    keep: int,
    causal: bool = True,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """DMA attention by row chunks of ``chunk`` queries; differentiable in q, k, v, delta.

    q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``, delta ``[B, Hkv, Lk]``, bias broadcastable to
    ``[B, Hq, Lq, Lk]`` (4D; bool keep-mask or additive float). Returns ``[B, Hq, Lq, D]``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bias is not None:
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
    return _ChunkedDMA.apply(q, k, v, delta, keep, causal, bias, scale, chunk)
