"""The decoding kernels (a few query rows against long keys, split over the keys and merged by
log-sum-exp): through the public call, against the float64 oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME
from sparse_compile.codegen.tl.decode import decode_applies
from triton.errors import TritonError

from sparse_compile.functional import attention
from tests.codegen.attention_cases import check_against_oracle, count_calls, make_qkv

PATTERNS = [
    "causal",                                # one interval
    "causal & (sink(4) | sliding(40))",      # two pieces: sinks and a window, nothing between
    "heads(causal, sink(2) | sliding(8))",   # pieces per head
    "global(3) | local(16)",                 # no union of two intervals: the hull
]


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize(("lq", "hq", "hkv", "lk", "positions"), [
    (1, 4, 1, 300, None),
    (3, 8, 2, 333, {"q_start": torch.tensor([200, 207])}),
    (2, 2, 2, 290, {"q_start": 120, "k_start": -5}),
])
def test_decoding_matches_the_oracle(monkeypatch, text, lq, hq, hkv, lk, positions) -> None:
    calls = count_calls(monkeypatch, kernels, "launch_decode")
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 16, torch.float32)
    check_against_oracle(attention, q, k, v, text, positions=positions, grads=False)
    assert calls, "the decoding kernels did not run"


def test_gradients_through_a_decoding_forward() -> None:
    """The backward runs the training kernels on the decoding forward's output and
    log-sum-exp (the same units and conventions)."""
    q, k, v = make_qkv(1, 4, 2, 2, 280, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal & (sink(4) | sliding(40))",
                         positions={"q_start": 150})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_with_a_key_mask_softcap_and_narrow_heads(dtype) -> None:
    text = "causal & (sink(4) | sliding(64))"
    q, k, v = make_qkv(2, 4, 2, 1, 300, 24, dtype)
    keys = torch.rand(2, 1, 1, 300) > 0.2
    keys[1] = False  # a batch row with no key left: zeros, never NaN

    def capped(q_, k_, v_, pattern, scale, bias):
        return attention(q_, k_, v_, pattern, scale, bias, softcap=5.0)

    check_against_oracle(capped, q, k, v, text, bias=keys, softcap=5.0)
    out = capped(q, k, v, text, None, keys)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decoding_is_chosen_only_for_decoding_shapes() -> None:
    q1, k1 = torch.empty(1, 32, 1, 128), torch.empty(1, 8, 4096, 128)
    assert decode_applies(q1, k1, 0.0, DEFAULT_FRAME)
    assert not decode_applies(q1, k1, 0.1, DEFAULT_FRAME)              # dropout
    assert not decode_applies(torch.empty(1, 32, 512, 128), k1, 0.0, DEFAULT_FRAME)
    assert not decode_applies(q1, torch.empty(1, 8, 128, 128), 0.0, DEFAULT_FRAME)


def _raise_inside_triton(message: str) -> None:
    """Raise a RuntimeError from a frame of the Triton package (as its compiler pipeline
    does when a pass fails)."""
    where = Path(triton.__file__).parent / "compiler" / "compiler.py"
    exec(compile(f"raise RuntimeError({message!r})", str(where), "exec"))


@pytest.mark.parametrize("failure", ["triton error", "raised inside triton"])
def test_a_failing_decoding_launch_falls_back_and_says_so(monkeypatch, caplog, failure) -> None:
    """If the family fails on a machine (a Triton without an operation it uses), the general
    kernels give the same answer, the failure is logged once and the family not tried again."""
    from sparse_compile.codegen.launch import fallbacks

    monkeypatch.setattr(fallbacks, "_failed", {})
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if failure == "triton error":
            raise TritonError("no such operation on this Triton")
        _raise_inside_triton("no such operation on this Triton")

    monkeypatch.setattr(kernels, "launch_decode", broken)
    q, k, v = make_qkv(1, 4, 2, 1, 300, 16, torch.float32)
    with caplog.at_level("WARNING", logger="sparse_compile"):
        check_against_oracle(attention, q, k, v, "causal & sliding(40)", grads=False)
        check_against_oracle(attention, q, k, v, "causal & sliding(40)", grads=False)
    assert len(calls) == 1 and "no such operation" in caplog.text


@pytest.mark.parametrize(("b", "hq", "lq", "lk"), [(0, 4, 1, 300), (2, 4, 0, 300),
                                                   (0, 4, 1, 0)])
def test_empty_decoding_inputs_give_an_empty_output_and_keep_the_family(
        monkeypatch, b, hq, lq, lk) -> None:
    """An empty batch (or no query row) is answered without a launch, and the decoding
    kernels still serve the next call."""
    from sparse_compile.codegen.launch import fallbacks

    monkeypatch.setattr(fallbacks, "_failed", {})
    q, k, v = (t.detach() for t in make_qkv(b, hq, 2, lq, lk, 16, torch.float32))
    assert not decode_applies(q, k, 0.0, DEFAULT_FRAME)
    out = attention(q, k, v, "causal & sliding(40)")
    assert out.shape == (b, hq, lq, 16)
    assert fallbacks.family_available("decode")
    calls = count_calls(monkeypatch, kernels, "launch_decode")
    q, k, v = make_qkv(1, 4, 2, 1, 300, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal & sliding(40)", grads=False)
    assert calls, "the decoding kernels did not run"


def test_an_error_in_the_launch_code_is_raised_not_a_fallback(monkeypatch) -> None:
    """Only Triton failing to compile or launch a kernel switches the family off: a bug in
    our launch code surfaces."""
    from sparse_compile.codegen.launch import fallbacks

    monkeypatch.setattr(fallbacks, "_failed", {})

    def wrong(*args, **kwargs):
        return 1 // 0

    monkeypatch.setattr(kernels, "launch_decode", wrong)
    q, k, v = make_qkv(1, 4, 2, 1, 300, 16, torch.float32)
    with pytest.raises(ZeroDivisionError):
        attention(q, k, v, "causal & sliding(40)")
    assert fallbacks.family_available("decode")
