"""Replacing a FlexAttention call by one call of the sparse op.

The higher-order op returns ``(out, logsumexp, max)``, read through ``getitem`` nodes. In its
place goes one ``placed_attention`` call with the positions, key mask and document ids of the
folded ``mask_mod`` (``placed.py``), FlexAttention's scale (a number; a graph value multiplies
q) and the soft-cap of its ``score_mod``; keys and values keep their heads (GQA, and a
``repeat_kv`` before the call is peeled off). The op's output takes the place of ``out`` with
its dtype and memory layout (FlexAttention's output follows the query's stride order, which
the model's ``transpose(1, 2).contiguous()`` after it counts on). The unread logsumexp and
maximum, and everything computed from them only, go with the call, as do the ``get_attr``
nodes of its ``score_mod`` and ``mask_mod``. The block mask's tensors are left to
``fold.erase_dead_masks``: what computed them for this call only does not run.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.functional import placed_attention
from sparse_compile.fx.fold import MaskPlan, combine_patterns
from sparse_compile.fx.operands import Operand, peel_gqa
from sparse_compile.fx.placed import placed_arguments
from sparse_compile.fx.site import AttentionSite


def rewrite_flex_site(gm: GraphModule, site: AttentionSite, pattern: Any,
                      plan: MaskPlan | None) -> Node:
    """Replace the FlexAttention call of ``site`` (``site.flex``) in ``gm.graph`` by the op
    with ``pattern`` (the user's, combined with the folded ``mask_mod``'s) and ``plan``'s
    positions, key mask and documents; without a plan, those of the ``mask_mod`` (its pattern
    is then combined here). Returns the new output node."""
    graph = gm.graph
    call = site.flex.call
    outputs = dict(call.outputs)
    mods = (call.node.args[3], call.node.args[4][-1])  # score_mod, mask_mod: get_attr nodes
    with graph.inserting_before(call.node):
        q = call.query
        for kind, factor in site.q_factors:
            q = graph.call_function(operator.mul if kind == "mul" else operator.truediv,
                                    (q, factor))
        k, v = (operand.node for operand in peel_gqa(Operand(call.key), Operand(call.value)))
        mask = plan.mask if plan is not None and plan.mask is not None else site.flex.mask
        if plan is None:  # the mask_mod's pattern is not in ``pattern`` yet
            pattern = combine_patterns(pattern, mask.pattern)
        placed = placed_arguments(graph, mask, pattern, q, k, None)
        if site.alibi:
            placed["alibi"] = _alibi_slopes(graph, call, q)
        if site.relative:
            placed["rel_bias"] = _relative_table(graph, call, q, k)
        out = graph.call_function(
            placed_attention, (q, k, v, str(pattern)),
            {"scale": site.scale, **({"softcap": site.softcap} if site.softcap else {}),
             **placed})
        if 0 in outputs:
            out = _like(graph, out, ops.tensor_value(outputs[0]))
    for index, node in outputs.items():
        if index == 0:
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        else:  # the logsumexp and the maximum, unread
            _erase_with_users(graph, node)
    graph.erase_node(call.node)
    for attr in mods:
        if isinstance(attr, Node) and attr.op == "get_attr" and not attr.users:
            graph.erase_node(attr)
    return out


def _alibi_slopes(graph: Graph, call: Any, q: Node) -> Node:
    """The per-head ALiBi slopes ``[Hq]`` of a ``score_mod`` proven to be ``score +
    slope(h) · (kv_idx - q_idx)`` (``flex_score.py``): the score_mod itself run on every head
    at ``kv_idx - q_idx`` = 1 and at 0 (score 0), the difference being the slope."""
    module = call.node.args[3].target
    example = ops.tensor_value(q)
    heads = graph.call_function(torch.arange, (graph.call_method("size", (q, 1)),),
                                {"device": example.device})
    zero = graph.call_function(torch.zeros_like, (heads,))
    one = graph.call_function(torch.ones_like, (heads,))
    score = graph.call_function(torch.zeros_like, (heads,), {"dtype": torch.float32})
    buffers = tuple(call.score_mod_buffers)
    at_one = _returned_value(graph, graph.call_module(module, (score, zero, heads, zero, one,
                                                                *buffers)))
    at_zero = _returned_value(graph, graph.call_module(module, (score, zero, heads, zero, zero,
                                                                 *buffers)))
    slopes = graph.call_function(operator.sub, (at_one, at_zero))
    return graph.call_method("float", (slopes,))


def _relative_table(graph: Graph, call: Any, q: Node, k: Node) -> Node:
    """The op's relative-bias table ``[Hq, Lq + Lk - 1]`` of a ``score_mod`` proven to be
    ``score + table[(h,) q_idx - kv_idx + c]`` (``flex_score.py``): the score_mod itself run
    on every head at one (q_idx, kv_idx) pair of each difference (score 0), a gather of
    O(Hq · (Lq + Lk)) that keeps the table's gradient. Entry ``t`` is the difference
    ``q_idx - kv_idx = t - (Lk - 1)``: the op's index in the default alignment (the site
    checked it: ``flex_site.py``)."""
    module = call.node.args[3].target
    example = ops.tensor_value(q)
    sizes = (graph.call_method("size", (q, 1)), graph.call_method("size", (q, -2)),
             graph.call_method("size", (k, -2)))
    grid = graph.call_function(relative_inputs, sizes, {"device": example.device})
    inputs = tuple(graph.call_function(operator.getitem, (grid, i)) for i in range(5))
    table = _returned_value(graph, graph.call_module(
        module, (*inputs, *tuple(call.score_mod_buffers))))
    return table


def relative_inputs(hq: int, lq: int, lk: int, device: torch.device
                    ) -> tuple[torch.Tensor, ...]:
    """``(score, b, h, q_idx, kv_idx)`` for a ``score_mod`` on ``[Hq, Lq + Lk - 1]``: score 0,
    batch 0, head ``h`` along the rows and, along the columns, the pair of each difference
    ``q_idx - kv_idx = t - (Lk - 1)`` with both inside ``[0, Lq)`` / ``[0, Lk)``."""
    t = torch.arange(lq + lk - 1, device=device)
    kv_idx = (lk - 1 - t).clamp(min=0)
    q_idx = kv_idx + t - (lk - 1)
    heads = torch.arange(hq, device=device)[:, None]
    score = torch.zeros((hq, lq + lk - 1), device=device, dtype=torch.float32)
    return score, torch.zeros_like(heads), heads, q_idx[None, :], kv_idx[None, :]


def _returned_value(graph: Graph, result: Node) -> Node:
    """A submodule call's value (a graph module may return a one-element tuple)."""
    return graph.call_function(_first, (result,))


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple | list) else value


def _like(graph: Graph, out: Node, example: torch.Tensor | None) -> Node:
    """``out`` ``[B, H, Lq, D]`` (contiguous, q's dtype) with the dtype and stride order of
    FlexAttention's output ``example``."""
    if example is None:
        return out
    if not example.is_contiguous():
        strides = example.stride()
        order = sorted(range(example.dim()), key=lambda d: (-strides[d], d))
        inverse = sorted(range(example.dim()), key=order.__getitem__)
        out = graph.call_method("permute", (out, *order))
        out = graph.call_method("contiguous", (out,))
        out = graph.call_method("permute", (out, *inverse))
    return graph.call_method("to", (out, example.dtype))


def _erase_with_users(graph: Graph, node: Node) -> None:
    """Erase ``node`` and everything computed from it (unread: see ``flex.is_read``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in found:
                found.add(user)
                stack.append(user)
    for n in sorted(found, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
