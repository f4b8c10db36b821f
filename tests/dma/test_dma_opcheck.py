"""The fused DMA custom ops keep their registration honest: the fake implementations promise
the real outputs' shapes, dtypes and strides (the forward's ten, the saved selection included),
under static and dynamic shapes."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dma_op import dma_attention_bwd, dma_attention_fwd

UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _problem(lq: int, lk: int, causal: bool):
    gen = torch.Generator().manual_seed(lq * 31 + lk)
    q = torch.randn(1, 4, lq, 16, generator=gen)
    k, v = (torch.randn(1, 2, lk, 16, generator=gen) for _ in range(2))
    delta = torch.rand(1, 2, lk, generator=gen) * 3
    allowed = torch.rand(1, lk, generator=gen) > 0.2
    return q, k, v, delta, allowed, causal


@pytest.mark.parametrize("lq, lk, causal", [(40, 40, True), (23, 37, False)])
def test_forward_op_passes_opcheck(lq, lk, causal):
    q, k, v, delta, allowed, causal = _problem(lq, lk, causal)
    torch.library.opcheck(dma_attention_fwd, (q, k, v, delta, allowed, None, 8, causal, 0.25),
                          test_utils=UTILS)


def test_backward_op_passes_opcheck_with_the_saved_selection():
    q, k, v, delta, allowed, causal = _problem(40, 40, True)
    out, lse, *selection = dma_attention_fwd(q, k, v, delta, allowed, None, 8, causal, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        dma_attention_bwd,
        (dout, q, k, v, delta, allowed, None, out, lse, selection, 8, causal, 0.25),
        test_utils=UTILS)
