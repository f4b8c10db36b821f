"""Dynamic patterns on generic attention sites (any model, not Doge's own construction).

With ``pattern="dma(keep=...)"`` a site needs a content score: ``attach_dma`` tags the module's
value projection with it (``dma_values``), and ``dynamic_site_problem`` finds that tag behind the
site's V. ``topk(...)`` needs nothing from the model. ``dynamic_site_call`` inserts the call of
``dma_dispatch.dynamic_attention`` with the site's q, k, v, scale and the model's own mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, Node

from sparse_compile.dynamic_mask.dispatch import dynamic_attention, split_dynamic
from sparse_compile.dynamic_mask.values import find_tagged_delta
from sparse_compile.fx.operands import peel_gqa
from sparse_compile.fx.site import AttentionSite

__all__ = ["dynamic_site_problem", "dynamic_site_call"]


def _tagged_delta(site: AttentionSite) -> Node | None:
    if site.k is None or site.v is None:
        return None
    _, v_operand = peel_gqa(site.k, site.v)
    return find_tagged_delta(v_operand.node)


def dynamic_site_problem(site: AttentionSite, pattern: Any) -> str | None:
    """Why ``site`` cannot run the dynamic ``pattern`` (None when it can)."""
    try:
        spec = split_dynamic(pattern)
    except ValueError as err:
        return str(err)
    if site.form == "mha":
        return f"{spec.kind} patterns are not supported on nn.MultiheadAttention"
    if site.form == "flex":
        return f"{spec.kind} patterns are not supported on FlexAttention calls"
    if site.dropout_p:
        return f"{spec.kind} patterns do not support attention dropout ({site.dropout_p})"
    if len(site.q.shape()) != 4:
        return f"{spec.kind} patterns need 4-D [B, H, L, D] attention"
    if spec.kind == "dma" and _tagged_delta(site) is None:
        return ("dma needs a content score: call sparse_compile.attach_dma(model, keep=...) "
                "before compiling (no tagged value projection found behind this site's V)")
    return None


def dynamic_site_call(
    graph: Graph, site: AttentionSite, pattern: Any, q: Any, k: Any, v: Any, bias: Any
) -> Node:
    """Insert (at the graph's insertion point) the dynamic attention call for ``site``;
    ``q, k, v, bias`` are the graph values ``rewrite_site`` prepared."""
    delta = None
    if split_dynamic(pattern).kind == "dma":
        delta = graph.call_function(
            torch.ops.sparse_compile.dma_delta_heads_first.default, (_tagged_delta(site),))
    return graph.call_function(
        dynamic_attention, (q, k, v, str(pattern)),
        {"scale": site.scale, "bias": bias, "delta": delta},
    )
