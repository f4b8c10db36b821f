"""The backward reuses the forward's selection: gradients identical to selecting again, and
inputs with a unit last stride run without copies and give the same result."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.functional import dma_attention
from sparse_compile.dynamic_mask.op import dma_attention_bwd, dma_attention_fwd
from sparse_compile.dynamic_mask.reference import dma_reference
from tests.conftest import rel_error
from tests.dma.test_dma_attention import make_inputs, padding


@pytest.mark.parametrize(("causal", "tied"), [(True, False), (False, True)])
def test_saved_selection_equals_reselection(causal, tied, kernel_device):
    q, k, v, delta = (t.detach() for t in make_inputs(2, 4, 2, 37, 37, 16, tied, seed=21,
                                                      device=kernel_device))
    keys = padding(2, 37, [0, 5])
    scale = 0.25
    out, lse, *selection = dma_attention_fwd(q, k, v, delta, keys, None, 6, causal, scale)
    assert len(selection) == 8 and all(isinstance(t, torch.Tensor) for t in selection)
    grad = torch.randn_like(out)
    saved = dma_attention_bwd(grad, q, k, v, delta, keys, None, out, lse, selection, 6, causal,
                              scale)
    again = dma_attention_bwd(grad, q, k, v, delta, keys, None, out, lse, [], 6, causal, scale)
    for g_saved, g_again in zip(saved, again, strict=True):
        assert torch.equal(g_saved, g_again)
    # and the public op's autograd (which passes the saved selection) gives the same gradients
    inputs = [t.clone().requires_grad_() for t in (q, k, v, delta)]
    out_op = dma_attention(*inputs, 6, causal, keys, scale)
    assert torch.equal(out_op, out)
    for g_op, g_again in zip(torch.autograd.grad(out_op, inputs, grad), again, strict=True):
        assert torch.equal(g_op, g_again)


def test_strided_inputs_match_reference(kernel_device):
    """q/k/v as a model produces them (``[B, L, H, D].transpose(1, 2)``): same as reference."""
    q, k, v, delta = (t.detach() for t in make_inputs(1, 4, 2, 33, 33, 16, seed=5,
                                                      device=kernel_device))
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous() and qs.stride(-1) == 1
    inputs = [t.requires_grad_() for t in (qs, ks, vs, delta.clone())]
    out = dma_attention(*inputs, 5)
    assert out.is_contiguous()
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, delta)]
    ref = dma_reference(*ref_inputs, 5)
    assert rel_error(out, ref) < 1e-4
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, ref_inputs, grad.double())
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-4
