"""dma_attention_masked: a model's dense mask, fused when it is causal & padding, else chunked."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.masked import causal_padding_keys, dma_attention_masked
from sparse_compile.dynamic_mask.reference import dma_reference
from tests.conftest import rel_error

LOW = torch.finfo(torch.float32).min


def model_mask(b, lq, lk, pads, scramble=False):
    pos = torch.arange(lq)[:, None] + lk - lq
    allowed = (torch.arange(lk)[None, :] <= pos).expand(b, lq, lk).clone()
    for row, n in enumerate(pads):
        allowed[row, :, :n] = False
    if scramble:
        allowed[0, -1, 0] = ~allowed[0, -1, 0]
        allowed[0, 3, 5] = ~allowed[0, 3, 5]
    return torch.where(allowed, 0.0, LOW)[:, None]


@pytest.mark.parametrize("scramble", [False, True])
def test_masked_op_matches_reference(scramble, request):
    """Causal & padding runs the kernels (on the kernel device), the scrambled mask the chunked
    path (on the CPU)."""
    device = "cpu" if scramble else request.getfixturevalue("kernel_device")
    gen = torch.Generator().manual_seed(int(scramble))
    q = torch.randn(2, 4, 24, 16, generator=gen, device="cpu")
    k, v = (torch.randn(2, 2, 24, 16, generator=gen, device="cpu") for _ in range(2))
    delta = torch.rand(2, 2, 24, generator=gen, device="cpu")
    q, k, v, delta = (t.to(device).requires_grad_() for t in (q, k, v, delta))
    mask = model_mask(2, 24, 24, [0, 5], scramble)
    assert (causal_padding_keys(mask) is None) == scramble
    inputs = (q, k, v, delta)
    out = dma_attention_masked(*inputs, mask, 6, 0.25)
    ref = dma_reference(*inputs, 6, causal=False, bias=mask, scale=0.25)
    assert rel_error(out, ref) < 1e-4
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, grad),
                    torch.autograd.grad(ref, inputs, grad.double()), strict=True):
        assert rel_error(g, w) < 1e-4


def test_causal_padding_keys_reads_the_padding():
    mask = model_mask(2, 10, 12, [0, 3])
    keys = causal_padding_keys(mask)
    assert keys.shape == (2, 12)
    assert keys[0].all() and not keys[1, :3].any() and keys[1, 3:].all()
    assert causal_padding_keys(mask[:, :, :, :-1]) is None  # no longer bottom-right causal
