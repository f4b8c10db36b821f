"""Backward kernel family, dK/dV pass.

One program owns BN keys of one (batch, kv head) and loops over the Hq/Hkv query heads that
share it (GQA without atomics), visiting only non-empty query blocks: PARTIAL blocks with the
predicate (or the interval bounds) inlined, FULL blocks without mask arithmetic. Interval
patterns find their query-row ranges in-kernel: lo(Q) and hi(Q) are non-decreasing, so the rows
that keep some key of the block, and the rows that keep all of them, are intervals found by
binary search on the closed form or on the per-row bound arrays (no index tensor); other
patterns read the compact transposed block tables. Works in the transposed orientation
(keys x queries): dV += Pᵀ dO, dK += scale · dSᵀ Q, Q/dO tiles through TMA where exact.
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.launch.config import TileConfig, launch_groups, merged_loop
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME, Frame, frame_args
from sparse_compile.codegen.launch.tables import Visit, visit_args
from sparse_compile.codegen.launch.tma import TensorDescriptor, row_descriptors, tma_supported
from sparse_compile.codegen.tl.forward import (
    bias_args,
    position_bias_args,
    softcap_args,
)


def reduce_descriptor(dq_acc: torch.Tensor, block_rows: int) -> object | None:
    """TMA descriptor of the float32 dQ buffer [B, Hq, Lq, D] as rows [B*Hq*Lq, D] with
    ``block_rows x D`` tiles (a reduce-add target), or None where TMA does not apply (also on
    the CPU: the interpreter has no descriptor reduce, so it runs the pointer atomics)."""
    d = dq_acc.shape[-1]
    if dq_acc.device.type != "cuda" or not tma_supported(dq_acc.device):
        return None
    if d < 16 or d & (d - 1) or d > 256:
        return None
    if not dq_acc.is_contiguous() or dq_acc.data_ptr() % 16:
        return None
    rows = dq_acc.numel() // d
    return TensorDescriptor(dq_acc, [rows, d], [d, 1], [block_rows, d])


DKDV_SOURCE = '''
@triton.jit
def _row_bounds_at(i, b, Lq, Lk, hp, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
                   RANGES: tl.constexpr, POS_MODE: tl.constexpr):
    """(lo, hi) key indices of query index i (scalar or vector): the row-bound arrays
    (RANGES 2), else the closed form (1) or the hull (3) at the row's frame (visit.py)."""
    if RANGES == 2:
        r = tl.minimum(tl.maximum(i, 0), Lq - 1)
        lo = tl.load(RLO + hp * Lq + r)
        hi = tl.load(RHI + hp * Lq + r)
    else:
        q_pos, kb, c_lo, c_hi = _row_frame(i, (i >= 0) & (i < Lq), b, Lq, Lk, q_first, k_first,
                                           Starts, s_st, DS, DE, POS_MODE)
        lo, hi = _index_bounds(q_pos, kb, c_lo, c_hi, hp, RANGES == 3)
    return lo, hi


@triton.jit
def _first_row(b, Lq, Lk, hp, target, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
               USE_HI: tl.constexpr, RANGES: tl.constexpr, POS_MODE: tl.constexpr):
    """First query index i in [0, Lq] with hi(i) >= target (USE_HI) or lo(i) > target."""
    # Tensors from the start: Triton may specialise Lq == 1 into a constant.
    a = tl.full([], 0, tl.int32)
    e = tl.full([], 0, tl.int32) + Lq
    while a < e:
        mid = (a + e) // 2
        lo, hi = _row_bounds_at(mid, b, Lq, Lk, hp, RLO, RHI, q_first, k_first, Starts, s_st,
                                DS, DE, RANGES, POS_MODE)
        if USE_HI:
            ok = hi >= target
        else:
            ok = lo > target
        a = tl.where(ok, a, mid + 1)
        e = tl.where(ok, mid, e)
    return a


