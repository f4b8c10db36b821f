"""The device selection: per-row thresholds reproduce the reference keep-mask exactly, and every
query block's gather list covers its kept keys within ``keep + BLOCK_M - 1`` entries."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen.tl.dma.select import dma_select, selection_rank_order

from sparse_compile.dynamic_mask.reference import allowed_mask, keep_mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b,h,lq,lk,keep,values",
    [(2, 2, 37, 45, 7, 5), (1, 1, 50, 50, 1, 2), (1, 2, 20, 20, 30, 3), (1, 1, 70, 70, 16, 1000)],
)
def test_selection_equals_reference(b, h, lq, lk, keep, values, causal, kernel_device):
    gen = torch.Generator().manual_seed(lq + keep)
    delta = torch.randint(0, values, (b, h, lk), generator=gen, device="cpu").float()
    key_allowed = torch.rand(b, lk, generator=gen, device="cpu") > 0.2
    delta, key_allowed = delta.to(kernel_device), key_allowed.to(kernel_device)
    block_m = 16
    sel = dma_select(delta, key_allowed, lq, keep, causal, block_m, block_r=8)
    allowed = allowed_mask(lq, lk, causal, key_allowed[:, None, None, :])
    expected = keep_mask(delta, allowed, keep).reshape(b * h, lq, lk)

    order, _ = selection_rank_order(delta, key_allowed)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(lk, dtype=order.dtype).expand_as(order)
    )
    got = (rank[:, None, :] <= sel.thr[:, :, None]) & allowed.expand(b, h, lq, lk).reshape(
        b * h, lq, lk
    )
    assert torch.equal(got, expected)
    # row shift: the largest delta among the row's kept keys, 0 for rows with none
    kept_delta = torch.where(expected, delta.reshape(b * h, 1, lk), float("-inf")).amax(-1)
    assert torch.equal(sel.shift, torch.where(expected.any(-1), kept_delta, 0.0))

    for bh in range(b * h):
        for block in range(sel.gather_count.shape[1]):
            count = int(sel.gather_count[bh, block])
            listed = sel.gather_key[bh, block, :count]
            assert count <= keep + block_m - 1
            assert len(set(listed.tolist())) == count
            rows = expected[bh, block * block_m : (block + 1) * block_m]
            needed = set(rows.any(0).nonzero().flatten().tolist())
            assert needed <= set(listed.tolist())
            assert torch.equal(sel.gather_rank[bh, block, :count], rank[bh, listed.long()].int())
            # the leading full_count entries are kept by every row of the block
            full = int(sel.full_count[bh, block])
            assert 0 <= full <= count
            assert rows[:, listed[:full].long()].all()
