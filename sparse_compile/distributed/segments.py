"""Attention of a block of queries over separate ranges of keys, one kernel call per range,
merged by log-sum-exp; and its backward.

The queries sit at positions ``q_start + i`` of the full sequence and each range of keys at
``k_start + j`` (the op's ``starts``), so the pattern is applied at the tokens' true positions
however the keys were gathered. Each call returns its output normalised over its own keys and
its log-sum-exp (log2 units, +inf for a row with no kept key); the attention over all ranges
is their average weighted by ``2^lse`` (``codegen/tl/merge.py``). The backward needs no
log-sum-exp gradient: each range's backward, run with the merged output and log-sum-exp,
gives exactly that range's share of dQ and its dK/dV (the softmax probabilities it recomputes
are then the merged ones, as in ring attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_compile.op import kernel_frame


@dataclass(frozen=True)
class KeyRange:
    """Keys ``[slot, slot + length)`` of the gathered buffer, at positions ``start, ...``."""

    start: int
    slot: int
    length: int


def _starts(q_start: int, k_start: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[q_start, k_start]], dtype=torch.int32, device=device)


def _keys(x: torch.Tensor, r: KeyRange) -> torch.Tensor:
    return x.narrow(2, r.slot, r.length)


def attend_ranges(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                  ranges: list[KeyRange], pattern: str, scale: float, softcap: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, Hq, Lq, D]`` over ``ranges`` of ``k``, ``v`` ``[B, Hkv, G, D]``.

    Returns out ``[B, Hq, Lq, D]`` (q's dtype) and lse ``[B, Hq, Lq]`` float32 (log2 units,
    +inf where no key is kept)."""
    from sparse_compile.codegen.attention import forward
    from sparse_compile.codegen.tl.merge import merge_parts

    if not ranges:
        return torch.zeros_like(q), q.new_full(q.shape[:3], float("inf"), dtype=torch.float32)
    # Parts stay in float32 until the last merge rounds once to q's dtype.
    out, lse = None, None
    for i, r in enumerate(ranges):
        last = i == len(ranges) - 1
        part_dtype = q.dtype if last and out is None else torch.float32
        part, part_lse = forward(q, _keys(k, r), _keys(v, r), pattern, scale, softcap=softcap,
                                 out_dtype=part_dtype,
                                 frame=kernel_frame(q, _starts(q_start, r.start, q.device), None))
        if out is None:
            out, lse = part, part_lse
        else:
            out, lse = merge_parts(out, lse, part, part_lse,
                                   out_dtype=q.dtype if last else torch.float32)
    return out, lse


def attend_ranges_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_start: int,
                           ranges: list[KeyRange], pattern: str, scale: float, softcap: float,
                           dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """dQ ``[B, Hq, Lq, D]`` (float32) of ``attend_ranges``; adds each range's dK and dV into
    the float32 buffers ``dk``, ``dv`` (shaped like ``k``, ``v``)."""
    from sparse_compile.codegen.attention import backward

    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for r in ranges:
        part_dq, part_dk, part_dv, _ = backward(
            dout, q, _keys(k, r), _keys(v, r), out, lse, pattern, scale, softcap=softcap,
            frame=kernel_frame(q, _starts(q_start, r.start, q.device), None))
        dq += part_dq
        _keys(dk, r).add_(part_dk)
        _keys(dv, r).add_(part_dv)
    return dq
