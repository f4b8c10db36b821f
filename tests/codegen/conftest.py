"""Fixtures of the kernel tests (helpers live in tests/codegen/attention_cases.py)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def rng() -> random.Random:
    """Fresh randomness each run (seed reported on failure through the pattern text)."""
    return random.Random()
