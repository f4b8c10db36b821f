"""DMA forward kernel: each query block gathers its selected keys instead of scanning Lk.

Program (query block, batch * query head). The gather list of the block (``dma_select``) holds
at most ``keep + BLOCK_M - 1`` keys; for each tile of it the kernel loads K/V rows by index,
adds ``delta`` to the logits and applies the per-row predicate ``rank <= thr[row]`` (and
``key <= row`` when causal), except on the leading tiles that every row keeps whole
(``full_count``), which run unmasked. Online softmax in float32 with exp2.

Every ``tl.dot`` of the DMA kernels goes through ``dma_dot`` at the precision the launcher picks
with ``TileConfig.precision`` of the input dtype and head dim, the attention kernels' rule:
float32 inputs follow PyTorch's float32 matmul setting (three TF32 products by default,
float32-level error; one where TF32 is allowed; exact products for heads wider than 128);
16-bit products as they are, except bfloat16 under the interpreter, multiplied as float32
("upcast").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.tl.dma.select import DmaSelection

__all__ = ["dma_dot", "dma_forward", "dma_gather_tile", "dma_logits"]

LOG2E = 1.4426950408889634


@triton.jit
def dma_dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32 with ``input_precision=PRECISION`` (``TileConfig.precision``).
    "upcast" multiplies bfloat16 operands as float32 ("ieee"): the interpreter's bfloat16
    ``tl.dot`` is wrong (triton 3.9), as in codegen/tl/printer.py's ``_dot``."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dma_logits(
    q, k, keys, delta, shift, thr, pos, b, lk, key_bias_ptr, grank_ptr, list_base, offs_n, n_ok,
    scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits (log2 units) of one gathered tile, masked to the kept entries when MASKED. The
    forward and the backward share it so that P = exp2(S - lse) matches the forward exactly;
    delta - shift comes first (exact in float32), then the scale: see dma_select's module doc."""
    s = dma_dot(q, tl.trans(k), PRECISION) * scale_log2
    s += (delta[None, :] - shift[:, None]) * 1.4426950408889634
    if HAS_KEY_BIAS:
        kb = tl.load(key_bias_ptr + b * lk + keys)  # keys are valid indices everywhere
        s += kb[None, :] * 1.4426950408889634
    if MASKED:
        ranks = tl.load(grank_ptr + list_base + offs_n, mask=n_ok, other=2147483647)
        kept = ranks[None, :] <= thr[:, None]
        if CAUSAL:
            kept = kept & (keys[None, :] <= pos[:, None])
        s = tl.where(kept, s, float("-inf"))
    return s


