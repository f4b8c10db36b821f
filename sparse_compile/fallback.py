"""Memory-bounded pattern-sparse attention in plain PyTorch.

Used when neither a GPU nor the Triton interpreter is available. Queries are processed in chunks
so that no more than ``max_scores`` score entries exist at once (the full Lq x Lk score matrix is
never built for long inputs); with autograd on, each chunk is recomputed in the backward
(activation checkpointing), so the backward is memory-bounded too.

Semantics are DESIGN.md §2: ``softmax(scale · Q Kᵀ + bias + where(keep, 0, −inf)) V`` with query
``i`` at absolute position ``i + Lk − Lq`` unless positions or documents say otherwise
(sparse_compile.positions); a row with no kept key gives zeros and zero gradients.
Dropout uses torch's RNG (the kernels use their own Philox stream, so the two paths do not draw
the same mask for the same seed).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_compile.relative_bias import relative_index

logger = logging.getLogger("sparse_compile")

_logged = False

# Score entries (summed over batch and heads) materialised at once per query chunk.
DEFAULT_MAX_SCORES = 1 << 24


def _log_once() -> None:
    global _logged
    if not _logged:
        _logged = True
        logger.warning(
            "sparse_compile: no GPU and TRITON_INTERPRET unset; attention runs on the chunked "
            "PyTorch path (correct, memory-bounded, slow)"
        )


def bias_as_4d(bias: torch.Tensor | None) -> torch.Tensor | None:
    """View ``bias`` (broadcastable to [B, H, Lq, Lk]) with exactly 4 dims (no copy)."""
    if bias is None:
        return None
    if bias.dim() > 4:
        raise ValueError(f"bias has {bias.dim()} dims; expected at most 4")
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _chunk_positions(rows: torch.Tensor, lq: int, lk: int, starts: torch.Tensor | None,
                     doc_bounds: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions [B|1, c, 1], key positions [B|1, c|1, Lk] and the keys each row may
    keep at all [B|1, c|1, Lk] for query rows ``rows`` [c] (sparse_compile.positions)."""
    cols = torch.arange(lk, device=rows.device, dtype=torch.int64)
    if doc_bounds is not None:
        first, last = (t[:, rows].to(torch.int64)[:, :, None] for t in doc_bounds)
        allowed = (cols >= first) & (cols <= last)
        return rows[None, :, None] - first, cols - first, allowed
    if starts is None:
        q_pos = (rows + (lk - lq))[None, :, None]
        return q_pos, cols[None, None, :], torch.ones_like(cols[None, None, :], dtype=torch.bool)
    q0, k0 = (starts[:, i].to(torch.int64)[:, None, None] for i in (0, 1))
    k_pos = cols[None, None, :] + k0
    return rows[None, :, None] + q0, k_pos, k_pos >= 0


