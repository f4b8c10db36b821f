"""The dQ pass of the Hopper Gluon backward (``backward.py``): one program per ``BM`` query
rows of one (batch, query head) works out its rows' ``Δ = rowsum(dO ∘ O)`` and stores it for
the dK/dV pass, then streams the visited K and V tiles: ``S = Q Kᵀ``, ``dP = dO Vᵀ``,
``P = exp2(scale·log2e·S − lse)`` (or of the modified logits, ``score.py``),
``dS = P ∘ (dP − Δ)``, ``dQ += dS K``."""

from __future__ import annotations

from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.bias import biased
from sparse_compile.codegen.gluon.key_mask import keys_kept
from sparse_compile.codegen.gluon.score import head_terms, logits
from sparse_compile.codegen.gluon.support import (
    CONSUMER_REGS,
    CONSUMERS,
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


@gluon_jit
def _dq_load(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, q_bar,
             k_ready, k_empty, v_ready, v_empty, RLO, RHI, Hq, G, NPH, Lq, q_rb, q_rh, q_ch,
             k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, BM: gl.constexpr, BN: gl.constexpr,
             STAGES: gl.constexpr, PIECES: gl.constexpr):
    """Producer warp: Q and dO once, then K and V of every visited key block."""
    _, b, h, m0 = query_program(Hq, BM)
    hkv = h // G
    rows: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = tile_visit(RLO, RHI, h % NPH, NPH, Lq, m0, BM,
                                                           BN, PIECES, rows)
    WM: gl.constexpr = BM // 2
    mbarrier.expect(q_bar, 2 * (desc_q.block_type.nbytes + desc_do.block_type.nbytes))
    tma_load_halves(desc_q, b * q_rb + h * q_rh + m0, h * q_ch, WM, q_bar, q_smem)
    tma_load_halves(desc_do, b * o_rb + h * o_rh + m0, h * o_ch, WM, q_bar, do_smem)
    k_row = b * k_rb + hkv * k_rh
    for t in range(0, n):
        st = t % STAGES
        ph = (t // STAGES) & 1
        row = k_row + block_at(t, x0, n1, y0) * BN
        mbarrier.wait(k_empty.index(st), ph ^ 1)
        mbarrier.expect(k_ready.index(st), desc_k.block_type.nbytes)
        tma_load(desc_k, [row, hkv * k_ch], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        mbarrier.expect(v_ready.index(st), desc_v.block_type.nbytes)
        tma_load(desc_v, [row, hkv * k_ch], v_ready.index(st), v_smem.index(st))


@gluon_jit
def _out_rows(Out, b, h, m0, Lq, sob, soh, som, sod, HEAD_DIM: gl.constexpr, WM: gl.constexpr,
              num_warps: gl.constexpr):
    """O of one warpgroup's ``WM`` query rows, loaded in ``_row_delta``'s layout (issued before
    the program waits for its tiles, so that the load's latency hides behind theirs)."""
    TD: gl.constexpr = HEAD_DIM // 8
    tile: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TD, TD], [num_warps, 1], [1, 0])
    offs_m = m0 + gl.arange(0, WM, layout=gl.SliceLayout(1, tile))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile))
    return gl.load(Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh
                   + offs_m[:, None].to(gl.int64) * som + offs_d[None, :] * sod,
                   mask=(offs_m < Lq)[:, None], other=0.0)


