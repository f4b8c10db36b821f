"""The oracle for whole models: run a model uncompiled with the pattern applied by hand.

Inside ``pattern_by_hand(pattern)`` every softmax and log-softmax over the last axis of a
``[..., Lq, Lk]`` tensor gets ``where(keep, 0, -inf)`` added to its input, and every
``F.scaled_dot_product_attention`` gets the pattern folded into its mask (with SDPA's own
top-left ``is_causal`` mask made explicit). With ``exp=True``, every ``exp`` of a tensor with
at least three axes gets the same addition: for a softmax written out by hand
(``e = exp(s - max); e / e.sum(-1, keepdim=True)``) that drops exactly the entries the pattern
removes from the normalised sum. It is opt-in because other exps (gates, scales) must stay as
they are. ``keep`` is ``pattern.mask(Lq, Lk)``, i.e. query
``i`` at absolute position ``i + Lk - Lq`` (DESIGN.md §2). This shares no code with the
backend's detection or rewrite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from sparse_compile.patterns import Pattern, parse


def _pattern_bias(pattern: Pattern, lq: int, lk: int, like: torch.Tensor) -> torch.Tensor:
    keep = pattern.mask(lq, lk, device=like.device)
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~keep, float("-inf"))


@contextlib.contextmanager
def pattern_by_hand(pattern: Pattern | str, *, exp: bool = False) -> Iterator[None]:
    """Patch softmax, log-softmax and SDPA (and ``exp`` when ``exp``) so attention applies
    ``pattern`` explicitly."""
    pattern = parse(pattern) if isinstance(pattern, str) else pattern
    names = [(torch, "softmax"), (F, "softmax"), (torch.Tensor, "softmax"),
             (torch, "log_softmax"), (F, "log_softmax"), (torch.Tensor, "log_softmax"),
             (torch, "exp"), (torch.Tensor, "exp"), (F, "scaled_dot_product_attention")]
    original = {key: getattr(*key) for key in names}

    def masked(x: torch.Tensor, dim: Any) -> torch.Tensor:
        if x.dim() >= 2 and isinstance(dim, int) and dim % x.dim() == x.dim() - 1:
            return x + _pattern_bias(pattern, x.shape[-2], x.shape[-1], x)
        return x

    def f_softmax(x: torch.Tensor, dim: Any = None, _stacklevel: int = 3, dtype: Any = None):
        return original[F, "softmax"](masked(x, dim), dim=dim, dtype=dtype)

    def t_softmax(x: torch.Tensor, dim: Any, dtype: Any = None):
        return original[torch, "softmax"](masked(x, dim), dim, dtype=dtype)

    def f_log_softmax(x: torch.Tensor, dim: Any = None, _stacklevel: int = 3,
                      dtype: Any = None):
        return original[F, "log_softmax"](masked(x, dim), dim=dim, dtype=dtype)

    def t_log_softmax(x: torch.Tensor, dim: Any, dtype: Any = None):
        return original[torch, "log_softmax"](masked(x, dim), dim, dtype=dtype)

    def t_exp(x: torch.Tensor):
        return original[torch, "exp"](masked(x, -1) if x.dim() >= 3 else x)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        lq, lk = q.shape[-2], k.shape[-2]
        bias = _pattern_bias(pattern, lq, lk, q)
        if is_causal:
            top_left = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            bias = bias.masked_fill(~top_left, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            else:
                bias = bias + attn_mask
        return original[F, "scaled_dot_product_attention"](
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale,
            enable_gqa=enable_gqa)

    patches = {
        (torch, "softmax"): t_softmax, (F, "softmax"): f_softmax,
        (torch.Tensor, "softmax"): t_softmax, (torch, "log_softmax"): t_log_softmax,
        (F, "log_softmax"): f_log_softmax, (torch.Tensor, "log_softmax"): t_log_softmax,
        (F, "scaled_dot_product_attention"): sdpa,
    }
    if exp:
        patches.update({(torch, "exp"): t_exp, (torch.Tensor, "exp"): t_exp})
    for (owner, name), patched in patches.items():
        setattr(owner, name, patched)
    try:
        yield
    finally:
        for owner, name in patches:
            setattr(owner, name, original[owner, name])
