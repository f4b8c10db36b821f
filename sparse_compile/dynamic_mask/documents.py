"""Dynamic patterns (``dma``, ``topk``) inside packed documents: each document on its own.

A dynamic pattern's selection ranks every key a query row may see, so inside packed documents
it must rank only the row's own document, with positions (causal order, ``topk``'s block grid)
counted from the document's first token. Running each document through the dynamic kernels as
its own sequence gives exactly that, which is the packed-documents semantics by definition.
It is the general route: reading the boundaries costs one host synchronisation per call and
each document is one launch, unlike the static patterns, whose block tables are built from the
ids on the GPU. Padding (negative ids) attends nothing and outputs zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

__all__ = ["document_spans", "per_document"]

log = logging.getLogger("sparse_compile")

Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                torch.Tensor | None], torch.Tensor]


def document_spans(ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the ``(start, end)`` of each document (non-negative id) of ``ids [B, L]``,
    in order. Reads the ids on the host."""
    spans = []
    for row in ids.detach().cpu():
        values, counts = torch.unique_consecutive(row, return_counts=True)
        ends = counts.cumsum(0).tolist()
        starts = [0] + ends[:-1]
        spans.append([(s, e) for s, e, doc in zip(starts, ends, values.tolist(), strict=True)
                      if doc >= 0])
    return spans


def per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor,
                 delta: torch.Tensor | None, bias: torch.Tensor | None, run: Run) -> torch.Tensor:
    """``run`` on each document of ``ids`` as its own sequence, outputs placed back.

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, ids ``[B or 1, L]`` (checked by
    ``check_documents``), delta ``[B, Hkv, L]`` or None, bias None, a ``[B or 1, L]`` key mask
    or broadcastable to ``[B, H, L, L]``. ``run(q, k, v, delta, bias)`` computes one document's
    attention. Returns ``[B, Hq, L, Dv]``; rows of padding are zeros. Differentiable.
    """
    batch, length = q.shape[0], q.shape[2]
    log.debug("dynamic pattern inside documents: one launch per document (general route)")
    rows = []
    for b, spans in enumerate(document_spans(ids.expand(batch, length))):
        pieces, cursor = [], 0
        for start, end in spans:
            if start > cursor:
                pieces.append(_zeros(q, v, start - cursor))
            part = slice(start, end)
            pieces.append(run(q[b:b + 1, :, part], k[b:b + 1, :, part], v[b:b + 1, :, part],
                              None if delta is None else delta[b:b + 1, :, part],
                              _bias_of(bias, b, part)))
            cursor = end
        if cursor < length:
            pieces.append(_zeros(q, v, length - cursor))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def _zeros(q: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    return q.new_zeros(1, q.shape[1], length, v.shape[-1])


def _bias_of(bias: torch.Tensor | None, b: int, part: slice) -> torch.Tensor | None:
    """The model's mask restricted to batch row ``b`` and one document's rows and keys."""
    if bias is None:
        return None
    row = slice(b, b + 1) if bias.shape[0] > 1 else slice(0, 1)
    if bias.dim() == 2:
        return bias[row, part]
    if bias.dim() == 4:
        queries = part if bias.shape[2] > 1 else slice(None)
        return bias[row, :, queries, part]
    raise ValueError(f"with documents, a dynamic pattern's mask must be [B, L] or "
                     f"[B, H, L, L]; got shape {tuple(bias.shape)}")
