"""Tile configurations: block sizes, warps and pipeline stages per kernel and device."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the three kernels.

    fwd_m x fwd_n: forward query x key tile; dq_m x dq_n: dQ pass; kv_m x kv_n: dK/dV pass
    (kv_n keys per program, kv_m queries per step).
    """

    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_m: int = 128
    dq_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    kv_m: int = 64
    kv_n: int = 128
    kv_warps: int = 8
    kv_stages: int = 2
    # Per kernel: inner-loop tiles through TMA descriptors where the operand allows it
    # (codegen/launch/tma.py), and, for interval patterns, one loop over all visited blocks with the
    # PARTIAL mask under a runtime branch (one software pipeline per tile) instead of three.
    fwd_tma: bool = False
    dq_tma: bool = False
    kv_tma: bool = False
    fwd_merged: bool = False
    dq_merged: bool = False
    kv_merged: bool = False
    # Backward form: 0 two passes (dQ pass, then dK/dV pass: 7 matmuls per block pair);
    # 1 one dK/dV pass that also adds dS K into a float32 dQ buffer by atomics (5 matmuls);
    # 2 the same with a TMA reduce-add of each dQ tile where exact (else 1). See
    # codegen/attention.py ``fused_backward`` for when the two-pass form is used regardless.
    # Default 0 everywhere: on the H100 (bench/NOTES.md, version 5) the one-pass form ran
    # 0.42-0.92x the two-pass speed on all six patterns swept (causal, bands, block, tables):
    # the extra transposed dS tile and the BM x D float32 atomics per block pair cost more
    # than the dQ pass's two recomputed matmuls, plus 0.12 ms of dQ buffer zero + cast at 16k.
    bwd_fused: int = 0
    # Heads per launch group (0: all heads in one group). Programs are issued group by group,
    # heads fastest within a group, so the programs resident at once read the K/V of few heads
    # and share them in L2: with B*H = 256 and heads fastest across all of them, a banded
    # forward at L=4k streamed K/V from DRAM at half the 16k (B=1) rate (bench/NOTES.md,
    # version 8).
    head_group: int = 16
    # On Hopper (sm90) with a supported Triton, the forward of interval patterns runs the
    # warp-specialised Gluon kernel (codegen/gluon/); False keeps the ``tl`` kernels (as does
    # the environment variable SPARSE_COMPILE_KERNELS=tl, codegen/gluon/support.py).
    gluon: bool = True

    @staticmethod
    def d_pad(head_dim: int) -> int:
        """Head dim padded to a power of two, at least 16 (tl.dot's minimum)."""
        return max(16, 1 << (head_dim - 1).bit_length())

    @staticmethod
    def precision(dtype: torch.dtype, head_dim: int) -> str:
        """tl.dot input precision. float32 inputs follow PyTorch's float32 matmul setting:
        three TF32 products ("tf32x3") by default ("highest"), float32-level error, and one
        ("tf32") where TF32 is allowed (``torch.set_float32_matmul_precision("high")``). Exact
        products ("ieee") run on the CUDA cores: on the H100 they made a float32 forward 4x
        and a backward 17-27x slower than tf32x3 for the same error against float64
        (bench/NOTES.md, version 9). Heads wider than 128 keep exact products: the split
        operands of tf32x3 overflow shared memory with their tiles (measured at D=160).
        "upcast" (bf16 operands multiplied as fp32) under the interpreter, whose bf16 tl.dot
        is wrong (triton 3.9)."""
        if dtype == torch.float32:
            if TileConfig.d_pad(head_dim) > 128:
                return "ieee"
            return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            return "upcast"
        return "tf32"

    def key(self) -> str:
        return "-".join(str(getattr(self, f)) for f in self.__dataclass_fields__)


# CUDA's limit on a grid's second dimension (launch groups go there).
MAX_GRID_Y = 65535


@lru_cache(maxsize=256)
def launch_groups(heads: int, cap: int) -> int:
    """Heads per launch group for ``heads`` = batch x heads programs: the largest divisor of
    ``heads`` up to ``cap`` (0: all), so every group is full and the grid has no idle programs.
    All heads in one group when the groups would overflow the grid's second dimension. Cached:
    asked on every launch."""
    if cap <= 0 or heads <= cap:
        return heads
    group = max(g for g in range(1, cap + 1) if heads % g == 0)
    return group if heads // group <= MAX_GRID_Y else heads


