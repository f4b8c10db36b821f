"""Row kernels that combine the two parts of a strided union: the merge of their outputs and
the sum of their gradients, each in one pass over the rows.

Each part gives its output (normalised over its own keys) and its log-sum-exp; the union's
output is their average weighted by ``2^lse`` and its log-sum-exp their log-add. One Triton
kernel reads both parts once and writes the merged output in its final dtype: done with
PyTorch element-wise operations over float32 parts, the merge made about a dozen passes over
``[B, H, L, D]`` and cost more than the kernels it merged (bench/NOTES.md, version 9).

Rows are addressed through a 4-D row index with any strides per operand, so a part still in
another row order (the residue classes of ``codegen/routes/residue.py``, as a 5-D view) is read in
place instead of being copied first; ``add_rows_`` adds such a part's gradients the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.config import TileConfig

__all__ = ["add_rows_", "merge_parts"]


@triton.jit
def _row_offsets(rows, n1, n2, n3, s0, s1, s2, s3):
    """Offsets of flat row indices in a tensor with row dims (., n1, n2, n3), strides s*."""
    i3 = rows % n3
    rest = rows // n3
    i2 = rest % n2
    rest = rest // n2
    i1 = rest % n1
    i0 = rest // n1
    return (i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2
            + i3.to(tl.int64) * s3)


@triton.jit
def _merge_kernel(
    OA, LA, OB, LB, OUT, LOUT, n_rows, n1, n2, n3,
    soa0, soa1, soa2, soa3, soad, sla0, sla1, sla2, sla3,
    sob0, sob1, sob2, sob3, sobd, slb0, slb1, slb2, slb3,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # +inf marks a row with no key in that part (the kernels' convention)
    la = tl.load(LA + _row_offsets(rows, n1, n2, n3, sla0, sla1, sla2, sla3), mask=row_ok,
                 other=float("inf"))
    lb = tl.load(LB + _row_offsets(rows, n1, n2, n3, slb0, slb1, slb2, slb3), mask=row_ok,
                 other=float("inf"))
    la = tl.where(la == float("inf"), float("-inf"), la)
    lb = tl.where(lb == float("inf"), float("-inf"), lb)
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)
    wa = tl.exp2(la - top)
    wb = tl.exp2(lb - top)
    total = wa + wb
    none = total == 0.0
    safe = tl.where(none, 1.0, total)
    lse = tl.where(none, float("inf"), top + tl.log2(safe))
    oa = tl.load(OA + _row_offsets(rows, n1, n2, n3, soa0, soa1, soa2, soa3)[:, None]
                 + offs_d[None, :] * soad, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OB + _row_offsets(rows, n1, n2, n3, sob0, sob1, sob2, sob3)[:, None]
                 + offs_d[None, :] * sobd, mask=mask, other=0.0).to(tl.float32)
    out = oa * (wa / safe)[:, None] + ob * (wb / safe)[:, None]
    out = tl.where(none[:, None], 0.0, out)
    tl.store(OUT + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LOUT + rows, lse, mask=row_ok)


@triton.jit
def _add_rows_kernel(
    DST, SRC, n_rows, n1, n2, n3, sd0, sd1, sd2, sd3, sdd, ss0, ss1, ss2, ss3, ssd,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = DST + _row_offsets(rows, n1, n2, n3, sd0, sd1, sd2, sd3)[:, None] + offs_d[None, :] * sdd
    src = SRC + _row_offsets(rows, n1, n2, n3, ss0, ss1, ss2, ss3)[:, None] + offs_d[None, :] * ssd
    total = tl.load(dst, mask=mask, other=0.0).to(tl.float32) + tl.load(
        src, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, total.to(DST.dtype.element_ty), mask=mask)


def _row_tiles(head_dim: int) -> tuple[int, int]:
    """(rows, padded D) per program of the row kernels: about 4096 elements each."""
    block_d = TileConfig.d_pad(head_dim)
    return max(1, min(64, 4096 // block_d)), block_d


def _as_rows(x: torch.Tensor, row_dims: int) -> torch.Tensor:
    """``x`` (``row_dims`` row dims, then D or nothing) with its row dims padded in front to
    4 by size-1 dims (a view)."""
    return x.reshape((1,) * (4 - row_dims) + tuple(x.shape))


def merge_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                lse_b: torch.Tensor, out_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from each set's output ``[..., D]``
    and log-sum-exp ``[...]`` (log2 units, +inf for a row with no key, as the kernels save
    them; up to 4 row dims, any strides). Returns the merged output (``out_dtype``, default
    ``out_a``'s) and log-sum-exp, both contiguous with the parts' shape; rows without a key in
    either part give zeros and +inf."""
    shape = tuple(out_a.shape)
    if tuple(out_b.shape) != shape or tuple(lse_a.shape) != shape[:-1] or tuple(
            lse_b.shape) != shape[:-1]:
        raise ValueError(f"merge_parts: parts of shapes {shape}, {tuple(out_b.shape)} and "
                         f"log-sum-exps {tuple(lse_a.shape)}, {tuple(lse_b.shape)} differ")
    if not 2 <= len(shape) <= 5:
        raise ValueError(f"merge_parts: outputs need 1 to 4 row dims and D, got shape {shape}")
    dims, d = len(shape) - 1, shape[-1]
    out = torch.empty(shape, device=out_a.device, dtype=out_dtype or out_a.dtype)
    lse = torch.empty(shape[:-1], device=out_a.device, dtype=torch.float32)
    n_rows = lse.numel()
    if n_rows == 0:
        return out, lse
    oa, ob = _as_rows(out_a, dims), _as_rows(out_b, dims)
    la, lb = _as_rows(lse_a, dims), _as_rows(lse_b, dims)
    _, n1, n2, n3 = la.shape
    block_r, block_d = _row_tiles(d)
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        oa, la, ob, lb, out, lse, n_rows, n1, n2, n3,
        *oa.stride(), *la.stride(), *ob.stride(), *lb.stride(),
        HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse


def add_rows_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst += src`` row by row, for ``[..., D]`` tensors of one shape (up to 4 row dims, any
    strides; ``dst``'s rows must not overlap). One pass that reads each row of ``src`` where
    it lies: PyTorch's element-wise add of a permuted view ran at half the bandwidth
    (bench/NOTES.md, version 9). The sum is formed in float32 and rounded once."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"add_rows_: shapes {tuple(dst.shape)} and {tuple(src.shape)} differ")
    if not 2 <= dst.dim() <= 5:
        raise ValueError(f"add_rows_: tensors need 1 to 4 row dims and D, got shape "
                         f"{tuple(dst.shape)}")
    dims, d = dst.dim() - 1, dst.shape[-1]
    n_rows = dst.numel() // max(d, 1)
    if n_rows == 0 or d == 0:
        return dst
    dr, sr = _as_rows(dst, dims), _as_rows(src, dims)
    _, n1, n2, n3, _ = dr.shape
    block_r, block_d = _row_tiles(d)
    _add_rows_kernel[(triton.cdiv(n_rows, block_r),)](
        dr, sr, n_rows, n1, n2, n3, *dr.stride(), *sr.stride(),
        HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return dst
