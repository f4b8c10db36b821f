"""Attention patterns: the DSL, their semantics and exact block layouts.

A pattern is an immutable, hashable expression tree (``nodes.py``, ``primitives.py``,
``predicate.py``) meaning ``keep(h, q, k)`` with ``q`` the ABSOLUTE query position
``q_idx + Lk - Lq`` (bottom-right alignment) and ``k`` the key index. The primitives and their
meanings are those of DESIGN.md section 2. Choices made here:

* ``heads(p0, ..., p_{n-1})``: query head ``h`` uses ``p_{h % n}`` (so the list may be shorter
  than the model's heads and repeats); compositions of per-head parts have period lcm(n_i).
* DSL text (``dsl.py``) takes positional and named arguments (``local(w=256)``), ``&``, ``|``,
  ``~``, parentheses, free whitespace and ``#`` comments to the end of the line; ``str(p)`` is
  canonical text with every parameter positional (``axial(16, 0)``) and parses back to ``p``.
* ``global`` is a Python keyword: its builder is ``global_``.
* custom predicates (``predicate(lambda q, k: ...)``) are traced with wrapper objects; builtin
  ``min``/``max`` cannot work on symbolic values, so use :func:`minimum` / :func:`maximum`
  (in DSL text: ``min(...)``, ``max(...)``); ``and``/``or``/``not``/``if`` raise a TypeError.
* ``dma(keep)`` and ``topk(k, block=128)`` carry their parameters; their kept set depends on the
  data, so ``evaluate``/``mask``/``keep_expr``/``layout`` raise :class:`PatternError`.
* ``interval()`` states ``keep <=> lo <= K <= hi`` for keys ``K >= 0`` (keys are never negative),
  with ``lo = 0`` for rows unbounded below and ``hi = sympy.oo`` for rows unbounded above.

Public surface: :class:`Pattern`, :class:`PatternError`, :class:`Layout`, :func:`parse`, the
builders (``dense``, ``causal``, ``window``, ``local``, ``sliding``, ``block``, ``axial``,
``strided``, ``fanout``, ``sink``, ``global_``, ``prefix``, ``dma``, ``topk``, ``heads``,
``predicate``) and :func:`minimum` / :func:`maximum` for custom predicates.
"""

from .builders import (
    axial,
    block,
    causal,
    dense,
    dma,
    fanout,
    global_,
    heads,
    local,
    prefix,
    sink,
    sliding,
    strided,
    topk,
    window,
)
from .dsl import parse
from .errors import PatternError
from .layout import Layout
from .nodes import Pattern
from .predicate import predicate
from .symbolic import maximum, minimum

__all__ = [
    "Pattern", "PatternError", "Layout", "parse", "dense", "causal", "window", "local",
    "sliding", "block", "axial", "strided", "fanout", "sink", "global_", "prefix", "dma", "topk",
    "heads", "predicate", "minimum", "maximum",
]
