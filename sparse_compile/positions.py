"""Where queries and keys sit: the public forms, checked and turned into the op's tensors.

By default query row ``i`` of ``Lq`` sits at position ``i + Lk - Lq`` and key ``j`` at ``j``
(bottom-right alignment, as FlashAttention). A model that knows better says so:

* ``q_start`` / ``k_start``: the positions of query row 0 and of key 0, an int or an integer
  tensor per batch row (``[B]`` or 0-dim). A static KV cache of capacity ``Lk`` holding ``n``
  tokens before this step has ``q_start = n``; left padding by ``p_b`` tokens gives
  ``q_start = n - p_b`` and ``k_start = -p_b`` (positions count from each row's first real
  token; keys at negative positions are never kept).
* ``documents``: integer ids ``[B, L]`` or ``[L]`` of packed sequences (Lq = Lk = L). Each
  document is a run of equal non-negative ids; non-negative ids never decrease along L, and
  padding (a negative id, never attended, its row outputs zeros) sits only between documents
  or at the ends. Attention stays inside a document and positions count from its first token:
  a packed batch gives what each document gives on its own.

The op takes ``starts`` (``[B or 1, 2]`` int32: ``q_start, k_start``) and ``documents``.
"""

from __future__ import annotations

import torch

from sparse_compile.tracing import is_tracing


class PositionError(ValueError):
    """Positions or document ids that do not describe a valid layout of the inputs."""


def _integer(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise PositionError(f"{name} must hold integers, got {t.dtype}")


def starts_tensor(q_start: int | torch.Tensor | None, k_start: int | torch.Tensor | None,
                  batch: int, lq: int, lk: int, device: torch.device) -> torch.Tensor | None:
    """``[B or 1, 2]`` int32 ``(q_start, k_start)`` on ``device``; None when both are None."""
    if q_start is None and k_start is None:
        return None
    parts = []
    for name, value, default in (("q_start", q_start, lk - lq), ("k_start", k_start, 0)):
        if value is None:
            value = default
        if isinstance(value, torch.Tensor):
            _integer(name, value)
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, batch)):
                raise PositionError(f"{name} must be an int, a 0-dim tensor or [B] with "
                                    f"B = {batch}, got shape {tuple(value.shape)}")
            value = value.to(device=device, dtype=torch.int32).reshape(-1)
        elif isinstance(value, int | torch.SymInt) and not isinstance(value, bool):
            value = torch.full((1,), value, dtype=torch.int32, device=device)
        else:
            raise PositionError(f"{name} must be an int or an integer tensor, got "
                                f"{type(value).__name__}")
        parts.append(value)
    rows = max(p.shape[0] for p in parts)
    return torch.stack([p.expand(rows) for p in parts], dim=-1).contiguous()


def check_documents(documents: torch.Tensor, batch: int, lq: int, lk: int) -> torch.Tensor:
    """``documents`` as ``[B or 1, L]``, after checking shape, dtype and order (one host
    synchronisation when eager; under ``torch.compile`` the order is asserted on the device,
    so that the same graph serves every batch)."""
    if not isinstance(documents, torch.Tensor):
        raise PositionError(f"documents must be an integer tensor, got "
                            f"{type(documents).__name__}")
    _integer("documents", documents)
    if lq != lk:
        raise PositionError(f"documents need as many queries as keys (Lq = {lq}, Lk = {lk}): "
                            "decoding over packed caches is not supported")
    ids = documents.reshape(1, -1) if documents.dim() == 1 else documents
    if ids.dim() != 2 or ids.shape[1] != lk or ids.shape[0] not in (1, batch):
        raise PositionError(f"documents must be [B, L] or [L] with B = {batch}, L = {lk}; got "
                            f"shape {tuple(documents.shape)}")
    if ids.shape[1] > 1:
        _refuse(_out_of_order(ids).any(), ORDER_MESSAGE, ids)
    return ids


def _refuse(bad: torch.Tensor, message: str, *inputs: torch.Tensor) -> None:
    """Stop on ``bad`` (a boolean scalar tensor computed from ``inputs``): ``PositionError`` on
    real tensors (one host synchronisation), a device assert under a tracer, so that inside a
    graph a bad layout stops the program without a host synchronisation instead of giving a
    wrong answer."""
    if is_tracing(*inputs):
        torch._assert_async(~bad, message)
    elif bool(bad):
        raise PositionError(message)


ORDER_MESSAGE = ("documents must be runs of non-decreasing ids, padding (negative ids) only "
                 "between documents: found a decreasing id or a document split by padding")


