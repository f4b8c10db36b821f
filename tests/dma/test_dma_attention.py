"""Fused DMA (Triton: on the GPU, or interpreted on the CPU) and the chunked path against the
float64 reference."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.chunked import dma_attention_chunked
from sparse_compile.dynamic_mask.functional import dma_attention, key_only_mask
from sparse_compile.dynamic_mask.reference import dma_reference
from tests.conftest import rel_error


def make_inputs(b, hq, hkv, lq, lk, d, tied=False, seed=0, dtype=torch.float32, device="cpu"):
    """q, k, v, delta requiring grad on ``device``, drawn on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=dtype, device="cpu")
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype, device="cpu")
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype, device="cpu")
    if tied:  # few distinct values: ties straddle every row's keep-th place
        delta = torch.randint(0, 3, (b, hkv, lk), generator=gen, device="cpu").to(dtype) / 2
    else:
        delta = torch.rand(b, hkv, lk, generator=gen, dtype=dtype, device="cpu") * 2
    return [t.to(device).requires_grad_() for t in (q, k, v, delta)]


def padding(b, lk, pads):
    mask = torch.ones(b, lk, dtype=torch.bool)
    for row, n in enumerate(pads):
        mask[row, :n] = False
    return mask


def check(fn, inputs, keep, causal, bias, ref_bias, tol=1e-4):
    q, k, v, delta = inputs
    out = fn(q, k, v, delta, keep, causal, bias)
    ref = dma_reference(q, k, v, delta, keep, causal=causal, bias=ref_bias)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_error(out, ref) < tol
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    for name, g, w in zip("q k v delta".split(), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == inputs["qkvd".index(name[0])].dtype
        assert rel_error(g, w) < tol, name


CASES = [
    # b, hq, hkv, lq, lk, d, keep, pads, tied
    (1, 2, 2, 40, 40, 16, 8, None, False),  # MHA, several query blocks
    (2, 4, 2, 24, 33, 16, 5, [0, 7], False),  # GQA, ragged Lq < Lk, padding
    (1, 3, 1, 19, 19, 24, 1, None, False),  # keep = 1, D not a power of two, MQA
    (2, 2, 1, 30, 30, 16, 6, [4, 0], True),  # ties at the threshold
    (1, 2, 2, 21, 21, 16, 32, [3], False),  # Lk <= keep: no sparsity
    (1, 2, 2, 18, 18, 16, 18, None, True),  # Lk == keep exactly
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_fused_matches_reference(case, causal, kernel_device):
    b, hq, hkv, lq, lk, d, keep, pads, tied = case
    inputs = make_inputs(b, hq, hkv, lq, lk, d, tied, device=kernel_device)
    mask = padding(b, lk, pads) if pads else None
    ref_bias = mask[:, None, None, :] if mask is not None else None
    check(dma_attention, inputs, keep, causal, mask, ref_bias)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_with_query_dependent_mask(causal):
    """A mask that varies per row (not key-only) takes the chunked path, still exact."""
    inputs = make_inputs(2, 4, 2, 20, 26, 8, tied=True, seed=3)
    gen = torch.Generator().manual_seed(5)
    low = torch.finfo(torch.float32).min
    bias = torch.where(torch.rand(2, 1, 20, 26, generator=gen) > 0.3, 0.0, low)
    assert not key_only_mask(bias, 2, 26)[0]
    check(dma_attention, inputs, 4, causal, bias, bias)


def test_chunked_path_small_chunks():
    inputs = make_inputs(1, 2, 1, 23, 23, 8, tied=True, seed=7)

    def chunked(q, k, v, delta, keep, causal, bias):
        return dma_attention_chunked(q, k, v, delta, keep, causal, bias, chunk=5)

    check(chunked, inputs, 6, True, None, None)


def test_additive_key_bias_is_added(kernel_device):
    inputs = make_inputs(2, 2, 2, 17, 17, 16, seed=11, device=kernel_device)
    bias = torch.randn(2, 17)
    bias[1, :3] = float("-inf")
    check(dma_attention, inputs, 4, True, bias, bias[:, None, None, :])


def test_large_delta_keeps_gradients_accurate(kernel_device):
    """delta of order 1e4 (large A): logits far from 0 must not cost the backward precision."""
    q, k, v, delta = make_inputs(1, 2, 2, 40, 40, 16, seed=17, device=kernel_device)
    with torch.no_grad():
        delta.mul_(1e4)
    check(dma_attention, [q, k, v, delta], 6, True, None, None, tol=2e-3)


def test_bfloat16_forward(kernel_device):
    q, k, v, delta = make_inputs(1, 2, 2, 32, 32, 16, seed=13, dtype=torch.bfloat16,
                                 device=kernel_device)
    out = dma_attention(q, k, v, delta, 6)
    ref = dma_reference(q, k, v, delta, 6)
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < 2e-2


def test_rows_without_keys_are_zero(kernel_device):
    q, k, v, delta = make_inputs(1, 1, 1, 8, 8, 16, seed=2, device=kernel_device)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5:] = True  # causal rows 0..4 see only padding
    out = dma_attention(q, k, v, delta, 2, True, mask)
    assert torch.equal(out[0, 0, :5], torch.zeros(5, 16))
    assert out[0, 0, 5:].abs().sum() > 0


def test_keep_must_be_positive():
    q, k, v, delta = make_inputs(1, 1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="keep"):
        dma_attention(q, k, v, delta, 0)


def test_compiles_as_one_op(kernel_device):
    inputs = make_inputs(1, 2, 1, 20, 20, 16, seed=4, device=kernel_device)
    fn = torch.compile(lambda q, k, v, d: dma_attention(q, k, v, d, 5), backend="aot_eager",
                       fullgraph=True)
    out = fn(*inputs)
    ref = dma_reference(*inputs, 5)
    assert rel_error(out, ref) < 1e-4
    got = torch.autograd.grad(out.sum(), inputs)
    want = torch.autograd.grad(ref.sum(), inputs)
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-4


@pytest.mark.parametrize("fn", [dma_attention, dma_attention_chunked], ids=["fused", "chunked"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_large_delta(causal, fn, request):
    """delta near 3e7 (exp(A * softplus) with A ~ 4): float32 logits at that magnitude keep no
    bit of q.k; the kernels and the chunked path (the fallback, also the GPU path of full-shape
    masks) subtract a per-row shift first, so the result stays exact (the chunked path was 40%
    off before it did). The kernels run on the kernel device, the chunked path on the CPU."""
    device = request.getfixturevalue("kernel_device") if fn is dma_attention else "cpu"
    inputs = make_inputs(1, 2, 2, 48, 48, 16, seed=11, device=device)
    gen = torch.Generator().manual_seed(12)
    delta = 3e7 + torch.randint(0, 4, (1, 2, 48), generator=gen, device="cpu").float() * 2
    inputs[3] = delta.to(device).requires_grad_()
    check(fn, inputs, 12, causal, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_span_pass_long_spans(causal, dtype, kernel_device):
    """Spans of 4 row steps over lists of several key tiles, most steps keeping whole tiles
    (the loop without masks); float16 at Lq a multiple of the step reads Q and dO through
    TMA descriptors."""
    from sparse_compile.codegen.tl.dma.backward import KvPass, dma_backward
    from sparse_compile.codegen.tl.dma.forward import dma_forward
    from sparse_compile.codegen.tl.dma.select import dma_select

    q, k, v, delta = make_inputs(1, 2, 1, 128, 128, 32, dtype=dtype, device=kernel_device)
    scale = 32 ** -0.5
    sel = dma_select(delta.detach(), None, 128, 40, causal, 16)
    out, lse = dma_forward(q.detach(), k.detach(), v.detach(), delta.detach(), None, sel,
                           causal, scale, 16)
    grad = torch.randn_like(out)
    got = dma_backward(grad, q.detach(), k.detach(), v.detach(), delta.detach(), None, out, lse,
                       sel, causal, scale, 16, kv_pass=KvPass(rows=64, block_m=16, block_n=16))
    ref = dma_reference(q, k, v, delta, 40, causal=causal)
    want = torch.autograd.grad(ref, (q, k, v, delta), grad.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, w in zip("q k v delta".split(), got, want, strict=True):
        assert rel_error(g, w) < tol, name


@pytest.mark.parametrize("causal", [True, False])
def test_backward_span_pass_with_key_bias(causal, kernel_device):
    """An additive per-key bias (a float padding mask) through the span pass."""
    from sparse_compile.codegen.tl.dma.backward import KvPass, dma_backward
    from sparse_compile.codegen.tl.dma.forward import dma_forward
    from sparse_compile.codegen.tl.dma.select import dma_select

    q, k, v, delta = make_inputs(1, 2, 2, 96, 96, 16, seed=8, device=kernel_device)
    gen = torch.Generator().manual_seed(9)
    key_bias = (torch.randn(1, 96, generator=gen) * 2).to(kernel_device)
    scale = 16 ** -0.5
    sel = dma_select(delta.detach(), None, 96, 24, causal, 16)
    out, lse = dma_forward(q.detach(), k.detach(), v.detach(), delta.detach(), key_bias, sel,
                           causal, scale, 16)
    grad = torch.randn_like(out)
    got = dma_backward(grad, q.detach(), k.detach(), v.detach(), delta.detach(), key_bias, out,
                       lse, sel, causal, scale, 16,
                       kv_pass=KvPass(rows=64, block_m=16, block_n=16))
    ref = dma_reference(q, k, v, delta, 24, causal=causal, bias=key_bias[:, None, None, :])
    want = torch.autograd.grad(ref, (q, k, v, delta), grad.double())
    assert rel_error(out, ref) < 1e-4
    for name, g, w in zip("q k v delta".split(), got, want, strict=True):
        assert rel_error(g, w) < 1e-4, name


@pytest.mark.parametrize("rows", [32, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], (1, 2, 2, 50, 50, 16, 9, [6], False),
                                  (1, 2, 1, 70, 90, 16, 7, [30], False),
                                  (1, 2, 2, 40, 40, 24, 8, None, False)])
def test_backward_span_pass(case, causal, rows, kernel_device):
    """dK/dV by the span pass (several query blocks per atomic add) equal the reference. Spans
    of 2 and 4 row tiles; the fourth case has spans whose first rows see no listed key (padding
    hides the first 30 keys) and rows whose thresholds end inside a span; the last a head dim
    narrower than its tile."""
    from sparse_compile.codegen.tl.dma.backward import KvPass, dma_backward
    from sparse_compile.codegen.tl.dma.forward import dma_forward
    from sparse_compile.codegen.tl.dma.select import dma_select

    b, hq, lq, lk, d, keep, pads, tied = case[0], case[1], case[3], case[4], case[5], case[6], \
        case[7], case[8]
    q, k, v, delta = make_inputs(b, hq, case[2], lq, lk, d, tied, device=kernel_device)
    keys = padding(b, lk, pads) if pads else None
    scale = d ** -0.5
    sel = dma_select(delta.detach(), keys, lq, keep, causal, 16)
    out, lse = dma_forward(q.detach(), k.detach(), v.detach(), delta.detach(), None, sel,
                           causal, scale, 16)
    grad = torch.randn_like(out)
    got = dma_backward(grad, q.detach(), k.detach(), v.detach(), delta.detach(), None, out, lse,
                       sel, causal, scale, 16, kv_pass=KvPass(rows=rows, block_m=16, block_n=16))
    ref = dma_reference(q, k, v, delta, keep, causal=causal,
                        bias=keys[:, None, None, :] if keys is not None else None)
    want = torch.autograd.grad(ref, (q, k, v, delta), grad.double())
    for name, g, w in zip("q k v delta".split(), got, want, strict=True):
        assert rel_error(g, w) < 1e-4, name


def test_more_heads_than_the_grid_takes_the_chunked_path(monkeypatch, caplog, kernel_device):
    """batch x query heads beyond the kernels' grid limit: the chunked path, with a warning,
    and the same answer (the limit is lowered here to keep the case small)."""
    import sparse_compile.codegen.launch.config as config

    monkeypatch.setattr(config, "MAX_GRID_Y", 3)
    inputs = make_inputs(2, 2, 2, 20, 20, 16, seed=5, device=kernel_device)
    with caplog.at_level("WARNING", logger="sparse_compile"):
        check(dma_attention, inputs, 6, True, None, None)
    assert "grid limit" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 70 * 2**30,
                    reason="needs a GPU with 70 GiB: tensors of more than 2**31 elements")
def test_tensors_past_two_to_the_31_elements():
    """Offsets of the last (batch, head) pass 2**31 elements: its output and gradients must
    still match the reference computed on that head alone."""
    b, h, length, d, keep = 16383, 4, 264, 128, 32
    assert b * h * length * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    delta = torch.rand(b, h, length, device="cuda", generator=gen).requires_grad_()
    out = dma_attention(q, k, v, delta, keep)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, delta), grad)
    last = [t.detach()[-1:].double().requires_grad_() for t in (q, k, v, delta)]
    ref = dma_reference(*last, keep, causal=True)
    want = torch.autograd.grad(ref, last, grad[-1:].double())
    assert rel_error(out[-1:], ref) < 2e-2
    for name, g, w in zip("q k v delta".split(), got, want, strict=True):
        assert rel_error(g[-1:], w) < 3e-2, name
