"""``nn.MultiheadAttention`` on the sparse op.

Dynamo keeps ``F.multi_head_attention_forward`` as one opaque call, so the detection pass sees
no softmax inside it. ``mha_site_reason`` says whether such a call can be replaced, and
``multi_head_attention_forward`` is the replacement: the same projections as PyTorch's, with
the attention itself done by ``sparse_compile.functional.attention``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from sparse_compile.functional import attention

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def mha_arguments(node: Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def mha_site_reason(arguments: dict[str, Any]) -> str | None:
    """Why this ``multi_head_attention_forward`` call cannot be replaced, or None."""
    if arguments["need_weights"] is not False:
        return "nn.MultiheadAttention returns its attention weights (need_weights=True)"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if arguments[name] is not None:
            return f"nn.MultiheadAttention with {name}"
    if arguments["add_zero_attn"] is not False:
        return "nn.MultiheadAttention with add_zero_attn"
    for name in ("training", "dropout_p", "use_separate_proj_weight"):
        if not isinstance(arguments[name], (bool, int, float)):
            return f"nn.MultiheadAttention with a non-constant {name}"
    return None


def _keep_bias(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """PyTorch's masks (bool True = masked out, or additive float) as an additive bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf"))
    return mask.to(like.dtype)


def multi_head_attention_forward(pattern: str, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, embed_dim_to_check: int, num_heads: int,
                                 in_proj_weight: Any, in_proj_bias: Any, bias_k: Any,
                                 bias_v: Any, add_zero_attn: bool, dropout_p: float,
                                 out_proj_weight: torch.Tensor, out_proj_bias: Any,
                                 training: bool = True, key_padding_mask: Any = None,
                                 need_weights: bool = True, attn_mask: Any = None,
                                 use_separate_proj_weight: bool = False,
                                 q_proj_weight: Any = None, k_proj_weight: Any = None,
                                 v_proj_weight: Any = None, static_k: Any = None,
                                 static_v: Any = None, average_attn_weights: bool = True,
                                 is_causal: bool = False, *,
                                 attend: Callable[..., torch.Tensor] = attention,
                                 ) -> tuple[torch.Tensor, None]:
    """``F.multi_head_attention_forward`` (unbatched or ``[L, N, E]`` inputs) with the
    attention computed by the sparse op under ``pattern``; returns ``(output, None)``.
    ``attend`` (same arguments as ``sparse_compile.attention``) computes the attention
    instead when given (calibration measures the attention this way)."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    lq, n, e = query.shape
    lk = key.shape[0]
    d = e // num_heads
    if use_separate_proj_weight:
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q = F.linear(query, q_proj_weight, bq)
        k = F.linear(key, k_proj_weight, bk)
        v = F.linear(value, v_proj_weight, bv)
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def heads(t: torch.Tensor, length: int) -> torch.Tensor:
        return t.reshape(length, n, num_heads, d).permute(1, 2, 0, 3)

    q, k, v = heads(q, lq), heads(k, lk), heads(v, lk)
    bias = _keep_bias(attn_mask, q)
    if bias is not None and bias.dim() == 3:
        bias = bias.view(n, num_heads, lq, lk)
    padding = _keep_bias(key_padding_mask, q)
    if padding is not None:
        padding = padding.view(n, 1, 1, lk)
        bias = padding if bias is None else bias + padding
    out = attend(q, k, v, pattern, scale=None, bias=bias,
                 dropout_p=dropout_p if training else 0.0)
    out = out.permute(2, 0, 1, 3).reshape(lq, n, e)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None
