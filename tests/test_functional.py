"""sparse_compile.functional.attention: the public entry point, its custom op, the chunked
PyTorch path used without GPU and interpreter, and its behaviour inside torch.compile."""

from __future__ import annotations

import logging

import pytest
import torch
from sparse_compile.patterns import PatternError, parse

import sparse_compile.fallback as fallback
from sparse_compile.functional import attention
from sparse_compile.op import attention_op
from tests.codegen.attention_cases import check_against_oracle, make_qkv
from tests.conftest import rel_error


def run(q, k, v, pattern, scale, bias):
    return attention(q, k, v, pattern, scale=scale, bias=bias)


def test_pattern_object_and_text_agree():
    q, k, v = make_qkv(1, 2, 1, 30, 30, 16, torch.float32)
    a = attention(q, k, v, "causal & sliding(7)")
    b = attention(q, k, v, parse("causal") & parse("sliding(7)"))
    assert torch.equal(a, b)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 1, 1, 20, 20, 16, torch.float32)
    assert torch.equal(attention(q, k, v, "causal"), attention(q, k, v, "causal", scale=0.25))


def test_bad_pattern_text_raises_pattern_error():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(PatternError):
        attention(q, k, v, "causal & (")


def test_dma_pattern_without_delta_names_the_missing_argument():
    from sparse_compile import MissingDeltaError

    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(MissingDeltaError, match="delta"):
        attention(q, k, v, "dma(keep=4)")


