"""The residue-class route of ``strided(s) & R`` patterns (codegen/residue.py) against the
float64 oracle and against the general route, through the kernels and the public call."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.residue import ResidueRoute, residue_route

from sparse_compile.functional import attention
from tests.codegen.attention_cases import TOL, make_qkv, oracle
from tests.conftest import rel_error


@pytest.mark.parametrize(
    "text, inner",
    [("causal & strided(4)", "causal"), ("strided(8)", "dense"),
     ("strided(4) & sliding(9)", "sliding(3)"), ("local(9) & strided(2)", "window(2, 2)"),
     ("window(5, 7) & strided(3)", "window(1, 2)"), ("causal & sliding(6) & strided(3)",
                                                    "causal & sliding(2)")],
)
def test_route_compresses_the_rest_of_the_pattern(text, inner):
    assert residue_route(text, 48, 48, False, 0.0) == ResidueRoute(int(text.split("strided(")[1]
                                                                       .split(")")[0]), inner)


@pytest.mark.parametrize(
    "text, lq, lk, bias, dropout",
    [("strided(4) | causal", 64, 64, False, 0.0), ("strided(4) & block(8)", 64, 64, False, 0.0),
     ("causal & strided(4)", 62, 64, False, 0.0), ("causal & strided(4)", 64, 64, True, 0.0),
     ("causal & strided(4)", 64, 64, False, 0.1), ("strided(1) & causal", 64, 64, False, 0.0),
     ("heads(strided(4), causal)", 64, 64, False, 0.0)],
)
def test_route_is_not_taken_where_it_does_not_hold(text, lq, lk, bias, dropout):
    assert residue_route(text, lq, lk, bias, dropout) is None


def run_both(q, k, v, text, scale, dout):
    out, lse = kernels.forward(q.detach(), k.detach(), v.detach(), text, scale)
    grads = kernels.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, text, scale)
    return out, lse, grads[:3]


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "model-layout"])
@pytest.mark.parametrize(
    "text, lq, lk, hq, hkv",
    [("causal & strided(4)", 64, 64, 2, 2), ("strided(4)", 32, 48, 2, 1),
     ("sliding(9) & strided(4)", 48, 48, 4, 2), ("local(9) & strided(2)", 40, 40, 2, 2),
     ("causal & strided(8)", 48, 32, 2, 2)],
)
def test_routed_kernels_match_the_oracle(text, lq, lk, hq, hkv, noncontiguous):
    # Lq > Lk under causal leaves the first rows without keys: zeros, never NaN.
    assert residue_route(text, lq, lk, False, 0.0) is not None
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 16, torch.float32, noncontiguous)
    dout = torch.randn(2, hq, lq, 16)
    out, lse, grads = run_both(q, k, v, text, 0.25, dout)
    ref = oracle(q, k, v, text, 0.25)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == q.shape[:3]
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    errs = [rel_error(out, ref)] + [rel_error(g, w) for g, w in zip(grads, want, strict=True)]
    assert max(errs) < TOL[torch.float32], errs


def test_routed_and_general_routes_agree(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, torch.float32)
    dout = torch.randn(1, 2, 64, 16)
    routed = run_both(q, k, v, "causal & strided(4)", 0.3, dout)
    monkeypatch.setattr(kernels, "residue_route", lambda *args: None)
    general = run_both(q, k, v, "causal & strided(4)", 0.3, dout)
    assert rel_error(routed[0], general[0]) < 1e-5
    assert rel_error(routed[1], general[1]) < 1e-5  # the same log-sum-exp, in row order
    for a, b in zip(routed[2], general[2], strict=True):
        assert rel_error(a, b) < 1e-5


def test_public_call_takes_the_route(monkeypatch):
    calls = []
    real = kernels._residue_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "_residue_forward", counted)
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16, torch.bfloat16, noncontiguous=True)
    out = attention(q, k, v, "causal & strided(6)")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = oracle(q, k, v, "causal & strided(6)")
    want = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    assert calls
    assert rel_error(out, ref) < TOL[torch.bfloat16]
    for g, w in zip(grads, want, strict=True):
        assert rel_error(g, w) < TOL[torch.bfloat16]
