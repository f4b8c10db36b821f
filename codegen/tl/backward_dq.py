"""Backward kernel family, dQ pass (and the bias gradient).

One program handles BM query rows of one (batch, query head) and visits the same key blocks as
the forward (interval bounds in-kernel or per-row bound arrays, or the compact kv block tables
of the backward layout). It recomputes P = exp2(s − LSE), regenerates the dropout mask from
(seed, offset), and accumulates dQ = scale · dS K with dS = P ∘ (dP − Δ), Δ = rowsum(dO ∘ O)
(times 1 − tanh² under soft-capping). Given the forward output, each program also computes
Δ for its rows and stores it for the dK/dV pass that follows (no separate Δ launch, one read of
dO fewer). When the bias requires grad, dS is
added into a float32 buffer shaped like the bias (broadcast rows / columns summed in-register
first; broadcast batch / head dims meet through atomics).
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.launch.config import TileConfig, launch_groups, merged_loop
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME, Frame, frame_args
from sparse_compile.codegen.launch.tables import Visit, visit_args
from sparse_compile.codegen.launch.tma import row_descriptors
from sparse_compile.codegen.tl.forward import (
    bias_args,
    position_bias_args,
    softcap_args,
)

DQ_SOURCE = '''
@triton.jit
def _dq_block(dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, edge,
              offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
              skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh,
              HEAD_DIM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, FOLD: tl.constexpr,
              HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, BIAS_GRAD: tl.constexpr,
              DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr, SOFTCAP: tl.constexpr,
              CLIP: tl.constexpr, PBIAS: tl.constexpr):
    """MODE 0: FULL; 1: PARTIAL, interval bounds; 2: PARTIAL, predicate at the rows' frame
    (q_pos, kb, c_lo, c_hi; visit.py); 3: interval bounds only where the runtime flag ``edge``
    says PARTIAL (merged loop); 4: the predicate only where ``edge`` says PARTIAL (merged loop
    over the block tables)."""
    k_idx = j * BN + offs_n
    n_ok = k_idx < Lk
    if TMA:
        k = k_src.load([kv_row + j * BN, 0])
        v = v_src.load([kv_row + j * BN, 0])
    else:
        k_ptrs = k_src + k_idx[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = v_src + k_idx[:, None] * svn + offs_d[None, :] * svd
        if EVEN_N and EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kv_mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), PRECISION)
    if SOFTCAP:
        t_cap = _tanh(s * cap_in)
        s = t_cap * cap_out
    elif not FOLD:
        s = s * qk_scale
    s = _bias_and_mask(s, bias_base, offs_m, k_idx, n_ok, sbm, sbn, q_pos, kb, c_lo, c_hi, lo,
                       hi, hp, pbias, edge, MODE, EVEN_N, HAS_BIAS, BIAS_BOOL, CLIP, PBIAS)
    if FOLD:
        # Scale folded into the exponent: one FMA per entry.
        p = tl.math.exp2(s * qk_scale - lse[:, None])
    else:
        p = tl.math.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    if DROPOUT:
        rnd = tl.rand(seed_bh, (offs_m[:, None] * Lk + k_idx[None, :]).to(tl.uint32))
        dp = tl.where(rnd >= drop_p, dp * (1.0 / (1.0 - drop_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:
        db_mask = row_ok[:, None] & n_ok[None, :]
        ds_b = tl.where(db_mask, ds, 0.0)
        if DB_ROWS and DB_COLS:
            tl.atomic_add(dbias_base, tl.sum(tl.sum(ds_b, 1), 0))
        elif DB_ROWS:
            tl.atomic_add(dbias_base + k_idx.to(tl.int64) * dbn, tl.sum(ds_b, 0), mask=n_ok)
        elif DB_COLS:
            tl.atomic_add(dbias_base + offs_m.to(tl.int64) * dbm, tl.sum(ds_b, 1), mask=row_ok)
        else:
            tl.atomic_add(dbias_base + offs_m[:, None].to(tl.int64) * dbm
                          + k_idx[None, :].to(tl.int64) * dbn, ds_b,
                          mask=db_mask)
    if SOFTCAP:
        # Through the cap: d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2.
        ds = ds * (1.0 - t_cap * t_cap)
    dq = _dot_acc(ds.to(k.dtype), k, dq, PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, Bias, DO, LSE, Delta, DQ, DBias, Out,
               PO, PI, FO, FI, t_rows, RLO, RHI, Starts, s_st, DS, DE, Slopes, Rel, s_rh,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod, dbb, dbh, dbm, dbn, sob, soh, som, sod,
               Hq, G, NPH, Lq, Lk, q_first, k_first, scale, qk_scale, cap_in, cap_out, drop_p,
               seed, HG,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, EVEN_N: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_BOOL: tl.constexpr, BIAS_GRAD: tl.constexpr, DB_ROWS: tl.constexpr,
               DB_COLS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
               RANGES: tl.constexpr, TMA: tl.constexpr, MERGED: tl.constexpr,
               SOFTCAP: tl.constexpr, DELTA_FROM_OUT: tl.constexpr, POS_MODE: tl.constexpr,
               PBIAS: tl.constexpr):
    # Groups of HG heads (config.launch_groups); heads fastest within a group, query tiles
    # last-first (longest rows first under causal-like patterns).
    pid_bh = tl.program_id(1) * HG + tl.program_id(0) % HG
    pid_m = tl.cdiv(Lq, BM) - 1 - tl.program_id(0) // HG
    b = pid_bh // Hq
    h = pid_bh % Hq
    hkv = h // G
    hp = h % NPH
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    CLIP: tl.constexpr = POS_MODE != 0
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm
                + offs_d[None, :] * sqd, mask=io_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom
                 + offs_d[None, :] * sdod, mask=io_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
    if DELTA_FROM_OUT:
        o = tl.load(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som
                    + offs_d[None, :] * sod, mask=io_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    if TMA:
        k_src = K
        v_src = V
        kv_row = (b * (Hq // G) + hkv) * Lk
    else:
        k_src = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
        v_src = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
        kv_row = 0
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    dbias_base = DBias + b.to(tl.int64) * dbb + h.to(tl.int64) * dbh
    q_pos, kb, c_lo, c_hi = _row_frame(offs_m, row_ok, b, Lq, Lk, q_first, k_first, Starts,
                                       s_st, DS, DE, POS_MODE)
    seed_bh = seed + pid_bh
    pbias = _position_bias_args(Slopes, Rel, s_rh, h, Lq, Lk, PBIAS)
    dq = tl.zeros([BM, D_PAD], tl.float32)
    if RANGES != 0:
        if RANGES == 2:
            lo = tl.load(RLO + hp * Lq + offs_m, mask=row_ok, other=0)
            hi = tl.load(RHI + hp * Lq + offs_m, mask=row_ok, other=-1)
        else:
            lo, hi = _index_bounds(q_pos, kb, c_lo, c_hi, hp, RANGES == 3)
        j_lo, jf_lo, jf_hi, j_hi = _visit_range(lo, hi, row_ok, Lk, BN)
        if RANGES == 3:
            # The hull of a pattern without block tables: every block under the predicate.
            for j in range(j_lo, j_hi):
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
                    skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 2, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
        elif MERGED:
            for j in range(j_lo, j_hi):
                edge = (j < jf_lo) | (j >= jf_hi)
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, edge,
                    offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
                    skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 3, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
        else:
            for j in range(j_lo, jf_lo):
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
                    skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 1, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
            for j in range(jf_lo, jf_hi):
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
                    skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 0, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
            for j in range(jf_hi, j_hi):
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, row_ok, offs_n, offs_d, skn,
                    skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 1, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
    else:
        row = hp * t_rows + pid_m
        p_start = tl.load(PO + row)
        p_end = tl.load(PO + row + 1)
        f_start = tl.load(FO + row)
        f_end = tl.load(FO + row + 1)
        if MERGED:
            # PARTIAL blocks, then FULL ones, in one loop (one software pipeline per tile).
            n_p = p_end - p_start
            for t in range(0, n_p + f_end - f_start):
                edge = t < n_p
                j = tl.load(tl.where(edge, PI + p_start + t, FI + f_start + (t - n_p)))
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, edge,
                    offs_m, q_pos, kb, c_lo, c_hi, q_pos, q_pos, hp, pbias, row_ok, offs_n, offs_d,
                    skn, skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 4, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
        else:
            for t in range(p_start, p_end):
                j = tl.load(PI + t)
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, q_pos, q_pos, hp, pbias, row_ok, offs_n, offs_d,
                    skn, skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 2, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
            for t in range(f_start, f_end):
                j = tl.load(FI + t)
                dq = _dq_block(
                    dq, q, do, lse, delta, k_src, v_src, kv_row, bias_base, dbias_base, j, False,
                    offs_m, q_pos, kb, c_lo, c_hi, q_pos, q_pos, hp, pbias, row_ok, offs_n, offs_d,
                    skn, skd, svn, svd, sbm, sbn, dbm, dbn, Lk, qk_scale, cap_in, cap_out, drop_p,
                    seed_bh, HEAD_DIM, BN, 0, EVEN_N, EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, BIAS_GRAD,
                    DB_ROWS, DB_COLS, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
    dq = dq * scale
    tl.store(DQ + pid_bh.to(tl.int64) * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=io_mask)
'''


def launch_dq(
    module: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dbias: torch.Tensor | None,
    visit: Visit,
    num_pattern_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
    cfg: TileConfig,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """dQ [B, Hq, Lq, D] (q's dtype, contiguous); adds the bias gradient into ``dbias``.

    lse, delta: [B, Hq, Lq] float32. dbias: None or float32 shaped like the 4-D bias. With
    ``out`` (the forward output), the kernel computes Δ = rowsum(dO ∘ O) and writes it into
    ``delta`` (then only an allocated buffer) for the dK/dV pass. ``frame``: where queries
    and keys sit (codegen/launch/positions.py).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    bias_t, bias_strides = bias_args(bias, q)
    dbias_t, db_strides = bias_args(dbias, q)
    pb_args, pb_flags = position_bias_args(alibi, rel_bias, q)
    if dq.numel() == 0:
        return dq
    descs = row_descriptors(cfg.dq_tma and lk % cfg.dq_n == 0, cfg.dq_n, k, v)
    k_arg, v_arg = descs or (k, v)
    hg = launch_groups(b * hq, cfg.head_group)
    grid = (hg * triton.cdiv(lq, cfg.dq_m), b * hq // hg)
    pos_ptrs, (q_first, k_first) = frame_args(frame, lq, lk, q)
    module._dq_kernel[grid](
        q, k_arg, v_arg, bias_t, dout, lse, delta, dq, dbias_t, dout if out is None else out,
        *visit_args(visit, q), *pos_ptrs, *pb_args,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *dout.stride(), *db_strides,
        *(dout if out is None else out).stride(),
        hq, hq // hkv, num_pattern_heads, lq, lk, q_first, k_first, scale,
        scale * 1.4426950408889634,
        *softcap_args(scale, softcap), dropout_p, seed, hg,
        HEAD_DIM=d, D_PAD=cfg.d_pad(d), BM=cfg.dq_m, BN=cfg.dq_n,
        EVEN_N=lk % cfg.dq_n == 0,
        FOLD=bias is None and pb_flags == 0 and scale > 0 and not softcap,
        HAS_BIAS=bias is not None,
        BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        BIAS_GRAD=dbias is not None,
        DB_ROWS=dbias is not None and dbias.shape[2] == 1,
        DB_COLS=dbias is not None and dbias.shape[3] == 1,
        DROPOUT=dropout_p > 0.0, PRECISION=cfg.precision(q.dtype, d), RANGES=visit.ranges,
        TMA=descs is not None, MERGED=merged_loop(cfg.dq_merged, (lk, cfg.dq_n)),
        SOFTCAP=softcap > 0,
        DELTA_FROM_OUT=out is not None, POS_MODE=frame.mode, PBIAS=pb_flags,
        num_warps=cfg.dq_warps,
        num_stages=cfg.dq_stages,
    )
    return dq
