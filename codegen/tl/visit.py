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

``_row_frame`` says where a tile's rows sit (``POS_MODE``): 0, query row ``i`` at position
``i + q_base`` and key ``j`` at ``j + k_base`` (``q_base = Lk - Lq``, ``k_base = 0`` by default:
bottom-right alignment); 1, the same plus per-batch starts read on the device (a static cache's
fill level, left padding); 2, documents: each row's positions count from its document's first
token and it keeps keys of its own document only. ``_index_bounds`` turns a row's interval (or
hull) in key positions into key indices inside the row's frame.
"""

VISIT_SOURCE = '''
@triton.jit
def _row_frame(rows, row_ok, b, Lq, Lk, q_base, k_base, Starts, s_st, DS, DE,
               POS_MODE: tl.constexpr):
    """rows: query indices. Returns (q_pos, kb, c_lo, c_hi) shaped like rows: the rows'
    positions, the key index of key position 0, and the key indices [c_lo, c_hi] the row may
    keep at all (keys at negative positions and, with documents, keys of other documents are
    never kept)."""
    if POS_MODE == 2:
        off = b.to(tl.int64) * Lq
        ds = tl.load(DS + off + rows, mask=row_ok, other=0)
        de = tl.load(DE + off + rows, mask=row_ok, other=-1)
        return rows - ds, ds, ds, de
    qs = q_base
    ks = k_base
    if POS_MODE == 1:
        qs = qs + tl.load(Starts + b * s_st)
        ks = ks + tl.load(Starts + b * s_st + 1)
    zero = rows * 0
    return rows + qs, zero - ks, zero + tl.maximum(-ks, 0), zero + (Lk - 1)


@triton.jit
def _index_bounds(q_pos, kb, c_lo, c_hi, hp, HULL: tl.constexpr):
    """Key indices [lo, hi] a row keeps: the pattern's interval (HULL: its hull, a superset)
    moved from key positions to indices and clipped to [c_lo, c_hi]. An empty row gets
    lo > hi inside [c_lo - 1, c_hi + 1], so bounds stay non-decreasing across rows and
    documents."""
    if HULL:
        lo, hi = _hull(q_pos, hp)
    else:
        lo, hi = _bounds(q_pos, hp)
    lo = tl.minimum(tl.maximum(lo + kb, c_lo), c_hi + 1)
    hi = tl.maximum(tl.minimum(hi + kb, c_hi), c_lo - 1)
    return lo, hi


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
def _position_bias_args(Slopes, Rel, s_rh, h, Lq, Lk, PBIAS: tl.constexpr):
    """Query head h's position-bias terms as one tuple ``(slope, rel_row, rel_off, rel_last)``
    for ``_position_bias``: the ALiBi slope in log2 units (0.0 without ALiBi), its row of
    the relative-bias table (``Rel + h * s_rh``), and the table's index of position
    difference 0 (``Lq - 1``) and its last index (``Lq + Lk - 2``). PBIAS: bit 1 ALiBi, bit 2
    the relative table."""
    if (PBIAS & 1) != 0:
        slope = tl.load(Slopes + h) * 1.4426950408889634
    else:
        slope = 0.0
    return (slope, Rel + h * s_rh, Lq - 1, Lq + Lk - 2)


@triton.jit
def _position_bias(s, q_pos, k_pos, pbias, PBIAS: tl.constexpr):
    """Scores s (log2 units) plus the position-bias terms at query / key positions q_pos,
    k_pos (broadcast to s): ALiBi's ``slope * (k_pos - q_pos)`` and the relative table's
    ``rel_row[clamp(q_pos - k_pos + rel_off, 0, rel_last)]`` (pbias: _position_bias_args)."""
    slope, rel_row, rel_off, rel_last = pbias
    if (PBIAS & 1) != 0:
        s = s + slope * (k_pos - q_pos).to(tl.float32)
    if (PBIAS & 2) != 0:
        t = tl.minimum(tl.maximum(q_pos - k_pos + rel_off, 0), rel_last)
        s = s + tl.load(rel_row + t) * 1.4426950408889634
    return s


@triton.jit
def _kept_entries(q_pos, kb, c_lo, c_hi, k_idx, n_ok, hp, CLIP: tl.constexpr):
    """[BM, BN] entries the predicate keeps: rows' frames (q_pos, kb, c_lo, c_hi: [BM]), keys
    k_idx / n_ok [BN]."""
    kept = _keep(q_pos[:, None], k_idx[None, :] - kb[:, None], hp) & n_ok[None, :]
    if CLIP:
        kept = kept & (k_idx[None, :] >= c_lo[:, None]) & (k_idx[None, :] <= c_hi[:, None])
    return kept


@triton.jit
def _bias_and_mask(s, bias_base, offs_m, k_idx, n_ok, sbm, sbn, q_pos, kb, c_lo, c_hi, lo, hi,
                   hp, pbias, edge, MODE: tl.constexpr, EVEN_N: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, CLIP: tl.constexpr,
                   PBIAS: tl.constexpr):
    """Scores s [BM, BN] (log2 units) plus the bias, -inf where the block's visit mode drops
    an entry. MODE 0: FULL block (only keys past Lk); 1: PARTIAL, interval bounds lo/hi [BM];
    2: PARTIAL, the inlined predicate at the rows' frame (q_pos, kb; CLIP: keys outside
    [c_lo, c_hi] dropped too); 3: interval bounds only where the runtime flag ``edge`` says
    PARTIAL (merged loop); 4: the predicate only where ``edge`` says PARTIAL (merged loop over
    the block tables). PBIAS: plus the position-bias terms (``_position_bias``)."""
    if PBIAS != 0:
        s = _position_bias(s, q_pos[:, None], k_idx[None, :] - kb[:, None], pbias, PBIAS)
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
        kept = _kept_entries(q_pos, kb, c_lo, c_hi, k_idx, n_ok, hp, CLIP)
        s = tl.where(kept, s, float("-inf"))
    elif MODE == 3:
        if edge:
            kept = (k_idx[None, :] >= lo[:, None]) & (k_idx[None, :] <= hi[:, None])
            s = tl.where(kept, s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
    elif MODE == 4:
        if edge:
            kept = _kept_entries(q_pos, kb, c_lo, c_hi, k_idx, n_ok, hp, CLIP)
            s = tl.where(kept, s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
    elif not EVEN_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s
'''
