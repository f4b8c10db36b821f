"""Document starts and ends from packed-sequence ids, in one small kernel per batch row.

Every kernel that runs under documents needs, per token, the key indices ``[start, end]`` of its
document (``codegen/launch/positions.py``). Computing them with PyTorch takes a dozen launches
(comparisons, ``cummax``, flips) and about 0.45 ms at 64k tokens on an H100, a few per cent of
a banded layer's forward and backward, twice per layer; here one program per batch row walks the
row in tiles with a running maximum (starts, forwards) and a running minimum (ends, backwards).
``document_bounds_reference`` is the same in PyTorch: the CPU path without the interpreter, and
what the tests compare the kernel with.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.fallbacks import FellBack, fall_back_on_failure, family_available


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _document_bounds_kernel(Ids, Start, End, L, BLOCK: tl.constexpr):
    """Ids [B, L] (any integer type); Start, End [B, L] int32. A document is a run of equal
    ids; a negative id (padding) gets the empty range [i, i - 1]."""
    row = tl.program_id(0).to(tl.int64) * L
    offs = tl.arange(0, BLOCK)
    carry = tl.full([], 0, tl.int32)
    for first_col in range(0, L, BLOCK):
        idx = first_col + offs
        ok = idx < L
        ids = tl.load(Ids + row + idx, mask=ok, other=-1)
        prev = tl.load(Ids + row + idx - 1, mask=ok & (idx > 0), other=-1)
        opens = (idx == 0) | (ids != prev)
        start = tl.associative_scan(tl.where(opens & ok, idx, 0), 0, _maximum)
        start = tl.maximum(start, carry)
        carry = tl.max(tl.where(ok, start, 0), 0)
        tl.store(Start + row + idx, tl.where(ids < 0, idx, start), mask=ok)
    n_tiles = tl.cdiv(L, BLOCK)
    carry = tl.full([], 0, tl.int32) + (L - 1)
    for tile in range(0, n_tiles):
        idx = (n_tiles - 1 - tile) * BLOCK + offs
        ok = idx < L
        ids = tl.load(Ids + row + idx, mask=ok, other=-1)
        nxt = tl.load(Ids + row + idx + 1, mask=idx < L - 1, other=-1)
        closes = (idx == L - 1) | (ids != nxt)
        end = tl.associative_scan(tl.where(closes & ok, idx, L - 1), 0, _minimum, reverse=True)
        end = tl.minimum(end, carry)
        carry = tl.min(tl.where(ok, end, L - 1), 0)
        tl.store(End + row + idx, tl.where(ids < 0, idx - 1, end), mask=ok)


def document_bounds_reference(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``document_bounds`` in PyTorch (any device)."""
    b, length = ids.shape
    idx = torch.arange(length, device=ids.device, dtype=torch.int64).expand(b, length)
    boundary = ids[:, 1:] != ids[:, :-1]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = boundary
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:, :-1] = boundary
    start = torch.where(first, idx, 0).cummax(dim=-1).values
    end = torch.where(last, idx, length - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    pad = ids < 0
    start = torch.where(pad, idx, start)
    end = torch.where(pad, idx - 1, end)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def document_bounds(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the key indices ``[start, end]`` of its document (int32 ``[B, L]``).

    ``ids`` ``[B, L]``: a document is a run of equal non-negative ids; a negative id marks a
    padding token, which gets the empty range ``[i, i - 1]``. O(L) work on the ids' device,
    no host synchronisation.
    """
    kernels = ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not kernels or ids.numel() == 0 or not family_available("documents"):
        return document_bounds_reference(ids)
    ids = ids.contiguous()
    b, length = ids.shape
    start = torch.empty((b, length), device=ids.device, dtype=torch.int32)
    end = torch.empty_like(start)
    block = min(1024, triton.next_power_of_2(max(length, 16)))
    try:
        with fall_back_on_failure("documents"):
            _document_bounds_kernel[(b,)](ids, start, end, length, BLOCK=block, num_warps=4)
    except FellBack:
        return document_bounds_reference(ids)
    return start, end
