"""Attention patterns: the DSL, their semantics and exact block layouts.

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
