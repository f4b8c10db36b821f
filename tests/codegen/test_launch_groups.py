"""Programs issued in groups of heads (``TileConfig.head_group``): every (batch, head, tile)
program still runs exactly once, whatever the group size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.launch.config import launch_groups

from tests.codegen.attention_cases import make_qkv, oracle
from tests.conftest import rel_error


def test_launch_groups_divide_the_heads():
    assert launch_groups(256, 16) == 16
    assert launch_groups(18, 16) == 9
    assert launch_groups(17, 16) == 1  # prime: one head per group, still no idle program
    assert launch_groups(12, 16) == 12
    assert launch_groups(256, 0) == 256
    # 4099 * 17 has no divisor in 2..16: one head per group would need 69683 grid rows
    assert launch_groups(4099 * 17, 16) == 4099 * 17


# Every group size, under a closed-form and a block-table pattern in turn (both under the widest
# groups): the program's (batch, head, tile) decoding does not depend on the visit.
@pytest.mark.parametrize(("group", "text"), [
    (0, "causal & sliding(12)"), (1, "global(2) | local(10)"), (4, "causal & sliding(12)"),
    (16, "causal & sliding(12)"), (16, "global(2) | local(10)"),
])
def test_every_program_runs_once(kernel_device, group, text):
    # B * Hq = 18 query-head programs and B * Hkv = 6 kv-head programs per tile; two ragged
    # tiles each way (the interpreter's tiles are 16 x 16)
    q, k, v = make_qkv(3, 6, 2, 24, 28, 16, torch.float32)
    dout = torch.randn_like(q)
    scale = 0.25
    cfg = replace(kernels.select_config(text, q, k.shape[2]), head_group=group)
    out, lse = kernels.forward(q.detach(), k.detach(), v.detach(), text, scale, cfg=cfg)
    dq, dk, dv = kernels.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, text,
                                  scale, cfg=cfg)[:3]
    ref = oracle(q, k, v, text, scale, None)
    want = torch.autograd.grad(ref, (q, k, v), dout.to(torch.float64))
    assert rel_error(out, ref) < 1e-5
    for got, exp in zip((dq, dk, dv), want, strict=True):
        assert rel_error(got, exp) < 1e-5
