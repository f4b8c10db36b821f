"""Bias tensors (additive or boolean, any broadcast) in the Hopper Gluon kernels
(codegen/gluon/bias.py): the kernels' arguments and where such calls go (tested everywhere),
and the kernels' results against the float64 oracle (sm90 GPU only)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon import support
from sparse_compile.codegen.gluon.bias import ADDITIVE, BOOLEAN, NO_BIAS, bias_args

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    check_against_oracle,
    make_qkv,
    needs_gluon_gpu,
    strict_gluon,
)

CPU = torch.device("cpu")


# --- host side: runs everywhere (CI) ---------------------------------------------------------

def test_bias_arguments_of_each_kind_and_broadcast() -> None:
    """What the kernels get of a bias, given as the dispatcher hands it (``kernel_bias``: 4-D,
    bool viewed as uint8)."""
    like = torch.zeros(1, device=CPU)
    full = torch.randn(2, 4, 9, 21, device=CPU)
    (t, *strides), flags = bias_args(kernels.kernel_bias(full), like)
    assert flags == {"BIAS": ADDITIVE} and t is not None and strides == list(full.stride())
    rows = torch.randn(9, 21, device=CPU)  # broadcast over batch and heads
    (_, *strides), _ = bias_args(kernels.kernel_bias(rows), like)
    assert strides == [0, 0, 21, 1]
    mask = torch.rand(2, 1, 9, 21, device=CPU) > 0.3
    (t, *strides), flags = bias_args(kernels.kernel_bias(mask), like)
    assert flags == {"BIAS": BOOLEAN} and t.dtype == torch.uint8 and t.data_ptr() == mask.data_ptr()
    assert strides == [mask.stride(0), 0, 21, 1]
    assert bias_args(None, like)[1] == {"BIAS": NO_BIAS}


def test_a_bias_needing_its_gradient_keeps_the_tl_backward(monkeypatch) -> None:
    """The Gluon passes do not write a bias's gradient: a backward that needs it goes to the
    ``tl`` passes before any Gluon launch (on any device: the choice comes first)."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    monkeypatch.setattr(kernels, "_gluon_backward",
                        lambda *a, **k: pytest.fail("the Gluon backward was asked"))
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 17, 17, 16, torch.float32))
    bias = torch.randn(1, 2, 17, 17, device=q.device)
    out, lse = kernels.forward(q, k, v, "causal", 0.25, bias=bias)
    grads = kernels.backward(torch.randn_like(out), q, k, v, out, lse, "causal", 0.25,
                             bias=bias, bias_requires_grad=True)
    assert grads[3] is not None and grads[3].shape == bias.shape


# --- the kernels themselves: sm90 GPU only -----------------------------------------------------


GPU_CASES = [
    # (pattern, B, Hq, Hkv, Lq, Lk, D, bias shape (None: the full [B, Hq, Lq, Lk]), boolean)
    ("causal", 2, 4, 2, 300, 300, 128, None, False),
    ("causal & sliding(100)", 1, 4, 1, 517, 517, 128, (1, 1, 517, 517), False),
    ("causal & (sink(4) | sliding(64))", 2, 2, 2, 333, 333, 64, (2, 1, 333, 333), True),
    ("dense", 1, 2, 2, 129, 257, 128, (1, 2, 129, 257), True),  # Lq < Lk
    ("causal", 1, 2, 1, 200, 200, 256, None, False),
]


@needs_gluon_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-d{c[6]}"
                         + ("-bool" if c[8] else "-add"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_kernels_with_a_bias_match_the_oracle(monkeypatch, case, dtype) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    text, b, hq, hkv, lq, lk, d, shape, boolean = case
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype)
    shape = shape or (b, hq, lq, lk)
    gen = torch.Generator(device=q.device).manual_seed(3)
    if boolean:
        bias = torch.rand(shape, generator=gen, device=q.device) > 0.2
    else:
        bias = torch.randn(shape, generator=gen, device=q.device, dtype=dtype)
    check_against_oracle(attention, q, k, v, text, bias=bias)
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
def test_a_bias_gradient_runs_the_gluon_forward_and_the_tl_backward(monkeypatch) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, 2, 300, 300, 128, torch.bfloat16)
    bias = torch.randn(1, 4, 300, 300, device=q.device).requires_grad_(True)
    check_against_oracle(attention, q, k, v, "causal & sliding(64)", bias=bias)
    assert fwd and not bwd


@needs_gluon_gpu
@pytest.mark.parametrize("form", ["expanded", "per-row", "with-cap-and-alibi"])
def test_broadcast_biases_and_biases_beside_logit_modifications(monkeypatch, form) -> None:
    """Stride-0 dimensions of an expanded bias, a bias constant along the keys, and a bias
    after soft-capping and before ALiBi's position term (the ``tl`` kernels' order)."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(2, 4, 2, 300, 300, 128, torch.bfloat16)
    gen = torch.Generator(device=q.device).manual_seed(4)
    softcap, alibi = 0.0, None
    if form == "expanded":
        bias = torch.randn(1, 1, 300, 300, generator=gen, device=q.device).expand(2, 4, -1, -1)
    elif form == "per-row":
        bias = torch.randn(2, 1, 300, 1, generator=gen, device=q.device)
    else:
        bias = torch.randn(2, 4, 300, 300, generator=gen, device=q.device)
        q = (q.detach() * 4).requires_grad_(True)
        softcap, alibi = 2.0, torch.tensor([0.5, 0.25, 0.125, 0.0625], device=q.device)

    def run(*args, **kw):
        return attention(*args, softcap=softcap or None, **kw)

    check_against_oracle(run, q, k, v, "causal & sliding(100)", bias=bias, softcap=softcap,
                         alibi=alibi)
    assert fwd and bwd, "the Gluon kernels did not run"
