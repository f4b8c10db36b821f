"""Checks of a layout against the dense mask, shared by the layout tests."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
import torch


def kinds_from_mask(mask: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Tile kinds computed the obvious way from a dense mask [..., lq, lk]."""
    lq, lk = mask.shape[-2:]
    nq, nk = -(-lq // bm), -(-lk // bn)
    out = torch.empty(mask.shape[:-2] + (nq, nk), dtype=torch.uint8)
    for i in range(nq):
        for j in range(nk):
            tile = mask[..., i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            some = tile.flatten(-2).any(-1)
            every = tile.flatten(-2).all(-1)
            out[..., i, j] = torch.where(every, 2, torch.where(some, 1, 0)).to(torch.uint8)
    return out


def check_tables(layout: P.Layout, kinds: torch.Tensor) -> None:
    """The CSR tables list exactly the PARTIAL / FULL tiles, ascending, padding 0."""
    kinds = kinds if kinds.dim() == 3 else kinds[None]
    n, nq, nk = kinds.shape
    tables = [
        (layout.kv_partial_counts, layout.kv_partial_indices, kinds, 1),
        (layout.kv_full_counts, layout.kv_full_indices, kinds, 2),
        (layout.q_partial_counts, layout.q_partial_indices, kinds.transpose(1, 2), 1),
        (layout.q_full_counts, layout.q_full_indices, kinds.transpose(1, 2), 2),
    ]
    for counts, indices, k, kind in tables:
        assert counts.dtype == indices.dtype == torch.int32
        assert counts.shape == k.shape[:2] and indices.shape[:2] == k.shape[:2]
        assert indices.shape[2] == max(1, int(counts.max()) if counts.numel() else 1)
        for h in range(k.shape[0]):
            for r in range(k.shape[1]):
                want = (k[h, r] == kind).nonzero().flatten()
                c = int(counts[h, r])
                assert c == want.numel()
                assert indices[h, r, :c].tolist() == want.tolist()
                assert not indices[h, r, c:].any()


def expected_compact(kinds: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[n, rows + 1]`` and flat indices of the tiles of ``kind`` in ``kinds [n, rows,
    cols]``, listed the obvious way (row-major nonzero)."""
    hit = kinds == kind
    counts = hit.sum(-1).flatten()
    ends = torch.cumsum(counts, 0).reshape(hit.shape[:2])
    offsets = torch.cat([ends[:, :1] - hit[:, :1].sum(-1), ends], 1)
    return offsets, hit.nonzero()[:, 2]


def check_compact(layout: P.Layout, kinds: torch.Tensor) -> None:
    """The compact tables (offsets + flat int32 indices) list exactly the PARTIAL / FULL tiles,
    forward and transposed, with nothing else stored."""
    kinds = kinds if kinds.dim() == 3 else kinds[None]
    for table, grid, kind in ((layout.kv_partial, kinds, 1), (layout.kv_full, kinds, 2),
                              (layout.q_partial, kinds.transpose(1, 2), 1),
                              (layout.q_full, kinds.transpose(1, 2), 2)):
        offsets, indices = expected_compact(grid, kind)
        assert table.offsets.dtype == table.indices.dtype == torch.int32
        assert torch.equal(table.offsets.long(), offsets)
        assert torch.equal(table.indices.long(), indices)


def check_layout(p: P.Pattern, lq: int, lk: int, bm: int, bn: int) -> None:
    layout = p.layout(lq, lk, bm, bn)
    mask = p.mask(lq, lk)
    expected = kinds_from_mask(mask, bm, bn)
    assert layout.kinds.shape == expected.shape
    assert torch.equal(layout.kinds, expected), f"{p} lq={lq} lk={lk} {bm}x{bn}"
    assert layout.density == pytest.approx(mask.double().mean().item() if mask.numel() else 0)
    tiles = expected.numel()
    assert layout.block_density == pytest.approx((expected > 0).sum().item() / tiles)
    assert layout.num_heads == p.num_heads
    if layout.is_interval:
        k = expected if expected.dim() == 3 else expected[None]
        j = torch.arange(k.shape[-1])
        inside = (j >= layout.kv_start[..., None]) & (j < layout.kv_end[..., None])
        full = (j >= layout.kv_full_start[..., None]) & (j < layout.kv_full_end[..., None])
        assert not (k[~inside] > 0).any()
        assert torch.equal(full, k == 2)
    check_tables(layout, expected)
    check_compact(layout, expected)
