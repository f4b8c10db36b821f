"""Dense float64 reference of DMA (trainable dynamic-mask sparse attention).

Semantics are those of ``DogeAttention.prepare_dynamic_mask`` in ``transformers``:

* ``delta`` ``[B, Hkv, Lk]`` is a per-key content score, broadcast over queries.
* Keys the model's mask removes (``causal``: key ``k`` > absolute query position
  ``p = q + Lk - Lq``; ``bias`` entries that are ``False`` / ``-inf`` / ``<= finfo.min``) are
  dropped.
* When ``Lk > keep``, each query row keeps the ``keep`` allowed keys with the largest ``delta``
  (all of them when fewer are allowed).
* Kept entries carry ``delta`` as an additive bias on the logits:
  ``out = softmax(scale * q k^T + bias + delta)`` over kept keys; a row with no kept key outputs 0.

Tie rule: among keys with equal ``delta`` the one with the LOWER index ranks first. This is the
rule of ``torch.topk`` on CUDA (radix select, then values equal to the k-th are gathered in index
order). ``torch.topk`` on CPU has no rule: which of several equal values it returns is an artefact
of ``std::nth_element``. ``keep_mask(..., rule="topk")`` reproduces whatever ``torch.topk`` picks
on the tensor's device, exactly as Doge does; ``rule="index"`` is the documented rule that the
kernels implement. The two agree whenever no tie straddles a row's ``keep``-th place.
"""

from __future__ import annotations

import math

import torch

__all__ = ["allowed_mask", "delta_rank", "keep_mask", "dma_reference"]


def allowed_mask(
    lq: int,
    lk: int,
    causal: bool,
    bias: torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Entries the model's own mask allows: bool ``[B|1, H|1, lq, lk]``.

    ``bias`` is a bool keep-mask or an additive float mask broadcastable to ``[B, H, lq, lk]``;
    float entries at or below ``finfo(dtype).min`` (Doge's ``min_dtype``) or ``-inf`` are removed.
    """
    allowed = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        p = torch.arange(lq, device=device)[:, None] + (lk - lq)
        allowed = allowed & (torch.arange(lk, device=device)[None, :] <= p)
    if bias is not None:
        allowed = allowed & bias_allows(bias).to(device)
    return allowed


def bias_allows(bias: torch.Tensor) -> torch.Tensor:
    """Bool tensor, same shape as ``bias``: which entries of a mask/bias are not removed."""
    if bias.dtype == torch.bool:
        return bias
    return bias > torch.finfo(bias.dtype).min


def delta_rank(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank keys by (delta descending, index ascending).

    delta: ``[..., Lk]``. Returns ``(rank, order)``, both int64 ``[..., Lk]``: ``order[r]`` is the
    key of rank ``r`` and ``rank[k]`` the rank of key ``k`` (0 = best).
    """
    order = torch.sort(delta, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(delta.shape[-1], device=delta.device).expand_as(order))
    return rank, order


def keep_mask(
    delta: torch.Tensor,
    allowed: torch.Tensor,
    keep: int,
    rule: str = "index",
) -> torch.Tensor:
    """Dense keep-mask of DMA: bool ``[B, H, Lq, Lk]``.

    delta: ``[B, H, Lk]``; allowed: bool broadcastable to ``[B, H, Lq, Lk]``; keep >= 1.
    ``rule="index"``: ties broken by lower key index; ``rule="topk"``: exactly Doge's
    ``torch.topk(..., sorted=False)`` on the masked scores (device-dependent among ties).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    b, h, lk = delta.shape
    lq = allowed.shape[-2]
    allowed = allowed.expand(b, h, lq, lk)
    if lk <= keep:
        return allowed.clone()
    if rule == "topk":
        low = torch.finfo(delta.dtype).min
        scores = delta[:, :, None, :].expand(b, h, lq, lk).masked_fill(~allowed, low)
        picked = torch.topk(scores, keep, dim=-1, largest=True, sorted=False).indices
        chosen = torch.zeros_like(allowed).scatter(-1, picked, True)
        return chosen & allowed
    if rule != "index":
        raise ValueError(f"unknown tie rule {rule!r}")
    rank, order = delta_rank(delta)
    # Walk keys in rank order; a row keeps an allowed key while fewer than `keep` allowed keys
    # of better rank precede it.
    allowed_by_rank = allowed.gather(-1, order[:, :, None, :].expand(b, h, lq, lk))
    kept_by_rank = allowed_by_rank & (allowed_by_rank.cumsum(-1) <= keep)
    return kept_by_rank.gather(-1, rank[:, :, None, :].expand(b, h, lq, lk))


def dma_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    keep: int,
    causal: bool = True,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    rule: str = "index",
) -> torch.Tensor:
    """DMA attention in float64, materialising everything. Differentiable in q, k, v, delta.

    q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``, delta ``[B, Hkv, Lk]`` (Hq a multiple of Hkv,
    query head ``h`` uses kv head ``h // (Hq // Hkv)``); bias broadcastable to
    ``[B, Hq, Lq, Lk]`` (bool keep-mask or additive float). Selection is made on ``delta`` in
    its own dtype. Returns ``[B, Hq, Lq, D]`` float64.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    allowed = allowed_mask(lq, lk, causal, bias, q.device)
    allowed_kv = allowed.expand(b, hq, lq, lk).reshape(b, hkv, group, lq, lk)
    # Doge builds the selection per kv head from a mask shared by its query heads.
    kept = keep_mask(delta, allowed_kv[:, :, 0], keep, rule)
    kept = kept[:, :, None].expand(b, hkv, group, lq, lk).reshape(b, hq, lq, lk)
    kept = kept & allowed.expand(b, hq, lq, lk)
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    dd = delta.double().repeat_interleave(group, dim=1)
    logits = scale * q.double() @ kk.transpose(-1, -2) + dd[:, :, None, :]
    if bias is not None and bias.dtype != torch.bool:
        logits = logits + torch.where(bias_allows(bias), bias.double(), 0.0)
    logits = logits.masked_fill(~kept, float("-inf"))
    row_max = logits.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, 1.0)
    return probs @ vv
