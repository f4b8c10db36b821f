"""Python builders: the same patterns as the DSL, as Python values and functions.

``causal`` and ``dense`` are patterns (no parameters); the rest are functions taking the same
positional or named parameters as the DSL, so ``causal & sliding(1024)`` equals
``parse("causal & sliding(1024)")``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import PatternError
from .nodes import Heads, Pattern
from .primitives import (
    Axial,
    Block,
    Causal,
    Dense,
    Dma,
    Fanout,
    Global,
    Local,
    Prefix,
    Sink,
    Sliding,
    Strided,
    TopK,
    Window,
)

dense: Pattern = Dense()
causal: Pattern = Causal()


def window(before: int, after: int) -> Pattern:
    """``q - before <= k <= q + after``."""
    return Window(before, after)


def local(w: int) -> Pattern:
    """``|q - k| <= w // 2``."""
    return Local(w)


def sliding(w: int) -> Pattern:
    """``q - w < k <= q``: the ``w`` most recent keys."""
    return Sliding(w)


def block(s: int) -> Pattern:
    """``q // s == k // s``."""
    return Block(s)


def axial(cols: int, offset: int = 0) -> Pattern:
    """Same row or column of a ``cols``-wide grid after ``offset`` dense leading tokens."""
    return Axial(cols, offset)


def strided(s: int) -> Pattern:
    """``(q - k) mod s == 0``."""
    return Strided(s)


def fanout(base: int = 2) -> Pattern:
    """``q - k`` is 0 or a power of ``base``."""
    return Fanout(base)


def sink(n: int) -> Pattern:
    """``k < n``."""
    return Sink(n)


def global_(n: int) -> Pattern:
    """``k < n or q < n`` (DSL ``global``; the trailing underscore avoids the keyword)."""
    return Global(n)


def prefix(n: int) -> Pattern:
    """``q < n and k < n``."""
    return Prefix(n)


def dma(keep: int) -> Pattern:
    """Dynamic: the ``keep`` keys with the largest DMA score per query row."""
    return Dma(keep)


def topk(k: int, block: int = 128) -> Pattern:
    """Dynamic: the ``k`` key blocks (of ``block`` keys) with the largest pooled Q.K score."""
    return TopK(k, block)


def heads(*patterns: Pattern | str | Mapping[int | range, Pattern | str]) -> Pattern:
    """Per-head pattern: query head ``h`` uses ``patterns[h % n]``.

    Either positional patterns (``heads(causal, local(64))``) or one mapping from head indices
    or ``range``s to patterns covering ``0 .. n-1`` exactly once
    (``heads({range(0, 4): causal, range(4, 8): local(64)})``). Strings are parsed as DSL.
    """
    from .nodes import _as_pattern

    if len(patterns) == 1 and isinstance(patterns[0], Mapping):
        slots: dict[int, Pattern] = {}
        for key, value in patterns[0].items():
            for i in [key] if isinstance(key, int) else key:
                if i in slots:
                    raise PatternError(f"heads: head {i} is given twice")
                slots[i] = _as_pattern(value)
        if sorted(slots) != list(range(len(slots))):
            raise PatternError(f"heads: the mapping must cover heads 0..n-1, got {sorted(slots)}")
        return Heads(tuple(slots[i] for i in range(len(slots))))
    return Heads(tuple(_as_pattern(p) for p in patterns))
