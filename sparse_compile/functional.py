"""Public functional entry point: ``attention(q, k, v, pattern, ...)``."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from sparse_compile.eager import fast_path_applies, kernel_attention
from sparse_compile.op import attention_op, check_heads
from sparse_compile.positions import check_documents, starts_tensor
from sparse_compile.relative_bias import check_table


@lru_cache(maxsize=512)
def _canonical_text(text: str) -> str:
    from sparse_compile.codegen.attention import parse_pattern

    return str(parse_pattern(text))


@torch.compiler.assume_constant_result
def _pattern_text(pattern: Any) -> str:
    """Canonical DSL text of a Pattern or of DSL text (parsed, so errors surface here)."""
    return _canonical_text(pattern if isinstance(pattern, str) else str(pattern))


def _is_dynamic(text: str) -> bool:
    """Whether canonical pattern text holds ``dma(...)`` or ``topk(...)``."""
    return "dma(" in text or "topk(" in text


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    delta: torch.Tensor | None = None,
    softcap: float | None = None,
    q_start: int | torch.Tensor | None = None,
    k_start: int | torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pattern-sparse scaled dot-product attention.

    Computes ``softmax(scale · Q Kᵀ + bias + where(keep, 0, −inf)) V`` where ``keep`` is the
    pattern's predicate at the queries' and keys' positions: query row ``i`` at
    ``q_start + i`` (default ``Lk − Lq``: bottom-right alignment), key ``j`` at
    ``k_start + j`` (default 0), or positions inside each document (``documents``;
    sparse_compile.positions); with ``softcap`` the logits ``scale · Q Kᵀ`` are first capped to
    ``softcap · tanh(scale · Q Kᵀ / softcap)`` (Gemma 2).
    Rows with no kept key return zeros (and zero gradients).

    Runs the generated Triton kernels on CUDA tensors, and on CPU tensors when
    ``TRITON_INTERPRET=1``; otherwise the chunked PyTorch path (sparse_compile.fallback).
    Differentiable in q, k, v and in a float ``bias`` that requires grad. Dropout draws its
    seed from torch's default CPU generator (``torch.manual_seed`` makes it reproducible).

    Args:
        q: [B, Hq, Lq, D] float16 / bfloat16 / float32, any strides.
        k, v: [B, Hkv, Lk, D], Hq a multiple of Hkv (GQA / MQA; query head h uses kv head
            h // (Hq // Hkv)).
        pattern: a Pattern or its DSL text (e.g. ``"causal & sliding(1024)"``).
        scale: logit scale; default 1/sqrt(D).
        bias: optional additive float tensor or boolean keep-mask broadcastable to
            [B, Hq, Lq, Lk].
        dropout_p: attention dropout probability (applied whenever > 0).
        delta: DMA content score ``[B, Hkv, Lk]`` (``dma_delta``), required by ``dma(keep)``.
            Dynamic patterns (``dma(keep)``, ``topk(k, block)``, each alone or ``& causal``)
            run through ``sparse_compile.dynamic_mask.dispatch``; they take no dropout.
        softcap: logit soft-capping constant (> 0), or None for none.
        q_start, k_start: positions of query row 0 and of key 0: an int or an integer tensor
            ``[B]`` / 0-dim (a static cache's fill level, left padding). Keys at negative
            positions are never kept.
        documents: integer ids ``[B, L]`` or ``[L]`` of packed sequences (Lq = Lk): attention
            stays inside each document, positions count from its first token, negative ids
            are padding (never attended, their rows output zeros). Checked here (one host
            synchronisation); bad ids raise ``PositionError``. Dynamic patterns (``dma``,
            ``topk``) select within each document: they run each document as its own
            sequence (one launch per document, the boundaries read on the host).
        alibi: ALiBi slopes, a float tensor ``[Hq]`` (or one slope for every head): the
            logits of query head ``h`` get ``alibi[h] * (k_pos - q_pos)`` (the positions
            above; computed in the kernels, nothing Lq x Lk is built). Not differentiated.
        rel_bias: a relative-position bias table, float ``[Hq, Lq + Lk - 1]`` (or ``[1, ...]``
            / ``[Lq + Lk - 1]``: one row for every head): the logits of query head ``h`` get
            ``rel_bias[h, clamp(q_pos - k_pos + Lq - 1, 0, Lq + Lk - 2)]`` at the positions
            above, i.e. ``rel_bias[h, i - j + Lk - 1]`` for query row ``i`` and key ``j`` in
            the default alignment and inside documents (sparse_compile.relative_bias).
            Computed in the kernels (nothing Lq x Lk is built) and differentiable: its
            gradient is a deterministic reduction of dS per diagonal.

    Returns:
        [B, Hq, Lq, D] in q's dtype.

    Raises:
        ValueError: Hq is not a multiple of Hkv (or k and v differ in heads), or ``alibi`` /
            ``rel_bias`` do not match the heads and lengths.

    Example:
        >>> q = torch.randn(1, 4, 128, 64); k = v = torch.randn(1, 2, 128, 64)
        >>> out = attention(q, k, v, "causal & sliding(32)")
    """
    text = _pattern_text(pattern)
    check_heads(q, k, v)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    if _is_dynamic(text):
        if softcap is not None:
            raise NotImplementedError(f"softcap with the dynamic pattern {text!r}")
        if (q_start is not None or k_start is not None or alibi is not None
                or rel_bias is not None):
            raise NotImplementedError(
                f"positions, ALiBi or a relative-bias table with the dynamic pattern {text!r}")
        from sparse_compile.dynamic_mask.dispatch import dynamic_attention

        def run(q, k, v, delta, bias):
            return dynamic_attention(q, k, v, text, scale, bias, dropout_p, delta)

        if documents is None:
            return run(q, k, v, delta, bias)
        from sparse_compile.dynamic_mask.documents import per_document

        ids = check_documents(documents.to(q.device), q.shape[0], q.shape[2], k.shape[2])
        return per_document(q, k, v, ids, delta, bias, run)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if documents is not None:
        if q_start is not None or k_start is not None:
            raise ValueError("documents set every position: q_start / k_start do not apply")
        documents = check_documents(documents.to(q.device), b, lq, lk)
    starts = starts_tensor(q_start, k_start, b, lq, lk, q.device)
    return _static_attention(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents,
                             _alibi_slopes(alibi, q), _rel_table(rel_bias, q, k))


