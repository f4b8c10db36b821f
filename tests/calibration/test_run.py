"""``calibrate`` end to end: the figures against the float64 oracle on a two-layer model with
two attention sites per module, the mapping's round trip through the backend against the
patterns applied by hand, ``explain`` on the mapping, inputs and batches, errors, drawing."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from sparse_compile.patterns import parse

import sparse_compile as sc
from sparse_compile.calibration.choice import pattern_density
from tests.calibration.models import (
    B,
    C,
    L,
    Stack,
    counted_rows,
    kept_mass,
    oracle_choice,
    oracle_quantile,
    oracle_recall,
    padding_mask,
)
from tests.conftest import rel_error

CANDIDATES = ["causal & sliding(2)", "causal & sliding(4)", "causal & sliding(8)"]


@pytest.fixture(scope="module")
def setup():
    """The model, its inputs (batch 1 left-padded by 5) and one calibration of it."""
    torch.manual_seed(0)
    model = Stack().eval()
    x, keep = torch.randn(B, L, C), padding_mask([L, L - 5], L)
    result = sc.calibrate(model, x, keep, candidates=CANDIDATES, recall=0.9)
    return model, x, keep, result


def test_figures_match_the_float64_oracle(setup) -> None:
    model, x, keep, result = setup
    oracle = copy.deepcopy(model).double().probabilities(x.double(), keep)
    assert [site.key for site in result.sites] == list(oracle)
    counted = counted_rows(keep)
    for site in result.sites:
        assert site.lq == site.lk == L and not site.pooled
        assert site.rows.tolist() == [int(counted.sum())] * site.heads
        for j, text in enumerate(CANDIDATES):
            mean, minimum = oracle_recall(oracle[site.key], parse(text), counted)
            torch.testing.assert_close(site.mean[:, j], mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(site.minimum[:, j], minimum, rtol=0, atol=1e-5)
            assert site.density[:, j].tolist() == [pattern_density(parse(text), L, L)] * 4


@pytest.mark.parametrize("level", [0.1, 0.3])
def test_quantiles_and_their_choice_match_the_rows(setup, level: float) -> None:
    model, x, keep, result = setup
    with torch.no_grad():
        oracle = copy.deepcopy(model).double().probabilities(x.double(), keep)
    counted = counted_rows(keep)
    rows = {}  # per site: float64 [H, C, n], the kept mass of every counted row
    for key, probs in oracle.items():
        mass = torch.stack([kept_mass(probs, parse(text), counted) for text in CANDIDATES])
        mass = mass.permute(2, 0, 1, 3).reshape(mass.shape[2], len(CANDIDATES), -1)
        rows[key] = mass[:, :, ~mass[0, 0].isnan()]
    # On a bin edge the histogram decides as the rows do, up to float32 rounding: take a
    # target no row lies within 1e-5 of.
    target = next(t for t in (0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
                  if all(((r - t).abs() > 1e-5).all() for r in rows.values()))
    chosen = result.at_recall(target, criterion=level)
    assert chosen.criterion == level and chosen.recall == target
    for site in chosen.sites:
        for j, text in enumerate(CANDIDATES):
            exact = oracle_quantile(oracle[site.key], parse(text), counted, level)
            assert torch.all(site.statistic[:, j] <= exact + 1e-5)
            assert torch.all(site.statistic[:, j] >= exact - 1e-3 - 1e-5)
            torch.testing.assert_close(site.quantile(level)[:, j], site.statistic[:, j])
        for h in range(site.heads):
            assert site.chosen[h] == oracle_choice(rows[site.key][h], site.density[h], target,
                                                   level)
    assert any(j is not None for site in chosen.sites for j in site.chosen)


def test_min_criterion_chooses_on_the_smallest_row(setup) -> None:
    _, _, _, result = setup
    strict = result.at_recall(0.9, criterion="min")
    for site in strict.sites:
        assert torch.equal(site.statistic, site.minimum)
        for h in range(site.heads):
            ok = [j for j in range(len(CANDIDATES)) if site.minimum[h, j] >= 0.9 - 1e-6]
            assert site.chosen[h] == (ok[0] if ok else None)  # candidates sorted by density
    assert strict.density >= result.density
    # Another target keeps the criterion unless told otherwise.
    assert strict.at_recall(0.8).criterion == "min"
    assert strict.at_recall(0.8, criterion="mean").assign == result.at_recall(0.8).assign


def test_criterion_through_calibrate_and_in_the_table(setup) -> None:
    model, x, keep, result = setup
    direct = sc.calibrate(model, x, keep, candidates=CANDIDATES, recall=0.9, criterion=0.1)
    again = result.at_recall(0.9, criterion=0.1)
    assert direct.criterion == 0.1 and direct.assign == again.assign
    for a, b in zip(direct.sites, again.sites, strict=True):
        assert torch.equal(a.histogram, b.histogram)
    header = str(direct).splitlines()[0].split()
    assert header == ["site", "head", "candidate", "density", "mean", "recall", "min",
                      "recall", "p10", "recall", "chosen"]
    assert "target recall 0.9 (all but 10% of rows)" in str(direct)
    assert "(p10)" in repr(direct) and "(mean over rows)" in str(result)
    assert [r.statistic for r in result.rows] == [r.mean_recall for r in result.rows]


def test_choice_table_and_mapping(setup) -> None:
    _, _, _, result = setup
    # Steep ALiBi slopes make head 0 local and the flat heads 2, 3 global; the SDPA site uses
    # the slopes in the opposite order, so the two sites of a module choose differently.
    first, second = result.sites[0], result.sites[1]
    assert first.chosen[0] is not None and first.chosen[2:] == (None, None)
    assert second.chosen[:2] == (None, None) and second.chosen[3] is not None
    assert set(result.assign) == {"layers.0#0", "layers.0#1", "layers.1#0", "layers.1#1"}
    assert all(v.startswith("heads(") for v in result.assign.values())
    rows = result.rows
    assert len(rows) == 4 * 4 * len(CANDIDATES) + sum(
        j is None for site in result.sites for j in site.chosen)
    assert sum(r.chosen for r in rows) == 16
    table = str(result)
    assert table.splitlines()[0].split() == ["site", "head", "candidate", "density", "mean",
                                             "recall", "min", "recall", "chosen"]
    assert "layers.0#1" in table and "4 attention site(s), 16 head(s)" in table
    assert 0 < result.density < 1


def test_mapping_round_trip_through_the_backend(setup) -> None:
    model, x, keep, result = setup
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparse",
                             options={"assign": result.assign, "compiler": "eager",
                                      "on_unsupported": "error"})
    with torch.no_grad():
        out = compiled(x, keep)
    by_hand = copy.deepcopy(model)
    for i, layer in enumerate(by_hand.layers):
        layer.by_hand = [result.sites[2 * i].pattern, result.sites[2 * i + 1].pattern]
    with torch.no_grad():
        expected = by_hand(x, keep)
        dense_out = model(x, keep)
    # Query rows before a sequence's first real token see only padded keys: the model
    # averages them, the op treats a row of finfo.min as empty. Compare the real tokens.
    real = keep
    assert rel_error(out[real], expected[real]) < 1e-4
    assert rel_error(dense_out[real], expected[real]) > 1e-3  # the patterns changed the model


def test_explain_shows_the_chosen_patterns_and_densities(setup) -> None:
    model, x, keep, result = setup
    report = sc.explain(model, x, keep, assign=result.assign, compiler="eager")
    assert [r.pattern for r in report] == list(result.assign.values())
    for row, site in zip(report, result.sites, strict=True):
        expected = sum(site.chosen_density(h) for h in range(site.heads)) / site.heads
        assert row.density == pytest.approx(expected)


def test_batches_are_averaged_and_lengths_may_differ(setup) -> None:
    model, x, keep, one = setup
    short = (x[:, :12], keep[:, :12])
    batches = [(x, keep), {"x": short[0], "keep": short[1]}]
    result = sc.calibrate(model, batches=iter(batches), candidates=CANDIDATES, recall=0.9)
    other = sc.calibrate(model, *short, candidates=CANDIDATES, recall=0.9)
    for site, a, b in zip(result.sites, one.sites, other.sites, strict=True):
        assert (site.lq, site.lk) == (L, L)
        assert torch.equal(site.rows, a.rows + b.rows)
        mixed = (a.mean * a.rows[:, None] + b.mean * b.rows[:, None]) / site.rows[:, None]
        torch.testing.assert_close(site.mean, mixed)
        torch.testing.assert_close(site.minimum, torch.minimum(a.minimum, b.minimum))


def test_calibration_leaves_the_model_as_it_was(setup) -> None:
    model, x, keep, _ = setup
    model.train()
    try:
        sc.calibrate(model, x, keep, candidates=CANDIDATES[:1])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=[]), ValueError, "candidates is empty"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=["dma(keep=4)"]), ValueError, "dynamic"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=CANDIDATES, recall=0), ValueError,
     r"recall must be in \(0, 1\]"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=CANDIDATES, recall=95), ValueError,
     r"recall must be in \(0, 1\]"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=CANDIDATES, criterion="p1"),
     ValueError, "'mean', 'min' or a quantile level"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=CANDIDATES, criterion=1.0), ValueError,
     r"must be in \(0, 1\)"),
    (lambda m, x, k: sc.calibrate(m, candidates=CANDIDATES), ValueError, "needs inputs"),
    (lambda m, x, k: sc.calibrate(m, x, k, candidates=CANDIDATES, batches=[(x, k)]),
     ValueError, "not both"),
    (lambda m, x, k: sc.calibrate(m, candidates=CANDIDATES, batches=[]), ValueError,
     "batches is empty"),
    (lambda m, x, k: sc.calibrate(m, candidates=CANDIDATES, batches=x), TypeError,
     "iterable of batches"),
])
def test_bad_arguments_are_refused_clearly(setup, call, error, words) -> None:
    model, x, keep, _ = setup
    with pytest.raises(error, match=words):
        call(model, x, keep)


def test_draw_writes_a_png_and_says_when_matplotlib_is_missing(setup, tmp_path,
                                                                monkeypatch) -> None:
    _, _, _, result = setup
    path = tmp_path / "calibration.png"
    result.draw(str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        result.draw(str(tmp_path / "again.png"))


def test_choosing_again_for_another_target_runs_nothing(setup) -> None:
    model, x, keep, result = setup
    strict = result.at_recall(0.99)
    again = sc.calibrate(model, x, keep, candidates=CANDIDATES, recall=0.99)
    assert strict.recall == 0.99 and strict.assign == again.assign
    assert strict.density >= result.density
    with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
        result.at_recall(1.5)
    with pytest.raises(ValueError, match="criterion='min'"):
        result.at_recall(0.9, criterion=0)