@pytest.fixture
def no_kernels(monkeypatch):
    """CPU without the Triton interpreter: the chunked PyTorch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize(
    "text, lq, lk", [("causal & sliding(6)", 30, 30), ("strided(3) | sink(2)", 20, 41),
                     ("heads(causal, local(5))", 25, 25), ("prefix(6)", 30, 30)],
)
def test_chunked_path_matches_oracle(no_kernels, text, lq, lk):
    q, k, v = make_qkv(2, 4, 2, lq, lk, 16, torch.float32)
    bias = torch.randn(1, 4, 1, lk, requires_grad=True)
    check_against_oracle(run, q, k, v, text, bias=bias)


def test_chunked_path_logs_once(no_kernels, caplog, monkeypatch):
    monkeypatch.setattr(fallback, "_logged", False)
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16, torch.float32)
    with caplog.at_level(logging.INFO, logger="sparse_compile"):
        attention(q, k, v, "causal")
        attention(q, k, v, "causal")
    msgs = [r for r in caplog.records if "chunked PyTorch path" in r.getMessage()]
    assert len(msgs) == 1


def test_chunked_path_never_builds_the_full_score_matrix(monkeypatch):
    seen = []
    inner = fallback._chunk_attention

    def spy(q, *args):
        seen.append(q.shape[-2])
        return inner(q, *args)

    monkeypatch.setattr(fallback, "_chunk_attention", spy)
    q, k, v = make_qkv(1, 2, 1, 50, 50, 16, torch.float32)
    budget = 2 * 50 * 8  # B·Hq·Lk·8 score entries: chunks of 8 query rows
    out = fallback.chunked_attention(q, k, v, parse("local(9)"), max_scores=budget)
    assert max(seen) == 8 and sum(seen) == 50
    full = fallback.chunked_attention(q, k, v, parse("local(9)"))
    assert rel_error(out, full) < 1e-6
    dq_chunked, = torch.autograd.grad(out.sum(), q)
    dq_full, = torch.autograd.grad(full.sum(), q)
    assert rel_error(dq_chunked, dq_full) < 1e-6


def test_chunked_dropout_is_reproducible(no_kernels):
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16, torch.float32)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(attention(q, k, v, "causal", dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_inside_torch_compile_with_dynamic_shapes(backend):
    fn = torch.compile(lambda q, k, v: attention(q, k, v, "causal & sliding(8)"),
                       backend=backend, dynamic=True, fullgraph=True)
    for length in (24, 37):
        q, k, v = make_qkv(1, 2, 1, length, length, 16, torch.float32)
        check_against_oracle(lambda q, k, v, p, s, b: fn(q, k, v), q, k, v,
                             "causal & sliding(8)")


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_custom_op_passes_opcheck(softcap):
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 20, 20, 16, torch.float32))
    bias = torch.randn(1, 2, 20, 20)
    args = (q, k, v, bias, "causal & sliding(5)", 0.25, 0.0, None)
    torch.library.opcheck(
        attention_op, args if softcap is None else (*args, softcap),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("layout", ["head-major", "sequence-major"])
def test_the_op_returns_its_output_in_the_query_layout(monkeypatch, kernels, layout):
    """SDPA's and FlexAttention's outputs follow the query's layout, so that a model's
    transposition back to ``[B, L, H, D]`` costs nothing; the op does the same on the kernel
    and the fallback paths, and its fake implementation says so (opcheck compares them)."""
    from sparse_compile.heads_layout import sequence_major

    if not kernels:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 20, 20, 16, torch.float32,
                                              noncontiguous=layout == "sequence-major"))
    args = (q, k, v, None, "causal & sliding(5)", 0.25, 0.0, None)
    out, _ = attention_op(*args)
    assert sequence_major(out) == (layout == "sequence-major")
    assert out.is_contiguous() == (layout == "head-major")
    assert out.transpose(1, 2).is_contiguous() == (layout == "sequence-major")
    torch.library.opcheck(attention_op, args, test_utils=(
        "test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_a_compiled_model_step_in_sequence_major_layout_matches_the_oracle():
    """The model's own layout end to end: transposed projections in, the output transposed
    back and flattened, the gradient arriving sequence-major (read as is by the backward)."""
    def step(q, k, v, pattern, scale, bias):
        out = attention(q, k, v, pattern, scale)
        b, h, length, d = out.shape
        flat = out.transpose(1, 2).reshape(b, length, h * d)
        return flat.reshape(b, length, h, d).transpose(1, 2)

    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    q, k, v = make_qkv(1, 4, 2, 33, 33, 16, torch.float32, noncontiguous=True)
    check_against_oracle(fn, q, k, v, "causal & sliding(7)")


@pytest.mark.parametrize(("hq", "hkv"), [(3, 2), (4, 3), (2, 4)])
@pytest.mark.parametrize("entry", ["decoding", "attention", "topk", "op", "compiled"])
def test_query_heads_not_a_multiple_of_kv_heads_raise(entry, hq, hkv):
    """GQA needs Hq a multiple of Hkv: otherwise a clear error naming both, at the public
    entry and at the op, never garbage or NaN from the kernels."""
    q, k, v = (t.detach() for t in make_qkv(1, hq, hkv, 8, 300, 16, torch.float32))
    match = rf"{hq} query heads.*{hkv} key/value heads"
    # Dynamo reports the op's ValueError, raised by its fake implementation, as its own error.
    error = torch._dynamo.exc.TorchRuntimeError if entry == "compiled" else ValueError
    torch._dynamo.reset()
    with pytest.raises(error, match=match):
        if entry == "decoding":
            attention(q[:, :, :1], k, v, "causal")
        elif entry == "attention":
            attention(q, k[:, :, :8], v[:, :, :8], "causal")
        elif entry == "topk":
            attention(q, k, v, "topk(2, block=16)")
        elif entry == "op":
            attention_op(q, k, v, None, "causal", 0.25, 0.0, None)
        else:
            torch.compile(attention_op, backend="eager", fullgraph=True)(
                q, k, v, None, "causal", 0.25, 0.0, None)


@pytest.mark.parametrize(("bias", "error", "match"), [
    (torch.ones(1, 1, 8, 8, dtype=torch.uint8), TypeError, "float tensor .* or a bool keep-mask"),
    (torch.zeros(1, 2, 8, 8), ValueError, "2 query heads where 4"),  # per kv head
    (torch.zeros(8, 7), ValueError, "7 keys where 8"),
    (torch.zeros(1, 1, 1, 8, 8), ValueError, "5 dims"),
])
def test_a_bias_the_kernels_would_misread_raises_naming_the_problem(bias, error, match):
    """An integer bias is neither added nor a keep-mask everywhere alike, and a bias that does
    not broadcast to [B, Hq, Lq, Lk] would be read out of its bounds: both are refused."""
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32)
    with pytest.raises(error, match=match):
        attention(q, k, v, "causal", bias=bias.to(q.device))


def test_biases_that_broadcast_are_accepted():
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, torch.float32)
    for bias in (torch.zeros(2, 4, 8, 8), torch.zeros(8, 8), torch.ones(8, dtype=torch.bool),
                 torch.zeros(2, 1, 1, 8)):
        check_against_oracle(attention, q, k, v, "causal", bias=bias.to(q.device), grads=False)
