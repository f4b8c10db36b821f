"""Running a dynamic pattern (``dma(keep)`` or ``topk(k, block)``, optionally ``& causal``).

Shared by ``sparse_compile.attention`` (text patterns) and the backend's rewrite of generic
attention sites. The model's mask reaches the dynamic op as it is: ``causal`` as a flag, a
``[B, Lk]`` key mask, or a dense ``[B|1, 1, Lq, Lk]`` mask whose structure (causal and key
padding or not) is examined at run time inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DynamicPattern", "MissingDeltaError", "split_dynamic", "dynamic_attention"]


class MissingDeltaError(ValueError, NotImplementedError):
    """``dma(keep)`` was asked for without its content score ``delta``. A ValueError; also a
    NotImplementedError, which is what ``attention()`` raised for every dynamic pattern before
    they ran."""


@dataclass(frozen=True)
class DynamicPattern:
    """A dynamic primitive, optionally intersected with ``causal``."""

    kind: str  # "dma" or "topk"
    keep: int = 0  # dma
    k_blocks: int = 0  # topk
    block: int = 128  # topk
    causal: bool = False


def split_dynamic(pattern: object) -> DynamicPattern:
    """Read ``dma(...)`` / ``topk(...)`` with optional ``& causal`` conjuncts.

    Raises ``ValueError`` for anything else (unions, negations, per-head patterns, other
    static conjuncts): the runtimes implement exactly these forms.
    """
    from sparse_compile.patterns import Pattern, causal, parse
    from sparse_compile.patterns.primitives import Dma, TopK

    parsed = pattern if isinstance(pattern, Pattern) else parse(str(pattern))
    parts, todo = [], [parsed]
    while todo:
        node = todo.pop()
        if type(node).__name__ == "And":
            todo.extend(node.children())
        else:
            parts.append(node)
    dynamic = [p for p in parts if isinstance(p, (Dma, TopK))]
    others = [p for p in parts if not isinstance(p, (Dma, TopK))]
    if len(dynamic) != 1 or any(p != causal for p in others):
        raise ValueError(
            f"dynamic pattern {str(parsed)!r} not supported: use dma(keep) or topk(k, block), "
            "alone or '& causal'"
        )
    prim, is_causal = dynamic[0], bool(others)
    if isinstance(prim, Dma):
        return DynamicPattern("dma", keep=prim.keep, causal=is_causal)
    return DynamicPattern("topk", k_blocks=prim.k, block=prim.block, causal=is_causal)


def _dense_model_mask(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``bias`` is a ``[B|1, 1, Lq, Lk]`` mask (the kind models hand to attention)."""
    return (bias is not None and bias.dim() == 4 and bias.shape[1] == 1
            and bias.shape[0] in (1, q.shape[0]))


def dynamic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: object,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with a dynamic pattern; shapes as ``sparse_compile.attention``.

    ``dma(keep)`` needs ``delta [B, Hkv, Lk]`` (``dma_delta``); ``topk`` ignores it. ``bias``:
    the model's mask (bool or additive), see the module doc; with ``topk`` it must be causal
    and/or key padding (checked at run time).
    """
    import math

    spec = split_dynamic(pattern)
    if dropout_p > 0.0:
        raise ValueError(f"{spec.kind} patterns do not support attention dropout")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if spec.kind == "dma":
        return _dma(q, k, v, spec, scale, bias, delta)
    return _topk(q, k, v, spec, scale, bias)


def _dma(q, k, v, spec, scale, bias, delta):
    from sparse_compile.dynamic_mask.functional import dma_attention
    from sparse_compile.dynamic_mask.masked import dma_attention_masked

    if delta is None:
        raise MissingDeltaError(
            "dma(keep=...) needs the content score: pass delta=dma_delta(v, W, b, A) "
            "([B, Hkv, Lk]), or attach_dma(model) and compile with backend='sparse'"
        )
    if delta.shape != (k.shape[0], k.shape[1], k.shape[2]):
        raise ValueError(f"delta must be [B, Hkv, Lk] = {tuple(k.shape[:3])}, "
                         f"got {tuple(delta.shape)}")
    if not spec.causal and _dense_model_mask(bias, q, k):
        mask = bias.expand(q.shape[0], 1, q.shape[2], k.shape[2])
        return dma_attention_masked(q, k, v, delta, mask, spec.keep, scale)
    return dma_attention(q, k, v, delta, spec.keep, spec.causal, bias, scale)


def _topk(q, k, v, spec, scale, bias):
    from sparse_compile.dynamic_mask.topk import topk_attention, topk_attention_masked

    if bias is None:
        return topk_attention(q, k, v, spec.k_blocks, spec.block, spec.causal, scale)
    if bias.dim() == 2 and bias.dtype == torch.bool:  # [B, Lk] key padding
        return topk_attention(q, k, v, spec.k_blocks, spec.block, spec.causal, scale, bias)
    if not spec.causal and _dense_model_mask(bias, q, k):
        mask = bias.expand(q.shape[0], 1, q.shape[2], k.shape[2])
        return topk_attention_masked(q, k, v, mask, spec.k_blocks, spec.block, scale)
    raise ValueError(
        "topk patterns take the model's mask as causal, a [B, Lk] bool key mask, or a "
        f"[B, 1, Lq, Lk] causal & key-padding mask; got a mask of shape {tuple(bias.shape)}"
    )
