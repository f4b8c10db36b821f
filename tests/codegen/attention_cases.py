"""Helpers shared by the kernel tests: inputs, a differentiable float64 oracle, comparisons."""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch
from sparse_compile.patterns import parse

from sparse_compile.functional import attention
from sparse_compile.reference import (
    kept_mask,
    position_grid,
    reference_attention,
    relative_logits,
)
from tests.conftest import rel_error

# Relative-error bounds per input dtype (DESIGN.md §5).
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# Primitive texts small enough to give EMPTY, PARTIAL and FULL blocks at L <= ~80 with 16x16 tiles.
PRIMITIVES = [
    "dense", "causal", "window(5, 2)", "local(9)", "sliding(7)", "block(12)", "axial(6)",
    "axial(5, 3)", "strided(4)", "fanout", "fanout(3)", "sink(3)", "global(2)", "prefix(10)",
]


def random_pattern(rng: random.Random, depth: int = 2) -> str:
    """A random composition of primitives with &, | and ~ (DSL text)."""
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(PRIMITIVES)
    op = rng.choice(["&", "|", "&", "~"])
    if op == "~":
        return f"~({random_pattern(rng, depth - 1)})"
    return f"({random_pattern(rng, depth - 1)}) {op} ({random_pattern(rng, depth - 1)})"


def make_qkv(
    b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype,
    noncontiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normal q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] requiring grad.

    noncontiguous: views of [B, L, H, D] storage (the layout real models transpose from).
    """
    def one(h: int, length: int) -> torch.Tensor:
        if noncontiguous:
            t = torch.randn(b, length, h, d, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, length, d, dtype=dtype)
        return t.requires_grad_(True)

    return one(hq, lq), one(hkv, lk), one(hkv, lk)


def oracle(q, k, v, pattern, scale=None, bias=None, softcap=0.0, positions=None, alibi=None,
           rel_bias=None):
    """Float64 attention with autograd (same formula as reference_attention, which it matches;
    with ``softcap`` > 0 the logits are first capped as softcap * tanh(s / softcap)).
    ``positions``: keyword arguments ``q_start`` / ``k_start`` / ``documents`` of
    reference_attention (where queries and keys sit); ``alibi``: ALiBi slopes ``[Hq]``;
    ``rel_bias``: a relative-bias table ``[Hq or 1, Lq + Lk - 1]`` (differentiable).

    Returns the output [B, Hq, Lq, D] float64, differentiable in q, k, v and a float bias.
    """
    p = parse(pattern) if isinstance(pattern, str) else pattern
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    k64 = k.to(torch.float64).repeat_interleave(g, 1)
    v64 = v.to(torch.float64).repeat_interleave(g, 1)
    s = scale * (q.to(torch.float64) @ k64.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    positions = positions or {}
    if positions:
        keep = kept_mask(p, b, hq, lq, lk, q.device, positions.get("q_start"),
                     positions.get("k_start"), positions.get("documents"))
    else:
        keep = p.mask(lq, lk, heads=hq if p.per_head else None, device=q.device)
        keep = keep.expand(b, hq, lq, lk)
    if alibi is not None:
        q_pos, k_pos = position_grid(b, lq, lk, q.device, **positions)
        s = s + alibi.to(torch.float64).reshape(1, -1, 1, 1) * (k_pos - q_pos)[:, None]
    if rel_bias is not None:
        s = s + relative_logits(rel_bias, b, hq, lq, lk, q.device, **positions)
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            s = s + bias.to(torch.float64)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    out = (e / torch.where(den > 0, den, torch.ones_like(den))) @ v64
    if softcap > 0:
        return out
    ref = reference_attention(q, k, v, p, scale, bias, alibi=alibi, rel_bias=rel_bias,
                              **positions)
    assert rel_error(out, ref) < 1e-12, "test oracle disagrees with reference_attention"
    return out


def check_against_oracle(fn, q, k, v, pattern, scale=None, bias=None, grads=True, softcap=0.0,
                         positions=None, alibi=None, rel_bias=None):
    """Run ``fn(q, k, v, pattern, scale, bias)`` and compare output and gradients with the oracle
    (``positions``: where queries and keys sit, passed to both; see ``oracle``).

    Returns the dict of relative errors (out, dq, dk, dv[, dbias][, drel]).
    """
    tol = TOL[q.dtype]
    extra = {name: t for name, t in (("alibi", alibi), ("rel_bias", rel_bias)) if t is not None}
    out = fn(q, k, v, pattern, scale, bias, **(positions or {}), **extra)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"non-finite output for {pattern!r}"
    ref = oracle(q, k, v, pattern, scale, bias, softcap, positions, alibi, rel_bias)
    errs = {"out": rel_error(out, ref)}
    if grads:
        dout = torch.randn_like(out)
        wrt, names = [q, k, v], ["dq", "dk", "dv"]
        if bias is not None and bias.requires_grad:
            wrt.append(bias)
            names.append("dbias")
        if rel_bias is not None and rel_bias.requires_grad:
            wrt.append(rel_bias)
            names.append("drel")
        got = torch.autograd.grad(out, wrt, dout)
        want = torch.autograd.grad(ref, wrt, dout.to(torch.float64))
        for name, g, w in zip(names, got, want, strict=True):
            assert torch.isfinite(g).all(), f"non-finite {name} for {pattern!r}"
            # A bias constant along the keys has an exactly zero gradient (softmax is
            # shift-invariant): compare absolutely there.
            zero = w.norm().item() < 1e-9
            errs[name] = g.abs().max().item() if zero else rel_error(g, w)
    bad = {n: e for n, e in errs.items() if e > tol}
    assert not bad, f"{pattern!r} {tuple(q.shape)} k{tuple(k.shape)} {q.dtype}: errors {errs}"
    return errs


def kernel_outputs(q, k, v, text, scale, dout):
    """(out, lse, (dq, dk, dv)) straight from codegen.attention's forward and backward."""
    from sparse_compile.codegen import attention as kernels

    out, lse = kernels.forward(q.detach(), k.detach(), v.detach(), text, scale)
    grads = kernels.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, text, scale)
    return out, lse, grads[:3]


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that each call appends to the returned list."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _on_gluon_gpu() -> bool:
    from sparse_compile.codegen.gluon import support

    return torch.cuda.is_available() and support.gluon_capable(torch.device("cuda"))


