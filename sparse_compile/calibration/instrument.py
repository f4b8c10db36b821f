"""The calibration backend: every attention site replaced by a probe that measures it.

The graph goes through the backend's own pipeline (in-place score updates made out-of-place,
Doge-style dynamic-mask sites handed to the DMA op, ``find_sites``, ``rewrite_site``), with
``dense`` as every site's pattern; the call of the sparse op that the rewrite creates is then
replaced by a :class:`SiteProbe` submodule taking the same arguments. The probe computes the
same attention densely in PyTorch (``recall.attend_and_measure``) and adds, per query head,
the softmax mass each candidate keeps to its site's :class:`SiteRecord`. Sites are numbered
per module path in graph order, exactly as the ``sparse`` backend numbers them for ``assign``
keys ending in ``#index``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from sparse_compile.calibration.recall import DEFAULT_MAX_SCORES, KeptMass, attend_and_measure
from sparse_compile.functional import attention
from sparse_compile.fx.detect import find_sites, module_info
from sparse_compile.fx.inplace import functionalize_score_updates
from sparse_compile.fx.mha import multi_head_attention_forward
from sparse_compile.fx.rewrite import rewrite_site, site_pattern
from sparse_compile.fx.site import AttentionSite
from sparse_compile.patterns import Pattern, dense, parse


@dataclass
class SiteRecord:
    """One attention site and what was measured on it.

    ``index`` is the site's order among the sites of its module (None for a dynamic-mask
    site, which the backend does not number); ``merged_heads`` is True for 3-D attention,
    whose batch axis mixes batch and heads: its rows are pooled into one head. ``reason`` says
    why the site is not measured (the backend leaves such a site as it is). ``lq``, ``lk`` are
    the longest lengths measured.
    """

    module_path: str
    index: int | None
    form: str
    merged_heads: bool = False
    reason: str | None = None
    mass: KeptMass | None = None
    lq: int = 0
    lk: int = 0

    def add(self, mass: KeptMass, lq: int, lk: int) -> None:
        """Accumulate one call's kept mass (heads pooled for 3-D attention)."""
        if self.merged_heads:
            mass = mass.pooled()
        if self.mass is None:
            self.mass = mass
        elif self.mass.heads != mass.heads:
            raise RuntimeError(f"attention site {self.module_path!r} changed its number of "
                               f"heads between calls ({self.mass.heads}, then {mass.heads})")
        else:
            self.mass.add(mass)
        self.lq, self.lk = max(self.lq, lq), max(self.lk, lk)


@dataclass
class SiteTable:
    """The records of every site seen, in the order first seen, one per (path, index): a
    graph recompiled for new shapes measures into the same records."""

    records: dict[tuple[str, int | None], SiteRecord] = field(default_factory=dict)

    def site(self, module_path: str, index: int | None, form: str, merged_heads: bool,
             reason: str | None) -> SiteRecord:
        key = (module_path, index)
        if key not in self.records:
            self.records[key] = SiteRecord(module_path, index, form, merged_heads, reason)
        return self.records[key]


class SiteProbe(nn.Module):
    """Stands where the sparse op's call would be: the same arguments, the model's dense
    attention as output, and the kept mass of every candidate added to ``record``."""

    def __init__(self, record: SiteRecord, candidates: Sequence[Pattern], max_scores: int):
        super().__init__()
        self.record = record
        self.candidates = tuple(candidates)
        self.max_scores = max_scores

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
               scale: float | None = None, bias: torch.Tensor | None = None,
               dropout_p: float = 0.0, softcap: float | None = None) -> torch.Tensor:
        """``sparse_compile.attention``'s arguments (q ``[B, Hq, Lq, D]``, k, v
        ``[B, Hkv, Lk, D]``); ``pattern`` is the mask folded out of the model (``dense`` or
        ``causal``). Dropout is not applied: calibration measures the attention itself."""
        with torch.no_grad():
            out, mass = attend_and_measure(q, k, v, self.candidates, parse(pattern), scale,
                                           bias, softcap or 0.0, self.max_scores)
        self.record.add(mass, q.shape[-2], k.shape[-2])
        return out

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.attend(*args, **kwargs)


class MhaProbe(SiteProbe):
    """The probe of an ``nn.MultiheadAttention`` call: PyTorch's projections around
    :meth:`SiteProbe.attend`."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return multi_head_attention_forward(*args, attend=self.attend, **kwargs)


def calibration_backend(table: SiteTable, candidates: Sequence[Pattern],
                        max_scores: int = DEFAULT_MAX_SCORES) -> Callable[..., Any]:
    """A Dynamo backend that runs each captured graph with its attention sites probed, the
    rest as captured (no compiler: the probes keep Python state)."""

    def backend(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        return instrument_graph(gm, table, candidates, max_scores).forward

    return backend


def instrument_graph(gm: GraphModule, table: SiteTable, candidates: Sequence[Pattern],
                     max_scores: int = DEFAULT_MAX_SCORES) -> GraphModule:
    """A copy of ``gm`` whose provable attention sites call probes recording into ``table``."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new_gm = GraphModule(gm, graph)
    functionalize_score_updates(new_gm.graph)
    for path in _run_dynamic_mask_sites(new_gm):
        table.site(path, None, "dma", False, "dynamic-mask (DMA) attention: its pattern is "
                   "learned, not chosen")
    order: Counter[str] = Counter()  # as in backend.sparsify_graph: the '#index' of keys
    probes = 0
    for site in find_sites(new_gm):
        path, _ = module_info(site.anchor)
        index = order[path]
        order[path] += 1
        reason = site.reason
        if reason is None and site.form == "flex":
            reason = ("FlexAttention calls are not measured: the probes do not apply their "
                      "mask_mod")
        merged = reason is None and site.form != "mha" and len(site.q.shape()) == 3
        record = table.site(path, index, site.form, merged, reason)
        if reason is None:
            probe_type = MhaProbe if site.form == "mha" else SiteProbe
            new_gm.add_submodule(f"calibration_probe_{probes}",
                                 probe_type(record, candidates, max_scores))
            _probe_site(new_gm, site, f"calibration_probe_{probes}")
            probes += 1
    from sparse_compile.dynamic_mask.values import strip_value_tags

    strip_value_tags(new_gm.graph)
    new_gm.graph.lint()
    new_gm.recompile()
    return new_gm


def _run_dynamic_mask_sites(gm: GraphModule) -> list[str]:
    """Hand Doge-style dynamic-mask sites to the DMA op, as the backend does (so the other
    sites are found and numbered alike); returns their module paths."""
    from sparse_compile.dynamic_mask.detect import find_dma_sites, rewrite_dma_sites

    if not find_dma_sites(gm):
        return []
    return [site.module_path for site in rewrite_dma_sites(gm)]


def _probe_site(gm: GraphModule, site: AttentionSite, probe: str) -> None:
    """Rewrite ``site`` to the sparse op under ``dense``, then swap that call for the
    submodule ``probe`` (same arguments)."""
    graph = gm.graph
    before = set(graph.nodes)
    rewrite_site(gm, site, site_pattern(site, dense))
    (call,) = [node for node in graph.nodes if node not in before and _is_op_call(node)]
    with graph.inserting_before(call):
        probed = graph.call_module(probe, call.args, dict(call.kwargs))
    call.replace_all_uses_with(probed)
    graph.erase_node(call)


def _is_op_call(node: Node) -> bool:
    return node.op == "call_function" and node.target in (attention,
                                                          multi_head_attention_forward)
