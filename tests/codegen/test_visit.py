"""How the kernels find their blocks (closed form, row bounds, compact tables), with tile shapes
like the GPU's (query and key tiles of different sizes), against the float64 oracle."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.tables import CLOSED_FORM, ROW_BOUNDS, TABLES, block_tables
from sparse_compile.codegen.launch.tma import row_descriptor
from sparse_compile.patterns import parse

from tests.codegen.attention_cases import TOL, make_qkv, oracle
from tests.conftest import rel_error

# Rectangular tiles in every pass: forward 32x16, dQ 32x16, dK/dV 32 keys x 16 queries
# (the GPU shapes are rectangular too: 128 keys x 32/64 queries in the dK/dV pass).
RECT = TileConfig(32, 16, 1, 1, 32, 16, 1, 1, 16, 32, 1, 1)
# Transposed shapes, with the interval loops merged into one (PARTIAL mask under a branch).
RECT_T = TileConfig(16, 32, 1, 1, 16, 32, 1, 1, 32, 16, 1, 1, fwd_merged=True,
                    dq_merged=True, kv_merged=True)


def direct(q, k, v, text, scale, cfg, dout):
    """Output and (dq, dk, dv) straight from the kernel launchers with tiles ``cfg``."""
    out, lse = kernels.forward(q, k, v, text, scale, cfg=cfg)
    dq, dk, dv, _ = kernels.backward(dout, q, k, v, out, lse, text, scale, cfg=cfg)
    return out, (dq, dk, dv)


def check(text, lq, lk, cfg, scale=None, b=1, hq=2, hkv=1, dtype=torch.float32):
    q, k, v = make_qkv(b, hq, hkv, lq, lk, 16, dtype)
    scale = 1 / math.sqrt(16) if scale is None else scale
    dout = torch.randn(b, hq, lq, 16, dtype=dtype)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, grads = direct(qd, kd, vd, text, scale, cfg, dout)
    ref = oracle(q, k, v, text, scale)
    want = torch.autograd.grad(ref, (q, k, v), dout.to(torch.float64))
    assert all(torch.isfinite(t).all() for t in (out, *grads)), f"non-finite for {text!r}"
    errs = [rel_error(out, ref)] + [rel_error(g, w) for g, w in zip(grads, want, strict=True)]
    assert max(errs) < TOL[dtype], f"{text!r} {cfg}: {errs}"


@pytest.mark.parametrize("cfg", [RECT, RECT_T], ids=["q-tall", "k-wide-merged"])
@pytest.mark.parametrize(
    "text, lq, lk",
    [("causal & sliding(40)", 90, 90), ("local(33)", 70, 83), ("window(20, 30)", 70, 90),
     ("causal | prefix(40)", 90, 90), ("strided(5) | sink(3)", 61, 77)],
)
def test_rectangular_tiles(text, lq, lk, cfg):
    check(text, lq, lk, cfg)


@pytest.mark.parametrize(
    "text, lq, lk",
    [("global(3) | local(20)", 70, 83), ("axial(7)", 64, 64), ("causal & (sink(4) | sliding(20))",
     90, 90), ("heads(strided(4), sink(5) | causal)", 50, 70), ("causal & strided(8)", 61, 61)],
)
def test_merged_loop_over_block_tables(text, lq, lk):
    # Table routes with merged loops: PARTIAL and FULL lists walked in one loop, the predicate
    # applied under a runtime branch (visit mode 4), in all three kernels.
    assert kernels.visit_plan(text, lq, lk, 16, 32, torch.device("cpu")).ranges == TABLES
    check(text, lq, lk, RECT_T, hq=2, hkv=1)


def test_negative_scale_keeps_the_max_shift_exact():
    # Without bias the scale is folded into exp2 only when it is positive.
    check("causal & sliding(30)", 60, 60, RECT, scale=-0.4)


def test_prefix_lm_uses_row_bounds_not_tables():
    plan = kernels.visit_plan("causal | prefix(40)", 90, 90, 16, 16, torch.device("cpu"))
    assert plan.ranges == ROW_BOUNDS and plan.tables is None
    assert plan.rows.lo.shape == (1, 90)
    assert kernels.visit_plan("causal", 90, 90, 16, 16, torch.device("cpu")).ranges == CLOSED_FORM
    tab = kernels.visit_plan("strided(5) | sink(3)", 90, 90, 16, 16, torch.device("cpu"))
    assert tab.ranges == TABLES and tab.tables is not None


@pytest.mark.parametrize(
    "text, lq, lk, bm, bn",
    [("global(3) | local(20)", 100, 90, 16, 32), ("axial(7)", 64, 64, 16, 16),
     ("heads(strided(4), sink(5) | causal)", 50, 70, 32, 16)],
)
def test_compact_tables_list_exactly_the_layout(text, lq, lk, bm, bn):
    pattern = parse(text)
    kinds = pattern.layout(lq, lk, block_m=bm, block_n=bn).kinds
    kinds = kinds if kinds.dim() == 3 else kinds[None]
    kv, qt = block_tables(pattern, lq, lk, bm, bn, torch.device("cpu"))
    for tables, grid in ((kv, kinds), (qt, kinds.transpose(1, 2))):
        for offsets, indices, kind in ((tables.partial_offsets, tables.partial_indices, 1),
                                       (tables.full_offsets, tables.full_indices, 2)):
            assert offsets.shape == (grid.shape[0], grid.shape[1] + 1)
            for h in range(grid.shape[0]):
                for r in range(grid.shape[1]):
                    listed = indices[offsets[h, r]:offsets[h, r + 1]].tolist()
                    assert listed == (grid[h, r] == kind).nonzero().flatten().tolist()


# Each visit kind (closed form, row bounds, tables) with descriptors, under both tile shapes
# between them (not every kind under both).
@pytest.mark.parametrize(("text", "cfg"), [
    ("causal & sliding(40)", RECT), ("causal & sliding(40)", RECT_T),
    ("causal | prefix(40)", RECT), ("strided(5) | sink(3)", RECT_T),
], ids=lambda x: {id(RECT): "q-tall", id(RECT_T): "k-wide-merged"}.get(id(x)))
def test_tma_descriptor_loads(text, cfg):
    # Lengths multiples of every tile and 16-bit inputs: the inner-loop tiles come through row
    # descriptors spanning all batches and heads (GQA: the kv rows of head h // G).
    cfg = replace(cfg, fwd_tma=True, dq_tma=True, kv_tma=True)
    check(text, 96, 64, cfg, b=2, hq=4, hkv=2, dtype=torch.float16)


def test_row_descriptors_only_where_exact():
    x = torch.randn(2, 3, 64, 16, dtype=torch.float16)
    assert row_descriptor(x, 32) is not None
    assert row_descriptor(x, 48) is None  # a tile would cross into the next head
    assert row_descriptor(x.float(), 32) is None
    assert row_descriptor(x.transpose(1, 2).contiguous().transpose(1, 2), 32) is None
    assert row_descriptor(torch.randn(2, 3, 64, 24, dtype=torch.float16), 32) is None
    # an expanded gradient (out.sum().backward()) reads one row everywhere: no TMA rows
    assert row_descriptor(torch.ones((), dtype=torch.float16).expand(2, 3, 64, 16), 32) is None
    assert row_descriptor(torch.ones(16, dtype=torch.float16).expand(1, 1, 64, 16), 32) is None


def test_long_rows_measure_only_interval_patterns():
    # Mean visited keys per query row (128-wide blocks): causal ~ L/2, a narrow band ~ its width.
    assert 4096 < kernels.mean_row_keys("causal", 8192, 8192) < 4400
    assert kernels.mean_row_keys("causal & sliding(256)", 8192, 8192) < 600
    assert kernels.mean_row_keys("strided(4) | sink(2)", 512, 512) == 0.0
    q = torch.zeros(1, 1, 8192, 16, device="cpu")
    # Off the GPU the interpreter tiles stay whatever the rows.
    assert kernels.select_config("causal", q, 8192) == kernels.default_config(q.device, 16,
                                                                                 q.dtype)
