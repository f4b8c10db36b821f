"""``calibrate``: run a model on sample inputs with its attention probed, then choose."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from sparse_compile.calibration.candidates import (
    Criterion,
    check_candidates,
    check_criterion,
    check_recall,
)
from sparse_compile.calibration.instrument import SiteTable, calibration_backend
from sparse_compile.calibration.recall import DEFAULT_MAX_SCORES
from sparse_compile.calibration.result import Calibration
from sparse_compile.patterns import Pattern

log = logging.getLogger("sparse_compile")


def calibrate(
    model: Any,
    *inputs: Any,
    candidates: Iterable[Pattern | str],
    recall: float = 0.95,
    criterion: Criterion = "mean",
    batches: Iterable[Any] | None = None,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> Calibration:
    """Measure which candidate pattern each attention site and head of ``model`` tolerates.

    The model runs once per batch under ``torch.compile`` with a calibration backend: the
    sparse backend's own detection finds every attention site, and each is replaced by a probe
    that computes the same attention densely (so the model's outputs are unchanged) and
    records, per query head and query row, the share of the softmax mass each candidate
    keeps, on the model's actual probabilities (its masks and biases included). That share is
    averaged over rows and batches; the minimum over rows is kept too, and a histogram of the
    rows' shares (bins of 0.001) from which quantiles are read. Queries are processed in chunks
    of at most ``max_scores`` score entries: the ``Lq × Lk`` matrix is never built for long
    inputs. Rows the model masks entirely (padding queries) are not counted.

    Per site and head the choice is the candidate with the lowest density at the calibration
    length whose recall, summarised over rows by ``criterion``, reaches ``recall``; ``dense``
    where none does.

    Args:
        model: an ``nn.Module`` (or any callable ``torch.compile`` takes). It runs in eval
            mode under ``torch.no_grad`` (its mode is restored afterwards); dropout is not
            applied to the attention.
        *inputs: the positional arguments of one call: ``calibrate(model, input_ids, ...)``.
        candidates: static patterns, DSL text or :class:`Pattern`
            (``["causal & sliding(64)", "causal & sliding(256)"]``); ``dma`` / ``topk`` are
            refused (what they keep depends on the data).
        recall: target share of softmax mass to keep, in (0, 1].
        criterion: how the per-row shares are summarised before the comparison: ``"mean"``
            (the mean over rows), ``"min"`` (every row must reach ``recall``), or a quantile
            level ``q`` in (0, 1): at most a share ``q`` of rows may keep less than
            ``recall`` (``0.01``: 99% of rows reach it). The mean lets a head that attends
            far on a few rows (the ones that retrieve something) and locally on the rest pass
            under a window that breaks those rows; a low quantile does not. Quantiles come
            from the histogram: they are rounded down, by at most 0.001.
        batches: instead of ``*inputs``, an iterable of batches (a list, a DataLoader, a
            generator); a batch is a tensor (``model(batch)``), a tuple or list
            (``model(*batch)``) or a mapping (``model(**batch)``, as tokenizers return).
            Batches may differ in length; densities are taken at the longest.
        max_scores: score entries (``batch · heads · rows · keys``) held at once.

    Returns:
        A :class:`~sparse_compile.calibration.Calibration`: ``print(result)`` shows the table
        (site, head, candidate, density, mean recall, min recall, the quantile when
        ``criterion`` is one, chosen); ``result.assign``
        plugs into ``torch.compile(model, backend="sparse", options={"assign":
        result.assign})``; ``result.draw(path)`` writes heat maps.

    Dynamo's caches are reset before and after (``torch._dynamo.reset()``), as in
    ``explain``: other compiled models recompile on their next call.

    Example:
        >>> result = calibrate(model, input_ids, candidates=["causal & sliding(64)",
        ...                                                   "causal & sliding(256)"])
        >>> print(result)
        >>> compiled = torch.compile(model, backend="sparse",
        ...                          options={"assign": result.assign})
    """
    patterns = check_candidates(candidates)
    target = check_recall(recall)
    rule = check_criterion(criterion)
    if not isinstance(max_scores, int) or max_scores < 1:
        raise ValueError(f"max_scores must be a positive int, got {max_scores!r}")
    calls = _calls(inputs, batches)
    table = SiteTable()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=calibration_backend(table, patterns, max_scores))
    training = getattr(model, "training", None)
    ran = 0
    try:
        if training is not None:
            model.eval()
        with torch.no_grad():
            for args, kwargs in calls:
                compiled(*args, **kwargs)
                ran += 1
    finally:
        if training is not None:
            model.train(training)
        torch._dynamo.reset()
    if not ran:
        raise ValueError("batches is empty: calibration needs at least one batch")
    result = Calibration.from_records(table.records.values(), patterns, target, rule)
    if not result.sites:
        log.warning("calibrate: no attention site was measured\n%s", result)
    return result


def _calls(inputs: tuple[Any, ...],
           batches: Iterable[Any] | None) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``(args, kwargs)`` of each model call."""
    if batches is None:
        if not inputs:
            raise ValueError("calibrate needs inputs: calibrate(model, *inputs, ...) for one "
                             "call, or batches=[...] for several")
        return iter([(inputs, {})])
    if inputs:
        raise ValueError("give either positional inputs (one call) or batches=, not both")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError("batches must be an iterable of batches; for a single batch pass "
                        "calibrate(model, batch, ...) or batches=[batch]")
    return (_call(batch) for batch in batches)


def _call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}
