"""The collectives of context parallelism: exactly the keys a plan says, and back.

Forward: every rank sends each other rank the K and V rows that rank needs from it (K and V
side by side, one ``all_to_all_single`` with uneven splits), and places what it receives next
to its own rows in position order: the gathered buffer ``[B, Hkv, G, D]`` whose key ``g`` sits
at ``plan.held(rank)[g]``. Backward: the dK/dV rows of received keys go back to their owners
(the same collective, splits swapped) and are added to the owners' own gradients.

These run between the attention kernels, never inside them: any backend of
``torch.distributed`` that implements ``all_to_all_single`` works (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from sparse_compile.distributed.plan import ExchangePlan


@dataclass(frozen=True)
class Routes:
    """Index lists of one rank's exchange (int64, CPU).

    ``send[r]``: the local rows sent to rank ``r``; ``recv_counts[s]``: rows received from
    ``s``; ``own_slots``: where the local rows go in the gathered buffer; ``recv_slots``: where
    the received rows go, in the order they arrive (by source rank, then position)."""

    send: tuple[torch.Tensor, ...]
    recv_counts: tuple[int, ...]
    own_slots: torch.Tensor
    recv_slots: torch.Tensor
    held: torch.Tensor

    @property
    def send_counts(self) -> list[int]:
        return [int(s.numel()) for s in self.send]


def routes(plan: ExchangePlan, rank: int) -> Routes:
    """The exchange of ``rank`` under ``plan`` (cached per plan and rank)."""
    return _routes(plan, rank)


@lru_cache(maxsize=256)
def _routes(plan: ExchangePlan, rank: int) -> Routes:
    local = plan.sharding.positions(plan.length, rank)
    held = plan.held(rank)
    send = []
    for r in range(plan.world):
        wanted = [torch.arange(a, b) for a, b in plan.recv[r][rank]]
        positions = torch.cat(wanted) if wanted else torch.zeros(0, dtype=torch.int64)
        send.append(torch.searchsorted(local, positions))
    received = [torch.arange(a, b) for s in range(plan.world) for a, b in plan.recv[rank][s]]
    received_pos = torch.cat(received) if received else torch.zeros(0, dtype=torch.int64)
    counts = tuple(sum(b - a for a, b in plan.recv[rank][s]) for s in range(plan.world))
    return Routes(tuple(send), counts, torch.searchsorted(held, local),
                  torch.searchsorted(held, received_pos), held)


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, E]`` → contiguous ``[n, B, H, E]`` (the collective splits dim 0)."""
    return x.permute(2, 0, 1, 3).contiguous()


def _all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    out = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(out, send, output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts), group=group)
    return out


def gather_keys(k: torch.Tensor, v: torch.Tensor, plan: ExchangePlan, rank: int,
                group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered K and V ``[B, Hkv, G, D]`` of ``rank`` from its local ``k``, ``v``
    ``[B, Hkv, L / W, D]``: its own rows and the rows the plan says it receives."""
    r = routes(plan, rank)
    kv = torch.cat([k, v], dim=-1)
    device = kv.device
    send = torch.cat([kv.index_select(2, idx.to(device)) for idx in r.send], dim=2)
    received = _all_to_all(_rows_first(send), r.send_counts, list(r.recv_counts), group)
    b, h, _, e = kv.shape
    gathered = kv.new_empty((b, h, r.held.numel(), e))
    gathered.index_copy_(2, r.own_slots.to(device), kv)
    gathered.index_copy_(2, r.recv_slots.to(device), received.permute(1, 2, 0, 3))
    d = k.shape[-1]
    return gathered[..., :d], gathered[..., d:]


def return_key_grads(dk: torch.Tensor, dv: torch.Tensor, plan: ExchangePlan, rank: int,
                     group: dist.ProcessGroup, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """dK and dV ``[B, Hkv, L / W, D]`` of ``rank``'s own keys from the gathered gradients
    ``dk``, ``dv`` ``[B, Hkv, G, D]`` of every rank: the rows of received keys travel back (in
    ``dtype``, the keys' own) and are summed into their owners' rows."""
    r = routes(plan, rank)
    dkv = torch.cat([dk, dv], dim=-1)
    device = dkv.device
    own = dkv.index_select(2, r.own_slots.to(device))
    back = dkv.index_select(2, r.recv_slots.to(device)).to(dtype)
    arrived = _all_to_all(_rows_first(back), list(r.recv_counts), r.send_counts, group)
    rows = torch.cat(r.send).to(device)
    own.index_add_(2, rows, arrived.permute(1, 2, 0, 3).to(own.dtype))
    d = dk.shape[-1]
    return own[..., :d].to(dtype), own[..., d:].to(dtype)
