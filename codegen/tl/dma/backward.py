"""DMA backward kernel: same gather as the forward; dK, dV and d delta by atomic adds.

Program (query block, batch * query head). For each tile of the block's gather list the kernel
recomputes P = exp(S - lse), accumulates dQ in registers, and adds dSᵀQ, PᵀdO and the column
sums of dS (the gradient of delta, which enters the logits additively) into float32 buffers at the
gathered key rows. Keys of a kv head receive from every query head of its GQA group. Dots at
``TileConfig.precision`` of the input dtype, as the forward (``dma_dot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.tl.dma.backward_kv import dma_backward_kv
from sparse_compile.codegen.tl.dma.forward import dma_dot, dma_gather_tile, dma_logits
from sparse_compile.codegen.tl.dma.select import DmaSelection, dma_gather_lists

__all__ = ["KvPass", "dma_backward"]


@dataclass(frozen=True)
class KvPass:
    """Run dK/dV as a separate pass over spans of ``rows`` query rows (``dma_backward_kv``)
    with these tiles; the main kernel then computes dQ only."""

    rows: int = 512
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

LOG2E = 1.4426950408889634


@triton.jit
def _bwd_tile(
    q, do, dq, di, lse2, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
    k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, dk_ptr, dv_ptr, ddelta_ptr,
    skb, skh, skn, svb, svh, svn, scale, scale_log2, offs_d, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_GRADS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of the gather list: dQ update (and dK/dV/d delta atomics when KV_GRADS).
    MASKED=False for the leading tiles every row keeps whole (no per-entry test)."""
    offs_n, n_ok, keys, kv_mask, k, v, delta = dma_gather_tile(
        start, count, list_base, b, hk, bhk, lk, k_ptr, v_ptr, delta_ptr, gkey_ptr, skb, skh,
        skn, svb, svh, svn, offs_d, d_ok, MASKED, BLOCK_N)
    s = dma_logits(q, k, keys, delta, shift, thr, pos, b, lk, key_bias_ptr, grank_ptr,
                   list_base, offs_n, n_ok, scale_log2, MASKED, CAUSAL, HAS_KEY_BIAS,
                   PRECISION)
    p = tl.exp2(s - lse2[:, None])
    dp = dma_dot(do, tl.trans(v), PRECISION).to(tl.float32)
    ds = p * (dp - di[:, None])
    dq += dma_dot(ds.to(k.dtype), k, PRECISION)
    if KV_GRADS:
        dv_part = dma_dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk_part = dma_dot(tl.trans(ds.to(q.dtype)), q, PRECISION) * scale
        head_off = bhk * lk * HEAD_DIM
        kv_off = keys[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dv_ptr + head_off + kv_off, dv_part, mask=kv_mask, sem="relaxed")
        tl.atomic_add(dk_ptr + head_off + kv_off, dk_part, mask=kv_mask, sem="relaxed")
        tl.atomic_add(ddelta_ptr + bhk * lk + keys, tl.sum(ds, axis=0), mask=n_ok,
                      sem="relaxed")
    return dq


