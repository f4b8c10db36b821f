"""Symbols, the custom sympy function and the tracing wrappers used by keep expressions.

A keep expression is a sympy Boolean over the integer symbols ``Q`` (absolute query position,
``q_idx + Lk - Lq``), ``K`` (key index) and, for per-head predicates, ``H`` (query head).
It uses only ``+ - *``, ``floor`` of a rational expression (what ``//`` produces), ``Mod``
(Python semantics: the result has the sign of the divisor, as sympy's ``Mod`` does), ``Min``,
``Max``, relations, ``And``/``Or``/``Not``, ``true``/``false`` and :class:`IsPowerOf`. That set
prints directly into Triton (``//`` and ``%`` need the Python-semantics helpers there).

Custom predicates are written as Python functions of ``q, k`` (optionally ``b, h``). They are
called with :class:`Term` wrappers rather than raw sympy symbols, because raw sympy makes
``q == k`` a plain ``bool`` and ``q < k`` a relation that cannot be combined with ``&``
reliably. Python's builtin ``min``/``max`` cannot work on symbolic values (they call ``bool`` on a
comparison), so use :func:`minimum` and :func:`maximum`; calling ``bool`` on a symbolic
comparison (``and``, ``or``, ``if``, builtin ``min``) raises a ``TypeError`` that says so.
"""

from __future__ import annotations

from typing import Any

import sympy

Q = sympy.Symbol("Q", integer=True)
K = sympy.Symbol("K", integer=True)
H = sympy.Symbol("H", integer=True, nonnegative=True)
B = sympy.Symbol("B", integer=True, nonnegative=True)


class IsPowerOf(sympy.Function, sympy.logic.boolalg.Boolean):
    """``IsPowerOf(d, base)``: True iff ``d == base**j`` for some integer ``j >= 0``.

    So ``d = 1`` (``base**0``) is included, and ``d <= 0`` is never a power. ``base`` is an
    integer >= 2. Used by ``fanout(base)``, which keeps ``q - k == 0 or IsPowerOf(q - k, base)``.
    Printed into Triton as a loop-free test (e.g. for base 2: ``d > 0 and (d & (d - 1)) == 0``).
    """

    @classmethod
    def eval(cls, d, base):
        if d.is_Integer and base.is_Integer:
            d, base = int(d), int(base)
            if d < 1:
                return sympy.false
            while d % base == 0:
                d //= base
            return sympy.true if d == 1 else sympy.false
        return None


def _unwrap(value: Any) -> Any:
    if isinstance(value, (Term, Condition)):
        return value.expr
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, sympy.Basic):
        return value
    raise TypeError(f"cannot use {type(value).__name__} {value!r} in a pattern predicate")


class Term:
    """A symbolic integer in a traced predicate: supports ``+ - * // %``, unary ``-``, ``abs``
    and comparisons (which give a :class:`Condition`)."""

    __slots__ = ("expr",)

    def __init__(self, expr: Any):
        self.expr = _unwrap(expr)

    def __add__(self, o):
        return Term(self.expr + _unwrap(o))

    def __radd__(self, o):
        return Term(_unwrap(o) + self.expr)

    def __sub__(self, o):
        return Term(self.expr - _unwrap(o))

    def __rsub__(self, o):
        return Term(_unwrap(o) - self.expr)

    def __mul__(self, o):
        return Term(self.expr * _unwrap(o))

    def __rmul__(self, o):
        return Term(_unwrap(o) * self.expr)

    def __floordiv__(self, o):
        return Term(sympy.floor(self.expr / _unwrap(o)))

    def __rfloordiv__(self, o):
        return Term(sympy.floor(_unwrap(o) / self.expr))

    def __mod__(self, o):
        return Term(sympy.Mod(self.expr, _unwrap(o)))

    def __rmod__(self, o):
        return Term(sympy.Mod(_unwrap(o), self.expr))

    def __neg__(self):
        return Term(-self.expr)

    def __pos__(self):
        return self

    def __abs__(self):
        return Term(sympy.Max(self.expr, -self.expr))

    def __truediv__(self, o):
        raise TypeError("use // (floor division) in pattern predicates, not /")

    __rtruediv__ = __truediv__

    def __lt__(self, o):
        return Condition(sympy.Lt(self.expr, _unwrap(o)))

    def __le__(self, o):
        return Condition(sympy.Le(self.expr, _unwrap(o)))

    def __gt__(self, o):
        return Condition(sympy.Gt(self.expr, _unwrap(o)))

    def __ge__(self, o):
        return Condition(sympy.Ge(self.expr, _unwrap(o)))

    def __eq__(self, o):  # type: ignore[override]
        return Condition(sympy.Eq(self.expr, _unwrap(o)))

    def __ne__(self, o):  # type: ignore[override]
        return Condition(sympy.Ne(self.expr, _unwrap(o)))

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise TypeError("a symbolic position has no truth value; compare it (q < k) instead")

    def __repr__(self) -> str:
        return f"Term({self.expr})"


class Condition:
    """A symbolic truth value in a traced predicate: combine with ``&``, ``|``, ``~``."""

    __slots__ = ("expr",)

    def __init__(self, expr: Any):
        self.expr = _unwrap(expr)

    def __and__(self, o):
        return Condition(sympy.And(self.expr, _unwrap(o)))

    __rand__ = __and__

    def __or__(self, o):
        return Condition(sympy.Or(self.expr, _unwrap(o)))

    __ror__ = __or__

    def __invert__(self):
        return Condition(sympy.Not(self.expr))

    def __bool__(self):
        raise TypeError(
            "a symbolic comparison has no truth value: use &, |, ~ instead of and/or/not, and "
            "sparse_compile.patterns.minimum/maximum instead of the builtin min/max"
        )

    def __repr__(self) -> str:
        return f"Condition({self.expr})"


def minimum(*values: Any) -> Term:
    """Symbolic ``min`` for predicates (the builtin ``min`` cannot compare symbolic values)."""
    if len(values) == 1:
        values = tuple(values[0])
    return Term(sympy.Min(*(_unwrap(v) for v in values)))


def maximum(*values: Any) -> Term:
    """Symbolic ``max`` for predicates (the builtin ``max`` cannot compare symbolic values)."""
    if len(values) == 1:
        values = tuple(values[0])
    return Term(sympy.Max(*(_unwrap(v) for v in values)))
