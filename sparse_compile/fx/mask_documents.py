"""Packed documents in a mask: ``D(b, q) == D(b, k)``, the ids ``D`` and the positions that
restart with each document.

``read_documents`` finds the atom of a mask's conjunction that keeps pairs of one document and
says whether the ids can be trusted: transformers' ids of packed sequences,
``cumsum(diff(P) != 1)`` of positions ``P`` in the same graph (``restart_source``), are
non-decreasing by construction, and comparisons of ``P`` inside a document are comparisons of
indices; ids read from a tensor the pass cannot see into are accepted only on the condition
that they are checked at run time (``check``). A part the pass cannot read raises
``ValueError`` with the reason.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.index_values import AXES, IndexReader


def read_documents(reader: IndexReader, atoms: list[sympy.Basic], q_axis: sympy.Symbol,
                   k_axis: sympy.Symbol, batch_axis: sympy.Symbol | None, check: bool = False
                   ) -> tuple[Node | None, dict, bool]:
    """The document-ids node of an atom ``D(b, q) == D(b, k)`` (None if there is none, or if
    the ids restart from positions that count up from 0: one document), the substitution
    of the positions those documents restart from (within a document a position advances
    with its index, so comparisons of them are comparisons of indices), and whether the ids
    are to be checked at run time (``check``: ids not proven in order are accepted so)."""
    for atom in atoms:
        pair = _document_pair(atom, q_axis, k_axis, batch_axis)
        if pair is None:
            continue
        node = reader.node_of(pair.func)
        if node is not None and not _rows_follow_batch(node, pair, batch_axis):
            raise ValueError(f"document ids {node} are read from one row for every batch row")
        source = restart_source(node) if node is not None else None
        if source is None and check and node is not None:
            return node, _positions_in_documents(atoms, pair, q_axis, k_axis), True
        if source is None:
            raise ValueError(f"document ids {node} are not proven non-decreasing")
        positions = reader.read(source)
        if positions is not None and _counts_up(positions.expr):
            return None, {}, False
        head = None if positions is None else _opaque_head(positions.expr)
        if head is None:
            raise ValueError("document ids restart from positions the pass cannot read")
        subst = {}
        for f in _atoms_of(atoms, head):
            axis = f.args[-1]
            subst[f] = axis
        return node, subst, False
    return None, {}, False


def _positions_in_documents(atoms: list[sympy.Basic], pair: Any, q_axis: sympy.Symbol,
                            k_axis: sympy.Symbol) -> dict:
    """For ids checked at run time: the substitution ``P(.., q) -> q``, ``P(.., k) -> k`` of
    the one tensor ``P`` indexed like the ids whose query and key entries the mask compares
    (positions restarting per document, as transformers' packed sequences), empty if there is
    none. Inside a document (the only pairs kept) comparing positions is comparing indices
    when they advance by one per token: the rewrite checks that at run time."""
    lead = pair.args[:-1]
    found = set()
    for atom in atoms:
        applied = [f for f in atom.atoms(sympy.Function)
                   if isinstance(f, sympy.core.function.AppliedUndef) and f.func != pair.func]
        ends = {f.func: set() for f in applied}
        for f in applied:
            ends[f.func].add(f.args[-1] if f.args[:-1] == lead else None)
        found |= {head for head, axes in ends.items() if axes == {q_axis, k_axis}}
    if len(found) != 1:
        return {}
    head = found.pop()
    uses = _atoms_of(atoms, head)
    if any(f.args[:-1] != lead or f.args[-1] not in (q_axis, k_axis) for f in uses):
        raise ValueError(f"positions {head} are read at other indices than the query's and key's")
    return {f: f.args[-1] for f in uses}


def _rows_follow_batch(node: Node, pair: Any, batch_axis: sympy.Symbol | None) -> bool:
    """Whether the ids of batch row ``b`` are row ``b`` of ``node`` (or its only row): the op
    takes ids ``[B, L]`` row by row."""
    t = ops.tensor_value(node)
    if t is None or t.dim() < 2:
        return True
    rows = [size for size, index in zip(t.shape[:-1], pair.args[:-1], strict=True)
            if index != batch_axis]
    return all(isinstance(size, int) and size == 1 for size in rows)


def _atoms_of(atoms: list[sympy.Basic], head: Any) -> set:
    found = set()
    for atom in atoms:
        found |= {f for f in atom.atoms(sympy.Function) if f.func == head}
    return found


def _opaque_head(expr: sympy.Basic) -> Any:
    if isinstance(expr, sympy.core.function.AppliedUndef):
        return expr.func
    return None


def _counts_up(expr: sympy.Basic) -> bool:
    """Whether ``expr`` is ``i0 + c`` with an integer ``c``: positions 0, 1, 2, ... (+ c)."""
    rest = sympy.expand(expr - AXES[0])
    return rest.is_Integer


def _document_pair(atom: sympy.Basic, q_axis: sympy.Symbol, k_axis: sympy.Symbol,
                   batch_axis: sympy.Symbol | None) -> Any:
    """The applied function ``D(..., q)`` of an atom ``D(..., q) == D(..., k)``, else None."""
    if not isinstance(atom, sympy.Eq):
        return None
    a, b = atom.lhs, atom.rhs
    if not all(isinstance(x, sympy.core.function.AppliedUndef) for x in (a, b)):
        return None
    if a.func != b.func or len(a.args) != len(b.args):
        return None
    if a.args[-1] == k_axis and b.args[-1] == q_axis:
        a, b = b, a
    if a.args[-1] != q_axis or b.args[-1] != k_axis or a.args[:-1] != b.args[:-1]:
        return None
    allowed = {0, batch_axis} if batch_axis is not None else {0}
    if any(x not in allowed for x in a.args[:-1]):
        return None
    return a


def is_document_atom(atom: sympy.Basic, documents: Node | None, reader: IndexReader) -> bool:
    if not isinstance(atom, sympy.Eq):
        return False
    funcs = {f.func for f in atom.atoms(sympy.Function)}
    return len(funcs) == 1 and (
        documents is None and _restart_of_counting(reader, next(iter(funcs)))
        or reader.node_of(next(iter(funcs))) is documents)


def _restart_of_counting(reader: IndexReader, head: Any) -> bool:
    node = reader.node_of(head)
    source = restart_source(node) if node is not None else None
    positions = reader.read(source) if source is not None else None
    return positions is not None and _counts_up(positions.expr)


def restart_source(node: Node) -> Node | None:
    """``P`` when ``node`` is transformers' packed-sequence ids of positions ``P``:
    ``cumsum(diff(P, prepend=P[..., :1] - 1) != 1)`` (a new document wherever a position is
    not its predecessor's plus one; non-decreasing by construction)."""
    if not isinstance(node, Node) or node.target not in ("cumsum", torch.cumsum):
        return None
    flags = node.args[0]
    if not isinstance(flags, Node) or flags.target not in ("ne", "__ne__", torch.ne,
                                                           operator.ne):
        return None
    diff, one = flags.args[0], flags.args[1]
    if one != 1 or not isinstance(diff, Node) or diff.target is not torch.diff:
        return None
    source = diff.args[0]
    prepend = diff.kwargs.get("prepend")
    if not isinstance(prepend, Node) or prepend.target not in (
            operator.sub, "sub", "__sub__") or prepend.args[1] != 1:
        return None
    first = prepend.args[0]
    if not isinstance(first, Node) or first.args[0] is not source:
        return None
    return source
