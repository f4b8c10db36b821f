"""Axial patterns as two cheap parts merged by their log-sum-exp.

``axial(c)`` keeps (q, k) in the same grid row (``q // c == k // c``: ``block(c)``) or the
same grid column (``q ≡ k (mod c)``: ``strided(c)``). Visited as one pattern, every block of
the column part is PARTIAL with one entry in ``c`` kept, so the kernels touch most of the
Lq × Lk plane. Split in two, the row part is a block diagonal (closed-form bounds) and the
column part, without the pairs the row part already holds (``q == k``), runs by residue class
(``codegen/residue.py``): ``L·c + L²/c`` entries per head instead of most of ``L²``. The two
partial softmaxes are merged exactly by their log-sum-exps; the backward runs each part's
passes with the merged output and log-sum-exp, which gives each part's share of dQ, dK and
dV, and sums them.

Taken for ``axial(c)`` with offset 0, alone or under ``causal``, when the residue route takes
its column part (lengths multiples of ``c``, no bias, no dropout); otherwise the general
route runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .residue import residue_route

__all__ = ["AxialRoute", "axial_route", "merge_parts"]


@dataclass(frozen=True)
class AxialRoute:
    """The two parts' DSL texts: grid rows, and grid columns without the diagonal."""

    rows: str
    columns: str


@lru_cache(maxsize=256)
def _parts_for_text(pattern_text: str) -> AxialRoute | None:
    from sparse_compile.patterns import parse
    from sparse_compile.patterns import primitives as p
    from sparse_compile.patterns.layout import intersection_leaves

    leaves = intersection_leaves(parse(pattern_text))
    axial = [leaf for leaf in leaves if isinstance(leaf, p.Axial)]
    others = [leaf for leaf in leaves if not isinstance(leaf, p.Axial)]
    if len(axial) != 1 or axial[0].offset != 0 or axial[0].cols < 2:
        return None
    if not all(isinstance(leaf, p.Causal | p.Dense) for leaf in others):
        return None
    rest = [str(leaf) for leaf in others]
    c = axial[0].cols
    return AxialRoute(" & ".join(rest + [f"block({c})"]),
                      " & ".join(rest + [f"strided({c})", "~window(0, 0)"]))


def axial_route(pattern_text: str, lq: int, lk: int, has_bias: bool,
                dropout_p: float) -> AxialRoute | None:
    """The two-part route for this call, or None when the general route must run."""
    if has_bias or dropout_p > 0.0:
        return None
    parts = _parts_for_text(pattern_text)
    if parts is None or residue_route(parts.columns, lq, lk, False, 0.0) is None:
        return None
    return parts


def merge_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from each set's output and
    log-sum-exp (log2 units, +inf for a row with no key, as the kernels save them)."""
    empty_a, empty_b = torch.isposinf(lse_a), torch.isposinf(lse_b)
    la = torch.where(empty_a, float("-inf"), lse_a)
    lb = torch.where(empty_b, float("-inf"), lse_b)
    top = torch.maximum(la, lb)
    top = torch.where(torch.isneginf(top), 0.0, top)
    wa, wb = torch.exp2(la - top), torch.exp2(lb - top)
    total = wa + wb
    none = total == 0
    lse = torch.where(none, float("inf"), top + torch.log2(torch.where(none, 1.0, total)))
    share_a = torch.where(none, 0.0, wa / torch.where(none, 1.0, total))
    out = out_a.float() * share_a[..., None] + out_b.float() * (1.0 - share_a)[..., None]
    out = torch.where(none[..., None], 0.0, out)
    return out.to(out_a.dtype), lse
