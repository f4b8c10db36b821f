"""Public functional entry point: ``attention(q, k, v, pattern, ...)``."""

from __future__ import annotations

from typing import Any

import torch

from .fallback import chunked_attention


def _as_pattern(pattern: Any) -> Any:
    if isinstance(pattern, str):
        from sparse_compile.patterns import parse

        return parse(pattern)
    return pattern


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Pattern-sparse scaled dot-product attention.

    Computes ``softmax(scale · Q Kᵀ + bias + where(keep, 0, −inf)) V`` where ``keep`` is the
    pattern's predicate at absolute query position ``q + Lk − Lq`` (bottom-right alignment).
    Rows with no kept key return zeros.

    Args:
        q: [B, Hq, Lq, D] float16 / bfloat16 / float32, any strides.
        k, v: [B, Hkv, Lk, D], Hq a multiple of Hkv (GQA / MQA; query head h uses kv head
            h // (Hq // Hkv)).
        pattern: a Pattern or its DSL text (e.g. ``"causal & sliding(1024)"``).
        scale: logit scale; default 1/sqrt(D).
        bias: optional additive float tensor or boolean keep-mask broadcastable to
            [B, Hq, Lq, Lk].
        dropout_p: attention dropout probability (applied whenever > 0).

    Returns:
        [B, Hq, Lq, D] in q's dtype.

    Example:
        >>> q = torch.randn(1, 4, 128, 64); k = v = torch.randn(1, 2, 128, 64)
        >>> out = attention(q, k, v, "causal & sliding(32)")
    """
    pattern = _as_pattern(pattern)
    return chunked_attention(q, k, v, pattern, scale=scale, bias=bias, dropout_p=dropout_p)
