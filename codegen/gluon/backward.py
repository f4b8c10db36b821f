"""Hopper backward kernels in Gluon: the two-pass (deterministic) gradient of ``forward.py``.

Given ``lse`` (log2 units) from the forward:

* the dQ pass: one program per ``BM`` query rows of one (batch, query head) first works out its
  rows' ``Δ = rowsum(dO ∘ O)`` (from the dO tile it loads anyway, so that no separate pass
  reads O and dO) and stores it for the dK/dV pass, then streams the visited
  K and V tiles: ``S = Q Kᵀ``, ``dP = dO Vᵀ``, ``P = exp2(scale·log2e·S − lse)``,
  ``dS = P ∘ (dP − Δ)``, ``dQ += dS K``;
* the dK/dV pass: one program per ``BN`` keys of one (batch, kv head) streams the Q and dO
  tiles of every query row that keeps one of its keys, over the kv head's query heads (GQA):
  ``Sᵀ = K Qᵀ``, ``dPᵀ = V dOᵀ``, ``dV += Pᵀ dO``, ``dK += dSᵀ Q``.

Each pass has one producer warp (TMA copies into a two-stage ring guarded by ready / empty
barriers) and two consumer warpgroups running asynchronous ``warpgroup_mma``, each its own
partition owning half of the program's rows (dQ pass) or keys (dK/dV pass), so that they
synchronise only through the ring they share and one's softmax overlaps the other's
products. In the dK/dV pass the producer also copies each query tile's ``lse`` and ``Δ`` into
the ring: held as the transposed tile's columns they would take 32 registers per thread (16
values each) for the whole loop, and the consumers spilled. Every gradient
is accumulated by one program in a fixed order (no atomics), so identical inputs give
bit-identical dQ, dK and dV. Visited blocks come from the rows' intervals (``rows.py``,
``visit.py``): the dQ pass derives its key blocks as the forward does, the dK/dV pass
binary-searches each interval's (non-decreasing) row bounds for the query rows that reach its
keys. Blocks inside every visited row's interval skip the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.forward import row_view
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
    thread_barrier,
    tma_load,
    tma_load_halves,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from sparse_compile.codegen.gluon.visit import (
    block_at,
    is_partial,
    keeps,
    key_block_visit,
    key_program,
    query_program,
    row_bounds,
    tile_visit,
)
from sparse_compile.codegen.launch.compile_only import launch
from sparse_compile.codegen.launch.config import MAX_GRID_Y

_LOG2E = 1.4426950408889634



# --- dQ pass -----------------------------------------------------------------------------------

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
                sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh,
                HEAD_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                STAGES: gl.constexpr, PIECES: gl.constexpr, OVERLAP: gl.constexpr,
                SOFTCAP: gl.constexpr, PBIAS: gl.constexpr, WG: gl.constexpr,
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
        if MODS:  # score.py: the logits in log2 units, and tanh for the cap's gradient
            k_pos = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
            x, t_cap = logits(s, q_pos[:, None], k_pos, cap_in, cap_out, qk_scale, slope,
                              rel_row, Lq - 1, Lq + Lk - 2, SOFTCAP, PBIAS)
            p = gl.exp2(x - lse[:, None])
        else:
            p = gl.exp2(s * qk_scale - lse[:, None])
        if is_partial(j, f0_lo, f0_hi, f1_lo, f1_hi):
            k_idx = (j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)))[None, :]
            keep = keeps(lo0[:, None], hi0[:, None], lo1[:, None], hi1[:, None], k_idx, PIECES)
            p = gl.where(keep, p, 0.0)
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
               soh, som, sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh,
               HEAD_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
               STAGES: gl.constexpr, PIECES: gl.constexpr, OVERLAP: gl.constexpr,
               SOFTCAP: gl.constexpr, PBIAS: gl.constexpr, num_warps: gl.constexpr):
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
                       s_rh, HEAD_DIM, BM, BN, STAGES, PIECES, OVERLAP, SOFTCAP, PBIAS, 0,
                       num_warps)),
        (_dq_compute, (q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                       v_empty, DQ, LSE, Delta, Out, RLO, RHI, Hq, NPH, Lq, Lk, sqb, sqh,
                       sqm, sob, soh, som, sod, qk_scale, scale, cap_in, cap_out, Slopes, Rel,
                       s_rh, HEAD_DIM, BM, BN, STAGES, PIECES, OVERLAP, SOFTCAP, PBIAS, 1,
                       num_warps)),
        (_dq_load, (desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, q_bar,
                    k_ready, k_empty, v_ready, v_empty, RLO, RHI, Hq, G, NPH, Lq, q_rb, q_rh,
                    q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES, PIECES)),
    ], [num_warps, 1], [CONSUMER_REGS, 24])


# --- dK/dV pass --------------------------------------------------------------------------------

@gluon_jit
def _dkdv_load(desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, lse_smem,
               delta_smem, LSE, Delta, kv_bar, q_ready, q_empty, o_ready, o_empty, RLO, RHI, Hq,
               G, NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch,
               BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr):
    """Producer warp of the dK/dV pass: K and V once (one half per consumer warpgroup), then
    for every visited query block of every query head of the group its ``lse`` and ``Δ``
    (plain loads into the ring's vectors) and its Q and dO tiles (TMA)."""
    b, hkv, k0 = key_program(Hq, G, BN)
    WN: gl.constexpr = BN // 2
    mbarrier.expect(kv_bar, 2 * (desc_k.block_type.nbytes + desc_v.block_type.nbytes))
    tma_load_halves(desc_k, b * k_rb + hkv * k_rh + k0, hkv * k_ch, WN, kv_bar, k_smem)
    tma_load_halves(desc_v, b * k_rb + hkv * k_rh + k0, hkv * k_ch, WN, kv_bar, v_smem)
    t = 0
    vec: gl.constexpr = gl.BlockedLayout([BM // 32], [32], [1], [0])
    for g in range(0, G):
        h = hkv * G + g
        bh = (b * Hq + h).to(gl.int64)
        x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = key_block_visit(
            RLO, RHI, h % NPH, NPH, Lq, Lk, k0, BM, BN, PIECES)
        for u in range(0, n):
            i = block_at(u, x0, n1, y0)
            st = t % STAGES
            ph = (t // STAGES) & 1
            offs_q = i * BM + gl.arange(0, BM, layout=vec)
            q_ok = offs_q < Lq
            lse = gl.load(LSE + bh * Lq + offs_q, mask=q_ok, other=float("inf"))
            delta = gl.load(Delta + bh * Lq + offs_q, mask=q_ok, other=0.0)
            mbarrier.wait(q_empty.index(st), ph ^ 1)
            lse_smem.index(st).store(lse)
            delta_smem.index(st).store(delta)
            thread_barrier()  # the warp's stores precede the arrival that publishes them
            mbarrier.expect(q_ready.index(st), desc_q.block_type.nbytes)
            tma_load(desc_q, [b * q_rb + h * q_rh + i * BM, h * q_ch], q_ready.index(st),
                     q_smem.index(st))
            mbarrier.wait(o_empty.index(st), ph ^ 1)
            mbarrier.expect(o_ready.index(st), desc_do.block_type.nbytes)
            tma_load(desc_do, [b * o_rb + h * o_rh + i * BM, h * o_ch], o_ready.index(st),
                     do_smem.index(st))
            t += 1


@gluon_jit
def _dkdv_compute(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                  q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq, G, NPH,
                  Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh,
                  HEAD_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, PIECES: gl.constexpr, SOFTCAP: gl.constexpr,
                  PBIAS: gl.constexpr, WG: gl.constexpr, num_warps: gl.constexpr):
    """One consumer warpgroup of a key-block program: dK and dV of keys ``WG * BN / 2`` ..
    (its own half of K and V), streaming the Q and dO ring both warpgroups share. PARTIAL
    blocks are masked with each key's kept query rows (``KLO``/``KHI``: two values per key
    row of the transposed tile, where the rows' intervals would take two per query column)."""
    b, hkv, k0 = key_program(Hq, G, BN)
    WN: gl.constexpr = BN // 2
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    kw = k_smem.index(WG)
    vw = v_smem.index(WG)
    k_idx = k0 + WG * WN + gl.arange(0, WN, layout=gl.SliceLayout(1, st_layout))
    k_ok = k_idx < Lk
    dk = gl.zeros([WN, HEAD_DIM], gl.float32, layout=kv_layout)
    dv = gl.zeros([WN, HEAD_DIM], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([WN, BM], gl.float32, layout=st_layout)
    MODS: gl.constexpr = SOFTCAP or PBIAS != 0
    mbarrier.wait(kv_bar, 0)
    t = 0
    for g in range(0, G):
        h = hkv * G + g
        hp = h % NPH
        slope, rel_row = head_terms(Slopes, Rel, s_rh, h, PBIAS)
        x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = key_block_visit(
            RLO, RHI, hp, NPH, Lq, Lk, k0, BM, BN, PIECES)
        qa0, qb0, qa1, qb1 = row_bounds(KLO, KHI, hp, NPH, Lk, k_idx, k_ok, PIECES)
        for u in range(0, n):
            i = block_at(u, x0, n1, y0)
            st = t % STAGES
            ph = (t // STAGES) & 1
            mbarrier.wait(q_ready.index(st), ph)
            s_t = warpgroup_mma(kw, q_smem.index(st).permute((1, 0)), st_zero,
                                use_acc=False, is_async=True)
            mbarrier.wait(o_ready.index(st), ph)
            dp_t = warpgroup_mma(vw, do_smem.index(st).permute((1, 0)), st_zero,
                                 use_acc=False, is_async=True)
            s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
            lse = lse_smem.index(st).load(col_st)
            if MODS:  # score.py, on the transposed tile: keys down, query rows across
                q_pos = (i * BM + (Lk - Lq) + gl.arange(0, BM, layout=col_st))[None, :]
                x_t, t_cap = logits(s_t, q_pos, k_idx[:, None], cap_in, cap_out, qk_scale,
                                    slope, rel_row, Lq - 1, Lq + Lk - 2, SOFTCAP, PBIAS)
                p_t = gl.exp2(x_t - lse[None, :])
            else:
                p_t = gl.exp2(s_t * qk_scale - lse[None, :])
            if is_partial(i, f0_lo, f0_hi, f1_lo, f1_hi):
                offs_q = i * BM + gl.arange(0, BM, layout=col_st)
                keep = keeps(qa0[:, None], qb0[:, None], qa1[:, None], qb1[:, None],
                             offs_q[None, :], PIECES)
                p_t = gl.where(keep, p_t, 0.0)
            if SOFTCAP:  # P's factor of dS through the cap (1 − tanh²), so tanh dies here
                p_ds = p_t * (1.0 - t_cap * t_cap)
            else:
                p_ds = p_t
            dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do_smem.index(st),
                               dv, is_async=True)
            dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))
            delta = delta_smem.index(st).load(col_st)
            ds_t = p_ds * (dp_t - delta[None, :])
            dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_layout), q_smem.index(st),
                               dk, is_async=True)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            mbarrier.arrive(q_empty.index(st), count=1)
            mbarrier.arrive(o_empty.index(st), count=1)
            t += 1
    dk = dk * scale
    offs_n = k0 + WG * WN + gl.arange(0, WN, layout=gl.SliceLayout(1, kv_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    base = b.to(gl.int64) * skb + hkv.to(gl.int64) * skh
    offs = base + offs_n[:, None].to(gl.int64) * skn + offs_d[None, :]
    ok = (offs_n < Lk)[:, None]
    gl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon_jit
def _dkdv_kernel(desc_q, desc_k, desc_v, desc_do, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq, G,
                 NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, skb, skh, skn,
                 qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh, HEAD_DIM: gl.constexpr,
                 BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                 PIECES: gl.constexpr, SOFTCAP: gl.constexpr, PBIAS: gl.constexpr,
                 num_warps: gl.constexpr):
    dtype: gl.constexpr = desc_k.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, BN // 2, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BN // 2, HEAD_DIM], desc_v.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_do.layout)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_layout)
    kv_bar, q_ready, q_empty, o_ready, o_empty = pipeline_barriers(STAGES, CONSUMERS)
    gl.warp_specialize([
        (_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                         q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq,
                         G, NPH, Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out,
                         Slopes, Rel, s_rh, HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS,
                         0, num_warps)),
        (_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                         q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq,
                         G, NPH, Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out,
                         Slopes, Rel, s_rh, HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS,
                         1, num_warps)),
        (_dkdv_load, (desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem,
                      lse_smem, delta_smem, LSE, Delta, kv_bar, q_ready, q_empty, o_ready,
                      o_empty, RLO, RHI, Hq, G, NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh,
                      k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES, PIECES)),
    ], [num_warps, 1], [CONSUMER_REGS, 24])


# --- host ----------------------------------------------------------------------------------

def _descriptor(view: torch.Tensor, rows: int, d: int, dtype) -> object:
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], dtype)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, d], layout)


