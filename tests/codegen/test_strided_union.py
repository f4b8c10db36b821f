"""Strided unions (``axial(c)``, ``A | strided(s)``) as two parts merged by log-sum-exp
(codegen/routes/strided_union.py), against the float64 oracle and the general route."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.routes.strided_union import StridedUnion, strided_union_route
from sparse_compile.codegen.tl.merge import merge_parts

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    check_against_oracle,
    check_route_matches_general,
    check_routed_case,
    count_calls,
    make_qkv,
    oracle,
)
from tests.conftest import rel_error


def test_axial_parts_are_rows_and_columns_without_the_diagonal():
    assert strided_union_route("axial(8)", 64, 64, False, 0.0) == StridedUnion(
        "block(8)", "strided(8) & ~window(0, 0)")
    assert strided_union_route("causal & axial(8)", 64, 64, False, 0.0) == StridedUnion(
        "causal & block(8)", "causal & strided(8) & ~window(0, 0)")


def test_union_parts_are_the_rest_and_the_strided_operand_without_it():
    assert strided_union_route("causal & (sliding(8) | strided(4))", 64, 64, False,
                               0.0) == StridedUnion(
        "causal & sliding(8)", "causal & strided(4) & ~(sliding(8))")
    assert strided_union_route("causal & (sliding(8) | sink(2) | strided(4))", 64, 64, False,
                               0.0) is None  # ~(sliding | sink) has no residue form
    assert strided_union_route("strided(4) | local(8)", 64, 64, False, 0.0) == StridedUnion(
        "local(8)", "strided(4) & ~(local(8))")


@pytest.mark.parametrize(
    "text, lq, lk, bias, dropout",
    [("axial(8, 2)", 64, 64, False, 0.0), ("axial(8) & block(16)", 64, 64, False, 0.0),
     ("axial(8) | sink(2)", 64, 64, False, 0.0), ("axial(8)", 60, 64, False, 0.0),
     ("axial(8)", 64, 64, True, 0.0), ("axial(8)", 64, 64, False, 0.1),
     ("sliding(8) | strided(4)", 62, 64, False, 0.0),  # lengths not multiples of s
     ("sliding(8) | strided(4) | strided(8)", 64, 64, False, 0.0),  # two strided operands
     ("block(16) | strided(4)", 64, 64, False, 0.0),  # ~block(16) has no residue form
     ("sliding(8) | strided(4)", 64, 64, True, 0.0)],
)
def test_route_is_not_taken_where_it_does_not_hold(text, lq, lk, bias, dropout):
    assert strided_union_route(text, lq, lk, bias, dropout) is None


# Each case in one input layout (not every case in both): the residue classes are then viewed
# by batch (contiguous, Hq == Hkv), by head (model layout, with and without GQA) or from a copy
# (contiguous with GQA; the backward's contiguous dout beside model-layout inputs), and the
# batch and head views each meet an axial pattern and a union with a window.
C, M = False, True  # contiguous, model layout ([B, L, H, D] storage)


@pytest.mark.parametrize(
    "text, lq, lk, hq, hkv, noncontiguous",
    [("axial(8)", 32, 32, 2, 2, C), ("causal & axial(8)", 32, 32, 2, 1, C),
     ("axial(4)", 16, 24, 4, 2, M), ("causal & axial(8)", 48, 32, 2, 2, M),
     ("causal & (sliding(6) | strided(4))", 32, 32, 2, 1, M),
     ("local(10) | strided(8)", 48, 64, 2, 2, C), ("axial(8) & sliding(20)", 32, 32, 2, 2, M),
     ("causal & (strided(4) | sliding(12))", 48, 32, 2, 2, M)],
    ids=lambda x: {False: "contiguous", True: "model-layout"}.get(x) if isinstance(x, bool)
    else None,
)
def test_two_part_route_matches_the_oracle(text, lq, lk, hq, hkv, noncontiguous):
    # Lq > Lk under causal leaves the first rows without keys: zeros, never NaN.
    assert strided_union_route(text, lq, lk, False, 0.0) is not None
    check_routed_case(text, lq, lk, hq, hkv, noncontiguous)


@pytest.mark.parametrize("text", ["axial(8)", "causal & (sliding(12) | strided(8))"])
def test_two_part_and_general_routes_agree(monkeypatch, text):
    check_route_matches_general(monkeypatch, "strided_union_route", text)


@pytest.mark.parametrize("text", ["axial(8)", "causal & (sliding(12) | strided(8))"])
def test_public_call_takes_the_route_in_bfloat16(monkeypatch, text):
    calls = count_calls(monkeypatch, kernels, "_union_forward")
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.bfloat16, noncontiguous=True)
    check_against_oracle(attention, q, k, v, text)
    assert calls


def test_merged_output_is_rounded_once(kernel_device):
    # The parts' outputs stay float32 until the merge: in bfloat16 the routed output is closer
    # to the oracle than a merge of parts already rounded to bfloat16.
    torch.manual_seed(0)
    text = "causal & (sliding(12) | strided(8))"
    q, k, v = make_qkv(2, 2, 2, 64, 64, 32, torch.bfloat16)  # the ratio is ~0.69 here
    ref = oracle(q, k, v, text, 0.2)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    parts = strided_union_route(text, 64, 64, False, 0.0)
    rounded_first, _ = merge_parts(*kernels.forward(qd, kd, vd, parts.main, 0.2),
                                   *kernels.forward(qd, kd, vd, parts.strided, 0.2))
    out, _ = kernels.forward(qd, kd, vd, text, 0.2)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 0.9 * rel_error(rounded_first, ref)


def test_the_residue_part_is_merged_and_summed_where_it_lies(monkeypatch):
    # No copy of the strided part back to row order: the merge and the gradient sum read its
    # class-ordered outputs in place (codegen/tl/merge.py).
    copies = count_calls(monkeypatch, kernels, "rows_of_grid")
    merges = count_calls(monkeypatch, kernels, "merge_parts")
    sums = count_calls(monkeypatch, kernels, "add_rows_")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, torch.float32)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = kernels.forward(qd, kd, vd, "axial(8)", 0.25)
    kernels.backward(torch.randn_like(out), qd, kd, vd, out, lse, "axial(8)", 0.25)
    assert not copies and len(merges) == 1 and len(sums) == 3


def test_the_union_writes_the_requested_output_dtype():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, torch.bfloat16)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    wide, _ = kernels.forward(qd, kd, vd, "axial(8)", 0.25, out_dtype=torch.float32)
    narrow, _ = kernels.forward(qd, kd, vd, "axial(8)", 0.25)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    # one rounding apart (the interpreter rounds bfloat16 stores toward zero, torch to nearest)
    assert torch.allclose(wide, narrow.float(), rtol=2 ** -7, atol=0)
