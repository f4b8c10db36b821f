"""The op's positions, key mask and documents as graph values, from a folded ``ModelMask``.

``placed_arguments`` inserts, at the graph's insertion point, what ``placed_attention`` takes
instead of the model's mask: ``q_start`` / ``k_start`` (ints, or tensors read where the model
defines them; the first of a cache's write positions, checked to be consecutive at run time),
the key mask as a ``[B or 1, 1, 1, Lk]`` boolean bias, document ids (checked on the device when
they are not proven in order), and positions counted from each row's first attended key for
patterns that keep keys by absolute position (left padding).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.positions import (
    consecutive_start,
    documents_from_equal_ids,
    prepared_documents,
)


def placed_arguments(graph: Graph, mask: Any, pattern: Any, q: Node, k: Node,
                      bias: Any) -> dict[str, Any]:
    """``bias``, ``q_start``, ``k_start`` and ``documents`` of ``placed_attention`` for a
    folded mask. With a key mask and a pattern that depends on absolute positions (``sink``,
    ``block``, ...), positions count from each row's first attended key (left padding)."""
    from sparse_compile.patterns.blocks import is_toeplitz

    q_start = _offset(graph, mask.q_start)
    if mask.q_start_checked:
        q_start = graph.call_function(consecutive_start, (q_start,))
    k_start = _offset(graph, mask.k_start)
    if mask.key_mask is not None:
        keys = key_mask_node(graph, mask.key_mask, k)
        if bias is None:
            bias = keys
        elif ops.tensor_value(bias) is not None and ops.tensor_value(bias).dtype == torch.bool:
            bias = graph.call_function(operator.and_, (bias, keys))
        else:
            dropped = graph.call_function(torch.logical_not, (keys,))
            bias = graph.call_method("masked_fill", (bias, dropped, float("-inf")))
        if not is_toeplitz(pattern):
            flat = graph.call_method("reshape", (keys, graph.call_method("size", (keys, 0)), -1))
            seen = graph.call_method("cumsum", (graph.call_method("int", (flat,)), -1))
            first = graph.call_method("sum", (graph.call_function(operator.eq, (seen, 0)), -1))
            if q_start is None:
                lq = graph.call_method("size", (q, -2))
                lk = graph.call_method("size", (k, -2))
                q_start = graph.call_function(operator.sub, (lk, lq))
            q_start = graph.call_function(operator.sub, (q_start, first))
            k_start = graph.call_function(operator.neg, (first,)) if k_start is None else (
                graph.call_function(operator.sub, (k_start, first)))
    placed: dict[str, Any] = {"bias": bias}
    if q_start is not None:
        placed["q_start"] = q_start
    if k_start is not None:
        placed["k_start"] = k_start
    if mask.documents is not None:
        placed["documents"] = _prepared_documents(graph, mask, q, k)
    return placed


def _prepared_documents(graph: Graph, mask: Any, q: Node, k: Node) -> Node:
    """The document bounds of ``mask``'s ids, computed once per graph: the first site that
    needs them inserts the preparation (and the run-time check of ids not proven in order),
    later sites of the same packed batch reuse its node (sites are rewritten in graph order),
    so neither the layers nor the backward prepare the ids again."""
    prepared = graph.__dict__.setdefault("_sparse_compile_documents", {})
    key = (mask.documents, mask.documents_checked, mask.document_positions)
    if key not in prepared:
        batch, length = graph.call_method("size", (q, 0)), graph.call_method("size", (k, -2))
        ids = mask.documents
        if mask.documents_checked:
            ids = graph.call_function(
                documents_from_equal_ids, (ids, batch, length, mask.document_positions))
        prepared[key] = graph.call_function(prepared_documents, (ids, batch, length))
    return prepared[key]


def _offset(graph: Graph, value: Any) -> Any:
    """A ModelMask offset as a graph value: None, an int, or node (+ int). A tensor is read
    where it is defined: a cache's fill level is updated in place later in the step, before
    attention runs."""
    if value is None or isinstance(value, int):
        return value
    node, constant = value
    if ops.tensor_value(node) is not None:
        node = _snapshot(graph, node)
    return node if constant == 0 else graph.call_function(operator.add, (node, constant))


def _snapshot(graph: Graph, node: Node) -> Node:
    """A copy of ``node``'s value taken right where it is defined (after the last placeholder
    for a graph input)."""
    anchor = node
    if node.op == "placeholder":
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        return graph.call_method("clone", (node,))


def key_mask_node(graph: Graph, key_mask: tuple[Node, int, bool], k: Any) -> Node:
    """The boolean key mask ``[B or 1, 1, 1, Lk]`` from the model's tensor (``!= 0``; its first
    ``Lk`` keys: a mask longer than the keys, as a cache's, is sliced like the model did)."""
    node, _, batch_first = key_mask
    keys = graph.call_function(operator.ne, (node, 0))
    rows = graph.call_method("size", (keys, 0)) if batch_first else 1
    keys = graph.call_method("reshape", (keys, rows, 1, 1, -1))
    lk = graph.call_method("size", (k, -2))
    return graph.call_function(operator.getitem, (keys, (Ellipsis, slice(None, lk))))
