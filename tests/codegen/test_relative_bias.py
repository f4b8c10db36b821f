"""Relative-position bias tables computed in the kernels (``table[h, q_pos - k_pos + Lq - 1]``,
nothing Lq x Lk built), differentiable through a deterministic per-diagonal reduction: every
kernel family, at every kind of position, against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.tl import decode
from sparse_compile.patterns import parse

import sparse_compile.eager
import sparse_compile.op
from sparse_compile import fallback
from sparse_compile.functional import attention
from sparse_compile.reference import reference_attention, relative_logits
from tests.codegen.attention_cases import check_against_oracle, count_calls, make_qkv
from tests.conftest import rel_error

PATTERNS = ["causal", "causal & sliding(9)", "block(8)", "sink(3) | sliding(7)"]
# (Lq, Lk, Hq, Hkv, D): odd lengths, Lq != Lk both ways, GQA, head dims 16 and 32.
SHAPES = [(19, 37, 4, 2, 16), (23, 23, 2, 2, 32), (29, 13, 4, 1, 16)]


def _table(heads: int, lq: int, lk: int) -> torch.Tensor:
    return (0.5 * torch.randn(heads, lq + lk - 1)).requires_grad_(True)


# Every pattern at two shapes and both kinds of positions, every shape at both kinds of positions
# (causal meets Lq > Lk: rows without keys), not the whole product.
CASES = [(text, SHAPES[(i + 2 * j) % len(SHAPES)], positions)
         for j, positions in enumerate([None, "q_start"]) for i, text in enumerate(PATTERNS)]


@pytest.mark.parametrize(("text", "shape", "positions"), CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else None)
def test_relative_bias_matches_the_oracle(text, shape, positions) -> None:
    lq, lk, hq, hkv, d = shape
    # A static cache's fill level per batch row: differences past the table are clamped.
    pos = {"q_start": torch.tensor([lk - lq + 3, 1])} if positions else None
    q, k, v = make_qkv(2, hq, hkv, lq, lk, d, torch.float32)
    check_against_oracle(attention, q, k, v, text, positions=pos, rel_bias=_table(hq, lq, lk))


@pytest.mark.parametrize("table_shape", ["one row", "flat"])
def test_one_table_row_for_every_head(table_shape) -> None:
    q, k, v = make_qkv(2, 2, 1, 21, 21, 16, torch.float32)
    table = _table(1, 21, 21)
    if table_shape == "flat":
        table = table.detach().reshape(-1).requires_grad_(True)
    check_against_oracle(attention, q, k, v, "causal & sliding(9)", rel_bias=table)


def test_relative_bias_with_left_padding_and_alibi() -> None:
    q, k, v = make_qkv(2, 4, 2, 17, 17, 16, torch.float32)
    pad = torch.tensor([0, 5])
    check_against_oracle(attention, q, k, v, "causal", positions={"q_start": -pad,
                                                                  "k_start": -pad},
                         alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]),
                         rel_bias=_table(4, 17, 17))


def test_relative_bias_inside_documents() -> None:
    q, k, v = make_qkv(2, 2, 1, 24, 24, 16, torch.float32)
    ids = torch.tensor([0] * 13 + [1] * 9 + [-1] * 2)
    check_against_oracle(attention, q, k, v, "causal & sliding(9)", positions={"documents": ids},
                         rel_bias=_table(2, 24, 24))


def test_relative_bias_with_softcap_and_a_bias() -> None:
    q, k, v = make_qkv(1, 2, 2, 19, 19, 16, torch.float32)
    bias = (0.3 * torch.randn(1, 2, 19, 19)).requires_grad_(True)
    table = _table(2, 19, 19)
    out = attention(q, k, v, "causal", bias=bias, softcap=2.0, rel_bias=table)
    from tests.codegen.attention_cases import oracle

    ref = oracle(q, k, v, "causal", bias=bias, softcap=2.0, rel_bias=table)
    assert rel_error(out, ref) < 1e-4
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, bias, table], dout)
    want = torch.autograd.grad(ref, [q, bias, table], dout.to(torch.float64))
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-4


def test_the_op_under_compile_matches_the_eager_kernels() -> None:
    q, k, v = make_qkv(1, 2, 1, 21, 30, 16, torch.float32)
    table = _table(2, 21, 30)

    def fn(q, k, v, table):
        return attention(q, k, v, "causal & sliding(9)", rel_bias=table)

    dout = torch.randn(1, 2, 21, 16)
    eager = fn(q, k, v, table)
    eager_grads = torch.autograd.grad(eager, [q, k, v, table], dout)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, table)
    compiled_grads = torch.autograd.grad(compiled, [q, k, v, table], dout)
    assert torch.equal(eager, compiled)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert torch.equal(a, b)


def test_the_table_gradient_is_deterministic() -> None:
    q, k, v = make_qkv(2, 2, 1, 40, 40, 16, torch.float32)
    table = _table(2, 40, 40)
    dout = torch.randn(2, 2, 40, 16)
    runs = [torch.autograd.grad(attention(q, k, v, "causal", rel_bias=table), table, dout)[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_the_table_gradient_under_dropout_sums_the_bias_gradient() -> None:
    """Under dropout (the kernels' mask, not the oracle's) the table's gradient is the dense
    bias gradient of the same logits summed per diagonal."""
    lq, lk = 19, 27
    q, k, v = make_qkv(1, 2, 2, lq, lk, 16, torch.float32)
    table = _table(2, lq, lk)
    dense = relative_logits(table.detach(), 1, 2, lq, lk, q.device).to(torch.float32)
    dense = dense.clone().requires_grad_(True)
    dout = torch.randn(1, 2, lq, 16)
    torch.manual_seed(3)
    out_t = attention(q, k, v, "causal", dropout_p=0.3, rel_bias=table)
    drel = torch.autograd.grad(out_t, table, dout)[0]
    torch.manual_seed(3)
    out_b = attention(q, k, v, "causal", bias=dense, dropout_p=0.3)
    dbias = torch.autograd.grad(out_b, dense, dout)[0]
    assert rel_error(out_t, out_b) < 1e-5
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    want = torch.zeros(2, lq + lk - 1).index_put_(
        (torch.arange(2)[:, None, None], (i - j + lk - 1).expand(2, lq, lk)), dbias[0],
        accumulate=True)
    assert rel_error(drel, want) < 1e-5


def test_relative_bias_while_decoding(monkeypatch) -> None:
    calls = count_calls(monkeypatch, kernels, "launch_decode")
    q, k, v = make_qkv(2, 4, 2, 1, 300, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal & (sink(4) | sliding(40))",
                         positions={"q_start": 200}, grads=False, rel_bias=_table(4, 1, 300))
    assert calls, "the decoding kernels did not run"
    assert decode.decode_applies(q, k, 0.0, kernels.DEFAULT_FRAME)


def test_relative_bias_on_the_chunked_pytorch_path() -> None:
    q, k, v = make_qkv(2, 4, 2, 9, 21, 8, torch.float32)
    table = _table(4, 9, 21)
    out = fallback.chunked_attention(q, k, v, parse("causal"), max_scores=64, rel_bias=table)
    assert rel_error(out, reference_attention(q, k, v, "causal", rel_bias=table)) < 1e-5
    from tests.codegen.attention_cases import oracle

    ref = oracle(q, k, v, "causal", rel_bias=table)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, table], dout)
    want = torch.autograd.grad(ref, [q, table], dout.to(torch.float64))
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < 1e-5


def test_the_op_without_kernels_differentiates_the_table(monkeypatch) -> None:
    """The custom op's PyTorch branch (no GPU, no interpreter) gives the table its gradient."""
    monkeypatch.setattr(sparse_compile.op, "kernels_available", lambda t: False)
    monkeypatch.setattr(sparse_compile.eager, "kernels_available", lambda t: False)
    q, k, v = make_qkv(1, 2, 2, 11, 15, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal", rel_bias=_table(2, 11, 15))


def test_a_table_of_the_wrong_length_is_refused() -> None:
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 8, 10, 16, torch.float32))
    with pytest.raises(ValueError, match=r"expected \[4 or 1, 17\]"):
        attention(q, k, v, "causal", rel_bias=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="expected"):
        attention(q, k, v, "causal", rel_bias=torch.zeros(3, 17))
    with pytest.raises(NotImplementedError, match="relative-bias table"):
        attention(q, k, v, "topk(2, block=4)", rel_bias=torch.zeros(4, 17))
