"""Which blocks a Gluon program visits, from the rows' kept intervals (``rows.py``).

A row keeps one interval (``PIECES = 1``) or the union of two (``PIECES = 2``, e.g.
``causal & (sink(4) | sliding(w))``); piece ``p`` of pattern head ``hp`` is read at
``RLO/RHI + (p * NPH + hp) * Lq``. Per piece, the blocks a tile reaches form one range (the
hull over its rows) and the blocks every row keeps whole (FULL: no mask) a sub-range; the two
pieces' ranges are visited in order of their starts, the second from where the first ends, so
no block is visited twice. A block is treated as FULL only when it is FULL for one piece
(a conservative test: a block kept whole by some rows through one piece and by the others
through the other is masked, which costs time, never correctness). The same holds for the
query blocks of a key block in the dK/dV pass, found by binary search of each piece's
non-decreasing bounds.
"""

from __future__ import annotations

import triton.language as tl
from sparse_compile.codegen.gluon.support import gl, gluon_jit

_BIG = tl.constexpr(1 << 30)



@gluon_jit
def query_program(Hq, BM: gl.constexpr):
    """``(pid_bh, b, h, m0)`` of a program over query tiles: grid (tiles, batch x heads), the
    last tile issued first (under causal-like patterns the longest rows start first)."""
    pid_bh = gl.program_id(1)
    m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BM
    return pid_bh, pid_bh // Hq, pid_bh % Hq, m0


@gluon_jit
def key_program(Hq, G, BN: gl.constexpr):
    """``(b, hkv, k0)`` of a program over key blocks: grid (blocks, batch x kv heads)."""
    Hkv = Hq // G
    pid_bk = gl.program_id(1)
    return pid_bk // Hkv, pid_bk % Hkv, gl.program_id(0) * BN


