"""The blockwise measurement against the float64 oracle: the softmax materialised whole, the
kept mass summed per row, its quantiles read from the sorted rows; and the output against
``reference_attention``."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_compile.patterns import Pattern, causal, dense, parse

from sparse_compile.calibration.choice import choose, densities, recall_statistic
from sparse_compile.calibration.recall import (
    RECALL_BINS,
    KeptMass,
    attend_and_measure,
    histogram_quantile,
    recall_bins,
)
from sparse_compile.reference import reference_attention
from tests.calibration.models import exact_quantile, oracle_choice

CANDIDATES = [parse(t) for t in ("causal & sliding(3)", "sink(2) | local(4)", "block(4)",
                                 "heads(causal & sliding(2), dense)", "strided(3)")]


def _oracle(q, k, allowed: Pattern, bias, softcap: float,
            candidates) -> tuple[KeptMass, list[list[torch.Tensor]]]:
    """Materialise P in float64 (GQA by repeating k), sum the kept mass per row. Returns the
    tally (its histogram left empty) and, per head and candidate, the counted rows' kept mass
    (float64 ``[n]``)."""
    b, hq, lq, d = q.shape
    k64 = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    s = q.double() @ k64.transpose(-1, -2) / math.sqrt(d)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lk = k.shape[2]
    keep = allowed.mask(lq, lk).expand(b, hq, lq, lk)
    counted = keep
    if bias is not None and bias.dtype == torch.bool:
        keep = keep & bias
        counted = keep
    elif bias is not None:
        s = s + bias.double()
        counted = keep & (bias > torch.finfo(bias.dtype).min / 2)
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
    rows = counted.any(-1)  # [B, H, Lq]
    mass = KeptMass.empty(hq, len(candidates))
    mass.rows += rows.sum((0, 2))
    per_row: list[list[torch.Tensor]] = [[] for _ in range(hq)]
    for j, c in enumerate(candidates):
        kept = (p * c.mask(lq, lk, heads=hq if c.per_head else None)).sum(-1)
        mass.total[:, j] = torch.where(rows, kept, 0.0).sum((0, 2))
        mass.lowest[:, j] = torch.where(rows, kept, math.inf).amin((0, 2))
        for h in range(hq):
            per_row[h].append(kept[:, h][rows[:, h]])
    return mass, per_row


def _padding_bias(b: int, hq: int, lq: int, lk: int, dtype) -> torch.Tensor:
    """Additive [B, 1, Lq, Lk]: batch 1 left-padded by 3 keys (finfo.min) and its first 3 query
    rows masked whole, as transformers masks padding."""
    bias = torch.zeros(b, 1, lq, lk, dtype=dtype)
    bias[1, :, :, :3] = torch.finfo(dtype).min
    bias[1, :, :3, :] = torch.finfo(dtype).min
    return bias


CASES = {
    # name: (B, Hq, Hkv, Lq, Lk, allowed, bias kind, softcap)
    "plain": (2, 4, 4, 12, 12, dense, None, 0.0),
    "gqa causal": (2, 4, 2, 12, 12, causal, None, 0.0),
    "decode rows (Lq < Lk)": (1, 4, 1, 5, 13, causal, None, 0.0),
    "alibi bias per head": (2, 4, 2, 10, 10, dense, "alibi", 0.0),
    "bool keep-mask": (2, 2, 2, 9, 9, dense, "bool", 0.0),
    "padding (finfo.min)": (2, 4, 2, 11, 11, causal, "padding", 0.0),
    "softcap": (1, 2, 1, 8, 8, causal, None, 5.0),
}


def _bias(kind, b, hq, lq, lk):
    if kind is None:
        return None
    if kind == "alibi":
        slopes = torch.tensor([2.0, 1.0, 0.5, 0.0])[:hq]
        distance = (torch.arange(lq)[:, None] + lk - lq - torch.arange(lk)[None, :]).abs()
        return (-slopes[:, None, None] * distance).unsqueeze(0)
    if kind == "bool":
        return torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(1)) > 0.3
    return _padding_bias(b, hq, lq, lk, torch.float32)


@pytest.mark.parametrize("max_scores", [1 << 20, 7], ids=["one chunk", "row chunks"])
@pytest.mark.parametrize("case", list(CASES))
def test_kept_mass_matches_the_float64_softmax(case: str, max_scores: int) -> None:
    b, hq, hkv, lq, lk, allowed, kind, softcap = CASES[case]
    torch.manual_seed(0)
    q, k, v = torch.randn(b, hq, lq, 8), torch.randn(b, hkv, lk, 8), torch.randn(b, hkv, lk, 8)
    q = 2 * q  # peakier rows, so that candidates differ
    bias = _bias(kind, b, hq, lq, lk)
    out, mass = attend_and_measure(q, k, v, CANDIDATES, allowed, bias=bias, softcap=softcap,
                                   max_scores=max_scores)
    expected, per_row = _oracle(q, k, allowed, bias, softcap, CANDIDATES)
    assert torch.equal(mass.rows, expected.rows)
    torch.testing.assert_close(mass.mean, expected.mean, rtol=0, atol=2e-6)
    torch.testing.assert_close(mass.minimum, expected.minimum, rtol=0, atol=2e-6)
    assert torch.equal(mass.histogram.sum(-1), expected.rows[:, None].expand(-1, 5))
    for level in (0.05, 0.3, 0.5):
        quantile = mass.quantile(level)
        for h in range(hq):
            for j, rows in enumerate(per_row[h]):
                exact = float(exact_quantile(rows, level))
                # Rounded down to its bin's edge: at most one bin below, never above.
                assert exact - 1 / RECALL_BINS - 2e-6 <= quantile[h, j] <= exact + 2e-6
    assert not torch.allclose(mass.mean[:, 0], mass.mean[:, 2])  # the candidates differ
    if not softcap:
        ref = reference_attention(q, k, v, allowed, bias=bias)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_rows_masked_whole_are_not_counted_and_dense_keeps_everything() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    bias = _padding_bias(2, 2, 6, 6, torch.float32)
    _, mass = attend_and_measure(q, k, v, [dense, causal], causal, bias=bias)
    # Batch 0 counts its 6 causal rows, batch 1 only the 3 rows after its padding.
    assert mass.rows.tolist() == [9, 9]
    assert torch.allclose(mass.mean, torch.ones(2, 2, dtype=torch.float64), atol=1e-6)


def test_pooled_heads_and_accumulation() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4)
    _, first = attend_and_measure(q, k, v, CANDIDATES[:2], causal)
    _, second = attend_and_measure(q[..., :5, :], k, v, CANDIDATES[:2], causal)
    pooled = first.pooled()
    assert pooled.heads == 1 and int(pooled.rows) == 24
    torch.testing.assert_close(pooled.mean[0], first.mean.mean(0))
    first.add(second)
    assert first.rows.tolist() == [13, 13, 13]
    assert torch.all(first.minimum <= second.minimum)


def test_rows_are_binned_by_the_edge_below_and_full_rows_count_as_one() -> None:
    kept = torch.tensor([0.0, 0.0004, 0.0015, 0.5, 0.95, 0.9499995, 0.9495, 0.999, 0.9999,
                         1 - 1e-7, 1.0, 1.0000001], dtype=torch.float64)
    assert recall_bins(kept).tolist() == [0, 0, 1, 500, 950, 950, 949, 999, 999, RECALL_BINS,
                                          RECALL_BINS, RECALL_BINS]
    # float32 rounding of 0.95 stays in the 0.95 bin.
    assert int(recall_bins(torch.tensor([0.95], dtype=torch.float32))) == 950


@pytest.mark.parametrize("level, expected", [
    (0.005, 0.2),  # rank 1 of 100: the lowest row
    (0.01, 0.5),   # at most 1 row may be below: rank 2
    (0.02, 0.9),   # rank 3
    (0.5, 0.9),
    (0.98, 0.9),
    (0.99, 1.0),  # rank 100
])
def test_quantile_of_the_histogram_by_rank(level: float, expected: float) -> None:
    histogram = torch.zeros(RECALL_BINS + 1, dtype=torch.int64)
    for value, count in ((0.2, 1), (0.5, 1), (0.9, 97), (1.0, 1)):
        histogram[recall_bins(torch.tensor(value, dtype=torch.float64))] += count
    assert float(histogram_quantile(histogram, level)) == pytest.approx(expected)
    empty = histogram_quantile(torch.zeros(2, RECALL_BINS + 1, dtype=torch.int64), level)
    assert empty.isnan().all()


def test_rare_far_rows_pass_the_mean_but_not_a_low_quantile() -> None:
    """Head 0 attends to the previous key on every row but 3 of 64, which look 40 keys back
    (a retrieval); head 1 attends to the previous key everywhere. The mean lets a window of
    8 through for both heads; the 1% quantile (at most 0.64 rows below) and the minimum keep
    head 0 whole, the 5% quantile (3.2 rows) tolerates the 3 rows, as the rows themselves
    say."""
    n, far_rows = 64, (45, 52, 60)
    bias = torch.full((1, 2, n, n), -30.0)
    rows = torch.arange(n)
    bias[0, :, rows[1:], rows[1:] - 1] = 0.0
    bias[0, :, 0, 0] = 0.0
    for i in far_rows:
        bias[0, 0, i, i - 1] = -30.0
        bias[0, 0, i, i - 40] = 0.0
    zeros = torch.zeros(1, 2, n, 4)
    candidates = [parse("causal & sliding(8)"), causal]
    _, mass = attend_and_measure(zeros, zeros, zeros, candidates, causal, bias=bias)
    density = densities(candidates, 2, False, n, n)
    mean = recall_statistic("mean", mass.mean, mass.minimum, mass.histogram)
    assert mean[0, 0] > 0.95 and choose(mean, density, 0.95) == [0, 0]
    p1 = recall_statistic(0.01, mass.mean, mass.minimum, mass.histogram)
    assert choose(p1, density, 0.95) == [1, 0]
    assert choose(recall_statistic("min", mass.mean, mass.minimum, mass.histogram), density,
                  0.95) == [1, 0]
    # At most 5% of rows (3.2) below: the 3 retrieval rows are tolerated.
    p5 = recall_statistic(0.05, mass.mean, mass.minimum, mass.histogram)
    assert choose(p5, density, 0.95) == [0, 0]
    # The same choices from the rows themselves.
    probs = torch.softmax(bias.masked_fill(~causal.mask(n, n), -math.inf), -1)[0]
    for h in range(2):
        per_candidate = torch.stack([(probs[h] * c.mask(n, n)).sum(-1).double()
                                     for c in candidates])
        for level, statistic in ((0.01, p1), (0.05, p5)):
            assert oracle_choice(per_candidate, density[h], 0.95, level) == choose(
                statistic, density, 0.95)[h]
