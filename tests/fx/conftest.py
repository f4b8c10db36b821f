"""Fixtures of the backend tests: a clean Dynamo cache per test, model comparison, and what
the sparse op receives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import sparse_compile.functional as functional


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (and stays under the recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def flex_grads(monkeypatch):
    """FlexAttention with inputs that require grad on the CPU: eagerly it refuses them
    (``_validate_device``), compiled its higher-order op has a backward, the tests' reference."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


def assert_grads_close(grads, ref_grads, tol: float = 1e-4) -> None:
    """Every gradient within ``tol`` of the reference, relative to the largest reference
    gradient norm (gradients that are mathematically zero are only rounding noise)."""
    assert len(grads) == len(ref_grads)
    scale = max(r.detach().double().norm().item() for r in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        diff = (g.detach().double() - r.detach().double()).norm().item()
        assert diff <= tol * max(r.detach().double().norm().item(), 1e-2 * scale), diff


@contextlib.contextmanager
def recording_op_inputs() -> Iterator[list[dict]]:
    """Record what every call of the sparse op receives (bias shape, positions, documents)."""
    calls: list[dict] = []
    real = functional._static_attention

    def spy(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents, alibi=None,
            rel_bias=None):
        calls.append({"lq": q.shape[2], "lk": k.shape[2],
                      "bias": None if bias is None else tuple(bias.shape),
                      "starts": starts, "documents": documents,
                      "rel_bias": None if rel_bias is None else tuple(rel_bias.shape)})
        return real(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents, alibi,
                    rel_bias)

    functional._static_attention = spy
    try:
        yield calls
    finally:
        functional._static_attention = real


def no_lq_by_lk(calls: list[dict]) -> None:
    """The op was called, and never with an Lq × Lk bias."""
    assert calls
    for c in calls:
        bias = c["bias"]
        assert bias is None or not (bias[-2] > 1 and bias[-1] > 1), c
