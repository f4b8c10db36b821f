"""Finding softmax(Q Kᵀ)V in the FX graphs Dynamo hands to a backend.

``find_sites(gm)`` returns one ``AttentionSite`` per attention it recognises: every
``F.scaled_dot_product_attention`` call, and every softmax whose input is a product of two
tensors (through scaling, masks, biases and casts) and whose output, through casts and
dropout, is multiplied with a third. The softmax may be ``softmax``, ``exp(log_softmax)`` or
written out with ``exp`` and a division by the sum (``sparse_compile.fx.softmax``, which also
returns the forms recognised only in part, reported with their reason). A site carries either
a recipe for the rewrite (``reason is None``) or the reason it must stay as it is. What is
proven before a site is rewritable:

- the softmax runs over the key axis (the last axis of the scores), its exp and its sum alike;
- between the product and the softmax the scores only go through an affine map
  ``a·S + b``: multiplication/division by numbers or by tensors constant along the key axis,
  additive biases, ``masked_fill``/``where`` with a large negative fill, dtype casts,
  reshapes that only regroup batch axes, and subtraction of the row maximum (dropped: softmax
  ignores per-row shifts); or logit soft-capping ``c · tanh(S / c)`` of the scaled product
  before any bias (Gemma 2), which the op computes itself; any other ``tanh`` is refused;
- no intermediate result is used anywhere else (attention weights returned or stored);
- q, k and v have consistent shapes, and the same head dimension.

``nn.MultiheadAttention`` reaches the backend as one ``F.multi_head_attention_forward`` call;
it is a site of its own (``form="mha"``, see ``sparse_compile.fx.mha``). So is every
FlexAttention call (``form="flex"``): rewritable when its ``mask_mod`` and ``score_mod`` are
proven (``sparse_compile.fx.flex_site``), else left to FlexAttention with the reason.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.einsum import read_output_einsum, read_scores_einsum
from sparse_compile.fx.flex import FlexCall, read_flex_call
from sparse_compile.fx.flex_site import read_flex_site
from sparse_compile.fx.mha import mha_arguments, mha_site_reason
from sparse_compile.fx.operands import Operand, product_operands, shapes_reason
from sparse_compile.fx.score_chain import read_steps, score_path
from sparse_compile.fx.site import AttentionSite, BatchView, batch_view
from sparse_compile.fx.softmax import Softmax, find_softmaxes


def find_sites(gm: GraphModule) -> list[AttentionSite]:
    """All attention sites of ``gm``, in graph order, rewritable or not."""
    sites = []
    softmaxes = find_softmaxes(gm.graph)
    for node in gm.graph.nodes:
        if ops.is_sdpa(node):
            sites.append(_sdpa_site(node))
        elif ops.is_mha(node):
            sites.append(_mha_site(node))
        elif ops.is_flex_attention(node):
            sites.append(_flex_site(read_flex_call(gm, node)))
        elif node in softmaxes:
            site = _softmax_site(softmaxes[node])
            if site is not None:
                sites.append(site)
    return sites


# --- scaled_dot_product_attention ---------------------------------------------------------


def _sdpa_site(node: Node) -> AttentionSite:
    site = AttentionSite(anchor=node, output=node, form="sdpa", nodes=[node])
    site.q, site.k, site.v = (Operand(ops.arg(node, i, n)) for i, n in
                              enumerate(("query", "key", "value")))
    site.attn_mask = ops.arg(node, 3, "attn_mask")
    dropout = ops.arg(node, 4, "dropout_p", 0.0)
    site.is_causal = ops.arg(node, 5, "is_causal", False)
    site.scale = ops.arg(node, 6, "scale")
    if not isinstance(dropout, (int, float)) or not isinstance(site.is_causal, bool):
        site.reason = "dropout_p / is_causal are not constants"
        return site
    site.dropout_p = float(dropout)
    if site.scale is not None and not isinstance(site.scale, (int, float)):
        site.q_factors.append(("mul", site.scale))
        site.scale = 1.0
    site.reason = shapes_reason(site.q, site.k, site.v)
    return site


def _mha_site(node: Node) -> AttentionSite:
    site = AttentionSite(anchor=node, output=node, form="mha", nodes=[node])
    arguments = mha_arguments(node)
    # [L, N, E] -> [N, L, E] for the report; the replacement takes the call's own arguments.
    site.q, site.k = Operand(arguments["query"], (1, 0, 2)), Operand(arguments["key"], (1, 0, 2))
    site.reason = mha_site_reason(arguments)
    return site


def _flex_site(call: FlexCall) -> AttentionSite:
    """A FlexAttention call: rewritable when what it computes is proven."""
    site = AttentionSite(anchor=call.node, output=call.node, form="flex", nodes=[call.node])
    site.q, site.k, site.v = Operand(call.query), Operand(call.key), Operand(call.value)
    site.reason = shapes_reason(site.q, site.k, site.v) or read_flex_site(site, call)
    return site


# --- softmax(Q Kᵀ) V ----------------------------------------------------------------------

_MAX_CHAIN = 16


def _weights_path(softmax: Node) -> tuple[list[Node], Node | None, bool]:
    """Follow the weights forward: (post-softmax nodes, the P·V product or None, whether the
    weights, or anything on the way, have another user)."""
    path, node, elsewhere = [], softmax, False
    for _ in range(_MAX_CHAIN):
        users = list(node.users)
        elsewhere = elsewhere or len(users) != 1
        nxt = next((u for u in users if ops.is_product(u)), None)
        if nxt is not None:
            return path, nxt, elsewhere
        nxt = next((u for u in users if ops.is_dropout(u) or ops.is_cast_or_identity(u)
                    or batch_view(u) is not None), None)
        if nxt is None:
            return path, None, elsewhere
        path.append(nxt)
        node = nxt
    return path, None, elsewhere


def _softmax_site(softmax: Softmax) -> AttentionSite | None:
    chain = score_path(softmax.input)
    post, pv, elsewhere = _weights_path(softmax.output)
    if chain is None and pv is None:
        return None
    site = AttentionSite(anchor=softmax.output,
                         output=pv if pv is not None else softmax.output, form="softmax")
    if softmax.reason is not None:
        site.reason = softmax.reason
        return site
    if chain is None:
        site.reason = "the softmax input is not a recognised Q·Kᵀ product"
        return site
    if pv is None:
        site.reason = "the attention weights are not multiplied with values"
        return site
    product, steps = chain[0], chain[1:]
    site.form = _form_name(product)
    site.nodes = [*chain, *softmax.nodes, *post, pv]
    inner = [*chain, *softmax.nodes[:-1]]
    site.reason = (
        _softmax_dim_reason(softmax)
        or _read_scores(site, product)
        or read_steps(site, product, steps)
        or _single_use_reason(inner, site.nodes, elsewhere)
        or _read_post(site, post)
        or _read_output(site, pv, post[-1] if post else softmax.output)
        or _apply_views(site)
        or shapes_reason(site.q, site.k, site.v)
    )
    return site


def _form_name(product: Node) -> str:
    for name, check in (("einsum", ops.is_einsum), ("baddbmm", ops.is_baddbmm),
                        ("bmm", ops.is_bmm)):
        if check(product):
            return name
    return "matmul"


def _softmax_dim_reason(softmax: Softmax) -> str | None:
    dim = softmax.dim
    ndim = ops.tensor_value(softmax.output).dim()
    if not isinstance(dim, int) or dim % ndim != ndim - 1:
        return f"softmax over axis {dim}, not over the key axis (the last of {ndim})"
    if ndim not in (3, 4):
        return f"{ndim}-D scores (only 3-D and 4-D attention is rewritten)"
    return None


def _single_use_reason(chain: list[Node], site_nodes: list[Node],
                       weights_elsewhere: bool) -> str | None:
    """Scores and weights may only feed the site itself (``type_as(scores)`` after the
    softmax reads a dtype only, and goes away with the site)."""
    inside = set(site_nodes)
    if weights_elsewhere or any(set(n.users) - inside for n in chain):
        return "the attention weights or scores are used elsewhere (returned or stored)"
    return None


def _read_scores(site: AttentionSite, product: Node) -> str | None:
    """Fill ``site.q``/``site.k`` (and scale/bias of baddbmm) from the Q·Kᵀ product."""
    site.scale = 1.0
    if ops.is_einsum(product):
        equation, operands = ops.einsum_operands(product)
        if len(operands) != 2:
            return "einsum with more than two operands"
        try:
            read = read_scores_einsum(equation, [ops.tensor_value(o).dim() for o in operands])
        except ValueError as err:
            return str(err)
        site.q, site.k = Operand(operands[0], read.q_perm), Operand(operands[1], read.k_perm)
        return None
    offset = 1 if ops.is_baddbmm(product) else 0
    a = ops.arg(product, offset, "batch1" if offset else "input")
    b = ops.arg(product, offset + 1, "batch2" if offset else "other")
    site.q, site.k = product_operands(a, b)
    if site.k is None:
        return "the product's operands are not both 3-D or both 4-D"
    if offset:
        beta = product.kwargs.get("beta", 1)
        alpha = product.kwargs.get("alpha", 1)
        if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
            return "baddbmm with non-constant alpha/beta"
        site.scale = float(alpha)
        if beta != 0:
            site.bias_start = (product.args[0], beta)
    return None


def _read_post(site: AttentionSite, post: list[Node]) -> str | None:
    for node in post:
        if ops.is_reshape(node):
            if site.weights_view is not None:
                return "the attention weights are reshaped twice"
            site.weights_view = batch_view(node)
        if ops.is_dropout(node):
            p = ops.arg(node, 1, "p", 0.5)
            training = ops.arg(node, 2, "training" if node.target is not torch.dropout
                               else "train", True)
            if not isinstance(p, (int, float)) or not isinstance(training, bool):
                return "dropout with non-constant p / training"
            if training and p > 0:
                site.dropout_p = float(p)
    return None


def _read_output(site: AttentionSite, pv: Node, weights: Node) -> str | None:
    if ops.is_einsum(pv):
        equation, operands = ops.einsum_operands(pv)
        if len(operands) != 2 or weights not in operands:
            return "the P·V einsum does not take the weights as an operand"
        index = operands.index(weights)
        try:
            read = read_output_einsum(
                equation, [ops.tensor_value(o).dim() for o in operands], index
            )
        except ValueError as err:
            return str(err)
        site.v = Operand(operands[1 - index], read.v_perm)
        site.out_perm = read.out_perm
        return None
    if ops.is_baddbmm(pv) or ops.arg(pv, 0, "input") is not weights:
        return "the weights are not the left operand of the P·V product"
    v = ops.arg(pv, 1, "other" if ops.is_matmul(pv) else "mat2")
    if ops.tensor_value(v).dim() != ops.tensor_value(weights).dim():
        return "the values do not have the weights' number of dimensions"
    site.v = Operand(v)
    return None


def _apply_views(site: AttentionSite) -> str | None:
    """Bring q, k, v to the softmax's layout when batch axes were regrouped on the way."""
    if site.score_view is not None:
        site.q.batch = site.k.batch = site.score_view
    if site.weights_view is not None:
        site.v.batch = site.score_view or BatchView(None, site.q.shape()[:-2])
    return None


def module_info(node: Node) -> tuple[str, list[type]]:
    """``(module path, classes outermost → innermost)`` of the module that ran ``node``.

    Built-in ``torch.nn`` leaves (``Softmax``, ``Dropout``, ``Linear``) are skipped so that the
    path names the attention module itself, e.g. ``model.layers.0.self_attn``.
    """
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    classes = [cls for _, cls in stack if isinstance(cls, type)]
    user = [(p, c) for p, c in stack
            if not (isinstance(c, type) and c.__module__.startswith("torch.nn.modules"))]
    path = user[-1][0] if user else ""
    return _normalise_path(path), classes


def _normalise_path(path: str) -> str:
    import re

    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    parts = [p for p in path.split(".") if p]
    if parts and parts[0] in ("L", "G"):
        # Drop the root: ``L['self']``, or ``L['args'][0]`` when a wrapper calls the forward.
        parts = parts[3:] if len(parts) > 2 and parts[1] in ("args", "kwargs") else parts[2:]
    return ".".join(parts)
