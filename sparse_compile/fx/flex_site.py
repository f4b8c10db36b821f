"""A FlexAttention call as an attention site: what the op must compute, proven, or why not.

The op takes a call over when everything it computes is proven: its ``mask_mod`` is a mask the
op folds (``flex_mask.py``: pattern, positions, key mask, documents), its ``score_mod`` is the
identity, soft-capping, ALiBi or a relative-bias table (``flex_score.py``; a table only at the
default alignment), q, k and v suit the op (one head dimension; GQA when the query heads are a
multiple of the key/value heads, as ``enable_gqa`` requires), and
only the attention output is read: FlexAttention's log-sum-exp (``return_lse``) and row maximum
are not what the op returns. ``scale`` is FlexAttention's, a number or a graph value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparse_compile.fx.flex import FlexCall
from sparse_compile.fx.flex_mask import read_mask_mod
from sparse_compile.fx.flex_score import read_score_mod
from sparse_compile.fx.model_mask import ModelMask
from sparse_compile.fx.site import AttentionSite


@dataclass(frozen=True)
class FlexSite:
    """A FlexAttention call the op takes over: the ``call`` and its ``mask_mod`` folded."""

    call: FlexCall
    mask: ModelMask


def read_flex_site(site: AttentionSite, call: FlexCall) -> str | None:
    """Fill ``site`` (scale, soft-cap, ``flex``) from ``call``; the reason the call stays with
    FlexAttention, or None. ``site.q``/``k``/``v`` are set and checked already."""
    if call.return_lse:
        return ("the log-sum-exp is used (return_lse): the op does not return FlexAttention's "
                "log-sum-exp")
    if call.return_max:
        return "the row maximum of the scores is used: the op does not return it"
    score = read_score_mod(call.score_mod)
    if isinstance(score, str):
        return score
    lq, lk = site.q.shape()[-2], site.k.shape()[-2]
    mask = read_mask_mod(call, lq, lk)
    if isinstance(mask, str):
        return mask
    if score.relative and not _default_alignment(mask, lq, lk):
        return ("score_mod reads a relative-bias table, and the mask_mod places queries and "
                "keys other than bottom-right (q_idx - kv_idx is then no difference of the "
                "op's positions that a table of Lq + Lk - 1 entries covers)")
    _set_scale(site, call.scale)
    site.softcap = score.softcap
    site.alibi = score.alibi
    site.relative = score.relative
    site.flex = FlexSite(call, mask)
    return None


def _default_alignment(mask: ModelMask, lq: Any, lk: Any) -> bool:
    """Whether the folded mask leaves query row i at ``i + Lk - Lq`` and key j at ``j`` (or
    counts both from each document's start): then the op's ``q_pos - k_pos`` is FlexAttention's
    ``q_idx - kv_idx + Lk - Lq`` on every entry."""
    if mask.q_start is None and mask.k_start is None:
        return True
    q0, k0 = mask.q_start, 0 if mask.k_start is None else mask.k_start
    return all(isinstance(x, int) for x in (q0, k0, lq, lk)) and q0 - k0 == lk - lq


def _set_scale(site: AttentionSite, scale: Any) -> None:
    """A number is the op's scale; a graph value (dynamic shapes) multiplies q instead, which
    soft-capping sees the same way (it caps ``scale · q·k``)."""
    if isinstance(scale, int | float):
        site.scale = float(scale)
    else:
        site.q_factors.append(("mul", scale))
        site.scale = 1.0
