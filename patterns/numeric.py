"""Evaluate keep expressions and interval bounds on integer tensors.

The evaluator walks the sympy tree itself (rather than ``sympy.lambdify``) so that floor
division and ``Mod`` keep exact integer semantics on int64 tensors and so that only the
operations listed in :mod:`.symbolic` are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
import torch

from .errors import PatternError
from .symbolic import IsPowerOf

# Stands for +/- infinity in int64 arithmetic (interval bounds of unbounded rows).
INT_INF = 2**62

Value = torch.Tensor | int | bool


def evaluate_expr(expr: sympy.Basic, env: Mapping[sympy.Symbol, torch.Tensor]) -> Value:
    """Value of ``expr`` with each free symbol replaced by the int64 tensor ``env[symbol]``.

    Integer expressions give int64 tensors (or Python ints), Booleans give bool tensors (or
    Python bools). Tensors in ``env`` broadcast together.
    """
    return _Evaluator(env).value(expr)


class _Evaluator:
    def __init__(self, env: Mapping[sympy.Symbol, torch.Tensor]):
        self.env = env

    def value(self, e: sympy.Basic) -> Value:
        if e is sympy.true:
            return True
        if e is sympy.false:
            return False
        if isinstance(e, sympy.Symbol):
            if e not in self.env:
                raise PatternError(f"symbol {e} has no value here")
            return self.env[e]
        if isinstance(e, sympy.Integer):
            return int(e)
        if e is sympy.oo:
            return INT_INF
        if e is sympy.S.NegativeInfinity:
            return -INT_INF
        if isinstance(e, sympy.Add):
            num, den = sympy.fraction(sympy.together(e))
            if den != 1:
                raise PatternError(f"non-integer value {e} (use // for division)")
            if not isinstance(num, sympy.Add):
                return self.value(num)
            total: Value = 0
            for a in num.args:
                total = total + self.value(a)
            return total
        if isinstance(e, sympy.Mul):
            prod: Value = 1
            for a in e.args:
                if isinstance(a, sympy.Rational) and not isinstance(a, sympy.Integer):
                    raise PatternError(f"non-integer value {e} (use // for division)")
                prod = prod * self.value(a)
            return prod
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if not (isinstance(exp, sympy.Integer) and int(exp) >= 0):
                raise PatternError(f"unsupported power {e}")
            return self.value(base) ** int(exp)
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return _floordiv(self.value(num), self.value(den))
        if isinstance(e, sympy.Mod):
            a, m = (self.value(x) for x in e.args)
            if isinstance(a, int) and isinstance(m, int):
                return a % m
            if isinstance(a, int):
                a = torch.full_like(m, a)
            return torch.remainder(a, m)
        if isinstance(e, (sympy.Min, sympy.Max)):
            pick = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            builtin = min if isinstance(e, sympy.Min) else max
            vals = [self.value(a) for a in e.args]
            out = vals[0]
            for v in vals[1:]:
                out = _pick(out, v, pick, builtin, isinstance(e, sympy.Min))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            a, b = self.value(e.lhs), self.value(e.rhs)
            op = {
                sympy.StrictLessThan: lambda x, y: x < y,
                sympy.LessThan: lambda x, y: x <= y,
                sympy.StrictGreaterThan: lambda x, y: x > y,
                sympy.GreaterThan: lambda x, y: x >= y,
                sympy.Equality: lambda x, y: x == y,
                sympy.Unequality: lambda x, y: x != y,
            }[type(e)]
            return op(a, b)  # ints stay Python scalars beside tensors
        if isinstance(e, sympy.And):
            return _fold(self, e.args, lambda x, y: x & y)
        if isinstance(e, sympy.Or):
            return _fold(self, e.args, lambda x, y: x | y)
        if isinstance(e, sympy.Not):
            v = self.value(e.args[0])
            return (not v) if isinstance(v, bool) else ~v
        if isinstance(e, IsPowerOf):
            return is_power_of(self.value(e.args[0]), int(e.args[1]))
        raise PatternError(f"unsupported operation in a keep expression: {e}")


def _fold(ev: _Evaluator, args, op) -> Value:
    out = ev.value(args[0])
    for a in args[1:]:
        v = ev.value(a)
        if isinstance(out, bool) and not isinstance(v, bool):
            out, v = v, out  # the tensor's operator takes the Python bool
        out = op(out, v)
    return out


def _pick(a: Value, b: Value, pick, builtin, is_min: bool) -> Value:
    """min / max of two values. A Python int beside a tensor stays a scalar (a clamp), so
    that no tensor is created on the default device: the positions may sit on another one,
    and a CUDA graph capture refuses host-to-device copies."""
    if isinstance(a, int) and isinstance(b, int):
        return builtin(a, b)
    if isinstance(a, int):
        a, b = b, a
    if isinstance(b, int):
        return a.clamp(max=b) if is_min else a.clamp(min=b)
    return pick(a, b)


def _floordiv(a: Value, b: Value) -> Value:
    """Python floor division; a Python int beside a tensor stays a scalar (see ``_pick``)."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if isinstance(a, int):
        a = torch.full_like(b, a)
    return torch.div(a, b, rounding_mode="floor")


def is_power_of(d: Value, base: int) -> Value:
    """Elementwise ``d == base**j`` for some ``j >= 0`` (False for ``d <= 0``)."""
    if isinstance(d, int):
        return bool(IsPowerOf(sympy.Integer(d), sympy.Integer(base)))
    out = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    top = int(d.max().item()) if d.numel() else 0
    p = 1
    while p <= top:
        out |= d == p
        p *= base
    return out
