"""Where the queries sit when the keys come from a KV cache written in place.

A static cache is a buffer of capacity ``Lk`` into which each step writes its keys at their
positions along the key axis: ``keys.index_copy_(2, cache_position, new_keys)``
(transformers' ``StaticCache``) or ``k_cache[:, :, input_pos] = new_keys`` (gpt-fast's
``KVCache.update``); attention then reads the whole buffer. The queries of that step are the
tokens whose keys were just written, so query row ``i`` sits at key index ``positions[i]``:
reading the positions as ``arange + n`` gives the op's ``q_start = n``, a value on the device
(the cache's fill level), never read on the host. Positions the pass cannot read (a tensor the
model was given) give ``q_start = positions[0]``, on the condition that they are consecutive,
checked at run time (``CacheStart.checked``). A cache written any other way (rolled, shifted: a
sliding-window cache) keeps its newest key last, so relative positions are right with the
default alignment, but where its first key sits is not known: ``CacheUnknown`` says so, and
patterns that keep keys by absolute position are refused there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.index_values import AXES, IndexReader
from sparse_compile.fx.operands import Operand

_VIEWS = ("getitem", "expand", "reshape", "view", "contiguous", "unsqueeze", "transpose",
          "repeat_interleave")


@dataclass(frozen=True)
class CacheStart:
    """Query row 0 sits at key index ``value``: ``(node, int)`` or an int. ``checked``: the
    write positions ``[Lq]`` are not proven consecutive; ``value`` is then ``(positions, 0)``
    and the rewrite takes their first after checking them at run time."""

    value: Any
    checked: bool = False


@dataclass(frozen=True)
class CacheUnknown:
    """The keys come from a cache written in place in a way that hides absolute positions."""

    reason: str


def cache_query_start(reader: IndexReader, key: Operand | None
                      ) -> CacheStart | CacheUnknown | None:
    """How the site's keys were cached (None: not from a buffer written in place)."""
    if key is None:
        return None
    buffer = _buffer(key.node)
    if buffer is None:
        return None
    writes = [n for n in buffer.users if _writes_in_place(n, buffer)]
    if not writes:
        return None
    t = ops.tensor_value(buffer)
    placed = [(n, index) for n in writes if (index := _write_positions(n, t)) is not None]
    if len(placed) != 1 or len(writes) != 1:
        return CacheUnknown(f"keys come from {buffer.name}, a cache written in place other than "
                            "at the step's positions along the key axis (index_copy_, "
                            "cache[:, :, positions] = keys)")
    (write, index), = placed
    if isinstance(index, str):
        return CacheUnknown(f"{write.name} {index}")
    value = reader.read(index)
    if value is None or value.expr.atoms(sympy.core.function.AppliedUndef):
        return _checked(write, index)
    if len(value.shape) != 1:
        return CacheUnknown(f"{write.name} writes at positions the pass cannot read")
    start = sympy.expand(value.expr.xreplace({AXES[0]: 0}))
    if value.shape[0] != 1 and sympy.expand(value.expr - start - AXES[0]) != 0:
        return CacheUnknown(f"{write.name} writes at positions that are not consecutive")
    constant, rest = start.as_coeff_Add()
    if rest == 0:
        return CacheStart(int(constant))
    node = reader.node_of(rest) if isinstance(rest, sympy.Symbol) else None
    if node is None:
        return CacheUnknown(f"{write.name} writes at positions the pass cannot read")
    return CacheStart((node, int(constant)))


def _checked(write: Node, index: Any) -> CacheStart | CacheUnknown:
    """Positions read from a tensor the pass cannot see through (a graph input): the first
    one, on the condition checked at run time that they are consecutive."""
    t = ops.tensor_value(index)
    if t is None or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        return CacheUnknown(f"{write.name} writes at positions the pass cannot read")
    return CacheStart((index, 0), checked=True)


def _write_positions(write: Node, t: torch.Tensor | None) -> Any:
    """The index node of a write at positions along the key axis (the one before last) of a
    buffer ``t``: ``index_copy_(dim, index, src)`` or ``buffer[:, :, index] = src``; a string
    (why it is not one) for such a call along another axis; None for any other write."""
    if t is None:
        return None
    if write.op == "call_method" and write.target == "index_copy_":
        dim = ops.arg(write, 1, "dim")
        if dim not in (t.dim() - 2, -2):
            return "writes the cache along another axis than the keys"
        return ops.arg(write, 2, "index")
    if write.op == "call_function" and write.target is operator.setitem:
        return _setitem_index(write.args[1], t.dim())
    return None


def _setitem_index(index: Any, dims: int) -> Any:
    """The tensor indexing the key axis in ``buffer[index] = ...``, when every other axis is
    taken whole (``[:, :, positions]``, ``[..., positions, :]``); else None."""
    parts = list(index) if isinstance(index, tuple) else [index]
    if parts.count(Ellipsis) > 1:
        return None
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (dims - len(parts) + 1)
    parts += [slice(None)] * (dims - len(parts))
    if len(parts) != dims or not all(p == slice(None) for j, p in enumerate(parts)
                                     if j != dims - 2):
        return None
    key = parts[dims - 2]
    return key if ops.tensor_value(key) is not None else None


def _buffer(node: Any) -> Node | None:
    """The tensor the keys are views of (through slicing, GQA expansion, reshapes), if one is
    written in place somewhere in the graph."""
    seen = 0
    while isinstance(node, Node) and seen < 12:
        if any(_writes_in_place(user, node) for user in node.users):
            return node
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                           "")
        if node.op not in ("call_function", "call_method") or name not in _VIEWS:
            return None
        node = node.args[0]
        seen += 1
    return None


def _writes_in_place(user: Node, tensor: Node) -> bool:
    """Whether ``user`` is an in-place operation on ``tensor`` (``index_copy_``, ``copy_``,
    ``tensor[i] = v``, ...)."""
    return bool(user.args) and user.args[0] is tensor and ops.writes_in_place(user)
