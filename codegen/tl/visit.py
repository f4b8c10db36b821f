"""Triton source shared by the kernels: which key blocks a query tile visits.

For interval patterns, ``_visit_range`` turns the per-row bounds of one query tile into three
consecutive ranges of key-block indices, all computed in-kernel (no index tensor):

    [j_lo, j_full_lo)       PARTIAL blocks (bounds checked per entry)
    [j_full_lo, j_full_hi)  FULL blocks (every valid row keeps every key: no mask arithmetic)
    [j_full_hi, j_hi)       PARTIAL blocks

The visit range is [min lo, max hi] over the tile's non-empty rows (tl.min/tl.max reductions);
the full range is [max lo, min hi] when no valid row is empty. ``_bias_and_mask`` applies, on a
query-major score tile, the bias and what each visit mode must test (the forward and the dQ
pass share it: the backward's P must repeat the forward's logits operation for operation).
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


@triton.jit
def _bias_and_mask(s, bias_base, offs_m, k_idx, n_ok, sbm, sbn, q_pos, lo, hi, hp, edge,
                   MODE: tl.constexpr, EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_BOOL: tl.constexpr):
    """Scores s [BM, BN] (log2 units) plus the bias, -inf where the block's visit mode drops
    an entry. MODE 0: FULL block (only keys past Lk); 1: PARTIAL, interval bounds lo/hi [BM];
    2: PARTIAL, the inlined predicate; 3: interval bounds only where the runtime flag ``edge``
    says PARTIAL (merged loop); 4: the predicate only where ``edge`` says PARTIAL (merged loop
    over the block tables)."""
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None].to(tl.int64) * sbm
                       + k_idx[None, :].to(tl.int64) * sbn,
                       mask=n_ok[None, :], other=0)
        if BIAS_BOOL:
            s = tl.where(bias != 0, s, float("-inf"))
        else:
            s = s + bias.to(tl.float32) * 1.4426950408889634
    if MODE == 1:
        kept = (k_idx[None, :] >= lo[:, None]) & (k_idx[None, :] <= hi[:, None])
        s = tl.where(kept, s, float("-inf"))
    elif MODE == 2:
        kept = _keep(q_pos[:, None], k_idx[None, :], hp) & n_ok[None, :]
        s = tl.where(kept, s, float("-inf"))
    elif MODE == 3:
        if edge:
            kept = (k_idx[None, :] >= lo[:, None]) & (k_idx[None, :] <= hi[:, None])
            s = tl.where(kept, s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
    elif MODE == 4:
        if edge:
            kept = _keep(q_pos[:, None], k_idx[None, :], hp) & n_ok[None, :]
            s = tl.where(kept, s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
    elif not EVEN_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s
'''
