"""Hopper one-pass backward in Gluon: dK and dV per key block, dQ added atomically.

The two-pass backward (``backward.py``) runs seven block products per visited block pair:
three in the dQ pass (S, dP, dQ) and four in the dK/dV pass (Sᵀ, dPᵀ, dV, dK), recomputing the
scores and their gradient twice. This pass runs five: one program per ``BN`` keys of one
(batch, kv head) streams the Q and dO tiles of every query row that keeps one of its keys
(over the kv head's query heads, GQA) exactly like the dK/dV pass, and also forms
``dQ_partial = dS K`` for each visited query tile (``dS`` goes through shared memory, the
transposed A operand) and adds it into a zeroed float32 ``[B, Hq, Lq, D]`` buffer with
relaxed atomics; the host scales and casts that buffer once. Float atomics add in a
run-dependent order, so dQ is not bitwise reproducible: the dispatcher runs the two passes
whenever deterministic algorithms are requested.

Same producer (``backward._dkdv_load``: K and V once, then the Q and dO ring), barriers and
visit logic as the two-pass kernels, so the blocks visited and the FULL blocks (no mask) are
the same.
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.gluon.backward import _descriptor, _dkdv_load
from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.forward import row_view
from sparse_compile.codegen.gluon.rows import RowPieces
from sparse_compile.codegen.gluon.support import (
    fence_async_shared,
    gl,
    gluon_jit,
    mbarrier,
    thread_barrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from sparse_compile.codegen.gluon.visit import (
    block_at,
    is_partial,
    keeps,
    key_block_visit,
    key_program,
    row_bounds,
)
from sparse_compile.codegen.launch.config import MAX_GRID_Y
from sparse_compile.codegen.tl.backward_delta import launch_delta

_LOG2E = 1.4426950408889634


@gluon_jit
def _add_dq(DQA, first_row, dq_part, dq_rows, dq_cols, valid, HEAD_DIM: gl.constexpr):
    """Adds one step's ``dS K`` ([BM, D], float32) into the dQ buffer at flat row
    ``first_row`` (rows ``>= valid`` lie past Lq)."""
    ptrs = DQA + (first_row + dq_rows)[:, None] * HEAD_DIM + dq_cols[None, :]
    gl.atomic_add(ptrs, dq_part, mask=(dq_rows < valid)[:, None], sem="relaxed")


@gluon_jit
def _fused_compute(k_smem, v_smem, q_smem, do_smem, ds_smem, kv_bar, q_ready, q_empty, o_ready,
                   o_empty, DK, DV, DQA, LSE, Delta, RLO, RHI, Hq, G, NPH, Lq, Lk, skb, skh, skn,
                   qk_scale, scale, HEAD_DIM: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   STAGES: gl.constexpr, PIECES: gl.constexpr, OVERLAP: gl.constexpr,
                   num_warps: gl.constexpr):
    b, hkv, k0 = key_program(Hq, G, BN)
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    # dQ_partial [BM, D]: the two warpgroups split the head dim (BM = 64 rows is one
    # warpgroup's M)
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, HEAD_DIM // 2, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    k_idx = k0 + gl.arange(0, BN, layout=gl.SliceLayout(1, st_layout))
    dq_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, dq_layout))
    dq_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
    dk = gl.zeros([BN, HEAD_DIM], gl.float32, layout=kv_layout)
    dv = gl.zeros([BN, HEAD_DIM], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([BN, BM], gl.float32, layout=st_layout)
    dq_zero = gl.zeros([BM, HEAD_DIM], gl.float32, layout=dq_layout)
    dq_part = dq_zero
    prev_rows = (b * Hq).to(gl.int64) * Lq  # first row of the previous step's dQ tile
    prev_valid = Lq  # and how many of its rows exist
    mbarrier.wait(kv_bar, 0)
    t = 0
    for g in range(0, G):
        h = hkv * G + g
        hp = h % NPH
        bh = (b * Hq + h).to(gl.int64)
        x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = key_block_visit(
            RLO, RHI, hp, NPH, Lq, Lk, k0, BM, BN, PIECES)
        for u in range(0, n):
            i = block_at(u, x0, n1, y0)
            st = t % STAGES
            ph = (t // STAGES) & 1
            offs_q = i * BM + gl.arange(0, BM, layout=col_st)
            q_ok = offs_q < Lq
            lse = gl.load(LSE + bh * Lq + offs_q, mask=q_ok, other=float("inf"))
            delta = gl.load(Delta + bh * Lq + offs_q, mask=q_ok, other=0.0)
            mbarrier.wait(q_ready.index(st), ph)
            s_t = warpgroup_mma(k_smem, q_smem.index(st).permute((1, 0)), st_zero,
                                use_acc=False, is_async=True)
            mbarrier.wait(o_ready.index(st), ph)
            dp_t = warpgroup_mma(v_smem, do_smem.index(st).permute((1, 0)), st_zero,
                                 use_acc=False, is_async=True)
            if OVERLAP:  # the previous step's dV, dK, dQ were left in flight
                s_t, dv, dk, dq_part = warpgroup_mma_wait(num_outstanding=1,
                                                          deps=(s_t, dv, dk, dq_part))
                if t > 0:
                    mbarrier.arrive(q_empty.index((t - 1) % STAGES), count=1)
                    mbarrier.arrive(o_empty.index((t - 1) % STAGES), count=1)
                    _add_dq(DQA, prev_rows, dq_part, dq_rows, dq_cols, prev_valid, HEAD_DIM)
                    thread_barrier()  # every warpgroup's dQ product has read dSᵀ
            else:
                s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
            p_t = gl.exp2(s_t * qk_scale - lse[None, :])
            if is_partial(i, f0_lo, f0_hi, f1_lo, f1_hi):
                lo0, hi0, lo1, hi1 = row_bounds(RLO, RHI, hp, NPH, Lq, offs_q, q_ok, PIECES)
                keep = keeps(lo0[None, :], hi0[None, :], lo1[None, :], hi1[None, :],
                             k_idx[:, None], PIECES)
                p_t = gl.where(keep, p_t, 0.0)
            dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do_smem.index(st),
                               dv, is_async=True)
            dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))
            ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
            dk = warpgroup_mma(gl.convert_layout(ds_t, op_layout), q_smem.index(st), dk,
                               is_async=True)
            ds_smem.store(ds_t)
            fence_async_shared()
            thread_barrier()  # both warpgroups' halves of dSᵀ are in shared memory
            dq_part = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, dq_zero, use_acc=False,
                                    is_async=True)
            if OVERLAP:  # no wait: these three are the only groups in flight
                dv, dk, dq_part = warpgroup_mma_wait(num_outstanding=3, deps=(dv, dk, dq_part))
            else:
                dv, dk, dq_part = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq_part))
                mbarrier.arrive(q_empty.index(st), count=1)
                mbarrier.arrive(o_empty.index(st), count=1)
                _add_dq(DQA, bh * Lq + i * BM, dq_part, dq_rows, dq_cols, Lq - i * BM,
                        HEAD_DIM)
                thread_barrier()  # dSᵀ read by every warpgroup before the next step
            prev_rows = bh * Lq + i * BM
            prev_valid = Lq - i * BM
            t += 1
    if OVERLAP:
        dv, dk, dq_part = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq_part))
        if t > 0:
            _add_dq(DQA, prev_rows, dq_part, dq_rows, dq_cols, prev_valid, HEAD_DIM)
    dk = dk * scale
    offs_n = k0 + gl.arange(0, BN, layout=gl.SliceLayout(1, kv_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    base = b.to(gl.int64) * skb + hkv.to(gl.int64) * skh
    offs = base + offs_n[:, None].to(gl.int64) * skn + offs_d[None, :]
    ok = (offs_n < Lk)[:, None]
    gl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon_jit
def _fused_kernel(desc_q, desc_k, desc_v, desc_do, DK, DV, DQA, LSE, Delta, RLO, RHI, Hq, G,
                  NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, skb, skh,
                  skn, qk_scale, scale, HEAD_DIM: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr,
                  OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = desc_k.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BN, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BN, HEAD_DIM], desc_v.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_do.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BM], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [BN, BM], ds_layout)
    kv_bar, q_ready, q_empty, o_ready, o_empty = pipeline_barriers(STAGES)
    gl.warp_specialize([
        (_fused_compute, (k_smem, v_smem, q_smem, do_smem, ds_smem, kv_bar, q_ready, q_empty,
                          o_ready, o_empty, DK, DV, DQA, LSE, Delta, RLO, RHI, Hq, G, NPH, Lq,
                          Lk, skb, skh, skn, qk_scale, scale, HEAD_DIM, BM, BN, STAGES, PIECES,
                          OVERLAP, num_warps)),
        (_dkdv_load, (desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, kv_bar,
                      q_ready, q_empty, o_ready, o_empty, RLO, RHI, Hq, G, NPH, Lq, Lk, q_rb,
                      q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES,
                      PIECES)),
    ], [1], [24])


def launch_gluon_backward_fused(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                rows: RowPieces, scale: float,
                                tiles: tuple[int, int] = (64, 128), stages: int = 2,
                                num_warps: int = 8, overlap: bool = True
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) through the one-pass kernel, or None where ``launch_gluon_backward``
    would return None (no TMA layout, grid overflow). Arguments as there; ``tiles`` = (query
    rows per step, keys per program); ``overlap`` leaves each step's three gradient products
    in flight while the next step's scores are issued (the dQ tile is added once they
    complete)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if b * hq > MAX_GRID_Y:
        return None
    if row_view(dout) is None:
        dout = dout.contiguous()
    views = [row_view(t) for t in (q, k, v, dout)]
    if any(x is None for x in views) or views[1][1:] != views[2][1:]:
        return None
    (q2, q_rb, q_rh, q_ch), (k2, k_rb, k_rh, k_ch), (v2, _, _, _), (o2, o_rb, o_rh, o_ch) = views
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    delta = launch_delta(out, dout)
    dq_acc = torch.zeros((b, hq, lq, d), device=q.device, dtype=torch.float32)
    dk = torch.empty((b, hkv, lk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, hkv, lk, d), device=q.device, dtype=v.dtype)
    bm, bn = tiles
    _fused_kernel[(triton.cdiv(lk, bn), b * hkv)](
        _descriptor(q2, bm, d, gdtype), _descriptor(k2, bn, d, gdtype),
        _descriptor(v2, bn, d, gdtype), _descriptor(o2, bm, d, gdtype), dk, dv, dq_acc, lse,
        delta, rows.lo, rows.hi, hq, hq // hkv, rows.pattern_heads, lq, lk, q_rb, q_rh, q_ch,
        k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, dk.stride(0), dk.stride(1), dk.stride(2),
        scale * _LOG2E, scale, HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages, PIECES=rows.pieces,
        OVERLAP=overlap, num_warps=num_warps)
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    torch.mul(dq_acc, scale, out=dq)
    return dq, dk, dv
