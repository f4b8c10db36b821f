"""Replacing an attention site's nodes by one call of the sparse attention op.

The call is ``sparse_compile.functional.attention(q, k, v, pattern_text, scale=, bias=,
dropout_p=)``; AOTAutograd traces it into the ``torch.library`` op behind it. The model's own
masks and biases are kept: the score chain between Q·Kᵀ and the softmax is affine,
``f(S) = a·S + f(0)``, so replaying it on a zero scalar gives exactly the additive bias
(broadcast only as far as the model's own bias tensors are), while the factor ``a`` goes into
``scale`` (numbers) or onto q (tensors constant along the key axis).
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.functional import attention, placed_attention
from sparse_compile.fx.flex_rewrite import rewrite_flex_site
from sparse_compile.fx.fold import MaskPlan
from sparse_compile.fx.mha import multi_head_attention_forward
from sparse_compile.fx.operands import Operand, peel_gqa
from sparse_compile.fx.placed import placed_arguments
from sparse_compile.fx.site import AttentionSite

_OUT_OF_PLACE = {
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}


def _sizes(graph: Graph, x: Any, dims: range) -> list[Node]:
    return [graph.call_method("size", (x, d)) for d in dims]


def _regroup(graph: Graph, x: Any, batch: tuple[Any, ...]) -> Node:
    """``x [..., L, D]`` reshaped to ``[*batch, L, D]``."""
    return graph.call_method("reshape", (x, *batch, *_sizes(graph, x, range(-2, 0))))


def _materialise(graph: Graph, operand: Operand, like: Any = None) -> Any:
    """The operand in ``[batch..., L, D]``; ``like`` supplies batch sizes a view leaves open."""
    x = operand.node
    if operand.perm is not None:
        x = graph.call_method("permute", (x, *operand.perm))
    if operand.batch is not None:
        batch = operand.batch.args
        if batch is None:
            batch = _sizes(graph, like, range(len(operand.batch.sizes)))
        x = _regroup(graph, x, batch)
    return x


def _replay_bias(graph: Graph, site: AttentionSite, like: Any) -> Any:
    """The score chain applied to zero instead of Q·Kᵀ: the model's additive bias.

    ``like`` is q in the product's layout (dtype, device and batch sizes of the scores)."""
    scalar = site.bias_start is None  # still a 0-dim tensor: batch views do not apply
    if site.bias_start is not None:
        start, beta = site.bias_start
        current = start if beta == 1 else graph.call_function(operator.mul, (start, beta))
    else:
        current = graph.call_method("new_zeros", (like, ()))
    for node, index in site.bias_steps:
        scalar = scalar and (ops.is_mul(node) or ops.is_div(node) or ops.is_cast_or_identity(node)
                             or ops.is_reshape(node))
        if ops.is_reshape(node):
            if not scalar:
                ndim = len(ops.tensor_value(node.args[0]).shape)
                batch = _sizes(graph, like, range(ndim - 2))
                current = graph.call_method("expand", (current, *batch, -1, -1))
                current = _regroup(graph, current, site.score_view.args)
            continue
        args = list(node.args)
        args[index] = current
        target = node.target
        if node.op == "call_function":
            target = _OUT_OF_PLACE.get(target, target)
        elif isinstance(target, str) and target.endswith("_"):
            target = target[:-1]
        current = graph.create_node(node.op, target, tuple(args), dict(node.kwargs))
    return current


def _causal_top_left(graph: Graph, q: Any, k: Any) -> Node:
    """SDPA's ``is_causal`` mask (aligned top-left) as a boolean keep-mask [Lq, Lk]."""
    lq = graph.call_method("size", (q, -2))
    lk = graph.call_method("size", (k, -2))
    device = ops.tensor_value(q).device
    ones = graph.call_function(torch.ones, (lq, lk), {"dtype": torch.bool, "device": device})
    return graph.call_method("tril", (ones,))


def _lengths_equal(q: Operand, k: Operand) -> bool:
    return ops.same_length(q.shape()[-2], k.shape()[-2])


def _conjuncts(pattern: Any) -> list[Any]:
    children = getattr(pattern, "children", None)
    if type(pattern).__name__ == "And" and children is not None:
        return [part for child in children() for part in _conjuncts(child)]
    return [pattern]


def site_pattern(site: AttentionSite, pattern: Any) -> Any:
    """The pattern the op applies: ``pattern & causal`` for SDPA's ``is_causal`` when the
    causal mask's alignment does not matter (Lq == Lk); ``pattern`` itself when it already
    has ``causal`` as a conjunct."""
    if site.is_causal and _lengths_equal(site.q, site.k):
        from sparse_compile.patterns import causal

        if dense_pattern(pattern):
            return causal
        return pattern if causal in _conjuncts(pattern) else pattern & causal
    return pattern


