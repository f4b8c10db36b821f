"""Fixtures of the backend tests: a clean Dynamo cache per test, and model comparison."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (and stays under the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_grads_close(grads, ref_grads, tol: float = 1e-4) -> None:
    """Every gradient within ``tol`` of the reference, relative to the largest reference
    gradient norm (gradients that are mathematically zero are only rounding noise)."""
    assert len(grads) == len(ref_grads)
    scale = max(r.detach().double().norm().item() for r in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        diff = (g.detach().double() - r.detach().double()).norm().item()
        assert diff <= tol * max(r.detach().double().norm().item(), 1e-2 * scale), diff
