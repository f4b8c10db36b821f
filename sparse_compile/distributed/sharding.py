"""How a sequence is split over the ranks of a context-parallel group, and put back together.

* ``contiguous``: rank ``r`` of ``W`` holds tokens ``[r·L/W, (r+1)·L/W)``. Banded patterns
  (``causal & sliding(w)``, ``local(w)``) then need only a halo of each neighbour's keys.
* ``zigzag`` (load-balanced): the sequence is cut into ``2·W`` chunks and rank ``r`` holds
  chunks ``r`` and ``2·W − 1 − r``, so under ``causal`` every rank has the same number of kept
  (query, key) pairs (ring attention's and PyTorch context parallelism's load balancing).

A rank's tokens are its chunks concatenated in order; ``Sharding.ranges`` says where each
chunk sits in the full sequence, which is where the attention places its queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("contiguous", "zigzag")


class ShardingError(ValueError):
    """A sequence that cannot be split the way the sharding asks (length, dims, kind)."""


@dataclass(frozen=True)
class Sharding:
    """A split of a length-``L`` sequence over ``world`` ranks (``kind`` in ``KINDS``)."""

    kind: str
    world: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ShardingError(f"sharding must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.world, int) or self.world < 1:
            raise ShardingError(f"world size must be a positive int, got {self.world!r}")

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    def check(self, length: int) -> int:
        """The chunk length for a sequence of ``length`` tokens; raises ``ShardingError`` when
        ``length`` is not a multiple of the number of chunks (``W`` or ``2·W``)."""
        n = self.world * self.chunks_per_rank
        if length <= 0 or length % n:
            raise ShardingError(
                f"{self.kind} sharding over {self.world} ranks cuts the sequence into {n} equal "
                f"chunks: its length must be a positive multiple of {n}, got {length}")
        return length // n

    def ranges(self, length: int, rank: int) -> tuple[tuple[int, int], ...]:
        """The ``[start, end)`` ranges of the full sequence that ``rank`` holds, in the order its
        local tokens are stored."""
        chunk = self.check(length)
        if not 0 <= rank < self.world:
            raise ShardingError(f"rank {rank} outside a group of {self.world}")
        if self.kind == "contiguous":
            return ((rank * chunk, (rank + 1) * chunk),)
        last = 2 * self.world - 1 - rank
        return ((rank * chunk, (rank + 1) * chunk), (last * chunk, (last + 1) * chunk))

    def positions(self, length: int, rank: int) -> torch.Tensor:
        """int64 ``[L / W]``: the position in the full sequence of each local token."""
        return torch.cat([torch.arange(a, b) for a, b in self.ranges(length, rank)])

    def owner(self, length: int) -> torch.Tensor:
        """int64 ``[L]``: the rank holding each token of the full sequence."""
        owner = torch.empty(length, dtype=torch.int64)
        for rank in range(self.world):
            for a, b in self.ranges(length, rank):
                owner[a:b] = rank
        return owner

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """``rank``'s part of ``x`` (the full sequence along ``dim``), contiguous."""
        length = x.shape[dim]
        parts = [x.narrow(dim, a, b - a) for a, b in self.ranges(length, rank)]
        return torch.cat(parts, dim=dim).contiguous()

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's part (``parts[r]`` from rank ``r``)."""
        if len(parts) != self.world:
            raise ShardingError(f"unshard needs {self.world} parts, got {len(parts)}")
        local = parts[0].shape[dim]
        length = local * self.world
        self.check(length)
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, part in enumerate(parts):
            offset = 0
            for a, b in self.ranges(length, rank):
                pieces.append((a, part.narrow(dim, offset, b - a)))
                offset += b - a
        return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=dim)


def default_sharding(pattern_text: str, world: int) -> Sharding:
    """``contiguous`` for banded patterns (``sliding``, ``window``, ``local``, ``block``:
    contiguous shards need only a neighbour's halo, and every rank has the same work),
    ``zigzag`` otherwise: a causal language model's own mask makes even ``dense`` causal,
    whose work grows along the sequence, so contiguous shards would leave every rank waiting
    for the last."""
    from sparse_compile.patterns import parse
    from sparse_compile.patterns.primitives import Block, Local, Sliding, Window

    banded = any(isinstance(n, Sliding | Window | Local | Block)
                 for n in parse(pattern_text).walk())
    return Sharding("contiguous" if banded else "zigzag", world)
