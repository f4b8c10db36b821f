"""The dynamic-pattern custom ops keep their registration honest: the fake implementations
promise the real outputs' shapes, dtypes and strides (the DMA forward's ten, the saved selection
included), under static and dynamic shapes."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.masked import dma_attention_masked, dma_attention_masked_bwd
from sparse_compile.dynamic_mask.op import dma_attention_bwd, dma_attention_fwd
from sparse_compile.dynamic_mask.topk import topk_attention_bwd, topk_attention_fwd, topk_mask_keys
from sparse_compile.dynamic_mask.values import dma_delta_heads_first, dma_value_tag

UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _problem(lq: int, lk: int, causal: bool, device: str):
    """q, k, v, delta, key_allowed on ``device`` (drawn on the CPU), and ``causal``."""
    gen = torch.Generator().manual_seed(lq * 31 + lk)
    q = torch.randn(1, 4, lq, 16, generator=gen, device="cpu")
    k, v = (torch.randn(1, 2, lk, 16, generator=gen, device="cpu") for _ in range(2))
    delta = torch.rand(1, 2, lk, generator=gen, device="cpu") * 3
    allowed = torch.rand(1, lk, generator=gen, device="cpu") > 0.2
    return *(t.to(device) for t in (q, k, v, delta, allowed)), causal


@pytest.mark.parametrize("lq, lk, causal", [(40, 40, True), (23, 37, False)])
def test_forward_op_passes_opcheck(lq, lk, causal, kernel_device):
    q, k, v, delta, allowed, causal = _problem(lq, lk, causal, kernel_device)
    torch.library.opcheck(dma_attention_fwd, (q, k, v, delta, allowed, None, 8, causal, 0.25),
                          test_utils=UTILS)


def test_backward_op_passes_opcheck_with_the_saved_selection(kernel_device):
    q, k, v, delta, allowed, causal = _problem(40, 40, True, kernel_device)
    out, lse, *selection = dma_attention_fwd(q, k, v, delta, allowed, None, 8, causal, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        dma_attention_bwd,
        (dout, q, k, v, delta, allowed, None, out, lse, selection, 8, causal, 0.25),
        test_utils=UTILS)


def _model_mask(lq: int, lk: int, allowed: torch.Tensor) -> torch.Tensor:
    """A model's additive ``[B, 1, Lq, Lk]`` mask: bottom-right causal & key padding."""
    causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    keep = causal[None, None] & allowed[:, None, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


def test_masked_ops_pass_opcheck(kernel_device):
    q, k, v, delta, allowed, _ = _problem(40, 40, True, kernel_device)
    mask = _model_mask(40, 40, allowed)
    torch.library.opcheck(dma_attention_masked, (q, k, v, delta, mask, 8, 0.25),
                          test_utils=UTILS)
    dout = torch.randn_like(q)
    torch.library.opcheck(dma_attention_masked_bwd, (dout, q, k, v, delta, mask, 8, 0.25),
                          test_utils=UTILS)
    torch.library.opcheck(topk_mask_keys, (mask,), test_utils=UTILS)


def test_topk_ops_pass_opcheck(kernel_device):
    q, k, v, _, _, _ = _problem(48, 48, True, kernel_device)
    args = (q, k, v, None, 2, 16, True, 0.25)
    torch.library.opcheck(topk_attention_fwd, args, test_utils=UTILS)
    out, lse, kept = topk_attention_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(topk_attention_bwd,
                          (dout, q, k, v, None, out, lse, kept, 16, True, 0.25),
                          test_utils=UTILS)


def test_value_tag_ops_pass_opcheck():
    values = torch.randn(2, 30, 32)
    delta = torch.randn(2, 30, 4)
    torch.library.opcheck(dma_value_tag, (values, delta), test_utils=UTILS)
    torch.library.opcheck(dma_delta_heads_first, (delta,), test_utils=UTILS)
