"""Forward kernel family: O = softmax(scale·QKᵀ + bias | pattern) V, saving the log-sum-exp.

One program handles BM query rows of one (batch, query head). It visits only non-empty key
blocks: FULL blocks with no mask arithmetic, PARTIAL blocks with the pattern predicate inlined.
Scores are kept in log2 units (scale·log2(e) folded into the exp2 argument) and accumulated in
float32 in place (``tl.dot(p, v, acc)``). The saved LSE is also in log2 units; rows with no kept
key get LSE = +inf (so the backward's exp2(s − LSE) is 0 there) and output zeros. Interval
patterns (closed-form bounds, or per-row bound arrays for interval unions) loop over one range
of key blocks with the interval mask applied only on PARTIAL blocks; other patterns read the
compact block tables. K/V tiles come through TMA descriptors where that is exact (tma.py).
Optional logit soft-capping: softcap·tanh(scale·s/softcap) before bias and masks.
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.launch.config import TileConfig, launch_groups, merged_loop
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME, Frame, frame_args
from sparse_compile.codegen.launch.tables import Visit, placeholder, visit_args
from sparse_compile.codegen.launch.tma import row_descriptors

from sparse_compile.heads_layout import empty_output

FORWARD_SOURCE = '''
@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, edge, offs_m, q_pos, kb,
               c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
               qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM: tl.constexpr,
               BN: tl.constexpr,
               MODE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
               FOLD: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
               SOFTCAP: tl.constexpr, CLIP: tl.constexpr, PBIAS: tl.constexpr):
    """MODE 0: FULL block; 1: PARTIAL, interval bounds; 2: PARTIAL, inlined predicate at the
    rows' frame (q_pos, kb, c_lo, c_hi; visit.py); 3: interval bounds applied only when the
    runtime flag ``edge`` says the block is PARTIAL (one loop over all blocks: one software
    pipeline per tile instead of three); 4: the predicate only where ``edge`` says PARTIAL
    (one loop over both block tables).

    FOLD (no bias, scale > 0): scores stay unscaled and the scale is folded into the exp2
    argument (one FMA per entry), since max(scale * s) = scale * max(s). SOFTCAP: logits
    capped as softcap * tanh(scale * s / softcap) (cap_in = scale / softcap, cap_out =
    softcap * log2(e)) before bias and masks. TMA: k_src / v_src
    are row descriptors (this tile's rows start at kv_row + j * BN), else base pointers."""
    k_idx = j * BN + offs_n
    n_ok = k_idx < Lk
    if TMA:
        k = tl.trans(k_src.load([kv_row + j * BN, 0]))
    else:
        k_ptrs = k_src + k_idx[None, :] * skn + offs_d[:, None] * skd
        if EVEN_N and EVEN_D:
            k = tl.load(k_ptrs)
        elif EVEN_N:
            k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=n_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    s = _dot(q, k, PRECISION)
    if SOFTCAP:
        s = _tanh(s * cap_in) * cap_out
    elif not FOLD:
        s = s * qk_scale
    s = _bias_and_mask(s, bias_base, offs_m, k_idx, n_ok, sbm, sbn, q_pos, kb, c_lo, c_hi, lo,
                       hi, hp, pbias, edge, MODE, EVEN_N, HAS_BIAS, BIAS_BOOL, CLIP, PBIAS)
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MODE == 0 and not HAS_BIAS:
        # Every row of a FULL block keeps a key: the running maximum is finite.
        m_safe = m_new
    else:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FOLD:
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    else:
        p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        rnd = tl.rand(seed_bh, (offs_m[:, None] * Lk + k_idx[None, :]).to(tl.uint32))
        p = tl.where(rnd >= drop_p, p * (1.0 / (1.0 - drop_p)), 0.0)
    if TMA:
        v = v_src.load([kv_row + j * BN, 0])
    else:
        v_ptrs = v_src + k_idx[:, None] * svn + offs_d[None, :] * svd
        if EVEN_N and EVEN_D:
            v = tl.load(v_ptrs)
        elif EVEN_N:
            v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    acc = acc * alpha[:, None]
    acc = _dot_acc(p.to(v.dtype), v, acc, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Out, LSE,
                PO, PI, FO, FI, t_rows, RLO, RHI, Starts, s_st, DS, DE, Slopes, Rel, s_rh,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sbb, sbh, sbm, sbn, sob, soh, som, sod,
                Hq, G, NPH, Lq, Lk, q_first, k_first, qk_scale, cap_in, cap_out, drop_p, seed,
                HG, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, EVEN_N: tl.constexpr, FOLD: tl.constexpr,
                HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, RANGES: tl.constexpr, TMA: tl.constexpr,
                MERGED: tl.constexpr, SOFTCAP: tl.constexpr, POS_MODE: tl.constexpr,
                PBIAS: tl.constexpr):
    # Groups of HG heads one after another (config.launch_groups); within a group heads vary
    # fastest and query tiles are issued last-first: under causal-like patterns the longest
    # rows start first, which shortens the tail of the launch.
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
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if TMA:
        k_src = K
        v_src = V
        kv_row = (b * (Hq // G) + hkv) * Lk
    else:
        k_src = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
        v_src = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
        kv_row = 0
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    q_pos, kb, c_lo, c_hi = _row_frame(offs_m, row_ok, b, Lq, Lk, q_first, k_first, Starts,
                                       s_st, DS, DE, POS_MODE)
    seed_bh = seed + pid_bh
    pbias = _position_bias_args(Slopes, Rel, s_rh, h, Lq, Lk, PBIAS)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D_PAD], tl.float32)
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
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
                    qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 2, EVEN_N, EVEN_D,
                    FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
        elif MERGED:
            for j in range(j_lo, j_hi):
                edge = (j < jf_lo) | (j >= jf_hi)
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, edge, offs_m, q_pos, kb,
                    c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
                    qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 3, EVEN_N, EVEN_D,
                    FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
        else:
            for j in range(j_lo, jf_lo):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
                    qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 1, EVEN_N, EVEN_D,
                    FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
            for j in range(jf_lo, jf_hi):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
                    qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 0, EVEN_N, EVEN_D,
                    FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
            for j in range(jf_hi, j_hi):
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, lo, hi, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm, sbn, Lk,
                    qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 1, EVEN_N, EVEN_D,
                    FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP, PBIAS)
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
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, edge, offs_m, q_pos, kb,
                    c_lo, c_hi, q_pos, q_pos, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm,
                    sbn, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 4, EVEN_N,
                    EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP,
                    PBIAS)
        else:
            for t in range(p_start, p_end):
                j = tl.load(PI + t)
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, q_pos, q_pos, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm,
                    sbn, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 2, EVEN_N,
                    EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP,
                    PBIAS)
            for t in range(f_start, f_end):
                j = tl.load(FI + t)
                acc, l_i, m_i = _fwd_block(
                    acc, l_i, m_i, q, k_src, v_src, kv_row, bias_base, j, False, offs_m, q_pos, kb,
                    c_lo, c_hi, q_pos, q_pos, hp, pbias, offs_n, offs_d, skn, skd, svn, svd, sbm,
                    sbn, Lk, qk_scale, cap_in, cap_out, drop_p, seed_bh, HEAD_DIM, BN, 0, EVEN_N,
                    EVEN_D, FOLD, HAS_BIAS, BIAS_BOOL, DROPOUT, PRECISION, TMA, SOFTCAP, CLIP,
                    PBIAS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)
