"""DMA (trainable dynamic-mask sparse attention): the public functions.

``dma_attention`` runs the fused Triton kernels when the mask depends on the key only (causal
and/or key padding), and the chunked PyTorch path otherwise (any ``[B, H, Lq, Lk]`` mask, or
no Triton available). Semantics, including the tie rule, are in
``sparse_compile.dynamic_mask.reference``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from sparse_compile.dynamic_mask.attach import attach_dma
from sparse_compile.dynamic_mask.chunked import dma_attention_chunked
from sparse_compile.dynamic_mask.reference import bias_allows

__all__ = ["dma_attention", "dma_delta", "key_only_mask", "attach_dma"]

log = logging.getLogger("sparse_compile")


def dma_delta(
    v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor
) -> torch.Tensor:
    """Doge's content score ``exp(A * softplus(V_flat W^T + b))``.

    v ``[B, Hkv, Lk, D]``; weight ``[Hkv, Hkv * D]``; bias ``[Hkv]`` or None; a ``[Hkv]``.
    Returns delta ``[B, Hkv, Lk]``.
    """
    b, h, lk, d = v.shape
    flat = v.transpose(1, 2).reshape(b, lk, h * d)
    return torch.exp(a * F.softplus(F.linear(flat, weight, bias))).transpose(-1, -2)


def key_only_mask(
    bias: torch.Tensor | None, batch: int, lk: int
) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """Split a mask that depends on (batch, key) only into ``(ok, key_allowed, key_add)``.

    bias: None, or bool/float broadcastable to ``[B, H, Lq, Lk]`` whose head and query dims are
    1 (shapes ``[Lk]``, ``[B, Lk]``... are read as trailing dims). Returns ``ok=False`` when the
    mask varies over queries or heads. key_allowed bool ``[B, Lk]``; key_add float32 ``[B, Lk]``
    with 0 at removed keys (None for bool masks).
    """
    if bias is None:
        return True, None, None
    if bias.dim() > 4 or (bias.dim() >= 2 and bias.shape[-2] != 1):
        if bias.dim() != 2:
            return False, None, None
    full = bias
    if full.dim() == 2:  # [B, Lk]
        full = full[:, None, None, :]
    while full.dim() < 4:
        full = full.unsqueeze(0)
    if full.shape[1] != 1 or full.shape[2] != 1:
        return False, None, None
    keys = full[:, 0, 0, :].expand(batch, lk)
    allowed = bias_allows(keys).contiguous()
    add = None
    if keys.dtype != torch.bool:
        add = torch.where(allowed, keys.float(), 0.0).contiguous()
    return True, allowed, add


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _fits_grid(q: torch.Tensor) -> bool:
    """The fused kernels launch one program row per (batch, query head): CUDA allows 65535.
    Beyond that the chunked path runs, with a warning (it is slower, not different)."""
    from sparse_compile.codegen.launch.config import MAX_GRID_Y

    if q.shape[0] * q.shape[1] <= MAX_GRID_Y:
        return True
    log.warning("dma_attention: batch x query heads = %d exceeds the fused kernels' grid "
                "limit (%d); running the chunked PyTorch path", q.shape[0] * q.shape[1],
                MAX_GRID_Y)
    return False


def dma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    keep: int,
    causal: bool = True,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Trainable dynamic-mask sparse attention (Doge's DMA), forward and backward.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA).
        delta: ``[B, Hkv, Lk]`` per-key content score (``dma_delta``), shared by the query heads
            of a kv head; added to the logits of kept entries; differentiable.
        keep: keys kept per query row (>= 1); when ``Lk <= keep`` all allowed keys are kept.
        causal: drop key ``k`` for absolute query position ``q + Lk - Lq`` < ``k``.
        bias: the model's mask: bool keep-mask or additive float (entries <= finfo.min or -inf
            are removed) broadcastable to ``[B, Hq, Lq, Lk]``; a ``[B, Lk]`` tensor is a key
            padding mask. Key-only masks run fused; others take the chunked path.
        scale: logit scale, ``1/sqrt(D)`` by default.

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype; rows with no kept key are 0. Never builds Lq x Lk.

    Example:
        >>> delta = dma_delta(v, proj.weight, proj.bias, A)
        >>> out = dma_attention(q, k, v, delta, keep=2048)
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ok, key_allowed, key_add = key_only_mask(bias, q.shape[0], k.shape[2])
    if ok and _triton_usable(q.device) and q.shape[-1] >= 16 and _fits_grid(q):
        from sparse_compile.dynamic_mask.op import dma_attention_fused

        return dma_attention_fused(q, k, v, delta, keep, causal, key_allowed, key_add, scale)
    if bias is not None and bias.dim() == 2:
        bias = bias[:, None, None, :]
    return dma_attention_chunked(q, k, v, delta, keep, causal, bias, scale)
