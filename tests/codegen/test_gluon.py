"""The Hopper Gluon kernels (codegen/gluon/): where they are chosen, the row intervals they
read, the layouts they walk (tested everywhere), and their results against the float64 oracle
(on an sm90 GPU only: Gluon kernels do not run in the interpreter)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon import forward as gluon_forward
from sparse_compile.codegen.gluon import support
from sparse_compile.codegen.gluon.rows import document_rows, interval_rows
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.patterns import parse

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    ON_GLUON_GPU,
    check_against_oracle,
    count_calls,
    make_qkv,
    needs_gluon_gpu,
    oracle,
    strict_gluon,
)
from tests.conftest import rel_error

INTERVAL_PATTERNS = [
    "dense", "causal", "causal & sliding(70)", "local(50)", "block(96)", "sliding(33)",
    "causal | prefix(40)", "window(30, 5)", "heads(causal, causal & sliding(20))",
]
TWO_INTERVALS = [
    "causal & (sink(4) | sliding(30))", "sink(3) | sliding(7)",
    "heads(causal, causal & (sink(2) | sliding(9)))",
]
NOT_SERVED = ["strided(4)", "axial(6)", "~local(3)"]



@pytest.fixture(autouse=True)
def gluon_requested(monkeypatch):
    """Every test here asks for the Gluon kernels (by default they take head dim 128 only)."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")


# --- host side: runs everywhere (CI) ---------------------------------------------------------

