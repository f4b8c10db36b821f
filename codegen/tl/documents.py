"""Document starts and ends from packed-sequence ids, in two small kernels parallel over tiles.

Every kernel that runs under documents needs, per token, the key indices ``[start, end]`` of its
document (``codegen/launch/positions.py``): a document is a run of equal ids, so a token's start
is the last index at or before it that opens a run (its id differs from its predecessor's, or it
is the row's first), and its end the first index at or after it that closes one. Both are scans,
a running maximum forwards and a running minimum backwards. One program per batch row walking the
row in tiles took about 0.43 ms at 64k tokens on an H100, a few per cent of a banded layer's
forward and backward: the walk is sequential, so one multiprocessor does it all. Here the row is
cut into tiles and every ``(tile, row)`` is a program of two launches:

1. ``_tile_bounds_kernel``: per tile, the last index in it that opens a run and the first that
   closes one (``[2, B, n_tiles]`` int32; a tile inside one long document has neither and stores
   the neutral value, 0 and ``L - 1``, which index 0 and index ``L - 1`` give anyway);
2. ``_document_bounds_kernel``: per tile, the carry into it is the maximum of the opening
   indices of the tiles before it and the minimum of the closing indices of the tiles after it
   (the row's tile vector, loaded masked and reduced), then the in-tile scans as above.

The ids are read by both launches and the bounds written once; no program waits on another
within a launch, so the time is that of two short launches spread over all multiprocessors. A
negative id (padding) forms runs like any other and then gets the empty range ``[i, i - 1]``.
Tiles grow with the row (at most ``MAX_TILES`` of them up to ``MAX_TILES * MAX_BLOCK`` = 2^20
tokens, ``MAX_BLOCK``-token tiles beyond) so that the tile vector each program reduces stays a
few kilobytes; the reduction loops over it ``TILE_CHUNK`` tiles at a time, so any length works.
``document_bounds_reference`` is the same in PyTorch: the CPU path without the interpreter, and
what the tests compare the kernels with.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.fallbacks import FellBack, fall_back_on_failure, family_available

MAX_TILES = 256
MIN_BLOCK, MAX_BLOCK = 1024, 4096
TILE_CHUNK = 256


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _runs(Ids, row, idx, L):
    """The ids at ``idx`` (int32 [BLOCK]) of the row at offset ``row``, whether each opens a run
    and whether each closes one, and which are inside the row."""
    ok = idx < L
    ids = tl.load(Ids + row + idx, mask=ok, other=0)
    prev = tl.load(Ids + row + idx - 1, mask=ok & (idx > 0), other=0)
    nxt = tl.load(Ids + row + idx + 1, mask=idx < L - 1, other=0)
    opens = ok & ((idx == 0) | (ids != prev))
    closes = ok & ((idx == L - 1) | (ids != nxt))
    return ids, opens, closes, ok


@triton.jit
def _tile_bounds_kernel(Ids, Tiles, L, n_tiles, BLOCK: tl.constexpr):
    """Ids [B, L]; Tiles [2, B, n_tiles] int32: per tile, the last index that opens a run (0 if
    none) and the first that closes one (L - 1 if none)."""
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    idx = tile * BLOCK + tl.arange(0, BLOCK)
    _, opens, closes, _ = _runs(Ids, b * L, idx, L)
    per_row = b * n_tiles + tile
    tl.store(Tiles + per_row, tl.max(tl.where(opens, idx, 0), 0))
    tl.store(Tiles + tl.num_programs(1).to(tl.int64) * n_tiles + per_row,
             tl.min(tl.where(closes, idx, L - 1), 0))


@triton.jit
def _document_bounds_kernel(Ids, Tiles, Start, End, L, n_tiles,
                            BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Ids [B, L] (any integer type); Tiles [2, B, n_tiles] from ``_tile_bounds_kernel``; Start,
    End [B, L] int32. A negative id (padding) gets the empty range [i, i - 1]."""
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    opening = Tiles + b * n_tiles
    closing = Tiles + (tl.num_programs(1).to(tl.int64) + b) * n_tiles
    chunk = tl.arange(0, CHUNK)
    carry_start = tl.full([], 0, tl.int32)
    for first in range(0, tile, CHUNK):
        j = first + chunk
        carry_start = tl.maximum(carry_start,
                                 tl.max(tl.load(opening + j, mask=j < tile, other=0), 0))
    carry_end = tl.full([], 0, tl.int32) + (L - 1)
    for first in range(tile + 1, n_tiles, CHUNK):
        j = first + chunk
        carry_end = tl.minimum(carry_end,
                               tl.min(tl.load(closing + j, mask=j < n_tiles, other=L - 1), 0))

    row = b * L
    idx = tile * BLOCK + tl.arange(0, BLOCK)
    ids, opens, closes, ok = _runs(Ids, row, idx, L)
    start = tl.associative_scan(tl.where(opens, idx, 0), 0, _maximum)
    start = tl.maximum(start, carry_start)
    end = tl.associative_scan(tl.where(closes, idx, L - 1), 0, _minimum, reverse=True)
    end = tl.minimum(end, carry_end)
    pad = ids < 0
    tl.store(Start + row + idx, tl.where(pad, idx, start), mask=ok)
    tl.store(End + row + idx, tl.where(pad, idx - 1, end), mask=ok)


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


def tile_size(length: int) -> int:
    """Tokens per tile for rows of ``length``: at most ``MAX_TILES`` tiles up to
    ``MAX_TILES * MAX_BLOCK`` tokens, never more than the row needs."""
    wanted = triton.next_power_of_2(triton.cdiv(length, MAX_TILES))
    return min(max(wanted, MIN_BLOCK), MAX_BLOCK, triton.next_power_of_2(max(length, 16)))


def launch_document_bounds(ids: torch.Tensor, block: int, chunk: int = TILE_CHUNK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches on contiguous ``ids`` ``[B, L]`` with tiles of ``block`` tokens and the
    tile vector reduced ``chunk`` tiles at a time (both powers of two; the tests force small
    ones so that a short row spans many tiles and chunks)."""
    b, length = ids.shape
    n_tiles = triton.cdiv(length, block)
    start = torch.empty((b, length), device=ids.device, dtype=torch.int32)
    end = torch.empty_like(start)
    tiles = torch.empty((2, b, n_tiles), device=ids.device, dtype=torch.int32)
    warps = 8 if block >= 4096 else 4
    _tile_bounds_kernel[(n_tiles, b)](ids, tiles, length, n_tiles, BLOCK=block, num_warps=warps)
    _document_bounds_kernel[(n_tiles, b)](ids, tiles, start, end, length, n_tiles,
                                          BLOCK=block, CHUNK=chunk, num_warps=warps)
    return start, end


def document_bounds(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the key indices ``[start, end]`` of its document (int32 ``[B, L]``).

    ``ids`` ``[B, L]``, any integer dtype: a document is a run of equal non-negative ids; a
    negative id marks a padding token, which gets the empty range ``[i, i - 1]``. O(L) work on
    the ids' device in two launches parallel over tiles, no host synchronisation.
    """
    kernels = ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not kernels or ids.numel() == 0 or not family_available("documents"):
        return document_bounds_reference(ids)
    ids = ids.contiguous()
    try:
        with fall_back_on_failure("documents"):
            return launch_document_bounds(ids, tile_size(ids.shape[1]))
    except FellBack:
        return document_bounds_reference(ids)
