"""Fixtures of the DMA tests: a clean Dynamo cache around each test, so the models compiled here
never push later tests past Dynamo's recompile limit (past it Dynamo silently runs eagerly); and
the device the Triton kernels run on, for the tests that launch them."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    # The DMA kernels (codegen/dma_*.py) leave tl.dot's input precision at Triton's default,
    # TF32 for float32 on the GPU (1-2e-3 against float64, more on gradients that nearly cancel,
    # such as d delta). The tests check them against float64 at 1e-4, as the interpreter allows
    # and as tests/codegen check the attention kernels (whose float32 dots are "ieee"): exact
    # float32 products here too. Must be set before the first kernel compiles: Triton's
    # in-process kernel cache does not key on it.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_device():
    """Tensors on the GPU where there is one (the kernels run there), else on the CPU (the
    interpreter runs them), as in tests/codegen. Not autouse: the tests of the chunked path and
    of the reference keep their CPU tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)
