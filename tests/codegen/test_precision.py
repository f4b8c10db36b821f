"""The tl.dot precision the kernels use per input dtype (``TileConfig.precision``)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen.launch.config import TileConfig


@pytest.fixture
def matmul_precision():
    """Restores PyTorch's float32 matmul setting after the test."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def test_float32_follows_the_float32_matmul_setting(matmul_precision):
    matmul_precision("highest")
    assert TileConfig.precision(torch.float32, 128) == "tf32x3"  # float32-level error
    matmul_precision("high")
    assert TileConfig.precision(torch.float32, 80) == "tf32"  # TF32 allowed by the user
    matmul_precision("medium")
    assert TileConfig.precision(torch.float32, 16) == "tf32"


@pytest.mark.parametrize("setting", ["highest", "high"])
def test_float32_heads_wider_than_128_multiply_exactly(matmul_precision, setting):
    matmul_precision(setting)
    assert TileConfig.precision(torch.float32, 160) == "ieee"
    assert TileConfig.precision(torch.float32, 256) == "ieee"


def test_sixteen_bit_inputs_multiply_as_they_are(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert TileConfig.precision(torch.float16, 128) == "tf32"  # ignored by tl.dot for 16-bit
    assert TileConfig.precision(torch.bfloat16, 256) == "tf32"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TileConfig.precision(torch.bfloat16, 64) == "upcast"  # the interpreter's bf16 dot
