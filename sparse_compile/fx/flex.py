"""FlexAttention calls in the graphs Dynamo captures, read into their operands.

``torch.nn.attention.flex_attention.flex_attention(q, k, v, score_mod, block_mask, ...)``
reaches a backend as one call of the higher-order op ``torch.ops.higher_order.flex_attention``
whose result is the tuple ``(out, logsumexp, max)``. On torch 2.13 its arguments are

    (query, key, value, score_mod, block_mask, scale, kernel_options,
     score_mod_other_buffers, mask_mod_other_buffers)

- ``score_mod`` and the block mask's ``mask_mod`` are ``get_attr`` nodes naming submodules of the
  graph (``score_mod_0``, ``mask_fn_0``): small graphs of 0-dim tensors,
  ``score_mod(score, b, h, q_idx, kv_idx, *score_mod_other_buffers)`` and
  ``mask_mod(b, h, q_idx, kv_idx, *mask_mod_other_buffers)``; the buffers are the tensors they
  read from outside (graph values: document ids, bias tables);
- ``block_mask`` is ``BlockMask.as_tuple()``: ``(Q_LEN, KV_LEN, kv_num_blocks, kv_indices,
  full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
  full_q_indices, dq_write_order, dq_write_order_full, dq_kv_order, dq_kv_order_spt,
  Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod)``; the dQ write-order entries (None unless asked for)
  are skipped here, and the block sizes and ``mask_mod`` are read from the end of the tuple so
  that a layout without them reads the same. The tensors are graph values: inputs of the graph
  when the mask was built outside it, nodes when ``create_block_mask`` ran inside;
- ``scale`` is a number (``1 / sqrt(head dim)`` when the caller gave none), or a graph value
  under dynamic shapes;
- ``kernel_options`` a dict (``OUTPUT_LOGSUMEXP``, ``BACKEND``, ...). ``enable_gqa`` is not
  passed on: it is only checked before the call, and the op shares key/value heads whenever
  their count divides the query heads'. ``return_lse`` shows as a use of the logsumexp output
  (a use whose result nothing reads does not count: Dynamo keeps ``lse.to(dtype)`` nodes that
  the model computes and drops).

``find_flex_calls(gm)`` returns one ``FlexCall`` per call (``read_flex_call`` reads one);
``flex_site.py`` proves what a call computes and ``flex_rewrite.py`` replaces it by the op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

import sparse_compile.fx.graph_ops as ops

# The block-mask tensors that every supported torch passes, in order, after the lengths.
_BLOCK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                  "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@dataclass(frozen=True)
class FlexBlockMask:
    """The ``BlockMask`` of one call as graph values.

    ``q_length``/``kv_length`` are the lengths the mask was built for (ints, or graph values
    under dynamic shapes); ``q_block``/``kv_block`` its tile sizes; the ``*_num_blocks``
    ``[B, H, rows]`` and ``*_indices`` ``[B, H, rows, cols]`` tensors are the block layout
    (``full_*`` None when the mask has no separate full blocks); ``mask_mod`` the mask function
    as a graph, ``mask_mod_buffers`` the tensors it reads besides its four indices.
    """

    q_length: Any
    kv_length: Any
    q_block: Any
    kv_block: Any
    kv_num_blocks: Any
    kv_indices: Any
    full_kv_num_blocks: Any
    full_kv_indices: Any
    q_num_blocks: Any
    q_indices: Any
    full_q_num_blocks: Any
    full_q_indices: Any
    mask_mod: GraphModule
    mask_mod_buffers: tuple[Any, ...] = ()


@dataclass(frozen=True)
class FlexCall:
    """One ``flex_attention`` call: ``node`` (the higher-order op, whose result is
    ``(out, logsumexp, max)``), ``query`` ``[B, Hq, Lq, D]``, ``key`` ``[B, Hkv, Lk, D]`` and
    ``value`` ``[B, Hkv, Lk, Dv]`` graph values, ``score_mod`` as a graph with the tensors it
    reads (``score_mod_buffers``), the ``block_mask``, ``scale``, ``kernel_options``,
    ``enable_gqa`` (Hq ≠ Hkv), ``return_lse`` / ``return_max`` (the logsumexp / row-maximum
    output is used) and ``outputs``: the ``getitem`` nodes reading the result, by index."""

    node: Node
    query: Node
    key: Node
    value: Node
    score_mod: GraphModule
    score_mod_buffers: tuple[Any, ...]
    block_mask: FlexBlockMask
    scale: Any
    kernel_options: dict[str, Any]
    enable_gqa: bool
    return_lse: bool
    return_max: bool = False
    outputs: tuple[tuple[int, Node], ...] = ()


def find_flex_calls(gm: GraphModule) -> list[FlexCall]:
    """Every ``flex_attention`` call of ``gm``, in graph order."""
    return [read_flex_call(gm, node) for node in gm.graph.nodes if ops.is_flex_attention(node)]


def read_flex_call(gm: GraphModule, node: Node) -> FlexCall:
    """The operands of the ``flex_attention`` call ``node`` of ``gm``."""
    query, key, value, score_mod, block_mask, scale, options, *buffers = node.args
    score_buffers, mask_buffers = (tuple(b) for b in (*buffers, (), ())[:2])
    heads = [ops.tensor_value(t).shape[-3] for t in (query, key)]
    outputs = tuple((u.args[1], u) for u in node.users if u.target is operator.getitem)
    return FlexCall(
        node=node, query=query, key=key, value=value,
        score_mod=_submodule(gm, score_mod), score_mod_buffers=score_buffers,
        block_mask=_read_block_mask(gm, tuple(block_mask), mask_buffers),
        scale=scale, kernel_options=dict(options), enable_gqa=heads[0] != heads[1],
        return_lse=any(i == 1 and is_read(u) for i, u in outputs),
        return_max=any(i == 2 and is_read(u) for i, u in outputs),
        outputs=outputs,
    )


def is_read(node: Node) -> bool:
    """Whether ``node``'s value reaches the graph's output or an operation with side effects
    (through any chain of users); False when everything computed from it is dropped."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if user.op == "output" or user.is_impure() or _in_place(user):
                return True
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def _in_place(node: Node) -> bool:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("__")


def _read_block_mask(gm: GraphModule, values: tuple[Any, ...],
                     mask_buffers: tuple[Any, ...]) -> FlexBlockMask:
    *body, q_block, kv_block, mask_mod = values
    lengths: list[Any] = [None, None]
    if len(body) > len(_BLOCK_TENSORS) and ops.tensor_value(body[0]) is None:
        lengths, body = body[:2], body[2:]
    tensors = dict(zip(_BLOCK_TENSORS, body, strict=False))
    return FlexBlockMask(q_length=lengths[0], kv_length=lengths[1], q_block=q_block,
                         kv_block=kv_block, **tensors, mask_mod=_submodule(gm, mask_mod),
                         mask_mod_buffers=mask_buffers)


def _submodule(gm: GraphModule, node: Node) -> GraphModule:
    """The graph a ``get_attr`` node names."""
    return gm.get_submodule(node.target)
