"""What calibration accepts: static candidate patterns, a recall target in (0, 1], and the
statistic of per-row recall that must reach it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sparse_compile.patterns import Pattern, parse


def check_candidates(candidates: Iterable[Pattern | str]) -> tuple[Pattern, ...]:
    """The candidates as distinct Patterns, in the order given.

    Raises ``TypeError`` for something that is not DSL text or a Pattern (a bare string is
    refused too: it would be read as one candidate per character), ``PatternError`` for bad
    text, and ``ValueError`` for an empty list or a dynamic pattern (``dma``, ``topk``: what
    they keep depends on the data, so there is no fixed kept set to measure).
    """
    if isinstance(candidates, (str, Pattern)):
        raise TypeError("candidates must be a list of patterns, e.g. "
                        f"candidates=[{str(candidates)!r}], not one pattern")
    try:
        items = list(candidates)
    except TypeError:
        raise TypeError(f"candidates must be a list of patterns, not "
                        f"{type(candidates).__name__}") from None
    if not items:
        raise ValueError("candidates is empty: give at least one pattern to measure, e.g. "
                         "candidates=['causal & sliding(256)']")
    patterns: list[Pattern] = []
    for item in items:
        pattern = _as_pattern(item)
        if pattern.is_dynamic:
            raise ValueError(
                f"candidate '{pattern}' is dynamic (dma / topk): what it keeps depends on the "
                "data, so calibration cannot measure it; give static patterns")
        if pattern not in patterns:
            patterns.append(pattern)
    return tuple(patterns)


def _as_pattern(item: Any) -> Pattern:
    if isinstance(item, Pattern):
        return item
    if isinstance(item, str):
        return parse(item)  # a PatternError quotes the text and marks the column
    raise TypeError(f"a candidate must be DSL text or a Pattern, not {type(item).__name__}")


def check_recall(recall: Any) -> float:
    """The recall target as a float in (0, 1]; ``ValueError`` otherwise (``TypeError`` for a
    non-number)."""
    if isinstance(recall, bool) or not isinstance(recall, (int, float)):
        raise TypeError(f"recall must be a number in (0, 1], not {type(recall).__name__}")
    if not (0.0 < recall <= 1.0) or math.isnan(recall):
        raise ValueError(f"recall must be in (0, 1] (the share of softmax mass a pattern must "
                         f"keep), got {recall}")
    return float(recall)


Criterion = str | float
"""``"mean"``, ``"min"``, or a quantile level in (0, 1): see :func:`check_criterion`."""


def check_criterion(criterion: Any) -> Criterion:
    """The statistic of per-row recall that the choice compares with the target.

    ``"mean"``: the mean over query rows; ``"min"``: the smallest row (every row must reach the
    target); a float ``q`` in (0, 1): the ``q``-quantile of rows (``0.01``: at most 1% of rows
    may keep less than the target). ``TypeError`` for another type, ``ValueError`` for another
    word or a level outside (0, 1).
    """
    if isinstance(criterion, str):
        if criterion in ("mean", "min"):
            return criterion
        raise ValueError(f"criterion must be 'mean', 'min' or a quantile level in (0, 1) such "
                         f"as 0.01, got {criterion!r}")
    if isinstance(criterion, bool) or not isinstance(criterion, (int, float)):
        raise TypeError(f"criterion must be 'mean', 'min' or a quantile level in (0, 1), not "
                        f"{type(criterion).__name__}")
    if not (0.0 < criterion < 1.0) or math.isnan(criterion):
        hint = " (for every row, criterion='min')" if criterion == 0 else ""
        raise ValueError(f"a quantile criterion must be in (0, 1), the share of rows allowed "
                         f"below the target, got {criterion}{hint}")
    return float(criterion)


def criterion_label(criterion: Criterion) -> str:
    """How the table names the statistic: ``mean``, ``min``, ``p1`` for the 0.01-quantile."""
    return criterion if isinstance(criterion, str) else f"p{100 * criterion:g}"


def criterion_words(criterion: Criterion) -> str:
    """The statistic in words, for the table's last line."""
    if criterion == "mean":
        return "mean over rows"
    if criterion == "min":
        return "every row"
    return f"all but {100 * criterion:g}% of rows"
