"""``context_parallel`` around a transformers Llama (2 gloo processes): loss, gathered logits
and averaged gradients equal the single-process model's with the pattern applied by hand
(tests/fx/by_hand.py), for a sliding window (folded with the model's causal mask) on contiguous
and on zigzag shards; bad input gets a clear error."""

from __future__ import annotations

import pytest
import torch
from launch import spawn
from models import gradients, tiny_llama, token_batch, worst_error

LENGTH = 64
PATTERN = "sliding(16)"
CASES = [(None, "contiguous"), ("zigzag", "zigzag")]  # sharding asked for, sharding used


def _single_process(ids):
    """The reference: one process, the model uncompiled, the pattern applied by hand (the
    compiled single-process model equals it: tests/fx/test_transformers.py)."""
    from tests.fx.by_hand import pattern_by_hand

    model = tiny_llama()
    with pattern_by_hand(PATTERN):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return out.loss.detach(), out.logits.detach(), gradients(model)


def _check(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from sparse_compile.distributed import ShardingError, context_parallel

    mesh = init_device_mesh("cpu", (world,))
    ids = token_batch(1, LENGTH)
    want_loss, want_logits, want = _single_process(ids)
    for asked, kind in CASES:
        model = tiny_llama()
        cp = context_parallel(model, mesh, PATTERN, sharding=asked, compiler="aot_eager")
        assert cp.sharding.kind == kind
        out = cp(input_ids=ids, labels=ids)
        assert out.logits.shape[1] == LENGTH // world
        out.loss.backward()
        cp.average_gradients()
        assert abs(out.loss.item() - want_loss.item()) < 1e-5 * want_loss.item()
        logits = cp.gather(out.logits.detach())
        assert ((logits - want_logits).norm() / want_logits.norm()).item() < 1e-5
        err = worst_error(gradients(model), want)
        assert err < 1e-4, f"{kind}: gradients differ from one process by {err:.2e}"

    with pytest.raises(ValueError, match="1-D mesh"):
        context_parallel(tiny_llama(), init_device_mesh("cpu", (1, world)), "causal")
    cp = context_parallel(tiny_llama(), mesh, "causal", compiler="aot_eager")
    with pytest.raises(ShardingError, match="multiple of 4"):
        cp(input_ids=token_batch(1, LENGTH + 2))
    padding = torch.ones(1, LENGTH, dtype=torch.long)
    padding[0, :3] = 0
    with pytest.raises(ShardingError, match="padding"):
        cp(input_ids=ids, attention_mask=padding)


def test_context_parallel_llama_equals_one_process():
    spawn(_check, 2)
