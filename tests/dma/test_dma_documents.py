"""Dynamic patterns inside packed documents: the packed call equals each document run as its
own sequence through the float64 oracles, forward and gradients; padding rows are zeros."""

from __future__ import annotations

import pytest
import torch

import sparse_compile as sc
from sparse_compile.dynamic_mask.reference import dma_reference
from sparse_compile.positions import PositionError
from tests.conftest import rel_error
from tests.dma.test_dma_topk import dense_kept

# Two batch rows: odd document lengths, padding between and after documents.
IDS = [[0] * 13 + [1] * 21 + [-1] * 3 + [2] * 9, [5] * 30 + [6] * 11 + [-1] * 5]


def _inputs(hq: int, hkv: int, device: str):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    length = len(IDS[0])
    q = torch.randn(2, hq, length, 16, generator=gen)
    k = torch.randn(2, hkv, length, 16, generator=gen)
    v = torch.randn(2, hkv, length, 16, generator=gen)
    delta = torch.randn(2, hkv, length, generator=gen).exp()
    return [t.to(device).requires_grad_() for t in (q, k, v, delta)]


def _topk_reference(q, k, v, k_blocks, block, causal):
    """topk attention in float64 through the dense block choice of test_dma_topk."""
    group = q.shape[1] // k.shape[1]
    kept = dense_kept(q.detach().cpu(), k.detach().cpu(), k_blocks, block, causal)
    kept = kept.repeat_interleave(group, dim=1).to(q.device)
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) / 4.0
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1).nan_to_num(0.0)
    return probs @ v.double().repeat_interleave(group, 1)


def _each_document(reference, tensors):
    """The oracle run on every document alone, placed back into the packed rows."""
    q = tensors[0]
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], 16, dtype=torch.float64,
                      device=q.device)
    for b, row in enumerate(IDS):
        for doc in sorted({i for i in row if i >= 0}):
            span = [i for i, x in enumerate(row) if x == doc]
            part = slice(span[0], span[-1] + 1)
            out[b:b + 1, :, part] = reference(*(t[b:b + 1, :, part] for t in tensors))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_dma_selects_within_each_document(hq, hkv, causal, kernel_device):
    q, k, v, delta = _inputs(hq, hkv, kernel_device)
    ids = torch.tensor(IDS)
    pattern = "causal & dma(6)" if causal else "dma(6)"
    out = sc.attention(q, k, v, pattern, delta=delta, documents=ids)
    ref = _each_document(lambda q, k, v, d: dma_reference(q, k, v, d, 6, causal),
                         (q, k, v, delta))
    assert rel_error(out, ref) < 1e-4
    padding = torch.tensor(IDS, device=out.device)[:, None, :, None] < 0
    assert (out.masked_select(padding) == 0).all()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, delta), grad)
    want = torch.autograd.grad(ref, (q, k, v, delta), grad.double())
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_topk_blocks_start_at_each_document(causal, kernel_device):
    q, k, v, _ = _inputs(4, 2, kernel_device)
    pattern = "causal & topk(1, 16)" if causal else "topk(1, 16)"
    out = sc.attention(q, k, v, pattern, documents=torch.tensor(IDS))
    ref = _each_document(lambda q, k, v: _topk_reference(q, k, v, 1, 16, causal), (q, k, v))
    assert rel_error(out, ref) < 1e-4
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-4


def test_documents_with_a_dynamic_pattern_are_checked():
    q, k, v, delta = _inputs(2, 2, "cpu")
    with pytest.raises(PositionError, match="non-decreasing"):
        sc.attention(q, k, v, "causal & dma(6)", delta=delta,
                     documents=torch.tensor(IDS[0][::-1]))
    with pytest.raises(PositionError, match="Lq = 10"):
        sc.attention(q[:, :, :10], k, v, "causal & dma(6)", delta=delta,
                     documents=torch.tensor(IDS))
