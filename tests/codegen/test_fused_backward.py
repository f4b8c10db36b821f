"""One-pass backward (dK/dV pass adding dQ by atomics) against the float64 oracle, and the cases
that keep the two-pass backward (deterministic mode, bias gradient) even when the tiles ask for
the one-pass form (the default tiles do not: it lost on the H100, codegen/launch/config.py).

The fused path is checked to run by making the dQ launch fail while it is expected not to run.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.launch.config import INTERPRETER

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    TOL,
    check_against_oracle,
    make_qkv,
    oracle,
    random_pattern,
)
from tests.conftest import rel_error

FUSED = replace(INTERPRETER, bwd_fused=1)
FUSED_TMA = replace(INTERPRETER, bwd_fused=2)
TWO_PASS = replace(INTERPRETER, bwd_fused=0)


@pytest.fixture
def no_dq_pass(monkeypatch):
    """The dQ pass must not run (the fused dK/dV pass produces dQ)."""
    def fail(*args, **kwargs):
        raise AssertionError("the two-pass dQ launch ran")

    monkeypatch.setattr(kernels, "launch_dq", fail)


@pytest.fixture
def fused_selected(monkeypatch):
    """The public op's tile selection asks for the one-pass backward."""
    monkeypatch.setattr(kernels, "select_config", lambda *args, **kwargs: FUSED)


@pytest.fixture
def dq_pass_calls(monkeypatch):
    """Counts dQ-pass launches."""
    calls = []
    real = kernels.launch_dq

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "launch_dq", counted)
    return calls


def op_with(cfg, softcap=0.0, dropout_p=0.0, seed=0):
    """A differentiable attention through codegen.forward / codegen.backward with ``cfg``."""
    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, text, scale):
            out, lse = kernels.forward(q, k, v, text, scale, None, dropout_p, seed, cfg, softcap)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.text, ctx.scale = text, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv, _ = kernels.backward(dout.contiguous(), q, k, v, out, lse, ctx.text,
                                             ctx.scale, None, False, dropout_p, seed, cfg,
                                             softcap)
            return dq, dk, dv, None, None

    def run(q, k, v, text, scale, bias):
        assert bias is None
        d = q.shape[-1]
        return Op.apply(q, k, v, text, d ** -0.5 if scale is None else scale)

    return run


# One pattern per visit kind: closed form, row bounds (interval union), compact tables.
VISITS = ["causal & sliding(9)", "causal | prefix(20)", "strided(3) | sink(2)"]


@pytest.mark.parametrize("text", VISITS)
def test_visit_kinds_gqa(no_dq_pass, text):
    q, k, v = make_qkv(2, 4, 2, 48, 48, 32, torch.float32)
    check_against_oracle(op_with(FUSED), q, k, v, text)


@pytest.mark.parametrize("case", range(4))
def test_random_patterns_ragged(no_dq_pass, case):
    rng = random.Random()
    text = random_pattern(rng, depth=rng.choice([1, 2]))
    hkv = rng.choice([1, 2])
    q, k, v = make_qkv(1, hkv * rng.choice([1, 3]), hkv, rng.randint(9, 60), rng.randint(9, 60),
                       rng.choice([16, 24]), torch.float32)
    check_against_oracle(op_with(FUSED), q, k, v, text)


@pytest.mark.parametrize("text, lq, lk", [("causal", 21, 50), ("local(11)", 45, 18),
                                          ("axial(6)", 33, 33)])
def test_lq_differs_odd_head_dim(no_dq_pass, text, lq, lk):
    q, k, v = make_qkv(1, 2, 1, lq, lk, 40, torch.float32)
    check_against_oracle(op_with(FUSED), q, k, v, text)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(no_dq_pass, dtype):
    q, k, v = make_qkv(1, 2, 2, 48, 48, 32, dtype)
    # bwd_fused=2 asks for the TMA reduce-add; on the CPU it runs the pointer atomics.
    check_against_oracle(op_with(FUSED_TMA), q, k, v, "causal & sliding(20)")
    check_against_oracle(op_with(FUSED), q, k, v, "axial(6) | sink(2)")


def test_softcap(no_dq_pass):
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, torch.float32)
    with torch.no_grad():
        q.mul_(3.0)  # logits large enough for the cap to bend them
    check_against_oracle(op_with(FUSED, softcap=5.0), q, k, v, "causal & sliding(17)",
                         softcap=5.0)


def test_dropout_matches_two_pass_with_same_seed(no_dq_pass, monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, torch.float32)
    dout = torch.randn(1, 4, 40, 16)
    text = "strided(3) | causal"
    got = torch.autograd.grad(op_with(FUSED, dropout_p=0.3, seed=11)(q, k, v, text, None, None),
                              (q, k, v), dout)
    monkeypatch.undo()  # the two-pass reference runs the dQ pass
    want = torch.autograd.grad(
        op_with(TWO_PASS, dropout_p=0.3, seed=11)(q, k, v, text, None, None), (q, k, v), dout)
    for a, w in zip(got, want, strict=True):
        assert rel_error(a, w) < 1e-5
    # And the mask matters: another seed gives other gradients.
    other = torch.autograd.grad(
        op_with(TWO_PASS, dropout_p=0.3, seed=12)(q, k, v, text, None, None), (q, k, v), dout)
    assert rel_error(other[0], want[0]) > 1e-2


def test_fully_masked_rows_get_zero_gradients(no_dq_pass):
    # Bottom-right alignment: with Lq > Lk under causal, the first Lq - Lk rows keep nothing.
    q, k, v = make_qkv(1, 2, 1, 50, 20, 16, torch.float32)
    out = op_with(FUSED)(q, k, v, "causal", None, None)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:, :, :30], torch.zeros_like(dq[:, :, :30]))
    ref = oracle(q, k, v, "causal")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(op_with(FUSED)(q, k, v, "causal", None, None), (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, w in zip(got, want, strict=True):
        assert rel_error(a, w) < TOL[torch.float32]


def test_public_op_takes_the_fused_path(fused_selected, no_dq_pass):
    q, k, v = make_qkv(1, 2, 1, 33, 33, 16, torch.float32)
    check_against_oracle(lambda q, k, v, p, s, b: attention(q, k, v, p), q, k, v, "local(9)")


def test_deterministic_mode_takes_two_passes_reproducibly(fused_selected, dq_pass_calls):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, torch.float32)
    dout = torch.randn(1, 4, 40, 16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(attention(q, k, v, "causal & sliding(9)"), (q, k, v), dout)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(dq_pass_calls) == 2
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    want = torch.autograd.grad(oracle(q, k, v, "causal & sliding(9)"), (q, k, v), dout.double())
    for a, w in zip(runs[0], want, strict=True):
        assert rel_error(a, w) < TOL[torch.float32]


def test_bias_gradient_takes_two_passes(fused_selected, dq_pass_calls):
    q, k, v = make_qkv(1, 2, 1, 30, 30, 16, torch.float32)
    bias = torch.randn(1, 1, 30, 30, requires_grad=True)
    check_against_oracle(lambda q, k, v, p, s, b: attention(q, k, v, p, bias=b), q, k, v,
                         "causal", bias=bias)
    assert dq_pass_calls
