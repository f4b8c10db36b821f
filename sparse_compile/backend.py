"""The ``sparse`` torch.compile backend.

``torch.compile(model, backend="sparse", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, so no import is needed) calls ``sparse_backend`` with
each FX graph Dynamo captures. It finds the attention sites (``detect``), picks a pattern for
each (``assign``, ``decorate``), replaces each provable site by one call of the sparse op
(``rewrite``), records what it did (``report``) and hands the graph to the chosen compiler.

Options (all optional): ``pattern`` (DSL text or Pattern, default ``"dense"``, which still
routes attention through the sparse op), ``assign`` (module-path glob or class name →
pattern; precedence ``assign`` > ``@sparsify`` decorator > ``pattern`` > default, see
``sparse_compile.fx.choose``), ``min_length`` (sites with fewer keys stay as they are; with
dynamic shapes the comparison becomes a guard, so crossing it recompiles), ``compiler``
(``"inductor"``, ``"eager"``, ``"aot_eager"``: what runs the rest of the graph),
``on_unsupported`` (``"warn"``: log and leave sites that cannot be proven as they are;
``"error"``: raise ``UnsupportedAttentionError`` for any such site, and let failures of the
pass itself propagate instead of falling back to the graph as captured). ``mode`` is passed to
Inductor as its mode options. ``context_parallel`` (set by
``sparse_compile.distributed.context_parallel``) makes every site call the sharded attention
of a sequence split over ranks; a site that cannot be sharded then always raises.

Before detection, in-place updates of fresh score tensors (``w.masked_fill_(...)``) are made
out-of-place, and Doge-style dynamic-mask attention is handed to the DMA pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from sparse_compile.decorate import decorated_pattern
from sparse_compile.fx.choose import BackendOptions, choose_pattern
from sparse_compile.fx.detect import find_sites, module_info
from sparse_compile.fx.fold import MaskPlan, combine_patterns, erase_dead_masks, plan_site_mask
from sparse_compile.fx.inplace import functionalize_score_updates
from sparse_compile.fx.rewrite import rewrite_site, site_pattern
from sparse_compile.fx.site import AttentionSite
from sparse_compile.report import SiteReport, log, record


class UnsupportedAttentionError(RuntimeError):
    """An attention site could not be rewritten and ``on_unsupported="error"`` was set."""


def sparse_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """Dynamo backend: rewrite the attention of ``gm`` and compile the result.

    ``options`` is what ``torch.compile(..., options=...)`` passes; keyword arguments given
    directly (e.g. through ``functools.partial``) are merged into it.
    """
    merged = {**(options or {}), **kwargs}
    if mode is not None:
        merged.setdefault("mode", mode)
    config = BackendOptions.from_mapping(merged)
    try:
        rewritten = sparsify_graph(gm, config)
    except UnsupportedAttentionError:
        raise
    except Exception as err:
        if config.on_unsupported == "error" or config.context_parallel is not None:
            raise
        # The pass must never break a model: fall back to the graph as captured.
        log.warning("sparse pass failed, compiling the graph unchanged: %r", err)
        rewritten = gm
    return compile_graph(rewritten, example_inputs, config)


def sparsify_graph(gm: GraphModule, config: BackendOptions) -> GraphModule:
    """A copy of ``gm`` whose provable attention sites call the sparse op."""
    graph = Graph()
    copies: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, copies)
    graph.output(out)
    new_gm = GraphModule(gm, graph)
    _keep_dynamo_metadata(gm, new_gm, copies)
    functionalize_score_updates(new_gm.graph)
    problems = _rewrite_dynamic_mask_sites(new_gm)
    folded: list[Node] = []
    order: Counter[str] = Counter()  # sites seen per module path: the '#index' of assign keys
    for site in find_sites(new_gm):
        row = _process(new_gm, site, config, order, folded)
        record(row)
        if not row.rewritten and (row.source != "min_length" or config.context_parallel):
            problems.append(row)
    erase_dead_masks(new_gm.graph, folded)
    _strip_value_tags(new_gm)
    if problems and (config.on_unsupported == "error" or config.context_parallel is not None):
        raise UnsupportedAttentionError(
            "attention left dense: " + "; ".join(row.line() for row in problems)
        )
    new_gm.graph.lint()
    new_gm.recompile()
    return new_gm


def _keep_dynamo_metadata(gm: GraphModule, new_gm: GraphModule, copies: dict[Node, Node]) -> None:
    """Carry what Dynamo attached to its graph over to the copy: the module's ``meta`` (its
    compile id), ``_param_name_to_source`` and each placeholder's ``_dynamo_source``.
    AOTAutograd reads them to know which inputs are static (parameters, buffers, a static
    KV cache marked with ``mark_static_address``); without them Inductor's CUDA graphs treat
    every input as dynamic, copy the weights in on each replay and refuse graphs that update
    a cache in place ("skipping cudagraphs due to mutated inputs")."""
    new_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    for old, new in copies.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source


def _rewrite_dynamic_mask_sites(gm: GraphModule) -> list[SiteReport]:
    """Doge-style dynamic-mask attention (its mask is built from the values) goes to the DMA
    op, which computes the same thing; returns the rows of sites that could not be proven."""
    from sparse_compile.dynamic_mask.detect import find_dma_sites, rewrite_dma_sites

    if not find_dma_sites(gm):
        return []
    problems = []
    for site in rewrite_dma_sites(gm):
        row = SiteReport(site.module_path, "dma", {}, site.pattern, None, site.reason is None,
                         site.reason, "model")
        record(row)
        if not row.rewritten:
            problems.append(row)
    return problems


def _strip_value_tags(gm: GraphModule) -> None:
    """attach_dma's value tags (sparse_compile.dynamic_mask.values) have served the dynamic
    sites."""
    from sparse_compile.dynamic_mask.values import strip_value_tags

    strip_value_tags(gm.graph)


def _process(gm: GraphModule, site: AttentionSite, config: BackendOptions,
             order: Counter[str], folded: list[Node]) -> SiteReport:
    """Choose, fold and rewrite one site; returns its report row. ``order`` counts the sites
    seen per module path (the ``#index`` of ``assign`` keys); the masks the site's rewrite
    folds are appended to ``folded``."""
    path, classes = module_info(site.anchor)
    index = order[path]
    order[path] += 1
    decorated = decorated_pattern(classes, site.anchor.meta.get("stack_trace"))
    pattern, source = choose_pattern(config, path, classes, decorated, index)
    shapes = _shapes(site)
    if site.reason is None:
        pattern = site_pattern(site, pattern)
    lq, lk = (shapes["q"][-2], shapes["k"][-2]) if "k" in shapes else (None, None)
    plan, mask = None, ""
    if site.reason is None and not getattr(pattern, "is_dynamic", False):
        plan = plan_site_mask(site, lq, lk)
        if plan is not None:
            mask = plan.describe
            if plan.mask is not None:
                pattern = combine_patterns(pattern, plan.mask.pattern)
            _refuse_evicted_keys(path, plan, pattern)

    def row(rewritten: bool, reason: str | None, source: str = source) -> SiteReport:
        return SiteReport(path, site.form, shapes, str(pattern), _density(pattern, lq, lk),
                          rewritten, reason, source, mask)

    if site.reason is not None:
        return row(False, site.reason)
    if getattr(pattern, "is_dynamic", False):  # dma / topk on a generic site
        from sparse_compile.dynamic_mask.sites import dynamic_site_problem

        if site.softcap:
            return row(False, f"soft-capped scores with the dynamic pattern {pattern}")

        problem = dynamic_site_problem(site, pattern)
        if problem is not None:
            return row(False, problem)
    if config.min_length and _below(lk, config.min_length):
        return row(False, f"{lk} keys < min_length {config.min_length}", "min_length")
    out = rewrite_site(gm, site, pattern, plan)
    if config.context_parallel is not None:
        from sparse_compile.distributed.bind import bind_site

        bind_site(gm.graph, out, config.context_parallel, path)
    if plan is not None and plan.drops_mask:
        folded.extend(plan.terms)
    return row(True, None)


def _refuse_evicted_keys(path: str, plan: MaskPlan, pattern: Any) -> None:
    """A cache whose first key need not be position 0 (a sliding-window cache drops its
    oldest keys) cannot serve a pattern that keeps keys by absolute position (``sink``,
    ``global``, ``block``, ...): the keys it would keep may be gone. Refused, whatever
    ``on_unsupported`` says: attending without them would be a wrong answer."""
    from sparse_compile.patterns.blocks import is_toeplitz

    shifted = plan.mask is not None and plan.mask.k_start is not None
    if (shifted or plan.unplaced is not None) and not is_toeplitz(pattern):
        why = plan.unplaced or "the model's keys start at a position known only at run time"
        raise UnsupportedAttentionError(
            f"{path or '<root>'}: {pattern} keeps keys by their absolute position, but {why} "
            "(a sliding-window cache drops its oldest keys): use a full (static or dynamic) "
            "cache, or a pattern of relative positions only (causal, sliding, window, local)")


def _below(length: Any, minimum: int) -> bool:
    # A symbolic length is compared through its guard: a later call with a length on the
    # other side of min_length recompiles.
    return bool(length < minimum)


def _shapes(site: AttentionSite) -> dict[str, tuple[Any, ...]]:
    shapes = {}
    for name in ("q", "k", "v"):
        operand = getattr(site, name)
        try:
            shapes[name] = operand.shape() if operand is not None else ()
        except (ValueError, AttributeError, IndexError):
            continue
    return {k: v for k, v in shapes.items() if v}


def _density(pattern: Any, lq: Any, lk: Any) -> float | None:
    hint = [_hint(x) for x in (lq, lk)]
    if None in hint or getattr(pattern, "is_dynamic", False):
        return None
    try:
        return float(pattern.layout(hint[0], hint[1]).density)
    except Exception:  # noqa: BLE001 - density is informative only
        return None


def _hint(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    hint = getattr(node, "hint", None)
    return hint if isinstance(hint, int) else None


def compile_graph(
    gm: GraphModule, example_inputs: Sequence[Any], config: BackendOptions
) -> Callable[..., Any]:
    """Hand the rewritten graph to Inductor, AOTAutograd with eager kernels, or run it as is."""
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = None
    if config.mode not in (None, "default"):
        patches = torch._inductor.list_mode_options(config.mode)
    log.debug("compiling %d nodes with inductor", len(gm.graph.nodes))
    if patches:
        return compile_fx(gm, example_inputs, config_patches=patches)
    return compile_fx(gm, example_inputs)


__all__ = ["UnsupportedAttentionError", "sparse_backend", "sparsify_graph"]