'''


def launch_forward(
    module: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    visit: Visit,
    num_pattern_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
    cfg: TileConfig,
    softcap: float = 0.0,
    out_dtype: torch.dtype | None = None,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    query_layout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel of a generated ``module``.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (any strides), bias None or a 4-D tensor broadcast
    to [B, Hq, Lq, Lk] through stride-0 dims (bool as uint8). ``visit`` says how the kernel
    finds its key blocks (kv tables for (cfg.fwd_m, cfg.fwd_n) when it reads tables).
    ``softcap`` > 0 caps the logits as softcap * tanh(scale * s / softcap) before bias / masks.
    ``frame``: where queries and keys sit (codegen/launch/positions.py); ``alibi``: None or
    float32 per-query-head slopes ``[Hq]`` (logits + slope * (k_pos - q_pos)); ``rel_bias``:
    None or a float32 relative-bias table ``[Hq or 1, Lq + Lk - 1]`` (logits +
    table[h, clamp(q_pos - k_pos + Lq - 1)], visit.py ``_position_bias``). Returns out
    [B, Hq, Lq, D] (``out_dtype``, default q's dtype; contiguous, or laid out like q with
    ``query_layout``) and lse [B, Hq, Lq] float32 (log2 units).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = empty_output(q, (b, hq, lq, d), out_dtype or q.dtype, query_layout)
    lse = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    bias_t, bias_strides = bias_args(bias, q)
    pb_args, pb_flags = position_bias_args(alibi, rel_bias, q)
    descs = row_descriptors(cfg.fwd_tma and lk % cfg.fwd_n == 0, cfg.fwd_n, k, v)
    k_arg, v_arg = descs or (k, v)
    hg = launch_groups(b * hq, cfg.head_group)
    grid = (hg * triton.cdiv(lq, cfg.fwd_m), b * hq // hg)
    pos_ptrs, (q_first, k_first) = frame_args(frame, lq, lk, q)
    module._fwd_kernel[grid](
        q, k_arg, v_arg, bias_t, out, lse, *visit_args(visit, q), *pos_ptrs, *pb_args,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        hq, hq // hkv, num_pattern_heads, lq, lk, q_first, k_first, scale * 1.4426950408889634,
        *softcap_args(scale, softcap), dropout_p, seed, hg,
        HEAD_DIM=d, D_PAD=cfg.d_pad(d), BM=cfg.fwd_m, BN=cfg.fwd_n,
        EVEN_N=lk % cfg.fwd_n == 0,
        FOLD=bias is None and pb_flags == 0 and scale > 0 and not softcap,
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        DROPOUT=dropout_p > 0.0, PRECISION=cfg.precision(q.dtype, d), RANGES=visit.ranges,
        TMA=descs is not None, MERGED=merged_loop(cfg.fwd_merged, (lk, cfg.fwd_n)),
        SOFTCAP=softcap > 0, POS_MODE=frame.mode, PBIAS=pb_flags,
        num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages,
    )
    return out, lse


def softcap_args(scale: float, softcap: float) -> tuple[float, float]:
    """(cap_in, cap_out) = (scale / softcap, softcap * log2(e)): capped log2-unit logits are
    tanh(s * cap_in) * cap_out; (1, 1) when off (unused)."""
    if softcap <= 0:
        return 1.0, 1.0
    return scale / softcap, softcap * 1.4426950408889634


def bias_args(bias: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Bias pointer and its [B, H, Lq, Lk] strides (0 on broadcast dims); a dummy if None."""
    if bias is None:
        return like, [0, 0, 0, 0]
    strides = [0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4)]
    return bias, strides


def position_bias_args(alibi: torch.Tensor | None, rel_bias: torch.Tensor | None,
                       like: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, int], int]:
    """Kernel arguments ``(Slopes, Rel, s_rh)`` and the ``PBIAS`` flags (bit 1 ALiBi, bit 2
    the relative table; visit.py ``_position_bias``) of ALiBi slopes (float32 ``[Hq]``) and
    a relative-bias table (float32 ``[Hq or 1, Lq + Lk - 1]``, unit stride along the
    table); placeholders for what is None."""
    dummy = placeholder(like.device)
    slopes = dummy if alibi is None else alibi
    rel, s_rh = dummy, 0
    if rel_bias is not None:
        rel, s_rh = rel_bias, 0 if rel_bias.shape[0] == 1 else rel_bias.stride(0)
    flags = (0 if alibi is None else 1) | (0 if rel_bias is None else 2)
    return (slopes, rel, s_rh), flags
