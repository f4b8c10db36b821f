"""The dense oracle: pattern attention materialised in float64.

Every kernel, rewrite and pattern is checked against :func:`reference_attention`.
"""

from __future__ import annotations

import math

import torch

from sparse_compile.patterns import Pattern, PatternError, parse


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
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
    keep = torch.ones((lq, lk), dtype=torch.bool, device=q.device)
    if pattern is not None:
        keep = pattern.mask(lq, lk, heads=hq if pattern.per_head else None, device=q.device)
    keep = keep.expand(b, hq, lq, lk)
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
