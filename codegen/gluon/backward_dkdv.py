"""The dK/dV pass of the Hopper Gluon backward (``backward.py``): one program per ``BN`` keys
of one (batch, kv head) streams the Q and dO tiles of every query row that keeps one of its
keys, over the kv head's query heads (GQA): ``Sᵀ = K Qᵀ``, ``dPᵀ = V dOᵀ``,
``dV += Pᵀ dO``, ``dK += dSᵀ Q``. ``GRADS`` says which gradients a launch accumulates: both
(3), or dV (1) and dK (2) in launches of their own at head dim 256, where the two
``[64, 256]`` float32 accumulators together would fill a warpgroup's registers (the dV launch
then runs two products per step, without V, dPᵀ and Δ, the dK launch the other three)."""

from __future__ import annotations

from sparse_compile.codegen.gluon.barriers import pipeline_barriers
from sparse_compile.codegen.gluon.bias import biased
from sparse_compile.codegen.gluon.key_mask import keys_kept
from sparse_compile.codegen.gluon.score import head_terms, logits
from sparse_compile.codegen.gluon.support import (
    CONSUMER_REGS,
    CONSUMERS,
    gl,
    gluon_jit,
    mbarrier,
    thread_barrier,
    tma_load,
    tma_load_halves,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from sparse_compile.codegen.gluon.visit import (
    block_at,
    is_partial,
    keeps,
    key_block_visit,
    key_program,
    row_bounds,
)


@gluon_jit
def _dkdv_load(desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, lse_smem,
               delta_smem, LSE, Delta, kv_bar, q_ready, q_empty, o_ready, o_empty, RLO, RHI, Hq,
               G, NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch,
               BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr,
               GRADS: gl.constexpr):
    """Producer warp of the dK/dV pass: K and V once (one half per consumer warpgroup), then
    for every visited query block of every query head of the group its ``lse`` and ``Δ``
    (plain loads into the ring's vectors) and its Q and dO tiles (TMA); a dV launch
    (``GRADS`` 1) needs neither V nor ``Δ``."""
    b, hkv, k0 = key_program(Hq, G, BN)
    WN: gl.constexpr = BN // 2
    if (GRADS & 2) != 0:
        mbarrier.expect(kv_bar, 2 * (desc_k.block_type.nbytes + desc_v.block_type.nbytes))
        tma_load_halves(desc_v, b * k_rb + hkv * k_rh + k0, hkv * k_ch, WN, kv_bar, v_smem)
    else:
        mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes)
    tma_load_halves(desc_k, b * k_rb + hkv * k_rh + k0, hkv * k_ch, WN, kv_bar, k_smem)
    t = 0
    vec: gl.constexpr = gl.BlockedLayout([BM // 32], [32], [1], [0])
    for g in range(0, G):
        h = hkv * G + g
        bh = (b * Hq + h).to(gl.int64)
        x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = key_block_visit(
            RLO, RHI, h % NPH, NPH, Lq, Lk, k0, BM, BN, PIECES)
        for u in range(0, n):
            i = block_at(u, x0, n1, y0)
            st = t % STAGES
            ph = (t // STAGES) & 1
            offs_q = i * BM + gl.arange(0, BM, layout=vec)
            q_ok = offs_q < Lq
            lse = gl.load(LSE + bh * Lq + offs_q, mask=q_ok, other=float("inf"))
            if (GRADS & 2) != 0:
                delta = gl.load(Delta + bh * Lq + offs_q, mask=q_ok, other=0.0)
            mbarrier.wait(q_empty.index(st), ph ^ 1)
            lse_smem.index(st).store(lse)
            if (GRADS & 2) != 0:
                delta_smem.index(st).store(delta)
            thread_barrier()  # the warp's stores precede the arrival that publishes them
            mbarrier.expect(q_ready.index(st), desc_q.block_type.nbytes)
            tma_load(desc_q, [b * q_rb + h * q_rh + i * BM, h * q_ch], q_ready.index(st),
                     q_smem.index(st))
            mbarrier.wait(o_empty.index(st), ph ^ 1)
            mbarrier.expect(o_ready.index(st), desc_do.block_type.nbytes)
            tma_load(desc_do, [b * o_rb + h * o_rh + i * BM, h * o_ch], o_ready.index(st),
                     do_smem.index(st))
            t += 1


@gluon_jit
def _query_positions(i, Lq, Lk, BM: gl.constexpr, col_st: gl.constexpr):
    """Positions ``[1, BM]`` of query block ``i``'s rows (row ``q`` at ``q + Lk − Lq``)."""
    return (i * BM + (Lk - Lq) + gl.arange(0, BM, layout=col_st))[None, :]


@gluon_jit
def _kept(i, qa0, qb0, qa1, qb1, BM: gl.constexpr, PIECES: gl.constexpr,
          col_st: gl.constexpr):
    """``[WN, BM]``: which (key, query row) pairs of query block ``i`` the pattern keeps, from
    each key's kept query rows (``qa``/``qb``: one or two intervals per key)."""
    offs_q = i * BM + gl.arange(0, BM, layout=col_st)
    return keeps(qa0[:, None], qb0[:, None], qa1[:, None], qb1[:, None], offs_q[None, :],
                 PIECES)


@gluon_jit
def _dkdv_compute(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                  q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq, G, NPH,
                  Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh,
                  KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn, HEAD_DIM: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr,
                  STAGES: gl.constexpr, PIECES: gl.constexpr, SOFTCAP: gl.constexpr,
                  PBIAS: gl.constexpr, GRADS: gl.constexpr, KEY_MASK: gl.constexpr,
                  BIAS: gl.constexpr, WG: gl.constexpr, num_warps: gl.constexpr):
    """One consumer warpgroup of a key-block program: dK and dV of keys ``WG * BN / 2`` ..
    (its own half of K and V), streaming the Q and dO ring both warpgroups share. PARTIAL
    blocks are masked with each key's kept query rows (``KLO``/``KHI``: two values per key
    row of the transposed tile, where the rows' intervals would take two per query column)."""
    b, hkv, k0 = key_program(Hq, G, BN)
    WN: gl.constexpr = BN // 2
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    kw = k_smem.index(WG)
    vw = v_smem.index(WG)
    k_idx = k0 + WG * WN + gl.arange(0, WN, layout=gl.SliceLayout(1, st_layout))
    q_rows = gl.arange(0, BM, layout=col_st)[None, :]  # a query tile's rows, across
    k_ok = k_idx < Lk
    WITH_DK: gl.constexpr = (GRADS & 2) != 0
    WITH_DV: gl.constexpr = (GRADS & 1) != 0
    if WITH_DK:
        dk = gl.zeros([WN, HEAD_DIM], gl.float32, layout=kv_layout)
    if WITH_DV:
        dv = gl.zeros([WN, HEAD_DIM], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([WN, BM], gl.float32, layout=st_layout)
    mbarrier.wait(kv_bar, 0)
    t = 0
    for g in range(0, G):
        h = hkv * G + g
        hp = h % NPH
        slope, rel_row = head_terms(Slopes, Rel, s_rh, h, PBIAS)
        bt = (Bias, b, h, Lq, Lk, sbb, sbh, sbm, sbn)
        x0, n1, y0, n, f0_lo, f0_hi, f1_lo, f1_hi = key_block_visit(
            RLO, RHI, hp, NPH, Lq, Lk, k0, BM, BN, PIECES)
        qa0, qb0, qa1, qb1 = row_bounds(KLO, KHI, hp, NPH, Lk, k_idx, k_ok, PIECES)
        for u in range(0, n):
            i = block_at(u, x0, n1, y0)
            st = t % STAGES
            ph = (t // STAGES) & 1
            mbarrier.wait(q_ready.index(st), ph)
            s_t = warpgroup_mma(kw, q_smem.index(st).permute((1, 0)), st_zero,
                                use_acc=False, is_async=True)
            mbarrier.wait(o_ready.index(st), ph)
            if WITH_DK:
                dp_t = warpgroup_mma(vw, do_smem.index(st).permute((1, 0)), st_zero,
                                     use_acc=False, is_async=True)
                s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
            else:
                s_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t,))
            lse = lse_smem.index(st).load(col_st)
            partial = is_partial(i, f0_lo, f0_hi, f1_lo, f1_hi)
            if SOFTCAP:  # score.py, on the transposed tile: keys down, query rows across
                x_t, t_cap = logits(s_t, _query_positions(i, Lq, Lk, BM, col_st),
                                    k_idx[:, None], cap_in, cap_out, qk_scale, slope, rel_row,
                                    Lq - 1, Lq + Lk - 2, SOFTCAP, PBIAS)
                x_t = biased(x_t, bt, i * BM + q_rows, k_idx[:, None], BIAS)
                p_t = gl.exp2(x_t - lse[None, :])
                if partial:
                    p_t = gl.where(_kept(i, qa0, qb0, qa1, qb1, BM, PIECES, col_st), p_t, 0.0)
                p_ds = p_t * (1.0 - t_cap * t_cap)  # P's factor of dS through the cap
            elif PBIAS != 0 or BIAS != 0:  # masked before the exponent (fewer spills)
                if PBIAS != 0:
                    x_t, _ = logits(s_t, _query_positions(i, Lq, Lk, BM, col_st),
                                    k_idx[:, None], cap_in, cap_out, qk_scale, slope, rel_row,
                                    Lq - 1, Lq + Lk - 2, SOFTCAP, PBIAS)
                else:
                    x_t = s_t * qk_scale
                x_t = biased(x_t, bt, i * BM + q_rows, k_idx[:, None], BIAS)
                if partial:
                    x_t = gl.where(_kept(i, qa0, qb0, qa1, qb1, BM, PIECES, col_st), x_t,
                                   float("-inf"))
                p_t = gl.exp2(x_t - lse[None, :])
                p_ds = p_t
            else:
                p_t = gl.exp2(s_t * qk_scale - lse[None, :])
                if partial:
                    p_t = gl.where(_kept(i, qa0, qb0, qa1, qb1, BM, PIECES, col_st), p_t, 0.0)
                p_ds = p_t
            if WITH_DV:
                dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout),
                                   do_smem.index(st), dv, is_async=True)
                if WITH_DK:
                    dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))
            elif WITH_DK:
                dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(dp_t,))
            if WITH_DK:
                delta = delta_smem.index(st).load(col_st)
                ds_t = p_ds * (dp_t - delta[None, :])
                dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_layout),
                                   q_smem.index(st), dk, is_async=True)
            if WITH_DK and WITH_DV:
                dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            elif WITH_DK:
                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk,))
            else:
                dv = warpgroup_mma_wait(num_outstanding=0, deps=(dv,))
            mbarrier.arrive(q_empty.index(st), count=1)
            mbarrier.arrive(o_empty.index(st), count=1)
            t += 1
    offs_n = k0 + WG * WN + gl.arange(0, WN, layout=gl.SliceLayout(1, kv_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    base = b.to(gl.int64) * skb + hkv.to(gl.int64) * skh
    offs = base + offs_n[:, None].to(gl.int64) * skn + offs_d[None, :]
    ok = (offs_n < Lk)[:, None]
    if KEY_MASK:  # key_mask.py: a masked key's dK and dV rows are zero
        kept = keys_kept(KeyMask, b, offs_n, Lk, km_sb, km_sk)[:, None]
        if WITH_DK:
            dk = gl.where(kept, dk, 0.0)
        if WITH_DV:
            dv = gl.where(kept, dv, 0.0)
    if WITH_DK:
        dk = dk * scale
        gl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    if WITH_DV:
        gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@gluon_jit
def _dkdv_kernel(desc_q, desc_k, desc_v, desc_do, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq, G,
                 NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh, k_ch, o_rb, o_rh, o_ch, skb, skh, skn,
                 qk_scale, scale, cap_in, cap_out, Slopes, Rel, s_rh, KeyMask, km_sb, km_sk,
                 Bias, sbb, sbh, sbm, sbn, HEAD_DIM: gl.constexpr, BM: gl.constexpr,
                 BN: gl.constexpr, STAGES: gl.constexpr, PIECES: gl.constexpr,
                 SOFTCAP: gl.constexpr, PBIAS: gl.constexpr, GRADS: gl.constexpr,
                 KEY_MASK: gl.constexpr, BIAS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = desc_k.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, BN // 2, HEAD_DIM], desc_k.layout)
    if (GRADS & 2) != 0:
        v_smem = gl.allocate_shared_memory(dtype, [2, BN // 2, HEAD_DIM], desc_v.layout)
    else:  # a dV launch reads no V: K's buffer stands in for it, never read
        v_smem = k_smem
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, HEAD_DIM], desc_do.layout)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_layout)
    kv_bar, q_ready, q_empty, o_ready, o_empty = pipeline_barriers(STAGES, CONSUMERS)
    gl.warp_specialize([
        (_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                         q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq,
                         G, NPH, Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out,
                         Slopes, Rel, s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn,
                         HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS, GRADS, KEY_MASK,
                         BIAS, 0, num_warps)),
        (_dkdv_compute, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready,
                         q_empty, o_ready, o_empty, DK, DV, LSE, Delta, RLO, RHI, KLO, KHI, Hq,
                         G, NPH, Lq, Lk, skb, skh, skn, qk_scale, scale, cap_in, cap_out,
                         Slopes, Rel, s_rh, KeyMask, km_sb, km_sk, Bias, sbb, sbh, sbm, sbn,
                         HEAD_DIM, BM, BN, STAGES, PIECES, SOFTCAP, PBIAS, GRADS, KEY_MASK,
                         BIAS, 1, num_warps)),
        (_dkdv_load, (desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem,
                      lse_smem, delta_smem, LSE, Delta, kv_bar, q_ready, q_empty, o_ready,
                      o_empty, RLO, RHI, Hq, G, NPH, Lq, Lk, q_rb, q_rh, q_ch, k_rb, k_rh,
                      k_ch, o_rb, o_rh, o_ch, BM, BN, STAGES, PIECES, GRADS)),
    ], [num_warps, 1], [CONSUMER_REGS, 24])