def merged_loop(enabled: bool, *extents: tuple[int, int]) -> bool:
    """Whether a kernel runs its merged loop (``*_merged``): only when every ``(length, tile)``
    it walks or holds divides whole. With a ragged tile (masked edge entries inside the merged
    loop's unpredicated branch), triton 3.6's software pipeliner fails to compile the merged
    loop on Hopper (PassManager::run failed; bench/NOTES.md, version 8), so such calls keep
    the separate loops."""
    return enabled and all(length % tile == 0 for length, tile in extents)


# Interpreter: small tiles keep the numpy work per program small and exercise many blocks.
INTERPRETER = TileConfig(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1)


def default_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tiles for ``device``: tuned per GPU generation and head dim (see bench/NOTES.md)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER
    d = TileConfig.d_pad(head_dim)
    major, _ = torch.cuda.get_device_capability(device)
    cfg = TileConfig()
    if dtype == torch.float32:
        cfg = replace(cfg, fwd_m=64, fwd_n=32, fwd_warps=4, fwd_stages=2, dq_m=64, dq_n=32,
                      dq_warps=4, kv_m=32, kv_n=64, kv_warps=4)
        return cfg
    if d <= 64 and major >= 9:
        # Hopper, bf16, D=64: bench/attention.py --tune; TMA and merged loops for the two
        # backward passes from --sweep --sweep-set d64 (bench/NOTES.md, version 7: dQ 6-10%
        # and dK/dV 7-10% faster on bands, block, sink|sliding, causal; the forward gained
        # nothing on bands and lost 24% on global|local with them, so it keeps pointer loads).
        # Narrower heads (16, 32) keep pointer loads and separate loops: the sweep measured
        # D=64 only.
        cfg = replace(cfg, fwd_m=64, fwd_n=64, fwd_warps=4, fwd_stages=3, dq_m=64, dq_n=64,
                      dq_warps=4, dq_stages=3, kv_m=64, kv_n=64, kv_warps=4, kv_stages=3)
        if d == 64:
            cfg = replace(cfg, dq_tma=True, kv_tma=True, dq_merged=True, kv_merged=True)
    elif d <= 64:
        cfg = replace(cfg, fwd_m=128, fwd_n=64, fwd_warps=4, fwd_stages=3)
    elif d <= 128 and major >= 9:
        # H100, bf16, D=128: bench/attention.py --sweep / --tune (bench/NOTES.md, version 4).
        cfg = replace(cfg, fwd_m=64, fwd_n=64, fwd_warps=4, fwd_stages=3, dq_m=64, dq_n=32,
                      dq_warps=4, dq_stages=3, kv_m=32, kv_n=64, kv_warps=4, kv_stages=3,
                      fwd_tma=True, dq_tma=True, kv_tma=True, fwd_merged=True, dq_merged=True,
                      kv_merged=True)
    elif d <= 128:
        cfg = replace(cfg, fwd_m=128, fwd_n=64, fwd_warps=8, fwd_stages=2)
    else:
        cfg = replace(cfg, fwd_m=64, fwd_n=32, fwd_warps=4, fwd_stages=2, dq_m=64, dq_n=32,
                      dq_warps=4, kv_m=32, kv_n=64, kv_warps=4)
    return cfg


# Mean kept keys per query row from which large tiles win (bench/NOTES.md): the backward's
# (version 4: causal at 16k runs dQ 14% faster with 128x64 tiles, sliding(1024) 20% slower;
# these keep three loops, the form in which they were measured) and the forward's (version 6:
# 128x128 with 8 warps runs dense 16k in 4.50 ms instead of 5.98, causal 2.13 instead of 2.17,
# and loses on sliding(1024) and block(512), 0.385 vs 0.332 and 0.216 vs 0.186 ms).
LONG_ROWS = 4096


def long_rows_config(cfg: TileConfig, device: torch.device, head_dim: int,
                     dtype: torch.dtype) -> TileConfig:
    """Tiles for long rows (causal, dense, wide windows) on Hopper with D <= 128 and 16-bit
    inputs: 128x128 forward tiles, more queries per dQ program, more keys per dK/dV program,
    8 warps."""
    if (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
            or dtype not in (torch.float16, torch.bfloat16)
            or not 64 < TileConfig.d_pad(head_dim) <= 128
            or torch.cuda.get_device_capability(device)[0] < 9):
        return cfg
    return replace(cfg, fwd_m=128, fwd_n=128, fwd_warps=8, fwd_stages=3, dq_m=128, dq_n=64,
                   dq_warps=8, dq_stages=3, dq_tma=False, dq_merged=False, kv_m=64, kv_n=128,
                   kv_warps=8, kv_stages=3, kv_tma=False, kv_merged=False)
