"""Fixtures of the DMA tests: a clean Dynamo cache around each test, so the models compiled here
never push later tests past Dynamo's recompile limit (past it Dynamo silently runs eagerly); and
the device the Triton kernels run on, for the tests that launch them."""

from __future__ import annotations

import pytest
import torch


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
