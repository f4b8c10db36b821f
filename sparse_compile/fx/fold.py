"""Which part of a site is the model's mask, and whether the op can take it over.

An SDPA site's mask is its ``attn_mask`` (or ``is_causal`` with Lq ≠ Lk: causal aligned
top-left). A site written out by hand applies its mask in the score chain: a tensor added to the
scores, ``masked_fill(scores, mask, min)`` or ``where(mask, scores, min)``. ``fold_site_mask``
reads that mask (``model_mask.py``); when it is proven, the rewrite drops it and hands the op its
pattern, positions, key mask and documents instead. Where the keys come from a KV cache written
in place, the queries' positions come from the cache's write positions (``cache_positions.py``).
A FlexAttention call's mask is its ``mask_mod``, proven when the site was read
(``flex_mask.py``); its block mask is no longer used once the call is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.fx import Node

import sparse_compile.fx.graph_ops as ops
from sparse_compile.fx.cache_positions import CacheStart, CacheUnknown, cache_query_start
from sparse_compile.fx.flex_mask import block_mask_nodes
from sparse_compile.fx.index_values import IndexReader
from sparse_compile.fx.model_mask import ModelMask, read_model_mask
from sparse_compile.fx.site import AttentionSite


@dataclass(frozen=True)
class MaskPlan:
    """What becomes of a site's mask and positions.

    ``mask``: what the op takes over (pattern, positions, key mask, documents), None when
    nothing; ``kept``: why the site's mask stays a bias (None when it was folded or there is
    none); ``removed``: score-chain steps the fold replaces (hand-written sites); ``terms``: the
    mask nodes no longer used; ``unplaced``: why the keys' absolute positions are unknown (a
    cache that drops its oldest keys), None when they are known.
    """

    mask: ModelMask | None = None
    kept: str | None = None
    removed: frozenset[Node] = field(default_factory=frozenset)
    terms: tuple[Node, ...] = ()
    unplaced: str | None = None

    @property
    def drops_mask(self) -> bool:
        """Whether the site's own mask is replaced (else it stays a bias, if it has one)."""
        return self.mask is not None and self.kept is None

    @property
    def describe(self) -> str:
        parts = []
        if self.mask is not None and self.mask.parts:
            parts.append(self.mask.describe)
        if self.kept is not None:
            parts.append(f"bias: {self.kept}")
        return "; ".join(parts)


def plan_site_mask(site: AttentionSite, lq: Any, lk: Any) -> MaskPlan | None:
    """The site's mask folded or kept (with the reason) and its queries' positions from a KV
    cache written in place; None when the site has neither."""
    reader = IndexReader()
    if site.form == "flex":
        plan = MaskPlan(site.flex.mask, terms=block_mask_nodes(site.flex.call))
    elif site.form == "sdpa":
        plan = _fold_sdpa(site, reader, lq, lk)
    else:
        plan = _fold_chain(site, reader, lq, lk)
    cache = cache_query_start(reader, site.k) if site.form != "mha" else None
    plan = plan or MaskPlan()
    if isinstance(cache, CacheUnknown):
        plan = replace(plan, unplaced=cache.reason)
    elif isinstance(cache, CacheStart):
        mask = plan.mask or ModelMask()
        if mask.q_start is None and mask.k_start is None:
            mask = replace(mask, q_start=cache.value, q_start_checked=cache.checked,
                           parts=mask.parts + ("positions from the cache",))
            plan = replace(plan, mask=mask)
    return None if plan == MaskPlan() else plan


def _fold_chain(site: AttentionSite, reader: IndexReader, lq: Any, lk: Any) -> MaskPlan | None:
    """A hand-written site: the first score-chain step that applies a mask the pass can read."""
    if site.form == "mha":
        return None
    reason = None
    for node, index in site.bias_steps:
        term = _mask_term(node, index)
        if term is None:
            continue
        mask = read_model_mask(reader, term[0], term[1], lq, lk)
        if isinstance(mask, ModelMask):
            return MaskPlan(mask, removed=frozenset({node}), terms=_nodes(term[0]))
        reason = reason or mask
    return None if reason is None else MaskPlan(kept=reason)


