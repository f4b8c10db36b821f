"""The dense oracle against plain PyTorch attention built independently."""

from __future__ import annotations

import math

import pytest
import sparse_compile.patterns as P
import torch

from sparse_compile.reference import reference_attention


def naive(q, k, v, keep, scale, bias=None):
    """Loop-per-row softmax attention in float64 over an explicit keep mask [B?, H, Lq, Lk]."""
    b, hq, lq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                kv = h // group
                s = scale * (k[bi, kv].double() @ q[bi, h, i].double())
                if bias is not None:
                    s = s + bias[bi, h, i].double()
                m = keep[bi, h, i]
                if not m.any():
                    continue
                w = torch.softmax(s[m], 0)
                out[bi, h, i] = w @ v[bi, kv][m].double()
    return out


@pytest.mark.parametrize("pattern", ["causal", "sliding(3) & causal", "strided(2) | sink(1)",
                                     "heads(causal, local(3))", "dense"])
@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 7), (7, 4)])
def test_matches_naive(pattern, lq, lk):
    torch.manual_seed(0)
    q = torch.randn(2, 4, lq, 8)
    k, v = torch.randn(2, 2, lk, 8), torch.randn(2, 2, lk, 6)
    p = P.parse(pattern)
    keep = p.mask(lq, lk, heads=4 if p.per_head else None).expand(2, 4, lq, lk)
    out = reference_attention(q, k, v, pattern)
    assert out.dtype == torch.float64 and out.shape == (2, 4, lq, 6)
    torch.testing.assert_close(out, naive(q, k, v, keep, 1 / math.sqrt(8)))


def test_bias_additive_and_boolean():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    add = torch.randn(1, 2, 6, 6)
    keep = P.causal.mask(6, 6).expand(1, 2, 6, 6)
    torch.testing.assert_close(reference_attention(q, k, v, P.causal, scale=0.3, bias=add),
                               naive(q, k, v, keep, 0.3, add))
    padding = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    padding[..., 4:] = False
    torch.testing.assert_close(reference_attention(q, k, v, "dense", bias=padding),
                               naive(q, k, v, padding.expand(1, 2, 6, 6), 0.5))


def test_fully_masked_rows_are_zero():
    q, k, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    out = reference_attention(q, k, v, "prefix(2) & ~causal")
    assert torch.isfinite(out).all()
    assert not out[0, 0, 1:].any()


def test_bottom_right_alignment():
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    # One decoding query sits at absolute position 4: causal keeps every key.
    torch.testing.assert_close(reference_attention(q, k, v, "causal"),
                               reference_attention(q, k, v, None))


def test_rejects_dynamic_and_bad_heads():
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, k, k, "causal")
    with pytest.raises(P.PatternError, match="dynamic"):
        reference_attention(k, k, k, "dma(keep=1)")
