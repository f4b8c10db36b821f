"""The exchange plan and its figures against what the layout needs, and the errors of bad
input (one process, no kernels)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.patterns import parse

from sparse_compile.distributed import (
    Sharding,
    ShardingError,
    UnsupportedPatternError,
    communication_report,
    exchange_plan,
)


def _needed_by_brute_force(pattern: str, length: int, sharding: Sharding, rank: int
                           ) -> torch.Tensor:
    """bool [L]: keys some query of ``rank`` keeps, from the dense mask."""
    mask = parse(pattern).mask(length, length, heads=2 if parse(pattern).per_head else None)
    mask = mask.any(0) if mask.dim() == 3 else mask
    rows = sharding.positions(length, rank)
    return mask[rows].any(0)


@pytest.mark.parametrize("pattern", ["causal", "causal & sliding(40)", "sink(3) | sliding(10)",
                                     "block(48)", "dense", "causal & strided(7)",
                                     "heads(causal, local(20))", "global(5) | local(9)"])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_plan_receives_exactly_the_kept_keys_a_rank_lacks(pattern, kind):
    length, sharding = 192, Sharding(kind, 3)
    plan = exchange_plan(pattern, length, sharding)
    owner = sharding.owner(length)
    for rank in range(3):
        need = _needed_by_brute_force(pattern, length, sharding, rank)
        for source in range(3):
            got = torch.zeros(length, dtype=torch.bool)
            for a, b in plan.recv[rank][source]:
                got[a:b] = True
            want = need & (owner == source) if source != rank else torch.zeros_like(need)
            assert torch.equal(got, want), (rank, source)
        attended = torch.zeros(length, dtype=torch.bool)
        for runs in plan.runs[rank]:
            for a, b in runs:
                attended[a:b] = True
        assert torch.equal(attended, need)


def test_sliding_window_on_contiguous_shards_receives_one_neighbours_halo():
    length, window, world = 8192, 1024, 4
    report = communication_report("causal & sliding(1024)", length, Sharding("contiguous", world),
                                  kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    row = 2 * 8 * 128 * 2
    plan = exchange_plan(report.pattern, length, report.sharding)
    for r in report.ranks:
        halo = 0 if r.rank == 0 else window - 1  # keys q - w < k of the shard's first query
        assert r.keys_received == halo
        assert r.forward_bytes == r.backward_kv_bytes == halo * row
        assert r.backward_grad_bytes == (0 if r.rank == world - 1 else (window - 1) * row)
        assert r.all_gather_bytes == (length - length // world) * row
        if r.rank:
            shard = length // world
            assert plan.recv[r.rank][r.rank - 1] == ((r.rank * shard - halo, r.rank * shard),)
    assert "all-gather fwd" in str(report)


def test_zigzag_sliding_window_receives_the_halo_of_each_query_chunk():
    length, world, window = 4096, 4, 100
    chunk = length // (2 * world)
    sharding = Sharding("zigzag", world)
    plan = exchange_plan("causal & sliding(100)", length, sharding)
    owner = sharding.owner(length)
    for rank in range(world):
        starts = [rank * chunk, (2 * world - 1 - rank) * chunk]
        # The halo of each chunk, unless the rank holds it (its two chunks meet in the middle).
        halos = [(s - window + 1, s) for s in starts if s > 0 and owner[s - 1] != rank]
        got = sorted(r for source in plan.recv[rank] for r in source)
        assert got == halos
        assert plan.keys_received(rank) == sum(b - a for a, b in halos)


def test_causal_zigzag_balances_the_work():
    plan = exchange_plan("causal", 1024, Sharding("zigzag", 4))
    work = [plan.attended_pairs(r) for r in range(4)]
    assert max(work) - min(work) <= 1024 // 8 * 1024 // 8


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ShardingError, match="multiple of 8"):
        exchange_plan("causal", 100, Sharding("zigzag", 4))
    with pytest.raises(ShardingError, match="sharding must be one of"):
        Sharding("striped", 2)
    with pytest.raises(UnsupportedPatternError, match="dma"):
        exchange_plan("dma(16) & causal", 64, Sharding("contiguous", 2))
    x = torch.arange(12).reshape(1, 12)
    sharding = Sharding("zigzag", 3)
    parts = [sharding.shard(x, r) for r in range(3)]
    assert torch.equal(parts[0], torch.tensor([[0, 1, 10, 11]]))
    assert torch.equal(sharding.unshard(parts), x)
