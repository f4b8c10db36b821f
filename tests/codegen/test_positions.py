"""Queries and keys at given positions (static caches, left padding, shards) and packed
documents, through the public call, against the float64 oracle at the same positions."""

from __future__ import annotations

import pytest
import torch

import sparse_compile as sc
from sparse_compile import fallback
from sparse_compile.functional import attention
from sparse_compile.positions import (
    PositionError,
    consecutive_start,
    documents_from_cu_seqlens,
    documents_from_equal_ids,
    documents_from_position_ids,
)
from sparse_compile.reference import reference_attention
from tests.codegen.attention_cases import check_against_oracle, make_qkv
from tests.conftest import rel_error

# Interval patterns (closed form), a union and per-head patterns (row bounds / tables by
# default: their hull under positions) and patterns with no interval at all.
PATTERNS = [
    "causal & sliding(7)",
    "block(6)",
    "causal & (sink(3) | sliding(5))",
    "heads(causal, sink(2) | local(6))",
    "global(2) | local(6)",
]


def _documents(b: int, length: int) -> torch.Tensor:
    """Two rows of ids: several documents with padding between and after them; one document."""
    row = [0] * 9 + [1] * 14 + [-1] * 3 + [3] * 7 + [-1] * (length - 33)
    return torch.tensor([row, [0] * length][:b])


POSITION_CASES = {
    "static cache": lambda b, lq, lk: {"q_start": torch.tensor([lk - lq - 9, lk - lq - 4])},
    # Per-batch starts and fixed ones go through different kernel arguments.
    "shifted keys": lambda b, lq, lk: {"q_start": 11, "k_start": -4},
    "left padding": lambda b, lq, lk: {"q_start": torch.tensor([lk - lq - 3, lk - lq]),
                                       "k_start": torch.tensor([-3, 0])},
}


# Every pattern at two kinds of positions, every kind under three or more patterns (not the
# whole product).
CASES = [(text, sorted(POSITION_CASES)[(i + j) % len(POSITION_CASES)])
         for i, text in enumerate(PATTERNS) for j in range(2)]


@pytest.mark.parametrize(("text", "case"), CASES)
def test_positions_match_the_oracle(text: str, case: str) -> None:
    b, lq, lk = 2, 13, 35
    q, k, v = make_qkv(b, 2, 1, lq, lk, 16, torch.float32)
    positions = POSITION_CASES[case](b, lq, lk)
    check_against_oracle(attention, q, k, v, text, positions=positions)


@pytest.mark.parametrize("text", PATTERNS)
def test_documents_match_the_oracle(text: str) -> None:
    q, k, v = make_qkv(2, 2, 1, 37, 37, 16, torch.float32, noncontiguous=True)
    check_against_oracle(attention, q, k, v, text, positions={"documents": _documents(2, 37)})


@pytest.mark.parametrize("text", ["causal & sink(4)", "block(5) | causal & sliding(3)"])
def test_a_packed_batch_equals_each_document_alone(text: str) -> None:
    lengths = [7, 12, 3, 9]
    total = sum(lengths)
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, total, total, 16, torch.float32))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    packed = attention(q, k, v, text, documents=ids)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = attention(q[:, :, part], k[:, :, part], v[:, :, part], text)
        assert rel_error(packed[:, :, part], alone) < 1e-5
        start += n


@pytest.mark.parametrize("text", ["causal & sliding(7)", "global(2) | local(6)"])
def test_bounds_prepared_once_equal_the_ids(text: str) -> None:
    """The backend prepares a packed batch's bounds once per graph and hands them to every
    call: forward and gradients equal the call given the ids."""
    from sparse_compile.functional import placed_attention
    from sparse_compile.positions import prepared_documents

    q, k, v = make_qkv(2, 2, 1, 37, 37, 16, torch.float32)
    ids = _documents(2, 37)
    want = attention(q, k, v, text, documents=ids)
    grads_want = torch.autograd.grad(want.sum(), (q, k, v))
    bounds = prepared_documents(ids, 2, 37)
    assert bounds.shape == (2, 2, 37) and bounds.dtype == torch.int32
    got = placed_attention(q, k, v, text, documents=bounds)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), grads_want, strict=True):
        assert torch.equal(g, w)


