"""DMA selection on the device: per-row rank thresholds and per-query-block gather lists.

Keys are ranked once per (batch, kv head) by (allowed first, delta descending, index ascending):
``order[r]`` is the key of rank ``r``. Row ``p`` (absolute position) keeps key ``k`` iff ``k`` is
allowed, ``k <= p`` when causal, and ``rank(k) <= thr[p]``, where ``thr[p]`` is the rank of the
``keep``-th visible key in rank order (the last visible one when fewer are visible). ``thr`` is
non-increasing in ``p``, so each key is kept by a contiguous range of rows, and a query block
``[m0, m1]`` only ever needs the keys of rank ``<= thr[m0]`` with ``k <= m1``: at most
``keep + BLOCK_M - 1`` keys, its gather list.

One program per (query block, batch * kv head), in four phases:
1. a 1-D walk over ranks (``BLOCK_R`` at a time) that writes the gather list and stops once row
   ``m0`` has seen ``keep`` keys; keys of the block itself note their slot in the list;
2. per-row thresholds from a ``BLOCK_M``-wide window of the list: row ``p``'s count at slot ``i``
   is ``i + 1`` minus the block keys after ``p`` listed up to ``i``, so it reaches ``keep`` in
   slots ``[keep - 1, keep + BLOCK_M - 2]``;
3. per-row shifts: the largest delta among the row's kept keys (its first visible key in rank
   order, always within the list's first ``BLOCK_M`` slots);
4. the list is reordered as [older keys, rank order][keys of the block itself], and
   ``full_count`` counts its leading entries kept by every row of the block (rank at most the
   block's smallest threshold): nearly the whole list, which the kernels run without masks.
   Only the kernels' per-entry test ``rank <= thr[row] and key <= row`` reads the list after
   this, and it does not depend on the order.

Why the shift: delta = exp(A * softplus(.)) reaches 1e6..1e8 for trained or random A, and
``q.k * scale + delta`` formed in float32 at that magnitude keeps only a few bits of ``q.k``
(ulp(1e7) = 1); storing ``lse`` at that magnitude loses ``log(l)`` too. Softmax is invariant to a
per-row constant, so the kernels use ``(delta - shift[row])`` (exact in float32 for nearby values)
and keep every logit and ``lse`` near 0. The gradient through the shift is exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DmaSelection", "dma_select", "dma_gather_lists", "gather_capacity"]


@triton.jit
def _dma_select_kernel(
    order_ptr,  # int32 [BH, Lk]
    delta_ptr,  # [BH, Lk]
    n_allowed_ptr,  # int32 [BH]
    gather_key_ptr,  # int32 [BH, nq, CAP]
    gather_rank_ptr,  # int32 [BH, nq, CAP]
    gather_count_ptr,  # int32 [BH, nq]
    slot_ptr,  # int32 [BH, nq, BLOCK_M] scratch, filled with a large value
    thr_ptr,  # int32 [BH, Lq]
    shift_ptr,  # float32 [BH, Lq]
    full_ptr,  # int32 [BH, nq]
    lq,
    lk,
    keep,
    cap,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    nq = tl.cdiv(lq, BLOCK_M)
    base = bh * nq + pid_m
    list_base = base.to(tl.int64) * cap  # the lists may hold more than 2**31 entries
    n_allowed = tl.load(n_allowed_ptr + bh)
    if CAUSAL:
        p_first = pid_m * BLOCK_M + (lk - lq)
        p_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, lq) - 1 + (lk - lq)
    else:  # every row sees every key: no key is "new" to the block
        p_first = lk
        p_last = lk

    # Phase 1 (1-D): walk ranks in order, list those with key <= p_last, until the first row
    # of the block has seen `keep` keys. Block keys (key > p_first) note their list slot.
    seen = tl.zeros([], dtype=tl.int32)
    n_out = tl.zeros([], dtype=tl.int32)
    r0 = tl.zeros([], dtype=tl.int32)
    # each chunk's keys are loaded one iteration ahead, so the load overlaps the scan
    keys_next = tl.load(order_ptr + bh * lk + tl.arange(0, BLOCK_R),
                        mask=tl.arange(0, BLOCK_R) < n_allowed, other=0)
    while (r0 < n_allowed) & (seen < keep):
        ranks = r0 + tl.arange(0, BLOCK_R)
        valid = ranks < n_allowed
        keys = keys_next
        keys_next = tl.load(order_ptr + bh * lk + ranks + BLOCK_R,
                            mask=ranks + BLOCK_R < n_allowed, other=0)
        visible = valid & (keys <= p_first)
        n_visible = tl.sum(visible.to(tl.int32), axis=0)
        take = valid & (keys <= p_last)
        if seen + n_visible >= keep:  # only the chunk holding the stop needs the running count
            # stop right after the keep-th key visible to the first row
            before = seen + tl.cumsum(visible.to(tl.int32), axis=0) - visible.to(tl.int32)
            take = take & (before < keep)
        slot = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(gather_key_ptr + list_base + slot, keys, mask=take)
        tl.store(gather_rank_ptr + list_base + slot, ranks, mask=take)
        fresh = take & (keys > p_first)
        tl.store(slot_ptr + base * BLOCK_M + (keys - p_first), slot, mask=fresh)
        seen += n_visible
        n_out += tl.sum(take.to(tl.int32), axis=0)
        r0 += BLOCK_R
    tl.store(gather_count_ptr + base, n_out)
    # Phases 2 to 4 read list entries other threads of this program wrote.
    tl.debug_barrier()
    offs_j = tl.arange(0, BLOCK_M)
    block_slot = tl.load(slot_ptr + base * BLOCK_M + offs_j)  # block key p_first + j
    block_key = p_first + offs_j
    thr_min = tl.full([], -1, dtype=tl.int32)
    if PER_ROW:  # thresholds and shifts (the dK/dV pass needs the lists only)
        # Phase 2: row p's count at list slot i is (i + 1) minus the block keys after p listed at
        # or before i; it reaches `keep` inside the window [keep - 1, keep + BLOCK_M - 2].
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if CAUSAL:
            pos = offs_m + (lk - lq)
        else:
            pos = tl.zeros([BLOCK_M], dtype=tl.int32) + lk
        w0 = keep - 1
        hidden = (block_key[None, :] > pos[:, None]) & (block_slot[None, :] < w0)
        hidden_before = tl.sum(hidden.to(tl.int32), axis=1)
        offs_w = w0 + tl.arange(0, BLOCK_M)
        w_ok = offs_w < n_out
        w_key = tl.load(gather_key_ptr + list_base + offs_w, mask=w_ok, other=0)
        w_rank = tl.load(gather_rank_ptr + list_base + offs_w, mask=w_ok, other=0)
        w_visible = w_ok[None, :] & (w_key[None, :] <= pos[:, None])
        w_hidden = (w_ok[None, :] & (w_key[None, :] > pos[:, None])).to(tl.int32)
        counts = offs_w[None, :] + 1 - hidden_before[:, None] - tl.cumsum(w_hidden, axis=1)
        reached = w_visible & (counts == keep)
        thr = tl.max(tl.where(reached, w_rank[None, :], -1), axis=1)
        thr = tl.where(thr >= 0, thr, n_allowed - 1)
        tl.store(thr_ptr + bh * lq + offs_m, thr, mask=offs_m < lq)

        # Phase 3: row shift = largest delta among the row's visible listed keys (-> 0 if none).
        h_ok = offs_j < n_out
        h_key = tl.load(gather_key_ptr + list_base + offs_j, mask=h_ok, other=0)
        h_delta = tl.load(delta_ptr + bh * lk + h_key, mask=h_ok, other=0.0).to(tl.float32)
        h_visible = h_ok[None, :] & (h_key[None, :] <= pos[:, None])
        shift = tl.max(tl.where(h_visible, h_delta[None, :], float("-inf")), axis=1)
        shift = tl.where(shift == float("-inf"), 0.0, shift)
        tl.store(shift_ptr + bh * lq + offs_m, shift, mask=offs_m < lq)

        thr_min = tl.min(tl.where(offs_m < lq, thr, 2147483647), axis=0)

    # Phase 4: reorder the list as [keys <= p_first in rank order][block keys by position] and
    # count its leading entries that every row keeps (rank <= the block's smallest threshold;
    # PER_ROW only): the kernels run those tiles without any mask.
    listed = block_slot < n_out
    b_rank = tl.load(gather_rank_ptr + list_base + block_slot, mask=listed, other=0)
    n_front = tl.zeros([], dtype=tl.int32)
    n_full = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_out, BLOCK_R):
        idx = c0 + tl.arange(0, BLOCK_R)
        ok = idx < n_out
        c_key = tl.load(gather_key_ptr + list_base + idx, mask=ok, other=0)
        c_rank = tl.load(gather_rank_ptr + list_base + idx, mask=ok, other=0)
        tl.debug_barrier()  # every read of this chunk before any write into it
        front = ok & (c_key <= p_first)
        dst = n_front + tl.cumsum(front.to(tl.int32), axis=0) - 1
        tl.store(gather_key_ptr + list_base + dst, c_key, mask=front)
        tl.store(gather_rank_ptr + list_base + dst, c_rank, mask=front)
        n_full += tl.sum((front & (c_rank <= thr_min)).to(tl.int32), axis=0)
        n_front += tl.sum(front.to(tl.int32), axis=0)
        tl.debug_barrier()
    b_dst = n_front + tl.cumsum(listed.to(tl.int32), axis=0) - 1
    tl.store(gather_key_ptr + list_base + b_dst, block_key, mask=listed)
    tl.store(gather_rank_ptr + list_base + b_dst, b_rank, mask=listed)
    if PER_ROW:
        tl.store(full_ptr + base, n_full)


class DmaSelection:
    """What the attention kernels need to gather the kept keys of each query block.

    thr ``[BH, Lq]`` int32 rank threshold per row; shift ``[BH, Lq]`` float32, the constant the
    kernels subtract from delta on each row (module doc); gather_key / gather_rank
    ``[BH, nq, cap]`` int32 (key index and its rank: the keys before the block in rank order,
    then the block's own keys by position; ``gather_count [BH, nq]`` valid entries, of which the
    first ``full_count [BH, nq]`` are kept by every row of the block); block_m the query block
    size the lists were built for; order / n_allowed the rank order (for more lists at other
    block sizes). BH = batch * kv heads.
    """

    def __init__(self, thr, gather_key, gather_rank, gather_count, block_m, shift,
                 order=None, n_allowed=None, full_count=None):
        self.thr = thr
        self.full_count = (full_count if full_count is not None
                           else torch.zeros_like(gather_count))
        self.shift = shift
        self.order = order
        self.n_allowed = n_allowed
        self.gather_key = gather_key
        self.gather_rank = gather_rank
        self.gather_count = gather_count
        self.block_m = block_m

    TENSORS = ("thr", "shift", "gather_key", "gather_rank", "gather_count", "full_count",
               "order", "n_allowed")

    def tensors(self) -> list[torch.Tensor]:
        """The selection as a flat tensor list (``TENSORS`` order), to save for the backward."""
        return [getattr(self, name) for name in self.TENSORS]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], block_m: int, keep: int,
                     causal: bool) -> DmaSelection:
        """Inverse of ``tensors()`` for a selection built by ``dma_select``."""
        fields = dict(zip(cls.TENSORS, tensors, strict=True))
        selection = cls(block_m=block_m, **fields)
        selection.keep, selection.causal = keep, causal
        return selection

    def nbytes(self) -> int:
        """Device memory held by the selection's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def gather_capacity(keep: int, lk: int, block_m: int) -> int:
    """Entries reserved per query block's gather list: at most ``keep + BLOCK_M - 1`` keys."""
    return max(1, min(min(keep, lk) + block_m, lk))


