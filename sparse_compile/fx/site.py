"""``AttentionSite``: one attention found in a graph, normalised to the sparse op's arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.operands import Operand


@dataclass(frozen=True)
class BatchView:
    """A reshape that only regroups the batch axes (``[B·H, L, L] -> [B, H, L, L]``):
    ``args`` are the graph values of the new batch sizes, ``sizes`` their example values."""

    args: tuple[Any, ...]
    sizes: tuple[Any, ...]


def batch_view(node: Node) -> BatchView | None:
    """The ``BatchView`` of a reshape/view node, or None if it touches the last two axes."""
    if not ops.is_reshape(node) or node.target in ("flatten", torch.flatten):
        return None
    before, after = ops.tensor_value(node.args[0]), ops.tensor_value(node)
    if before is None or after is None or after.dim() not in (3, 4):
        return None
    if tuple(before.shape[-2:]) != tuple(after.shape[-2:]):
        return None
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = tuple(shape[0])
    if len(shape) != after.dim():
        return None
    return BatchView(tuple(shape[:-2]), tuple(after.shape[:-2]))


@dataclass
class AttentionSite:
    """One attention found in a graph, normalised to the sparse op's arguments.

    ``q``, ``k``, ``v`` bring graph values to ``[batch..., L, D]`` (batch is ``[B, H]`` for
    4-D attention, ``[B·H]`` for 3-D). The scores the model computes equal
    ``scale · (q·Πfactors) kᵀ + bias`` where ``bias`` is the score chain replayed on zeros
    (``bias_steps``, starting from ``bias_start``), plus ``attn_mask`` and ``is_causal`` for
    ``scaled_dot_product_attention``. With logit soft-capping (``softcap > 0``) the scores are
    ``softcap · tanh(scale · (q·Πfactors) kᵀ / softcap) + bias``. A FlexAttention call
    carries its operands and its proven mask in ``flex`` (``flex_site.FlexSite``).
    """

    anchor: Node
    output: Node
    form: str
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    q_factors: list[tuple[str, Any]] = field(default_factory=list)
    scale: float | None = None
    softcap: float = 0.0
    bias_steps: list[tuple[Node, int]] = field(default_factory=list)
    bias_start: tuple[Node, Any] | None = None
    attn_mask: Any = None
    is_causal: bool = False
    dropout_p: float = 0.0
    out_perm: tuple[int, ...] | None = None
    score_view: BatchView | None = None
    shifts: set[Node] = field(default_factory=set)
    weights_view: BatchView | None = None
    nodes: list[Node] = field(default_factory=list)
    reason: str | None = None
    flex: Any = None
    alibi: bool = False
    relative: bool = False

    @property
    def has_bias(self) -> bool:
        return self.bias_start is not None or any(
            not (ops.is_mul(n) or ops.is_div(n) or ops.is_cast_or_identity(n))
            for n, _ in self.bias_steps
        )