@triton.jit
def _dma_bwd_kernel(
    q_ptr, k_ptr, v_ptr, delta_ptr, key_bias_ptr, out_ptr, dout_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, ddelta_ptr, di_ptr,
    thr_ptr, shift_ptr, gkey_ptr, grank_ptr, gcount_ptr, gfull_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sdob, sdoh, sdom,
    lq, lk, hq, hkv, cap, scale,
    CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_GRADS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    hk = h // (hq // hkv)
    bhk = b * hkv + hk
    nq = tl.cdiv(lq, BLOCK_M)
    # (batch, head) offsets in 64 bits, as in the forward
    b, h, hk, bhk, pid_bh = (b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64),
                             bhk.to(tl.int64), pid_bh.to(tl.int64))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq
    d_ok = offs_d < HEAD_DIM
    md_mask = row_ok[:, None] & d_ok[None, :]
    pos = offs_m + (lk - lq)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(dout_ptr + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :],
                 mask=md_mask, other=0.0)
    o = tl.load(out_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
                mask=md_mask, other=0.0)
    di = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if not KV_GRADS:  # the dK/dV pass (dma_backward_kv) reads it
        tl.store(di_ptr + pid_bh * lq + offs_m, di, mask=row_ok)
    lse = tl.load(lse_ptr + pid_bh * lq + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)  # base 2, from the forward
    thr = tl.load(thr_ptr + bhk * lq + offs_m, mask=row_ok, other=-1)
    shift = tl.load(shift_ptr + bhk * lq + offs_m, mask=row_ok, other=0.0)
    count = tl.load(gcount_ptr + bhk * nq + pid_m)
    list_base = (bhk * nq + pid_m) * cap
    scale_log2 = scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = tl.load(gfull_ptr + bhk * nq + pid_m) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        dq = _bwd_tile(
            q, do, dq, di, lse2, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
            k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, dk_ptr, dv_ptr,
            ddelta_ptr, skb, skh, skn, svb, svh, svn, scale, scale_log2, offs_d, d_ok,
            False, CAUSAL, HAS_KEY_BIAS, HEAD_DIM, BLOCK_N, KV_GRADS, PRECISION)
    for start in range(full_end, count, BLOCK_N):
        dq = _bwd_tile(
            q, do, dq, di, lse2, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
            k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, dk_ptr, dv_ptr,
            ddelta_ptr, skb, skh, skn, svb, svh, svn, scale, scale_log2, offs_d, d_ok,
            True, CAUSAL, HAS_KEY_BIAS, HEAD_DIM, BLOCK_N, KV_GRADS, PRECISION)
    tl.store(dq_ptr + pid_bh * lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=md_mask)


def dma_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    key_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    selection: DmaSelection,
    causal: bool,
    scale: float,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_pass: KvPass | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, ddelta)`` in the dtypes of q, k, v, delta; shapes as the forward.
    dout/q/out ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``; lse ``[B, Hq, Lq]``, the forward's
    base-2 log-sum-exp. ``kv_pass``: compute dK/dV in the separate span pass (fewer atomics)
    instead of inside the dQ kernel; ``selection`` must come from ``dma_select``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dq = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, hkv, lk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    ddelta = torch.zeros(b, hkv, lk, dtype=torch.float32, device=q.device)
    di = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device) if kv_pass else ddelta
    block_m = selection.block_m
    grid = (triton.cdiv(lq, block_m), b * hq)
    _dma_bwd_kernel[grid](
        q, k, v, delta, key_bias if key_bias is not None else delta, out, dout, lse,
        dq, dk, dv, ddelta, di,
        selection.thr, selection.shift, selection.gather_key, selection.gather_rank,
        selection.gather_count, selection.full_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lq, lk, hq, hkv, selection.gather_key.shape[-1], scale,
        CAUSAL=causal, HAS_KEY_BIAS=key_bias is not None, HEAD_DIM=d,
        BLOCK_D=TileConfig.d_pad(d), BLOCK_M=block_m, BLOCK_N=block_n,
        KV_GRADS=kv_pass is None, PRECISION=TileConfig.precision(q.dtype, d),
        num_warps=num_warps, num_stages=num_stages,
    )
    if kv_pass is not None:
        lists = dma_gather_lists(selection, delta, lq, kv_pass.rows)
        dma_backward_kv(dout, q, k, v, delta, key_bias, lse, di, selection.thr, selection.shift,
                        lists, kv_pass.rows, causal, scale, dk, dv, ddelta, kv_pass.block_m,
                        kv_pass.block_n, kv_pass.num_warps, kv_pass.num_stages)
    return dq, dk.to(k.dtype), dv.to(v.dtype), ddelta.to(delta.dtype)