@triton.jit
def dma_gather_tile(
    start, count, list_base, b, hk, bhk, lk, k_ptr, v_ptr, delta_ptr, gkey_ptr, skb, skh, skn,
    svb, svh, svn, offs_d, d_ok, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Entries [start, start + BLOCK_N) of a gather list: (offs_n, n_ok, keys, kv_mask, K rows,
    V rows, delta float32). MASKED=False for tiles within the list's length (no bound test).
    Shared by the forward and the backward, which must gather the very same keys."""
    offs_n = start + tl.arange(0, BLOCK_N)
    k_rows = k_ptr + b * skb + hk * skh + offs_d[None, :]
    v_rows = v_ptr + b * svb + hk * svh + offs_d[None, :]
    if MASKED:
        n_ok = offs_n < count
        keys = tl.load(gkey_ptr + list_base + offs_n, mask=n_ok, other=0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_rows + keys[:, None] * skn, mask=kv_mask, other=0.0)
        v = tl.load(v_rows + keys[:, None] * svn, mask=kv_mask, other=0.0)
        delta = tl.load(delta_ptr + bhk * lk + keys, mask=n_ok, other=0.0).to(tl.float32)
    else:
        n_ok = offs_n >= 0
        keys = tl.load(gkey_ptr + list_base + offs_n)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_rows + keys[:, None] * skn, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_rows + keys[:, None] * svn, mask=d_ok[None, :], other=0.0)
        delta = tl.load(delta_ptr + bhk * lk + keys).to(tl.float32)
    return offs_n, n_ok, keys, kv_mask, k, v, delta


@triton.jit
def _fwd_tile(
    q, acc, m_i, l_i, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
    k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, skb, skh, skn, svb, svh, svn,
    scale_log2, offs_d, d_ok,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One tile of the gather list: online-softmax update. MASKED=False for tiles every row
    keeps entirely (the list's leading ``full_count`` entries): no per-entry test at all."""
    offs_n, n_ok, keys, kv_mask, k, v, delta = dma_gather_tile(
        start, count, list_base, b, hk, bhk, lk, k_ptr, v_ptr, delta_ptr, gkey_ptr, skb, skh,
        skn, svb, svh, svn, offs_d, d_ok, MASKED, BLOCK_N)
    s = dma_logits(q, k, keys, delta, shift, thr, pos, b, lk, key_bias_ptr, grank_ptr,
                   list_base, offs_n, n_ok, scale_log2, MASKED, CAUSAL, HAS_KEY_BIAS,
                   PRECISION)
    if MASKED:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dma_dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _dma_fwd_kernel(
    q_ptr, k_ptr, v_ptr, delta_ptr, key_bias_ptr, out_ptr, lse_ptr,
    thr_ptr, shift_ptr, gkey_ptr, grank_ptr, gcount_ptr, gfull_ptr,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    lq, lk, hq, hkv, cap, scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    hk = h // (hq // hkv)
    bhk = b * hkv + hk
    nq = tl.cdiv(lq, BLOCK_M)
    # (batch, head) offsets in 64 bits: a tensor may hold more than 2**31 elements; the
    # offsets within one head stay 32-bit
    b, h, hk, bhk, pid_bh = (b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64),
                             bhk.to(tl.int64), pid_bh.to(tl.int64))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq
    d_ok = offs_d < HEAD_DIM
    pos = offs_m + (lk - lq)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    thr = tl.load(thr_ptr + bhk * lq + offs_m, mask=row_ok, other=-1)
    shift = tl.load(shift_ptr + bhk * lq + offs_m, mask=row_ok, other=0.0)
    count = tl.load(gcount_ptr + bhk * nq + pid_m)
    full_end = tl.load(gfull_ptr + bhk * nq + pid_m) // BLOCK_N * BLOCK_N
    list_base = (bhk * nq + pid_m) * cap

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            q, acc, m_i, l_i, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
            k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, skb, skh, skn, svb,
            svh, svn, scale_log2, offs_d, d_ok, False, CAUSAL, HAS_KEY_BIAS, PRECISION,
            BLOCK_N)
    for start in range(full_end, count, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            q, acc, m_i, l_i, start, count, list_base, thr, shift, pos, b, hk, bhk, lk,
            k_ptr, v_ptr, delta_ptr, key_bias_ptr, gkey_ptr, grank_ptr, skb, skh, skn, svb,
            svh, svn, scale_log2, offs_d, d_ok, True, CAUSAL, HAS_KEY_BIAS, PRECISION,
            BLOCK_N)
    has_any = l_i > 0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    # lse in log2 units of the shifted logits (selection.shift), as the backward uses it;
    # -inf for rows with no kept key.
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh * lq + offs_m, lse, mask=row_ok)


def dma_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    key_bias: torch.Tensor | None,
    selection: DmaSelection,
    causal: bool,
    scale: float,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (last dim contiguous),
    delta ``[B, Hkv, Lk]`` contiguous, key_bias ``[B, Lk]`` float32 (0 where allowed) or None.
    Returns ``(out [B, Hq, Lq, D], lse [B, Hq, Lq] float32)``: lse is the base-2 log-sum-exp of
    the logits with ``selection.shift`` subtracted from delta (only the backward reads it)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, any q strides
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    block_m = selection.block_m
    grid = (triton.cdiv(lq, block_m), b * hq)
    _dma_fwd_kernel[grid](
        q, k, v, delta, key_bias if key_bias is not None else delta, out, lse,
        selection.thr, selection.shift, selection.gather_key, selection.gather_rank,
        selection.gather_count, selection.full_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lq, lk, hq, hkv, selection.gather_key.shape[-1], scale * LOG2E,
        CAUSAL=causal, HAS_KEY_BIAS=key_bias is not None, HEAD_DIM=d,
        BLOCK_D=TileConfig.d_pad(d), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=TileConfig.precision(q.dtype, d), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
