"""Layout route for patterns that equal a q - k pattern outside a few k-block ranges per row.

Every built-in primitive splits into a *background* that depends on ``d = q - k`` only,
*layers* (per q-block ranges of k-blocks on which it equals another q - k pattern, often the
constants everything / nothing) and *exceptions* (ranges where nothing is known):

* q - k patterns (causal, window, local, sliding, strided, fanout, dense, q - k predicates):
  background = the pattern itself;
* other interval patterns (sink, block, prefix, predicates with row bounds) and ``global(n)``:
  background = nothing, a FULL layer (the interior of the rows, the rows and columns of global
  tokens), exceptions = the PARTIAL edges;
* ``axial(cols, offset)``: background = ``strided(cols)`` (same grid column <=> ``cols``
  divides ``q - k``); FULL layer = leading rows and columns and, for a q-block inside one grid
  row, the k-blocks inside that grid row; exceptions = the rest of the grid-row band and the
  straddling leading q-block / k-block;
* ``~a``: everything negated; ``a & b``, ``a | b`` against a side without layers or exceptions:
  the other side's layers joined with its background; otherwise layers that decide alone
  (FULL for ``|``, EMPTY for ``&``) stay and the others become exceptions.

A full-size tile's kind under a q - k pattern depends on ``v = i * block_m - j * block_n``
only (see ``diagonals.py``). The layout's tables (:func:`split_overrides`, ``overlay.py``) are
listed from the background's sorted ``v`` per kind with the layer tiles (their q - k pattern's
kind) and the exception and ragged tiles (classified exactly, ``blocks.py``) overlaid: O(listed
blocks + layer and exception tiles), no ``nq x nk`` grid. :func:`split_kinds` builds the full
kinds the same way (one strided copy of the per-``v`` vector, layers painted, exceptions
classified) for checking the decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .blocks import _KIND_OF_BITS, Tiles, classify, is_toeplitz, kept_in_tiles
from .candidates import classify_listed, tile_keys
from .intervals import interval_bounds
from .nodes import And, Not, Or, Pattern
from .primitives import Axial, Dense, Global, Strided
from .tables import CHUNK

EMPTY, FULL = 0, 2

EVERYTHING: Pattern = Dense()
NOTHING: Pattern = Not(EVERYTHING)


@dataclass(frozen=True)
class Ranges:
    """Per q-block ranges of k-blocks: q-block ``i`` covers ``[starts[i, c], ends[i, c])`` for
    each ``c`` (int64 ``[nq, m]``, ``m`` may be 0; ranges may overlap or stick out of the
    grid, users clip them)."""

    starts: torch.Tensor
    ends: torch.Tensor

    @staticmethod
    def none(nq: int) -> Ranges:
        empty = torch.zeros((nq, 0), dtype=torch.int64)
        return Ranges(empty, empty)

    def __add__(self, other: Ranges) -> Ranges:
        return Ranges(torch.cat([self.starts, other.starts], 1),
                      torch.cat([self.ends, other.ends], 1))

    @property
    def size(self) -> int:
        """Total length (an upper bound on the tiles covered)."""
        return int((self.ends - self.starts).clamp(min=0).sum())


@dataclass(frozen=True)
class Layer:
    """Tiles (``ranges``) on which the pattern equals the q - k pattern ``pattern`` entry by
    entry (``EVERYTHING``: FULL tiles, ``NOTHING``: EMPTY tiles)."""

    ranges: Ranges
    pattern: Pattern


@dataclass(frozen=True)
class Split:
    """A pattern seen as its q - k ``background`` plus per q-block tile ranges where it may
    differ: ``layers`` where it equals another q - k pattern (overlapping layers agree, being
    equal to the pattern), ``exceptions`` where nothing is known (classified exactly later).
    On every other tile the pattern equals the background."""

    background: Pattern
    exceptions: Ranges
    layers: tuple[Layer, ...] = ()

    @property
    def pure(self) -> bool:
        """The pattern is its background everywhere."""
        return not self.layers and self.exceptions.starts.shape[1] == 0


def split_pattern(p: Pattern, lq: int, lk: int, bm: int, bn: int) -> Split | None:
    """The :class:`Split` of the head-resolved pattern ``p``, or None when some leaf admits no
    analysis (a custom predicate that is neither of ``q - k`` nor one interval per row)."""
    nq = -(-lq // bm)
    if is_toeplitz(p):
        return Split(p, Ranges.none(nq))
    if isinstance(p, Not):
        s = split_pattern(p.inner, lq, lk, bm, bn)
        if s is None:
            return None
        return Split(_negate(s.background), s.exceptions,
                     tuple(Layer(x.ranges, _negate(x.pattern)) for x in s.layers))
    if isinstance(p, (And, Or)):
        a = split_pattern(p.left, lq, lk, bm, bn)
        b = split_pattern(p.right, lq, lk, bm, bn)
        if a is None or b is None:
            return None
        return _combine(a, b, isinstance(p, And))
    if isinstance(p, Axial):
        exceptions, full = _axial_ranges(p, lq, lk, bm, bn)
        return Split(Strided(p.cols), exceptions, (Layer(full, EVERYTHING),))
    if isinstance(p, Global):
        exceptions, full = _global_ranges(p.n, lq, lk, bm, bn)
        return Split(NOTHING, exceptions, (Layer(full, EVERYTHING),))
    if p.interval() is not None:
        exceptions, full = _interval_ranges(p, lq, lk, bm, bn)
        return Split(NOTHING, exceptions, (Layer(full, EVERYTHING),))
    return None


def _negate(p: Pattern) -> Pattern:
    return p.inner if isinstance(p, Not) else Not(p)


def _join(a: Pattern, b: Pattern, is_and: bool) -> Pattern:
    """``a & b`` or ``a | b`` with constants folded (keeps backgrounds small)."""
    absorbing, neutral = (NOTHING, EVERYTHING) if is_and else (EVERYTHING, NOTHING)
    if absorbing in (a, b):
        return absorbing
    if a == neutral:
        return b
    if b == neutral:
        return a
    return (And if is_and else Or)(a, b)


def _combine(a: Split, b: Split, is_and: bool) -> Split:
    """``a & b`` or ``a | b``.

    Against a side that is its background everywhere, the other side's layers carry over,
    joined with that background. Otherwise only layers equal to the absorbing constant carry
    over (FULL for ``|``, EMPTY for ``&``: exact whatever the other side is) and the other
    layers become exceptions; and a side whose background is the absorbing constant decides
    alone outside its own ranges.
    """
    absorbing = NOTHING if is_and else EVERYTHING
    for x, y in ((a, b), (b, a)):
        if y.pure:
            background = _join(x.background, y.background, is_and)
            layers = (Layer(L.ranges, _join(L.pattern, y.background, is_and)) for L in x.layers)
            return Split(background, x.exceptions,
                         tuple(L for L in layers if L.pattern != background))

    def unknown(s: Split) -> Ranges:
        out = s.exceptions
        for L in s.layers:
            if L.pattern != absorbing:
                out = out + L.ranges
        return out

    def kept_layers(s: Split) -> tuple[Layer, ...]:
        return tuple(L for L in s.layers if L.pattern == absorbing)

    deciding = [s for s in (a, b) if s.background == absorbing]
    if deciding:
        s = min(deciding, key=lambda s: unknown(s).size)
        return Split(absorbing, unknown(s))
    return Split(_join(a.background, b.background, is_and),
                 unknown(a) + unknown(b), kept_layers(a) + kept_layers(b))


def _rows(lq: int, lk: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute query position of every q-block (ragged last one clipped)."""
    i = torch.arange(-(-lq // bm), dtype=torch.int64)
    return i * bm + (lk - lq), torch.clamp((i + 1) * bm, max=lq) - 1 + (lk - lq)


def _interval_ranges(p: Pattern, lq: int, lk: int, bm: int, bn: int):
    """Exceptions (the PARTIAL edges) and FULL ranges of an interval pattern."""
    nk = -(-lk // bn)
    b = interval_bounds(p.interval(), lq, lk, bm, bn)
    start, end, fs, fe = b.start.clone(), b.end.clone(), b.full_start.clone(), b.full_end.clone()
    has_full = fe > fs
    left_end = torch.where(has_full, fs, end)
    right_start = torch.where(has_full, fe, end)
    gaps = torch.tensor(sorted(b.gap_rows), dtype=torch.int64)
    if gaps.numel():  # rows with gaps: the whole row is an exception
        start[gaps], left_end[gaps], right_start[gaps], end[gaps] = 0, nk, 0, 0
        fs[gaps], fe[gaps] = 0, 0
    exceptions = Ranges(torch.stack([start, right_start], 1), torch.stack([left_end, end], 1))
    return exceptions, Ranges(fs[:, None], fe[:, None])


def _global_ranges(n: int, lq: int, lk: int, bm: int, bn: int):
    """``global(n)``: rows of queries all below ``n`` and key columns all below ``n`` are FULL;
    the q-block and the k-block that straddle ``n`` are exceptions."""
    nk = -(-lk // bn)
    q0, q1 = _rows(lq, lk, bm)
    full_row = torch.where(q1 < n, nk, 0)
    mixed_row = torch.where((q0 < n) & (q1 >= n), nk, 0)
    full_cols = torch.full_like(q0, min(n, lk) // bn)
    mixed_col = torch.full_like(q0, -(-min(n, lk) // bn))
    zeros = torch.zeros_like(q0)
    exceptions = Ranges(torch.stack([zeros, full_cols], 1), torch.stack([mixed_row, mixed_col], 1))
    return exceptions, Ranges(torch.stack([zeros, zeros], 1), torch.stack([full_row, full_cols], 1))


def _axial_ranges(p: Axial, lq: int, lk: int, bm: int, bn: int):
    """Exceptions and FULL ranges of ``axial``. Leading tokens: q-blocks (k-blocks) wholly
    among them are FULL rows (columns), the straddling ones exceptions. Past them, the tiles
    that share a grid row with the q-block are exceptions, except that a q-block inside one
    grid row keeps every k-block wholly inside that grid row FULL."""
    nk = -(-lk // bn)
    off, cols = p.offset, p.cols
    q0, q1 = _rows(lq, lk, bm)
    zeros = torch.zeros_like(q0)
    lead_full = torch.where(q1 < off, nk, 0)
    lead_mixed = (q0 < off) & (q1 >= off)
    first_row = torch.div(q0 - off, cols, rounding_mode="floor")
    last_row = torch.div(q1 - off, cols, rounding_mode="floor")
    band_start = torch.where(q0 < off, 0, (off + first_row * cols) // bn)
    band_end = torch.where(q1 < off, 0, torch.where(
        lead_mixed, nk, (off + (last_row + 1) * cols - 1) // bn + 1))
    one_row = (q0 >= off) & (first_row == last_row)
    inner_start = torch.where(one_row, -(-(off + first_row * cols) // bn), band_end)
    inner_end = torch.where(one_row, (off + (first_row + 1) * cols) // bn, band_end)
    inner_end = torch.maximum(inner_start, inner_end)
    lead_cols = torch.full_like(q0, min(off, lk) // bn)
    mixed_cols = torch.full_like(q0, -(-min(off, lk) // bn))
    exceptions = Ranges(torch.stack([band_start, inner_end, lead_cols], 1),
                        torch.stack([inner_start, band_end, mixed_cols], 1))
    full = Ranges(torch.stack([zeros, zeros], 1), torch.stack([lead_full, lead_cols], 1))
    return exceptions, full + Ranges(inner_start[:, None], inner_end[:, None])


def split_kinds(p: Pattern, s: Split, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Exact kinds uint8 ``[nq, nk]`` of the head-resolved ``p`` from its split ``s``:
    the background, then the layers, then the exceptions and ragged tiles classified
    exactly."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    kinds = _ToeplitzKinds(s.background, lq, lk, bm, bn).box(0, nq, 0, nk)
    for layer in s.layers:
        _paint(kinds, layer, lq, lk, bm, bn)
    keys = _special_keys(s, lq, lk, bm, bn)
    kinds.view(-1)[keys] = classify_listed(p, lq, lk, bm, bn, keys // nk, keys % nk)
    return kinds


def split_overrides(p: Pattern, s: Split, lq: int, lk: int, bm: int, bn: int) -> tuple:
    """``overlay.Overrides`` of the head-resolved ``p`` from its split ``s`` (for tables
    that never build the ``nq x nk`` kinds): the background's kinds per ``v``, the layer tiles
    with their q - k pattern's kinds and the exception and ragged tiles classified exactly."""
    nk = -(-lk // bn)
    keys, kinds = _override_tiles(p, s, lq, lk, bm, bn)
    background = _ToeplitzKinds(s.background, lq, lk, bm, bn)
    return background.vector(), keys // nk, keys % nk, kinds


def _override_tiles(p: Pattern, s: Split, lq: int, lk: int, bm: int, bn: int):
    """Distinct tile keys ``i * nk + j`` (int64) of the exceptions, ragged tiles and layers, with
    their exact kinds (uint8); exceptions and ragged tiles take precedence over layers."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    claimed = _special_keys(s, lq, lk, bm, bn)
    keys = [claimed]
    kinds = [classify_listed(p, lq, lk, bm, bn, claimed // nk, claimed % nk)]
    for layer in s.layers:
        mine = tile_keys(layer.ranges.starts, layer.ranges.ends, nq, nk)
        mine = mine[~torch.isin(mine, claimed)]
        kinds.append(_ToeplitzKinds(layer.pattern, lq, lk, bm, bn).at(mine // nk, mine % nk))
        keys.append(mine)
        claimed = torch.cat([claimed, mine])
    return torch.cat(keys), torch.cat(kinds)


def _paint(kinds: torch.Tensor, layer: Layer, lq: int, lk: int, bm: int, bn: int) -> None:
    """Write the kinds of ``layer.pattern`` on the layer's tiles: listed when few, else by
    masks over the bounding box of each range column."""
    nq, nk = kinds.shape
    source = _ToeplitzKinds(layer.pattern, lq, lk, bm, bn)
    ranges = layer.ranges
    for c in range(ranges.starts.shape[1]):
        start, end = ranges.starts[:, c].clamp(0, nk), ranges.ends[:, c].clamp(0, nk)
        active = (end > start).nonzero().flatten()
        if active.numel() == 0:
            continue
        r0, r1 = int(active[0]), int(active[-1]) + 1
        c0, c1 = int(start[active].min()), int(end[active].max())
        size = int((end - start).clamp(min=0).sum())
        if 32 * size <= (r1 - r0) * (c1 - c0):
            keys = tile_keys(start[:, None], end[:, None], nq, nk, unique=False)
            kinds.view(-1)[keys] = source.at(keys // nk, keys % nk)
            continue
        j = torch.arange(c0, c1, dtype=torch.int64)
        step = max(1, CHUNK // (c1 - c0))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            inside = (j >= start[a:b, None]) & (j < end[a:b, None])
            box = kinds[a:b, c0:c1]
            box.copy_(torch.where(inside, source.box(a, b, c0, c1), box))


class _ToeplitzKinds:
    """Kinds of the full-size tiles of a q - k pattern: tile ``(i, j)`` has the kind of its
    ``v = i * bm - j * bn`` (see ``diagonals.py``), one classification per ``v``."""

    def __init__(self, pattern: Pattern, lq: int, lk: int, bm: int, bn: int):
        self.nq, self.nk = -(-lq // bm), -(-lk // bn)
        g = math.gcd(bm, bn)
        self.a, self.b = bm // g, bn // g
        self.constant = {EVERYTHING: FULL, NOTHING: EMPTY}.get(pattern)
        if self.constant is not None:
            return
        v = _diagonal_tiles(lq, lk, bm, bn)
        diag = Tiles(q0=(v + lk - lq)[:, None], q1=(v + lk - lq + bm - 1)[:, None],
                     k0=torch.zeros((1, 1), dtype=torch.int64),
                     k1=torch.full((1, 1), bn - 1, dtype=torch.int64))
        self.kind_v = _KIND_OF_BITS[classify(pattern, diag)[:, 0].to(torch.int64)]

    def vector(self) -> torch.Tensor:
        """Kinds uint8 per ``v`` ascending (``_diagonal_tiles``)."""
        if self.constant is None:
            return self.kind_v
        count = (self.nq - 1) * self.a + (self.nk - 1) * self.b + 1
        return torch.full((count,), self.constant, dtype=torch.uint8)

    def at(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Kinds of the tiles ``(i, j)`` (int64 ``[c]``)."""
        if self.constant is not None:
            return torch.full(i.shape, self.constant, dtype=torch.uint8)
        return self.kind_v[i * self.a + (self.nk - 1 - j) * self.b]

    def box(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Kinds ``[r1 - r0, c1 - c0]`` of q-blocks ``[r0, r1)`` and k-blocks ``[c0, c1)``."""
        if self.constant is not None:
            return torch.full((r1 - r0, c1 - c0), self.constant, dtype=torch.uint8)
        # Tile (i, j) reads index (nq - 1 - i) * a + j * b of the reversed vector: a strided
        # view (negative row stride, which numpy allows; rows are contiguous runs when b == 1)
        # copied once.
        reversed_v = self.kind_v.flip(0).numpy()
        first = (self.nq - 1 - r0) * self.a + c0 * self.b
        view = np.lib.stride_tricks.as_strided(reversed_v[first:], (r1 - r0, c1 - c0),
                                               (-self.a, self.b))
        return torch.from_numpy(view.copy(order="C"))


def split_kept(p: Pattern, s: Split, lq: int, lk: int, bm: int, bn: int) -> int:
    """Exact number of kept entries of ``p`` from its split ``s``:
    background and layer tiles through per-``v`` counts of their q - k pattern, exception and
    ragged tiles by area or evaluation."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    g = math.gcd(bm, bn)
    a, b = bm // g, bn // g
    count_v = _background_counts(s.background, lq, lk, bm, bn)  # per v index i*a + (nk-1-j)*b
    # Sum over every tile as if full-size: row i reads count_v at i*a + t*b, t in [0, nk).
    per_residue = torch.nn.functional.pad(count_v, (0, (-count_v.numel()) % b + (nk + 1) * b))
    prefix = torch.cumsum(per_residue.view(-1, b), 0)
    prefix = torch.cat([torch.zeros((1, b), dtype=torch.int64), prefix])  # prefix[t] = sum < t
    x0 = torch.arange(nq, dtype=torch.int64) * a
    r, t0 = x0 % b, x0 // b
    total = int((prefix[t0 + nk, r] - prefix[t0, r]).sum())

    def v_index(keys):
        return (keys // nk) * a + (nk - 1 - keys % nk) * b

    # Exception and ragged tiles: exact counts instead of the background's.
    claimed = _special_keys(s, lq, lk, bm, bn)
    total -= int(count_v[v_index(claimed)].sum())
    i, j = claimed // nk, claimed % nk
    total += kept_in_tiles(p, lq, lk, bm, bn, i, j, classify_listed(p, lq, lk, bm, bn, i, j))
    # Layer tiles not claimed yet: their layer's counts instead of the background's.
    for layer in s.layers:
        keys = tile_keys(layer.ranges.starts, layer.ranges.ends, nq, nk)
        keys = keys[~torch.isin(keys, claimed)]
        layer_v = _background_counts(layer.pattern, lq, lk, bm, bn)
        total += int((layer_v[v_index(keys)] - count_v[v_index(keys)]).sum())
        claimed = torch.cat([claimed, keys])
    return total


def _special_keys(s: Split, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Sorted distinct tile keys ``i * nk + j`` of the exceptions plus the ragged last k-block
    column and q-block row (whose tiles are not full-size)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    ranges = s.exceptions
    rows = torch.arange(nq, dtype=torch.int64)[:, None]
    if lk % bn:
        ranges = ranges + Ranges(torch.full_like(rows, nk - 1), torch.full_like(rows, nk))
    if lq % bm:
        ranges = ranges + Ranges(torch.zeros_like(rows), torch.where(rows == nq - 1, nk, 0))
    return tile_keys(ranges.starts, ranges.ends, nq, nk)


def _diagonal_tiles(lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """``v = i * bm - j * bn`` of full-size tiles, ascending in steps of gcd(bm, bn)."""
    nq, nk = -(-lq // bm), -(-lk // bn)
    return torch.arange(-(nk - 1) * bn, (nq - 1) * bm + 1, math.gcd(bm, bn), dtype=torch.int64)


def _background_counts(bg: Pattern, lq: int, lk: int, bm: int, bn: int) -> torch.Tensor:
    """Kept entries int64 of a full-size tile of the q - k pattern ``bg`` per ``v``: a tile
    covers ``d = v + off + x - y`` for ``x < bm``, ``y < bn``, so two prefix sums of
    ``keep(d)`` give every tile's count."""
    v = _diagonal_tiles(lq, lk, bm, bn)
    d0 = int(v[0]) + lk - lq - (bn - 1)
    d = torch.arange(d0, int(v[-1]) + lk - lq + bm, dtype=torch.int64)
    keep = bg.evaluate(d, torch.zeros((), dtype=torch.int64)).to(torch.int64)
    s1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)])
    # window[u] = keep[u] + ... + keep[u - bn + 1] for u = bn - 1 ... (indices into d)
    window = s1[bn:] - s1[:-bn]
    s2 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(window, 0)])
    # Tile v: sum of window over u in [v + off - d0 + x] for x < bm, shifted by bn - 1.
    u0 = v + lk - lq - d0 - (bn - 1)
    return s2[u0 + bm] - s2[u0]
