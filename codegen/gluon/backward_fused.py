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
from sparse_compile.codegen.gluon.backward import _dkdv_compute, _dkdv_load, backward_operands
from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.rows import RowPieces
from sparse_compile.codegen.gluon.support import gl, gluon_jit

_LOG2E = 1.4426950408889634


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
        (_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, ds_smem, kv_bar, q_ready, q_empty,
                         o_ready, o_empty, DK, DV, DQA, LSE, Delta, RLO, RHI, Hq, G, NPH, Lq, Lk,
                         skb, skh, skn, qk_scale, scale, HEAD_DIM, BM, BN, STAGES, PIECES,
                         OVERLAP, True, num_warps)),
        (_dkdv_load, (desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, kv_bar,
                      q_ready, q_empty, o_ready, o_empty, RLO, RHI, Hq, G, NPH, Lq, Lk, q_rb,
                      q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES,
                      PIECES)),
    ], [1], [24])


def launch_gluon_backward_fused(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                rows: RowPieces, scale: float,
                                tiles: tuple[int, int] = (64, 128), stages: int = 2,
                                num_warps: int = 8, overlap: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) through the one-pass kernel, or None where ``launch_gluon_backward``
    would return None (no TMA layout, grid overflow). Arguments as there; ``tiles`` = (query
    rows per step, keys per program); ``overlap`` leaves each step's three gradient products
    in flight while the next step's scores are issued (the dQ tile is added once they
    complete)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    ops = backward_operands(dout, q, k, v, out)
    if ops is None:
        return None
    dq_acc = torch.zeros((b, hq, lq, d), device=q.device, dtype=torch.float32)
    dk, dv = ops.dk, ops.dv
    bm, bn = tiles
    _fused_kernel[(triton.cdiv(lk, bn), b * hkv)](
        *ops.descriptors(bm, bn), dk, dv, dq_acc, lse, ops.delta, rows.lo, rows.hi, hq,
        hq // hkv, rows.pattern_heads, lq, lk, *ops.offsets, dk.stride(0), dk.stride(1),
        dk.stride(2), scale * _LOG2E, scale, HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages,
        PIECES=rows.pieces, OVERLAP=overlap, num_warps=num_warps)
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    torch.mul(dq_acc, scale, out=dq)
    return dq, dk, dv
