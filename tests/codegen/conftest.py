"""Fixtures of the kernel tests (helpers live in tests/codegen/attention_cases.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def on_kernel_device(kernel_device):
    """Every kernel test builds its tensors on the kernel device (tests/conftest.py)."""
    return kernel_device
