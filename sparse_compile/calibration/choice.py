"""Choosing, per site and head, the sparsest candidate that keeps enough softmax mass.

A candidate qualifies for a head when a statistic of its per-row kept mass (the criterion: the
mean over rows, the minimum, or a low quantile) reaches the recall target (up to
``TOLERANCE``, so that a candidate keeping everything the model attends to qualifies at
``recall=1``); among those the one with the lowest density at the site's calibration length
wins, the earlier candidate on ties. A head where none qualifies gets ``dense``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from sparse_compile.calibration.candidates import Criterion
from sparse_compile.calibration.recall import TOLERANCE, histogram_quantile
from sparse_compile.patterns import Pattern, dense, heads


@functools.lru_cache(maxsize=4096)
def pattern_density(pattern: Pattern, lq: int, lk: int) -> float:
    """Kept fraction of the ``lq × lk`` entries (the mean over heads for a per-head pattern),
    from the exact block layout: the figure ``explain`` shows."""
    return float(pattern.layout(lq, lk).density)


def head_pattern(candidate: Pattern, head: int | None) -> Pattern:
    """What ``candidate`` keeps for query ``head`` (the whole pattern when ``head`` is None:
    heads pooled)."""
    return candidate if head is None else candidate.for_head(head)


def densities(candidates: Sequence[Pattern], head_count: int, pooled: bool, lq: int,
              lk: int) -> torch.Tensor:
    """float64 ``[H, C]``: each candidate's density for each head at ``lq × lk``."""
    return torch.tensor([[pattern_density(head_pattern(c, None if pooled else h), lq, lk)
                          for c in candidates] for h in range(head_count)],
                        dtype=torch.float64).reshape(head_count, len(candidates))


def recall_statistic(criterion: Criterion, mean: torch.Tensor, minimum: torch.Tensor,
                     histogram: torch.Tensor) -> torch.Tensor:
    """float64 ``[H, C]``: the figure the choice compares with the target under ``criterion``
    (``mean``, ``minimum`` ``[H, C]`` as they are; a quantile level read from ``histogram``
    ``[H, C, RECALL_BINS + 1]``)."""
    if criterion == "mean":
        return mean
    if criterion == "min":
        return minimum
    return histogram_quantile(histogram, float(criterion))


def choose(statistic: torch.Tensor, density: torch.Tensor,
           recall: float) -> list[int | None]:
    """Per head, the index of the chosen candidate, or None for ``dense``.

    ``statistic``, ``density``: float64 ``[H, C]`` (a NaN statistic, from a head with no
    counted row, never qualifies).
    """
    chosen: list[int | None] = []
    for h in range(statistic.shape[0]):
        ok = [j for j in range(statistic.shape[1])
              if statistic[h, j] >= recall - TOLERANCE]
        chosen.append(min(ok, key=lambda j: (float(density[h, j]), j)) if ok else None)
    return chosen


def assigned_pattern(candidates: Sequence[Pattern], chosen: Sequence[int | None],
                 pooled: bool) -> Pattern:
    """The pattern a site gets: one pattern when every head chose the same, else
    ``heads(p0, ..., p_{n-1})`` over the shortest period ``n`` that repeats the choice."""
    parts = [dense if j is None else head_pattern(candidates[j], None if pooled else h)
             for h, j in enumerate(chosen)]
    if not parts:
        return dense
    period = next(n for n in range(1, len(parts) + 1)
                  if len(parts) % n == 0 and all(p == parts[i % n] for i, p in enumerate(parts)))
    return parts[0] if period == 1 else heads(*parts[:period])
