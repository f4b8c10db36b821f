"""Reading index arithmetic in FX graphs: a tensor as a function of its own indices.

Models build attention masks from positions: ``arange``s, broadcasting, comparisons, ``&``,
gathers of ``position_ids`` or of a padding mask. ``IndexReader.read(node)`` evaluates such a
subgraph symbolically: the tensor's value at index ``(..., i2, i1, i0)`` is a sympy expression
of the axis symbols ``AXES[0]`` (last axis), ``AXES[1]`` (the one before), ...; axes are
counted from the right, so broadcasting never renames them. A tensor the reader cannot see
through (a graph input, a ``cumsum``, ...) becomes an opaque function of its indices, and the
reader remembers which node it stands for (``IndexReader.node_of``), so that a caller can use
that node itself.

A caller may seed the reader: give some nodes their value (``seed``), or let a subgraph's
placeholder stand for the value of the calling graph that is passed to it. FlexAttention's
``mask_mod`` is such a subgraph: it computes on 0-dim tensors that stand for a whole grid
``[B, H, Lq, Lk]`` (``Grid``), its index placeholders are seeded with the grid's axes and its
buffers with the outer graph's tensors, so that what it reads (a padding mask, document ids) is
found as nodes of the outer graph.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Graph, Node

import sparse_compile.fx.graph_ops as ops

MAX_AXES = 8
AXES = tuple(sympy.Symbol(f"i{n}", integer=True, nonnegative=True) for n in range(MAX_AXES))
# Output axes while an indexing expression is assembled (counted from the left).
_SLOTS = tuple(sympy.Symbol(f"u{n}", integer=True, nonnegative=True) for n in range(MAX_AXES))


@dataclass(frozen=True)
class IndexValue:
    """A tensor's value as ``expr`` (sympy, integer or Boolean) of the axis symbols ``AXES``;
    ``shape`` its sizes (ints or SymInts). ``expr`` never depends on an axis of size 1."""

    expr: sympy.Basic
    shape: tuple[Any, ...]


@dataclass(frozen=True)
class Grid:
    """The 0-dim tensors computed in ``graph`` stand for a whole grid of ``shape`` (a function
    applied to scalars under ``vmap``, as FlexAttention's ``mask_mod``): they are read with that
    shape, and one the reader cannot see through is unknown (never an opaque constant)."""

    graph: Graph
    shape: tuple[Any, ...]


_ARITH = {
    operator.add: sympy.Add, torch.add: sympy.Add, "add": sympy.Add, "__add__": sympy.Add,
    "__radd__": sympy.Add, operator.mul: sympy.Mul, torch.mul: sympy.Mul, "mul": sympy.Mul,
    "__mul__": sympy.Mul, "__rmul__": sympy.Mul,
}
_SUB = (operator.sub, torch.sub, "sub", "__sub__")
_RSUB = ("__rsub__",)
_COMPARE = {
    operator.le: sympy.Le, torch.le: sympy.Le, "le": sympy.Le, "__le__": sympy.Le,
    operator.lt: sympy.Lt, torch.lt: sympy.Lt, "lt": sympy.Lt, "__lt__": sympy.Lt,
    operator.ge: sympy.Ge, torch.ge: sympy.Ge, "ge": sympy.Ge, "__ge__": sympy.Ge,
    operator.gt: sympy.Gt, torch.gt: sympy.Gt, "gt": sympy.Gt, "__gt__": sympy.Gt,
    operator.eq: sympy.Eq, torch.eq: sympy.Eq, "eq": sympy.Eq, "__eq__": sympy.Eq,
    operator.ne: sympy.Ne, torch.ne: sympy.Ne, "ne": sympy.Ne, "__ne__": sympy.Ne,
}
_LOGIC = {
    operator.and_: sympy.And, torch.logical_and: sympy.And, torch.bitwise_and: sympy.And,
    "__and__": sympy.And, "logical_and": sympy.And, "bitwise_and": sympy.And,
    operator.or_: sympy.Or, torch.logical_or: sympy.Or, torch.bitwise_or: sympy.Or,
    "__or__": sympy.Or, "logical_or": sympy.Or, "bitwise_or": sympy.Or,
}
_NOT = (operator.invert, torch.logical_not, torch.bitwise_not, "__invert__", "logical_not",
        "bitwise_not")
_SAME_VALUE = ("contiguous", "clone", "detach", torch.clone)
_EXPAND = ("expand", "expand_as", torch.broadcast_to)
_RESHAPE = ("view", "reshape", "squeeze", torch.reshape, torch.squeeze)


def _key(node: Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _is_boolean(e: sympy.Basic) -> bool:
    """Truth values: relations, their combinations and constants (not symbols: a sympy
    Symbol is a Boolean too, but here every symbol is an integer)."""
    return isinstance(e, sympy.logic.boolalg.BooleanAtom | sympy.core.relational.Relational
                      | sympy.logic.boolalg.BooleanFunction)


class IndexReader:
    """Evaluates nodes as index expressions (memoised); see the module docstring.

    With ``additive_masks``, an additive mask ``where(keep, 0, min)`` (0 where attended, a
    large negative number elsewhere, as transformers builds it) reads as its truth value
    ``keep``, so that slices and views of it read like those of the boolean mask.
    """

    def __init__(self, seed: Mapping[Node, IndexValue | Node] | None = None,
                 grid: Grid | None = None, additive_masks: bool = False) -> None:
        """``seed``: nodes whose value is given, as an IndexValue or as another node they stand
        for (a subgraph's placeholder and the outer graph's value passed to it); ``grid``: the
        subgraph whose 0-dim tensors stand for a grid (see ``Grid``)."""
        self._values: dict[Node, IndexValue | None] = {}
        self._opaque: dict[Any, Node] = {}
        self._seed = dict(seed or {})
        self._grid = grid
        self.additive_masks = additive_masks

    def node_of(self, head: Any) -> Node | None:
        """The node an opaque function (or symbol) of ``read``'s expressions stands for."""
        return self._opaque.get(head)

    def read(self, x: Any) -> IndexValue | None:
        """``x`` (a node, int or bool) as an IndexValue; None for float or complex values and
        tensors of more than ``MAX_AXES`` dimensions."""
        if isinstance(x, bool):
            return IndexValue(sympy.true if x else sympy.false, ())
        if isinstance(x, int):
            return IndexValue(sympy.Integer(x), ())
        if not isinstance(x, Node):
            return None
        if x in self._seed:
            given = self._seed[x]
            return self.read(given) if isinstance(given, Node) else given
        if x not in self._values:
            self._values[x] = None  # a cycle cannot occur in an FX graph; this guards reentry
            value = self._evaluate(x)
            self._values[x] = self._opaque_leaf(x) if value is None else value
        return self._values[x]

    def _in_grid(self, node: Node) -> bool:
        return self._grid is not None and node.graph is self._grid.graph

    # -- leaves --------------------------------------------------------------------------------
    def _opaque_leaf(self, node: Node) -> IndexValue | None:
        if self._in_grid(node):
            return None  # a value over the grid, not a constant
        value = ops.value(node)
        if isinstance(value, torch.SymInt | int) and not isinstance(value, bool):
            head = sympy.Symbol(f"s_{node.name}", integer=True)
            self._opaque[head] = node
            return IndexValue(head, ())
        t = ops.tensor_value(node)
        if t is None or t.dim() > MAX_AXES:
            return None
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return None
        shape = tuple(t.shape)
        if not shape:
            head = sympy.Symbol(f"t_{node.name}", integer=True)
            self._opaque[head] = node
            return IndexValue(head, ())
        head = sympy.Function(f"T_{node.name}")
        self._opaque[head] = node
        args = [sympy.Integer(0) if _is_one(size) else AXES[len(shape) - 1 - j]
                for j, size in enumerate(shape)]
        value = head(*args)
        # A boolean tensor reads as "its entry is not zero", a truth value like a comparison.
        return IndexValue(sympy.Ne(value, 0) if t.dtype == torch.bool else value, shape)

    # -- operations ----------------------------------------------------------------------------
    def _evaluate(self, node: Node) -> IndexValue | None:  # noqa: C901 - one branch per op
        key = _key(node)
        if key is None:
            return None
        t = ops.tensor_value(node)
        shape = tuple(t.shape) if t is not None else ()
        if self._in_grid(node) and not shape:
            shape = self._grid.shape
        args = list(node.args)
        if key is torch.arange:
            return self._arange(node, shape)
        if key in _ARITH or key in _SUB or key in _RSUB:
            a, b = (self.read(x) for x in args[:2])
            if a is None or b is None or _is_boolean(a.expr) or _is_boolean(b.expr):
                return None
            if node.kwargs.get("alpha", 1) != 1:
                return None
            if key in _SUB:
                expr = a.expr - b.expr
            elif key in _RSUB:
                expr = b.expr - a.expr
            else:
                expr = _ARITH[key](a.expr, b.expr)
            return _fit(expr, shape)
        if key in (operator.neg, torch.neg, "neg", "__neg__"):
            a = self.read(args[0])
            return None if a is None or _is_boolean(a.expr) else _fit(-a.expr, shape)
        if key in _COMPARE:
            a, b = (self.read(x) for x in args[:2])
            if a is None or b is None or _is_boolean(a.expr) or _is_boolean(b.expr):
                return None
            return _fit(_COMPARE[key](a.expr, b.expr), shape)
        if key in _LOGIC:
            a, b = (self.read(x) for x in args[:2])
            if a is None or b is None or not (_is_boolean(a.expr) and _is_boolean(b.expr)):
                return None
            return _fit(_LOGIC[key](a.expr, b.expr), shape)
        if key in _NOT:
            a = self.read(args[0])
            return None if a is None or not _is_boolean(a.expr) else _fit(sympy.Not(a.expr), shape)
        if key in ("to", "bool", "long", "int", "type"):
            return self._cast(node, shape)
        if key in _SAME_VALUE:
            return self.read(args[0])
        if key in _EXPAND:
            a = self.read(args[0])
            return None if a is None else _fit(a.expr, shape)
        if key in ("unsqueeze", torch.unsqueeze):
            return self._unsqueeze(node, shape)
        if key in _RESHAPE:
            return self._reshape(node, shape)
        if key is operator.getitem:
            return self._getitem(node, shape)
        if key in ("new_ones", "new_zeros", torch.ones, torch.zeros):
            ones = key in ("new_ones", torch.ones)
            dtype = node.kwargs.get("dtype")
            if dtype is torch.bool:
                return _fit(sympy.true if ones else sympy.false, shape)
            if dtype is not None and not dtype.is_floating_point:
                return _fit(sympy.Integer(1 if ones else 0), shape)
            return None
        if key is torch.where and len(args) == 3:
            if self.additive_masks and _is_zero(args[1]) and _masked_out(args[2]):
                return self.read(args[0])
            c, a, b = (self.read(x) for x in args)
            if None in (c, a, b) or not _is_boolean(c.expr):
                return None
            return _fit(sympy.Piecewise((a.expr, c.expr), (b.expr, True)), shape)
        return None

    def _arange(self, node: Node, shape: tuple[Any, ...]) -> IndexValue | None:
        args = list(node.args)
        start, step = 0, 1
        if len(args) >= 2:
            start = args[0]
        if len(args) >= 3:
            step = args[2]
        start_v, step_v = self.read(start), self.read(step)
        if start_v is None or step_v is None or start_v.shape or step_v.shape:
            return None
        return _fit(start_v.expr + step_v.expr * AXES[0], shape)

    def _cast(self, node: Node, shape: tuple[Any, ...]) -> IndexValue | None:
        a = self.read(node.args[0])
        if a is None:
            return None
        dtype = node.kwargs.get("dtype")
        for x in node.args[1:]:
            if isinstance(x, torch.dtype):
                dtype = x
        if node.target == "bool":
            dtype = torch.bool
        if node.target in ("long", "int"):
            dtype = torch.int64
        if dtype is None:  # a move between devices
            return a
        if dtype.is_floating_point or dtype.is_complex:
            return None
        if dtype is torch.bool:
            return _fit(a.expr if _is_boolean(a.expr) else sympy.Ne(a.expr, 0), shape)
        if _is_boolean(a.expr):
            return _fit(sympy.Piecewise((1, a.expr), (0, True)), shape)
        return a

    def _unsqueeze(self, node: Node, shape: tuple[Any, ...]) -> IndexValue | None:
        a = self.read(node.args[0])
        dim = ops.arg(node, 1, "dim")
        if a is None or not isinstance(dim, int):
            return None
        n_in = len(a.shape)
        if dim < 0:
            dim += n_in + 1
        moved = {AXES[r]: AXES[r + 1] for r in range(n_in - dim, n_in)}
        return _fit(a.expr.xreplace(moved), shape)

    def _reshape(self, node: Node, shape: tuple[Any, ...]) -> IndexValue | None:
        """Only reshapes that add or drop axes of size 1."""
        a = self.read(node.args[0])
        if a is None:
            return None
        before = [r for r, size in enumerate(reversed(a.shape)) if not _is_one(size)]
        after = [r for r, size in enumerate(reversed(shape)) if not _is_one(size)]
        sizes_before = [a.shape[len(a.shape) - 1 - r] for r in before]
        sizes_after = [shape[len(shape) - 1 - r] for r in after]
        if len(before) != len(after) or any(
                not _same_size(x, y) for x, y in zip(sizes_before, sizes_after, strict=True)):
            return None
        moved = {AXES[r]: AXES[s] for r, s in zip(before, after, strict=True)}
        return _fit(a.expr.xreplace(moved), shape)

    def _getitem(self, node: Node, shape: tuple[Any, ...]) -> IndexValue | None:  # noqa: C901
        """Basic indexing (None, full or offset slices, ints, Ellipsis) and advanced indexing by
        integer index tensors in one consecutive group."""
        a = self.read(node.args[0])
        index = node.args[1]
        if a is None:
            return None
        items = list(index) if isinstance(index, tuple) else [index]
        n_in = len(a.shape)
        consumed = sum(1 for x in items if x is not None and x is not Ellipsis)
        if items.count(Ellipsis) > 1 or consumed > n_in:
            return None
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (n_in - consumed)
        else:
            items += [slice(None)] * (n_in - consumed)
        slots: list[sympy.Basic] = []      # per input dim, its index as an expression
        advanced: list[tuple[int, IndexValue]] = []
        out = 0                            # next output slot (left-indexed)
        group_at = None
        for item in items:
            if item is None:
                out += 1
            elif isinstance(item, slice):
                begin = 0 if item.start is None else item.start
                step = 1 if item.step is None else item.step
                if not (isinstance(begin, int) and isinstance(step, int)) or begin < 0:
                    return None
                slots.append(begin + step * _SLOTS[out])
                out += 1
            elif isinstance(item, int) and not isinstance(item, bool):
                if item < 0:
                    return None
                slots.append(sympy.Integer(item))
            elif isinstance(item, Node):
                v = self.read(item)
                if v is None or _is_boolean(v.expr):
                    return None
                if group_at is None:
                    group_at = out
                elif advanced and advanced[-1][0] != len(slots) - 1:
                    return None  # not one consecutive group
                advanced.append((len(slots), v))
                slots.append(sympy.Integer(0))  # replaced below
            else:
                return None
        if len(slots) != n_in:
            return None
        if advanced:
            width = max(len(v.shape) for _, v in advanced)
            # Output slots after the group's start shift right by its width.
            shift = {_SLOTS[s]: _SLOTS[s + width] for s in range(group_at, out)}
            slots = [e.xreplace(shift) for e in slots]
            for j, v in advanced:
                slots[j] = v.expr.xreplace({AXES[r]: _SLOTS[group_at + width - 1 - r]
                                            for r in range(width)})
            out += width
        if out != len(shape):
            return None
        expr = sympy.sympify(a.expr.xreplace(
            {AXES[n_in - 1 - j]: sympy.sympify(e) for j, e in enumerate(slots)}))
        expr = sympy.sympify(expr.xreplace({_SLOTS[p]: AXES[out - 1 - p] for p in range(out)}))
        return _fit(expr, shape)


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _same_size(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared
        return False


def _fit(expr: sympy.Basic, shape: tuple[Any, ...]) -> IndexValue:
    """``expr`` with the axes of size 1 set to 0 (and axes beyond ``shape`` too)."""
    n = len(shape)
    zero = {AXES[r]: sympy.Integer(0) for r in range(MAX_AXES)
            if r >= n or _is_one(shape[n - 1 - r])}
    return IndexValue(sympy.sympify(sympy.sympify(expr).xreplace(zero)), shape)


# A float mask entry at or below this is "masked out" (transformers uses the dtype's minimum).
MASKED_OUT = -1e4


def _is_zero(x: Any) -> bool:
    """A literal 0, or a tensor the graph creates as zeros."""
    if isinstance(x, int | float):
        return x == 0
    if not isinstance(x, Node) or x.op != "call_function":
        return False
    if x.target in (torch.zeros, torch.zeros_like):
        return True
    if x.target is torch.tensor and x.args:
        return x.args[0] == 0
    return False


def _masked_out(x: Any) -> bool:
    number = ops.constant_number(x)
    return number is not None and number <= MASKED_OUT

