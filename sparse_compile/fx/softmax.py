"""Softmax in the spellings models use, read off an FX graph.

Besides ``softmax`` itself, models write the same function as ``exp(log_softmax(x))`` or by
hand, ``e / e.sum(dim, keepdim=True)`` (or ``e * (1 / sum)``, ``e * sum.reciprocal()``) with
``e = exp(x)``. ``x`` is usually the scores minus their row maximum; that shift is an op of
the score chain, which proves and drops it (``sparse_compile.fx.score_chain``), so it is not
part of the ``Softmax`` read here.

``find_softmaxes(graph)`` returns every softmax of the graph, and also the forms recognised only
in part, each with the reason it is not a softmax: a normalisation by the sum without the exp,
a sum without ``keepdim``, and an ``exp`` of Q·Kᵀ scores that no sum over an axis normalises.
Whether the normalisation runs over the key axis is the caller's to check (``dim``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import Graph, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.score_chain import score_path


@dataclass(frozen=True)
class Softmax:
    """``output = softmax(input, dim)`` in the graph.

    ``nodes`` are the softmax's own nodes, ``output`` last (one node for ``softmax``; the exp,
    the sum, the reciprocal and the normalisation for a softmax written by hand). ``reason`` is
    None for a softmax, and says why not when the form was recognised only in part.
    """

    output: Node
    input: Any
    dim: Any
    nodes: tuple[Node, ...]
    reason: str | None = None


def find_softmaxes(graph: Graph) -> dict[Node, Softmax]:
    """Every softmax of ``graph``, complete or partial, keyed by its output node."""
    found = {}
    for node in graph.nodes:
        softmax = read_softmax(node)
        if softmax is not None:
            found[node] = softmax
    inside = {n for softmax in found.values() for n in softmax.nodes}
    exponents = set()  # an exp written twice of the same scores is reported once
    for node in graph.nodes:
        if not ops.is_exp(node) or node in inside:
            continue
        x = ops.arg(node, 0, "input")
        if x not in exponents and _exp_of_scores(x):
            found[node] = Softmax(node, x, None, (node,), _UNNORMALISED)
            exponents.add(x)
    return found


_UNNORMALISED = "exp of the scores is not divided by its sum over an axis: not a softmax"
_SUM_WITHOUT_EXP = "the weights are divided by their sum without an exp: not a softmax"
_NO_KEEPDIM = "the exp is divided by its sum taken without keepdim=True: not a softmax"


def read_softmax(node: Node) -> Softmax | None:
    """The ``Softmax`` that ends at ``node``, or None."""
    if ops.is_softmax(node):
        return Softmax(node, ops.arg(node, 0, "input"), ops.arg(node, 1, "dim"), (node,))
    if ops.is_exp(node) and ops.is_log_softmax(ops.arg(node, 0, "input")):
        log_softmax = ops.arg(node, 0, "input")
        return Softmax(node, ops.arg(log_softmax, 0, "input"), ops.arg(log_softmax, 1, "dim"),
                       (log_softmax, node))
    return _normalisation(node)


def _normalisation(node: Node) -> Softmax | None:
    """``a / a.sum(dim, keepdim=True)`` (or times its reciprocal): a softmax of ``x`` when
    ``a = exp(x)``, recognised in part otherwise."""
    split = _numerator_and_sum(node)
    if split is None:
        return None
    numerator, total, between = split
    dim = _single_axis(ops.arg(total, 1, "dim"))
    summed = ops.arg(total, 0, "input")
    exps = [n for n in dict.fromkeys((numerator, summed)) if ops.is_exp(n)]
    nodes = (*exps, total, *between, node)
    if not exps:
        return Softmax(node, numerator, dim, nodes, _SUM_WITHOUT_EXP)
    reason = None if ops.arg(total, 2, "keepdim", False) is True else _NO_KEEPDIM
    return Softmax(node, ops.arg(exps[0], 0, "input"), dim, nodes, reason)


def _numerator_and_sum(node: Node) -> tuple[Node, Node, tuple[Node, ...]] | None:
    """``(a, sum, nodes between the sum and node)`` when ``node`` divides ``a`` by a sum of
    ``a`` (or multiplies it by the sum's reciprocal)."""
    if ops.is_div(node) and len(node.args) == 2:
        a, total = node.args
        if _sums(total, a):
            return a, total, ()
    if ops.is_mul(node) and len(node.args) == 2:
        for a, inverse in (node.args, node.args[::-1]):
            total = ops.reciprocal_source(inverse)
            if _sums(total, a):
                return a, total, _path(inverse, total)
    return None


def _path(top: Node, bottom: Node) -> tuple[Node, ...]:
    """The nodes from ``top`` down to ``bottom`` (excluded), following the node arguments."""
    nodes = []
    node = top
    while isinstance(node, Node) and node is not bottom and len(nodes) < 8:
        nodes.append(node)
        node = next((a for a in node.args if isinstance(a, Node)), None)
    return tuple(nodes)


def _sums(total: Any, a: Any) -> bool:
    """Whether ``total`` sums ``a``, or an ``exp`` of the same input as ``a`` (written twice)."""
    if not ops.is_sum(total) or not isinstance(a, Node):
        return False
    summed = ops.arg(total, 0, "input")
    if summed is a:
        return True
    return (ops.is_exp(summed) and ops.is_exp(a)
            and ops.arg(summed, 0, "input") is ops.arg(a, 0, "input"))


def _single_axis(dim: Any) -> Any:
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        return dim[0]
    return dim


def _exp_of_scores(x: Any) -> bool:
    """Whether ``x`` are Q·Kᵀ scores: a product of two 3-D or two 4-D tensors, through
    score-chain ops."""
    path = score_path(x)
    if path is None:
        return False
    product = path[0]
    if ops.is_einsum(product):
        operands = ops.einsum_operands(product)[1]
    elif ops.is_baddbmm(product):
        operands = [ops.arg(product, 1, "batch1"), ops.arg(product, 2, "batch2")]
    else:
        other = "other" if ops.is_matmul(product) else "mat2"
        operands = [ops.arg(product, 0, "input"), ops.arg(product, 1, other)]
    dims = {t.dim() if t is not None else None for t in map(ops.tensor_value, operands)}
    return len(operands) == 2 and len(dims) == 1 and dims <= {3, 4}
