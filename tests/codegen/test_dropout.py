"""In-kernel attention dropout: keep rate, unbiasedness, exact reproducibility, and gradients
that use the same mask as the forward (checked against the float64 oracle with that mask)."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_compile.functional import attention
from tests.codegen.attention_cases import oracle
from tests.conftest import rel_error


def dropped_probabilities(q, k, pattern, p, seed):
    """With V = I (Lk == D) the output is the dropped, rescaled probability matrix itself."""
    b, hkv, lk, d = k.shape
    eye = torch.eye(lk, dtype=q.dtype).expand(b, hkv, lk, lk)
    torch.manual_seed(seed)
    return attention(q, k, eye, pattern, dropout_p=p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_rescaling(p):
    q = torch.randn(2, 4, 48, 48)
    k = torch.randn(2, 2, 48, 48)
    probs = dropped_probabilities(q, k, "dense", 0.0, 0)
    dropped = dropped_probabilities(q, k, "dense", p, 1234)
    kept = dropped != 0
    n = kept.numel()
    rate = kept.float().mean().item()
    # Binomial: 6 standard deviations.
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), rate
    # Kept entries are rescaled by exactly 1/(1-p).
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    # Unbiased: the rescaled mass matches the undropped mass, within 6 standard deviations
    # (Var of the dropped sum = p / (1 - p) · Σ P²).
    std = math.sqrt(p / (1 - p) * (probs**2).sum().item())
    assert abs(dropped.sum().item() - probs.sum().item()) < 6 * std


def test_mask_varies_with_position_head_and_batch():
    q = torch.randn(2, 2, 32, 32)
    k = torch.randn(2, 2, 32, 32)
    kept = dropped_probabilities(q, k, "dense", 0.5, 7) != 0
    assert not torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[:, 0], kept[:, 1])
    assert not torch.equal(kept[..., :16, :], kept[..., 16:, :])


def test_same_seed_reproduces_exactly_and_other_seed_differs():
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, requires_grad=True)
    v = torch.randn(1, 1, 40, 16, requires_grad=True)
    dout = torch.randn(1, 2, 40, 16)
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = attention(q, k, v, "causal & sliding(12)", dropout_p=0.3)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], results[2][0])


@pytest.mark.parametrize("pattern", ["causal & sliding(9)", "strided(3) | sink(2)"])
def test_gradients_use_the_forward_mask(pattern):
    b, hq, hkv, length, d, p = 1, 4, 2, 32, 32, 0.25
    q = torch.randn(b, hq, length, d, requires_grad=True)
    k = torch.randn(b, hkv, length, d, requires_grad=True)
    v = torch.randn(b, hkv, length, d, requires_grad=True)
    # The mask depends only on (seed, batch, head, position): read it off with V = I.
    mask = dropped_probabilities(q.detach(), k.detach(), pattern, p, 99) != 0
    probs = dropped_probabilities(q.detach(), k.detach(), pattern, 0.0, 0)
    mask = mask | (probs == 0)  # entries the pattern removes carry no information
    torch.manual_seed(99)
    out = attention(q, k, v, pattern, dropout_p=p)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)

    # Float64 reference with that mask: out = (P ∘ M / (1 - p)) V.
    eye = torch.eye(length, dtype=torch.float64).expand(b, hkv, length, length)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    probs64 = oracle(q64, k64, eye, pattern)
    g = hq // hkv
    ref = (probs64 * mask / (1 - p)) @ v64.repeat_interleave(g, 1)
    assert rel_error(out, ref) < 1e-4
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for a, w in zip(got, want, strict=True):
        assert rel_error(a, w) < 1e-4
