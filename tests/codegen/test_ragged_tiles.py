"""The device's default tiles at lengths that leave a ragged last tile.

On a Hopper GPU the bf16 defaults run merged loops (``*_merged``); triton 3.6 cannot compile a
merged loop whose last tile is ragged, so ``merged_loop`` keeps such calls on separate loops.
Under the interpreter these run its small tiles.
"""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen.launch.config import merged_loop

from sparse_compile.functional import attention
from tests.codegen.attention_cases import check_against_oracle, make_qkv


def test_merged_loop_needs_whole_tiles():
    assert merged_loop(True, (4096, 64), (4096, 32))
    assert not merged_loop(True, (4096, 64), (4100, 32))
    assert not merged_loop(False, (4096, 64))


@pytest.mark.parametrize("d", [16, 64, 80, 128])
@pytest.mark.parametrize("text", ["causal & sliding(40)", "global(2) | local(64)"])
def test_ragged_lengths_with_default_tiles(kernel_device, d, text):
    # Lq != Lk, neither a multiple of any tile size
    q, k, v = make_qkv(1, 2, 2, 96, 100, d, torch.bfloat16, noncontiguous=True)
    check_against_oracle(attention, q, k, v, text)
