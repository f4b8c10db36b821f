"""Recognising Doge's dynamic-mask attention in FX graphs and rewriting it to ``dma_attention``.

``DogeAttention`` (transformers) builds its additive mask from the values and feeds it to a plain
softmax attention::

    delta = exp(A * softplus(dt_proj(V_flat))).transpose(-1, -2)        # [B, Hkv, Lk]
    X = delta[:, :, None, :].expand(B, Hkv, Lq, Lk)
    X = X.masked_fill(model_mask != 0, min)                              # model mask, optional
    idx = topk(X, keep, dim=-1).indices                                  # only when Lk > keep
    X = X.masked_fill(zeros_like(X).scatter(-1, idx, 1.0) == 0, min)
    X = repeat_kv(X)                                                     # GQA, optional
    out = softmax(q @ repeat_kv(k).transpose(2, 3) * scale + X) @ repeat_kv(v)

``rewrite_dma_sites(gm)`` finds each such site (anchored at the ``masked_fill`` of an expanded
``[B, H, Lk]`` tensor, followed by the top-k/scatter chain or not), proves the chain, and replaces
the attention output by one call of ``dma_attention_masked`` (the model's ``[B, 1, Lq, Lk]``
mask: fused kernels when it is causal & key padding, the chunked path otherwise) or of
``dma_attention`` (no mask). The mask construction nodes die with the rewrite; ``delta``'s
producers (and so A and dt_proj) stay, so gradients reach them through the op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.dynamic_mask.functional import dma_attention
from sparse_compile.dynamic_mask.masked import dma_attention_masked

__all__ = ["DmaSite", "find_dma_sites", "rewrite_dma_sites"]

_MASK_FILL_LIMIT = -1e30  # Doge fills with finfo(dtype).min; anything this low means "removed".
# A graph traced with Lk <= keep_window_size has no top-k (and a guard keeping Lk there): every
# allowed key is kept, which is DMA with an unbounded keep.
NO_SELECTION = 2**31 - 1


@dataclass
class DmaSite:
    """One Doge-style DMA site. ``pattern`` is the DSL text (``dma(keep=...)``)."""

    module_path: str
    keep: int  # NO_SELECTION when the graph has no top-k (Lk <= keep_window_size)
    delta: Node
    model_mask: Node | None
    q: Node
    k: Node
    v: Node
    scale: float
    output: Node
    reason: str | None = None

    @property
    def pattern(self) -> str:
        return f"dma(keep={self.keep})"


def _call(node: Any, functions: tuple[Any, ...], methods: tuple[str, ...]) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else node


def _only_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_masked_fill(node: Any) -> bool:
    return _call(node, (torch.masked_fill, torch.Tensor.masked_fill), ("masked_fill",))


def _low_fill(node: Node) -> bool:
    fill = _arg(node, 2, "value")
    return isinstance(fill, (int, float)) and fill <= _MASK_FILL_LIMIT


def _broadcast_delta(node: Any) -> Node | None:
    """``delta`` when node is ``delta[:, :, None, :].expand(...)`` of a 3-D tensor."""
    if not _call(node, (), ("expand",)):
        return None
    src = node.args[0]
    if not (_call(src, (operator.getitem,), ()) and isinstance(src.args[1], tuple)):
        return None
    index = src.args[1]
    full = slice(None, None, None)
    if len(index) != 4 or index[2] is not None or any(index[i] != full for i in (0, 1, 3)):
        return None
    base = src.args[0]
    value = _val(base)
    return base if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _model_mask(fill: Node) -> Node | None:
    """The model's mask ``M`` of ``masked_fill(X, M != 0, min)``."""
    cond = _arg(fill, 1, "mask")
    if _call(cond, (operator.ne, torch.ne), ("ne", "__ne__")) and cond.args[1] == 0:
        return cond.args[0]
    return None