def selection_rank_order(
    delta: torch.Tensor, key_allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank order ``[BH, Lk]`` int32 (allowed first, delta desc, index asc) and allowed counts
    ``[BH]`` int32. delta ``[B, Hkv, Lk]``; key_allowed bool ``[B, Lk]`` or None."""
    b, h, lk = delta.shape
    order = torch.sort(delta, dim=-1, descending=True, stable=True).indices
    if key_allowed is None:
        n_allowed = torch.full((b * h,), lk, dtype=torch.int32, device=delta.device)
    else:
        allowed = key_allowed[:, None, :].expand(b, h, lk)
        removed = (~allowed).gather(-1, order).to(torch.int8)
        order = order.gather(-1, torch.sort(removed, dim=-1, stable=True).indices)
        n_allowed = allowed.sum(-1).reshape(-1).to(torch.int32)
    return order.reshape(b * h, lk).to(torch.int32).contiguous(), n_allowed


def _launch(order, n_allowed, delta, lq, keep, causal, block_m, block_r, per_row):
    bh, lk = order.shape
    keep = min(keep, lk)  # keep >= Lk keeps every allowed key; also keeps int32 math in range
    nq = triton.cdiv(lq, block_m)
    cap = gather_capacity(keep, lk, block_m)
    dev = order.device
    # Zero-filled although readers mask to gather_count: the lists are outputs of the forward
    # op (saved for the backward), and an op's outputs must not depend on uninitialised memory
    # (opcheck compares them across runs).
    gather_key = torch.zeros(bh, nq, cap, dtype=torch.int32, device=dev)
    gather_rank = torch.zeros(bh, nq, cap, dtype=torch.int32, device=dev)
    gather_count = torch.empty(bh, nq, dtype=torch.int32, device=dev)
    thr = torch.empty(bh, lq if per_row else 1, dtype=torch.int32, device=dev)
    shift = torch.empty(bh, lq if per_row else 1, dtype=torch.float32, device=dev)
    slot = torch.full((bh, nq, block_m), 2**30, dtype=torch.int32, device=dev)
    full = torch.zeros(bh, nq, dtype=torch.int32, device=dev)
    _dma_select_kernel[(nq, bh)](
        order, delta, n_allowed, gather_key, gather_rank, gather_count, slot, thr, shift, full,
        lq, lk, keep, cap,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_R=block_r, PER_ROW=per_row,
    )
    return thr, shift, gather_key, gather_rank, gather_count, full


def dma_select(
    delta: torch.Tensor,
    key_allowed: torch.Tensor | None,
    lq: int,
    keep: int,
    causal: bool,
    block_m: int,
    block_r: int = 1024,
) -> DmaSelection:
    """Run the selection for delta ``[B, Hkv, Lk]`` and ``lq`` query rows (see module doc)."""
    order, n_allowed = selection_rank_order(delta, key_allowed)
    thr, shift, key, rank, count, full = _launch(order, n_allowed, delta, lq, keep, causal,
                                                 block_m, block_r, True)
    selection = DmaSelection(thr, key, rank, count, block_m, shift, order, n_allowed, full)
    selection.keep, selection.causal = keep, causal
    return selection


def dma_gather_lists(
    selection: DmaSelection, delta: torch.Tensor, lq: int, block_m: int, block_r: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather lists ``(key, rank [BH, nq, cap], count [BH, nq])`` for query blocks of
    ``block_m`` rows, from ``selection``'s rank order (no second sort, no per-row phases)."""
    _, _, key, rank, count, _ = _launch(selection.order, selection.n_allowed, delta, lq,
                                     selection.keep, selection.causal, block_m, block_r, False)
    return key, rank, count
