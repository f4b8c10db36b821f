"""Turning in-place updates of attention scores into out-of-place ones.

Code such as ``w.masked_fill_(mask, -inf)`` reaches the backend as a ``masked_fill_`` node
without users, while later code keeps reading ``w``. ``functionalize_score_updates`` rewrites
such a node into ``masked_fill`` and points every later reader of ``w`` at its result, so the
score chain becomes visible to detection. It only does so when ``w`` is a fresh tensor (the
result of a product or of arithmetic), never a graph input or a view, whose mutation other
tensors could observe, and nothing read it before the update.
"""

from __future__ import annotations

from torch.fx import Graph, Node

import sparse_compile.fx.graph_ops as ops

_UPDATES = ("masked_fill_", "add_", "sub_", "mul_", "div_")


def _fresh(node: Node) -> bool:
    return any(check(node) for check in (ops.is_product, ops.is_mul, ops.is_div, ops.is_add,
                                         ops.is_sub, ops.is_masked_fill, ops.is_where))


def functionalize_score_updates(graph: Graph) -> int:
    """Rewrite in-place updates of fresh tensors; returns how many were rewritten."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in _UPDATES or node.users:
            continue
        target = node.args[0]
        if not isinstance(target, Node) or not _fresh(target):
            continue
        others = [u for u in target.users if u is not node]
        # An earlier reader could hold a view of the tensor, which would see the update.
        if ops.tensor_value(target) is None or any(order[u] < order[node] for u in others):
            continue
        with graph.inserting_after(node):
            fresh = graph.call_method(node.target[:-1], node.args, dict(node.kwargs))
        fresh.meta.update(node.meta)
        for user in others:
            user.replace_input_with(target, fresh)
        graph.erase_node(node)
        order[fresh] = order.pop(node)
        rewritten += 1
    return rewritten