def _after_topk(masked: Node) -> tuple[int, Node, str | None]:
    """``(keep, final mask node, reason)`` following the top-k/scatter chain if present."""
    topks = [u for u in masked.users if _call(u, (torch.topk,), ("topk",))]
    if not topks:
        return NO_SELECTION, masked, None
    topk = topks[0]
    keep = _arg(topk, 1, "k")
    if not isinstance(keep, int) or _arg(topk, 2, "dim", -1) not in (-1, 3):
        return None, masked, "top-k with a non-constant k or not over the key axis"
    if _arg(topk, 3, "largest", True) is not True:
        return None, masked, "top-k of the smallest values"
    for index_node in topk.users:
        scatter = _only_user(index_node)
        if scatter is None or not _call(scatter, (torch.scatter,), ("scatter",)):
            continue
        eq = _only_user(scatter)
        if not _call(eq, (operator.eq, torch.eq), ("eq", "__eq__")) or eq.args[1] != 0:
            continue
        final = _only_user(eq)
        if _is_masked_fill(final) and final.args[0] is masked and _low_fill(final):
            return keep, final, None
    return keep, masked, "top-k result not used as Doge's scatter/masked_fill"


def _follow_views(node: Node) -> Node:
    """Skip repeat_kv's getitem/expand/reshape (and contiguous) to the single consumer."""
    while True:
        user = _only_user(node)
        if user is None or not (
            _call(user, (operator.getitem,), ())
            or _call(user, (torch.reshape,), ("expand", "reshape", "view", "contiguous"))
        ):
            return node
        node = user


def _attention_after(mask: Node) -> tuple[dict[str, Any] | None, str | None]:
    """Read ``softmax(matmul(q, kᵀ) * scale + mask) @ v`` downstream of the (repeated) mask."""
    last = _follow_views(mask)
    add = _only_user(last)
    if not _call(add, (operator.add, torch.add), ("add", "__add__")):
        return None, "dynamic mask not added to the scores"
    scores = add.args[0] if add.args[1] is last else add.args[1]
    scale = 1.0
    if _call(scores, (operator.mul, torch.mul), ("mul",)) and isinstance(scores.args[1], float):
        scale, scores = scores.args[1], scores.args[0]
    elif _call(scores, (operator.truediv, torch.div), ("div",)) and isinstance(
        scores.args[1], float
    ):
        scale, scores = 1.0 / scores.args[1], scores.args[0]
    if not _call(scores, (torch.matmul, operator.matmul), ("matmul",)):
        return None, "scores are not a matmul"
    q, kt = scores.args
    if not (_call(kt, (torch.transpose,), ("transpose",)) and set(kt.args[1:3]) in ({2, 3},
                                                                                 {-1, -2})):
        return None, "key operand is not transposed over its last two axes"
    softmax = _only_user(add)
    if not (_call(softmax, (F.softmax, torch.softmax), ("softmax",))
            and _arg(softmax, 1, "dim") in (-1, 3)):
        return None, "scores do not go through a softmax over keys"
    node = softmax
    while True:
        user = _only_user(node)
        if _call(user, (), ("to", "type_as", "float")):
            node = user
        elif _call(user, (F.dropout,), ()):
            if _arg(user, 1, "p", 0.5) != 0.0 and _arg(user, 2, "training", True):
                return None, "attention dropout in training mode"
            node = user
        else:
            break
    out = _only_user(node)
    if not (_call(out, (torch.matmul, operator.matmul), ("matmul",)) and out.args[0] is node):
        return None, "attention weights are not multiplied with values"
    return {"q": q, "k": kt.args[0], "v": out.args[1], "scale": scale, "output": out}, None


def find_dma_sites(gm: GraphModule) -> list[DmaSite]:
    """All Doge-style dynamic-mask attention sites of ``gm`` (rewritable iff ``reason is None``)."""
    from sparse_compile.fx.detect import module_info

    sites = []
    for node in gm.graph.nodes:
        if not _is_masked_fill(node) or not _low_fill(node):
            continue
        delta = _broadcast_delta(node.args[0])
        if delta is None:
            continue
        keep, final, reason = _after_topk(node)
        attention, why = _attention_after(final) if reason is None else (None, reason)
        path = module_info(node)[0]
        if attention is None:
            sites.append(DmaSite(path, keep, delta, _model_mask(node), node, node, node, 1.0,
                                 node, why))
            continue
        sites.append(DmaSite(path, keep, delta, _model_mask(node), attention["q"],
                             attention["k"], attention["v"], attention["scale"],
                             attention["output"]))
    return sites


