"""Backward kernel family, dK/dV pass.

One program owns BN keys of one (batch, kv head) and loops over the Hq/Hkv query heads that
share it (GQA without atomics), visiting only non-empty query blocks: PARTIAL blocks with the
predicate (or the interval bounds) inlined, FULL blocks without mask arithmetic. Interval
patterns find their query-row ranges in-kernel: lo(Q) and hi(Q) are non-decreasing, so the rows
that keep some key of the block, and the rows that keep all of them, are intervals found by
binary search (no index tensor); other patterns read the transposed block tables.
Works in the transposed orientation (keys x queries): dV += Pᵀ dO, dK += scale · dSᵀ Q.
"""

from __future__ import annotations

import torch
import triton

from .config import TileConfig
from .forward import bias_args, table_args
from .tables import BlockTables

DKDV_SOURCE = '''
@triton.jit
def _first_row(Lq, Lk, hp, target, USE_HI: tl.constexpr):
    """First query index i in [0, Lq] with hi(i) >= target (USE_HI) or lo(i) > target."""
    # Tensors from the start: Triton may specialise Lq == 1 into a constant.
    a = tl.full([], 0, tl.int32)
    b = tl.full([], 0, tl.int32) + Lq
    while a < b:
        mid = (a + b) // 2
        lo, hi = _bounds(mid + (Lk - Lq), hp)
        if USE_HI:
            ok = hi >= target
        else:
            ok = lo > target
        a = tl.where(ok, a, mid + 1)
        b = tl.where(ok, mid, b)
    return a


@triton.jit
def _row_blocks(Lq, Lk, hp, n_first, n_last, BM: tl.constexpr):
    """Query-block ranges (i_lo, if_lo, if_hi, i_hi) for keys [n_first, n_last]: PARTIAL
    [i_lo, if_lo), FULL [if_lo, if_hi), PARTIAL [if_hi, i_hi)."""
    q_a = _first_row(Lq, Lk, hp, n_first, True)
    q_b = _first_row(Lq, Lk, hp, n_last, False)
    qf_a = _first_row(Lq, Lk, hp, n_last, True)
    qf_b = _first_row(Lq, Lk, hp, n_first, False)
    i_lo = q_a // BM
    i_hi = tl.where(q_b > q_a, (q_b + BM - 1) // BM, i_lo)
    # Rows past Lq are inert (LSE = +inf), so a last block ending at Lq may count as FULL.
    f_end = tl.where(qf_b >= Lq, (Lq + BM - 1) // BM, qf_b // BM)
    if_lo = tl.maximum((qf_a + BM - 1) // BM, i_lo)
    if_hi = tl.minimum(f_end, i_hi)
    has_full = (if_lo < if_hi) & (qf_b > qf_a)
    if_lo = tl.where(has_full, if_lo, i_hi)
    if_hi = tl.where(has_full, if_hi, i_hi)
    return i_lo, if_lo, if_hi, i_hi


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, k_idx,
                n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                drop_p, seed_bh,
                HEAD_DIM: tl.constexpr, BM: tl.constexpr, MODE: tl.constexpr,
                EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr,
                DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """MODE 0: FULL block; 1: PARTIAL, interval bounds; 2: PARTIAL, inlined predicate."""
    q_idx = i * BM + offs_m
    m_ok = q_idx < Lq
    d_ok = offs_d < HEAD_DIM
    io_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + q_idx[:, None] * sqm + offs_d[None, :] * sqd, mask=io_mask, other=0.0)
    do = tl.load(do_base + q_idx[:, None] * sdom + offs_d[None, :] * sdod, mask=io_mask,
                 other=0.0)
    lse = tl.load(lse_base + q_idx, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_base + q_idx, mask=m_ok, other=0.0)
    q_pos = q_idx + (Lk - Lq)
    s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_base + q_idx[None, :] * sbm + k_idx[:, None] * sbn,
                       mask=m_ok[None, :] & n_ok[:, None], other=0)
        if BIAS_BOOL:
            s_t = tl.where(bias != 0, s_t, float("-inf"))
        else:
            s_t = s_t + bias.to(tl.float32) * 1.4426950408889634
    if MODE == 1:
        lo, hi = _bounds(q_pos, hp)
        kept = (k_idx[:, None] >= lo[None, :]) & (k_idx[:, None] <= hi[None, :])
        s_t = tl.where(kept & n_ok[:, None], s_t, float("-inf"))
    elif MODE == 2:
        kept = _keep(q_pos[None, :], k_idx[:, None], hp) & n_ok[:, None]
        s_t = tl.where(kept, s_t, float("-inf"))
    elif not EVEN_N:
        s_t = tl.where(n_ok[:, None], s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    dp_t = _dot(v, tl.trans(do), PRECISION)
    if DROPOUT:
        rnd = tl.rand(seed_bh, (q_idx[None, :] * Lk + k_idx[:, None]).to(tl.uint32))
        drop_keep = rnd >= drop_p
        inv = 1.0 / (1.0 - drop_p)
        pd_t = tl.where(drop_keep, p_t * inv, 0.0)
        dp_t = tl.where(drop_keep, dp_t * inv, 0.0)
    else:
        pd_t = p_t
    dv += _dot(pd_t.to(do.dtype), do, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, Bias, DO, LSE, Delta, DK, DV,
                 PC, PI, FC, FI, t_h, t_m,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod,
                 Hq, Hkv, G, NPH, Lq, Lk, scale, qk_scale, drop_p, seed,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_BOOL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // Hkv
    hkv = pid_bkv % Hkv
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh + offs_n[:, None] * skn
                + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh + offs_n[:, None] * svn
                + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BN, D_PAD], tl.float32)
    dv = tl.zeros([BN, D_PAD], tl.float32)
    for g in range(G):
        h = hkv * G + g
        hp = h % NPH
        pid_bh = b * Hq + h
        seed_bh = seed + pid_bh
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        lse_base = LSE + pid_bh.to(tl.int64) * Lq
        delta_base = Delta + pid_bh.to(tl.int64) * Lq
        bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        if INTERVAL:
            n_last = tl.minimum(pid_n * BN + BN, Lk) - 1
            i_lo, if_lo, if_hi, i_hi = _row_blocks(Lq, Lk, hp, pid_n * BN, n_last, BM)
            for i in range(i_lo, if_lo):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, offs_n,
                    n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                    drop_p, seed_bh, HEAD_DIM, BM, 1, EVEN_N, HAS_BIAS, BIAS_BOOL, DROPOUT,
                    PRECISION)
            for i in range(if_lo, if_hi):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, offs_n,
                    n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                    drop_p, seed_bh, HEAD_DIM, BM, 0, EVEN_N, HAS_BIAS, BIAS_BOOL, DROPOUT,
                    PRECISION)
            for i in range(if_hi, i_hi):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, offs_n,
                    n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                    drop_p, seed_bh, HEAD_DIM, BM, 1, EVEN_N, HAS_BIAS, BIAS_BOOL, DROPOUT,
                    PRECISION)
        else:
            row = hp * t_h + pid_n * t_m
            n_part = tl.load(PC + hp * (t_h // t_m) + pid_n)
            for t in range(n_part):
                i = tl.load(PI + row + t)
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, offs_n,
                    n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                    drop_p, seed_bh, HEAD_DIM, BM, 2, EVEN_N, HAS_BIAS, BIAS_BOOL, DROPOUT,
                    PRECISION)
            n_full = tl.load(FC + hp * (t_h // t_m) + pid_n)
            for t in range(n_full):
                i = tl.load(FI + row + t)
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, i, offs_n,
                    n_ok, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk, qk_scale,
                    drop_p, seed_bh, HEAD_DIM, BM, 0, EVEN_N, HAS_BIAS, BIAS_BOOL, DROPOUT,
                    PRECISION)
    dk = dk * scale
    out = pid_bkv.to(tl.int64) * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)
'''


