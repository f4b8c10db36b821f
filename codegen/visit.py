"""Triton source shared by the kernels: which key blocks a query tile visits.

For interval patterns, ``_visit_range`` turns the per-row bounds of one query tile into three
consecutive ranges of key-block indices, all computed in-kernel (no index tensor):

    [j_lo, j_full_lo)       PARTIAL blocks (bounds checked per entry)
    [j_full_lo, j_full_hi)  FULL blocks (every valid row keeps every key: no mask arithmetic)
    [j_full_hi, j_hi)       PARTIAL blocks

The visit range is [min lo, max hi] over the tile's non-empty rows (tl.min/tl.max reductions);
the full range is [max lo, min hi] when no valid row is empty.
"""

VISIT_SOURCE = '''
@triton.jit
def _visit_range(lo, hi, row_ok, Lk, BN: tl.constexpr):
    """lo, hi, row_ok: [BM]. Returns block indices (j_lo, j_full_lo, j_full_hi, j_hi)."""
    nonempty = row_ok & (lo <= hi)
    vis_lo = tl.min(tl.where(nonempty, lo, Lk), 0)
    vis_hi = tl.max(tl.where(nonempty, hi, -1), 0)
    j_lo = vis_lo // BN
    j_hi = tl.where(vis_hi >= vis_lo, vis_hi // BN + 1, j_lo)
    n_empty = tl.sum(tl.where(row_ok & (lo > hi), 1, 0), 0)
    full_lo = tl.max(tl.where(row_ok, lo, 0), 0)
    full_hi = tl.min(tl.where(row_ok, hi, Lk - 1), 0)
    jf_lo = (full_lo + BN - 1) // BN
    jf_hi = (full_hi + 1) // BN
    has_full = (n_empty == 0) & (jf_lo < jf_hi) & (vis_hi >= vis_lo)
    jf_lo = tl.where(has_full, jf_lo, j_hi)
    jf_hi = tl.where(has_full, jf_hi, j_hi)
    return j_lo, jf_lo, jf_hi, j_hi
'''
