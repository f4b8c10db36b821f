"""Settings shared by every test: Triton runs through its interpreter on machines without a GPU."""

import os

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