def launch_dkdv(
    module: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    tables: BlockTables | None,
    num_pattern_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
    cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV [B, Hkv, Lk, D] (k's / v's dtype, contiguous).

    ``tables`` are the transposed (per key block) tables of the layout (cfg.kv_m, cfg.kv_n),
    or None for interval patterns.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dk = torch.empty((b, hkv, lk, d), device=k.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, d), device=v.device, dtype=v.dtype)
    bias_t, bias_strides = bias_args(bias, q)
    pc, pi, fc, fi, t_h, t_m = table_args(tables, q)
    grid = (triton.cdiv(lk, cfg.kv_n), b * hkv)
    module._dkdv_kernel[grid](
        q, k, v, bias_t, dout, lse, delta, dk, dv,
        pc, pi, fc, fi, t_h, t_m,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *dout.stride(),
        hq, hkv, hq // hkv, num_pattern_heads, lq, lk, scale, scale * 1.4426950408889634,
        dropout_p, seed,
        HEAD_DIM=d, D_PAD=cfg.d_pad(d), BM=cfg.kv_m, BN=cfg.kv_n,
        EVEN_N=lk % cfg.kv_n == 0, HAS_BIAS=bias is not None,
        BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        DROPOUT=dropout_p > 0.0, PRECISION=cfg.precision(q.dtype),
        num_warps=cfg.kv_warps, num_stages=cfg.kv_stages,
    )
    return dk, dv
