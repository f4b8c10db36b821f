"""Strided unions as two cheap parts merged by their log-sum-exp.

A union with a strided operand, ``A | strided(s)`` (``axial(c)`` is ``block(c) | strided(c)``:
same grid row or same grid column; the Sparse Transformer's strided layout is
``sliding(w) | strided(s)``), visited as one pattern makes every block PARTIAL where the
strided part reaches, so the kernels touch most of the Lq × Lk plane. Split in two disjoint
parts, ``A`` runs as usual (closed-form bounds for bands and blocks) and ``strided(s) & ~A``
runs by residue class (``codegen/routes/residue.py``): for axial(c), ``L·c + L²/c`` entries per head
instead of most of ``L²``. The two partial softmaxes are merged exactly by their log-sum-exps
(``codegen/tl/merge.py``); the backward runs each part's passes with the merged output and
log-sum-exp, which gives each part's share of dQ, dK and dV, and sums them.

Taken for ``axial(c)`` with offset 0 and for a union with exactly one ``strided(s)`` operand,
alone or intersected with other patterns, when the residue route takes the strided part
(lengths multiples of ``s``, no bias, no dropout, ``~A`` and the other operands expressible on
the compressed indices); otherwise the general route runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sparse_compile.codegen.routes.residue import residue_route

__all__ = ["StridedUnion", "strided_union_route"]


@dataclass(frozen=True)
class StridedUnion:
    """The two parts' DSL texts: the pattern without its strided operand (``main``), and the
    strided operand without what ``main`` keeps (``strided``)."""

    main: str
    strided: str


@lru_cache(maxsize=256)
def _parts_for_text(pattern_text: str) -> StridedUnion | None:
    import sparse_compile.patterns.primitives as p
    from sparse_compile.patterns import parse
    from sparse_compile.patterns.layout import intersection_leaves, union_leaves
    from sparse_compile.patterns.nodes import Or

    leaves = intersection_leaves(parse(pattern_text))
    unions = [leaf for leaf in leaves if isinstance(leaf, p.Axial | Or)]
    if len(unions) != 1:
        return None
    rest = [str(leaf) for leaf in leaves if leaf is not unions[0]]
    union = unions[0]
    if isinstance(union, p.Axial):
        if union.offset != 0 or union.cols < 2:
            return None
        # block(c) and strided(c) share only q == k
        c = union.cols
        main, strided = f"block({c})", [f"strided({c})", "~window(0, 0)"]
    else:
        operands = union_leaves(union)
        stride = [op for op in operands if isinstance(op, p.Strided)]
        if len(stride) != 1 or stride[0].s < 2:
            return None
        main = " | ".join(str(op) for op in operands if op is not stride[0])
        strided = [str(stride[0]), f"~({main})"]
    bracketed = f"({main})" if rest and " | " in main else main
    return StridedUnion(" & ".join(rest + [bracketed]), " & ".join(rest + strided))


def strided_union_route(pattern_text: str, lq: int, lk: int, has_bias: bool,
                        dropout_p: float) -> StridedUnion | None:
    """The two-part route for this call, or None when the general route must run."""
    if has_bias or dropout_p > 0.0:
        return None
    parts = _parts_for_text(pattern_text)
    if parts is None or residue_route(parts.strided, lq, lk, False, 0.0) is None:
        return None
    return parts
