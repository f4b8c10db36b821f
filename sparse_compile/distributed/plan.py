"""Which keys each rank needs from which rank, read off the pattern's exact block layout.

A rank's queries (its chunks of the sequence, ``sharding.py``) attend only the keys the pattern
keeps for them. From the layout of the full ``L x L`` pattern in ``tile x tile`` blocks, a
FULL block needs all its keys and a PARTIAL one the keys some of its rows keep (the predicate
evaluated on that block only); EMPTY blocks need nothing. So the need is exact to the key:
under ``causal & sliding(w)`` with contiguous shards longer than ``w``, a rank needs the last
``w − 1`` keys of its left neighbour; under ``sink(n) | ...`` every rank needs the first ``n``
keys; a dense row needs everything. The cost is one pass over the rank's rows of the layout
plus ``tile²`` evaluations per PARTIAL block.

Per forward a rank receives K and V of the keys it needs and does not hold; per backward it
receives them again (the backward recomputes from K/V rather than keep a gathered copy per
layer alive) and receives the dK/dV of its own keys that other ranks attended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparse_compile.distributed.sharding import Sharding

Runs = tuple[tuple[int, int], ...]

_EVALUATED_TILES = 256  # PARTIAL blocks evaluated per batch (tile² booleans each)


class UnsupportedPatternError(ValueError):
    """A pattern whose kept keys are not known before the data (``dma``, ``topk``)."""


@dataclass(frozen=True)
class ExchangePlan:
    """The keys every rank attends and receives, for one pattern, length and sharding.

    ``runs[r][c]``: the maximal ranges ``[start, end)`` of key positions that query chunk ``c``
    of rank ``r`` attends (one call of the attention op each, merged by log-sum-exp);
    ``recv[r][s]``: the key ranges rank ``r`` receives from rank ``s`` (empty for ``s == r``);
    ``held[r]``: the key positions rank ``r`` holds after the exchange, ascending: its own keys
    and the received ones (the gathered K/V buffer, ``exchange.py``).
    """

    pattern: str
    length: int
    sharding: Sharding
    runs: tuple[tuple[Runs, ...], ...]
    recv: tuple[tuple[Runs, ...], ...]

    @property
    def world(self) -> int:
        return self.sharding.world

    def keys_received(self, rank: int) -> int:
        """How many keys ``rank`` receives (K and V each) per forward."""
        return sum(b - a for s in range(self.world) for a, b in self.recv[rank][s])

    def keys_sent(self, rank: int) -> int:
        """How many of ``rank``'s keys other ranks receive; per backward ``rank`` receives as
        many dK and dV rows back."""
        return sum(b - a for r in range(self.world) for a, b in self.recv[r][rank])

    def held(self, rank: int) -> torch.Tensor:
        """int64 ``[G]``: positions of the keys ``rank`` holds after the exchange, ascending."""
        own = self.sharding.positions(self.length, rank)
        received = [torch.arange(a, b) for s in range(self.world) for a, b in self.recv[rank][s]]
        return torch.cat([own, *received]).sort().values

    def attended_pairs(self, rank: int) -> int:
        """Query-key pairs inside the ranges ``rank``'s attention calls visit (a bound on its
        work: the calls skip EMPTY blocks inside a range)."""
        size = self.length // (self.world * self.sharding.chunks_per_rank)
        return sum(size * (b - a) for chunk in self.runs[rank] for a, b in chunk)


def exchange_plan(pattern: str, length: int, sharding: Sharding) -> ExchangePlan:
    """The plan of ``pattern`` (canonical DSL text) over ``length`` tokens split by
    ``sharding``; cached. Raises ``UnsupportedPatternError`` for dynamic patterns and
    ``ShardingError`` for a length the sharding cannot split."""
    return _plan(pattern, length, sharding)


@lru_cache(maxsize=64)
def _plan(text: str, length: int, sharding: Sharding) -> ExchangePlan:
    from sparse_compile.patterns import parse

    pattern = parse(text)
    if pattern.is_dynamic:
        raise UnsupportedPatternError(
            f"context parallelism needs the kept keys before the data, but {text!r} chooses "
            "them from the data (dma / topk): run it without context parallelism")
    chunk = sharding.check(length)
    tile = math.gcd(chunk, 64)
    layout = pattern.layout(length, length, tile, tile)
    owner = sharding.owner(length)
    runs, recv = [], []
    for rank in range(sharding.world):
        chunks = sharding.ranges(length, rank)
        needs = [_needed_keys(pattern, layout, a, b, tile) for a, b in chunks]
        runs.append(tuple(_runs(need) for need in needs))
        union = torch.stack(needs).any(0)
        recv.append(tuple(() if s == rank else _runs(union & (owner == s))
                          for s in range(sharding.world)))
    return ExchangePlan(text, length, sharding, tuple(runs), tuple(recv))


def _needed_keys(pattern, layout, a: int, b: int, tile: int) -> torch.Tensor:
    """bool ``[L]``: the keys some query in ``[a, b)`` keeps (any head), exactly."""
    from sparse_compile.patterns.layout import FULL, PARTIAL

    length = layout.lk
    need = torch.zeros(layout.nk, tile, dtype=torch.bool)
    cols = torch.arange(tile)
    for head in range(layout.num_heads):
        kinds = layout.kind_rows(head, a // tile, b // tile)  # [q-blocks, k-blocks]
        need[(kinds == FULL).any(0)] = True
        qb, kb = (kinds == PARTIAL).nonzero(as_tuple=True)
        h = torch.tensor(head) if pattern.per_head else None
        for s in range(0, qb.numel(), _EVALUATED_TILES):
            q0 = (qb[s:s + _EVALUATED_TILES] + a // tile) * tile
            k0 = kb[s:s + _EVALUATED_TILES] * tile
            keep = pattern.evaluate((q0[:, None] + cols)[:, :, None],
                                    (k0[:, None] + cols)[:, None, :], h)  # [n, tile, tile]
            hit = torch.zeros(layout.nk, tile, dtype=torch.int32)
            hit.index_add_(0, kb[s:s + _EVALUATED_TILES], keep.any(1).to(torch.int32))
            need |= hit > 0
    return need.reshape(-1)[:length]


def _runs(mask: torch.Tensor) -> Runs:
    """The maximal ``[start, end)`` ranges of True in a bool vector."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8),
                        torch.zeros(1, dtype=torch.int8)])
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return tuple(zip(starts, ends, strict=True))
