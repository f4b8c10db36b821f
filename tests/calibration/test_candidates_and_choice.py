"""The choice: sparsest candidate reaching the target, dense otherwise, heads folded to their
shortest period; and what calibration refuses, with clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_compile.patterns import PatternError, dense, parse

from sparse_compile.calibration.candidates import (
    check_candidates,
    check_criterion,
    check_recall,
    criterion_label,
)
from sparse_compile.calibration.choice import assigned_pattern, choose, densities

SLIDING = [parse(f"causal & sliding({w})") for w in (2, 4, 8)]


def test_lowest_density_that_reaches_the_target_wins() -> None:
    mean = torch.tensor([[0.5, 0.96, 0.99], [0.97, 0.98, 0.99], [0.1, 0.2, 0.94],
                         [math.nan] * 3], dtype=torch.float64)
    density = densities(SLIDING, 4, False, 16, 16)
    assert density[0].tolist() == sorted(density[0].tolist())
    assert choose(mean, density, 0.95) == [1, 0, None, None]
    # Recall 1 is reachable by a pattern that keeps everything, despite float32 rounding.
    full = torch.tensor([[1 - 1e-7, 1.0, 1.0]], dtype=torch.float64)
    assert choose(full, density[:1], 1.0) == [0]


def test_ties_go_to_the_earlier_candidate() -> None:
    same = [parse("causal & sliding(4)"), parse("causal & window(3, 0)")]
    density = densities(same, 1, False, 16, 16)
    assert density[0, 0] == density[0, 1]
    assert choose(torch.ones(1, 2, dtype=torch.float64), density, 0.9) == [0]


def test_per_head_candidates_are_resolved_per_head() -> None:
    per_head = parse("heads(causal & sliding(2), dense)")
    density = densities([per_head], 4, False, 16, 16)
    assert density[:, 0].tolist()[1] == 1.0 and density[0, 0] < 0.2
    assert densities([per_head], 1, True, 16, 16)[0, 0] == pytest.approx(
        per_head.layout(16, 16).density)


def test_assigned_pattern_folds_repeating_heads() -> None:
    a, b = SLIDING[0], SLIDING[2]
    assert assigned_pattern(SLIDING, [0, 0, 0, 0], False) == a
    assert assigned_pattern(SLIDING, [None, None], False) == dense
    assert assigned_pattern(SLIDING, [0, 2, 0, 2], False) == parse(f"heads({a}, {b})")
    assert assigned_pattern(SLIDING, [0, 2, 2, None], False) == parse(f"heads({a}, {b}, {b}, "
                                                                      "dense)")


@pytest.mark.parametrize("candidates, error, words", [
    ([], ValueError, "candidates is empty"),
    ("causal", TypeError, "list of patterns"),
    (["causal & dma(keep=4)"], ValueError, "dynamic"),
    (["topk(2, block=4)"], ValueError, "dynamic"),
    (["causal & slidng(4)"], PatternError, "did you mean 'sliding'"),
    ([3], TypeError, "DSL text or a Pattern"),
    (5, TypeError, "list of patterns"),
])
def test_bad_candidates_are_refused_clearly(candidates, error, words) -> None:
    with pytest.raises(error, match=words):
        check_candidates(candidates)


def test_candidates_are_kept_in_order_without_repeats() -> None:
    assert check_candidates(["block(4)", parse("causal"), "block( 4 )"]) == (
        parse("block(4)"), parse("causal"))


@pytest.mark.parametrize("recall", [0, 0.0, -0.5, 1.01, math.nan, math.inf])
def test_recall_outside_zero_one_is_refused(recall) -> None:
    with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
        check_recall(recall)


@pytest.mark.parametrize("recall", ["0.9", True, None])
def test_recall_that_is_not_a_number_is_refused(recall) -> None:
    with pytest.raises(TypeError, match="recall must be a number"):
        check_recall(recall)


def test_recall_targets_accepted() -> None:
    assert check_recall(1) == 1.0 and check_recall(0.5) == 0.5


@pytest.mark.parametrize("criterion", ["mean", "min", 0.01, 0.5, 0.999])
def test_criteria_accepted(criterion) -> None:
    assert check_criterion(criterion) == criterion


@pytest.mark.parametrize("criterion, error, words", [
    ("median", ValueError, "'mean', 'min' or a quantile level"),
    ("MEAN", ValueError, "'mean', 'min' or a quantile level"),
    (0, ValueError, "criterion='min'"),
    (0.0, ValueError, "criterion='min'"),
    (1, ValueError, r"must be in \(0, 1\)"),
    (1.5, ValueError, r"must be in \(0, 1\)"),
    (-0.01, ValueError, r"must be in \(0, 1\)"),
    (math.nan, ValueError, r"must be in \(0, 1\)"),
    (True, TypeError, "not bool"),
    (None, TypeError, "not NoneType"),
    ([0.01], TypeError, "not list"),
])
def test_bad_criteria_are_refused_clearly(criterion, error, words) -> None:
    with pytest.raises(error, match=words):
        check_criterion(criterion)


def test_criterion_labels() -> None:
    assert [criterion_label(c) for c in ("mean", "min", 0.01, 0.005, 0.1)] == [
        "mean", "min", "p1", "p0.5", "p10"]
