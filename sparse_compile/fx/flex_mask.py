"""A FlexAttention ``mask_mod`` read as the model's own mask, in the op's terms.

``mask_mod(b, h, q_idx, kv_idx, *buffers)`` is a graph of 0-dim tensors that FlexAttention
evaluates at every ``(b, h, q, k)``. The pass reads it with the machinery it uses for the masks
models build (``index_values.py``, ``model_mask.py``): its index placeholders are seeded with
the axes of the ``[B, H, Lq, Lk]`` grid and its buffers with the outer graph's tensors, so the
predicate becomes a ``ModelMask`` whose key mask and document ids are nodes of the outer graph:
a pattern (causal, sliding windows, bands, a prefix, sinks), positions (``q_idx + offset``), a
per-key mask (``padding[b, kv_idx]``), document ids (``doc[q_idx] == doc[kv_idx]``; ids the
pass cannot prove in order are checked at run time).

FlexAttention keeps an entry when its block of the ``BlockMask`` is full, or partial and
``mask_mod`` keeps it. A ``BlockMask`` made by ``create_block_mask`` from its ``mask_mod`` keeps
exactly what ``mask_mod`` keeps; the pass takes the block mask of a call to be one, and does
not read its blocks. One case says otherwise and is refused: a ``mask_mod`` that keeps every
entry with blocks of ordinary size (``BlockMask.from_kv_blocks`` without a ``mask_mod``: the
blocks alone decide). A call without a block mask has one block of ``_NO_BLOCKS``.
"""

from __future__ import annotations

from typing import Any

import sympy
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.flex import FlexBlockMask, FlexCall
from sparse_compile.fx.index_values import AXES, Grid, IndexReader, IndexValue
from sparse_compile.fx.model_mask import ModelMask, read_model_mask

# FlexAttention's block size for a call without a block mask (_LARGE_SPARSE_BLOCK_SIZE).
_NO_BLOCKS = 1 << 30


def read_mask_mod(call: FlexCall, lq: Any, lk: Any) -> ModelMask | str:
    """The ``ModelMask`` of the call's ``mask_mod`` for ``Lq = lq``, ``Lk = lk``, or the
    reason the pass cannot take it over."""
    block_mask = call.block_mask
    graph = block_mask.mask_mod.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 4 + len(block_mask.mask_mod_buffers):
        return "mask_mod is not a function of (b, h, q_idx, kv_idx) and its buffers"
    q = ops.tensor_value(call.query)
    grid = (q.shape[0], q.shape[1], lq, lk)
    seed: dict[Node, IndexValue | Node] = {
        p: IndexValue(axis, grid)
        for p, axis in zip(placeholders[:4], (AXES[3], AXES[2], AXES[1], AXES[0]), strict=True)}
    for p, buffer in zip(placeholders[4:], block_mask.mask_mod_buffers, strict=True):
        seed[p] = buffer if isinstance(buffer, Node) else _constant(buffer)
    reader = IndexReader(seed, Grid(graph, grid))
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    mask = read_model_mask(reader, output, "keep", lq, lk, check_documents=True)
    if isinstance(mask, str):
        return f"mask_mod: {mask}"
    if not mask.parts and not _without_blocks(block_mask):
        return ("the BlockMask's mask_mod keeps every entry: its blocks alone decide "
                "(BlockMask.from_kv_blocks), and the pass does not read them")
    return mask


def block_mask_nodes(call: FlexCall) -> tuple[Node, ...]:
    """The block mask's tensors in the graph: once the call is rewritten they feed nothing,
    and what computed them only for this call can go."""
    m = call.block_mask
    values = (m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices,
              m.q_num_blocks, m.q_indices, m.full_q_num_blocks, m.full_q_indices)
    return tuple(v for v in values if isinstance(v, Node))


def _without_blocks(block_mask: FlexBlockMask) -> bool:
    return block_mask.q_block == _NO_BLOCKS and block_mask.kv_block == _NO_BLOCKS


def _constant(value: Any) -> IndexValue | None:
    if isinstance(value, bool):
        return IndexValue(sympy.true if value else sympy.false, ())
    if isinstance(value, int):
        return IndexValue(sympy.Integer(value), ())
    return None
