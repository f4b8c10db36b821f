"""DDP and FSDP2 around a Llama compiled with ``backend="sparse"`` (2 gloo processes, one
spawned run for both wrappers): each rank's half of the batch, gradients averaged by the
wrapper, equal the single-process gradients of the whole batch (the model uncompiled, the
pattern applied by hand: tests/fx/by_hand.py). The pattern is narrower than the sequence, so a
site left unrewritten (dense causal attention) would change the gradients."""

from __future__ import annotations

import torch
from launch import spawn
from models import gradients, tiny_llama, token_batch, worst_error

PATTERN = "sliding(8)"
LENGTH = 32
OPTIONS = {"pattern": PATTERN, "compiler": "aot_eager", "on_unsupported": "error"}


def _single_process(ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: one process, the model uncompiled, the pattern applied by hand (the
    compiled single-process model equals it: tests/fx/test_transformers.py)."""
    from tests.fx.by_hand import pattern_by_hand

    model = tiny_llama()
    with pattern_by_hand(PATTERN):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), gradients(model)


def _data_parallel(rank: int, world: int) -> None:
    """DDP, then FSDP2, against one single-process reference (one spawned run for both)."""
    import torch.distributed as dist

    ids = token_batch(world, LENGTH)
    want_loss, want = _single_process(ids)
    failures = []
    for wrapper in ("ddp", "fsdp2"):
        torch._dynamo.reset()
        model = tiny_llama()
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        compiled = torch.compile(wrapped, backend="sparse", options=OPTIONS)
        mine = ids[rank:rank + 1]
        loss = compiled(input_ids=mine, labels=mine).loss
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if not abs(total.item() / world - want_loss.item()) < 1e-5 * abs(want_loss.item()):
            failures.append(f"{wrapper}: loss {total.item() / world} != {want_loss.item()}")
        err = worst_error(gradients(model), want)
        if not err < 1e-4:
            failures.append(f"{wrapper}: gradients differ from one process by {err:.2e}")
    assert not failures, f"rank {rank}: " + "; ".join(failures)


def test_ddp_and_fsdp2_give_the_single_process_gradients():
    spawn(_data_parallel, 2)
