"""Each token's document bounds from packed-sequence ids: the tiled kernels against the PyTorch
oracle, over random run-length splits with padding, on tiles small enough that short rows span
many of them (and the tile vector many chunks)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen.tl.documents import (
    MAX_BLOCK,
    MAX_TILES,
    document_bounds,
    document_bounds_reference,
    launch_document_bounds,
    tile_size,
)

# Tiles of 16 tokens, their vector reduced 4 tiles at a time: a row of 100 tokens has 7 tiles,
# so a token's carry comes from a chunk loop of several rounds.
BLOCK, CHUNK = 16, 4


def _row(lengths: list[int], padding: list[bool]) -> list[int]:
    """Runs of the given lengths: padding runs (-1) where asked, else documents 0, 1, 2, ..."""
    row, doc = [], 0
    for n, pad in zip(lengths, padding, strict=True):
        row += [-1] * n if pad else [doc] * n
        doc += not pad
    return row


def _random_row(length: int, longest: int, gen: torch.Generator) -> list[int]:
    """A random split of ``length`` tokens into runs of 1 to ``longest``, a fifth of them
    padding."""
    lengths = []
    while sum(lengths) < length:
        lengths.append(min(int(torch.randint(1, longest + 1, (), generator=gen, device="cpu")),
                           length - sum(lengths)))
    padding = (torch.rand(len(lengths), generator=gen, device="cpu") < 0.2).tolist()
    return _row(lengths, padding)


def _fixed_row(case: str, length: int) -> list[int]:
    third = max(length // 3, 1)
    rows = {
        "one document": [7] * length,
        "single-token documents": list(range(length)),
        "all padding": [-1] * length,
        "padding at the start": _row([third, length - third], [True, False]),
        "padding at the end": _row([length - third, third], [False, True]),
        "padding in the middle": _row([third, third, length - 2 * third], [False, True, False]),
        "padding everywhere": _row([third, third, length - 2 * third], [True, False, True]),
        "runs of two": [i // 2 for i in range(length)],
        # At 100 tokens, tiles 0-6 hold one document: the carries come from beyond the
        # first chunk of 4 tiles both ways.
        "a long document between short ones": _row([2, 1, length - 4, 1], [False] * 4),
    }
    return rows[case][:length]


def _check(ids: torch.Tensor, got: tuple[torch.Tensor, torch.Tensor]) -> None:
    want = document_bounds_reference(ids.cpu())
    for g, w, what in zip(got, want, ("start", "end"), strict=True):
        assert g.dtype == torch.int32 and g.shape == ids.shape
        wrong = (g.cpu() != w).nonzero()
        assert not len(wrong), f"{what}: {len(wrong)} wrong, the first at {wrong[0].tolist()}"


def _on_device(rows: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, device=torch.get_default_device())


CASES = ["one document", "single-token documents", "all padding", "padding at the start",
         "padding at the end", "padding in the middle", "padding everywhere", "runs of two",
         "a long document between short ones"]


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 50, 100])
@pytest.mark.parametrize("case", CASES)
def test_fixed_splits_match_the_oracle(case: str, length: int) -> None:
    ids = _on_device([_fixed_row(case, length)], torch.int64)
    _check(ids, launch_document_bounds(ids, BLOCK, CHUNK))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("longest", [1, 3, 20, 90])
@pytest.mark.parametrize("length", [33, 100, 250])
def test_random_splits_match_the_oracle(length: int, longest: int, dtype: torch.dtype) -> None:
    """Three rows of independent splits; runs of up to 90 tokens span several 16-token tiles."""
    gen = torch.Generator().manual_seed(length * 100 + longest)
    ids = _on_device([_random_row(length, longest, gen) for _ in range(3)], dtype)
    _check(ids, launch_document_bounds(ids, BLOCK, CHUNK))


@pytest.mark.parametrize(("block", "chunk"), [(16, 1), (16, 16), (32, 2), (64, 8)])
def test_tile_and_chunk_sizes_agree(block: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(block + chunk)
    ids = _on_device([_random_row(200, 60, gen) for _ in range(2)], torch.int64)
    _check(ids, launch_document_bounds(ids, block, chunk))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_any_integer_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = [_random_row(70, 12, gen) for _ in range(2)]
    if dtype == torch.uint8:
        rows = [[max(i, 0) for i in row] for row in rows]
    ids = _on_device(rows, dtype)
    _check(ids, launch_document_bounds(ids, BLOCK, CHUNK))


def test_the_public_call_takes_broadcast_ids() -> None:
    """``document_bounds`` with its own tile size, on ids expanded over the batch (not
    contiguous), as ``positions.document_bounds_of`` hands them."""
    gen = torch.Generator().manual_seed(1)
    ids = _on_device([_random_row(300, 40, gen)], torch.int64).expand(4, 300)
    _check(ids, document_bounds(ids))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="a long row takes the interpreter minutes; on a GPU only")
@pytest.mark.parametrize("length", [65536, 2**20 + 3, 2**22 + 5])
def test_long_rows_match_the_oracle(length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    ids = _on_device([_random_row(length, 40000, gen), _random_row(length, 300, gen)],
                     torch.int64)
    _check(ids, document_bounds(ids))


def test_tile_sizes() -> None:
    """Powers of two, never more than the row needs, at most ``MAX_TILES`` tiles up to
    ``MAX_TILES * MAX_BLOCK`` tokens."""
    for length in [1, 15, 16, 17, 1000, 65536, 100_000, 2**20, 2**20 + 1, 2**24]:
        block = tile_size(length)
        assert block & (block - 1) == 0 and block <= MAX_BLOCK
        assert block < 2 * max(length, 16)
        if length <= MAX_TILES * MAX_BLOCK:
            assert -(-length // block) <= MAX_TILES