@gluon_jit
def _row_delta(do_smem, o, Delta, pid_bh, m0, Lq, WM: gl.constexpr, out_layout: gl.constexpr):
    """``Δ = rowsum(dO ∘ O)`` of one warpgroup's ``WM`` query rows (dO from its tile in shared
    memory, O from ``_out_rows``), stored for the dK/dV pass and returned in ``out_layout``."""
    do = do_smem.load(o.type.layout)
    delta = gl.sum(o.to(gl.float32) * do.to(gl.float32), axis=1)
    offs_m = m0 + gl.arange(0, WM, layout=gl.SliceLayout(1, o.type.layout))
    gl.store(Delta + pid_bh.to(gl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)
    return gl.convert_layout(delta, out_layout)


@gluon_jit
def _dq_compute(q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                DQ, LSE, Delta, Out, RLO, RHI, Hq, NPH, Lq, Lk, sqb, sqh, sqm, sob, soh, som,
                sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh, KeyMask, km_sb,
                km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM: gl.constexpr, BM: gl.constexpr,
                BN: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr,
                OVERLAP: gl.constexpr, SOFTCAP: gl.constexpr, PBIAS: gl.constexpr,
                KEY_MASK: gl.constexpr, BIAS: gl.constexpr, WG: gl.constexpr,
                num_warps: gl.constexpr):
    """One consumer warpgroup of a query-block program: dQ of its own half of the rows. It
    first works out its rows' ``Δ`` from the dO tile already in shared memory and O (one read
    of O instead of a separate pass over O and dO) and stores it for the dK/dV pass."""
    pid_bh, b, h, m0 = query_program(Hq, BM)
    hp = h % NPH
    WM: gl.constexpr = BM // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile_rows: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])

    o = _out_rows(Out, b, h, m0 + WG * WM, Lq, sob, soh, som, sod, HEAD_DIM, WM, num_warps)
    x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = tile_visit(RLO, RHI, hp, NPH, Lq, m0, BM, BN,
                                                           PIECES, tile_rows)
    m0 = m0 + WG * WM
    q_smem = q_smem.index(WG)
    do_smem = do_smem.index(WG)
    offs_m = m0 + gl.arange(0, WM, layout=row_s)
    row_ok = offs_m < Lq
    lo0, hi0, lo1, hi1 = row_bounds(RLO, RHI, hp, NPH, Lq, offs_m, row_ok, PIECES)
    lse = gl.load(LSE + pid_bh.to(gl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
    MODS: gl.constexpr = SOFTCAP or PBIAS != 0
    slope, rel_row = head_terms(Slopes, Rel, s_rh, h, PBIAS)
    bt = (Bias, b, h, Lq, Lk, sbb, sbh, sbm, sbn)
    q_pos = offs_m + (Lk - Lq)
    mbarrier.wait(q_bar, 0)
    delta = _row_delta(do_smem, o, Delta, pid_bh, m0, Lq, WM, row_s)
    dq = gl.zeros([WM, HEAD_DIM], gl.float32, layout=dq_layout)
    s_zero = gl.zeros([WM, BN], gl.float32, layout=s_layout)
    for t in range(0, n):
        st = t % STAGES
        ph = (t // STAGES) & 1
        j = block_at(t, x0, n1, y0)
        mbarrier.wait(k_ready.index(st), ph)
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        mbarrier.wait(v_ready.index(st), ph)
        dp = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), s_zero, use_acc=False,
                           is_async=True)
        if OVERLAP:  # dQ of the previous tile was left in flight: it completes before S
            s, dq = warpgroup_mma_wait(num_outstanding=1, deps=(s, dq))
            if t > 0:
                mbarrier.arrive(k_empty.index((t - 1) % STAGES), count=1)
        else:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        if MODS or BIAS != 0:  # score.py, bias.py: the logits in log2 units
            k_pos = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
            if MODS:  # and tanh for the cap's gradient
                x, t_cap = logits(s, q_pos[:, None], k_pos, cap_in, cap_out, qk_scale, slope,
                                  rel_row, Lq - 1, Lq + Lk - 2, SOFTCAP, PBIAS)
            else:
                x = s * qk_scale
            x = biased(x, bt, offs_m[:, None], k_pos, BIAS)
            p = gl.exp2(x - lse[:, None])
        else:
            p = gl.exp2(s * qk_scale - lse[:, None])
        if is_partial(j, f0_lo, f0_hi, f1_lo, f1_hi):
            k_idx = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
            keep = keeps(lo0[:, None], hi0[:, None], lo1[:, None], hi1[:, None], k_idx, PIECES)
            p = gl.where(keep, p, 0.0)
        if KEY_MASK:  # key_mask.py: the masked keys' P is zero in every block
            cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            p = gl.where(keys_kept(KeyMask, b, cols, Lk, km_sb, km_sk)[None, :], p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        mbarrier.arrive(v_empty.index(st), count=1)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # through the cap: d(softcap·tanh(x / softcap)) / dx = 1 − tanh²
            ds = ds * (1.0 - t_cap * t_cap)
        ds_op = gl.convert_layout(ds.to(dtype), ds_layout)
        dq = warpgroup_mma(ds_op, k_smem.index(st), dq, is_async=True)
        if OVERLAP:  # no wait: dQ is the only group in flight (a loop-carried tensor again)
            dq = warpgroup_mma_wait(num_outstanding=1, deps=(dq,))
        else:
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
            mbarrier.arrive(k_empty.index(st), count=1)
    if OVERLAP:
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
    dq = dq * scale
    offs_mq = m0 + gl.arange(0, WM, layout=gl.SliceLayout(1, dq_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
    ptrs = (DQ + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh
            + offs_mq[:, None].to(gl.int64) * sqm + offs_d[None, :])
    gl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_mq < Lq)[:, None])


@gluon_jit
def _dq_kernel(desc_q, desc_k, desc_v, desc_do, DQ, LSE, Delta, Out, RLO, RHI, Hq, G, NPH, Lq,
               Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, sqb, sqh, sqm, sob,
               soh, som, sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh, KeyMask,
               km_sb, km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM: gl.constexpr,
               BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
               PIECES: gl.constexpr, OVERLAP: gl.constexpr, SOFTCAP: gl.constexpr,
               PBIAS: gl.constexpr, KEY_MASK: gl.constexpr, BIAS: gl.constexpr,
               num_warps: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BM // 2, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, BM // 2, HEAD_DIM], desc_do.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HEAD_DIM], desc_v.layout)
    q_bar, k_ready, k_empty, v_ready, v_empty = pipeline_barriers(STAGES, CONSUMERS)
    gl.warp_specialize([
        (_dq_compute, (q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                       v_empty, DQ, LSE, Delta, Out, RLO, RHI, Hq, NPH, Lq, Lk, sqb, sqh,
                       sqm, sob, soh, som, sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel,
                       s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM, BM, BN,
                       STAGES, PIECES, OVERLAP, SOFTCAP, PBIAS, KEY_MASK, BIAS, 0,
                       num_warps)),
        (_dq_compute, (q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                       v_empty, DQ, LSE, Delta, Out, RLO, RHI, Hq, NPH, Lq, Lk, sqb, sqh,
                       sqm, sob, soh, som, sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel,
                       s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM, BM, BN,
                       STAGES, PIECES, OVERLAP, SOFTCAP, PBIAS, KEY_MASK, BIAS, 1,
                       num_warps)),
        (_dq_load, (desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, q_bar,
                    k_ready, k_empty, v_ready, v_empty, RLO, RHI, Hq, G, NPH, Lq, q_rb, q_rh,
                    q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES, PIECES)),
    ], [num_warps, 1], [CONSUMER_REGS, 24])
