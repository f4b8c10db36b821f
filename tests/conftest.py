"""Settings shared by every test: Triton runs through its interpreter on machines without a GPU;
the device the kernels run on."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported: triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


@pytest.fixture
def kernel_device():
    """Tensors on the GPU where there is one (the kernels run there), else on the CPU (the
    interpreter runs them). Autouse in tests/codegen; requested by the DMA tests that launch
    kernels (the tests of the chunked path and of the reference keep their CPU tensors)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_device()
    torch.set_default_device(device)
    yield device
    torch.set_default_device(previous)
