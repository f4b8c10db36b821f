"""Logit soft-capping (``softcap · tanh(s / softcap)`` before bias and pattern, Gemma-2 style)
in the kernels and in the chunked PyTorch path, forward and gradients, against the float64
oracle."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_compile.patterns import parse

from sparse_compile.op import attention_op
from tests.codegen.attention_cases import check_against_oracle, make_qkv

CAP = 2.0


def capped(softcap: float):
    def run(q, k, v, pattern, scale, bias):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, _ = attention_op(q, k, v, bias, str(parse(pattern)), scale, 0.0, None, softcap)
        return out

    return run


def large_logits(*shape, dtype=torch.float32):
    """q, k, v whose scaled logits have std ~4: most of them saturate a cap of 2."""
    q, k, v = make_qkv(*shape, dtype)
    return (q.detach() * 4).requires_grad_(True), k, v


@pytest.mark.parametrize("text", ["causal & sliding(9)", "strided(3) | sink(2)"])
def test_kernels_cap_the_logits_before_the_bias(text):
    q, k, v = large_logits(2, 4, 2, 37, 41, 16)
    bias = torch.randn(1, 4, 37, 41, requires_grad=True)
    check_against_oracle(capped(CAP), q, k, v, text, bias=bias, softcap=CAP)


def test_kernels_cap_half_precision():
    q, k, v = large_logits(1, 2, 1, 33, 33, 32, dtype=torch.bfloat16)
    check_against_oracle(capped(CAP), q, k, v, "causal | prefix(8)", softcap=CAP)


def test_cap_changes_the_result():
    q, k, v = large_logits(1, 2, 1, 24, 24, 16)
    with torch.no_grad():
        a = capped(CAP)(q, k, v, "causal", None, None)
        b = capped(0.0)(q, k, v, "causal", None, None)
    assert (a - b).abs().max() > 1e-2


def test_chunked_path_caps_too(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: PyTorch path
    q, k, v = large_logits(1, 4, 2, 30, 30, 16)
    bias = torch.randn(1, 1, 30, 30, requires_grad=True)
    check_against_oracle(capped(CAP), q, k, v, "local(7) | sink(2)", bias=bias, softcap=CAP)