@triton.jit
def _row_blocks(b, Lq, Lk, hp, n_first, n_last, RLO, RHI, q_first, k_first, Starts, s_st, DS,
                DE, BM: tl.constexpr, RANGES: tl.constexpr, POS_MODE: tl.constexpr):
    """Query-block ranges (i_lo, if_lo, if_hi, i_hi) for keys [n_first, n_last]: PARTIAL
    [i_lo, if_lo), FULL [if_lo, if_hi), PARTIAL [if_hi, i_hi)."""
    q_a = _first_row(b, Lq, Lk, hp, n_first, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
                     True, RANGES, POS_MODE)
    q_b = _first_row(b, Lq, Lk, hp, n_last, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
                     False, RANGES, POS_MODE)
    qf_a = _first_row(b, Lq, Lk, hp, n_last, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
                      True, RANGES, POS_MODE)
    qf_b = _first_row(b, Lq, Lk, hp, n_first, RLO, RHI, q_first, k_first, Starts, s_st, DS, DE,
                      False, RANGES, POS_MODE)
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
def _kept_entries_t(q_idx, m_ok, b, k_idx, n_ok, hp, Lq, Lk, q_first, k_first, Starts, s_st, DS,
                    DE, POS_MODE: tl.constexpr):
    """[BN, BM] entries the predicate keeps (keys x queries) at the rows' frame (visit.py)."""
    q_pos, kb, c_lo, c_hi = _row_frame(q_idx, m_ok, b, Lq, Lk, q_first, k_first, Starts, s_st,
                                       DS, DE, POS_MODE)
    kept = _keep(q_pos[None, :], k_idx[:, None] - kb[None, :], hp) & n_ok[:, None]
    if POS_MODE != 0:
        kept = kept & (k_idx[:, None] >= c_lo[None, :]) & (k_idx[:, None] <= c_hi[None, :])
    return kept