def _fold_sdpa(site: AttentionSite, reader: IndexReader, lq: Any, lk: Any
               ) -> MaskPlan | None:
    from sparse_compile.patterns import causal

    if site.attn_mask is None:
        if site.is_causal and not ops.same_length(lq, lk):
            # SDPA aligns is_causal top-left: query i sits at position i.
            return MaskPlan(ModelMask(causal, q_start=0, parts=("causal (top-left)",)))
        return None
    t = ops.tensor_value(site.attn_mask)
    kind = "keep" if t is not None and t.dtype == torch.bool else "additive"
    mask = read_model_mask(reader, site.attn_mask, kind, lq, lk)
    if not isinstance(mask, ModelMask):
        return MaskPlan(kept=mask)
    if site.is_causal:  # both: the mask and causality
        pattern = causal if mask.pattern is None else mask.pattern & causal
        mask = replace(mask, pattern=pattern, parts=mask.parts + ("causal",))
    return MaskPlan(mask, terms=_nodes(site.attn_mask))


def _nodes(x: Any) -> tuple[Node, ...]:
    return (x,) if isinstance(x, Node) else ()


def erase_dead_masks(graph: Any, roots: list[Node]) -> None:
    """Erase the folded masks' nodes that nothing uses any more, and their producers in turn
    (never graph inputs, nodes still used, or operations with side effects), so that no
    Lq × Lk mask is built even without Inductor's dead-code elimination. A tensor allocated
    in the graph and only written in place (``create_block_mask`` fills its q-major tables
    with ``dense[rows, cols] = 1``) goes with its writes when nothing reads it."""
    erased: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in erased or getattr(node, "_erased", False):
            continue
        writes = _unread_writes(node)
        if writes is None:
            continue
        if node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        if ops.writes_in_place(node):
            continue
        inputs = set(node.all_input_nodes)
        for write in writes:
            inputs |= set(write.all_input_nodes)
            graph.erase_node(write)
            erased.add(write)
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs - {node})


_ALLOCATIONS = ("new_zeros", "new_ones", "new_empty", "new_full", torch.zeros, torch.ones,
                torch.empty, torch.full, torch.zeros_like, torch.ones_like, torch.empty_like,
                torch.full_like)


def _unread_writes(node: Node) -> list[Node] | None:
    """What goes with ``node`` when it is unread: nothing when it has no users; for a tensor
    allocated in the graph, its in-place writes whose results nothing uses, and the pure
    nodes that only feed those writes (``dense.new_ones(())``, the value written); None when
    it is read."""
    users = list(node.users)
    if not users:
        return []
    if node.target not in _ALLOCATIONS:
        return None
    writes = [u for u in users if not u.users and u.args and u.args[0] is node
              and ops.writes_in_place(u)]
    feeding = [u for u in users if u not in writes and not u.is_impure()
               and u.users and set(u.users) <= set(writes)]
    if len(writes) + len(feeding) != len(users):
        return None
    return writes + feeding


def _mask_term(node: Node, index: int) -> tuple[Any, str] | None:
    """``(mask, kind)`` of a score-chain step that applies a mask, else None."""
    if ops.is_add(node):
        other = node.args[1 - index]
        t = ops.tensor_value(other)
        return (other, "additive") if t is not None and t.dim() >= 2 else None
    if ops.is_masked_fill(node) and index == 0:
        return ops.arg(node, 1, "mask"), "drop"
    if ops.is_where(node) and index in (1, 2):
        return node.args[0], "keep" if index == 1 else "drop"
    return None


def combine_patterns(user: Any, model: Any) -> Any:
    """``user & model`` without repeating a conjunct ``user`` already has (``dense`` drops)."""
    from sparse_compile.patterns import dense

    if model is None or model == dense:
        return user
    if user == dense:
        return model
    if model in _conjuncts(user):
        return user
    return user & model


def _conjuncts(pattern: Any) -> list[Any]:
    if type(pattern).__name__ == "And":
        return [part for child in pattern.children() for part in _conjuncts(child)]
    return [pattern]