def _with_position_bias(alibi: torch.Tensor | None, rel_bias: torch.Tensor | None,
                        rows: torch.Tensor, lq: int, lk: int, hkv: int, group: int,
                        starts: torch.Tensor | None,
                        doc_bounds: tuple[torch.Tensor, torch.Tensor] | None, keep: torch.Tensor,
                        bias: torch.Tensor | None, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, float bias) of a query chunk with ALiBi's ``slope * (k_pos - q_pos)`` and the
    relative table's entries (sparse_compile.relative_bias) added (a boolean bias moves into
    ``keep``): ``[B|1, Hkv|1, G|1, c, Lk]``, differentiable in the table."""
    q_pos, k_pos, _ = _chunk_positions(rows, lq, lk, starts, doc_bounds)
    added = torch.zeros((), device=rows.device, dtype=dtype)
    if alibi is not None:
        slopes = alibi.to(dtype).reshape(1, hkv, group, 1, 1)
        added = added + slopes * (k_pos - q_pos).to(dtype)[:, None, None]
    if rel_bias is not None:
        idx = relative_index(q_pos, k_pos, lq, lk).expand(-1, rows.shape[0], lk)
        terms = rel_bias.to(dtype)[:, idx].transpose(0, 1)          # [B|1, Hq|1, c, Lk]
        if terms.shape[1] == 1:
            terms = terms[:, :, None]
        else:
            terms = terms.reshape(terms.shape[0], hkv, group, *terms.shape[2:])
        added = added + terms
    if bias is None:
        return keep, added
    if bias.dtype == torch.bool:
        return keep & bias, added
    return keep, added + bias.to(dtype)


def _keep_chunk(pattern: Any, rows: torch.Tensor, lq: int, lk: int, hkv: int, group: int,
                starts: torch.Tensor | None,
                doc_bounds: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Keep mask of query rows ``rows`` [c]: [B|1, 1, 1, c, Lk], or [B|1, Hkv, G, c, Lk] per
    head."""
    q_pos, k_pos, allowed = _chunk_positions(rows, lq, lk, starts, doc_bounds)
    if getattr(pattern, "per_head", False):
        h_idx = torch.arange(hkv * group, device=rows.device, dtype=torch.int64)
        keep = pattern.evaluate(q_pos[:, None], k_pos[:, None], h_idx[None, :, None, None])
        keep = keep & allowed[:, None]
        return keep.reshape(keep.shape[0], hkv, group, *keep.shape[2:])
    return (pattern.evaluate(q_pos, k_pos) & allowed)[:, None, None]


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One query chunk, grouped by KV head.

    q [B, Hkv, G, c, D], k/v [B, Hkv, 1, Lk, D], keep [c, Lk] or [Hkv, G, c, Lk],
    bias None or broadcastable to [B, Hkv, G, c, Lk]. Returns [B, Hkv, G, c, D] float32.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            s = s + bias.to(s.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    max_scores: int = DEFAULT_MAX_SCORES,
    softcap: float = 0.0,
    starts: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pattern-sparse attention, chunked over queries.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] with Hq a multiple of Hkv (GQA by head
            grouping, query head h reads kv head h // (Hq // Hkv); K/V are never repeated).
        pattern: a static Pattern (anything with ``evaluate(q, k, h=None)``).
        scale: logit scale, default 1/sqrt(D).
        bias: additive float tensor or bool keep-mask broadcastable to [B, Hq, Lq, Lk].
        dropout_p: attention dropout probability (torch RNG).
        max_scores: bound on score entries held at once (over B·Hq·chunk·Lk).
        softcap: when > 0, logits are capped as softcap·tanh(scale·q·k / softcap) before the
            bias and the pattern (Gemma-2 style).
        starts, documents: where queries and keys sit, as the op takes them
            (sparse_compile.positions): ``[B or 1, 2]`` (q_start, k_start) or document ids
            ``[B or 1, L]``.
        alibi: None or ALiBi slopes ``[Hq]``: logits + slope * (k_pos - q_pos).
        rel_bias: None or a relative-bias table ``[Hq or 1, Lq + Lk - 1]``
            (sparse_compile.relative_bias), differentiable.

    Returns:
        [B, Hq, Lq, D] in q's dtype. Differentiable through plain torch ops.
    """
    _log_once()
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    qg = q.to(compute_dtype).reshape(b, hkv, group, lq, d)
    kg = k.to(compute_dtype).unsqueeze(2)
    vg = v.to(compute_dtype).unsqueeze(2)
    bias4 = bias_as_4d(bias)
    if bias4 is not None:
        # [B|1, Hq|1, Lq|1, Lk|1] -> [B|1, Hkv|1, G|1, Lq|1, Lk|1]
        if bias4.shape[1] == 1:
            bias5 = bias4.unsqueeze(2)
        else:
            bias5 = bias4.reshape(bias4.shape[0], hkv, group, *bias4.shape[2:])
    else:
        bias5 = None

    chunk = max(1, min(lq, max_scores // max(1, b * hq * lk)))
    doc_bounds = None
    if documents is not None:
        from sparse_compile.positions import document_bounds_of

        doc_bounds = document_bounds_of(documents.to(q.device), b)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, rel_bias)
    )
    outs = []
    for start in range(0, lq, chunk):
        stop = min(lq, start + chunk)
        rows = torch.arange(start, stop, device=q.device, dtype=torch.int64)
        keep = _keep_chunk(pattern, rows, lq, lk, hkv, group, starts, doc_bounds)
        bias_c = None
        if bias5 is not None:
            bias_c = bias5 if bias5.shape[3] == 1 else bias5[:, :, :, start:stop]
        if alibi is not None or rel_bias is not None:
            keep, bias_c = _with_position_bias(alibi, rel_bias, rows, lq, lk, hkv, group, starts,
                                               doc_bounds, keep, bias_c, compute_dtype)
        q_c = qg[:, :, :, start:stop]
        if needs_grad and chunk < lq:
            out = checkpoint(
                _chunk_attention, q_c, kg, vg, keep, bias_c, scale, dropout_p, softcap,
                use_reentrant=False,
            )
        else:
            out = _chunk_attention(q_c, kg, vg, keep, bias_c, scale, dropout_p, softcap)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out.reshape(b, hq, lq, d).to(q.dtype)
