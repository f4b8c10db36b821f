"""Where the queries and keys of one call sit, as the kernels read it (their ``POS_MODE``).

A pattern is a predicate of query and key *positions*. By default query row ``i`` sits at
``i + Lk - Lq`` and key ``j`` at ``j`` (bottom-right alignment). A ``Frame`` says otherwise:

* mode 0, fixed starts: query row ``i`` at ``q_first + i``, key ``j`` at ``k_first + j``;
* mode 1, per-batch starts read on the device (``starts`` ``[B or 1, 2]`` int32 holding
  ``(q_start, k_start)``, added to the fixed ones): a static cache's fill level, left padding,
  a shard of a longer sequence. Nothing is read on the host, so CUDA graphs replay it;
* mode 2, documents: each row's positions count from its document's first token and it keeps
  keys of its own document only (``doc_start`` / ``doc_end``, ``[B, L]`` int32 key indices,
  an empty ``[i, i - 1]`` for padding rows).

Keys at negative positions are never kept. Block tables are built for the default alignment
only, so a non-default frame runs interval patterns in closed form and the others on their hull
(``codegen/tl/predicate.py``) with the predicate on every visited block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sparse_compile.codegen.launch.tables import placeholder

# POS_MODE values of the kernels (codegen/tl/visit.py ``_row_frame``).
FIXED, PER_BATCH, DOCUMENTS = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Frame:
    """One call's positions: ``mode`` and the arguments of that mode (see the module doc).
    ``q_first`` None means ``Lk - Lq``."""

    mode: int = FIXED
    q_first: int | None = None
    k_first: int = 0
    starts: torch.Tensor | None = None
    doc_start: torch.Tensor | None = None
    doc_end: torch.Tensor | None = None

    def is_default(self, lq: int, lk: int) -> bool:
        """Whether this frame is the bottom-right alignment the block tables are built for."""
        return (self.mode == FIXED and self.k_first == 0
                and (self.q_first is None or self.q_first == lk - lq))


DEFAULT_FRAME = Frame()


def starts_frame(starts: torch.Tensor) -> Frame:
    """Per-batch ``(q_start, k_start)`` from an integer tensor ``[B or 1, 2]`` on the kernels'
    device (positions of query row 0 and of key 0)."""
    if starts.dim() != 2 or starts.shape[-1] != 2:
        raise ValueError(f"positions must be [B or 1, 2] (q_start, k_start), got "
                         f"{tuple(starts.shape)}")
    return Frame(PER_BATCH, q_first=0, starts=starts.to(torch.int32).contiguous())


def documents_frame(documents: torch.Tensor, batch: int) -> Frame:
    """The frame of the op's ``documents``: ids ``[B or 1, L]`` or bounds prepared once per
    graph ``[2, batch, L]`` (``sparse_compile.positions.document_bounds_of``)."""
    from sparse_compile.positions import document_bounds_of

    start, end = document_bounds_of(documents, batch)
    return Frame(DOCUMENTS, doc_start=start, doc_end=end)


def frame_args(frame: Frame, lq: int, lk: int, like: torch.Tensor) -> tuple:
    """Kernel arguments ``(Starts, s_st, DS, DE)`` and ``(q_first, k_first)`` of ``frame``."""
    dummy = placeholder(like.device)
    starts = frame.starts if frame.starts is not None else dummy
    s_st = 0 if frame.starts is None or frame.starts.shape[0] == 1 else 2
    ds = frame.doc_start if frame.doc_start is not None else dummy
    de = frame.doc_end if frame.doc_end is not None else dummy
    q_first = lk - lq if frame.q_first is None else frame.q_first
    return (starts, s_st, ds, de), (q_first, frame.k_first)