def _out_of_order(ids: torch.Tensor) -> torch.Tensor:
    """Per token, whether it breaks the order: a non-negative id below an earlier one, or equal
    to an earlier one with padding in between."""
    real = ids >= 0
    before = torch.where(real, ids, torch.full_like(ids, -1)).cummax(dim=-1).values
    before = torch.cat([torch.full_like(ids[:, :1], -1), before[:, :-1]], dim=-1)
    after_pad = torch.cat([torch.zeros_like(real[:, :1]), ~real[:, :-1]], dim=-1)
    return real & ((ids < before) | ((ids == before) & after_pad))


def documents_from_equal_ids(ids: torch.Tensor, batch: int, length: int,
                             positions: torch.Tensor | None = None) -> torch.Tensor:
    """Document ids ``[B or 1, length]`` for a mask that keeps the pairs of tokens with equal
    ``ids`` (``[B, L']`` or ``[L']``, ``L' >= length``; FlexAttention's
    ``ids[q_idx] == ids[kv_idx]``): the first ``length`` ids, shifted to start at 0 (equal ids
    attend each other whatever their sign, where ``documents`` takes negative ids for
    padding) and checked as ``check_documents`` does, so a layout the op cannot take (ids that
    decrease, a document in two runs) raises ``PositionError`` eagerly and stops the program
    under ``torch.compile``. ``positions`` (indexed like ``ids``), when the mask compares
    them instead of indices, are checked to advance by one inside each document."""
    _integer("ids", ids)
    ids = ids.reshape(-1, ids.shape[-1])[:, :length]
    if positions is not None:
        _check_positions(ids, positions.reshape(-1, positions.shape[-1])[:, :length])
    return check_documents(ids - ids.amin(), batch, length, length)


CONSECUTIVE_MESSAGE = ("the positions a KV cache is written at must be consecutive "
                       "(arange(n, n + Lq)) for the queries to be placed at them")


def consecutive_start(positions: torch.Tensor) -> torch.Tensor:
    """``positions[:1]`` (``[1]``), the position of query row 0, for queries whose keys were
    written at ``positions`` (``[Lq]`` integers), after checking that they are consecutive:
    on the device under ``torch.compile`` (a gap stops the program), else on the host
    (``PositionError``)."""
    _integer("positions", positions)
    positions = positions.reshape(-1)
    _refuse((positions[1:] != positions[:-1] + 1).any(), CONSECUTIVE_MESSAGE, positions)
    return positions[:1]


POSITIONS_MESSAGE = ("positions compared by the mask must advance by one from token to token "
                     "inside each document")


def _check_positions(ids: torch.Tensor, positions: torch.Tensor) -> None:
    same = ids[:, 1:] == ids[:, :-1]
    _refuse((same & (positions[:, 1:] != positions[:, :-1] + 1)).any(), POSITIONS_MESSAGE, ids,
            positions)


def documents_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int | None = None
                              ) -> torch.Tensor:
    """Document ids ``[L]`` from FlashAttention's cumulative lengths ``[n + 1]`` (0, l0,
    l0 + l1, ...); tokens past ``cu_seqlens[-1]`` up to ``length`` are padding (-1)."""
    _integer("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise PositionError(f"cu_seqlens must be [n + 1], got shape {tuple(cu_seqlens.shape)}")
    total = int(cu_seqlens[-1]) if length is None else length
    idx = torch.arange(total, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True)
    return torch.where(idx < cu_seqlens[-1], ids, torch.full_like(ids, -1))


def documents_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids ``[B, L]`` from transformers' packed ``position_ids`` (a new document
    wherever a position is not its predecessor's plus one), as its packed-sequence mask."""
    _integer("position_ids", position_ids)
    pos = position_ids.reshape(1, -1) if position_ids.dim() == 1 else position_ids
    first = torch.ones_like(pos[:, :1], dtype=torch.bool)
    restart = torch.cat([first, pos[:, 1:] != pos[:, :-1] + 1], dim=-1)
    return restart.to(torch.int64).cumsum(dim=-1) - 1


def document_bounds_of(documents: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, end)``, int32 ``[batch, L]``: each token's document as key indices, from the
    op's ``documents`` argument, either ids ``[B or 1, L]`` (prepared here, on their device)
    or bounds ``[2, batch, L]`` already prepared once for every layer by
    ``torch.ops.sparse_compile.prepare_documents``."""
    if documents.dim() == 3:
        return documents[0], documents[1]
    from sparse_compile.codegen.tl.documents import document_bounds

    return document_bounds(documents.expand(batch, documents.shape[-1]))


def prepared_documents(ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Bounds ``[2, batch, length]`` of document ids ``[B or 1, L']`` or ``[L']`` (``L' >=
    length``, the first ``length`` used): what the backend computes once per graph and passes
    to every attention call of the packed batch."""
    ids = ids.reshape(-1, ids.shape[-1])[:, :length]
    return torch.ops.sparse_compile.prepare_documents(ids, batch)
