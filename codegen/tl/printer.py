"""Print sympy keep-predicates and interval bounds as Triton expressions.

The printed text refers to the names given in ``names`` (by default ``Q -> q_pos``,
``K -> k_pos``) and to the helper functions in ``HELPERS_SOURCE``, which the generated module
defines. Integer division and modulo follow Python semantics (floor toward −∞, remainder with the
divisor's sign) because Triton's integer ``//`` and ``%`` truncate toward zero.
"""

from __future__ import annotations

import sympy

# Triton helpers every generated module starts with; printed expressions call them.
HELPERS_SOURCE = '''
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; "upcast" multiplies in fp32 (interpreter bf16 path)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dot_acc(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in place (no second fp32 tile in registers)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)

@triton.jit
def _tanh(x):
    """tanh through exp2 (no libdevice dependency); saturates exactly to +-1."""
    e = tl.math.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _floordiv(a, b):
    """Python floor division of integers (Triton's // truncates toward zero)."""
    quot = a // b
    rem = a - quot * b
    return tl.where((rem != 0) & ((rem < 0) != (b < 0)), quot - 1, quot)


@triton.jit
def _pymod(a, b):
    """Python modulo of integers: the result has the sign of the divisor."""
    rem = a % b
    return tl.where((rem != 0) & ((rem < 0) != (b < 0)), rem + b, rem)


@triton.jit
def _is_power_of(d, base: tl.constexpr):
    """True where d is a positive integer power of base (base**0 == 1 included)."""
    x = d
    for _ in tl.static_range(32):
        x = tl.where((x > 1) & (x % base == 0), x // base, x)
    return (d > 0) & (x == 1)


@triton.jit
def _is_power_of_2(d):
    """True where d is 1, 2, 4, 8, ... (bit trick)."""
    return (d > 0) & ((d & (d - 1)) == 0)
'''

DEFAULT_NAMES = {"Q": "q_pos", "K": "k_pos"}

# Stand-in for ±oo in interval bounds: far beyond any sequence length, safe in int32 arithmetic.
INT_BIG = 1 << 30


class PrintError(ValueError):
    """An expression uses something the Triton printer cannot express."""


def _rel(op: str, a: str, b: str) -> str:
    return f"({a} {op} {b})"


class TritonPrinter:
    """Turns a sympy expression over integer symbols into Triton source text.

    Args:
        names: symbol name -> Triton variable name.
        power_of_one_included: whether ``IsPowerOf(1, base)`` is true (base**0).
    """

    def __init__(
        self, names: dict[str, str] | None = None, power_of_one_included: bool = True
    ) -> None:
        self.names = dict(DEFAULT_NAMES if names is None else names)
        self.power_of_one_included = power_of_one_included

    def __call__(self, expr: sympy.Basic) -> str:
        return self.print(sympy.sympify(expr))

    def print(self, e: sympy.Basic) -> str:  # noqa: C901 - one branch per node type
        if e is sympy.true or e == sympy.true:
            return "True"
        if e is sympy.false or e == sympy.false:
            return "False"
        if isinstance(e, sympy.Symbol):
            if e.name not in self.names:
                raise PrintError(f"unknown symbol {e.name!r} (known: {sorted(self.names)})")
            return self.names[e.name]
        if isinstance(e, sympy.Integer):
            return str(int(e))
        if e is sympy.oo:
            return str(INT_BIG)
        if e is sympy.S.NegativeInfinity:
            return str(-INT_BIG)
        if isinstance(e, sympy.Rational):
            raise PrintError(f"non-integer constant {e} outside floor()")
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self.print(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if isinstance(exp, sympy.Integer) and int(exp) >= 1:
                return "(" + " * ".join([self.print(base)] * int(exp)) + ")"
            raise PrintError(f"unsupported power {e}")
        if isinstance(e, sympy.floor):
            return self._floor(e.args[0])
        if isinstance(e, sympy.ceiling):
            return f"(-{self._floor(-e.args[0])})"
        if isinstance(e, sympy.Mod):
            a, b = e.args
            if isinstance(b, sympy.Integer) and int(b) > 0 and int(b) & (int(b) - 1) == 0:
                # Python's a % 2**n is a & (2**n - 1) in two's complement, negatives included:
                # one AND per entry instead of a remainder and a sign fix-up.
                return f"({self.print(a)} & {int(b) - 1})"
            return f"_pymod({self.print(a)}, {self.print(b)})"
        if isinstance(e, sympy.Min | sympy.Max):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            args = [self.print(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = f"{fn}({out}, {a})"
            return out
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e)
        if isinstance(e, sympy.Abs):
            a = self.print(e.args[0])
            return f"tl.abs({a})"
        if isinstance(e, sympy.Eq):
            return _rel("==", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.Ne):
            return _rel("!=", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.Le):
            return _rel("<=", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.Lt):
            return _rel("<", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.Ge):
            return _rel(">=", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.Gt):
            return _rel(">", self.print(e.lhs), self.print(e.rhs))
        if isinstance(e, sympy.And):
            return "(" + " & ".join(self.print(a) for a in e.args) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " | ".join(self.print(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"({self.print(e.args[0])} == 0)"
        if isinstance(e, sympy.Function) and type(e).__name__ == "IsPowerOf":
            return self._is_power_of(*e.args)
        raise PrintError(f"cannot print {type(e).__name__}: {e}")

    def _mul(self, e: sympy.Mul) -> str:
        coeff, rest = e.as_coeff_Mul()
        if not isinstance(coeff, sympy.Integer):
            raise PrintError(f"non-integer coefficient in {e}")
        factors = [self.print(a) for a in sympy.Mul.make_args(rest)]
        if coeff != 1:
            factors.insert(0, str(int(coeff)))
        return "(" + " * ".join(factors) + ")"

    def _floor(self, arg: sympy.Basic) -> str:
        num, den = sympy.fraction(sympy.together(arg))
        if den == 1:
            return self.print(num)
        return f"_floordiv({self.print(sympy.expand(num))}, {self.print(den)})"

    def _piecewise(self, e: sympy.Piecewise) -> str:
        *pairs, (last_val, last_cond) = e.args
        if last_cond not in (sympy.true, True):
            raise PrintError(f"Piecewise without a default branch: {e}")
        out = self.print(last_val)
        for val, cond in reversed(pairs):
            out = f"tl.where({self.print(cond)}, {self.print(val)}, {out})"
        return out

    def _is_power_of(self, d: sympy.Basic, base: sympy.Basic) -> str:
        if not isinstance(base, sympy.Integer) or int(base) < 2:
            raise PrintError(f"IsPowerOf needs a constant integer base >= 2, got {base}")
        dd = self.print(d)
        fn = "_is_power_of_2(" + dd + ")" if int(base) == 2 else (
            f"_is_power_of({dd}, {int(base)})"
        )
        if self.power_of_one_included:
            return f"({fn})"
        return f"({fn} & ({dd} != 1))"


def print_triton(expr: sympy.Basic, names: dict[str, str] | None = None) -> str:
    """Triton source text for ``expr`` (see TritonPrinter)."""
    return TritonPrinter(names)(expr)
