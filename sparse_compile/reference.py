"""The dense oracle: pattern attention materialised in float64.

Every kernel, rewrite and pattern is checked against :func:`reference_attention`.
"""

from __future__ import annotations

import math

import torch

from sparse_compile.patterns import Pattern, PatternError, parse
from sparse_compile.relative_bias import check_table, relative_index


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    q_start: int | torch.Tensor | None = None,
    k_start: int | torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias + where(keep, 0, -inf)) v`` in float64.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (``Dv`` may differ from ``D`` for v),
            with ``Hq`` a multiple of ``Hkv`` (grouped-query attention: query head ``h`` reads
            kv head ``h // (Hq // Hkv)``).
        pattern: a static :class:`Pattern` or DSL text; None means dense. Query ``i`` sits at
            absolute position ``i + Lk - Lq`` (bottom-right alignment). Per-head patterns give
            query head ``h`` the pattern ``h % num_heads``.
        scale: logit scale, default ``1 / sqrt(D)``.
        bias: broadcastable to ``[B, Hq, Lq, Lk]``; a bool tensor is a keep-mask (False drops the
            entry), any other dtype is added to the logits.
        q_start, k_start: positions of query row 0 and of key 0 (an int, or an integer tensor
            ``[B]`` / 0-dim); default ``Lk - Lq`` and 0. Keys at negative positions are never
            kept.
        documents: integer ids ``[B, L]`` or ``[L]`` (Lq = Lk = L): a row keeps only keys of
            its own document (a run of equal non-negative ids), positions count from the
            document's first token, and a negative id (padding) is never kept nor keeps.
        alibi: ALiBi slopes ``[Hq]``: query head ``h``'s logits get
            ``alibi[h] * (k_pos - q_pos)`` at the positions above.
        rel_bias: relative-position bias table ``[Hq or 1, Lq + Lk - 1]``: query head ``h``'s
            logits get ``rel_bias[h, clamp(q_pos - k_pos + Lq - 1, 0, Lq + Lk - 2)]``
            (sparse_compile.relative_bias).

    Returns:
        ``[B, Hq, Lq, Dv]`` float64. A row with no kept key (pattern and bias together) is zero.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, L, D]")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if isinstance(pattern, str):
        pattern = parse(pattern)
    if pattern is not None and pattern.is_dynamic:
        raise PatternError(f"'{pattern}' is dynamic: the dense reference needs a static pattern")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64 = (t.detach().to(torch.float64) for t in (q, k, v))
    group = hq // hkv
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    logits = scale * (q64 @ k64.transpose(-1, -2))  # [B, Hq, Lq, Lk]
    keep = kept_mask(pattern, b, hq, lq, lk, q.device, q_start, k_start, documents)
    if alibi is not None:
        q_pos, k_pos = position_grid(b, lq, lk, q.device, q_start, k_start, documents)
        slopes = alibi.detach().to(device=q.device, dtype=torch.float64).reshape(1, -1, 1, 1)
        logits = logits + slopes * (k_pos - q_pos)[:, None].to(torch.float64)
    if rel_bias is not None:
        logits = logits + relative_logits(rel_bias.detach(), b, hq, lq, lk, q.device, q_start,
                                          k_start, documents)
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = keep & bias.to(q.device)
        else:
            logits = logits + bias.to(device=q.device, dtype=torch.float64)
    logits = logits.masked_fill(~keep, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    empty = torch.isneginf(row_max)
    weights = torch.exp(logits - torch.where(empty, 0.0, row_max))
    denom = weights.sum(-1, keepdim=True)
    probs = torch.where(empty, 0.0, weights / torch.where(empty, 1.0, denom))
    return probs @ v64


def relative_logits(rel_bias: torch.Tensor, b: int, hq: int, lq: int, lk: int,
                    device: torch.device, q_start: int | torch.Tensor | None = None,
                    k_start: int | torch.Tensor | None = None,
                    documents: torch.Tensor | None = None) -> torch.Tensor:
    """The relative-bias table's logit terms ``[B, Hq, Lq, Lk]`` float64 at the positions
    ``reference_attention`` takes (differentiable in the table; materialises Lq x Lk)."""
    table = check_table(rel_bias, hq, lq, lk).to(device=device, dtype=torch.float64)
    q_pos, k_pos = position_grid(b, lq, lk, device, q_start, k_start, documents)
    idx = relative_index(q_pos, k_pos, lq, lk).expand(b, lq, lk)
    return table[:, idx].transpose(0, 1).expand(b, hq, lq, lk)


def _starts(start: int | torch.Tensor | None, default: int, b: int,
            device: torch.device) -> torch.Tensor:
    """``[B, 1]`` int64 starting positions."""
    if start is None:
        start = default
    return torch.as_tensor(start, dtype=torch.int64, device=device).reshape(-1, 1).expand(b, 1)


def _document_starts(ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of the first token of its run of equal ids (a plain loop)."""
    starts = torch.zeros_like(ids, dtype=torch.int64)
    for i in range(1, ids.shape[1]):
        same = ids[:, i] == ids[:, i - 1]
        starts[:, i] = torch.where(same, starts[:, i - 1], i)
    return starts


def position_grid(b: int, lq: int, lk: int, device: torch.device,
                  q_start: int | torch.Tensor | None = None,
                  k_start: int | torch.Tensor | None = None,
                  documents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions ``[B, Lq, 1]`` and key positions ``[B, Lq or 1, Lk]``."""
    rows = torch.arange(lq, device=device, dtype=torch.int64)
    cols = torch.arange(lk, device=device, dtype=torch.int64)
    if documents is not None:
        ids = documents.to(device=device, dtype=torch.int64).reshape(-1, lk).expand(b, lk)
        first = _document_starts(ids)
        return (rows - first)[:, :, None], cols[None, None, :] - first[:, :, None]
    q_pos = (rows[None, :] + _starts(q_start, lk - lq, b, device))[:, :, None]
    return q_pos, (cols[None, :] + _starts(k_start, 0, b, device))[:, None, :]


def kept_mask(pattern: Pattern | None, b: int, hq: int, lq: int, lk: int, device: torch.device,
              q_start: int | torch.Tensor | None = None, k_start: int | torch.Tensor | None = None,
              documents: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bool keep mask ``[B, Hq, Lq, Lk]`` of ``pattern`` (None: dense) at the positions
    ``reference_attention`` takes; materialises Lq x Lk, for tests and small sizes."""
    rows = torch.arange(lq, device=device, dtype=torch.int64)
    cols = torch.arange(lk, device=device, dtype=torch.int64)
    if documents is not None:
        if lq != lk:
            raise ValueError("documents need Lq == Lk")
        ids = documents.to(device=device, dtype=torch.int64).reshape(-1, lk).expand(b, lk)
        first = _document_starts(ids)
        q_pos = (rows - first)[:, :, None]                        # [B, Lq, 1]
        k_pos = cols[None, None, :] - first[:, :, None]           # [B, Lq, Lk]
        allowed = ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
                   & (ids[:, None, :] >= 0))
    else:
        q_pos = (rows[None, :] + _starts(q_start, lk - lq, b, device))[:, :, None]
        k_pos = (cols[None, :] + _starts(k_start, 0, b, device))[:, None, :]
        allowed = (k_pos >= 0).expand(b, lq, lk)
    if pattern is None:
        return allowed[:, None].expand(b, hq, lq, lk)
    if pattern.per_head:
        heads = torch.arange(hq, device=device, dtype=torch.int64)[None, :, None, None]
        keep = pattern.evaluate(q_pos[:, None], k_pos[:, None], heads)
    else:
        keep = pattern.evaluate(q_pos, k_pos)[:, None]
    return (keep & allowed[:, None]).expand(b, hq, lq, lk)
