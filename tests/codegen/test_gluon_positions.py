"""The Hopper Gluon kernels at positions other than the default alignment (a static cache's
fill level, a prompt placed at ``q_start``): the rows ``rows.shifted_rows`` builds on the device
(tested everywhere against the oracle's mask), where such calls are routed, and the kernels'
results against the float64 oracle (sm90 GPU only)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon import support
from sparse_compile.codegen.gluon.rows import interval_rows, shifted_rows
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.positions import Frame, starts_frame
from sparse_compile.patterns import parse

from sparse_compile.functional import attention
from sparse_compile.reference import kept_mask
from tests.codegen.attention_cases import (
    check_against_oracle,
    make_qkv,
    needs_gluon_gpu,
    strict_gluon,
)

PATTERNS = [
    "dense", "causal", "causal & sliding(7)", "local(5)", "block(6)", "sliding(4)",
    "causal | prefix(3)", "window(3, 2)", "heads(causal, causal & sliding(3))",
    "causal & (sink(2) | sliding(4))", "sink(3) | sliding(2)",
]
# (q_start, k_start): a static cache's fill level, the default alignment spelled out, a
# prompt at 0 with the cache's keys after it, keys at negative positions (left padding), far.
STARTS = [(30, 0), (8, 0), (0, 0), (5, -4), (1000, 990)]
CPU = torch.device("cpu")


def _rows_mask(rows, lq: int, lk: int) -> torch.Tensor:
    """[pattern heads, Lq, Lk]: the keys the rows' intervals keep."""
    keys = torch.arange(lk, device=CPU)
    covered = torch.zeros(rows.pattern_heads, lq, lk, dtype=torch.bool, device=CPU)
    for p in range(rows.pieces):
        lo, hi = rows.lo[p].long().cpu(), rows.hi[p].long().cpu()
        covered |= (keys >= lo[..., None]) & (keys <= hi[..., None])
    return covered


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("lq, lk", [(13, 13), (9, 21), (21, 9)])
@pytest.mark.parametrize("starts", STARTS)
def test_shifted_rows_are_exactly_the_kept_keys(text, lq, lk, starts) -> None:
    pattern = parse(text)
    rows = shifted_rows(pattern, lq, lk, torch.tensor([starts], device=CPU))
    assert rows is not None
    heads = rows.pattern_heads
    want = kept_mask(pattern, 1, heads, lq, lk, CPU, q_start=starts[0], k_start=starts[1])[0]
    assert torch.equal(_rows_mask(rows, lq, lk), want)
    # the dK/dV pass binary-searches each piece's bounds, and masks with the keys' intervals
    for p in range(rows.pieces):
        for bound in (rows.lo[p], rows.hi[p]):
            assert bool((bound[:, 1:] >= bound[:, :-1]).all())
        queries = torch.arange(lq, device=CPU)
        keys = torch.arange(lk, device=CPU)
        piece = ((keys >= rows.lo[p].long()[..., None]) & (keys <= rows.hi[p].long()[..., None]))
        first, last = rows.key_lo[p].long(), rows.key_hi[p].long()
        by_key = ((queries[:, None] >= first[:, None, :]) & (queries[:, None] <= last[:, None, :]))
        assert torch.equal(by_key, piece)


@pytest.mark.parametrize("text", ["causal & sliding(7)", "causal & (sink(2) | sliding(4))"])
def test_shifted_rows_at_the_default_alignment_are_the_plain_rows(text) -> None:
    pattern = parse(text)
    plain = interval_rows(pattern, 9, 21, CPU)
    shifted = shifted_rows(pattern, 9, 21, torch.tensor([[12, 0]], device=CPU))
    for a, b in zip((plain.lo, plain.hi, plain.key_lo, plain.key_hi),
                    (shifted.lo, shifted.hi, shifted.key_lo, shifted.key_hi), strict=True):
        assert torch.equal(a.cpu(), b)


