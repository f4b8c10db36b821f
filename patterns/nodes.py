"""The pattern expression tree: the :class:`Pattern` base class and its combinators.

A pattern is immutable data: a tree of frozen dataclasses whose leaves are the primitives of
``primitives.py`` (and custom predicates of ``predicate.py``) and whose inner nodes are
``And``, ``Or``, ``Not`` and ``Heads``. Equality and hashing are structural, ``str`` is canonical
DSL text that parses back to an equal pattern.

Positions: ``q`` is always the ABSOLUTE query position ``q_idx + Lk - Lq`` (bottom-right
alignment), ``k`` the key index, ``h`` the query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch

from .errors import PatternError
from .numeric import INT_INF

if TYPE_CHECKING:
    from .layout import Layout

Interval = tuple[sympy.Expr, sympy.Expr]


class Pattern:
    """A sparse attention pattern: the predicate ``keep(h, q, k)``.

    Build from Python (``causal & sliding(1024)``) or from text
    (``parse("causal & sliding(1024)")``).
    Combine with ``&`` (both), ``|`` (either) and ``~`` (not).
    """

    __slots__ = ()

    # -- combinators -------------------------------------------------------------------------
    def __and__(self, other: Pattern) -> Pattern:
        return And(self, _as_pattern(other))

    def __rand__(self, other: Pattern) -> Pattern:
        return And(_as_pattern(other), self)

    def __or__(self, other: Pattern) -> Pattern:
        return Or(self, _as_pattern(other))

    def __ror__(self, other: Pattern) -> Pattern:
        return Or(_as_pattern(other), self)

    def __invert__(self) -> Pattern:
        return Not(self)

    # -- structure ---------------------------------------------------------------------------
    def children(self) -> tuple[Pattern, ...]:
        """Direct sub-patterns (empty for primitives)."""
        return ()

    def walk(self):
        """This node and all its descendants, pre-order."""
        yield self
        for c in self.children():
            yield from c.walk()

    @property
    def is_dynamic(self) -> bool:
        """True when the pattern contains ``dma`` or ``topk`` (kept set depends on the data)."""
        return any(getattr(n, "dynamic", False) for n in self.walk())

    @property
    def per_head(self) -> bool:
        """True when different query heads keep different entries."""
        return self.num_heads > 1 or any(getattr(n, "uses_head", False) for n in self.walk())

    @property
    def num_heads(self) -> int:
        """Period ``n`` of the head dependence: query head ``h`` uses head pattern ``h % n``.

        ``heads(p0, ..., p_{n-1})`` has ``n``; a composition has the lcm of its parts; 1 when the
        pattern is the same for every head.
        """
        n = 1
        for node in self.walk():
            n = math.lcm(n, getattr(node, "period", 1))
        return n

    def for_head(self, head: int) -> Pattern:
        """The pattern query head ``head`` uses (``heads(...)`` nodes resolved)."""
        return self

    # -- semantics ---------------------------------------------------------------------------
    def evaluate(
        self, q: torch.Tensor, k: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bool tensor ``keep(h, q, k)`` for broadcastable int64 tensors.

        ``q`` holds ABSOLUTE query positions (``q_idx + Lk - Lq``), ``k`` key indices, ``h``
        query-head indices (needed iff :attr:`per_head`). Raises :class:`PatternError` for
        dynamic patterns.
        """
        if self.is_dynamic:
            raise PatternError(f"'{self}' is dynamic: its kept set depends on the data")
        if h is None and self.per_head:
            raise PatternError(f"'{self}' is per-head: pass the query heads h")
        q = torch.as_tensor(q, dtype=torch.int64)
        k = torch.as_tensor(k, dtype=torch.int64, device=q.device)
        if h is not None:
            h = torch.as_tensor(h, dtype=torch.int64, device=q.device)
        shape = torch.broadcast_shapes(q.shape, k.shape, *(() if h is None else (h.shape,)))
        out = self._keep(q, k, h)
        return torch.as_tensor(out, device=q.device).expand(shape).clone()

    def _keep(self, q: torch.Tensor, k: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def mask(
        self, lq: int, lk: int, heads: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Dense bool keep-mask ``[lq, lk]`` (``[heads, lq, lk]`` for per-head patterns).

        Row ``i`` is query ``i`` at absolute position ``i + lk - lq``. ``heads`` defaults to
        :attr:`num_heads`; head ``h`` uses ``p_{h % num_heads}``. Materialises ``lq * lk``
        booleans: for tests and small sizes only.
        """
        q = torch.arange(lq, dtype=torch.int64, device=device) + (lk - lq)
        k = torch.arange(lk, dtype=torch.int64, device=device)
        if not self.per_head:
            if heads is not None:
                return self.evaluate(q[:, None], k[None, :]).expand(heads, lq, lk).clone()
            return self.evaluate(q[:, None], k[None, :])
        n = self.num_heads if heads is None else heads
        h = torch.arange(n, dtype=torch.int64, device=device)
        return self.evaluate(q[None, :, None], k[None, None, :], h[:, None, None])

    def keep_expr(self, head: int | None = None) -> sympy.Basic:
        """Sympy Boolean over ``Q``, ``K`` (see ``symbolic.py``) equal to ``keep`` for ``head``."""
        if self.is_dynamic:
            raise PatternError(f"'{self}' is dynamic: it has no closed-form keep expression")
        if head is None and self.per_head:
            raise PatternError(f"'{self}' is per-head: pass head=")
        return self._expr(head)

    def _expr(self, head: int | None) -> sympy.Basic:
        raise NotImplementedError

    def interval(self, head: int | None = None) -> Interval | None:
        """``(lo, hi)``, expressions of ``Q``, with ``keep(Q, K) <=> lo <= K <= hi`` for every key
        ``K >= 0``; None when a row is not one interval in closed form.

        Keys are never negative, so a row unbounded below has ``lo = 0``; a row unbounded above
        has ``hi = sympy.oo`` (``Min(hi, Lk - 1)`` removes it). An empty row has ``lo > hi``.
        Both bounds are non-decreasing in ``Q`` (the layout relies on it).
        """
        if self.is_dynamic:
            return None
        if head is None and self.per_head:
            raise PatternError(f"'{self}' is per-head: pass head=")
        return self._interval(head)

    def _interval(self, head: int | None) -> Interval | None:
        return None

    def layout(self, lq: int, lk: int, block_m: int = 128, block_n: int = 128) -> Layout:
        """Exact block layout for ``lq`` queries and ``lk`` keys in ``block_m x block_n`` tiles.

        See :class:`~sparse_compile.patterns.layout.Layout`. Never builds an ``lq x lk`` tensor.
        """
        from .layout import build_layout

        return build_layout(self, lq, lk, block_m, block_n)

    def show(self, lq: int = 64, lk: int | None = None, width: int = 64) -> str:
        """Print (and return) a compact text picture of the mask, with densities."""
        from .picture import text_picture

        picture = text_picture(self, lq, lq if lk is None else lk, width=width)
        print(picture)
        return picture

    def draw(
        self, path: str, lq: int = 256, lk: int | None = None, block_m: int = 64,
        block_n: int | None = None,
    ) -> None:
        """Write a PNG of the mask with block boundaries and FULL/PARTIAL shading (matplotlib)."""
        from .picture import draw_png

        draw_png(self, path, lq, lq if lk is None else lk, block_m, block_n or block_m)

    # -- text --------------------------------------------------------------------------------
    def text(self) -> str:
        """Canonical DSL text (same as ``str``)."""
        raise NotImplementedError

    def _precedence(self) -> int:
        return 3  # atoms; Not 2, And 1, Or 0

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"Pattern({self.text()!r})"


def _as_pattern(value: Any) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, str):
        from .dsl import parse

        return parse(value)
    raise TypeError(f"cannot combine a pattern with {type(value).__name__}")


def _wrap(p: Pattern, level: int) -> str:
    return f"({p.text()})" if p._precedence() < level else p.text()


@dataclass(frozen=True, repr=False)
class And(Pattern):
    """Keep where both ``left`` and ``right`` keep."""

    left: Pattern
    right: Pattern

    def children(self):
        return (self.left, self.right)

    def for_head(self, head):
        return And(self.left.for_head(head), self.right.for_head(head))

    def _keep(self, q, k, h):
        return torch.as_tensor(self.left._keep(q, k, h)) & self.right._keep(q, k, h)

    def _expr(self, head):
        return sympy.And(self.left._expr(head), self.right._expr(head))

    def _interval(self, head):
        a, b = self.left._interval(head), self.right._interval(head)
        if a is None or b is None:
            return None
        return (sympy.Max(a[0], b[0]), sympy.Min(a[1], b[1]))

    def text(self):
        # Left-associative: a & b & c is And(And(a, b), c); a right-nested And keeps parens.
        return f"{_wrap(self.left, 1)} & {_wrap(self.right, 2)}"

    def _precedence(self):
        return 1


@dataclass(frozen=True, repr=False)
class Or(Pattern):
    """Keep where ``left`` or ``right`` keeps."""

    left: Pattern
    right: Pattern

    def children(self):
        return (self.left, self.right)

    def for_head(self, head):
        return Or(self.left.for_head(head), self.right.for_head(head))

    def _keep(self, q, k, h):
        return torch.as_tensor(self.left._keep(q, k, h)) | self.right._keep(q, k, h)

    def _expr(self, head):
        return sympy.Or(self.left._expr(head), self.right._expr(head))

    def text(self):
        return f"{_wrap(self.left, 0)} | {_wrap(self.right, 1)}"

    def _precedence(self):
        return 0


@dataclass(frozen=True, repr=False)
class Not(Pattern):
    """Keep where ``inner`` does not."""

    inner: Pattern

    def children(self):
        return (self.inner,)

    def for_head(self, head):
        return Not(self.inner.for_head(head))

    def _keep(self, q, k, h):
        return ~torch.as_tensor(self.inner._keep(q, k, h))

    def _expr(self, head):
        return sympy.Not(self.inner._expr(head))

    def _interval(self, head):
        # The complement of [0, hi] is [hi + 1, oo] and of [lo, oo] is [0, lo - 1].
        iv = self.inner._interval(head)
        if iv is None:
            return None
        lo, hi = iv
        if lo == 0 and hi != sympy.oo:
            return (hi + 1, sympy.oo)
        if hi == sympy.oo and lo != 0:
            return (sympy.Integer(0), lo - 1)
        if lo == 0 and hi == sympy.oo:
            return (sympy.Integer(1), sympy.Integer(0))
        return None

    def text(self):
        return f"~{_wrap(self.inner, 2)}"

    def _precedence(self):
        return 2


@dataclass(frozen=True, repr=False)
class Heads(Pattern):
    """Per-head patterns: query head ``h`` uses ``patterns[h % len(patterns)]``.

    With ``n`` patterns and ``Hq`` model heads, ``Hq`` need not equal ``n``: the list repeats
    (so ``heads(causal, local(64))`` alternates). Nested per-head nodes combine through the lcm
    of their periods.
    """

    patterns: tuple[Pattern, ...]

    def __post_init__(self):
        if not self.patterns:
            raise PatternError("heads(...) needs at least one pattern")

    def children(self):
        return self.patterns

    @property
    def period(self) -> int:
        return len(self.patterns)

    def _pick(self, head: int | None) -> Pattern:
        # head None only reaches here when the period is 1 (keep_expr/interval check it).
        return self.patterns[0 if head is None else head % len(self.patterns)]

    def for_head(self, head):
        return self._pick(head).for_head(head)

    def _keep(self, q, k, h):
        n = len(self.patterns)
        if h is None and n == 1:
            return self.patterns[0]._keep(q, k, h)
        which = torch.remainder(h, n)
        out = None
        for i, p in enumerate(self.patterns):
            part = (which == i) & p._keep(q, k, h)
            out = part if out is None else out | part
        return out

    def _expr(self, head):
        return self._pick(head)._expr(head)

    def _interval(self, head):
        return self._pick(head)._interval(head)

    def text(self):
        return "heads(" + ", ".join(p.text() for p in self.patterns) + ")"


def unbounded() -> Interval:
    """The interval of a row that keeps every key."""
    return (sympy.Integer(0), sympy.oo)


__all__ = ["Pattern", "And", "Or", "Not", "Heads", "Interval", "INT_INF", "unbounded"]
