"""Fixtures of the kernel tests (helpers live in tests/codegen/attention_cases.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def kernel_device():
    """Tensors on the GPU where there is one (the kernels run there), else on the CPU (the
    interpreter runs them)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)
