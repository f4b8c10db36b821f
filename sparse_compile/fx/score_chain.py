"""Proving the ops between Q·Kᵀ and the softmax affine in the scores, and recording them.

Each op on the way must map the scores ``S`` to ``a·S + b``: products and quotients by numbers
(into ``site.scale``) or by tensors constant along the key axis (onto q), additive biases,
``masked_fill``/``where`` with a large negative fill, casts, batch regrouping views, and the
subtraction of the row maximum (dropped: softmax ignores per-row shifts). One exception to
affinity is recognised: logit soft-capping ``c · tanh(S' / c)`` (Gemma 2, Grok), where ``S'`` is
the scaled product with no bias yet, which the sparse op computes itself (``site.softcap``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.site import AttentionSite, batch_view

# masked_fill / where fills at or below this are treated as "masked out".
MASK_FILL_THRESHOLD = -1e4

_MAX_CHAIN = 16


def score_path(node: Any, depth: int = 0) -> list[Node] | None:
    """Nodes from a product to ``node`` through score-chain ops (product first), or None."""
    if not isinstance(node, Node) or depth > _MAX_CHAIN:
        return None
    if ops.is_product(node):
        return [node]
    if not _is_chain_op(node):
        return None
    for parent in node.all_input_nodes:
        path = score_path(parent, depth + 1)
        if path is not None:
            return [*path, node]
    return None


def _is_chain_op(node: Node) -> bool:
    checks: tuple[Callable[[Any], bool], ...] = (
        ops.is_mul, ops.is_div, ops.is_add, ops.is_sub, ops.is_masked_fill, ops.is_where,
        ops.is_cast_or_identity, ops.is_tanh, ops.is_reshape,
    )
    return any(check(node) for check in checks)


def read_steps(site: AttentionSite, product: Node, steps: list[Node]) -> str | None:
    """Check each score-chain op is affine in the scores and record how to replay it."""
    score, capping = product, None
    for node in steps:
        index = next(i for i, a in enumerate(node.args) if a is score)
        if capping is not None:
            reason = _cap_reason(site, node, capping)
            capping = None
        elif ops.is_tanh(node) and _independent_args(node, index, product):
            reason, capping = _tanh_reason(site), node
        else:
            reason = _step_reason(site, node, index)
            if reason is None and not (ops.is_sub(node) and node.args[1] in site.shifts):
                site.bias_steps.append((node, index))
        if reason is not None:
            return reason
        score = node
    if capping is not None:
        return _TANH_ALONE
    return None


_TANH_ALONE = "tanh of the scores without the soft-capping factor (c · tanh(s / c))"


def _independent_args(node: Node, index: int, product: Node) -> bool:
    others = [a for i, a in enumerate(node.args) if i != index] + list(node.kwargs.values())
    return all(_independent(o, product) for o in others)


def _tanh_reason(site: AttentionSite) -> str | None:
    """``tanh`` may only cap the scaled product itself: no bias, mask or earlier cap before it."""
    if site.softcap:
        return "the scores are soft-capped twice"
    if site.has_bias or site.score_view is not None:
        return "soft-capping after a bias, mask or reshape of the scores"
    return None


def _cap_reason(site: AttentionSite, node: Node, tanh: Node) -> str | None:
    """The op after ``tanh`` must multiply by the cap ``c > 0``: then ``site.scale`` (which holds
    the ``1 / c`` applied before the tanh) becomes the op's logit scale ``scale · c``."""
    cap = None
    if ops.is_mul(node):
        cap = ops.constant_number(node.args[1] if node.args[0] is tanh else node.args[0])
    if cap is None or cap <= 0:
        return _TANH_ALONE
    site.softcap = cap
    site.scale = site.scale * cap
    return None


def _independent(x: Any, product: Node) -> bool:
    return not isinstance(x, Node) or product not in ops.ancestors(x)


def _step_reason(site: AttentionSite, node: Node, index: int) -> str | None:
    product = site.nodes[0]
    others = [a for i, a in enumerate(node.args) if i != index] + list(node.kwargs.values())
    if ops.is_sub(node) and index == 0:
        if _row_shift(site, node.args[1]):
            return None
        shift = ops.max_source(node.args[1])
        if shift is not None and shift[0] in site.nodes:
            return (f"the scores minus their maximum over axis {shift[1]} "
                    f"(keepdim={shift[2]}): not a shift of each row over the key axis")
    if not all(_independent(o, product) for o in others):
        return f"{node.name} combines the scores with a value computed from them"
    if ops.is_tanh(node):
        return "tanh of the scores is not affine in them"
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
    if site.softcap:
        return f"{node.name} scales the scores after soft-capping"
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
