"""Hopper forward kernel in Gluon: O = softmax(scale·QKᵀ | pattern) V and the log-sum-exp.

One program computes ``BM`` query rows of one (batch, query head) with two consumer
warpgroups, each its own partition owning ``BM / 2`` rows, and one producer warp:

* the producer (``_fwd_load``) copies the Q tile once, then the visited K and V tiles through
  TMA into a ring of ``STAGES`` shared-memory buffers, each guarded by a *ready* barrier (the
  copy's bytes arrived) and an *empty* one (the consumers are done with it);
* the consumers (``_fwd_compute``) run ``S = Q Kᵀ`` and ``O += P V`` as asynchronous
  ``warpgroup_mma``, software-pipelined within the warpgroup: the scores of tile ``t`` are
  issued, then the ``P V`` product of tile ``t - 1``, and the online softmax of tile ``t``
  runs while that product is in flight (FlashAttention-3's intra-warpgroup overlap). The two
  warpgroups share the K/V ring (each *empty* barrier waits for both) but synchronise with
  nothing else, so one's softmax runs while the other's products occupy the tensor cores
  (in one 8-warp partition every barrier arrival held them in lockstep).

Visited blocks come from the rows' kept intervals (``rows.py``, one or two per row;
``visit.py``): per interval, the key blocks that cover every kept key of the tile, and the
blocks inside every row's interval are FULL, run without mask arithmetic; the others (at most
a few at each end) mask the keys outside the row's intervals. Scores stay unscaled;
``scale·log2(e)`` is folded into the exp2 argument. The output contract is the ``tl``
forward's: ``lse`` in log2 units, +inf and zero output for rows that keep no key, so the
``tl`` backward consumes it unchanged.

Operands are read through 2-D TMA descriptors over the rows of ``[B, H, L, D]`` tensors laid
out head-major (``[B * H * L, D]``, row ``(b·H + h)·L + l``) or sequence-major (``[B * L,
H * D]``, as ``[B, L, H, D].transpose(1, 2)``, the layout models hand over: row ``b·L + l``,
column ``h·D``). A tile that runs past a head's last row reads the next rows (or zeros past
the tensor's end): those keys are masked and those query rows are not stored.
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.bias import bias_args, biased
from sparse_compile.codegen.gluon.key_mask import key_mask_args, keys_kept
from sparse_compile.codegen.gluon.rows import RowPieces
from sparse_compile.codegen.gluon.score import NO_MODS, ScoreMods, head_terms, logits
from sparse_compile.codegen.gluon.support import (
    CONSUMER_REGS,
    CONSUMER_WARPS,
    CONSUMERS,
    TensorDescriptor,
    gl,
    gluon_jit,
    mbarrier,
    tma_load,
    tma_load_halves,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from sparse_compile.codegen.gluon.visit import (
    block_at,
    is_partial,
    keeps,
    query_program,
    row_bounds,
    tile_visit,
)
from sparse_compile.codegen.launch.compile_only import launch
from sparse_compile.codegen.launch.config import MAX_GRID_Y

from sparse_compile.heads_layout import empty_output

_LOG2E = 1.4426950408889634



@gluon_jit
def _fwd_load(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
              v_empty, RLO, RHI, Hq, G, NPH, Lq, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch,
              BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
              PIECES: gl.constexpr):
    """Producer warp: the Q tile (one half per consumer warpgroup), then K and V of every
    visited block, in order."""
    _, b, h, m0 = query_program(Hq, BM)
    hkv = h // G
    rows: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = tile_visit(RLO, RHI, h % NPH, NPH, Lq, m0, BM,
                                                           BN, PIECES, rows)
    WM: gl.constexpr = BM // 2
    mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
    tma_load_halves(desc_q, b * q_rb + h * q_rh + m0, h * q_ch, WM, q_bar, q_smem)
    k_row = b * k_rb + hkv * k_rh
    k_col = hkv * k_ch
    for t in range(0, n):
        st = t % STAGES
        ph = (t // STAGES) & 1
        row = k_row + block_at(t, x0, n1, y0) * BN
        mbarrier.wait(k_empty.index(st), ph ^ 1)
        mbarrier.expect(k_ready.index(st), desc_k.block_type.nbytes)
        tma_load(desc_k, [row, k_col], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        mbarrier.expect(v_ready.index(st), desc_v.block_type.nbytes)
        tma_load(desc_v, [row, k_col], v_ready.index(st), v_smem.index(st))


@gluon_jit
def _softmax_step(s, j, partial, lo0, hi0, lo1, hi1, m_i, l_i, qk_scale, q_pos, mods, km, bt,
                  row0, BN: gl.constexpr, PIECES: gl.constexpr, SOFTCAP: gl.constexpr,
                  PBIAS: gl.constexpr, KEY_MASK: gl.constexpr, BIAS: gl.constexpr,
                  s_layout: gl.constexpr):
    """Online softmax of one score tile in log2 units: masks keys outside the rows' intervals
    when the block is ``partial``; returns (p, m, l, alpha). Without logit modifications the
    scores stay unscaled and ``qk_scale`` (scale·log2 e) is folded into the exponent; with
    them (``score.logits``: ``mods`` = (cap_in, cap_out, slope, table row, Lq − 1,
    Lq + Lk − 2), ``q_pos`` the rows' positions) the logits are worked out first. With a key
    mask (``key_mask.py``; ``km`` = (flags, batch row, Lk, strides)) its masked keys are
    dropped in every block; a bias tensor (``bias.py``; ``bt``, the tile's rows from
    ``row0``) is added or masks in every block, on the worked-out logits."""
    MODS: gl.constexpr = SOFTCAP or PBIAS != 0
    UNFOLDED: gl.constexpr = MODS or BIAS != 0
    if MODS:
        cap_in, cap_out, slope, rel_row, rel_off, rel_last = mods
        k_pos = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
        s, _ = logits(s, q_pos[:, None], k_pos, cap_in, cap_out, qk_scale, slope, rel_row,
                      rel_off, rel_last, SOFTCAP, PBIAS)
    elif BIAS != 0:
        s = s * qk_scale
    if BIAS != 0:
        WM: gl.constexpr = s.shape[0]
        rows = row0 + gl.arange(0, WM, layout=gl.SliceLayout(1, s_layout))
        cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = biased(s, bt, rows[:, None], cols[None, :], BIAS)
    if partial:
        k_idx = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
        keep = keeps(lo0[:, None], hi0[:, None], lo1[:, None], hi1[:, None], k_idx, PIECES)
        s = gl.where(keep, s, float("-inf"))
    if KEY_MASK:
        KeyMask, b, Lk, km_sb, km_sk = km
        cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(keys_kept(KeyMask, b, cols, Lk, km_sb, km_sk)[None, :], s, float("-inf"))
    if UNFOLDED:
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_safe[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon_jit
def _fwd_compute(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out, LSE,
                 RLO, RHI, Hq, NPH, Lq, Lk, sob, soh, som, qk_scale, cap_in, cap_out, Slopes,
                 Rel, s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn,
                 HEAD_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                 STAGES: gl.constexpr, PIECES: gl.constexpr, SOFTCAP: gl.constexpr,
                 PBIAS: gl.constexpr, KEY_MASK: gl.constexpr, BIAS: gl.constexpr,
                 WG: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warpgroup ``WG``: scores, online softmax and output of its ``BM / 2`` rows of
    the program's query tile. The visited and FULL blocks are the whole tile's (the producer
    streams those), so both warpgroups walk the same ring."""
    pid_bh, b, h, m0 = query_program(Hq, BM)
    hp = h % NPH
    WM: gl.constexpr = BM // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    tile_rows: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])

    x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = tile_visit(RLO, RHI, hp, NPH, Lq, m0, BM, BN,
                                                           PIECES, tile_rows)
    m0 = m0 + WG * WM
    q_smem = q_smem.index(WG)
    offs_m = m0 + gl.arange(0, WM, layout=row_s)
    row_ok = offs_m < Lq
    lo0, hi0, lo1, hi1 = row_bounds(RLO, RHI, hp, NPH, Lq, offs_m, row_ok, PIECES)
    slope, rel_row = head_terms(Slopes, Rel, s_rh, h, PBIAS)
    mods = (cap_in, cap_out, slope, rel_row, Lq - 1, Lq + Lk - 2)
    km = (KeyMask, b, Lk, km_sb, km_sk)
    bt = (Bias, b, h, Lq, Lk, sbb, sbh, sbm, sbn)
    q_pos = offs_m + (Lk - Lq)
    m_i = gl.full([WM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([WM], gl.float32, layout=row_s)
    acc = gl.zeros([WM, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([WM, BN], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if n > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        mbarrier.arrive(k_empty.index(0), count=1)
        j = block_at(0, x0, n1, y0)
        p, m_i, l_i, alpha = _softmax_step(
            s, j, is_partial(j, f0_lo, f0_hi, f1_lo, f1_hi), lo0, hi0, lo1, hi1, m_i, l_i,
            qk_scale, q_pos, mods, km, bt, m0, BN, PIECES, SOFTCAP, PBIAS, KEY_MASK, BIAS,
            s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for t in range(1, n):
            st = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(k_ready.index(st), (t // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            # Groups retire in order: one outstanding means the scores are done.
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            mbarrier.arrive(k_empty.index(st), count=1)
            j = block_at(t, x0, n1, y0)
            p, m_i, l_i, alpha = _softmax_step(
                s, j, is_partial(j, f0_lo, f0_hi, f1_lo, f1_hi), lo0, hi0, lo1, hi1, m_i,
                l_i, qk_scale, q_pos, mods, km, bt, m0, BN, PIECES, SOFTCAP, PBIAS,
                KEY_MASK, BIAS, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        last = (n - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last), count=1)

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where(l_i == 0.0, float("inf"), m_i + gl.log2(l_safe))
    gl.store(LSE + pid_bh.to(gl.int64) * Lq + offs_m, lse, mask=row_ok)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    offs_mo = m0 + gl.arange(0, WM, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = (Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh
              + offs_mo[:, None].to(gl.int64) * som + offs_d[None, :])
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_mo < Lq)[:, None])


@gluon_jit
def _fwd_kernel(desc_q, desc_k, desc_v, Out, LSE, RLO, RHI, Hq, G, NPH, Lq, Lk, q_rb, q_rh,
                q_ch, k_rb, k_rh, k_ch, sob, soh, som, qk_scale, cap_in, cap_out, Slopes, Rel,
                s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM: gl.constexpr,
                BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                PIECES: gl.constexpr, SOFTCAP: gl.constexpr, PBIAS: gl.constexpr,
                KEY_MASK: gl.constexpr, BIAS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BM // 2, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], desc_v.layout)
    q_bar, k_ready, k_empty, v_ready, v_empty = pipeline_barriers(STAGES, CONSUMERS)
    gl.warp_specialize([
        (_fwd_compute, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out,
                        LSE, RLO, RHI, Hq, NPH, Lq, Lk, sob, soh, som, qk_scale, cap_in,
                        cap_out, Slopes, Rel, s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm,
                        sbn, HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS, KEY_MASK, BIAS,
                        0, num_warps)),
        (_fwd_compute, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out,
                        LSE, RLO, RHI, Hq, NPH, Lq, Lk, sob, soh, som, qk_scale, cap_in,
                        cap_out, Slopes, Rel, s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm,
                        sbn, HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS, KEY_MASK, BIAS,
                        1, num_warps)),
        (_fwd_load, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty,
                     v_ready, v_empty, RLO, RHI, Hq, G, NPH, Lq, q_rb, q_rh, q_ch, k_rb, k_rh,
                     k_ch, BM, BN, STAGES, PIECES)),
    ], [num_warps, 1], [CONSUMER_REGS, 24])


def row_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
    """``t`` [B, H, L, D] as a 2-D row matrix and the (row per batch, row per head, column per
    head) steps that locate a head's first row in it; None for layouts TMA cannot walk."""
    b, h, length, d = t.shape
    sb, sh, sl, sd = t.stride()
    if sd != 1 or t.data_ptr() % 16 or (sl * t.element_size()) % 16:
        return None
    if (h == 1 or sh == length * sl) and (b == 1 or sb == h * length * sl) and sl == d:
        return t.as_strided((b * h * length, d), (d, 1)), h * length, length, 0
    if sh == d and sl == h * d and (b == 1 or sb == length * sl):
        return t.as_strided((b * length, h * d), (h * d, 1)), length, 0, d
    return None


def launch_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPieces,
                         scale: float, out_dtype: torch.dtype | None = None, block_m: int = 128,
                         block_n: int | None = None, stages: int = 2, query_layout: bool = False,
                         mods: ScoreMods = NO_MODS, key_mask: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Forward through the Gluon kernel, or None when an operand's layout does not allow TMA
    or the (batch, head) count overflows the grid (the caller then runs the ``tl`` kernel).
    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (16-bit, D in {64, 128, 256}); ``rows``: the pattern's
    row intervals (``rows.py``). Returns out [B, Hq, Lq, D] (contiguous, or laid out like q
    with ``query_layout``) and lse [B, Hq, Lq] float32 (log2 units, +inf when empty).
    ``block_m`` query rows per program (half per consumer warpgroup, so at least 128),
    ``block_n`` keys per ring stage (default 128, and 64 at D = 256, where two stages of
    128-key K and V tiles would not fit in shared memory beside Q); ``mods``: logit
    soft-capping and position biases (``score.py``); ``key_mask``: None or a boolean
    ``[B or 1, 1, 1, Lk]`` bias (``key_mask.py``); ``bias``: None or any other bias tensor,
    additive or a keep-mask, as the kernels read it (``kernel_bias``: 4-D, bool as uint8;
    ``bias.py``)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    block_n = block_n or (64 if d > 128 else 128)
    if b * hq > MAX_GRID_Y:
        return None  # the grid's second dimension holds (batch, head)
    views = [row_view(t) for t in (q, k, v)]
    if any(x is None for x in views) or views[1][1:] != views[2][1:]:
        return None
    (q2, q_rb, q_rh, q_ch), (k2, k_rb, k_rh, k_ch), (v2, _, _, _) = views
    out = empty_output(q, (b, hq, lq, d), out_dtype or q.dtype, query_layout)
    lse = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m // 2, d], gdtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gdtype)
    desc_q = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [block_m // 2, d],
                              q_layout)
    desc_k = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, d], kv_layout)
    desc_v = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [block_n, d], kv_layout)
    grid = (triton.cdiv(lq, block_m), b * hq)
    mod_args, mod_flags = mods.kernel_args(scale, q)
    km_args, km_flags = key_mask_args(key_mask, q)
    b_args, b_flags = bias_args(bias, q)
    launch(
        _fwd_kernel, grid, desc_q, desc_k, desc_v, out, lse, rows.lo, rows.hi, hq, hq // hkv,
        rows.pattern_heads, lq, k.shape[2], q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, out.stride(0),
        out.stride(1), out.stride(2), scale * _LOG2E, *mod_args, *km_args, *b_args,
        HEAD_DIM=d, BM=block_m, BN=block_n, STAGES=stages, PIECES=rows.pieces, **mod_flags,
        **km_flags, **b_flags, num_warps=CONSUMER_WARPS)
    return out, lse
