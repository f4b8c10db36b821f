"""Custom predicates: a Python function of symbolic ``q, k`` (and optionally ``b, h``).

``predicate(lambda q, k: (q - k) % 64 < 8)`` traces the function once with symbolic
:class:`~.symbolic.Term` arguments into a sympy Boolean, so the result can be analysed (layouts),
evaluated on tensors and printed into Triton. Parameters are bound by NAME: ``q`` (absolute query
position), ``k`` (key index), ``h`` (query head), ``b`` (batch; accepted, but the kept set may
not depend on it, because layouts are shared over the batch). A predicate that uses ``h`` must
say how many head patterns it spans with ``heads=n``: query head ``h`` then uses ``h % n``.
In DSL text the same predicate is ``predicate((q - k) % 64 < 8)`` or
``predicate(k <= h * 16, heads=4)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

from .errors import PatternError
from .nodes import Pattern
from .numeric import evaluate_expr
from .symbolic import B, Condition, H, IsPowerOf, K, Q, Term

_SYMBOLS = {"q": Q, "k": K, "h": H, "b": B}
_NAMES = {Q: "q", K: "k", H: "h", B: "b"}


@dataclass(frozen=True, repr=False)
class Predicate(Pattern):
    """A custom keep predicate given as a sympy Boolean ``expr`` over ``Q, K`` (and ``H``).

    ``heads``: the head period when ``expr`` uses ``H`` (query head ``h`` is evaluated at
    ``h % heads``); must be None otherwise.
    """

    expr: sympy.Basic
    heads: int | None = None

    def __post_init__(self):
        if not isinstance(self.expr, sympy.Basic) or not (
            self.expr.is_Boolean or isinstance(self.expr, sympy.core.relational.Relational)
        ):
            raise PatternError(f"a predicate must give a truth value, got {self.expr!r}")
        free = self.expr.free_symbols
        if B in free:
            raise PatternError("a predicate may not depend on the batch index b")
        unknown = free - {Q, K, H}
        if unknown:
            raise PatternError(f"unknown symbols in predicate: {sorted(map(str, unknown))}")
        if H in free and self.heads is None:
            raise PatternError("a predicate that uses h needs heads=n (head h uses h % n)")
        if self.heads is not None and (
            isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1
        ):
            raise PatternError(f"predicate: heads must be a positive integer, got {self.heads!r}")

    @property
    def period(self) -> int:
        return self.heads or 1

    @property
    def uses_head(self) -> bool:
        return H in self.expr.free_symbols

    @functools.cached_property
    def toeplitz(self) -> bool:
        """True when the expression depends on ``q - k`` only."""
        if H in self.expr.free_symbols:
            return False
        d = sympy.Symbol("_D", integer=True)
        return K not in sympy.simplify(self.expr.subs(Q, d + K)).free_symbols

    def for_head(self, head):
        if H not in self.expr.free_symbols:
            return self
        return Predicate(self.expr.subs(H, head % self.heads))

    def _keep(self, q, k, h):
        env = {Q: q, K: k}
        if H in self.expr.free_symbols:
            env[H] = torch.remainder(h, self.heads)
        return torch.as_tensor(evaluate_expr(self.expr, env))

    def _expr(self, head):
        if H in self.expr.free_symbols:
            return self.expr.subs(H, head % self.heads)
        return self.expr

    def text(self):
        body = expr_text(self.expr)
        return f"predicate({body})" if self.heads is None else (
            f"predicate({body}, heads={self.heads})")


def predicate(fn: Callable[..., object] | str, heads: int | None = None) -> Predicate:
    """Custom pattern from a Python function of symbolic ``q, k`` (optionally ``b, h``).

    The function may use ``+ - * // %``, unary ``-``, ``abs``, comparisons, ``&``, ``|``, ``~``
    and :func:`~.symbolic.minimum` / :func:`~.symbolic.maximum` (builtin ``min``/``max`` and
    ``and``/``or``/``if`` raise a ``TypeError``: they need a concrete truth value). Example::

        predicate(lambda q, k: (q - k) % 64 < 8)
        predicate(lambda q, k, h: k <= (h + 1) * 16, heads=4)
    """
    if isinstance(fn, str):
        from .dsl import parse

        p = parse(f"predicate({fn})" if heads is None else f"predicate({fn}, heads={heads})")
        assert isinstance(p, Predicate)
        return p
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as e:
        raise PatternError(f"cannot inspect predicate {fn!r}: {e}") from None
    bad = [n for n in names if n not in _SYMBOLS]
    if bad:
        raise PatternError(f"predicate parameters must be named q, k, h, b; got {names}")
    result = fn(**{n: Term(_SYMBOLS[n]) for n in names})
    if isinstance(result, (Condition, Term)):
        result = result.expr
    elif isinstance(result, bool):
        result = sympy.true if result else sympy.false
    if not isinstance(result, sympy.Basic):
        raise PatternError(f"predicate returned {type(result).__name__}, not a condition")
    return Predicate(result, heads)


# -- printing sympy back to DSL text -----------------------------------------------------------
# Precedence levels, loosest first, matching the DSL grammar in dsl.py.
_OR, _AND, _NOT, _REL, _ADD, _MUL, _UNARY, _ATOM = range(8)
_REL_OPS = {
    sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
    sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!=",
}


def expr_text(e: sympy.Basic) -> str:
    """DSL text for a keep expression (``q``, ``k``, ``h``; ``//``, ``%``, ``min``, ``max``)."""
    return _text(e)[0]


def _paren(e: sympy.Basic, level: int) -> str:
    s, own = _text(e)
    return f"({s})" if own < level else s


def _args(e: sympy.Basic) -> list[sympy.Basic]:
    return sorted(e.args, key=sympy.default_sort_key)


def _text(e: sympy.Basic) -> tuple[str, int]:
    if e is sympy.true:
        return "true", _ATOM
    if e is sympy.false:
        return "false", _ATOM
    if isinstance(e, sympy.Symbol):
        return _NAMES.get(e, str(e)), _ATOM
    if isinstance(e, sympy.Integer):
        return (str(int(e)), _ATOM) if e >= 0 else (str(int(e)), _UNARY)
    if isinstance(e, sympy.Or):
        return " | ".join(_paren(a, _AND) for a in _args(e)), _OR
    if isinstance(e, sympy.And):
        return " & ".join(_paren(a, _NOT) for a in _args(e)), _AND
    if isinstance(e, sympy.Not):
        return "~" + _paren(e.args[0], _ATOM), _NOT
    if type(e) in _REL_OPS:
        return f"{_paren(e.lhs, _ADD)} {_REL_OPS[type(e)]} {_paren(e.rhs, _ADD)}", _REL
    if isinstance(e, (sympy.Min, sympy.Max)):
        name = "min" if isinstance(e, sympy.Min) else "max"
        return f"{name}({', '.join(_text(a)[0] for a in _args(e))})", _ATOM
    if isinstance(e, IsPowerOf):
        return f"is_power({_text(e.args[0])[0]}, {_text(e.args[1])[0]})", _ATOM
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return f"{_paren(num, _MUL)} // {_paren(den, _UNARY)}", _MUL
    if isinstance(e, sympy.Mod):
        return f"{_paren(e.args[0], _MUL)} % {_paren(e.args[1], _UNARY)}", _MUL
    if isinstance(e, sympy.Add):
        # Positive terms first, so q - k prints as such rather than -k + q.
        terms = sorted(e.as_ordered_terms(), key=lambda t: bool(t.as_coeff_Mul()[0] < 0))
        out = _paren(terms[0], _ADD)
        for t in terms[1:]:
            coeff, rest = t.as_coeff_Mul()
            if coeff < 0:
                out += " - " + _paren(-t, _MUL)
            else:
                out += " + " + _paren(t, _MUL)
        return out, _ADD
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return "-" + _paren(rest, _UNARY), _UNARY
        if not isinstance(coeff, sympy.Integer):
            raise PatternError(f"cannot print non-integer expression {e}")
        factors = ([] if coeff == 1 else [coeff]) + list(sympy.Mul.make_args(rest))
        return " * ".join(_paren(f, _UNARY) for f in factors), _MUL
    if isinstance(e, sympy.Pow) and isinstance(e.args[1], sympy.Integer) and e.args[1] > 0:
        return " * ".join([_paren(e.args[0], _UNARY)] * int(e.args[1])), _MUL
    raise PatternError(f"cannot print {e} as pattern text")
