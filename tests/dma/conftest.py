"""Fixtures of the DMA tests: a clean Dynamo cache around each test, so the models compiled here
never push later tests past Dynamo's recompile limit (past it Dynamo silently runs eagerly).
The tests that launch kernels request ``kernel_device`` (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
