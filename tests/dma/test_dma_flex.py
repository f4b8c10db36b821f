"""FlexAttention inputs from DMA's selection: per-key row ranges equal the reference keep-mask
(ties included), and the BlockMask's partial/full tiles are exactly the tiles that mask touches
or fills."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.flex import dma_block_mask, dma_key_ranges
from sparse_compile.dynamic_mask.reference import allowed_mask, keep_mask


def _problem(b, h, lq, lk, keep, values, causal, seed, device):
    """delta, key_allowed and the reference keep-mask on ``device`` (values drawn on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randint(0, values, (b, h, lk), generator=gen, device="cpu").float().to(device)
    key_allowed = (torch.rand(b, lk, generator=gen, device="cpu") > 0.2).to(device)
    allowed = allowed_mask(lq, lk, causal, key_allowed[:, None, None, :])
    expected = keep_mask(delta, allowed, keep)  # [B, H, Lq, Lk]
    return delta, key_allowed, expected


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,h,lq,lk,keep,values", [(2, 2, 45, 45, 7, 3), (1, 2, 30, 41, 5, 1000),
                                                   (1, 1, 40, 40, 1, 2), (1, 1, 20, 20, 30, 4)])
def test_key_ranges_equal_reference(b, h, lq, lk, keep, values, causal, kernel_device):
    delta, key_allowed, expected = _problem(b, h, lq, lk, keep, values, causal, lq + keep,
                                            kernel_device)
    start, end = dma_key_ranges(delta, key_allowed, lq, keep, causal)
    rows = torch.arange(lq)[None, :, None]
    got = (rows >= start[:, None, :]) & (rows < end[:, None, :])
    assert torch.equal(got, expected.reshape(b * h, lq, lk))


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_tiles(causal, kernel_device):
    b, hkv, group, lq, lk, keep, block = 2, 2, 2, 70, 70, 9, 16
    delta, key_allowed, expected = _problem(b, hkv, lq, lk, keep, 4, causal, 3, kernel_device)
    start, end = dma_key_ranges(delta, key_allowed, lq, keep, causal)
    mask = dma_block_mask(start, end, b, hkv * group, lq, block)
    nq, nk = -(-lq // block), -(-lk // block)
    padded = torch.zeros(b, hkv, nq * block, nk * block, dtype=torch.bool)
    padded[..., :lq, :lk] = expected
    tiles = padded.view(b, hkv, nq, block, nk, block)
    any_kept = tiles.any(5).any(3).repeat_interleave(group, dim=1)
    # full: every existing entry of the tile kept (rows past lq do not exist)
    real = torch.zeros_like(padded)
    real[..., :lq, :] = True
    all_kept = (padded | ~real).view(b, hkv, nq, block, nk, block).all(5).all(3)
    all_kept &= torch.arange(nk * block).view(nk, block).lt(lk).all(-1)  # whole key blocks only
    all_kept = all_kept.repeat_interleave(group, dim=1)

    def dense(count, idx):
        out = torch.zeros(b, hkv * group, nq, nk, dtype=torch.bool)
        for i in range(nk):
            out |= torch.nn.functional.one_hot(idx[..., i].long(), nk).bool() & (
                count[..., None] > i)
        return out

    full = dense(mask.full_kv_num_blocks, mask.full_kv_indices)
    partial = dense(mask.kv_num_blocks, mask.kv_indices)
    assert torch.equal(full, all_kept)
    assert torch.equal(partial | full, any_kept)
    assert not (partial & full).any()
    # the mask_mod on every entry is the keep-mask, per query head
    qi, ki = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    for bb in range(b):
        for hh in range(hkv * group):
            got = mask.mask_mod(torch.tensor(bb), torch.tensor(hh), qi, ki)
            assert torch.equal(got, expected[bb, hh // group])
