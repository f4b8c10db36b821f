"""Where the queries sit when the keys come from a KV cache written in place.

A static cache (transformers' ``StaticCache``) is a buffer of capacity ``Lk`` into which each
step writes its keys with ``keys.index_copy_(2, cache_position, new_keys)``; attention then reads
the whole buffer. The queries of that step are the tokens whose keys were just written, so query
row ``i`` sits at key index ``cache_position[i]``: reading ``cache_position`` as ``arange + n``
gives the op's ``q_start = n``, a value on the device (the cache's fill level), never read on the
host. A cache written any other way (rolled, shifted: a sliding-window cache) keeps its newest
key last, so relative positions are right with the default alignment, but where its first key
sits is not known: ``CacheUnknown`` says so, and patterns that keep keys by absolute position
are refused there.
"""

from __future__ import annotations

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
    """Query row 0 sits at key index ``value``: ``(node, int)`` or an int."""

    value: Any


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
    copies = [n for n in writes if n.target in ("index_copy_", torch.Tensor.index_copy_)]
    if len(copies) != 1 or len(writes) != 1:
        return CacheUnknown(f"keys come from {buffer.name}, a cache written in place other than "
                            "by index_copy_ at the step's positions")
    copy = copies[0]
    dim, index = ops.arg(copy, 1, "dim"), ops.arg(copy, 2, "index")
    t = ops.tensor_value(buffer)
    if t is None or dim not in (t.dim() - 2, -2):
        return CacheUnknown(f"{copy.name} writes the cache along another axis than the keys")
    value = reader.read(index)
    if value is None or len(value.shape) != 1:
        return CacheUnknown(f"{copy.name} writes at positions the pass cannot read")
    start = sympy.expand(value.expr.xreplace({AXES[0]: 0}))
    if value.shape[0] != 1 and sympy.expand(value.expr - start - AXES[0]) != 0:
        return CacheUnknown(f"{copy.name} writes at positions that are not consecutive")
    constant, rest = start.as_coeff_Add()
    if rest == 0:
        return CacheStart(int(constant))
    node = reader.node_of(rest) if isinstance(rest, sympy.Symbol) else None
    if node is None:
        return CacheUnknown(f"{copy.name} writes at positions the pass cannot read")
    return CacheStart((node, int(constant)))


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
    ``add_``, ...)."""
    if user.op != "call_method" or not user.args or user.args[0] is not tensor:
        return False
    return isinstance(user.target, str) and user.target.endswith("_") and (
        not user.target.startswith("__"))
