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
from sparse_compile.codegen.gluon.backward_dkdv import _dkdv_kernel
from sparse_compile.codegen.gluon.backward_dq import _dq_kernel
from sparse_compile.codegen.gluon.bias import bias_args
from sparse_compile.codegen.gluon.forward import row_view
from sparse_compile.codegen.gluon.key_mask import key_mask_args
from sparse_compile.codegen.gluon.rows import RowPieces
from sparse_compile.codegen.gluon.score import NO_MODS, ScoreMods
from sparse_compile.codegen.gluon.support import CONSUMER_WARPS, TensorDescriptor, gl
from sparse_compile.codegen.launch.compile_only import launch
from sparse_compile.codegen.launch.config import MAX_GRID_Y

_LOG2E = 1.4426950408889634


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


def default_tiles(head_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(``dq_tiles``, ``kv_tiles``) of ``launch_gluon_backward`` at ``head_dim``: at 256 the
    dQ pass streams 32-key tiles and the dK/dV launches 32-row query tiles, so that two ring
    stages fit in shared memory beside the program's own 128 rows (or keys) of 256 columns."""
    if head_dim > 128:
        return (128, 32), (32, 128)
    return (128, 64), (64, 128)


def gradient_launches(head_dim: int) -> tuple[int, ...]:
    """The dK/dV pass's launches at ``head_dim`` by their ``GRADS`` (codegen/gluon/
    backward_dkdv.py): one for both gradients, or at 256 one for dV and one for dK."""
    return (1, 2) if head_dim > 128 else (3,)


def launch_gluon_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          rows: RowPieces, scale: float,
                          dq_tiles: tuple[int, int] | None = None,
                          kv_tiles: tuple[int, int] | None = None, stages: int = 2,
                          overlap: bool = False, mods: ScoreMods = NO_MODS,
                          key_mask: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) through the Gluon passes, or None when an operand's layout does not allow
    TMA or the (batch, head) count overflows the grid (the caller runs the ``tl`` passes).
    Shapes and ``lse`` as ``launch_gluon_forward``'s; ``dout`` is copied to a contiguous
    tensor when its layout is not walkable.
    ``dq_tiles`` = (query rows, keys) of the dQ pass, ``kv_tiles`` = (query rows per step,
    keys per program) of the dK/dV pass (default: ``default_tiles``); the programs' rows (dQ)
    and keys (dK/dV) are split between two warpgroups, so both are at least 128. ``overlap``
    leaves the dQ pass's product in flight while the next step's scores are issued (off by
    default: ptxas then serialises the products, bench/NOTES.md version 13); ``mods``: the
    forward's logit soft-capping and position biases (``score.py``); ``key_mask``: its key
    mask (``key_mask.py``); ``bias``: its other bias tensor, whose gradient this does not
    compute (``bias.py``)."""
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
    km_args, km_flags = key_mask_args(key_mask, q)
    b_args, b_flags = bias_args(bias, q)
    default_dq, default_kv = default_tiles(d)
    bm, bn = dq_tiles or default_dq
    launch(
        _dq_kernel, (triton.cdiv(lq, bm), b * hq), *ops.descriptors(bm // 2, bn), dq, lse,
        ops.delta, out, rows.lo, rows.hi, hq, hq // hkv, nph, lq, lk, *ops.offsets,
        dq.stride(0), dq.stride(1), dq.stride(2), *out.stride(), qk_scale, scale, *mod_args,
        *km_args, *b_args, HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages, PIECES=rows.pieces,
        OVERLAP=overlap, **mod_flags, **km_flags, **b_flags, num_warps=CONSUMER_WARPS)
    bm, bn = kv_tiles or default_kv
    for grads in gradient_launches(d):
        launch(
            _dkdv_kernel, (triton.cdiv(lk, bn), b * hkv), *ops.descriptors(bm, bn // 2), dk,
            dv, lse, ops.delta, rows.lo, rows.hi, rows.key_lo, rows.key_hi, hq, hq // hkv, nph,
            lq, lk, *ops.offsets, dk.stride(0), dk.stride(1), dk.stride(2), qk_scale, scale,
            *mod_args, *km_args, *b_args, HEAD_DIM=d, BM=bm, BN=bn, STAGES=stages,
            PIECES=rows.pieces, **mod_flags, **km_flags, **b_flags, GRADS=grads,
            num_warps=CONSUMER_WARPS)
    return dq, dk, dv