@dataclass(frozen=True)
class BackwardOperands:
    """What the backward launches from: the 2-D TMA views of q, k, v and dout with
    their (batch, head, column) row offsets (``forward.row_view``), the tile dtype, the empty
    ``Δ`` (the dQ pass fills it) and the empty dK and dV."""

    views: tuple  # (q2, k2, v2, o2)
    offsets: tuple  # q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch
    head_dim: int  # a tile's width (a view's width is H x D in sequence-major layouts)
    dtype: object
    delta: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor

    def descriptors(self, q_rows: int, k_rows: int) -> tuple:
        """TMA descriptors of q, k, v, dout for tiles of ``q_rows`` / ``k_rows`` rows."""
        q2, k2, v2, o2 = self.views
        d = self.head_dim
        return (_descriptor(q2, q_rows, d, self.dtype), _descriptor(k2, k_rows, d, self.dtype),
                _descriptor(v2, k_rows, d, self.dtype), _descriptor(o2, q_rows, d, self.dtype))


def backward_operands(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor) -> BackwardOperands | None:
    """The backward's operands, or None when an operand's layout does not allow
    TMA or the (batch, head) count overflows the grid. ``dout`` is copied to a contiguous
    tensor when its layout is not walkable."""
    b, hq, _, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if b * hq > MAX_GRID_Y:
        return None  # the grid's second dimension holds (batch, head)
    if row_view(dout) is None:
        dout = dout.contiguous()
    views = [row_view(t) for t in (q, k, v, dout)]
    if any(x is None for x in views) or views[1][1:] != views[2][1:]:
        return None
    (q2, *q_off), (k2, *k_off), (v2, *_), (o2, *o_off) = views
    return BackwardOperands(
        (q2, k2, v2, o2), (*q_off, *k_off, *o_off), d,
        gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16,
        torch.empty((b, hq, q.shape[2]), device=q.device, dtype=torch.float32),
        torch.empty((b, hkv, lk, d), device=q.device, dtype=k.dtype),
        torch.empty((b, hkv, lk, d), device=q.device, dtype=v.dtype))


