"""Backward kernel family, relative-bias table gradient: dS summed along each diagonal.

The table's entry for position difference ``d`` is added to every logit whose query and key
are ``d`` apart, so its gradient is the sum of dS = P ∘ (dP − Δ) over that diagonal (dS of the
logits after soft-capping: the table is added after the cap). One program owns one band of
``BM`` consecutive diagonals ``e = i - j`` (query row minus key index) of one (batch, query
head) and walks down the query blocks: for rows ``[i0, i0 + BM)`` the band's entries lie in the
``2 BM`` keys from ``i0 - e0 - BM + 1``, so it recomputes that ``BM x 2BM`` tile (P from the
saved log-sum-exp, the dropout mask from its seed, the pattern's predicate on every entry) and
folds it onto the band with one in-register gather. Tiles outside the pattern's hull for the
block's rows are skipped. Each diagonal's sum is accumulated by one program in a fixed order:
no atomics, the result is bitwise reproducible, and nothing larger than ``[B, Hq, Lq + Lk - 1]``
is written (the host maps these sums to table entries: ``relative_table_grad``).
"""

from __future__ import annotations

import torch
import triton
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.positions import DOCUMENTS, Frame, frame_args
from sparse_compile.codegen.tl.forward import bias_args, position_bias_args, softcap_args

# Diagonals per program (and query rows per tile; the key tile is twice as wide).
BAND = 32

TABLE_GRAD_SOURCE = '''
@triton.jit
def _rel_grad_kernel(Q, K, V, Bias, DO, LSE, Delta, GD, Starts, s_st, DS, DE, Slopes, Rel, s_rh,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod,
                     Hq, G, NPH, Lq, Lk, q_first, k_first, qk_scale, cap_in, cap_out, drop_p,
                     seed, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BIAS_BOOL: tl.constexpr, DROPOUT: tl.constexpr,
                     PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, POS_MODE: tl.constexpr,
                     PBIAS: tl.constexpr):
    """Program (band, batch * query head): GD[b, h, u] = sum of dS over the entries with
    i - j = u - (Lk - 1), for the band's BM values of u."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hkv = h // G
    hp = h % NPH
    BN: tl.constexpr = 2 * BM
    CLIP: tl.constexpr = POS_MODE != 0
    e0 = pid_e * BM - (Lk - 1)
    offs_r = tl.arange(0, BM)
    offs_c = tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    pbias = _position_bias_args(Slopes, Rel, s_rh, h, Lq, Lk, PBIAS)
    seed_bh = seed + pid_bh
    # Column of row r's entry on diagonal e0 + t inside the tile: r + BM - 1 - t.
    fold = offs_r[:, None] + (BM - 1) - offs_r[None, :]
    acc = tl.zeros([BM], tl.float32)
    for qb in range(0, tl.cdiv(Lq, BM)):
        offs_m = qb * BM + offs_r
        row_ok = offs_m < Lq
        j0 = qb * BM - e0 - (BM - 1)
        k_idx = j0 + offs_c
        n_ok = (k_idx >= 0) & (k_idx < Lk)
        q_pos, kb, c_lo, c_hi = _row_frame(offs_m, row_ok, b, Lq, Lk, q_first, k_first, Starts,
                                           s_st, DS, DE, POS_MODE)
        lo, hi = _index_bounds(q_pos, kb, c_lo, c_hi, hp, True)
        live = row_ok & (lo <= hi) & (hi >= j0) & (lo < j0 + BN)
        if (tl.sum(live.to(tl.int32), 0) > 0) & (j0 < Lk) & (j0 + BN > 0):
            io_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=io_mask,
                        other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                         mask=io_mask, other=0.0)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_ok,
                          other=float("inf"))
            delta = tl.load(Delta + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + k_idx[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask,
                        other=0.0)
            v = tl.load(v_base + k_idx[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0)
            s = _dot(q, tl.trans(k), PRECISION)
            if SOFTCAP:
                s = _tanh(s * cap_in) * cap_out
            else:
                s = s * qk_scale
            # Rows past Lq address the bias at row Lq - 1 (their P is 0: LSE = +inf).
            s = _bias_and_mask(s, bias_base, tl.minimum(offs_m, Lq - 1), k_idx, n_ok, sbm, sbn,
                               q_pos, kb, c_lo, c_hi, lo, hi, hp, pbias, False, 2, False,
                               HAS_BIAS, BIAS_BOOL, CLIP, PBIAS)
            p = tl.math.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), PRECISION)
            if DROPOUT:
                rnd = tl.rand(seed_bh, (offs_m[:, None] * Lk + k_idx[None, :]).to(tl.uint32))
                dp = tl.where(rnd >= drop_p, dp * (1.0 / (1.0 - drop_p)), 0.0)
            ds = tl.where(row_ok[:, None] & n_ok[None, :], p * (dp - delta[:, None]), 0.0)
            acc += tl.sum(tl.gather(ds, fold, 1), 0)
    u = pid_e * BM + offs_r
    tl.store(GD + pid_bh.to(tl.int64) * (Lq + Lk - 1) + u, acc, mask=u < Lq + Lk - 1)
'''