# The Gluon kernels run on an sm90 GPU with a supported Triton only (no interpreter).
ON_GLUON_GPU = _on_gluon_gpu()
needs_gluon_gpu = pytest.mark.skipif(not ON_GLUON_GPU,
                                     reason="Gluon kernels run on an sm90 GPU only")


def strict_gluon(monkeypatch, owner) -> tuple[list, list]:
    """Count the Gluon forward and backward launches (``owner``: the dispatching module,
    codegen/attention.py) that returned results, and let a kernel's failure raise instead of
    falling back to the ``tl`` kernels, which compute the same thing and would hide it (the
    fallback also lasts for the rest of the process). Returns the two lists of launches."""
    ran: dict[str, list] = {"forward": [], "backward": []}
    for kind, seen in ran.items():
        real = getattr(owner, f"launch_gluon_{kind}")

        def launched(*args, _real=real, _seen=seen, **kwargs):
            result = _real(*args, **kwargs)
            if result is not None:
                _seen.append(1)
            return result

        monkeypatch.setattr(owner, f"launch_gluon_{kind}", launched)
    monkeypatch.setattr(owner, "fall_back_on_failure", lambda name: contextlib.nullcontext())
    return ran["forward"], ran["backward"]


def check_routed_case(text, lq, lk, hq, hkv, noncontiguous):
    """A routed pattern through the public call against the oracle (fp32, forward and
    gradients), and its kernels' output contiguous with a [B, Hq, Lq] log-sum-exp."""
    from sparse_compile.codegen import attention as kernels

    q, k, v = make_qkv(2, hq, hkv, lq, lk, 16, torch.float32, noncontiguous)
    check_against_oracle(attention, q, k, v, text, 0.25)
    # The layout of what the forward returns (the backward already ran through the public call).
    out, lse = kernels.forward(q.detach(), k.detach(), v.detach(), text, 0.25)
    assert out.is_contiguous() and lse.shape == q.shape[:3]


def check_route_matches_general(monkeypatch, route: str, text: str):
    """Output, log-sum-exp and gradients of ``text`` with codegen.attention's ``route`` on
    equal (1e-5) to the same with it switched off (the layout's general route)."""
    from sparse_compile.codegen import attention as kernels

    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.float32)
    dout = torch.randn(1, 2, 32, 16)
    routed = kernel_outputs(q, k, v, text, 0.3, dout)
    monkeypatch.setattr(kernels, route, lambda *args: None)
    general = kernel_outputs(q, k, v, text, 0.3, dout)
    assert rel_error(routed[0], general[0]) < 1e-5
    assert rel_error(routed[1], general[1]) < 1e-5  # the same log-sum-exp, in row order
    for a, b in zip(routed[2], general[2], strict=True):
        assert rel_error(a, b) < 1e-5
