"""Attention on one rank's shard of the sequence: ``torch.ops.sparse_compile.sharded_attention``.

Each rank holds the queries, keys and values of its chunks of the sequence (``sharding.py``).
The op gathers the keys the pattern needs from the other ranks (``exchange.py``, per the
``plan.py`` of the pattern, length and sharding), runs the attention kernels once per query
chunk and range of gathered keys at the tokens' true positions, and merges them by
log-sum-exp (``segments.py``). Its backward gathers K/V again, runs the kernels' backward per
range and sends the dK/dV of received keys back to their owners.

It is a ``torch.library`` custom op (fake implementation, registered autograd) so that the
backend can call it from a compiled graph: AOTAutograd and Inductor see one opaque node, and
the collectives run when the node runs, between the kernels. The process group travels as the
name it was registered under (``register_group``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sparse_compile.distributed.exchange import gather_keys, return_key_grads
from sparse_compile.distributed.plan import ExchangePlan, exchange_plan
from sparse_compile.distributed.segments import KeyRange, attend_ranges, attend_ranges_backward
from sparse_compile.distributed.sharding import Sharding
from sparse_compile.op import kernels_available

_GROUPS: dict[str, dist.ProcessGroup] = {}


def register_group(group: dist.ProcessGroup) -> str:
    """Make ``group`` reachable from compiled graphs; returns the name they refer to it by."""
    name = group.group_name
    _GROUPS[name] = group
    return name


def _group(name: str) -> dist.ProcessGroup:
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"process group {name!r} is not registered for context "
                           "parallelism (sparse_compile.distributed.context_parallel does it)"
                           ) from None


def _setting(q: torch.Tensor, pattern: str, sharding: str, group_name: str
             ) -> tuple[ExchangePlan, int, dist.ProcessGroup]:
    group = _group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return exchange_plan(pattern, q.shape[2] * world, Sharding(sharding, world)), rank, group


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not kernels_available(q):
        raise RuntimeError("context parallelism runs the Triton kernels: use CUDA tensors, or "
                           "TRITON_INTERPRET=1 for CPU tensors")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sharded attention takes [B, H, L, D] tensors, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"context parallelism shards self-attention: every rank holds as many "
                         f"queries as keys, got Lq = {q.shape[2]}, Lk = {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")


def _chunks(plan: ExchangePlan, rank: int, held: torch.Tensor
            ) -> list[tuple[int, int, int, list[KeyRange]]]:
    """Per local query chunk: (offset in the shard, length, position, gathered key ranges)."""
    chunks, offset = [], 0
    for (a, b), runs in zip(plan.sharding.ranges(plan.length, rank), plan.runs[rank],
                            strict=True):
        ranges = [KeyRange(c, int(torch.searchsorted(held, c)), d - c) for c, d in runs]
        chunks.append((offset, b - a, a, ranges))
        offset += b - a
    return chunks


@torch.library.custom_op("sparse_compile::sharded_attention", mutates_args=())
def sharded_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                         scale: float, softcap: float, sharding: str, group_name: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``[B, Hq, L / W, D]`` (q's dtype) and lse ``[B, Hq, L / W]`` float32 (log2 units)
    of this rank's queries over the whole sequence's keys under ``pattern`` (canonical text);
    q ``[B, Hq, L / W, D]``, k/v ``[B, Hkv, L / W, D]`` are this rank's shard."""
    _check(q, k, v)
    plan, rank, group = _setting(q, pattern, sharding, group_name)
    k_all, v_all = gather_keys(k, v, plan, rank, group)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    for offset, size, position, ranges in _chunks(plan, rank, plan.held(rank)):
        part, part_lse = attend_ranges(q.narrow(2, offset, size), k_all, v_all, position,
                                       ranges, pattern, scale, softcap)
        out.narrow(2, offset, size).copy_(part)
        lse.narrow(2, offset, size).copy_(part_lse)
    return out, lse


@sharded_attention_op.register_fake
def _(q, k, v, pattern, scale, softcap, sharding, group_name):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparse_compile::sharded_attention_backward", mutates_args=())
def sharded_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  pattern: str, scale: float, softcap: float, sharding: str,
                                  group_name: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``sharded_attention_op``, shaped like this rank's q, k, v."""
    plan, rank, group = _setting(q, pattern, sharding, group_name)
    k_all, v_all = gather_keys(k, v, plan, rank, group)
    dk_all = torch.zeros(k_all.shape, dtype=torch.float32, device=k.device)
    dv_all = torch.zeros(v_all.shape, dtype=torch.float32, device=v.device)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    for offset, size, position, ranges in _chunks(plan, rank, plan.held(rank)):
        rows = slice(offset, offset + size)
        part = attend_ranges_backward(
            dout[:, :, rows].contiguous(), q[:, :, rows], k_all, v_all,
            out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), position, ranges,
            pattern, scale, softcap, dk_all, dv_all)
        dq[:, :, rows] = part
    dk, dv = return_key_grads(dk_all, dv_all, plan, rank, group, k.dtype)
    return dq, dk.contiguous(), dv.contiguous()


@sharded_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, pattern, scale, softcap, sharding, group_name):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale, softcap, sharding, group_name = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (pattern, scale, softcap, sharding, group_name)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = sharded_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse,
                                               *ctx.args)
    return dq, dk, dv, None, None, None, None, None


sharded_attention_op.register_autograd(_backward, setup_context=_setup_context)


def sharded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                      scale: float | None = None, softcap: float | None = None, *,
                      sharding: str, group_name: str) -> torch.Tensor:
    """Pattern-sparse attention of this rank's shard of a sequence split over a process group.

    Computes, for the queries this rank holds, what ``sparse_compile.attention`` computes for
    them on the whole sequence (Lq = Lk = L, every query and key at its position in the full
    sequence), exchanging only the keys the pattern keeps for them. Differentiable in q, k, v;
    every rank of the group must call it with the same pattern, shapes and sharding.

    Args:
        q: ``[B, Hq, L / W, D]``; k, v: ``[B, Hkv, L / W, D]`` (GQA: Hq a multiple of Hkv),
            this rank's tokens in the order ``Sharding.ranges`` gives.
        pattern: canonical DSL text (a static pattern: not ``dma`` / ``topk``).
        scale: logit scale, default 1/sqrt(D); softcap: logit soft-capping, or None.
        sharding: ``"contiguous"`` or ``"zigzag"`` (``sharding.py``).
        group_name: the name ``register_group`` returned for the group.

    Returns:
        ``[B, Hq, L / W, D]`` in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = sharded_attention_op(q, k, v, pattern, scale, float(softcap or 0.0), sharding,
                                  group_name)
    return out
