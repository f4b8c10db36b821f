"""Decoding kernel family: a few query rows against a long KV cache, split over the keys.

With one query row per (batch, head), the training kernels give one program per (batch, query
head) that walks every kept key alone: at batch 1 most of the GPU idles. Here one program owns
a slice of the kept keys of one (batch, kv head) and all the query rows of its head group (GQA:
the Hq / Hkv heads times Lq rows form the tile's rows, so each K/V tile is read once for the
group); the slices' partial results are merged by their log-sum-exp (``_decode_merge``). The
kept keys of a row are the union of at most two intervals (``_pieces`` of the generated module:
``causal & (sink(4) | sliding(w))`` visits its sinks and its window, nothing between), or the
hull of a pattern that is no such union, with the predicate applied; where the rows sit comes
from their frame (``visit.py``: a static cache's fill level is read on the device), so the
launch needs no host synchronisation and CUDA graphs replay it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME, Frame, frame_args
from sparse_compile.codegen.tl.forward import bias_args, position_bias_args, softcap_args

# Query rows of one program (heads of a group x query rows) and keys per tile.
MAX_ROWS = 64
BLOCK_N = 64

DECODE_SOURCE = '''
@triton.jit
def _decode_kernel(Q, K, V, Bias, OutPart, LsePart, Starts, s_st, DS, DE, Slopes, Rel,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sbb, sbh, sbm, sbn, s_rh, Hq, Hkv, NPH, Lq, Lk, q_first, k_first, qk_scale,
                   cap_in, cap_out, SPLITS,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, PIECES: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_BOOL: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                   POS_MODE: tl.constexpr, PBIAS: tl.constexpr):
    """Program (split, batch * kv head). Rows r = g * Lq + i: query head hkv * G + g, query
    row i. PIECES 1 or 2: the rows keep exactly the union of ``_pieces``; 0: the hull, with
    the predicate on every visited key."""
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hkv = pid_bk % Hkv
    G = Hq // Hkv
    rows = tl.arange(0, BM)
    row_ok = rows < G * Lq
    g = rows // Lq
    i = rows % Lq
    h = hkv * G + g
    hp = h % NPH
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh
                + i[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos, kb, c_lo, c_hi = _row_frame(i, row_ok, b, Lq, Lk, q_first, k_first, Starts, s_st,
                                       DS, DE, POS_MODE)
    if PIECES == 0:
        lo1, hi1 = _hull(q_pos, hp)
        lo2 = lo1 * 0 + 1
        hi2 = lo1 * 0
    else:
        lo1, hi1, lo2, hi2 = _pieces(q_pos, hp)
    # Key positions to indices, clipped to the keys the rows may keep.
    lo1 = tl.maximum(lo1 + kb, c_lo)
    hi1 = tl.minimum(hi1 + kb, c_hi)
    lo2 = tl.maximum(lo2 + kb, c_lo)
    hi2 = tl.minimum(hi2 + kb, c_hi)
    # Block ranges over all rows: [a1, e1) then the part of [a2, e2) not already visited.
    live1 = row_ok & (lo1 <= hi1)
    live2 = row_ok & (lo2 <= hi2)
    a1 = tl.min(tl.where(live1, lo1, Lk), 0) // BN
    e1 = tl.maximum(tl.max(tl.where(live1, hi1 // BN + 1, 0), 0), a1)
    a2 = tl.min(tl.where(live2, lo2, Lk), 0) // BN
    e2 = tl.maximum(tl.max(tl.where(live2, hi2 // BN + 1, 0), 0), a2)
    swap = a2 < a1
    a1, e1, a2, e2 = (tl.where(swap, a2, a1), tl.where(swap, e2, e1), tl.where(swap, a1, a2),
                      tl.where(swap, e1, e2))
    a2 = tl.maximum(a2, e1)
    e2 = tl.maximum(e2, a2)
    n1 = e1 - a1
    total = n1 + (e2 - a2)
    per = (total + SPLITS - 1) // SPLITS
    t_lo = pid_s * per
    t_hi = tl.minimum(total, t_lo + per)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    bias_rows = (Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
                 + i.to(tl.int64) * sbm)
    if (PBIAS & 1) != 0:
        slope = tl.load(Slopes + h, mask=row_ok, other=0.0) * 1.4426950408889634
    else:
        slope = tl.zeros([BM], tl.float32)
    # Per-row position-bias terms (visit.py ``_position_bias``); rows past the group read
    # head 0's table row.
    pbias = (slope[:, None], (Rel + tl.where(row_ok, h, 0) * s_rh)[:, None], Lq - 1,
             Lq + Lk - 2)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D_PAD], tl.float32)
    for t in range(t_lo, t_hi):
        j = tl.where(t < n1, a1 + t, a2 + (t - n1))
        k_idx = j * BN + offs_n
        n_ok = k_idx < Lk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_idx[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask,
                    other=0.0)
        s = _dot(q, tl.trans(k), PRECISION)
        if SOFTCAP:
            s = _tanh(s * cap_in) * cap_out
        else:
            s = s * qk_scale
        if PBIAS != 0:
            s = _position_bias(s, q_pos[:, None], k_idx[None, :] - kb[:, None], pbias, PBIAS)
        kept = ((k_idx[None, :] >= lo1[:, None]) & (k_idx[None, :] <= hi1[:, None])) | (
            (k_idx[None, :] >= lo2[:, None]) & (k_idx[None, :] <= hi2[:, None]))
        if PIECES == 0:
            kept = kept & _keep(q_pos[:, None], k_idx[None, :] - kb[:, None], hp[:, None])
        kept = kept & n_ok[None, :] & row_ok[:, None]
        if HAS_BIAS:
            bias = tl.load(bias_rows[:, None] + k_idx[None, :].to(tl.int64) * sbn,
                           mask=row_ok[:, None] & n_ok[None, :], other=0)
            if BIAS_BOOL:
                kept = kept & (bias != 0)
            else:
                s = s + bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(kept, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + k_idx[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask,
                    other=0.0)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    part = (((b * Hq + h) * Lq + i).to(tl.int64) * SPLITS + pid_s)
    tl.store(LsePart + part, lse, mask=row_ok)
    tl.store(OutPart + part[:, None] * D_PAD + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None])
'''


@triton.jit
def _decode_merge(OutPart, LsePart, Out, Lse, SPLITS, sob, soh, som, sod, Hq, Lq,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr):
    """One program per (batch, head, row): the splits' outputs weighted by their share of the
    row's softmax mass (log-sum-exp, log2 units); an empty row gets zeros and LSE = +inf."""
    row = tl.program_id(0)
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    i = row % Lq
    offs_s = tl.arange(0, BS)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < SPLITS
    lse = tl.load(LsePart + row.to(tl.int64) * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(OutPart + (row.to(tl.int64) * SPLITS + offs_s)[:, None] * D_PAD
                    + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + i * som + offs_d * sod,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, tl.where(total == 0.0, float("inf"), m_safe + tl.math.log2(total)))


@functools.lru_cache(maxsize=16)
def _programs_wanted(device: torch.device) -> int:
    """Enough programs to fill the device a few times over."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def decode_applies(q: torch.Tensor, k: torch.Tensor, dropout_p: float, frame: Frame) -> bool:
    """Whether a forward call is a decoding step this family serves: at most ``MAX_ROWS``
    rows per head group, keys much longer than queries, no dropout, no documents, nothing
    empty (the split over ``B * Hkv`` programs needs a program to split over)."""
    if q.numel() == 0 or k.numel() == 0:
        return False
    hq, lq, hkv, lk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (dropout_p == 0.0 and frame.mode != 2 and lk >= 4 * BLOCK_N and lq * 8 <= lk
            and (hq // hkv) * lq <= MAX_ROWS)


def launch_decode(
    module: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    num_pattern_heads: int,
    pieces: int,
    scale: float,
    precision: str,
    softcap: float = 0.0,
    out_dtype: torch.dtype | None = None,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Lq, D] (``out_dtype``, default q's) and lse [B, Hq, Lq] float32 (log2
    units, +inf for an empty row): the decoding kernels of a generated ``module``.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (any strides), bias None or a 4-D tensor broadcast to
    [B, Hq, Lq, Lk] (bool as uint8); ``pieces``: 1 or 2 when the pattern's rows are a union of
    that many intervals (``predicate.interval_pieces``), 0 to visit the hull; ``alibi``: None
    or float32 slopes ``[Hq]``; ``rel_bias``: None or a float32 relative-bias table
    ``[Hq or 1, Lq + Lk - 1]`` (codegen/tl/visit.py ``_position_bias``).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    d_pad = max(16, triton.next_power_of_2(d))
    rows = max(16, triton.next_power_of_2((hq // hkv) * lq))
    splits = max(1, min(triton.cdiv(lk, BLOCK_N), triton.cdiv(_programs_wanted(q.device),
                                                              b * hkv)))
    out_part = torch.empty((b, hq, lq, splits, d_pad), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((b, hq, lq, splits), device=q.device, dtype=torch.float32)
    bias_t, bias_strides = bias_args(bias, q)
    pos_ptrs, (q_first, k_first) = frame_args(frame, lq, lk, q)
    (slopes, rel, s_rh), pb_flags = position_bias_args(alibi, rel_bias, q)
    module._decode_kernel[(splits, b * hkv)](
        q, k, v, bias_t, out_part, lse_part, *pos_ptrs, slopes, rel,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, s_rh,
        hq, hkv, num_pattern_heads, lq, lk, q_first, k_first, scale * 1.4426950408889634,
        *softcap_args(scale, softcap), splits,
        HEAD_DIM=d, D_PAD=d_pad, BM=rows, BN=BLOCK_N, PIECES=pieces,
        HAS_BIAS=bias is not None, BIAS_BOOL=bias is not None and bias.dtype == torch.uint8,
        SOFTCAP=softcap > 0, PRECISION=precision, POS_MODE=frame.mode,
        PBIAS=pb_flags, num_warps=4,
        num_stages=3,
    )
    out = torch.empty((b, hq, lq, d), device=q.device, dtype=out_dtype or q.dtype)
    lse = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    _decode_merge[(b * hq * lq,)](
        out_part, lse_part, out, lse, splits, *out.stride(), hq, lq, HEAD_DIM=d, D_PAD=d_pad,
        BS=max(2, triton.next_power_of_2(splits)), num_warps=4,
    )
    return out, lse
