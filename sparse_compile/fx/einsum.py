"""Reading the two einsum contractions of attention as permutes of standard layouts.

Attention written with ``torch.einsum`` names its axes with letters. This module maps those
letters onto the standard layouts the sparse op uses: scores ``[batch..., Lq, Lk]`` from
``q [batch..., Lq, D]`` and ``k [batch..., Lk, D]``, output ``[batch..., Lq, D]`` from the
weights and ``v [batch..., Lk, D]``. Each function returns permutations (``None`` when the
operand is already in that layout) or raises ``ValueError`` naming what does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_SPARE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _expand_ellipsis(equation: str, ndims: Sequence[int]) -> tuple[list[str], str]:
    """Split ``equation`` into input terms and output term, with ``...`` replaced by letters."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        raise ValueError("einsum without an explicit output")
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError("einsum operand count does not match the equation")
    widths = [ndim - (len(t) - 3) for t, ndim in zip(terms, ndims, strict=True) if "..." in t]
    spare = [c for c in _SPARE_LETTERS if c not in equation]
    ellipsis_letters = "".join(spare[: max(widths, default=0)])
    expanded = []
    for term, ndim in zip(terms, ndims, strict=True):
        if "..." in term:
            width = ndim - (len(term) - 3)
            term = term.replace("...", ellipsis_letters[len(ellipsis_letters) - width :])
        expanded.append(term)
    out = out.replace("...", ellipsis_letters)
    return expanded, out


def _perm(term: str, order: str) -> tuple[int, ...] | None:
    perm = tuple(term.index(c) for c in order)
    return None if perm == tuple(range(len(term))) else perm


@dataclass(frozen=True)
class ScoresEinsum:
    """``q_perm``/``k_perm`` bring the operands to ``[batch..., L, D]``."""

    q_perm: tuple[int, ...] | None
    k_perm: tuple[int, ...] | None


def read_scores_einsum(equation: str, ndims: Sequence[int]) -> ScoresEinsum:
    """Read ``einsum(equation, q, k)`` producing scores ``[batch..., Lq, Lk]``.

    Example: ``"bhqd,bhkd->bhqk"`` and ``"bqhd,bkhd->bhqk"`` both qualify.
    """
    (tq, tk), out = _expand_ellipsis(equation, ndims)
    contracted = [c for c in tq if c in tk and c not in out]
    q_only = [c for c in tq if c not in tk]
    k_only = [c for c in tk if c not in tq]
    batch = [c for c in out[:-2]]
    if len(contracted) != 1:
        raise ValueError(f"einsum {equation!r} contracts {len(contracted)} axes, not one")
    if len(q_only) != 1 or len(k_only) != 1 or out[-2:] != q_only[0] + k_only[0]:
        raise ValueError(f"einsum {equation!r} does not end in (query, key) axes")
    if sorted(batch) != sorted(c for c in tq if c in tk and c in out):
        raise ValueError(f"einsum {equation!r} has axes that are neither batch nor contracted")
    if len(set(tq)) != len(tq) or len(set(tk)) != len(tk):
        raise ValueError(f"einsum {equation!r} repeats an axis")
    d = contracted[0]
    order = "".join(batch)
    return ScoresEinsum(_perm(tq, order + q_only[0] + d), _perm(tk, order + k_only[0] + d))


@dataclass(frozen=True)
class OutputEinsum:
    """``weights_first``: operand order; ``v_perm`` brings v to ``[batch..., Lk, D]``;
    ``out_perm`` brings ``[batch..., Lq, D]`` to the einsum's output layout."""

    weights_first: bool
    v_perm: tuple[int, ...] | None
    out_perm: tuple[int, ...] | None


def read_output_einsum(equation: str, ndims: Sequence[int], weights_index: int) -> OutputEinsum:
    """Read ``einsum(equation, ...)`` whose operand ``weights_index`` holds attention weights
    laid out ``[batch..., Lq, Lk]``; the other operand is v.

    Example: ``"bhqk,bhkd->bhqd"`` or ``"bhqk,bkhd->bqhd"``.
    """
    terms, out = _expand_ellipsis(equation, ndims)
    tp, tv = terms[weights_index], terms[1 - weights_index]
    batch, lq, lk = tp[:-2], tp[-2], tp[-1]
    value_only = [c for c in tv if c not in tp]
    if len(set(tp)) != len(tp) or len(set(tv)) != len(tv):
        raise ValueError(f"einsum {equation!r} repeats an axis")
    if lk not in tv or lk in out or lq in tv or len(value_only) != 1:
        raise ValueError(f"einsum {equation!r} does not contract the key axis with v")
    e = value_only[0]
    if any(c not in tv or c not in out for c in batch) or sorted(out) != sorted(batch + lq + e):
        raise ValueError(f"einsum {equation!r} does not keep the batch axes of the weights")
    if len(tv) != len(batch) + 2:
        raise ValueError(f"einsum {equation!r} sums over an axis of v")
    standard = batch + lq + e
    out_perm = tuple(standard.index(c) for c in out)
    return OutputEinsum(
        weights_first=weights_index == 0,
        v_perm=_perm(tv, batch + lk + e),
        out_perm=None if out_perm == tuple(range(len(out))) else out_perm,
    )
