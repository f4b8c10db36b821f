"""Sharded attention on 2 and 4 gloo processes against the float64 oracle on the whole sequence:
outputs and dQ/dK/dV of every rank's tokens, several patterns, both shardings, GQA; and the
bytes the collectives really carry against the plan's figures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from launch import spawn

LENGTH = 64
CASES = {  # world size: (pattern, sharding), ...
    2: [("causal", "zigzag"), ("causal & sliding(12)", "contiguous"),
        ("sink(2) | sliding(8)", "contiguous"), ("block(16)", "zigzag"),
        ("dense", "contiguous")],
    4: [("causal", "zigzag"), ("causal & sliding(12)", "contiguous"),
        ("sink(2) | sliding(8)", "zigzag"), ("heads(causal, local(8))", "contiguous")],
}


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """q [1, 2, L, 16], k/v [1, 1, L, 16] (GQA), dout like q; the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, LENGTH, 16, generator=g)
    k, v = (torch.randn(1, 1, LENGTH, 16, generator=g) for _ in range(2))
    return q, k, v, torch.randn(q.shape, generator=g)


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str) -> torch.Tensor:
    """Differentiable float64 attention of the whole sequence (``reference_attention``'s
    mask; rows without a kept key give zeros)."""
    from sparse_compile.patterns import parse

    from sparse_compile.reference import kept_mask

    b, hq, length, d = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    keep = kept_mask(parse(pattern), b, hq, length, length, q.device)
    scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v


def _check_cases(rank: int, world: int) -> None:
    import sparse_compile.distributed.exchange as exchange
    from sparse_compile import reference_attention
    from sparse_compile.distributed import Sharding, register_group, sharded_attention
    from sparse_compile.distributed.plan import exchange_plan

    sent: list[int] = []
    collective = exchange.dist.all_to_all_single

    def counting(out, inp, **kwargs):
        sent.append(out.numel() * out.element_size())
        return collective(out, inp, **kwargs)

    exchange.dist.all_to_all_single = counting
    name = register_group(dist.group.WORLD)
    failures = []
    for i, (pattern, kind) in enumerate(CASES[world]):
        q, k, v, dout = _inputs(i)
        full = [x.double().requires_grad_() for x in (q, k, v)]
        oracle(*full, pattern).backward(dout.double())
        sharding = Sharding(kind, world)
        local = [sharding.shard(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
        sent.clear()
        out = sharded_attention(*local, pattern, sharding=kind, group_name=name)
        forward_bytes = sum(sent)
        out.backward(sharding.shard(dout, rank, dim=2))
        backward_bytes = sum(sent) - forward_bytes
        expected = reference_attention(*(x.detach() for x in full), pattern)
        pairs = [("out", out, expected)] + [
            (f"d{n}", x.grad, y.grad) for n, x, y in zip("qkv", local, full, strict=True)]
        for what, got, want in pairs:
            want = sharding.shard(want, rank, dim=2)
            err = ((got.double() - want).norm() / want.norm()).item()
            if not err < 1e-4:
                failures.append(f"rank {rank} {pattern} {kind}: {what} rel. error {err:.2e}")
        plan = exchange_plan(pattern, LENGTH, sharding)
        row = 2 * 1 * 16 * 4  # K and V rows: Hkv x D float32 each
        if forward_bytes != plan.keys_received(rank) * row:
            failures.append(f"rank {rank} {pattern} {kind}: received {forward_bytes} bytes in "
                            f"the forward, the plan says {plan.keys_received(rank) * row}")
        want_back = (plan.keys_received(rank) + plan.keys_sent(rank)) * row
        if backward_bytes != want_back:
            failures.append(f"rank {rank} {pattern} {kind}: received {backward_bytes} bytes in "
                            f"the backward, the plan says {want_back}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_attention_equals_the_whole_sequence(world):
    spawn(_check_cases, world)