class _NoHostRead(torch.Tensor):
    """A tensor whose values, and those of every tensor computed from it, must not reach the
    host: reading one (``item``, ``bool``, ``int``, ``tolist``...) fails the test."""

    _READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__,
              torch.Tensor.numpy}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._READS:
            raise AssertionError(f"the starts reached the host through {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_shifted_rows_never_read_the_starts_on_the_host() -> None:
    """Everything computed from the starts stays a tensor (on a GPU, on the device: no sync,
    and a CUDA graph replays the rows with new starts)."""
    text = "causal & (sink(2) | sliding(4))"
    starts = torch.tensor([[30, 4]], device=CPU).as_subclass(_NoHostRead)
    rows = shifted_rows(parse(text), 9, 21, starts)
    assert rows.lo.shape == (2, 1, 9) and rows.key_lo.shape == (2, 1, 21)
    want = kept_mask(parse(text), 1, 1, 9, 21, CPU, q_start=30, k_start=4)[0]
    plain = [torch.Tensor(t) for t in (rows.lo, rows.hi)]  # the values, outside the check
    assert torch.equal(_rows_mask(type(rows)(*plain, rows.key_lo, rows.key_hi), 9, 21), want)


@pytest.mark.parametrize("text", PATTERNS)
def test_shifted_rows_stay_on_the_starts_device(text) -> None:
    """Built from ``meta`` starts, every tensor of the rows is a ``meta`` one: no constant of
    a bound became a tensor on another device (a GPU call would mix devices, or copy a host
    tensor to the device, which a CUDA graph capture refuses)."""
    rows = shifted_rows(parse(text), 9, 21, torch.empty(1, 2, dtype=torch.int32, device="meta"))
    assert all(t.device.type == "meta" for t in (rows.lo, rows.hi, rows.key_lo, rows.key_hi))


@pytest.mark.parametrize("text", PATTERNS)
def test_shifted_rows_create_nothing_on_the_default_device(text) -> None:
    """With another default device (a user's ``set_default_device("cuda")``; ``meta`` here),
    the rows of CPU starts are built on the CPU and equal the oracle's mask."""
    with torch.device("meta"):
        rows = shifted_rows(parse(text), 9, 21, torch.tensor([[30, 4]], device=CPU))
    assert rows.lo.device == CPU and rows.key_hi.device == CPU
    want = kept_mask(parse(text), 1, rows.pattern_heads, 9, 21, CPU, q_start=30, k_start=4)[0]
    assert torch.equal(_rows_mask(rows, 9, 21), want)


@pytest.mark.parametrize("text", ["strided(4)", "axial(6)", "~local(3)"])
def test_patterns_without_closed_form_rows_have_no_shifted_rows(text) -> None:
    assert shifted_rows(parse(text), 9, 21, torch.tensor([[12, 0]], device=CPU)) is None


@pytest.mark.parametrize("request_env", ["", "gluon"])
def test_calls_at_shifted_positions_take_the_gluon_kernels_only_where_allowed(
        monkeypatch, request_env) -> None:
    """One pair of starts (fixed, or per batch with one row) goes to the Gluon kernels when
    they are asked for, without logit modifications (the kernels place those at the default
    alignment); starts that differ between batch rows never."""
    monkeypatch.setenv(support.KERNELS_ENV, request_env)
    cfg = TileConfig()
    one_pair = starts_frame(torch.tensor([[30, 0]], device=CPU))
    per_row = starts_frame(torch.tensor([[30, 0], [12, -3]], device=CPU))
    fixed = Frame(q_first=3, k_first=0)
    asked = request_env == "gluon"

    def call(frame, softcap=0.0):
        return kernels._gluon_call(cfg, None, 0.0, softcap, None, None, frame, 10, 40)

    assert call(one_pair) == asked and call(fixed) == asked
    assert not call(per_row)
    assert not call(one_pair, softcap=2.0)


def test_gluon_rows_of_a_shifted_call_are_the_shifted_rows(monkeypatch) -> None:
    """The dispatcher hands the kernels the rows at the call's starts: a per-batch tensor
    plus the frame's fixed starts."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    monkeypatch.setattr(kernels, "gluon_device", lambda device: True)
    q = torch.zeros(1, 2, 9, 128, dtype=torch.bfloat16, device=CPU)
    k = torch.zeros(1, 2, 21, 128, dtype=torch.bfloat16, device=CPU)
    frame = starts_frame(torch.tensor([[30, 4]], device=CPU))
    rows = kernels._gluon_rows(q, k, k, "causal & sliding(7)", frame)
    want = kept_mask(parse("causal & sliding(7)"), 1, 1, 9, 21, CPU, q_start=30, k_start=4)[0]
    assert torch.equal(_rows_mask(rows, 9, 21), want)


# --- the kernels themselves: sm90 GPU only -----------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("text", ["causal", "causal & (sink(2) | sliding(40))", "dense"])
def test_shifted_rows_replay_in_a_cuda_graph_with_new_starts(text) -> None:
    """Built inside a CUDA graph capture (no host read, no host-to-device copy), the rows
    replay with the starts written into the captured tensor, equal to rows built afresh."""
    pattern, device = parse(text), torch.device("cuda")
    starts = torch.tensor([[30, 4]], device=device)
    shifted_rows(pattern, 90, 210, starts)  # warm-up: caches, allocator
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows = shifted_rows(pattern, 90, 210, starts)
    for new in ([[30, 4]], [[500, 0]], [[0, -7]]):
        starts.copy_(torch.tensor(new, device=device))
        graph.replay()
        fresh = shifted_rows(pattern, 90, 210, starts.clone())
        for a, b in zip((rows.lo, rows.hi, rows.key_lo, rows.key_hi),
                        (fresh.lo, fresh.hi, fresh.key_lo, fresh.key_hi), strict=True):
            assert torch.equal(a, b), new


GPU_CASES = [
    # (pattern, B, Hq, Hkv, Lq, Lk, D, q_start, k_start)
    ("causal", 2, 4, 2, 300, 1024, 128, 0, 0),  # a prompt in a static cache of 1024
    ("causal & sliding(100)", 1, 4, 2, 517, 1500, 128, 200, 0),  # a chunk after 200 tokens
    ("causal & (sink(4) | sliding(64))", 1, 2, 1, 333, 900, 64, 400, 0),
    ("causal", 1, 2, 2, 256, 300, 128, 50, -20),  # left padding: keys before position 0
    ("local(50)", 1, 2, 2, 200, 200, 128, 30, 0),  # queries ahead of the keys
]


@needs_gluon_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-at{c[7]},{c[8]}")
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gluon_kernels_at_shifted_positions_match_the_oracle(monkeypatch, case,
                                                             as_tensor) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    text, b, hq, hkv, lq, lk, d, q_start, k_start = case
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, torch.bfloat16)
    if as_tensor:  # one row of per-batch starts on the device, as a static cache hands them
        positions = {"q_start": torch.tensor([q_start], device=q.device),
                     "k_start": torch.tensor([k_start], device=q.device)}
    else:
        positions = {"q_start": q_start, "k_start": k_start}
    check_against_oracle(attention, q, k, v, text, positions=positions)
    assert fwd and bwd, "the Gluon kernels did not run"


@pytest.mark.parametrize(("q_first", "k_first"), [(0, 0), (7, 0), (0, -2), (3, 5)])
def test_frame_starts_add_the_fixed_starts_to_the_per_batch_ones(q_first, k_first) -> None:
    frame = Frame(mode=starts_frame(torch.tensor([[30, 4]])).mode, q_first=q_first,
                  k_first=k_first, starts=torch.tensor([[30, 4]], dtype=torch.int32))
    got = kernels._frame_starts(frame, 9, 21, CPU)
    assert got.tolist() == [[30 + q_first, 4 + k_first]]
    fixed = kernels._frame_starts(Frame(q_first=q_first, k_first=k_first), 9, 21, CPU)
    assert fixed.tolist() == [[q_first, k_first]]
