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
from tests.calibration.models import B, C, L, Stack, counted_rows, oracle_recall, padding_mask
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