def _dma_call(q, k, v, delta, keep, mask, scale):
    """What the rewritten graph calls. k/v arrive repeated for GQA (``repeat_kv``): every
    ``group``-th head is an original kv head, which the op shares across its query heads."""
    group = q.shape[1] // delta.shape[1]
    if group > 1:
        k, v = k[:, ::group], v[:, ::group]
    if mask is None:
        return dma_attention(q, k, v, delta, keep, causal=False, scale=scale)
    mask = mask[..., : k.shape[-2]]
    if mask.dim() == 4 and mask.shape[1] == 1:
        return dma_attention_masked(q, k, v, delta, mask, keep, scale)
    return dma_attention(q, k, v, delta, keep, causal=False, bias=mask, scale=scale)


def _dma_call_folded(q, k, v, delta, keep, causal, keys, scale):
    """What the rewritten graph calls when the model's mask is proven causal (or not) and key
    padding: the fused op, whose backward reuses the forward's selection."""
    group = q.shape[1] // delta.shape[1]
    if group > 1:
        k, v = k[:, ::group], v[:, ::group]
    return dma_attention(q, k, v, delta, keep, causal=causal, bias=keys, scale=scale)


def _folded_arguments(gm: GraphModule, site: DmaSite) -> tuple[bool, Any] | None:
    """``(causal, keys node or None)`` when the site's mask is proven to be causal and/or key
    padding (``fx/model_mask.py``: read from the graph, not from the data), else None."""
    from sparse_compile.fx.index_values import IndexReader
    from sparse_compile.fx.model_mask import ModelMask, read_model_mask
    from sparse_compile.fx.placed import key_mask_node
    from sparse_compile.patterns import causal

    mask = site.model_mask
    t = ops.tensor_value(mask)
    if t is None or t.dim() != 4:
        return None
    lq, lk = ops.tensor_value(site.q).shape[-2], ops.tensor_value(site.k).shape[-2]
    found = read_model_mask(IndexReader(), mask, "keep" if t.dtype == torch.bool
                            else "additive", lq, lk)
    if (not isinstance(found, ModelMask) or found.pattern not in (None, causal)
            or found.q_start is not None or found.k_start is not None
            or found.documents is not None):
        return None
    keys = None
    if found.key_mask is not None:
        keys = key_mask_node(gm.graph, found.key_mask, site.k)
    return found.pattern is not None, keys


def rewrite_dma_sites(gm: GraphModule) -> list[DmaSite]:
    """Replace every rewritable site's attention output by ``dma_attention``; returns all sites.

    A model mask proven from the graph to be causal and key padding (Doge's) goes to the
    fused op as ``causal=True`` and a ``[B, 1, 1, Lk]`` key mask, whose backward reuses the
    forward's selection; any other model mask goes to ``dma_attention_masked``, which runs the
    fused kernels when the data shows causal & key padding (recomputing the forward in its
    backward) and the chunked path otherwise. Without a top-k in the graph, ``keep`` is
    ``NO_SELECTION`` (every allowed key is kept, as in Doge when Lk <= keep_window_size). Dead
    mask-construction nodes are erased and the graph recompiled.
    """
    sites = find_dma_sites(gm)
    for site in sites:
        if site.reason is not None:
            continue
        with gm.graph.inserting_before(site.output):
            folded = _folded_arguments(gm, site) if site.model_mask is not None else None
            if folded is not None:
                new = gm.graph.call_function(
                    _dma_call_folded, (site.q, site.k, site.v, site.delta, site.keep,
                                       *folded, site.scale))
            else:
                new = gm.graph.call_function(
                    _dma_call, (site.q, site.k, site.v, site.delta, site.keep,
                                site.model_mask, site.scale)
                )
        new.meta.update(site.output.meta)
        site.output.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return sites