def dense_pattern(pattern: Any) -> bool:
    """Whether ``pattern`` is the ``dense`` primitive."""
    from sparse_compile.patterns import dense

    return pattern == dense


def rewrite_site(gm: GraphModule, site: AttentionSite, pattern: Any,
                 plan: MaskPlan | None = None) -> Node:
    """Replace ``site`` in ``gm.graph`` by the sparse op with ``pattern`` (already passed
    through ``site_pattern``, and combined with the pattern of ``plan``'s folded mask: then
    the mask is dropped); the op gets ``plan``'s positions, key mask and documents. Returns
    the new output node."""
    graph = gm.graph
    if site.form == "mha":
        return _rewrite_mha(graph, site, pattern)
    if site.form == "flex":
        return rewrite_flex_site(gm, site, pattern, plan)
    ndim = len(site.q.shape())
    chain = site
    if plan is not None and plan.removed:
        chain = replace(site, bias_steps=[s for s in site.bias_steps if s[0] not in plan.removed])
    placed_by = plan if plan is not None and plan.mask is not None else None
    with graph.inserting_before(site.output):
        q_product = _materialise(graph, replace(site.q, batch=None))
        q = _materialise(graph, site.q)
        for kind, factor in site.q_factors:
            fn = operator.mul if kind == "mul" else operator.truediv
            q = graph.call_function(fn, (q, factor))
        k_operand, v_operand = peel_gqa(site.k, site.v)
        k, v = _materialise(graph, k_operand), _materialise(graph, v_operand, like=q)
        bias = _replay_bias(graph, chain, q_product) if chain.has_bias else None
        if site.form == "sdpa":
            bias = None if placed_by is not None and plan.drops_mask else site.attn_mask
            if site.is_causal and placed_by is None and not _lengths_equal(site.q, site.k):
                bias = _causal_top_left(graph, q, k)
        if ndim == 3:
            q, k, v = (graph.call_method("unsqueeze", (t, 0)) for t in (q, k, v))
        if getattr(pattern, "is_dynamic", False):  # dma / topk: see dma_sites
            from sparse_compile.dynamic_mask.sites import dynamic_site_call

            out = dynamic_site_call(graph, site, pattern, q, k, v, bias)
        elif placed_by is not None:
            placed = placed_arguments(graph, placed_by.mask, pattern, q, k, bias)
            out = graph.call_function(
                placed_attention, (q, k, v, str(pattern)),
                {"scale": site.scale, "dropout_p": site.dropout_p,
                 **({"softcap": site.softcap} if site.softcap else {}), **placed},
            )
        else:
            out = graph.call_function(
                attention,
                (q, k, v, str(pattern)),
                {"scale": site.scale, "bias": bias, "dropout_p": site.dropout_p,
                 **({"softcap": site.softcap} if site.softcap else {})},
            )
        if ndim == 3:
            out = graph.call_method("squeeze", (out, 0))
        if site.weights_view is not None:
            v_batch = len(ops.tensor_value(site.v.node).shape) - 2
            out = _regroup(graph, out, tuple(_sizes(graph, site.v.node, range(v_batch))))
        if site.out_perm is not None:
            out = graph.call_method("permute", (out, *site.out_perm))
        out = graph.call_method("to", (out, ops.tensor_value(site.output).dtype))
    site.output.replace_all_uses_with(out)
    _erase_unused(graph, site)
    return out


def _rewrite_mha(graph: Graph, site: AttentionSite, pattern: Any) -> Node:
    node = site.output
    with graph.inserting_before(node):
        out = graph.call_function(multi_head_attention_forward, (str(pattern), *node.args),
                                  dict(node.kwargs))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _erase_unused(graph: Graph, site: AttentionSite) -> None:
    """Erase the site's old nodes (and the GQA/transposes feeding only them)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = set(site.nodes)
    for node in site.nodes:
        for parent in node.all_input_nodes:
            candidates |= _producers(parent)
    for node in sorted(candidates, key=lambda n: order.get(n, -1), reverse=True):
        if node.graph is graph and not node.users and node.op in ("call_function",
                                                                  "call_method"):
            graph.erase_node(node)


def _producers(node: Any, depth: int = 5) -> set[Node]:
    """``node`` and the few nodes right above it (transposes, expand, reshape)."""
    if not isinstance(node, Node) or depth == 0 or node.op == "placeholder":
        return set()
    found = {node}
    for parent in node.all_input_nodes:
        found |= _producers(parent, depth - 1)
    return found