def _alibi_slopes(alibi: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The slopes as the kernels read them: float32 ``[Hq]`` on q's device."""
    if alibi is None:
        return None
    if not isinstance(alibi, torch.Tensor) or not alibi.is_floating_point():
        raise ValueError(f"alibi must be a float tensor of slopes, got {alibi!r}")
    slopes = alibi.detach().to(device=q.device, dtype=torch.float32).reshape(-1)
    if slopes.numel() == 1:
        slopes = slopes.expand(q.shape[1])
    if slopes.numel() != q.shape[1]:
        raise ValueError(f"alibi has {slopes.numel()} slopes for {q.shape[1]} query heads")
    return slopes.contiguous()


def _rel_table(rel_bias: torch.Tensor | None, q: torch.Tensor,
               k: torch.Tensor) -> torch.Tensor | None:
    """The table as the kernels read it: float32 ``[Hq or 1, Lq + Lk - 1]`` on q's device,
    unit stride along the table (differentiable)."""
    if rel_bias is None:
        return None
    table = check_table(rel_bias, q.shape[1], q.shape[2], k.shape[2])
    return table.to(device=q.device, dtype=torch.float32).contiguous()


def placed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Any,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    q_start: int | torch.Tensor | None = None,
    k_start: int | torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attention`` of a static pattern with positions or documents read from a model's graph
    (sparse_compile.fx.model_mask): the backend's rewrite calls it. The document ids are
    trusted (built by the model as non-decreasing runs; ``[B, L']`` or ``[L']`` with
    ``L' >= Lk``, the first ``Lk`` used) and not checked, so nothing synchronises with the host
    and the call traces into graphs and CUDA graphs."""
    text = _pattern_text(pattern)
    check_heads(q, k, v)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if documents is not None and documents.dim() == 3:  # bounds prepared once per graph
        documents = documents[..., :lk]
    elif documents is not None:
        documents = documents.to(q.device).reshape(-1, documents.shape[-1])[:, :lk]
    starts = starts_tensor(q_start, k_start, b, lq, lk, q.device)
    return _static_attention(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents,
                             _alibi_slopes(alibi, q), _rel_table(rel_bias, q, k))


def check_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """Reject a bias the kernels and the reference would not read alike: one that is neither a
    float tensor (added to the logits) nor a bool keep-mask (an integer tensor is ambiguous),
    or that does not broadcast to ``[B, Hq, Lq, Lk]`` (a bias per key/value head of a GQA
    model, say), with an error that names the problem."""
    if bias is None:
        return
    if not (bias.dtype == torch.bool or bias.is_floating_point()):
        raise TypeError(f"bias must be a float tensor (added to the logits) or a bool "
                        f"keep-mask, got {bias.dtype}")
    if bias.dim() > 4:
        raise ValueError(f"bias has {bias.dim()} dims; expected at most 4")
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    for name, got, size in zip(("batch", "query heads", "query rows", "keys"), shape, want,
                               strict=True):
        if got != 1 and got != size:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"[B, Hq, Lq, Lk] = {want}: {got} {name} where {size} (or 1) "
                             f"are expected")


def _static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: str,
                      scale: float | None, bias: torch.Tensor | None, dropout_p: float,
                      softcap: float | None, starts: torch.Tensor | None,
                      documents: torch.Tensor | None,
                      alibi: torch.Tensor | None = None,
                      rel_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels (eagerly, without the op's dispatch) or the custom op (traced)."""
    check_bias(bias, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    if fast_path_applies(q, k, v, bias, starts, documents, alibi, rel_bias):
        return kernel_attention(q, k, v, bias, text, scale, float(dropout_p),
                                0 if seed is None else int(seed), float(softcap or 0.0),
                                starts, documents, alibi, rel_bias)
    out, _ = attention_op(q, k, v, bias, text, scale, float(dropout_p), seed,
                          float(softcap or 0.0), starts, documents, alibi, rel_bias)
    return out