@pytest.mark.parametrize("text", INTERVAL_PATTERNS + TWO_INTERVALS)
@pytest.mark.parametrize("lq, lk", [(37, 37), (20, 45), (45, 20), (1, 9)])
def test_row_intervals_are_exactly_the_kept_keys(text, lq, lk) -> None:
    pattern = parse(text)
    rows = interval_rows(pattern, lq, lk, torch.device("cpu"))
    assert rows is not None
    heads = pattern.num_heads if pattern.per_head else 1
    mask = pattern.mask(lq, lk, heads=heads if pattern.per_head else None).reshape(heads, lq, lk)
    # A union is one interval per row where its pieces touch at these lengths.
    pieces = rows.pieces
    assert pieces == 1 or (pieces == 2 and text in TWO_INTERVALS)
    assert rows.lo.shape == rows.hi.shape == (pieces, heads, lq)
    assert rows.lo.dtype == torch.int32 and rows.pattern_heads == heads
    keys = torch.arange(lk, device=rows.lo.device)
    for h in range(heads):
        covered = torch.zeros(lq, lk, dtype=torch.bool, device=keys.device)
        for p in range(pieces):
            lo, hi = rows.lo[p, h].long(), rows.hi[p, h].long()
            covered |= (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
            # the dK/dV pass binary-searches each piece's bounds
            assert bool((lo[1:] >= lo[:-1]).all()) and bool((hi[1:] >= hi[:-1]).all())
        assert torch.equal(covered, mask[h].to(keys.device))


@pytest.mark.parametrize("text", INTERVAL_PATTERNS + TWO_INTERVALS)
@pytest.mark.parametrize("lq, lk", [(37, 37), (20, 45), (45, 20), (1, 9)])
def test_key_intervals_are_exactly_the_rows_keeping_each_key(text, lq, lk) -> None:
    """Piece by piece, the query rows ``[key_lo, key_hi]`` of each key are the rows whose
    piece keeps it (what the dK/dV pass masks PARTIAL blocks with), checked against the
    rows' own intervals, and together they give the pattern's mask column by column."""
    pattern = parse(text)
    rows = interval_rows(pattern, lq, lk, torch.device("cpu"))
    heads = rows.pattern_heads
    mask = pattern.mask(lq, lk, heads=heads if pattern.per_head else None).reshape(heads, lq, lk)
    mask = mask.to(rows.lo.device)  # the tests' default device may be the GPU
    assert rows.key_lo.shape == rows.key_hi.shape == (rows.pieces, heads, lk)
    assert rows.key_lo.dtype == torch.int32
    queries = torch.arange(lq, device=rows.lo.device)
    keys = torch.arange(lk, device=rows.lo.device)
    for h in range(heads):
        covered = torch.zeros(lq, lk, dtype=torch.bool, device=rows.lo.device)
        for p in range(rows.pieces):
            lo, hi = rows.lo[p, h].long(), rows.hi[p, h].long()
            piece = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
            first, last = rows.key_lo[p, h].long(), rows.key_hi[p, h].long()
            by_key = (queries[:, None] >= first[None, :]) & (queries[:, None] <= last[None, :])
            assert torch.equal(by_key, piece)
            covered |= by_key
        assert torch.equal(covered, mask[h])


PACKED_IDS = [
    [0] * 37,
    [0] * 10 + [1] * 3 + [2] * 24,
    [0] * 5 + [-1] * 4 + [1] * 20 + [2] + [-1] * 7,
    [-1] * 3 + [4] * 30 + [7] * 4,
    [0] + [1] * 5 + [2] + [3] * 20 + [4] * 10,
]
# Empty rows whose lower bound grows faster than a key a row (a prefix's) end documents here.
PACKED_PATTERNS = ["prefix(2)", "causal & prefix(3)", "causal | prefix(3)",
                   "heads(prefix(2), causal & sliding(3))"]


@pytest.mark.parametrize("text", INTERVAL_PATTERNS + TWO_INTERVALS + PACKED_PATTERNS)
@pytest.mark.parametrize("ids", PACKED_IDS, ids=lambda ids: f"{len(set(ids))}docs")
def test_rows_inside_packed_documents_are_exactly_the_kept_keys(text, ids) -> None:
    """Inside documents (positions counted from each document's first token, padding keeping
    nothing), the shifted rows and their keys' intervals give the oracle's mask, and both
    bounds stay non-decreasing for the dK/dV pass's binary search."""
    from sparse_compile.codegen.tl.documents import document_bounds_reference

    from sparse_compile.reference import kept_mask

    pattern = parse(text)
    ids_t = torch.tensor([ids])  # on the tests' default device (the GPU where there is one)
    start, end = document_bounds_reference(ids_t)
    rows = document_rows(pattern, start[0], end[0])
    assert rows is not None
    heads = rows.pattern_heads
    mask = kept_mask(pattern, 1, heads, len(ids), len(ids), ids_t.device, documents=ids_t)[0]
    keys = queries = torch.arange(len(ids), device=ids_t.device)
    for h in range(heads):
        covered = torch.zeros_like(mask[h])
        by_keys = torch.zeros_like(mask[h])
        for p in range(rows.pieces):
            lo, hi = rows.lo[p, h].long(), rows.hi[p, h].long()
            assert bool((lo[1:] >= lo[:-1]).all()) and bool((hi[1:] >= hi[:-1]).all())
            covered |= (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
            first, last = rows.key_lo[p, h].long(), rows.key_hi[p, h].long()
            by_keys |= (queries[:, None] >= first[None, :]) & (queries[:, None] <= last[None, :])
        assert torch.equal(covered, mask[h])
        assert torch.equal(by_keys, mask[h])


@pytest.mark.parametrize("text", NOT_SERVED + ["global(2)"])
def test_patterns_without_closed_form_rows_stay_off_the_documents_path(text) -> None:
    start, end = torch.zeros(1, 40, dtype=torch.int32), torch.full((1, 40), 39)
    assert document_rows(parse(text), start[0], end[0]) is None


def test_large_empty_row_bounds_stay_empty_in_int32() -> None:
    """``prefix(n)``'s empty rows have lower bounds growing n keys a row; past 2**31 they
    must not wrap to keys they do not keep."""
    rows = interval_rows(parse("prefix(65536)"), 100000, 100000, torch.device("cpu"))
    lo, hi = rows.lo[0, 0].long(), rows.hi[0, 0].long()
    assert bool((lo[65536:] > hi[65536:]).all()) and bool((lo[:65536] == 0).all())
    assert bool((lo[1:] >= lo[:-1]).all())


@pytest.mark.parametrize("text", NOT_SERVED)
def test_patterns_beyond_two_intervals_per_row_have_no_row_intervals(text) -> None:
    assert interval_rows(parse(text), 40, 40, torch.device("cpu")) is None


def test_row_view_walks_head_major_and_sequence_major_layouts() -> None:
    t = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    rows, per_batch, per_head, col = gluon_forward.row_view(t)
    assert rows.shape == (240, 64) and (per_batch, per_head, col) == (120, 40, 0)
    s = torch.zeros(2, 40, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    rows, per_batch, per_head, col = gluon_forward.row_view(s)
    assert rows.shape == (80, 192) and (per_batch, per_head, col) == (40, 0, 64)
    # The element (b, h, l, d) sits at row b * per_batch + h * per_head + l, column h * col + d.
    for x, view, pb, ph, c in ((t, *gluon_forward.row_view(t)), (s, *gluon_forward.row_view(s))):
        x.zero_()
        b, h, pos, d = 1, 2, 7, 5
        x[b, h, pos, d] = 1
        assert view[b * pb + h * ph + pos, h * c + d] == 1


@pytest.mark.skipif(not support.GLUON_IMPORTED, reason="this Triton has no Gluon")
@pytest.mark.parametrize("sequence_major", [False, True])
def test_backward_operands_give_head_dim_tiles_in_both_layouts(sequence_major) -> None:
    """The backward launches from ``backward_operands``: tiles one head wide (a
    sequence-major view is H x D wide), the views' row offsets, room for Δ (which the dQ
    pass works out)."""
    from sparse_compile.codegen.gluon.backward import backward_operands

    def layout(b, h, length, d):
        if sequence_major:
            return torch.randn(b, length, h, d, dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(b, h, length, d, dtype=torch.bfloat16)

    q, out, dout = (layout(2, 4, 48, 64) for _ in range(3))
    k, v = layout(2, 2, 40, 64), layout(2, 2, 40, 64)
    ops = backward_operands(dout, q, k, v, out)
    assert ops is not None and ops.head_dim == 64
    expected = sum((gluon_forward.row_view(t)[1:] for t in (q, k, dout)), ())
    assert ops.offsets == expected
    for desc, rows in zip(ops.descriptors(32, 16), (32, 16, 16, 32), strict=True):
        assert list(desc.block_shape) == [rows, 64]
    assert ops.delta.shape == (2, 4, 48) and ops.delta.dtype == torch.float32
    assert ops.dk.shape == ops.dv.shape == (2, 2, 40, 64)


@pytest.mark.parametrize("same_heads", [True, False])
@pytest.mark.parametrize("sequence_major", [False, True])
def test_residue_class_views_are_layouts_tma_walks(same_heads, sequence_major) -> None:
    """The residue route (``strided(s) & R``, and the strided part of a strided union) runs
    the inner pattern on views whose heads are residue classes; those views are
    sequence-major row matrices (after the route's copy where no view fits), so the Gluon
    kernels take them."""
    b, hkv, length, d, s = 2, 2, 96, 64, 4
    hq = hkv if same_heads else 2 * hkv

    def tensor(h):
        if sequence_major:
            return torch.zeros(b, length, h, d, dtype=torch.bfloat16).transpose(1, 2)
        return torch.zeros(b, h, length, d, dtype=torch.bfloat16)

    route = kernels.residue_route(f"causal & strided({s})", length, length, False, 0.0)
    assert route is not None and route.s == s
    layout, views = kernels._class_views(route, [tensor(hq), tensor(hkv)], same_heads)
    assert all(gluon_forward.row_view(v) is not None for v in views), layout


def test_row_view_refuses_layouts_tma_cannot_walk() -> None:
    t = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    assert gluon_forward.row_view(t[..., :32]) is None  # rows strided past the head dim
    assert gluon_forward.row_view(t.transpose(2, 3).contiguous().transpose(2, 3)) is None
    assert gluon_forward.row_view(t[:, :, 1:]) is None  # heads 39 rows apart, 40 in memory
    odd = torch.zeros(2, 3, 40, 3, dtype=torch.bfloat16)  # 6-byte rows
    assert gluon_forward.row_view(odd) is None


def test_supported_versions_and_the_kernel_switch(monkeypatch) -> None:
    assert support.gluon_version_supported((3, 6)) == support.GLUON_IMPORTED
    assert not support.gluon_version_supported((3, 5))
    assert not support.gluon_version_supported((4, 0))
    monkeypatch.setenv(support.KERNELS_ENV, "tl")
    assert support.requested_kernels() == "tl" and not support.gluon_wanted()
    assert not support.gluon_device(torch.device("cuda"))
    monkeypatch.setenv(support.KERNELS_ENV, " Gluon ")
    assert support.gluon_wanted() and support.requested_kernels() == "gluon"
    assert not support.gluon_device(torch.device("cpu"))
    monkeypatch.setenv(support.KERNELS_ENV, "")
    for default in (False, True):
        monkeypatch.setattr(support, "GLUON_BY_DEFAULT", default)
        assert support.gluon_wanted() == default
    monkeypatch.setenv(support.KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match="SPARSE_COMPILE_KERNELS='triton'"):
        support.gluon_wanted()


def test_on_by_default_for_the_measured_head_dims_only(monkeypatch) -> None:
    """Unasked, the Gluon kernels take head dim 128 (timed ahead of the ``tl`` kernels);
    asked for, 64 and 256 too; forced off, none."""
    monkeypatch.delenv(support.KERNELS_ENV)
    assert support.GLUON_BY_DEFAULT and support.gluon_wanted()
    assert support.gluon_head_dims() == support.gluon_head_dims(backward=True) == (128,)
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    assert support.gluon_head_dims() == (64, 128, 256)
    assert support.gluon_head_dims(backward=True) == (64, 128, 256)
    monkeypatch.setenv(support.KERNELS_ENV, "tl")
    assert not support.gluon_wanted()


def test_a_head_dim_outside_the_default_keeps_the_tl_kernels(monkeypatch) -> None:
    """The head-dim choice reaches the dispatcher: with the device taken as Gluon-capable,
    head dim 64 gets no row intervals (the ``tl`` kernels) unless asked for."""
    monkeypatch.delenv(support.KERNELS_ENV)
    monkeypatch.setattr(kernels, "gluon_device", lambda device: True)
    q, k, v = (torch.zeros(1, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    assert kernels._gluon_rows(q, k, v, "causal") is None
    q, k, v = (torch.zeros(1, 2, 40, 128, dtype=torch.bfloat16) for _ in range(3))
    assert kernels._gluon_rows(q, k, v, "causal") is not None
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    q, k, v = (torch.zeros(1, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    assert kernels._gluon_rows(q, k, v, "causal") is not None


def test_head_dim_256_takes_the_gluon_kernels_only_when_asked(monkeypatch) -> None:
    """Asked for, head dim 256 gets the Gluon kernels' rows in both directions, also in a
    precompile job; unasked, neither; and a direction whose head dims leave 256 out hands it
    to the ``tl`` kernels (which read the Gluon forward's log-sum-exp as their own)."""
    monkeypatch.setattr(kernels, "gluon_device", lambda device: True)
    q, k, v = (torch.zeros(1, 2, 40, 256, dtype=torch.bfloat16) for _ in range(3))
    meta = [t.to("meta") for t in (q, k, v)]
    cpu = torch.device("cpu")
    with monkeypatch.context() as unasked:
        unasked.delenv(support.KERNELS_ENV)
        assert kernels._gluon_rows(q, k, v, "causal") is None
        assert kernels._gluon_rows(q, k, v, "causal", backward=True) is None
        assert kernels.plain_gluon_rows(*meta, "causal", cpu, cpu) is None
    assert kernels._gluon_rows(q, k, v, "causal") is not None
    assert kernels.plain_gluon_rows(*meta, "causal", cpu, cpu) is not None
    assert kernels._gluon_rows(q, k, v, "causal", backward=True) is not None
    assert kernels.plain_gluon_rows(*meta, "causal", cpu, cpu, backward=True) is not None
    monkeypatch.setattr(support, "GLUON_BACKWARD_HEAD_DIMS", (64, 128))
    assert kernels._gluon_rows(q, k, v, "causal") is not None
    assert kernels._gluon_rows(q, k, v, "causal", backward=True) is None
    assert kernels.plain_gluon_rows(*meta, "causal", cpu, cpu, backward=True) is None


def test_the_interpreter_and_cpu_keep_the_tl_kernels(monkeypatch) -> None:
    if ON_GLUON_GPU:
        pytest.skip("this machine runs the Gluon kernels")
    fwd = count_calls(monkeypatch, kernels, "launch_gluon_forward")
    bwd = count_calls(monkeypatch, kernels, "launch_gluon_backward")
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal & sliding(9)")
    assert fwd == [] and bwd == []


def test_tile_config_has_a_switch_for_the_gluon_kernels() -> None:
    assert TileConfig().gluon and not TileConfig(gluon=False).gluon
    assert TileConfig().key() != TileConfig(gluon=False).key()


@pytest.mark.skipif(not support.GLUON_IMPORTED, reason="this Triton has no Gluon")
@pytest.mark.parametrize(("d", "pieces", "mods"), [(128, 1, ""), (128, 2, ""), (128, 1, "mods"),
                                                   (128, 2, "mods"), (128, 1, "mask"),
                                                   (256, 1, ""), (256, 2, "mods")])
def test_the_kernels_compile_for_sm90_without_serialised_products(d, pieces, mods, tmp_path
                                                                  ) -> None:
    """Forward and both backward passes compile for sm_90a here (no
    GPU: a stand-in driver in a separate process), also with every logit modification on
    (``mods``: soft-capping, ALiBi, a relative-bias table), and ptxas keeps their asynchronous
    ``wgmma`` products asynchronous (its C7514 warning would mean each waits for the last);
    at head dim 256 with the dK/dV pass as two launches (dV, dK); every kernel within the
    H100's 227 KB of shared memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gluon_sm90_compile.py")
    # compiled, not interpreted (the interpreter wraps the kernels' helpers), and from scratch
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, str(script), str(d), str(pieces), mods],
                         capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).parents[2] / "tests",
                         env=env)
    innermost = [line for line in run.stderr.splitlines() if line.startswith("innermost")]
    assert run.returncode == 0, (innermost, run.stderr[-3000:])
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    passes = ["dv pass", "dk pass"] if d == 256 else ["dk/dv pass"]
    assert [r["kernel"] for r in reports] == ["forward", "dq pass", *passes]
    for r in reports:
        assert r["serialized"] is False, r
        assert r.get("shared_bytes", 0) <= 227 * 1024, r


# --- the kernel itself: sm90 GPU only ---------------------------------------------------------

GPU_CASES = [
    # (pattern, B, Hq, Hkv, Lq, Lk, D)
    ("dense", 2, 4, 4, 256, 256, 128),
    ("causal", 1, 4, 2, 300, 300, 128),
    ("causal", 2, 2, 2, 1000, 1000, 64),
    ("causal & sliding(70)", 1, 8, 2, 517, 517, 128),
    ("causal & sliding(300)", 1, 2, 1, 1024, 1024, 64),
    ("local(50)", 2, 2, 2, 333, 333, 128),
    ("block(96)", 1, 4, 4, 700, 700, 64),
    ("causal | prefix(40)", 1, 2, 2, 390, 390, 128),
    ("sliding(33)", 1, 2, 2, 129, 257, 128),
    ("causal", 1, 2, 2, 200, 77, 128),  # Lq > Lk: the first rows keep no key
    ("causal & sliding(64)", 1, 2, 1, 77, 600, 64),  # Lq < Lk (chunked prefill)
    ("heads(causal, causal & sliding(20))", 1, 4, 2, 260, 260, 128),
    ("window(30, 5)", 1, 2, 2, 255, 255, 64),
    ("causal & (sink(4) | sliding(100))", 1, 4, 2, 700, 700, 128),
    ("causal & (sink(130) | sliding(64))", 2, 2, 1, 517, 517, 64),
    ("sink(3) | sliding(40)", 1, 2, 2, 333, 333, 128),
    ("heads(causal, causal & (sink(2) | sliding(90)))", 1, 4, 2, 400, 400, 128),
    ("causal & sliding(70)", 1, 4, 2, 517, 517, 256),  # dV and dK in launches of their own
    ("causal & (sink(4) | sliding(100))", 1, 2, 1, 300, 300, 256),
]


@needs_gluon_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-d{c[6]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gluon_kernels_match_the_oracle(monkeypatch, case, dtype, noncontiguous) -> None:
    text, b, hq, hkv, lq, lk, d = case
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, noncontiguous)
    check_against_oracle(attention, q, k, v, text)
    assert fwd and bwd, "the Gluon kernels did not run"


def _packed_ids(length: int, device) -> torch.Tensor:
    """One batch row of five documents of uneven lengths with a padding gap (id -1)."""
    cuts = [0, 130, 131, 400, 420, length - 60, length]
    ids = torch.empty(length, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        ids[a:b] = i if i != 4 else -1
    return ids.reshape(1, length).to(device)


@needs_gluon_gpu
@pytest.mark.parametrize("text", ["causal", "causal & sliding(100)", "block(128)",
                                  "causal & (sink(4) | sliding(60))"])
@pytest.mark.parametrize("d", [64, 128])
def test_gluon_kernels_serve_packed_documents(monkeypatch, text, d) -> None:
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, 2, 777, 777, d, torch.bfloat16)
    ids = _packed_ids(777, q.device)
    check_against_oracle(attention, q, k, v, text, positions={"documents": ids})
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
@pytest.mark.parametrize("text", ["causal & sliding(100)", "dense", "block(128)",
                                  "causal & (sink(4) | sliding(200))"])
def test_gluon_backward_is_deterministic_and_agrees_with_tl(monkeypatch, text) -> None:
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16)
    q, k, v = q.detach(), k.detach(), v.detach()
    dout = torch.randn_like(q)
    out, lse = kernels.forward(q, k, v, text, 0.1)
    first = kernels.backward(dout, q, k, v, out, lse, text, 0.1)[:3]
    again = kernels.backward(dout, q, k, v, out, lse, text, 0.1)[:3]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert len(fwd) == 1 and len(bwd) == 2, "the Gluon kernels did not run"
    tl = kernels.backward(dout, q, k, v, out, lse, text, 0.1, cfg=TileConfig(gluon=False))[:3]
    for a, b in zip(first, tl, strict=True):
        assert rel_error(a, b) < 2e-2


@needs_gluon_gpu
@pytest.mark.parametrize("text", ["causal", "causal & sliding(100)", "block(128)", "dense",
                                  "causal & (sink(4) | sliding(300))"])
def test_gluon_and_tl_forwards_agree_on_output_and_log_sum_exp(monkeypatch, text) -> None:
    fwd, _ = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(2, 4, 2, 777, 777, 128, torch.bfloat16)
    args = (q.detach(), k.detach(), v.detach(), text, 0.1)
    out_g, lse_g = kernels.forward(*args)
    assert fwd, "the Gluon forward did not run"
    out_t, lse_t = kernels.forward(*args, cfg=TileConfig(gluon=False))
    assert rel_error(out_g, out_t) < 1e-2
    finite = torch.isfinite(lse_t)
    assert torch.equal(finite, torch.isfinite(lse_g))
    assert (lse_g[finite] - lse_t[finite]).abs().max().item() < 1e-2


@needs_gluon_gpu
@pytest.mark.parametrize(("text", "lq", "lk"), [
    ("causal", 333, 333), ("causal & sliding(100)", 517, 517),
    ("causal & (sink(4) | sliding(60))", 300, 300), ("causal", 200, 77),
    ("sliding(33)", 129, 257)])
def test_head_dim_256_gluon_kernels_match_the_oracle(monkeypatch, text, lq, lk) -> None:
    """Head dim 256: the forward with 64-key stages, the dQ pass with 32-key stages, dV and
    dK in launches of their own."""
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, 2, lq, lk, 256, torch.bfloat16)
    check_against_oracle(attention, q, k, v, text)
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
@pytest.mark.parametrize(("text", "hkv"), [
    ("causal & strided(16)", 4), ("causal & strided(8)", 2),  # the residue route
    ("causal & (sliding(64) | strided(32))", 4),  # the strided-union route
])
def test_routes_run_their_parts_on_the_gluon_kernels(monkeypatch, text, hkv) -> None:
    """The residue and strided-union routes call the kernels on residue-class views and
    parts; those take the Gluon kernels, and the merged results match the oracle."""
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, hkv, 512, 512, 128, torch.bfloat16)
    check_against_oracle(attention, q, k, v, text)
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
def test_rows_with_no_key_give_zeros_and_infinite_lse() -> None:
    q, k, v = make_qkv(1, 2, 2, 300, 100, 128, torch.bfloat16)
    out, lse = kernels.forward(q.detach(), k.detach(), v.detach(), "causal", 0.1)
    empty = 200  # bottom-right causal: rows 0..199 sit before every key
    assert torch.isfinite(out).all()
    assert out[:, :, :empty].abs().max().item() == 0
    assert torch.isinf(lse[:, :, :empty]).all() and torch.isfinite(lse[:, :, empty:]).all()


@needs_gluon_gpu
def test_tl_forced_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "tl")
    calls = count_calls(monkeypatch, kernels, "launch_gluon_forward")
    q, k, v = make_qkv(1, 2, 2, 256, 256, 128, torch.bfloat16)
    check_against_oracle(attention, q, k, v, "causal", grads=False)
    assert calls == []


def test_a_triton_without_gluon_keeps_the_tl_kernels() -> None:
    """With ``triton.experimental.gluon`` missing, everything imports and the Gluon kernels are
    never chosen (a fresh interpreter, the import blocked)."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("triton.experimental.gluon"):
            raise ImportError("no gluon here")
sys.meta_path.insert(0, Block())
import torch
from sparse_compile.codegen import attention
from sparse_compile.codegen.gluon import support
assert not support.GLUON_IMPORTED and not support.gluon_version_supported()
assert not support.gluon_capable(torch.device("cpu"))
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


# --- background precompilation (codegen/precompile.py) ---------------------------------------

@pytest.mark.skipif(not support.gluon_version_supported(),
                    reason="no Gluon kernels on this Triton: nothing to precompile")
@pytest.mark.parametrize(("route", "where", "d"), [
    ("plain", "1", 128), ("documents", "1", 128), ("plain", "threads", 128),
    ("documents", "threads", 128), ("moved", "1", 128), ("plain", "1", 256)])
def test_precompiled_kernels_are_the_ones_the_launches_ask_for(route, where, d,
                                                               tmp_path) -> None:
    """The precompile jobs of a model-like call (sequence-major, GQA; default positions or
    packed documents) compile the forward, dQ and dK/dV kernels, in the helper processes
    (the default) or on threads, and the launchers, driven with real tensors of the same
    shapes and strides, then find every kernel they ask for compiled: they add nothing to
    Triton's cache, also when that cache moved after the jobs (``moved``: as Inductor moves
    it) (sm_90 stand-in driver in a separate process: no GPU here)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gluon_sm90_precompile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["SPARSE_COMPILE_PRECOMPILE"] = where
    run = subprocess.run([sys.executable, str(script), str(d), "causal & sliding(64)", route],
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parents[2] / "tests", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads([x for x in run.stdout.splitlines() if x.startswith("{")][-1])
    # at head dim 256 the dK/dV pass runs as two launches (dV, dK)
    kv_launches = 2 if d == 256 else 1
    assert report["jobs"] == [1, 1 + kv_launches, 1 + kv_launches]
    # the contiguous gradient has dQ and dK/dV variants of its own (1000 rows: its row
    # offsets are not multiples of 16)
    assert sorted(report["precompiled"]) == sorted(
        ["_fwd_kernel"] + (["_dq_kernel"] + ["_dkdv_kernel"] * kv_launches) * 2)
    assert report["compiled_at_launch"] == []


def test_precompile_starts_only_for_static_gpu_operands(monkeypatch) -> None:
    from sparse_compile.codegen import precompile
    from torch._subclasses.fake_tensor import FakeTensorMode

    precompile.forget()
    cpu = torch.empty(1, 2, 64, 128, device="cpu", dtype=torch.bfloat16)
    assert precompile.precompile(cpu, cpu, cpu, "causal", 0.1, False) == []
    with FakeTensorMode():
        q = torch.empty(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    if not ON_GLUON_GPU:  # no GPU the Gluon kernels run on: nothing to compile for
        assert precompile.precompile(q, q, q, "causal", 0.1, False) == []
        monkeypatch.setattr(precompile, "_gluon_device", lambda device: True)
    monkeypatch.setenv(precompile.PRECOMPILE_ENV, "0")
    assert precompile.precompile(q, q, q, "causal", 0.1, False) == []
    monkeypatch.setenv(precompile.PRECOMPILE_ENV, "1")
    started = precompile.precompile(q, q, q, "causal", 0.1, False)
    assert len(started) == 1
    # the same call again starts nothing; the job finishes without raising, whatever it found
    assert precompile.precompile(q, q, q, "causal", 0.1, False) == []
    started[0].result()
    # an ended job leaves nothing pending, waited for or not (launches then check nothing);
    # its done-callback runs just after the result is set
    import time

    deadline = time.monotonic() + 5
    while precompile._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not precompile._pending
    precompile.finish_call(q, q, q, None, "causal", False, False)
    assert started[0].done() and started[0].exception() is None
    expected = 1 if ON_GLUON_GPU else 0  # off an sm90 GPU the call takes no Gluon route
    assert started[0].result() == expected
    assert not precompile._pending
    precompile.forget()


def test_compile_only_compiles_and_launches_nothing() -> None:
    from sparse_compile.codegen.launch.compile_only import compile_only, compiling_only, launch

    calls = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            calls.append(("warmup", args, grid, kwargs))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("launch", args, grid, kwargs))

    launch(Kernel(), (2, 1), 1, X=2)
    assert not compiling_only()
    with compile_only():
        assert compiling_only()
        launch(Kernel(), (2, 1), 1, X=2)
    assert not compiling_only()
    assert calls == [("launch", (1,), (2, 1), {"X": 2}), ("warmup", (1,), (2, 1), {"X": 2})]


@needs_gluon_gpu
@pytest.mark.parametrize("where", ["1", "threads"])
def test_a_precompiled_call_compiles_nothing_at_its_launch(where, monkeypatch, tmp_path) -> None:
    """On the GPU: after the precompile jobs of a sequence-major GQA call (in the helper
    processes or on threads), its forward and backward launch without compiling (they add
    nothing to Triton's cache), and agree with the oracle."""
    from sparse_compile.codegen import precompile
    from sparse_compile.codegen.attention import backward, forward
    from sparse_compile.codegen.gluon import backward as gluon_backward
    from sparse_compile.codegen.gluon import forward as gluon_forward

    from tests.codegen.gluon_sm90_precompile import cache_files, kernel_names

    for kernel in (gluon_forward._fwd_kernel, gluon_backward._dq_kernel,
                   gluon_backward._dkdv_kernel):
        kernel.device_caches.clear()
    precompile.forget()
    monkeypatch.setenv(precompile.PRECOMPILE_ENV, where)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    text, b, hq, hkv, length, d = "causal & sliding(100)", 1, 8, 2, 700, 128
    torch.manual_seed(0)
    q = torch.randn(b, length, hq, d, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, length, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, length, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    scale = d ** -0.5
    jobs = [*precompile.precompile(q, k, v, text, scale, False),
            *precompile.precompile(q, k, v, text, scale, True)]
    assert [job.result() for job in jobs] == [1, 2]
    precompile.finish_call(q, k, v, None, text, False, False)  # as the forward's launch does
    after_jobs = cache_files()
    assert sorted(kernel_names(after_jobs)) == [
        "_dkdv_kernel", "_dq_kernel", "_fwd_kernel"]
    out, lse = forward(q, k, v, text, scale, query_layout=True)
    dout = torch.randn_like(out)
    dq, dk, dv, _ = backward(dout, q, k, v, out, lse, text, scale)
    assert kernel_names(cache_files() - after_jobs) == []
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = oracle(q64, k64, v64, text, scale)  # float64 with autograd
    want = torch.autograd.grad(expected, (q64, k64, v64), dout.double())
    for got, ref in ((out, expected), (dq, want[0]), (dk, want[1]), (dv, want[2])):
        assert rel_error(got, ref) < 2e-2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_starts_precompilation_afresh(monkeypatch) -> None:
    """A child forked while jobs are pending has none of the parent's threads: it must not
    wait for the parent's jobs, and its own jobs must run."""
    import os
    from concurrent.futures import Future

    from sparse_compile.codegen import precompile
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(precompile, "_gluon_device", lambda device: True)
    with FakeTensorMode():  # before the fork: a fake CUDA tensor may touch CUDA
        q = torch.empty(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    key = precompile.job_key(q, q, q, None, "causal", False, False)
    never = Future()  # a job that never finishes in this process either
    precompile._pending[key] = never
    read, write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            import signal

            signal.alarm(60)  # a hang fails the test instead of stalling the run
            try:
                precompile.finish(key)  # would wait forever on the parent's job
                jobs = precompile.precompile(q, q, q, "causal", 0.1, False)
                precompile.finish(key)
                ok = len(jobs) == 1 and jobs[0].done() and jobs[0].exception() is None
                os.write(write, b"ok" if ok else b"bad")
            finally:
                os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        answer = os.read(read, 8)
        os.close(read)
    finally:
        precompile._pending.pop(key, None)
        precompile.forget()
    assert status == 0 and answer == b"ok"


def test_precompile_asks_the_route_the_call_will_take(monkeypatch) -> None:
    """The rows a precompile job builds exist exactly where the call takes the Gluon kernels:
    plain calls and packed documents of one batch row, not decoding steps, documents over
    several batch rows, or patterns the Gluon rows do not serve."""
    monkeypatch.setattr(kernels, "_gluon_serves", lambda *a: True)  # an sm90 GPU, stood in
    cpu = torch.device("cpu")

    def rows(b, lq, lk, text, documents=False):
        q = torch.empty(b, 4, lq, 128, device="meta", dtype=torch.bfloat16)
        k = torch.empty(b, 2, lk, 128, device="meta", dtype=torch.bfloat16)
        return kernels.plain_gluon_rows(q, k, k, text, cpu, cpu, documents)

    band = "causal & sliding(16)"
    assert rows(1, 64, 64, band) is not None
    assert rows(2, 64, 64, band) is not None
    assert rows(1, 64, 64, band, documents=True) is not None
    assert rows(2, 64, 64, band, documents=True) is None  # the tl kernels' route
    assert rows(1, 1, 4096, band) is None  # a decoding step
    assert rows(1, 64, 64, "strided(4)") is None
    assert rows(1, 64, 64, "strided(4)", documents=True) is None
    built = rows(1, 64, 64, band, documents=True)
    assert (built.pieces, built.pattern_heads, built.lo.dtype) == (1, 1, torch.int32)


def test_a_traced_graph_starts_both_directions_with_their_operands(monkeypatch) -> None:
    """Traced (fake tensors), the forward op's fake implementation starts the forward's
    compilation and the backward op's the backward's, with the gradient's own layout; the
    autograd setup_context starts nothing then (it does for eager calls); a call with a bias
    starts nothing. (Each hook called as AOTAutograd calls it: the autograd engine does not
    run on fake CUDA tensors without a GPU.)"""
    from types import SimpleNamespace

    from sparse_compile.codegen import precompile
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparse_compile import op

    calls = []

    def record(q, k, v, pattern, scale, backward, documents=False, dout=None):
        calls.append((pattern, backward, documents, None if dout is None else dout.stride()))
        return []

    monkeypatch.setattr(precompile, "precompile", record)
    ctx = SimpleNamespace(save_for_backward=lambda *tensors: None)
    with FakeTensorMode():
        q, k, v = (torch.randn(1, 64, h, 128, device="cuda", dtype=torch.bfloat16
                               ).transpose(1, 2) for h in (4, 2, 2))  # a model's layout
        inputs = (q, k, v, None, "causal", 0.1, 0.0, None)
        out, lse = op.attention_op(*inputs)
        op._setup_context(ctx, inputs, (out, lse))
        dout = torch.randn(1, 4, 64, 128, device="cuda", dtype=torch.bfloat16)  # contiguous
        op.attention_backward_op(dout, q, k, v, out, lse, None, "causal", 0.1, 0.0, None, False)
        bias = torch.zeros(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
        op.attention_op(q, k, v, bias, "causal", 0.1, 0.0, None)
    assert calls == [("causal", False, False, None), ("causal", True, False, dout.stride())]
