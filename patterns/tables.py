"""Compact CSR block tables: per row the listed columns, ascending, all rows in one flat array.

A table is offsets ``[n, rows + 1]`` into one flat int32 index array (heads after one another,
rows in order): memory is proportional to the listed blocks whatever the longest row. The
builders here work a bounded chunk of entries at a time and never build a padded
``[rows, longest row]`` intermediate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK = 1 << 22  # entries (or tiles) handled per step: bounds temporary memory
_FILL_CHUNK = 1 << 18  # entries per step of fill_segments (cache-sized buffers)

KindRows = Callable[[int, int, int], torch.Tensor]  # (head, r0, r1) -> uint8 [r1 - r0, cols]
Rows = tuple[torch.Tensor, torch.Tensor]  # one head: counts int64 [rows], indices int32 [e]


@dataclass(frozen=True)
class Csr:
    """Compact block table: row ``r`` of head ``h`` lists
    ``indices[offsets[h, r]:offsets[h, r + 1]]`` (ascending). ``offsets`` int32 ``[n, rows +
    1]`` (int64 past 2**31 entries), ``indices`` int32 ``[entries]``."""

    offsets: torch.Tensor
    indices: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Listed blocks per row, int32 ``[n, rows]``."""
        return (self.offsets[:, 1:] - self.offsets[:, :-1]).to(torch.int32)

    @property
    def entries(self) -> int:
        return self.indices.numel()

    def row_ids(self, head: int, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, columns)`` int64 of the entries of rows ``[r0, r1)`` of ``head``."""
        off = self.offsets[head, r0:r1 + 1].to(torch.int64)
        rows = torch.arange(r0, r1, dtype=torch.int64).repeat_interleave(off[1:] - off[:-1])
        return rows, self.indices[int(off[0]):int(off[-1])].to(torch.int64)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts int32 ``[n, rows]`` and indices int32 ``[n, rows, max(1, max count)]``
        (padding 0): the padded form, for inspection of small layouts only."""
        counts = self.counts
        n, rows = counts.shape
        width = max(1, int(counts.max()) if counts.numel() else 1)
        out = torch.zeros((n, rows, width), dtype=torch.int32)
        c = counts.to(torch.int64).flatten()
        row = torch.arange(n * rows, dtype=torch.int64).repeat_interleave(c)
        pos = torch.arange(c.sum()) - (torch.cumsum(c, 0) - c).repeat_interleave(c)
        out.view(n * rows, width)[row, pos] = self.indices
        return counts, out


def stack_heads(per_head: list[Rows]) -> Csr:
    """One :class:`Csr` from per-head ``(counts, indices)`` (same number of rows)."""
    counts = torch.stack([c.to(torch.int64) for c, _ in per_head])
    heads, rows = counts.shape
    ends = torch.cumsum(counts.flatten(), 0).reshape(heads, rows)
    starts = ends[:, :1] - counts[:, :1] if rows else torch.zeros((heads, 1), dtype=torch.int64)
    offsets = torch.cat([starts, ends], 1)
    parts = [i.to(torch.int32) for _, i in per_head]
    indices = parts[0] if len(parts) == 1 else torch.cat(parts)  # one head: no copy
    dtype = torch.int32 if indices.numel() < 2**31 else torch.int64
    return Csr(offsets.to(dtype), indices)


def fill_segments(out: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                  src: torch.Tensor, rad: torch.Tensor, y: torch.Tensor) -> None:
    """``out[start[s] + t] = rad[s] - y[src[s] + t]`` for ``t < length[s]`` (segments in
    order, covering ``out``): piecewise-constant values through int32 cumulative sums of
    their jumps, a chunk at a time (no per-entry segment lookup)."""
    keep = length > 0
    start, length, src, rad = start[keep], length[keep], src[keep], rad[keep]
    total = out.numel()
    if total == 0:
        return
    step = min(total, _FILL_CHUNK)
    ones, zeros = torch.ones(step, dtype=torch.int32), torch.zeros(step, dtype=torch.int32)
    d, r = torch.empty_like(ones), torch.empty_like(zeros)
    idx, val = torch.empty_like(ones), torch.empty_like(ones)
    for p0 in range(0, total, step):
        p1 = min(total, p0 + step)
        n = p1 - p0
        a = int(torch.searchsorted(start, p0, right=True)) - 1
        b = int(torch.searchsorted(start, p1))
        d[:n].copy_(ones[:n])
        r[:n].copy_(zeros[:n])
        d[0], r[0] = int(src[a]) + p0 - int(start[a]), int(rad[a])
        loc = start[a + 1:b] - p0
        d[loc] = (src[a + 1:b] - (src[a:b - 1] + length[a:b - 1] - 1)).to(torch.int32)
        r[loc] = (rad[a + 1:b] - rad[a:b - 1]).to(torch.int32)
        torch.cumsum(d[:n], 0, out=idx[:n])
        torch.index_select(y, 0, idx[:n], out=val[:n])
        torch.cumsum(r[:n], 0, out=d[:n])
        torch.sub(d[:n], val[:n], out=out[p0:p1])


def ranges_rows(starts: torch.Tensor, ends: torch.Tensor) -> Rows:
    """Rows listing the column ranges ``[starts, ends)`` (int64 ``[rows, m]``, disjoint and
    ascending within a row, empty when ``end <= start``)."""
    starts = starts.to(torch.int64)
    lengths = (ends.to(torch.int64) - starts).clamp(min=0)
    flat_len = lengths.flatten()
    ends_pos = torch.cumsum(flat_len, 0)
    out = torch.empty(int(ends_pos[-1]) if ends_pos.numel() else 0, dtype=torch.int32)
    # Entry t of range s is starts[s] + t = 0 - y[starts[s] + t] with y = -arange.
    cols = int(ends.max()) if ends.numel() else 0
    y = -torch.arange(max(cols, 1), dtype=torch.int32)
    fill_segments(out, ends_pos - flat_len, flat_len, starts.flatten(),
                  torch.zeros_like(flat_len), y)
    return lengths.sum(1), out


def kind_rows_tables(rows_of: KindRows, head: int, rows: int, cols: int) -> tuple[Rows, Rows]:
    """``(PARTIAL rows, FULL rows)`` of stored kinds, reading ``rows_of`` a chunk at a time."""
    step = max(1, CHUNK // max(1, cols))
    parts: dict[int, list] = {1: [], 2: []}
    for r0 in range(0, rows, step):
        chunk = rows_of(head, r0, min(rows, r0 + step))
        for kind, out in parts.items():
            m = chunk == kind
            out.append((m.sum(1, dtype=torch.int64), m.nonzero()[:, 1].to(torch.int32)))
    return tuple(_cat(parts[k], rows) for k in (1, 2))


def _cat(parts: list[Rows], rows: int) -> Rows:
    if not parts:
        return torch.zeros(rows, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)
    return torch.cat([c for c, _ in parts]), torch.cat([i for _, i in parts])


def transpose(table: Csr, cols: int) -> Csr:
    """The transposed table (for each column, the rows listing it, ascending); one stable sort
    of each head's entries by column."""
    heads = table.offsets.shape[0]
    rows = table.offsets.shape[1] - 1
    per_head = []
    for h in range(heads):
        row, col = table.row_ids(h, 0, rows)
        order = torch.argsort(col.to(torch.int32), stable=True)
        per_head.append((torch.bincount(col, minlength=cols), row[order].to(torch.int32)))
    return stack_heads(per_head)
