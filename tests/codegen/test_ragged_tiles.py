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


DIMS = [16, 64, 80, 128]
TEXTS = ["causal & sliding(40)", "global(2) | local(64)"]
# On a GPU the default tiles differ per head dim: every dim under every pattern. The
# interpreter runs the same 16 x 16 tiles whatever the head dim (codegen/launch/config.py's
# default_config), so there each dim meets one pattern and each pattern two dims.
CASES = ([(d, text) for text in TEXTS for d in DIMS] if torch.cuda.is_available()
         else [(d, TEXTS[i % len(TEXTS)]) for i, d in enumerate(DIMS)])


@pytest.mark.parametrize(("d", "text"), CASES)
def test_ragged_lengths_with_default_tiles(kernel_device, d, text):
    # Lq != Lk, neither a multiple of any tile size
    q, k, v = make_qkv(1, 2, 2, 96, 100, d, torch.bfloat16, noncontiguous=True)
    check_against_oracle(attention, q, k, v, text)
