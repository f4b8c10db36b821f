"""DMA backward, dK/dV pass: key tiles accumulate over many query rows before one atomic add.

The fused backward (``dma_backward``) adds every query block's dK/dV tile into float32 buffers
with atomics: ``Lq / BLOCK_M`` adds per kept key and head, most of them on the same hot rows
(a high-delta key is kept by every later query), which dominates its time. This pass instead
takes ``ROWS`` query rows at once (a span of several query blocks) and the union of their kept
keys (``dma_gather_lists``: at most ``keep + ROWS`` keys, the older ones in rank order, then the
span's own keys by position). Program (key tile of that list, row span, batch * kv head): it
loads its gathered K/V tile once, loops over the query heads of its GQA group and the span's
rows in ``BLOCK_M`` steps, recomputes P and dS (``lse`` and ``Di = rowsum(dO * O)`` from the
forward and the dQ pass), and accumulates dK, dV and d delta in registers; one atomic add per
key tile and span.

The row steps that keep some entry of the key tile form one run, and those that keep all of
it a run inside that one: ``thr`` is non-increasing in the row, so a step's first row keeps
the most and its last row the least, and causality admits rows from a key's position on. The
loops run masked steps, then steps without any mask arithmetic (most of them: the span's own
keys, which causality cuts, sit together at the list's end), then masked steps, with bounds
computed up front so that triton can software-pipeline each loop. The work is in the
transposed orientation (keys x rows): P and dS come out of their products shaped as the A
operands of dV += Pᵀ dO and dK += dSᵀ Q. Q and dO tiles arrive through TMA where exact
(``codegen.tma``). Dots at ``TileConfig.precision`` of the input dtype, as the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.tma import row_descriptors
from sparse_compile.codegen.tl.dma.forward import dma_dot

__all__ = ["dma_backward_kv"]


@triton.jit
def _kv_step(
    dk, dv, dd, k, v, delta, kb, keys, ranks, n_ok, m0, q_src, do_src, q_row, bh, bhk,
    lse_ptr, di_ptr, thr_ptr, shift_ptr, sqm, sdom, lq, lk, offs_d, d_ok, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, TMA: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One step of BLOCK_M rows against the key tile. MASKED=False for steps that keep every
    entry (all rows within Lq, every key kept by every row): no mask arithmetic."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < lq
    if TMA:
        q = q_src.load([q_row + m0, 0])
        do = do_src.load([q_row + m0, 0])
    else:
        md_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_src + offs_m[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_src + offs_m[:, None] * sdom + offs_d[None, :], mask=md_mask,
                     other=0.0)
    lse = tl.load(lse_ptr + bh * lq + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
    di = tl.load(di_ptr + bh * lq + offs_m, mask=row_ok, other=0.0)
    shift = tl.load(shift_ptr + bhk * lq + offs_m, mask=row_ok, other=0.0)
    # the forward's logits (delta - shift first: dma_select's module doc)
    s_t = dma_dot(k, tl.trans(q), PRECISION) * scale_log2
    s_t += (delta[:, None] - shift[None, :]) * 1.4426950408889634
    if HAS_KEY_BIAS:
        s_t += kb[:, None] * 1.4426950408889634
    if MASKED:
        thr = tl.load(thr_ptr + bhk * lq + offs_m, mask=row_ok, other=-1)
        kept = n_ok[:, None] & (ranks[:, None] <= thr[None, :])
        if CAUSAL:
            kept = kept & (keys[:, None] <= (offs_m + (lk - lq))[None, :])
        s_t = tl.where(kept, s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse2[None, :])
    dv += dma_dot(p_t.to(do.dtype), do, PRECISION)
    dp_t = dma_dot(v, tl.trans(do), PRECISION).to(tl.float32)
    ds_t = p_t * (dp_t - di[None, :])
    dk += dma_dot(ds_t.to(q.dtype), q, PRECISION)
    dd += tl.sum(ds_t, axis=1)
    return dk, dv, dd


@triton.jit
def _dma_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, delta_ptr, key_bias_ptr, dout_ptr, lse_ptr, di_ptr,
    dk_ptr, dv_ptr, ddelta_ptr,
    thr_ptr, shift_ptr, ukey_ptr, urank_ptr, ucount_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    lq, lk, hq, hkv, ucap, scale,
    CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    bhk = tl.program_id(2).to(tl.int64)  # 64-bit (batch, head) offsets, as in the forward
    b = bhk // hkv
    hk = bhk % hkv
    group = hq // hkv
    n_spans = tl.cdiv(lq, ROWS)
    count = tl.load(ucount_ptr + bhk * n_spans + pid_s)
    start = pid_n * BLOCK_N
    if start < count:
        offs_n = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < count
        d_ok = offs_d < HEAD_DIM
        kv_mask = n_ok[:, None] & d_ok[None, :]
        list_base = (bhk * n_spans + pid_s) * ucap
        keys = tl.load(ukey_ptr + list_base + offs_n, mask=n_ok, other=0)
        ranks = tl.load(urank_ptr + list_base + offs_n, mask=n_ok, other=2147483647)
        k = tl.load(k_ptr + b * skb + hk * skh + keys[:, None] * skn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + keys[:, None] * svn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        delta = tl.load(delta_ptr + bhk * lk + keys, mask=n_ok, other=0.0).to(tl.float32)
        kb = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_KEY_BIAS:
            kb = tl.load(key_bias_ptr + b * lk + keys, mask=n_ok, other=0.0)
        best_rank = tl.min(tl.where(n_ok, ranks, 2147483647), axis=0)
        worst_rank = tl.max(tl.where(n_ok, ranks, -1), axis=0)
        first_key = tl.min(tl.where(n_ok, keys, 2147483647), axis=0)
        last_key = tl.max(tl.where(n_ok, keys, -1), axis=0)
        scale_log2 = scale * 1.4426950408889634

        # Step runs (module doc): [t_lo, t_hi) keep some entry, [f_lo, f_hi) all of them.
        row0 = pid_s * ROWS
        step_rows = row0 + tl.arange(0, ROWS // BLOCK_M) * BLOCK_M
        step_whole = step_rows + BLOCK_M <= lq
        first_thr = tl.load(thr_ptr + bhk * lq + step_rows, mask=step_rows < lq, other=-1)
        last_thr = tl.load(thr_ptr + bhk * lq + step_rows + BLOCK_M - 1, mask=step_whole,
                           other=-1)
        t_hi = tl.sum((first_thr >= best_rank).to(tl.int32), axis=0)
        f_hi = tl.sum((step_whole & (last_thr >= worst_rank)).to(tl.int32), axis=0)
        if start + BLOCK_N > count:
            f_hi = 0  # a partial key tile has padding entries: every step masked
        t_lo = tl.zeros([], dtype=tl.int32)
        f_lo = tl.zeros([], dtype=tl.int32)
        if CAUSAL:
            t_lo = tl.maximum(first_key - (lk - lq) - row0, 0) // BLOCK_M
            f_lo = (tl.maximum(last_key - (lk - lq) - row0, 0) + BLOCK_M - 1) // BLOCK_M
        f_lo = tl.minimum(tl.maximum(f_lo, t_lo), t_hi)
        f_hi = tl.maximum(tl.minimum(f_hi, t_hi), f_lo)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dd = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(0, group):
            h = hk * group + g
            bh = b * hq + h
            if TMA:
                q_src = q_ptr
                do_src = dout_ptr
                q_row = (bh * lq).to(tl.int32)  # TMA coordinates are 32-bit
            else:
                q_src = q_ptr + b * sqb + h * sqh
                do_src = dout_ptr + b * sdob + h * sdoh
                q_row = 0
            for m0 in range(row0 + t_lo * BLOCK_M, row0 + f_lo * BLOCK_M, BLOCK_M):
                dk, dv, dd = _kv_step(
                    dk, dv, dd, k, v, delta, kb, keys, ranks, n_ok, m0, q_src, do_src, q_row,
                    bh, bhk, lse_ptr, di_ptr, thr_ptr, shift_ptr, sqm, sdom, lq, lk, offs_d,
                    d_ok, scale_log2, True, CAUSAL, HAS_KEY_BIAS, TMA, PRECISION, BLOCK_M)
            for m0 in range(row0 + f_lo * BLOCK_M, row0 + f_hi * BLOCK_M, BLOCK_M):
                dk, dv, dd = _kv_step(
                    dk, dv, dd, k, v, delta, kb, keys, ranks, n_ok, m0, q_src, do_src, q_row,
                    bh, bhk, lse_ptr, di_ptr, thr_ptr, shift_ptr, sqm, sdom, lq, lk, offs_d,
                    d_ok, scale_log2, False, CAUSAL, HAS_KEY_BIAS, TMA, PRECISION, BLOCK_M)
            for m0 in range(row0 + f_hi * BLOCK_M, row0 + t_hi * BLOCK_M, BLOCK_M):
                dk, dv, dd = _kv_step(
                    dk, dv, dd, k, v, delta, kb, keys, ranks, n_ok, m0, q_src, do_src, q_row,
                    bh, bhk, lse_ptr, di_ptr, thr_ptr, shift_ptr, sqm, sdom, lq, lk, offs_d,
                    d_ok, scale_log2, True, CAUSAL, HAS_KEY_BIAS, TMA, PRECISION, BLOCK_M)
        head_off = bhk * lk * HEAD_DIM
        kv_off = keys[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dv_ptr + head_off + kv_off, dv, mask=kv_mask, sem="relaxed")
        tl.atomic_add(dk_ptr + head_off + kv_off, dk * scale, mask=kv_mask, sem="relaxed")
        tl.atomic_add(ddelta_ptr + bhk * lk + keys, dd, mask=n_ok, sem="relaxed")


def dma_backward_kv(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    delta: torch.Tensor, key_bias: torch.Tensor | None, lse: torch.Tensor, di: torch.Tensor,
    thr: torch.Tensor, shift: torch.Tensor,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int, causal: bool,
    scale: float, dk: torch.Tensor, dv: torch.Tensor, ddelta: torch.Tensor,
    block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
) -> None:
    """Accumulate dK, dV (float32 ``[B, Hkv, Lk, D]``) and d delta (float32 ``[B, Hkv, Lk]``)
    in place. ``lists`` = ``dma_gather_lists(..., block_m=rows)``; thr/shift from the
    selection; lse the forward's, di ``[B, Hq, Lq]`` float32 from the dQ pass. Q and dO
    tiles come through TMA descriptors where exact (Lq a multiple of ``block_m``)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    ukey, urank, ucount = lists
    descs = row_descriptors(lq % block_m == 0, block_m, q, dout)
    q_arg, do_arg = descs or (q, dout)
    grid = (triton.cdiv(ukey.shape[-1], block_n), triton.cdiv(lq, rows), b * hkv)
    _dma_bwd_kv_kernel[grid](
        q_arg, k, v, delta, key_bias if key_bias is not None else delta, do_arg, lse, di,
        dk, dv, ddelta, thr, shift, ukey, urank, ucount,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        lq, lk, hq, hkv, ukey.shape[-1], scale,
        CAUSAL=causal, HAS_KEY_BIAS=key_bias is not None, HEAD_DIM=d,
        BLOCK_D=TileConfig.d_pad(d), ROWS=rows, BLOCK_M=block_m,
        BLOCK_N=block_n, TMA=descs is not None, PRECISION=TileConfig.precision(q.dtype, d),
        num_warps=num_warps, num_stages=num_stages,
    )
