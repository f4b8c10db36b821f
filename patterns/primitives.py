"""The built-in primitives of DESIGN.md section 2, one small frozen dataclass each.

Each primitive says what it keeps three ways that must agree (the tests check it):
``_keep`` on int64 tensors (the numeric truth), ``_expr`` as a sympy Boolean over ``Q, K``
and, where a row is one interval, ``_interval``. ``q``/``Q`` is the absolute query position.
Parameters are validated here (``PatternError`` for non-integers and out-of-range sizes), so the
DSL and the Python builders share the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import sympy
import torch

from .errors import PatternError
from .nodes import Pattern
from .numeric import is_power_of
from .symbolic import IsPowerOf, K, Q

_TRUE = torch.ones((), dtype=torch.bool)


def _floordiv(x: torch.Tensor, s: int) -> torch.Tensor:
    return torch.div(x, s, rounding_mode="floor")


class Primitive(Pattern):
    """A leaf pattern named ``name`` in the DSL; its dataclass fields are its parameters.

    ``minimums`` gives the smallest allowed value of each parameter.
    """

    __slots__ = ()
    name: str = ""
    minimums: dict[str, int] = {}
    toeplitz = False  # keep depends on q - k only

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PatternError(
                    f"{self.name}: parameter '{f.name}' must be an integer, got {value!r}"
                )
            low = self.minimums.get(f.name, 1)
            if value < low:
                what = "positive" if low == 1 else f"at least {low}"
                raise PatternError(f"{self.name}: parameter '{f.name}' must be {what}, got {value}")

    def params(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def text(self) -> str:
        p = self.params()
        return self.name if not p else f"{self.name}({', '.join(str(x) for x in p)})"


@dataclass(frozen=True, repr=False)
class Dense(Primitive):
    """``dense``: keeps everything."""

    name = "dense"
    toeplitz = True

    def _keep(self, q, k, h):
        return _TRUE.to(q.device)

    def _expr(self, head):
        return sympy.true

    def _interval(self, head):
        return (sympy.Integer(0), sympy.oo)


@dataclass(frozen=True, repr=False)
class Causal(Primitive):
    """``causal``: ``k <= q``."""

    name = "causal"
    toeplitz = True

    def _keep(self, q, k, h):
        return k <= q

    def _expr(self, head):
        return K <= Q

    def _interval(self, head):
        return (sympy.Integer(0), Q)


@dataclass(frozen=True, repr=False)
class Window(Primitive):
    """``window(a, b)``: ``q - a <= k <= q + b`` (``a`` keys back, ``b`` ahead; both >= 0)."""

    before: int
    after: int
    name = "window"
    minimums = {"before": 0, "after": 0}
    toeplitz = True

    def _keep(self, q, k, h):
        return (k >= q - self.before) & (k <= q + self.after)

    def _expr(self, head):
        return sympy.And(K >= Q - self.before, K <= Q + self.after)

    def _interval(self, head):
        return (Q - self.before, Q + self.after)


@dataclass(frozen=True, repr=False)
class Local(Primitive):
    """``local(w)``: ``|q - k| <= w // 2`` (a window of size ``w`` centred on ``q``)."""

    w: int
    name = "local"
    toeplitz = True

    def _keep(self, q, k, h):
        return (q - k).abs() <= self.w // 2

    def _expr(self, head):
        r = self.w // 2
        return sympy.And(K >= Q - r, K <= Q + r)

    def _interval(self, head):
        r = self.w // 2
        return (Q - r, Q + r)


@dataclass(frozen=True, repr=False)
class Sliding(Primitive):
    """``sliding(w)``: ``q - w < k <= q`` (the ``w`` most recent keys, itself included)."""

    w: int
    name = "sliding"
    toeplitz = True

    def _keep(self, q, k, h):
        return (k <= q) & (k > q - self.w)

    def _expr(self, head):
        return sympy.And(K >= Q - self.w + 1, K <= Q)

    def _interval(self, head):
        return (Q - self.w + 1, Q)


@dataclass(frozen=True, repr=False)
class Block(Primitive):
    """``block(s)``: ``q // s == k // s`` (block-diagonal with blocks of ``s`` positions)."""

    s: int
    name = "block"

    def _keep(self, q, k, h):
        return _floordiv(q, self.s) == _floordiv(k, self.s)

    def _expr(self, head):
        return sympy.Eq(sympy.floor(Q / self.s), sympy.floor(K / self.s))

    def _interval(self, head):
        start = self.s * sympy.floor(Q / self.s)
        return (start, start + self.s - 1)


