"""The model's own attention mask, proven from the graph that builds it and folded into the op.

Models hand attention an Lq × Lk mask that they build from positions: causal and sliding
windows (comparisons of query and key indices), key padding (a ``[B, Lk]`` mask gathered per
key), packed documents (equal document ids), a static cache's fill level (a query offset known
only on the device). ``read_model_mask`` reads such a mask with ``IndexReader`` and, when every
part of it is one of these, describes it as a ``ModelMask``: a pattern over positions, where the
queries and keys sit, a per-key mask and document ids. The rewrite then passes those to the op
instead of the mask, so that neither the Lq × Lk tensor is built nor read. A mask the pass
cannot prove this way stays a bias, with the reason reported. Comparisons that are not bands
of ``q - k`` (a prefix, sinks: ``index_patterns.py``) take the indices as positions.

FlexAttention's ``mask_mod`` is read the same way (``flex_mask.py``); there, document ids the
pass cannot prove in order are accepted on the condition that the op checks them at run time
(``ModelMask.documents_checked``; documents: ``mask_documents.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.index_patterns import difference_pattern, index_pattern
from sparse_compile.fx.index_values import AXES, IndexReader, IndexValue
from sparse_compile.fx.mask_documents import is_document_atom, read_documents


@dataclass(frozen=True)
class ModelMask:
    """What a model's mask keeps, in the op's terms.

    pattern: the positional part (causal, sliding, window, ...) or None when there is none;
    q_start / k_start: positions of query row 0 and of key 0: None for the default alignment,
    an int, or ``(node, int)`` (a 0-dim integer tensor or SymInt of the graph, plus an int);
    key_mask: ``(node, dims, batch first)`` of the tensor whose entries (``!= 0``) say which
    keys are attended, or None; documents: the document ids node ``[B, L]`` or ``[L]`` or
    None; documents_checked: the ids are not proven in order (read from a tensor the model was
    given): the rewrite checks them at run time, and ``document_positions`` (a tensor indexed
    like the ids, the positions the mask compares) to advance by one inside each document;
    q_start_checked: ``q_start`` is ``(positions, 0)``, a cache's write positions ``[Lq]``
    not proven consecutive: the rewrite takes their first after checking at run time that
    they are; parts: what ``explain`` shows.
    """

    pattern: Any = None
    q_start: Any = None
    k_start: Any = None
    key_mask: tuple[Node, int, bool] | None = None
    documents: Node | None = None
    parts: tuple[str, ...] = field(default_factory=tuple)
    documents_checked: bool = False
    document_positions: Node | None = None
    q_start_checked: bool = False

    @property
    def describe(self) -> str:
        return "folded: " + (", ".join(self.parts) if self.parts else "nothing")


class Unproven(Exception):  # noqa: N818 - a reason, raised and caught inside this module
    """A part of the mask this module cannot express; its message is the reason."""


def read_model_mask(reader: IndexReader, term: Any, kind: str, lq: Any, lk: Any, *,
                    check_documents: bool = False) -> ModelMask | str:
    """The ModelMask of a site's mask term, or the reason it stays a bias.

    ``kind``: ``"keep"`` (a boolean mask, True = attend), ``"drop"`` (``masked_fill``'s mask,
    True = masked out) or ``"additive"`` (a float mask added to the scores: 0 where attended,
    at most ``MASKED_OUT`` elsewhere). ``check_documents``: accept document ids that cannot be
    proven in order, marked ``documents_checked`` (the caller checks them at run time).
    """
    if kind == "additive" and not reader.additive_masks:
        reader = IndexReader(additive_masks=True)
    try:
        value = _keep_value(reader, term, kind)
        return _fold(reader, value, lq, lk, check_documents)
    except Unproven as e:
        return str(e)


def _keep_value(reader: IndexReader, term: Any, kind: str) -> IndexValue:
    value = reader.read(term)
    if value is None or not _is_truth(value.expr):
        raise Unproven(f"mask {getattr(term, 'name', term)} is not built from positions the "
                       "pass can read")
    if kind == "drop":
        value = IndexValue(sympy.Not(value.expr), value.shape)
    if len(value.shape) not in (2, 4):
        raise Unproven(f"mask of {len(value.shape)} dims (folded: 2 or 4)")
    return value


def _is_truth(e: sympy.Basic) -> bool:
    return isinstance(e, sympy.logic.boolalg.BooleanAtom | sympy.core.relational.Relational
                      | sympy.logic.boolalg.BooleanFunction)


# -- the fold -----------------------------------------------------------------------------------
def _fold(reader: IndexReader, value: IndexValue, lq: Any, lk: Any,
          check_documents: bool = False) -> ModelMask:
    four_d = len(value.shape) == 4
    q_axis, k_axis = AXES[1], AXES[0]
    batch_axis = AXES[3] if four_d else None
    if four_d and AXES[2] in value.expr.free_symbols:
        raise Unproven("mask differs between heads")
    atoms = list(sympy.And.make_args(value.expr))
    try:
        documents, positions_of, checked = read_documents(reader, atoms, q_axis, k_axis,
                                                          batch_axis, check_documents)
    except ValueError as e:
        raise Unproven(str(e)) from None
    document_positions = None
    if checked and positions_of:
        document_positions = reader.node_of(next(iter(positions_of)).func)
    key_mask, relations, indices = None, [], []
    for atom in atoms:
        if atom in (sympy.true, True) or is_document_atom(atom, documents, reader):
            continue
        if atom in (sympy.false, False):
            raise Unproven("mask keeps nothing")
        atom = atom.xreplace(positions_of)
        axes = atom.free_symbols & set(AXES)
        # Without the query index, a comparison of keys is one only for a single query row.
        if _relation(atom, q_axis, k_axis) is not None and (q_axis in axes or _is_one(lq)):
            relations.append(atom)
        elif _of_indices(atom, q_axis, k_axis):
            indices.append(atom)
        elif k_axis in axes and q_axis not in axes:
            if key_mask is not None:
                raise Unproven("mask has several key masks")
            key_mask = _key_mask(reader, atom, k_axis, batch_axis)
        else:
            raise Unproven(f"mask part {atom} is not positional, a key mask or documents")
    pattern, q_start, k_start = _positional(reader, relations, q_axis, k_axis, lq, lk)
    if indices:
        placed = q_start is not None or k_start is not None
        pattern = _indexed(pattern, indices, q_axis, k_axis, placed, lq, lk)
        if (key_mask is not None or documents is not None) and not _toeplitz(pattern):
            raise Unproven(f"mask keeps keys by absolute index ({pattern}) with key padding "
                           "or documents, where positions do not count from index 0")
    if documents is not None and (q_start is not None or k_start is not None):
        raise Unproven("documents with shifted positions")
    if documents is not None and _default_shift(lq, lk) != 0:
        raise Unproven("documents with Lq != Lk (the op takes documents for Lq = Lk)")
    parts = []
    if pattern is not None:
        parts.append(str(pattern))
    if q_start == 0 and k_start is None:
        parts.append("queries from position 0")
    elif q_start is not None or k_start is not None:
        parts.append("positions from the graph")
    if key_mask is not None:
        parts.append("key padding")
    if documents is not None:
        parts.append("documents (checked at run time)" if checked else "documents")
    return ModelMask(pattern, q_start, k_start, key_mask, documents, tuple(parts), checked,
                     document_positions)


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _of_indices(atom: sympy.Basic, q_axis: sympy.Symbol, k_axis: sympy.Symbol) -> bool:
    """Whether ``atom`` is a truth value of the query and key indices alone (no tensor read,
    no other symbol)."""
    return (bool(atom.free_symbols) and atom.free_symbols <= {q_axis, k_axis}
            and not atom.atoms(sympy.core.function.AppliedUndef))


def _indexed(pattern: Any, atoms: list[sympy.Basic], q_axis: sympy.Symbol,
             k_axis: sympy.Symbol, placed: bool, lq: Any, lk: Any) -> Any:
    """``pattern`` and the comparisons of absolute indices ``atoms`` (a prefix, sinks). The
    indices are the positions only with query row 0 at key 0: Lq = Lk and no offsets."""
    if placed:
        raise Unproven("mask compares absolute indices and positions shifted in the graph")
    if _default_shift(lq, lk) != 0:
        raise Unproven("mask compares absolute indices with Lq != Lk")
    try:
        own = index_pattern(sympy.And(*atoms), q_axis, k_axis)
    except ValueError as e:
        raise Unproven(str(e)) from None
    if own is None:
        return pattern
    return own if pattern is None else pattern & own


def _toeplitz(pattern: Any) -> bool:
    from sparse_compile.patterns.blocks import is_toeplitz

    return pattern is None or is_toeplitz(pattern)


def _relation(atom: sympy.Basic, q_axis: sympy.Symbol, k_axis: sympy.Symbol
              ) -> tuple[int, sympy.Expr, sympy.Expr, int, type] | None:
    """A comparison between a query position ``q_axis + a`` and a key position
    ``k_axis + b`` (plus an integer): ``(sign, a, b, c, relation)`` meaning
    ``sign · ((q + a) − (k + b)) + c REL 0``; None for anything else."""
    if not isinstance(atom, sympy.Le | sympy.Lt | sympy.Ge | sympy.Gt | sympy.Eq):
        return None
    sides = [sympy.expand(s) for s in (atom.lhs, atom.rhs)]
    diff = sympy.expand(sides[0] - sides[1])
    if any(isinstance(f, sympy.core.function.AppliedUndef) for f in diff.atoms(sympy.Function)):
        return None
    cq, ck = diff.coeff(q_axis), diff.coeff(k_axis)
    if not (cq in (1, -1) and ck == -cq) and not (cq == 0 and ck in (1, -1)):
        return None
    sign = cq if cq != 0 else -ck
    rest = sympy.expand(diff - cq * q_axis - ck * k_axis)
    if rest.free_symbols & set(AXES):
        return None
    constant, symbolic = rest.as_coeff_Add() if rest.is_Add else (
        (rest, sympy.Integer(0)) if rest.is_Integer else (sympy.Integer(0), rest))
    # Symbolic offsets belong to the side they were written on: the query or the key side.
    a, b = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(symbolic):
        if term == 0:
            continue
        # diff = sign·((q + a) − (k + b)) + c: a term written beside k belongs to b.
        on_key_side = any(k_axis in s.free_symbols and (term in sympy.Add.make_args(s)
                                                         or -term in sympy.Add.make_args(s))
                          for s in sides)
        if on_key_side:
            b -= term * sign
        else:
            a += term * sign
    return sign, sympy.expand(a), sympy.expand(b), int(constant), type(atom)


def _positional(reader: IndexReader, relations: list[sympy.Basic], q_axis: sympy.Symbol,
                k_axis: sympy.Symbol, lq: Any, lk: Any) -> tuple[Any, Any, Any]:
    """(pattern, q_start, k_start) of the positional relations."""
    if not relations:
        return None, None, None
    parsed = [_relation(r, q_axis, k_axis) for r in relations]
    offsets = {(a, b) for _, a, b, _, _ in parsed}
    if len(offsets) != 1:
        raise Unproven("mask compares positions with different offsets")
    (a, b), = offsets
    default = _default_shift(lq, lk)
    if a == 0 and b == 0 and default is not None:
        shift, q_start = default, None
    else:
        shift, q_start = 0, a
    lo, hi = -sympy.oo, sympy.oo     # bounds on d = q_pos - k_pos
    for sign, _, _, c, rel in parsed:
        # sign * (d - shift) + c REL 0, with d - shift the index difference q - k.
        bound = sympy.Rational(-c, sign) + shift
        if sign < 0:
            rel = {sympy.Le: sympy.Ge, sympy.Lt: sympy.Gt, sympy.Ge: sympy.Le,
                   sympy.Gt: sympy.Lt}.get(rel, rel)
        if rel in (sympy.Le, sympy.Eq):
            hi = min(hi, bound)
        if rel is sympy.Lt:
            hi = min(hi, bound - 1)
        if rel in (sympy.Ge, sympy.Eq):
            lo = max(lo, bound)
        if rel is sympy.Gt:
            lo = max(lo, bound + 1)
    k_start = None if b == 0 else b
    try:
        pattern = difference_pattern(lo, hi)
    except ValueError as e:
        raise Unproven(str(e)) from None
    q_value = _graph_value(reader, q_start)
    if q_value is None and q_start is not None and default != 0:
        # Query row 0 at position 0, said explicitly: None would mean the default Lk - Lq,
        # which is not known to be 0 (Lq != Lk, or lengths known only at run time).
        q_value = 0
    return pattern, q_value, _graph_value(reader, k_start)


def _default_shift(lq: Any, lk: Any) -> int | None:
    """``Lk - Lq`` when it is known at compile time."""
    if isinstance(lq, int) and isinstance(lk, int):
        return lk - lq
    return 0 if ops.same_length(lq, lk) else None


def _graph_value(reader: IndexReader, expr: Any) -> Any:
    """An offset as the op takes it: None (zero), an int, or ``(node, int)``: the graph value
    of its single symbol (a 0-dim integer tensor or a SymInt) plus an int."""
    if expr is None:
        return None
    expr = sympy.sympify(expr)
    if expr == 0:
        return None
    if expr.is_Integer:
        return int(expr)
    constant, rest = expr.as_coeff_Add()
    node = reader.node_of(rest) if isinstance(rest, sympy.Symbol) else None
    if node is None:
        raise Unproven(f"position offset {expr} is not one graph value")
    return node, int(constant)


def _key_mask(reader: IndexReader, atom: sympy.Basic, k_axis: sympy.Symbol,
              batch_axis: sympy.Symbol | None) -> tuple[Node, int, bool]:
    """``(node, key position in its args, batch first)`` of a key mask atom ``T(b, k) != 0``."""
    applied = atom.lhs if isinstance(atom, sympy.Ne) and atom.rhs == 0 else None
    if applied is None or not isinstance(applied, sympy.core.function.AppliedUndef):
        raise Unproven(f"key mask {atom} is not a boolean tensor gathered per key")
    node = reader.node_of(applied.func)
    args = list(applied.args)
    if node is None or args.count(k_axis) != 1 or args[-1] != k_axis:
        raise Unproven(f"key mask {atom} is not a boolean tensor gathered per key")
    others = args[:-1]
    batch = batch_axis is not None and others[:1] == [batch_axis]
    if any(x != 0 for x in others[1 if batch else 0:]):
        raise Unproven(f"key mask {atom} is indexed by more than batch and key")
    return node, len(args), batch
