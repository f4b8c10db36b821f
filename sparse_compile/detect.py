"""Finding softmax(Q Kᵀ)V in the FX graphs Dynamo hands to a backend.

``find_sites(gm)`` returns one ``AttentionSite`` per attention it recognises: every
``F.scaled_dot_product_attention`` call, and every softmax whose input is a product of two
tensors (through scaling, masks, biases and casts) and whose output, through casts and
dropout, is multiplied with a third. A site carries either a recipe for the rewrite (``reason
is None``) or the reason it must stay as it is. What is proven before a site is rewritable:

- the softmax runs over the key axis (the last axis of the scores);
- between the product and the softmax the scores only go through an affine map
  ``a·S + b``: multiplication/division by numbers or by tensors constant along the key axis,
  additive biases, ``masked_fill``/``where`` with a large negative fill, dtype casts;
- no intermediate result is used anywhere else (attention weights returned or stored);
- q, k and v have consistent shapes, and the same head dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from . import graph_ops as ops
from .einsum import read_output_einsum, read_scores_einsum
from .mha import mha_arguments, mha_site_reason
from .operands import Operand, product_operands, shapes_reason

# masked_fill / where fills at or below this are treated as "masked out".
MASK_FILL_THRESHOLD = -1e4


@dataclass(frozen=True)
class BatchView:
    """A reshape that only regroups the batch axes (``[B·H, L, L] -> [B, H, L, L]``):
    ``args`` are the graph values of the new batch sizes, ``sizes`` their example values."""

    args: tuple[Any, ...]
    sizes: tuple[Any, ...]


def batch_view(node: Node) -> BatchView | None:
    """The ``BatchView`` of a reshape/view node, or None if it touches the last two axes."""
    if not ops.is_reshape(node) or node.target in ("flatten", torch.flatten):
        return None
    before, after = ops.tensor_value(node.args[0]), ops.tensor_value(node)
    if before is None or after is None or after.dim() not in (3, 4):
        return None
    if tuple(before.shape[-2:]) != tuple(after.shape[-2:]):
        return None
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = tuple(shape[0])
    if len(shape) != after.dim():
        return None
    return BatchView(tuple(shape[:-2]), tuple(after.shape[:-2]))


@dataclass
class AttentionSite:
    """One attention found in a graph, normalised to the sparse op's arguments.

    ``q``, ``k``, ``v`` bring graph values to ``[batch..., L, D]`` (batch is ``[B, H]`` for
    4-D attention, ``[B·H]`` for 3-D). The scores the model computes equal
    ``scale · (q·Πfactors) kᵀ + bias`` where ``bias`` is the score chain replayed on zeros
    (``bias_steps``, starting from ``bias_start``), plus ``attn_mask`` and ``is_causal`` for
    ``scaled_dot_product_attention``.
    """

    anchor: Node
    output: Node
    form: str
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    q_factors: list[tuple[str, Any]] = field(default_factory=list)
    scale: float | None = None
    bias_steps: list[tuple[Node, int]] = field(default_factory=list)
    bias_start: tuple[Node, Any] | None = None
    attn_mask: Any = None
    is_causal: bool = False
    dropout_p: float = 0.0
    out_perm: tuple[int, ...] | None = None
    score_view: BatchView | None = None
    shifts: set[Node] = field(default_factory=set)
    weights_view: BatchView | None = None
    nodes: list[Node] = field(default_factory=list)
    reason: str | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias_start is not None or any(
            not (ops.is_mul(n) or ops.is_div(n) or ops.is_cast_or_identity(n))
            for n, _ in self.bias_steps
        )


def find_sites(gm: GraphModule) -> list[AttentionSite]:
    """All attention sites of ``gm``, in graph order, rewritable or not."""
    sites = []
    for node in gm.graph.nodes:
        if ops.is_sdpa(node):
            sites.append(_sdpa_site(node))
        elif ops.is_mha(node):
            sites.append(_mha_site(node))
        elif ops.is_softmax(node):
            site = _softmax_site(node)
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


# --- softmax(Q Kᵀ) V ----------------------------------------------------------------------

_MAX_CHAIN = 16


def _score_path(node: Any, depth: int = 0) -> list[Node] | None:
    """Nodes from a product to ``node`` through score-chain ops, or None."""
    if not isinstance(node, Node) or depth > _MAX_CHAIN:
        return None
    if ops.is_product(node):
        return [node]
    if not _is_chain_op(node):
        return None
    for parent in node.all_input_nodes:
        path = _score_path(parent, depth + 1)
        if path is not None:
            return [*path, node]
    return None


def _is_chain_op(node: Node) -> bool:
    checks: tuple[Callable[[Any], bool], ...] = (
        ops.is_mul, ops.is_div, ops.is_add, ops.is_sub, ops.is_masked_fill, ops.is_where,
        ops.is_cast_or_identity, ops.is_tanh, ops.is_reshape,
    )
    return any(check(node) for check in checks)


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


def _softmax_site(softmax: Node) -> AttentionSite | None:
    scores_in = ops.arg(softmax, 0, "input")
    chain = _score_path(scores_in)
    post, pv, elsewhere = _weights_path(softmax)
    if chain is None and pv is None:
        return None
    site = AttentionSite(anchor=softmax, output=pv if pv is not None else softmax,
                         form="softmax")
    if chain is None:
        site.reason = "the softmax input is not a recognised Q·Kᵀ product"
        return site
    if pv is None:
        site.reason = "the attention weights are not multiplied with values"
        return site
    product, steps = chain[0], chain[1:]
    site.form = _form_name(product)
    site.nodes = [*chain, softmax, *post, pv]
    site.reason = (
        _softmax_dim_reason(softmax)
        or _read_scores(site, product)
        or _read_steps(site, product, steps)
        or _single_use_reason(chain, site.nodes, elsewhere)
        or _read_post(site, post)
        or _read_output(site, pv, post[-1] if post else softmax)
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


def _softmax_dim_reason(softmax: Node) -> str | None:
    dim = ops.arg(softmax, 1, "dim")
    ndim = ops.tensor_value(softmax).dim()
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


def _read_steps(site: AttentionSite, product: Node, steps: list[Node]) -> str | None:
    """Check each score-chain op is affine in the scores and record how to replay it."""
    score = product
    for node in steps:
        index = next(i for i, a in enumerate(node.args) if a is score)
        reason = _step_reason(site, node, index)
        if reason is not None:
            return reason
        if not (ops.is_sub(node) and node.args[1] in site.shifts):
            site.bias_steps.append((node, index))
        score = node
    return None


def _independent(x: Any, product: Node) -> bool:
    return not isinstance(x, Node) or product not in ops.ancestors(x)


def _step_reason(site: AttentionSite, node: Node, index: int) -> str | None:
    product = site.nodes[0]
    others = [a for i, a in enumerate(node.args) if i != index] + list(node.kwargs.values())
    if ops.is_sub(node) and index == 0 and _row_shift(site, node.args[1]):
        return None
    if not all(_independent(o, product) for o in others):
        return f"{node.name} combines the scores with a value computed from them"
    if ops.is_tanh(node):
        return ("logit soft-capping (tanh) is not affine in the scores: the sparse op "
                "cannot express it")
    if ops.is_cast_or_identity(node):
        return None
    if ops.is_reshape(node):
        view = batch_view(node) if index == 0 else None
        if view is None or site.score_view is not None:
            return f"{node.name} reshapes the scores beyond regrouping batch axes"
        site.score_view = view
        return None
    if ops.is_mul(node) or (ops.is_div(node) and index == 0):
        return _factor_reason(site, node, node.args[1 - index], ops.is_div(node))
    if ops.is_add(node) or (ops.is_sub(node) and index == 0):
        return _bias_shape_reason(node, node.args[1 - index])
    if ops.is_masked_fill(node) and index == 0:
        return _fill_reason(ops.arg(node, 2, "value"))
    if ops.is_where(node) and index in (1, 2):
        return _fill_reason(node.args[3 - index])
    return f"{node.name} ({node.target}) is not an affine map of the scores"


def _row_shift(site: AttentionSite, shift: Any) -> bool:
    """Whether ``shift`` is the row maximum of the scores so far (the "stable softmax" done by
    hand). Softmax is invariant to per-row shifts, so the step is exact to drop; its nodes
    join the site."""
    source = ops.row_max_source(shift)
    if source is None or source not in site.nodes:
        return False
    node = shift
    while node is not source:
        site.nodes.append(node)
        site.shifts.add(node)
        node = node.args[0]
    return True


def _factor_reason(site: AttentionSite, node: Node, factor: Any, divide: bool) -> str | None:
    number = factor if isinstance(factor, (int, float)) else None
    if number is not None:
        if number == 0:
            return "the scores are multiplied by zero"
        site.scale = site.scale / number if divide else site.scale * number
        return None
    t = ops.tensor_value(factor)
    if t is not None and t.dim() > 0 and t.shape[-1] != 1:
        return f"{node.name} scales the scores differently per key"
    site.q_factors.append(("div" if divide else "mul", factor))
    return None


def _bias_shape_reason(node: Node, bias: Any) -> str | None:
    out, b = ops.tensor_value(node), ops.tensor_value(bias)
    if b is not None and b.dim() > out.dim():
        return f"{node.name} broadcasts the scores to a larger shape"
    return None


def _fill_reason(fill: Any) -> str | None:
    number = ops.constant_number(fill)
    if number is None or number > MASK_FILL_THRESHOLD:
        return f"a mask fills scores with {fill!r}, not a large negative constant"
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
        parts = parts[2:]
    return ".".join(parts)