@dataclass(frozen=True, repr=False)
class Axial(Primitive):
    """``axial(cols, offset=0)``: tokens after the first ``offset`` sit row-major on a grid of
    ``cols`` columns; keep pairs in the same grid row or the same grid column. The ``offset``
    leading tokens attend to everything and are attended by everything."""

    cols: int
    offset: int = 0
    name = "axial"
    minimums = {"cols": 1, "offset": 0}

    def _keep(self, q, k, h):
        r, c = q - self.offset, k - self.offset
        lead = (q < self.offset) | (k < self.offset)
        same_row = _floordiv(r, self.cols) == _floordiv(c, self.cols)
        same_col = torch.remainder(r, self.cols) == torch.remainder(c, self.cols)
        return lead | same_row | same_col

    def _expr(self, head):
        r, c, n = Q - self.offset, K - self.offset, self.cols
        return sympy.Or(
            Q < self.offset,
            K < self.offset,
            sympy.Eq(sympy.floor(r / n), sympy.floor(c / n)),
            sympy.Eq(sympy.Mod(r, n), sympy.Mod(c, n)),
        )


@dataclass(frozen=True, repr=False)
class Strided(Primitive):
    """``strided(s)``: ``(q - k) mod s == 0`` (every ``s``-th key, both directions)."""

    s: int
    name = "strided"
    toeplitz = True

    def _keep(self, q, k, h):
        return torch.remainder(q - k, self.s) == 0

    def _expr(self, head):
        return sympy.Eq(sympy.Mod(Q - K, self.s), 0)


@dataclass(frozen=True, repr=False)
class Fanout(Primitive):
    """``fanout(base=2)``: ``q - k`` is 0 or a power of ``base`` (1, base, base**2, ...);
    only keys at or before ``q``."""

    base: int = 2
    name = "fanout"
    minimums = {"base": 2}
    toeplitz = True

    def _keep(self, q, k, h):
        d = q - k
        return (d == 0) | is_power_of(d, self.base)

    def _expr(self, head):
        return sympy.Or(sympy.Eq(Q, K), IsPowerOf(Q - K, self.base))


@dataclass(frozen=True, repr=False)
class Sink(Primitive):
    """``sink(n)``: ``k < n`` (the first ``n`` keys are visible to every query)."""

    n: int
    name = "sink"

    def _keep(self, q, k, h):
        return k < self.n

    def _expr(self, head):
        return K < self.n

    def _interval(self, head):
        return (sympy.Integer(0), sympy.Integer(self.n - 1))


@dataclass(frozen=True, repr=False)
class Global(Primitive):
    """``global(n)``: ``k < n or q < n`` (the first ``n`` tokens see and are seen by all).

    The Python builder is ``global_`` (``global`` is a Python keyword)."""

    n: int
    name = "global"

    def _keep(self, q, k, h):
        return (k < self.n) | (q < self.n)

    def _expr(self, head):
        return sympy.Or(K < self.n, Q < self.n)


@dataclass(frozen=True, repr=False)
class Prefix(Primitive):
    """``prefix(n)``: ``q < n and k < n`` (bidirectional prefix; prefix-LM is
    ``causal | prefix(n)``)."""

    n: int
    name = "prefix"

    def _keep(self, q, k, h):
        return (q < self.n) & (k < self.n)

    def _expr(self, head):
        return sympy.And(Q < self.n, K < self.n)

    def _interval(self, head):
        # Rows q >= n are empty: lo = n * (q - n + 1) >= n > hi there, and lo <= 0 before.
        return (sympy.Max(0, self.n * (Q - self.n + 1)), sympy.Integer(self.n - 1))


class _Dynamic(Primitive):
    """A primitive whose kept set depends on the data; its runtime lives outside patterns/."""

    __slots__ = ()
    dynamic = True

    def _keep(self, q, k, h):
        raise PatternError(f"'{self.text()}' is dynamic: it cannot be evaluated from positions")

    def _expr(self, head):
        raise PatternError(f"'{self.text()}' is dynamic: it has no keep expression")


@dataclass(frozen=True, repr=False)
class Dma(_Dynamic):
    """``dma(keep)``: per query row, the ``keep`` keys with the largest DMA content score among
    the keys the model's mask allows (DESIGN.md section 4). Carries its parameter only."""

    keep: int
    name = "dma"


@dataclass(frozen=True, repr=False)
class TopK(_Dynamic):
    """``topk(k, block=128)``: per query block, the ``k`` key blocks of ``block`` keys with the
    largest pooled Q.K estimate. Carries its parameters only."""

    k: int
    block: int = 128
    name = "topk"


PRIMITIVES: dict[str, type[Primitive]] = {
    cls.name: cls
    for cls in (
        Dense, Causal, Window, Local, Sliding, Block, Axial, Strided, Fanout, Sink, Global,
        Prefix, Dma, TopK,
    )
}
