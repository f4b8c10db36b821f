"""Backward preprocessing: Δ = rowsum(dO ∘ O), one float32 per query row.

Pattern-independent, so this kernel is written directly rather than generated. One program
reduces BM rows of one (batch, head); inputs may have any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.compile_only import launch


@triton.jit
def _delta_kernel(Out, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, L,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som
                + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdm
                 + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


def launch_delta(out: torch.Tensor, dout: torch.Tensor, block_m: int = 64) -> torch.Tensor:
    """Δ [B, H, L] float32 from out, dout [B, H, L, D]."""
    b, h, length, d = out.shape
    delta = torch.empty((b, h, length), device=out.device, dtype=torch.float32)
    d_pad = max(16, 1 << (d - 1).bit_length())
    grid = (triton.cdiv(length, block_m), b * h)
    launch(_delta_kernel, grid, out, dout, delta, *out.stride(), *dout.stride(), h, length,
                        HEAD_DIM=d, D_PAD=d_pad, BM=block_m)
    return delta