def launch_gluon_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          rows: RowPieces, scale: float, dq_tiles: tuple[int, int] = (128, 64),
                          kv_tiles: tuple[int, int] = (64, 128), stages: int = 2,
                          overlap: bool = False, mods: ScoreMods = NO_MODS
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) through the Gluon passes, or None when an operand's layout does not allow
    TMA or the (batch, head) count overflows the grid (the caller runs the ``tl`` passes).
    Shapes and ``lse`` as ``launch_gluon_forward``'s; ``dout`` is copied to a contiguous
    tensor when its layout is not walkable.
    ``dq_tiles`` = (query rows, keys) of the dQ pass, ``kv_tiles`` = (query rows per step,
    keys per program) of the dK/dV pass; the programs' rows (dQ) and keys (dK/dV) are split
    between two warpgroups, so both are at least 128. ``overlap`` leaves the dQ pass's
    product in flight while the next step's scores are issued (off by default: ptxas then
    serialises the products, bench/NOTES.md version 13); ``mods``: the forward's logit
    soft-capping and position biases (``score.py``)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    ops = backward_operands(dout, q, k, v, out)
    if ops is None:
        return None
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    dk, dv = ops.dk, ops.dv
    nph = rows.pattern_heads
    qk_scale = scale * _LOG2E
    mod_args, mod_flags = mods.kernel_args(scale, q)
    bm, bn = dq_tiles
    launch(
        _dq_kernel, (triton.cdiv(lq, bm), b * hq), *ops.descriptors(bm // 2, bn), dq, lse,
        ops.delta, out, rows.lo, rows.hi, hq, hq // hkv, nph, lq, lk, *ops.offsets,
        dq.stride(0), dq.stride(1), dq.stride(2), *out.stride(), qk_scale, scale, *mod_args,
        HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages, PIECES=rows.pieces, OVERLAP=overlap,
        **mod_flags, num_warps=CONSUMER_WARPS)
    bm, bn = kv_tiles
    launch(
        _dkdv_kernel, (triton.cdiv(lk, bn), b * hkv), *ops.descriptors(bm, bn // 2), dk, dv,
        lse, ops.delta, rows.lo, rows.hi, rows.key_lo, rows.key_hi, hq, hq // hkv, nph, lq, lk,
        *ops.offsets, dk.stride(0), dk.stride(1), dk.stride(2), qk_scale, scale, *mod_args,
        HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages, PIECES=rows.pieces, **mod_flags,
        num_warps=CONSUMER_WARPS)
    return dq, dk, dv