@gluon_jit
def _piece_blocks(RLO, RHI, base, Lq, m0, BM: gl.constexpr, BN: gl.constexpr,
                  layout: gl.constexpr):
    """One piece's key blocks for the query tile at ``m0``: visited ``[j_lo, j_hi)`` (empty
    when ``j_hi <= j_lo``), FULL ``[jf_lo, jf_hi)``."""
    offs = m0 + gl.arange(0, BM, layout=layout)
    ok = offs < Lq
    lo = gl.load(RLO + base + offs, mask=ok, other=0)
    hi = gl.load(RHI + base + offs, mask=ok, other=-1)
    kept = ok & (lo <= hi)
    lo_min = gl.min(gl.where(kept, lo, _BIG), 0)
    hi_max = gl.max(gl.where(kept, hi, -1), 0)
    lo_max = gl.max(gl.where(ok, lo, 0), 0)
    hi_min = gl.min(gl.where(ok, hi, _BIG), 0)
    j_lo = lo_min // BN
    j_hi = (hi_max + BN) // BN
    # A block is FULL when it lies inside every row's interval (an empty row has none).
    jf_lo = gl.maximum((lo_max + BN - 1) // BN, j_lo)
    jf_hi = gl.minimum((hi_min + 1) // BN, j_hi)
    return j_lo, jf_lo, jf_hi, j_hi


@gluon_jit
def _merge_ranges(a0, a1, b0, b1):
    """Two block ranges as ``(x0, n1, y0, n)``: visit ``x0 .. x0 + n1 - 1``, then
    ``y0 .. y0 + (n - n1) - 1``; the earlier-starting range first, the other from where the
    first ends (empty ranges skipped)."""
    a_empty = a1 <= a0
    b_empty = b1 <= b0
    a0 = gl.where(a_empty, _BIG, a0)
    a1 = gl.where(a_empty, _BIG, a1)
    b0 = gl.where(b_empty, _BIG, b0)
    b1 = gl.where(b_empty, _BIG, b1)
    first_a = a0 <= b0
    x0 = gl.where(first_a, a0, b0)
    x1 = gl.where(first_a, a1, b1)
    y0 = gl.where(first_a, b0, a0)
    y1 = gl.where(first_a, b1, a1)
    y0 = gl.maximum(y0, x1)
    n1 = gl.where(x0 == _BIG, 0, x1 - x0)
    n2 = gl.where(y1 > y0, y1 - y0, 0)
    n2 = gl.where(y1 == _BIG, 0, n2)
    return x0, n1, y0, n1 + n2


@gluon_jit
def tile_visit(RLO, RHI, hp, NPH, Lq, m0, BM: gl.constexpr, BN: gl.constexpr,
               PIECES: gl.constexpr, layout: gl.constexpr):
    """Key blocks of the query tile at ``m0``: ``(x0, n1, y0, n, f0_lo, f0_hi, f1_lo,
    f1_hi)`` (``block_at`` gives the t-th; ``is_partial`` says whether it needs the mask)."""
    a0, af0, af1, a1 = _piece_blocks(RLO, RHI, hp * Lq, Lq, m0, BM, BN, layout)
    if PIECES == 2:
        b0, bf0, bf1, b1 = _piece_blocks(RLO, RHI, (NPH + hp) * Lq, Lq, m0, BM, BN, layout)
    else:
        b0 = a0 * 0
        bf0 = b0
        bf1 = b0
        b1 = b0
    x0, n1, y0, n = _merge_ranges(a0, a1, b0, b1)
    return x0, n1, y0, n, af0, af1, bf0, bf1


@gluon_jit
def block_at(t, x0, n1, y0):
    """The t-th visited block."""
    return gl.where(t < n1, x0 + t, y0 + (t - n1))


@gluon_jit
def is_partial(j, f0_lo, f0_hi, f1_lo, f1_hi):
    """Whether block ``j`` needs the mask: not kept whole by every row through one piece."""
    return ((j < f0_lo) | (j >= f0_hi)) & ((j < f1_lo) | (j >= f1_hi))


@gluon_jit
def row_bounds(RLO, RHI, hp, NPH, Lq, offs, ok, PIECES: gl.constexpr):
    """Each row's intervals ``(lo0, hi0, lo1, hi1)`` (the second empty when one piece); rows
    not ``ok`` (past ``Lq``) keep nothing. The dK/dV pass reads the key intervals
    (``rows.py``) through it too: keys for rows, ``Lk`` for ``Lq``."""
    lo0 = gl.load(RLO + hp * Lq + offs, mask=ok, other=1)
    hi0 = gl.load(RHI + hp * Lq + offs, mask=ok, other=0)
    if PIECES == 2:
        lo1 = gl.load(RLO + (NPH + hp) * Lq + offs, mask=ok, other=1)
        hi1 = gl.load(RHI + (NPH + hp) * Lq + offs, mask=ok, other=0)
    else:
        lo1 = lo0 * 0 + 1
        hi1 = lo0 * 0
    return lo0, hi0, lo1, hi1


@gluon_jit
def keeps(rows_lo0, rows_hi0, rows_lo1, rows_hi1, keys, PIECES: gl.constexpr):
    """Whether each (row, key) pair is kept: ``rows_*`` and ``keys`` already broadcast to the
    tile's shape. Symmetric in its roles: with a key's query intervals for ``rows_*`` and
    query indices for ``keys`` it answers the same question from the keys' side."""
    keep = (keys >= rows_lo0) & (keys <= rows_hi0)
    if PIECES == 2:
        keep = keep | ((keys >= rows_lo1) & (keys <= rows_hi1))
    return keep


@gluon_jit
def _first_at_least(Arr, n, value, RIGHT: gl.constexpr):
    """First index ``i`` in ``[0, n]`` with ``Arr[i] >= value`` (``> value`` when RIGHT) in a
    non-decreasing int32 array: a scalar binary search."""
    lo = gl.to_tensor(0)
    hi = gl.to_tensor(0) + n
    while lo < hi:
        mid = (lo + hi) // 2
        x = gl.load(Arr + mid)
        if RIGHT:
            go_right = x <= value
        else:
            go_right = x < value
        lo = gl.where(go_right, mid + 1, lo)
        hi = gl.where(go_right, hi, mid)
    return lo


@gluon_jit
def _piece_query_blocks(RLO, RHI, base, Lq, k0, k1, BM: gl.constexpr):
    """One piece's query blocks that keep a key of ``[k0, k1]``: visited ``[i_lo, i_hi)``,
    FULL (every real row keeps every key of the block) ``[if_lo, if_hi)``."""
    lo_arr = RLO + base
    hi_arr = RHI + base
    r_lo = _first_at_least(hi_arr, Lq, k0, False)        # first row with hi >= k0
    r_hi = _first_at_least(lo_arr, Lq, k1, True)         # rows with lo <= k1 end here
    f_lo = _first_at_least(hi_arr, Lq, k1, False)        # first row with hi >= k1
    f_hi = _first_at_least(lo_arr, Lq, k0, True)         # rows with lo <= k0 end here
    i_lo = r_lo // BM
    i_hi = gl.where(r_hi > r_lo, (r_hi + BM - 1) // BM, i_lo)
    if_lo = gl.maximum((f_lo + BM - 1) // BM, i_lo)
    if_hi = gl.where(f_hi == Lq, (f_hi + BM - 1) // BM, f_hi // BM)
    if_hi = gl.minimum(if_hi, i_hi)
    return i_lo, if_lo, if_hi, i_hi


@gluon_jit
def key_block_visit(RLO, RHI, hp, NPH, Lq, Lk, k0, BM: gl.constexpr, BN: gl.constexpr,
                    PIECES: gl.constexpr):
    """Query blocks that keep a key of the key block at ``k0``, as ``tile_visit``'s
    ``(x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi)`` in query-block units."""
    k1 = gl.minimum(k0 + BN, Lk) - 1
    a0, af0, af1, a1 = _piece_query_blocks(RLO, RHI, hp * Lq, Lq, k0, k1, BM)
    if PIECES == 2:
        b0, bf0, bf1, b1 = _piece_query_blocks(RLO, RHI, (NPH + hp) * Lq, Lq, k0, k1, BM)
    else:
        b0 = a0 * 0
        bf0 = b0
        bf1 = b0
        b1 = b0
    x0, n1, y0, n = _merge_ranges(a0, a1, b0, b1)
    return x0, n1, y0, n, af0, af1, bf0, bf1