def test_padding_rows_output_zeros() -> None:
    q, k, v = (t.detach() for t in make_qkv(2, 2, 2, 37, 37, 16, torch.float32))
    ids = _documents(2, 37)
    out = attention(q, k, v, "causal", documents=ids)
    assert torch.equal(out[0, :, ids[0] < 0], torch.zeros_like(out[0, :, ids[0] < 0]))


def test_a_static_cache_equals_the_filled_part() -> None:
    """Keys of a cache of capacity 40 holding 26 tokens, queries the next 3: the same as the
    26 + 3 keys a growing cache would hold (the unfilled tail is beyond the causal bound)."""
    text, filled, lq, capacity = "causal & (sink(2) | sliding(6))", 26, 3, 40
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, lq, capacity, 16, torch.float32))
    static = attention(q, k, v, text, q_start=filled)
    grown = attention(q, k[:, :, :filled + lq], v[:, :, :filled + lq], text)
    assert rel_error(static, grown) < 1e-5


@pytest.mark.parametrize("positions", [
    {"q_start": torch.tensor([3, 9]), "k_start": -2},
    {"documents": torch.tensor([0] * 5 + [1] * 6 + [-1] * 2 + [2] * 4)},
])
def test_chunked_pytorch_path_matches_the_reference(positions) -> None:
    q, k, v = (t.detach() for t in make_qkv(2, 2, 1, 17, 17, 8, torch.float32))
    text = "causal & (sink(2) | sliding(4))"
    if "documents" in positions:
        args = {"documents": positions["documents"].reshape(1, -1).to(q.device)}
    else:
        args = {"starts": sc.positions.starts_tensor(positions["q_start"], positions["k_start"],
                                                     2, 17, 17, q.device)}
    out = fallback.chunked_attention(q, k, v, sc.parse(text), max_scores=64, **args)
    ref = reference_attention(q, k, v, text, **positions)
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"documents": torch.tensor([0, 0, 1, 1, 0, 0, 2, 2])}, "non-decreasing"),
    ({"documents": torch.tensor([0, 0, -1, 0, 1, 1, 1, 1])}, "split by padding"),
    ({"documents": torch.zeros(8)}, "integers"),
    ({"documents": torch.zeros(3, 8, dtype=torch.long)}, r"\[B, L\]"),
    ({"documents": torch.zeros(8, dtype=torch.long), "q_start": 2}, "q_start"),
    ({"q_start": torch.zeros(3, dtype=torch.long)}, "q_start"),
    ({"k_start": 1.5}, "k_start"),
])
def test_bad_positions_raise_clear_errors(kwargs, message: str) -> None:
    q, k, v = (t.detach() for t in make_qkv(2, 2, 2, 8, 8, 16, torch.float32))
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, "causal", **kwargs)


def test_documents_need_as_many_queries_as_keys() -> None:
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 4, 8, 16, torch.float32))
    with pytest.raises(PositionError, match="Lq = 4, Lk = 8"):
        attention(q, k, v, "causal", documents=torch.zeros(8, dtype=torch.long))


def test_documents_from_flash_and_transformers_forms() -> None:
    cu = torch.tensor([0, 3, 5, 9])
    assert documents_from_cu_seqlens(cu, 11).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1]
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert documents_from_position_ids(position_ids).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("check", [
    lambda ids: documents_from_equal_ids(ids, 1, 8),
    lambda ids: documents_from_equal_ids(ids, 1, 8, positions=ids),
    lambda ids: consecutive_start(ids[0]),
])
def test_layout_checks_trace_into_device_asserts(check) -> None:
    """A backend traces the captured graph again over fake tensors (make_fx), where
    ``torch.compiler.is_compiling()`` may be false: the checks must still assert on the device
    instead of reading the ids on the host, which would fail the whole compilation."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ids = torch.arange(8).reshape(1, 8)
    graph = make_fx(check, tracing_mode="fake")(ids)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._assert_async.msg in targets


@pytest.mark.parametrize("length", [1, 7, 16, 1500])
def test_document_bounds_kernel_matches_pytorch(length: int) -> None:
    from sparse_compile.codegen.tl.documents import document_bounds, document_bounds_reference

    gen = torch.Generator().manual_seed(length)
    ids = torch.sort(torch.randint(0, 6, (3, length), generator=gen, device="cpu")).values
    ids = torch.where(torch.rand(3, length, generator=gen, device="cpu") < 0.1, -1, ids)
    ids = ids.to(torch.get_default_device())
    got, want = document_bounds(ids), document_bounds_reference(ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
