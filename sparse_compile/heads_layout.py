"""The memory layout of the attention op's ``[B, H, L, D]`` output.

A model's queries are usually a projection's output viewed as heads: ``[B, L, H, D]`` in memory,
transposed to ``[B, H, L, D]`` ("sequence-major"), and the model transposes the attention's
output back before its output projection. SDPA's and FlexAttention's outputs follow the query's
layout, so that transposition is free; an output in head-major order would cost the model one
more copy of it per layer. The op therefore returns its output in the query's layout, decided
from the stride order alone, so that a graph's fake tensors and the real ones always agree.
"""

from __future__ import annotations

import torch


def sequence_major(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[B, H, L, D]`` steps through its heads faster than through its
    positions (more than one of each)."""
    return t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def heads_strides(like: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a dense ``shape`` ``[B, H, L, D]`` tensor in ``like``'s layout."""
    b, h, length, d = shape
    if sequence_major(like):
        return (length * h * d, d, h * d, 1)
    return (h * length * d, length * d, d, 1)


def empty_heads(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``shape`` tensor on ``like``'s device in ``like``'s layout."""
    return torch.empty_strided(tuple(shape), heads_strides(like, tuple(shape)), dtype=dtype,
                               device=like.device)


def empty_output(q: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                 query_layout: bool) -> torch.Tensor:
    """A kernel's output buffer: in q's layout when ``query_layout``, else contiguous."""
    if query_layout:
        return empty_heads(q, shape, dtype)
    return torch.empty(tuple(shape), device=q.device, dtype=dtype)


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it already has ``like``'s layout, else a copy in that layout."""
    if t.stride() == heads_strides(like, tuple(t.shape)):
        return t
    return empty_heads(like, tuple(t.shape), t.dtype).copy_(t)