@triton.jit
def _dkdv_block(dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                edge, k_idx, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn, Lq, Lk,
                qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first, k_first, Starts,
                s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM: tl.constexpr, BM: tl.constexpr,
                MODE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                FOLD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr,
                DROPOUT: tl.constexpr, PRECISION: tl.constexpr, RANGES: tl.constexpr,
                TMA: tl.constexpr, SOFTCAP: tl.constexpr, FUSED_DQ: tl.constexpr,
                POS_MODE: tl.constexpr, PBIAS: tl.constexpr):
    """MODE 0: FULL block; 1: PARTIAL, interval bounds; 2: PARTIAL, inlined predicate at the
    rows' frame (visit.py); 3: interval bounds only where the runtime flag ``edge`` says
    PARTIAL (merged loop); 4: the predicate only where ``edge`` says PARTIAL (merged loop over
    the block tables). FUSED_DQ 1: dS K added into the float32 dQ rows by pointer atomics; 2:
    by a TMA reduce."""
    q_idx = i * BM + offs_m
    m_ok = q_idx < Lq
    if TMA:
        q = q_src.load([q_row + i * BM, 0])
        do = do_src.load([q_row + i * BM, 0])
    else:
        q_ptrs = q_src + q_idx[:, None] * sqm + offs_d[None, :] * sqd
        do_ptrs = do_src + q_idx[:, None] * sdom + offs_d[None, :] * sdod
        if EVEN_D:
            io_mask = m_ok[:, None]
        else:
            io_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)
        do = tl.load(do_ptrs, mask=io_mask, other=0.0)
    lse = tl.load(lse_base + q_idx, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_base + q_idx, mask=m_ok, other=0.0)
    s_t = _dot(k, tl.trans(q), PRECISION)
    if SOFTCAP:
        t_cap = _tanh(s_t * cap_in)
        s_t = t_cap * cap_out
    elif not FOLD:
        s_t = s_t * qk_scale
    if PBIAS != 0:
        q_pos, kb, _, _ = _row_frame(q_idx, m_ok, b, Lq, Lk, q_first, k_first, Starts, s_st, DS,
                                     DE, POS_MODE)
        s_t = _position_bias(s_t, q_pos[None, :], k_idx[:, None] - kb[None, :], pbias, PBIAS)
    if HAS_BIAS:
        bias = tl.load(bias_base + q_idx[None, :].to(tl.int64) * sbm
                       + k_idx[:, None].to(tl.int64) * sbn,
                       mask=m_ok[None, :] & n_ok[:, None], other=0)
        if BIAS_BOOL:
            s_t = tl.where(bias != 0, s_t, float("-inf"))
        else:
            s_t = s_t + bias.to(tl.float32) * 1.4426950408889634
    if MODE == 1:
        lo, hi = _row_bounds_at(q_idx, b, Lq, Lk, hp, RLO, RHI, q_first, k_first, Starts,
                                s_st, DS, DE, RANGES, POS_MODE)
        kept = (k_idx[:, None] >= lo[None, :]) & (k_idx[:, None] <= hi[None, :])
        s_t = tl.where(kept & n_ok[:, None], s_t, float("-inf"))
    elif MODE == 2:
        kept = _kept_entries_t(q_idx, m_ok, b, k_idx, n_ok, hp, Lq, Lk, q_first, k_first,
                               Starts, s_st, DS, DE, POS_MODE)
        s_t = tl.where(kept, s_t, float("-inf"))
    elif MODE == 3:
        if edge:
            lo, hi = _row_bounds_at(q_idx, b, Lq, Lk, hp, RLO, RHI, q_first, k_first,
                                    Starts, s_st, DS, DE, RANGES, POS_MODE)
            kept = (k_idx[:, None] >= lo[None, :]) & (k_idx[:, None] <= hi[None, :])
            s_t = tl.where(kept & n_ok[:, None], s_t, float("-inf"))
        elif not EVEN_N:
            s_t = tl.where(n_ok[:, None], s_t, float("-inf"))
    elif MODE == 4:
        if edge:
            kept = _kept_entries_t(q_idx, m_ok, b, k_idx, n_ok, hp, Lq, Lk, q_first, k_first,
                                   Starts, s_st, DS, DE, POS_MODE)
            s_t = tl.where(kept, s_t, float("-inf"))
        elif not EVEN_N:
            s_t = tl.where(n_ok[:, None], s_t, float("-inf"))
    elif not EVEN_N:
        s_t = tl.where(n_ok[:, None], s_t, float("-inf"))
    if FOLD:
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    else:
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
    dv = _dot_acc(pd_t.to(do.dtype), do, dv, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_cap * t_cap)
    ds_c = ds_t.to(q.dtype)
    dk = _dot_acc(ds_c, q, dk, PRECISION)
    if FUSED_DQ != 0:
        # dQ rows of this block (unscaled; the host epilogue multiplies by scale).
        dq_part = _dot(tl.trans(ds_c), k, PRECISION)
        if FUSED_DQ == 2:
            dq_dst.atomic_add([dq_row + i * BM, 0], dq_part)
        else:
            dq_ptrs = dq_dst + q_idx[:, None] * HEAD_DIM + offs_d[None, :]
            if EVEN_D:
                dq_mask = m_ok[:, None]
            else:
                dq_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            tl.atomic_add(dq_ptrs, dq_part, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, Bias, DO, LSE, Delta, DK, DV, DQA,
                 PO, PI, FO, FI, t_rows, RLO, RHI, Starts, s_st, DS, DE, Slopes, Rel, s_rh,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod,
                 Hq, Hkv, G, NPH, Lq, Lk, q_first, k_first, scale, qk_scale, cap_in, cap_out,
                 drop_p, seed, HG,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, EVEN_N: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_BOOL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                 RANGES: tl.constexpr, TMA: tl.constexpr, MERGED: tl.constexpr,
                 SOFTCAP: tl.constexpr, FUSED_DQ: tl.constexpr, POS_MODE: tl.constexpr,
                 PBIAS: tl.constexpr):
    # Groups of HG kv heads (config.launch_groups); heads fastest within a group, key blocks
    # in order (under causal the first key blocks are the longest).
    pid_bkv = tl.program_id(1) * HG + tl.program_id(0) % HG
    pid_n = tl.program_id(0) // HG
    b = pid_bkv // Hkv
    hkv = pid_bkv % Hkv
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
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
        pbias = _position_bias_args(Slopes, Rel, s_rh, h, Lq, Lk, PBIAS)
        if TMA:
            q_src = Q
            do_src = DO
            q_row = pid_bh * Lq
        else:
            q_src = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            do_src = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
            q_row = 0
        lse_base = LSE + pid_bh.to(tl.int64) * Lq
        delta_base = Delta + pid_bh.to(tl.int64) * Lq
        bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        if FUSED_DQ == 2:
            dq_dst = DQA
            dq_row = pid_bh * Lq
        else:
            dq_dst = DQA + pid_bh.to(tl.int64) * Lq * HEAD_DIM
            dq_row = 0
        if RANGES != 0:
            n_last = tl.minimum(pid_n * BN + BN, Lk) - 1
            i_lo, if_lo, if_hi, i_hi = _row_blocks(b, Lq, Lk, hp, pid_n * BN, n_last, RLO, RHI,
                                                   q_first, k_first, Starts, s_st, DS, DE, BM,
                                                   RANGES, POS_MODE)
            if RANGES == 3:
                # The hull of a pattern without block tables: every block under the predicate.
                for i in range(i_lo, i_hi):
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 2,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
            elif MERGED:
                for i in range(i_lo, i_hi):
                    edge = (i < if_lo) | (i >= if_hi)
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        edge, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 3,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
            else:
                for i in range(i_lo, if_lo):
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 1,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
                for i in range(if_lo, if_hi):
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 0,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
                for i in range(if_hi, i_hi):
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 1,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
        else:
            row = hp * t_rows + pid_n
            p_start = tl.load(PO + row)
            p_end = tl.load(PO + row + 1)
            f_start = tl.load(FO + row)
            f_end = tl.load(FO + row + 1)
            if MERGED:
                # PARTIAL blocks, then FULL ones, in one loop (one software pipeline).
                n_p = p_end - p_start
                for t in range(0, n_p + f_end - f_start):
                    edge = t < n_p
                    i = tl.load(tl.where(edge, PI + p_start + t, FI + f_start + (t - n_p)))
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        edge, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 4,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
            else:
                for t in range(p_start, p_end):
                    i = tl.load(PI + t)
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 2,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
                for t in range(f_start, f_end):
                    i = tl.load(FI + t)
                    dk, dv = _dkdv_block(
                        dk, dv, k, v, q_src, do_src, q_row, lse_base, delta_base, bias_base, i,
                        False, offs_n, n_ok, b, hp, offs_m, offs_d, sqm, sqd, sdom, sdod, sbm, sbn,
                        Lq, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, RLO, RHI, q_first,
                        k_first, Starts, s_st, DS, DE, dq_dst, dq_row, pbias, HEAD_DIM, BM, 0,
                        EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, RANGES, TMA,
                        SOFTCAP, FUSED_DQ, POS_MODE, PBIAS)
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
    visit: Visit,
    num_pattern_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
    cfg: TileConfig,
    softcap: float = 0.0,
    dq_acc: torch.Tensor | None = None,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV [B, Hkv, Lk, D] (k's / v's dtype, contiguous).

    ``visit``: closed form, row bounds, or the transposed (per key block) tables of the layout
    (cfg.kv_m, cfg.kv_n). ``dq_acc``: None (two-pass backward), or a zeroed float32
    [B, Hq, Lq, D] contiguous buffer into which the pass adds dS K (dQ / scale) by atomics
    (cfg.bwd_fused: 1 pointer atomics, 2 a TMA reduce-add where exact). ``frame``: where
    queries and keys sit (codegen/launch/positions.py).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dk = torch.empty((b, hkv, lk, d), device=k.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, d), device=v.device, dtype=v.dtype)
    bias_t, bias_strides = bias_args(bias, q)
    pb_args, pb_flags = position_bias_args(alibi, rel_bias, q)
    if dk.numel() == 0:
        return dk, dv
    descs = row_descriptors(cfg.kv_tma and lq % cfg.kv_m == 0, cfg.kv_m, q, dout)
    q_arg, do_arg = descs or (q, dout)
    fused, dq_arg = 0, dk
    if dq_acc is not None:
        fused, dq_arg = 1, dq_acc
        if cfg.bwd_fused == 2 and lq % cfg.kv_m == 0:
            desc = reduce_descriptor(dq_acc, cfg.kv_m)
            if desc is not None:
                fused, dq_arg = 2, desc
    hg = launch_groups(b * hkv, cfg.head_group)
    grid = (hg * triton.cdiv(lk, cfg.kv_n), b * hkv // hg)
    pos_ptrs, (q_first, k_first) = frame_args(frame, lq, lk, q)
    module._dkdv_kernel[grid](
        q_arg, k, v, bias_t, do_arg, lse, delta, dk, dv, dq_arg, *visit_args(visit, q),
        *pos_ptrs, *pb_args, *q.stride(), *k.stride(), *v.stride(), *bias_strides, *dout.stride(),
        hq, hkv, hq // hkv, num_pattern_heads, lq, lk, q_first, k_first, scale,
        scale * 1.4426950408889634,
        *softcap_args(scale, softcap), dropout_p, seed, hg,
        HEAD_DIM=d, D_PAD=cfg.d_pad(d), BM=cfg.kv_m, BN=cfg.kv_n,
        EVEN_N=lk % cfg.kv_n == 0,
        FOLD=bias is None and pb_flags == 0 and scale > 0 and not softcap,
        HAS_BIAS=bias is not None,
        BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        DROPOUT=dropout_p > 0.0, PRECISION=cfg.precision(q.dtype, d), RANGES=visit.ranges,
        TMA=descs is not None, MERGED=merged_loop(cfg.kv_merged, (lq, cfg.kv_m), (lk, cfg.kv_n)),
        SOFTCAP=softcap > 0, FUSED_DQ=fused, POS_MODE=frame.mode, PBIAS=pb_flags,
        num_warps=cfg.kv_warps,
        num_stages=cfg.kv_stages,
    )
    return dk, dv
