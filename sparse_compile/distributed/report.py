"""Communication figures of context parallelism: bytes each rank receives per attention call.

Per forward a rank receives the K and V rows of the keys it needs and does not hold; per
backward it receives them again (the backward gathers K/V anew instead of keeping a gathered
copy per layer alive) plus the dK/dV rows of its own keys that other ranks attended. The
figures come from the plan (``plan.py``) and are what the collectives carry (the tests count
them); ``all_gather_bytes`` is what a dense exchange (all keys to all ranks, as ring attention
and PyTorch's context parallelism move) would receive per forward, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_compile.distributed.plan import exchange_plan
from sparse_compile.distributed.sharding import Sharding


@dataclass(frozen=True)
class RankTraffic:
    """One rank's figures (bytes) per attention call."""

    rank: int
    keys_received: int
    forward_bytes: int
    backward_kv_bytes: int
    backward_grad_bytes: int
    all_gather_bytes: int


@dataclass(frozen=True)
class CommunicationReport:
    """Per-rank figures of one pattern, length and sharding; ``str`` prints a table."""

    pattern: str
    length: int
    sharding: Sharding
    row_bytes: int
    ranks: tuple[RankTraffic, ...]

    def __str__(self) -> str:
        head = (f"{self.pattern}: {self.length} tokens, {self.sharding.kind} over "
                f"{self.sharding.world} ranks, {self.row_bytes} bytes per key (K+V)")
        cols = ("rank", "keys in", "fwd K/V", "bwd K/V", "bwd dK/dV", "all-gather fwd")
        rows = [(str(r.rank), str(r.keys_received), _mib(r.forward_bytes),
                 _mib(r.backward_kv_bytes), _mib(r.backward_grad_bytes),
                 _mib(r.all_gather_bytes)) for r in self.ranks]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True))
                  for row in rows]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def communication_report(pattern: str, length: int, sharding: Sharding, *, batch: int = 1,
                         kv_heads: int = 1, head_dim: int = 128,
                         dtype: torch.dtype = torch.bfloat16) -> CommunicationReport:
    """The figures of ``pattern`` (DSL text) for K/V ``[batch, kv_heads, length, head_dim]``
    of ``dtype`` split by ``sharding``."""
    from sparse_compile.functional import _pattern_text

    text = _pattern_text(pattern)
    plan = exchange_plan(text, length, sharding)
    row = 2 * batch * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    local = length // sharding.world
    ranks = tuple(
        RankTraffic(r, plan.keys_received(r), plan.keys_received(r) * row,
                    plan.keys_received(r) * row, plan.keys_sent(r) * row,
                    (length - local) * row)
        for r in range(sharding.world))
    return CommunicationReport(text, length, sharding, row, ranks)