def launch_table_grad(
    module: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    num_pattern_heads: int,
    scale: float,
    dropout_p: float,
    seed: int,
    softcap: float,
    frame: Frame,
    alibi: torch.Tensor | None,
    rel_bias: torch.Tensor,
) -> torch.Tensor:
    """Per-diagonal sums of dS, float32 ``[B, Hq, Lq + Lk - 1]``: entry ``u`` sums the
    (query row i, key j) with ``i - j = u - (Lk - 1)``.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], bias None or 4-D (bool as uint8), dout like q, lse /
    delta [B, Hq, Lq] float32 (log2-unit log-sum-exp; rowsum(dO ∘ O)), arguments otherwise as
    the forward's (``rel_bias`` the float32 table the forward read).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    n = lq + lk - 1
    grad = torch.zeros((b, hq, n), device=q.device, dtype=torch.float32)
    if q.numel() == 0 or lk == 0:
        return grad
    bias_t, bias_strides = bias_args(bias, q)
    pb_args, pb_flags = position_bias_args(alibi, rel_bias, q)
    pos_ptrs, (q_first, k_first) = frame_args(frame, lq, lk, q)
    d_pad = max(16, triton.next_power_of_2(d))
    module._rel_grad_kernel[(triton.cdiv(n, BAND), b * hq)](
        q, k, v, bias_t, dout, lse, delta, grad, *pos_ptrs, *pb_args,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *dout.stride(),
        hq, hq // hkv, num_pattern_heads, lq, lk, q_first, k_first, scale * 1.4426950408889634,
        *softcap_args(scale, softcap), dropout_p, seed,
        HEAD_DIM=d, D_PAD=d_pad, BM=BAND,
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        DROPOUT=dropout_p > 0.0, PRECISION=TileConfig.precision(q.dtype, d),
        SOFTCAP=softcap > 0, POS_MODE=frame.mode, PBIAS=pb_flags, num_warps=4, num_stages=2,
    )
    return grad


def relative_table_grad(diagonals: torch.Tensor, frame: Frame, lq: int, lk: int,
                        heads: int) -> torch.Tensor:
    """The table's gradient ``[heads, Lq + Lk - 1]`` (float32; ``heads`` 1 sums over query
    heads) from the per-diagonal sums ``[B, Hq, Lq + Lk - 1]`` of ``launch_table_grad``.

    Diagonal ``u`` (i - j = u - (Lk - 1)) is table entry ``u + shift`` clamped to the table,
    with ``shift = (q_start - k_start) - (Lk - Lq)`` per batch row: 0 in the default alignment
    and inside documents, so the sum over the batch is the gradient; otherwise each row's sums
    move by its shift and the clamped ends take the sums past them (differences of a float64
    prefix sum: deterministic, no scatter)."""
    n = lq + lk - 1
    grads = diagonals
    if frame.mode != DOCUMENTS and not frame.is_default(lq, lk):
        _, (q_first, k_first) = frame_args(frame, lq, lk, diagonals)
        shift = torch.full((1,), (q_first - k_first) - (lk - lq), device=diagonals.device,
                           dtype=torch.int64)
        if frame.starts is not None:
            starts = frame.starts.to(torch.int64)
            shift = shift + (starts[:, 0] - starts[:, 1])
        # Entry t takes the diagonals [first, last): t - shift alone inside the table, and
        # every diagonal below (t = 0) or above (t = n - 1) it at the clamped ends.
        t = torch.arange(n, device=diagonals.device, dtype=torch.int64)
        first = (t[None, :] - shift[:, None]).clamp(0, n)
        last = (t[None, :] - shift[:, None] + 1).clamp(0, n)
        first[:, 0] = 0
        last[:, n - 1] = n
        shape = (diagonals.shape[0], diagonals.shape[1], n)
        first = first[:, None].expand(shape)
        last = last[:, None].expand(shape)
        prefix = torch.nn.functional.pad(diagonals.to(torch.float64).cumsum(-1), (1, 0))
        grads = prefix.gather(-1, last) - prefix.gather(-1, first)
        grads = torch.where(last > first, grads, 0.0).to(torch.float32)
    grads = grads.sum(0)
    return grads.sum(0, keepdim=True) if heads == 1 else grads
