"""The eager fast path (sparse_compile/eager.py): the same kernels as the custom op, without its
dispatch cost, taken only outside tracing."""

from __future__ import annotations

import pytest
import torch

import sparse_compile.functional as functional
from sparse_compile.eager import fast_path_applies
from sparse_compile.functional import attention
from sparse_compile.op import attention_op
from tests.codegen.attention_cases import make_qkv


def _through_op(q, k, v, text, scale, bias, dropout_p, softcap):
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else None
    out, _ = attention_op(q, k, v, bias, text, scale, dropout_p, seed, softcap)
    return out


def _grads(out, tensors):
    dout = torch.randn_like(out)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], dout)


@pytest.mark.parametrize(
    "text, lq, lk, dropout_p, softcap, with_bias",
    [("causal & sliding(7)", 29, 29, 0.0, 0.0, False),
     ("strided(5) | sink(3)", 21, 34, 0.0, 0.0, True),
     ("causal | prefix(6)", 26, 26, 0.3, 0.0, False),
     ("local(4)", 19, 19, 0.0, 5.0, True)],
)
@pytest.mark.parametrize("sequence_major", [False, True])
def test_fast_path_equals_the_custom_op(text, lq, lk, dropout_p, softcap, with_bias,
                                        sequence_major):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, lq, lk, 16, torch.float32,
                                                    noncontiguous=sequence_major))
    bias = torch.randn(1, 4, lq, lk, requires_grad=True) if with_bias else None
    tensors = (q, k, v, bias)
    torch.manual_seed(7)
    fast = attention(q, k, v, text, scale=0.3, bias=bias, dropout_p=dropout_p,
                     softcap=softcap or None)
    torch.manual_seed(11)
    fast_grads = _grads(fast, tensors)
    torch.manual_seed(7)
    slow = _through_op(q, k, v, text, 0.3, bias, dropout_p, softcap)
    torch.manual_seed(11)
    slow_grads = _grads(slow, tensors)
    assert torch.equal(fast, slow)
    assert fast.stride() == slow.stride()  # the same layout (the query's) either way
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert torch.equal(a, b)


def test_inference_calls_return_the_query_layout_too():
    """Without gradients the fast path returns the same layout as with them (the op's)."""
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 20, 20, 16, torch.float32,
                                              noncontiguous=True))
    out = attention(q, k, v, "causal & sliding(5)")
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()


def test_eager_calls_skip_the_custom_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("eager call went through the custom op")

    monkeypatch.setattr(functional, "attention_op", refuse)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 24, 24, 16, torch.float32))
    out = attention(q, k, v, "causal & sliding(5)")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, "causal & sliding(5)"), out.detach())


def test_fast_path_refuses_traced_and_transformed_calls():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    assert fast_path_applies(q, k, v, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        assert not fast_path_applies(fake, fake, fake, None)
    seen = []
    torch.func.grad(lambda x: seen.append(fast_path_applies(x, k, v, None)) or x.sum())(q)
    assert seen == [False]

