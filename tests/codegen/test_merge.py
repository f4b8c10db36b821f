"""The merge of two partial attentions by log-sum-exp (codegen/tl/merge.py), under the
interpreter on the CPU (the GPU where there is one)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen.tl.merge import add_rows_, merge_parts


def merged_in_float64(out_a, lse_a, out_b, lse_b):
    """The merge from its definition: softmax weights 2^lse of the two parts, float64."""
    la, lb = (torch.where(torch.isposinf(x), float("-inf"), x).double() for x in (lse_a, lse_b))
    lse = torch.logaddexp2(la, lb)
    none = torch.isneginf(lse)
    wa = torch.where(none, 0.0, torch.exp2(la - lse))
    wb = torch.where(none, 0.0, torch.exp2(lb - lse))
    out = out_a.double() * wa[..., None] + out_b.double() * wb[..., None]
    return out, torch.where(none, float("inf"), lse)


def test_merging_with_an_empty_part_keeps_the_other_and_two_empty_give_zeros():
    out_a, out_b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    lse_a, lse_b = torch.randn(2, 3, 5), torch.full((2, 3, 5), float("inf"))
    lse_b[0, 0, 0] = 0.5
    lse_a[0, 0, 1] = float("inf")
    out, lse = merge_parts(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[1], out_a[1]) and torch.equal(lse[1], lse_a[1])
    both = merge_parts(out_a, torch.full_like(lse_a, float("inf")), out_b, lse_b.clone().fill_(
        float("inf")))
    assert torch.equal(both[0], torch.zeros_like(out_a)) and torch.isposinf(both[1]).all()
    # Two live parts: probabilities 2^lse_a : 2^lse_b.
    w = 2.0 ** lse_a[0, 0, 0] / (2.0 ** lse_a[0, 0, 0] + 2.0 ** 0.5)
    want = w * out_a[0, 0, 0] + (1 - w) * out_b[0, 0, 0]
    assert torch.allclose(out[0, 0, 0], want, atol=1e-6)
    assert torch.allclose(lse[0, 0, 0], torch.log2(2.0 ** lse_a[0, 0, 0] + 2.0 ** 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_part_in_another_row_order_is_read_in_place(dtype):
    # The strided part arrives as a [B, H, L/s, s, D] view of class-ordered rows.
    b, h, n, s, d = 2, 3, 5, 4, 24  # D not a power of two: masked lanes
    out_a = torch.randn(b, h, n, s, d)
    lse_a = torch.randn(b, h, n, s)
    classes = torch.randn(b, h, s, n, d)
    lse_classes = torch.randn(b, h, s, n) + 1.0
    lse_classes[0, 1, 2, 3] = float("inf")  # a row with no key in the strided part
    out_b, lse_b = classes.transpose(2, 3), lse_classes.transpose(2, 3)
    out, lse = merge_parts(out_a, lse_a, out_b, lse_b, dtype)
    want, want_lse = merged_in_float64(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == out_a.shape
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert torch.allclose(out.double(), want, atol=tol, rtol=tol)
    assert torch.allclose(lse.double(), want_lse, atol=1e-6)
    # the row with no strided key is part a's row (exactly, before rounding)
    kept = out_a[0, 1, 3, 2]
    assert torch.allclose(out[0, 1, 3, 2].float(), kept, atol=0, rtol=tol)
    if dtype == torch.float32:
        assert torch.equal(out[0, 1, 3, 2], kept)


def test_parts_of_different_shapes_or_too_many_dims_are_refused():
    out, lse = torch.randn(2, 5, 8), torch.randn(2, 5)
    with pytest.raises(ValueError, match="differ"):
        merge_parts(out, lse, torch.randn(2, 6, 8), torch.randn(2, 6))
    wide, wide_lse = torch.randn(1, 2, 1, 2, 1, 8), torch.randn(1, 2, 1, 2, 1)
    with pytest.raises(ValueError, match="1 to 4 row dims"):
        merge_parts(wide, wide_lse, wide, wide_lse)
    with pytest.raises(ValueError, match="1 to 4 row dims"):
        add_rows_(wide, wide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_in_another_order_are_added_in_place(dtype):
    b, h, n, s, d = 2, 3, 5, 4, 40
    dst = torch.randn(b, h, n * s, d).to(dtype)
    before = dst.clone()
    classes = torch.randn(b, h, s, n, d).to(dtype)
    got = add_rows_(dst.view(b, h, n, s, d), classes.transpose(2, 3))
    want = before.float() + classes.transpose(2, 3).reshape(b, h, n * s, d).float()
    assert got.data_ptr() == dst.data_ptr()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert torch.allclose(dst.float(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="differ"):
        add_rows_(dst, classes)
