"""Exact per-block classification of patterns that are not one interval per row.

Each (q-block, k-block) tile is EMPTY, PARTIAL or FULL. The analysis runs on a whole grid of
tiles at once: a tile is described by its absolute query range ``[q0, q1]`` and key range
``[k0, k1]`` (int64 tensors ``[nq, 1]`` and ``[1, nk]``), and every node returns, per tile, the
SET of states it may be in, as bits (``EMPTY_BIT | PARTIAL_BIT | FULL_BIT``):

* primitives answer exactly (one bit), by interval / residue reasoning on the tile's ranges;
* patterns that depend on ``q - k`` only (causal, window, local, sliding, strided, fanout, any
  composition of them, and Toeplitz custom predicates) answer exactly through a prefix sum of
  ``keep(d)`` over the ``O(lq + lk)`` diagonals ``d``: a tile covers every ``d`` in
  ``[q0 - k1, q1 - k0]``;
* ``&``, ``|`` and ``~`` combine the sets (e.g. PARTIAL & PARTIAL may be EMPTY or PARTIAL);
* opaque custom predicates answer "any state".

Tiles left with more than one possible state are resolved by :func:`resolve_tiles`, which
evaluates just those tiles, a bounded batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nodes import And, Not, Or, Pattern
from .predicate import Predicate
from .primitives import Axial, Block, Dense, Global, Prefix, Primitive, Sink

EMPTY_BIT, PARTIAL_BIT, FULL_BIT = 1, 2, 4
ANY = EMPTY_BIT | PARTIAL_BIT | FULL_BIT
_KIND_OF_BITS = torch.tensor([1, 0, 1, 1, 2, 1, 1, 1], dtype=torch.uint8)


@dataclass(frozen=True)
class Tiles:
    """A grid of tiles: absolute query ranges ``q0, q1`` ``[nq, 1]``, key ranges ``k0, k1``
    ``[1, nk]`` (inclusive, int64; ragged last tiles already clipped)."""

    q0: torch.Tensor
    q1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor


def is_toeplitz(p: Pattern) -> bool:
    """True when ``keep`` depends on ``q - k`` only (head-resolved patterns)."""
    if isinstance(p, (And, Or, Not)):
        return all(is_toeplitz(c) for c in p.children())
    return bool(getattr(p, "toeplitz", False))


def _state(some: torch.Tensor, every: torch.Tensor, t: Tiles) -> torch.Tensor:
    """Bits ``[nq, nk]`` from exact 'some entry kept' / 'every entry kept' tensors."""
    shape = (t.q0.shape[0], t.k0.shape[1])
    some = torch.as_tensor(some).expand(shape)
    every = torch.as_tensor(every).expand(shape)
    # some -> PARTIAL (2) else EMPTY (1); every -> FULL (4).
    out = some.to(torch.uint8) + 1
    return torch.where(every, FULL_BIT, out).to(torch.uint8)


def classify(p: Pattern, t: Tiles, prefixes: dict | None = None) -> torch.Tensor:
    """Possible states of every tile: uint8 bits ``[nq, nk]`` (one bit set = exact).

    ``prefixes`` caches the diagonal prefix sums of Toeplitz sub-patterns between calls on
    chunks of the same grid (pass the same dict; the first call sizes them for its tiles, so
    give a first chunk that spans all diagonals, or None).
    """
    prefixes = {} if prefixes is None else prefixes
    if is_toeplitz(p):
        return _toeplitz(p, t, prefixes)
    if isinstance(p, Not):
        a = classify(p.inner, t, prefixes)
        return ((a & EMPTY_BIT) << 2) | (a & PARTIAL_BIT) | ((a & FULL_BIT) >> 2)
    if isinstance(p, And):
        a, b = classify(p.left, t, prefixes), classify(p.right, t, prefixes)
        both_partial = ((a & b & PARTIAL_BIT) != 0).to(torch.uint8) * (EMPTY_BIT | PARTIAL_BIT)
        return (
            ((a | b) & EMPTY_BIT)
            | torch.where((a & FULL_BIT) != 0, b, 0)
            | torch.where((b & FULL_BIT) != 0, a, 0)
            | both_partial
        ).to(torch.uint8)
    if isinstance(p, Or):
        a, b = classify(p.left, t, prefixes), classify(p.right, t, prefixes)
        both_partial = ((a & b & PARTIAL_BIT) != 0).to(torch.uint8) * (FULL_BIT | PARTIAL_BIT)
        return (
            ((a | b) & FULL_BIT)
            | torch.where((a & EMPTY_BIT) != 0, b, 0)
            | torch.where((b & EMPTY_BIT) != 0, a, 0)
            | both_partial
        ).to(torch.uint8)
    if isinstance(p, Primitive):
        return _primitive(p, t)
    if isinstance(p, Predicate):
        return torch.full(torch.broadcast_shapes(t.q0.shape, t.k0.shape), ANY, dtype=torch.uint8)
    raise TypeError(f"cannot classify {p!r}")


def _toeplitz(p: Pattern, t: Tiles, prefixes: dict) -> torch.Tensor:
    d_min = int(t.q0.min()) - int(t.k1.max())
    d_max = int(t.q1.max()) - int(t.k0.min())
    cached = prefixes.get(p)
    if cached is not None and cached[0] <= d_min and d_max <= cached[1]:
        d_min, _, prefix = cached
    else:
        d = torch.arange(d_min, d_max + 1, dtype=torch.int64)
        kept = p.evaluate(d, torch.zeros((), dtype=torch.int64))
        prefix = torch.zeros(d.numel() + 1, dtype=torch.int64)
        torch.cumsum(kept.to(torch.int64), 0, out=prefix[1:])
        prefixes[p] = (d_min, d_max, prefix)
    lo = t.q0 - t.k1 - d_min  # [nq, nk] indices into d
    hi = t.q1 - t.k0 - d_min
    count = prefix[hi + 1] - prefix[lo]
    return _state(count > 0, count == hi - lo + 1, t)


def _primitive(p: Primitive, t: Tiles) -> torch.Tensor:
    q0, q1, k0, k1 = t.q0, t.q1, t.k0, t.k1
    if isinstance(p, Dense):
        return _state(torch.tensor(True), torch.tensor(True), t)
    if isinstance(p, Sink):
        return _state(k0 < p.n, k1 < p.n, t)
    if isinstance(p, Global):
        return _state((k0 < p.n) | (q0 < p.n), (k1 < p.n) | (q1 < p.n), t)
    if isinstance(p, Prefix):
        return _state((q0 < p.n) & (k0 < p.n), (q1 < p.n) & (k1 < p.n), t)
    if isinstance(p, Block):
        s = p.s
        a0, a1, b0, b1 = q0 // s, q1 // s, k0 // s, k1 // s
        return _state((a0 <= b1) & (b0 <= a1), (a0 == a1) & (b0 == b1) & (a0 == b0), t)
    if isinstance(p, Axial):
        return _axial(p, t)
    raise TypeError(f"no block analysis for {p!r}")


def _axial(p: Axial, t: Tiles) -> torch.Tensor:
    off, n = p.offset, p.cols
    lead_all = (t.q1 < off) | (t.k1 < off)
    lead_some = (t.q0 < off) | (t.k0 < off)
    # The rest of the tile: grid coordinates r in [r0, r1], c in [c0, c1] (both >= 0).
    r0, r1 = torch.clamp(t.q0 - off, min=0), t.q1 - off
    c0, c1 = torch.clamp(t.k0 - off, min=0), t.k1 - off
    rows_meet = (r0 // n <= c1 // n) & (c0 // n <= r1 // n)
    len_r, len_c = r1 - r0 + 1, c1 - c0 + 1
    cols_meet = (
        (len_r >= n) | (len_c >= n)
        | (torch.remainder(c0 - r0, n) < len_r) | (torch.remainder(r0 - c0, n) < len_c)
    )
    some_inner = rows_meet | cols_meet
    one_row = (r0 // n == r1 // n) & (c0 // n == c1 // n) & (r0 // n == c0 // n)
    if n == 1:
        every_inner = torch.ones_like(one_row)
    else:
        # A single grid position r against a range of c (or the reverse): everything outside
        # r's grid row must be one position in r's column. With two or more values on both
        # sides and not one common row, some pair differs in both row and column.
        every_inner = one_row | (
            (len_r == 1) & _covered(r0, c0, c1, n) | (len_c == 1) & _covered(c0, r0, r1, n)
        )
    inner_exists = (t.q1 >= off) & (t.k1 >= off)
    some = lead_some | (inner_exists & some_inner)
    every = lead_all | (every_inner & inner_exists)
    return _state(some, every, t)


def _covered(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """For each tile: is every y in [a, b] in x's grid row or x's grid column?"""
    row_start = (x // n) * n
    left_hi = torch.minimum(b, row_start - 1)
    right_lo = torch.maximum(a, row_start + n)

    def ok(lo, hi):
        return (lo > hi) | ((lo == hi) & (torch.remainder(lo - x, n) == 0))

    return ok(a, left_hi) & ok(right_lo, b)


def resolve_tiles(
    p: Pattern, t: Tiles, bits: torch.Tensor, block_m: int, block_n: int,
    budget: int = 1 << 22,
) -> torch.Tensor:
    """Exact kinds (0 EMPTY, 1 PARTIAL, 2 FULL) ``[nq, nk]`` uint8 from possible-state ``bits``,
    evaluating ``p`` on the ambiguous tiles only, ``budget`` entries at a time."""
    # bits 1 -> 0 (EMPTY), 2 -> 1 (PARTIAL), 4 -> 2 (FULL); several bits -> undecided.
    kinds = _KIND_OF_BITS[bits.to(torch.int64)]
    undecided = (bits & (bits - 1)) != 0
    if not bool(undecided.any()):
        return kinds
    open_tiles = undecided.nonzero()
    per_batch = max(1, budget // (block_m * block_n))
    rm = torch.arange(block_m, dtype=torch.int64)
    rn = torch.arange(block_n, dtype=torch.int64)
    # Works for a grid ([nq, 1] x [1, nk]) and for a flat list of tiles ([c, 1] x [c, 1]).
    q0, q1, k0, k1 = (x.expand(bits.shape) for x in (t.q0, t.q1, t.k0, t.k1))
    for start in range(0, open_tiles.shape[0], per_batch):
        r, c = open_tiles[start:start + per_batch].unbind(1)
        qpos = q0[r, c][:, None] + rm  # [b, BM]
        kpos = k0[r, c][:, None] + rn  # [b, BN]
        valid = (qpos <= q1[r, c][:, None])[:, :, None] & (kpos <= k1[r, c][:, None])[:, None, :]
        keep = p.evaluate(qpos[:, :, None], kpos[:, None, :])
        some = (keep & valid).flatten(1).any(1)
        every = (keep | ~valid).flatten(1).all(1)
        kinds[r, c] = torch.where(every, 2, torch.where(some, 1, 0)).to(torch.uint8)
    return kinds


def kept_in_tiles(
    p: Pattern, lq: int, lk: int, block_m: int, block_n: int, i: torch.Tensor, j: torch.Tensor,
    kinds: torch.Tensor, budget: int = 1 << 22,
) -> int:
    """Kept entries of the listed tiles ``(i, j)`` (int64 ``[c]``) of known ``kinds``
    (uint8 ``[c]``): FULL by area, PARTIAL by evaluation, ``budget`` entries at a time."""
    off = lk - lq

    def extent(x, b, n):
        return torch.clamp((x + 1) * b, max=n) - x * b

    full = kinds == 2
    total = int((extent(i[full], block_m, lq) * extent(j[full], block_n, lk)).sum())
    i, j = i[kinds == 1], j[kinds == 1]
    per_batch = max(1, budget // (block_m * block_n))
    rm, rn = torch.arange(block_m), torch.arange(block_n)
    for s in range(0, i.numel(), per_batch):
        ii, jj = i[s:s + per_batch, None], j[s:s + per_batch, None]
        qpos, kpos = ii * block_m + rm, jj * block_n + rn  # [b, BM], [b, BN]
        valid = (qpos < lq)[:, :, None] & (kpos < lk)[:, None, :]
        keep = p.evaluate(qpos[:, :, None] + off, kpos[:, None, :])
        total += int((keep & valid).sum())
    return total
