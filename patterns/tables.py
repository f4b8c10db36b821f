"""CSR block tables (counts + ascending indices, padding 0) from kind rows, in bounded memory."""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK = 1 << 22  # tiles handled per step: bounds temporary memory

KindRows = Callable[[int, int, int], torch.Tensor]  # (head, r0, r1) -> uint8 [r1 - r0, cols]


def csr_from_rows(
    rows_of: KindRows, heads: int, rows: int, cols: int, kind: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``[heads, rows]`` and indices int32 ``[heads, rows, max(1, max count)]`` of
    the columns whose kind is ``kind``, reading ``rows_of`` a chunk of rows at a time."""
    step = max(1, CHUNK // max(1, cols))
    counts = torch.zeros((heads, rows), dtype=torch.int32)
    chunks: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []
    for h in range(heads):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            m = rows_of(h, r0, r1) == kind
            counts[h, r0:r1] = m.sum(1, dtype=torch.int32)
            r, c = m.nonzero(as_tuple=True)
            chunks.append((h, r0, r1, r, c))
    width = max(1, int(counts.max()) if counts.numel() else 1)
    indices = torch.zeros((heads, rows, width), dtype=torch.int32)
    for h, r0, _, r, c in chunks:
        if r.numel() == 0:
            continue
        per_row = counts[h, r0:].to(torch.int64)
        first = torch.cumsum(per_row, 0) - per_row
        pos = torch.arange(r.numel()) - first[r]
        indices[h, r0 + r, pos] = c.to(torch.int32)
    return counts, indices


def csr_from_ranges(
    start: torch.Tensor, end: torch.Tensor, skip_start: torch.Tensor | None = None,
    skip_end: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows listing ``[start, end)`` minus ``[skip_start, skip_end)`` (all ``[heads, rows]``
    int tensors, the skipped range inside the listed one or empty)."""
    start, end = start.to(torch.int64), end.to(torch.int64)
    length = (end - start).clamp(min=0)
    if skip_start is None:
        first_len, second_start = length, end
    else:
        ss, se = skip_start.to(torch.int64), skip_end.to(torch.int64)
        has_skip = se > ss
        first_len = torch.where(has_skip, ss - start, length)
        second_start = torch.where(has_skip, se, end)
        length = torch.where(has_skip, length - (se - ss), length)
    width = max(1, int(length.max()) if length.numel() else 1)
    p = torch.arange(width)
    idx = torch.where(p < first_len[..., None], start[..., None] + p,
                      second_start[..., None] + p - first_len[..., None])
    idx = torch.where(p < length[..., None], idx, 0)
    return length.to(torch.int32), idx.to(torch.int32)


def transpose_csr(
    counts: torch.Tensor, indices: torch.Tensor, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed tables: for each column, the rows listing it (ascending).

    ``counts [heads, rows]``, ``indices [heads, rows, w]`` -> ``[heads, cols]``,
    ``[heads, cols, max(1, max count)]``; cost O(number of listed entries).
    """
    heads, rows = counts.shape
    per_head = []
    for h in range(heads):
        c = counts[h].to(torch.int64)
        valid = torch.arange(indices.shape[-1]) < c[:, None]
        col = indices[h][valid].to(torch.int64)  # row-major, so rows ascend within a column
        row = torch.arange(rows).repeat_interleave(c)
        order = torch.argsort(col, stable=True)
        col, row = col[order], row[order]
        tcounts = torch.bincount(col, minlength=cols)
        per_head.append((tcounts, col, row))
    width = max([1] + [int(t.max()) for t, _, _ in per_head if t.numel()])
    t_counts = torch.zeros((heads, cols), dtype=torch.int32)
    t_idx = torch.zeros((heads, cols, width), dtype=torch.int32)
    for h, (tcounts, col, row) in enumerate(per_head):
        t_counts[h] = tcounts.to(torch.int32)
        first = torch.cumsum(tcounts, 0) - tcounts
        pos = torch.arange(col.numel()) - first[col]
        t_idx[h, col, pos] = row.to(torch.int32)
    return t_counts, t_idx


def compact_csr(counts: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact form of padded tables: offsets int32 ``[heads, rows + 1]`` into one flat index
    array int32 ``[entries]`` (heads after one another, rows in order, each row ascending).

    Row ``r`` of head ``h`` lists ``indices[offsets[h, r]:offsets[h, r + 1]]``; memory is
    O(entries) whatever the longest row (padded tables cost rows x longest row)."""
    heads, rows = counts.shape
    c = counts.to(torch.int64)
    valid = torch.arange(indices.shape[-1], device=c.device) < c[..., None]
    flat = indices[valid].to(torch.int32)
    ends = torch.cumsum(c.flatten(), 0).reshape(heads, rows)
    offsets = (torch.cat([ends[:, :1] - c[:, :1], ends], 1) if rows
               else torch.zeros((heads, 1), device=c.device))
    return offsets.to(torch.int32), flat


def transpose_compact(
    offsets: torch.Tensor, indices: torch.Tensor, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose of compact tables (for each column, the rows listing it, ascending), in
    compact form: offsets ``[heads, cols + 1]``, flat indices; cost O(entries)."""
    heads, rows = offsets.shape[0], offsets.shape[1] - 1
    off = offsets.to(torch.int64)
    per_row = (off[:, 1:] - off[:, :-1]).flatten()
    head_row = torch.arange(heads * rows, device=off.device).repeat_interleave(per_row)
    head, row = head_row // max(rows, 1), head_row % max(rows, 1)
    col = indices.to(torch.int64)
    # Sort by (head, column); the stable sort keeps rows ascending within a column.
    order = torch.argsort(head * cols + col, stable=True)
    counts = torch.bincount(head * cols + col, minlength=heads * cols).reshape(heads, cols)
    ends = torch.cumsum(counts.flatten(), 0).reshape(heads, cols)
    t_off = torch.cat([ends[:, :1] - counts[:, :1], ends], 1) if cols else off[:, :1]
    return t_off.to(torch.int32), row[order].to(torch.int32)
