"""Generated forward / dQ / dK-dV kernels against the float64 oracle (Triton interpreter on CPU).

Every case compares the output and the gradients of q, k, v (and of the bias when it requires
grad). Inputs are fresh random normals; lengths are ragged with respect to the 16 x 16 tiles
the interpreter uses, so EMPTY, PARTIAL and FULL blocks and ragged edges all occur.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from sparse_compile.codegen.tl.module import kernel_module
from sparse_compile.patterns import parse

from sparse_compile.functional import attention
from sparse_compile.op import kernels_available
from tests.codegen.attention_cases import PRIMITIVES, check_against_oracle, make_qkv, random_pattern


def run(q, k, v, pattern, scale, bias):
    return attention(q, k, v, pattern, scale=scale, bias=bias)


def test_interpreter_runs_the_kernels():
    q, k, v = make_qkv(1, 1, 1, 20, 20, 16, torch.float32)
    assert kernels_available(q), "tests must exercise the kernels (TRITON_INTERPRET=1 on CPU)"
    run(q, k, v, "causal & sliding(5)", None, None)
    src = Path(kernel_module(parse("causal & sliding(5)")).__file__).read_text()
    assert "def _fwd_kernel" in src and "def _dq_kernel" in src and "def _dkdv_kernel" in src
    assert "INTERVAL = tl.constexpr(True)" in src


@pytest.mark.parametrize("text", PRIMITIVES)
def test_each_primitive(text):
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, torch.float32)
    check_against_oracle(run, q, k, v, text)


@pytest.mark.parametrize("case", range(8))
def test_random_compositions_ragged_gqa(case):
    rng = random.Random()
    text = random_pattern(rng, depth=rng.choice([1, 2, 3]))
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2])
    lq, lk = rng.randint(9, 70), rng.randint(9, 70)
    q, k, v = make_qkv(rng.choice([1, 2]), hq, hkv, lq, lk, 16, torch.float32)
    check_against_oracle(run, q, k, v, text)


@pytest.mark.parametrize(
    "text, lq, lk",
    [("causal", 20, 50), ("causal & sliding(6)", 50, 20), ("strided(3) | sink(2)", 33, 71),
     ("local(11)", 7, 60), ("fanout", 64, 17), ("block(10) & causal", 1, 45)],
)
def test_lq_differs_from_lk(text, lq, lk):
    q, k, v = make_qkv(1, 2, 2, lq, lk, 16, torch.float32)
    check_against_oracle(run, q, k, v, text)


@pytest.mark.parametrize("d", [16, 24, 80, 96, 160, 256])
def test_head_dims(d):
    q, k, v = make_qkv(1, 2, 1, 24, 24, d, torch.float32)
    check_against_oracle(run, q, k, v, "causal & sliding(9) | strided(5)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("text", ["causal & sliding(9)", "axial(6) | sink(2)"])
def test_half_precision(dtype, text):
    q, k, v = make_qkv(1, 2, 1, 37, 37, 32, dtype)
    check_against_oracle(run, q, k, v, text)


@pytest.mark.parametrize("text", ["local(9)", "strided(3) | causal"])
def test_noncontiguous_inputs(text):
    q, k, v = make_qkv(2, 4, 2, 30, 45, 16, torch.float32, noncontiguous=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_oracle(run, q, k, v, text)


# Each broadcast shape of the bias under one of an interval pattern and a table pattern (the
# full shape under both), not every shape under both.
@pytest.mark.parametrize(
    "shape, text",
    [((2, 4, 30, 30), "causal & sliding(8)"), ((2, 4, 30, 30), "strided(4) | global(2)"),
     ((1, 4, 1, 30), "strided(4) | global(2)"), ((2, 1, 30, 1), "causal & sliding(8)"),
     ((30, 30), "strided(4) | global(2)"), ((1, 1, 1, 1), "causal & sliding(8)")],
    ids=str,
)
def test_additive_bias_and_its_gradient(shape, text):
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16, torch.float32)
    bias = torch.randn(shape, dtype=torch.float32, requires_grad=True)
    errs = check_against_oracle(run, q, k, v, text, bias=bias)
    assert "dbias" in errs


def test_bool_mask_bias():
    q, k, v = make_qkv(2, 2, 2, 33, 40, 16, torch.float32)
    keep = torch.rand(2, 1, 33, 40) > 0.4
    check_against_oracle(run, q, k, v, "local(15) | fanout", bias=keep)


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 1, 25, 25, 16, torch.float32)
    check_against_oracle(run, q, k, v, "causal", scale=0.37)


@pytest.mark.parametrize("text", ["heads(causal, local(7), strided(3))", "heads(sink(2), dense)"])
def test_per_head_patterns(text):
    q, k, v = make_qkv(1, 6, 3, 35, 35, 16, torch.float32)
    check_against_oracle(run, q, k, v, text)


@pytest.mark.parametrize(
    "text, lq, lk, empty_rows",
    [("prefix(10)", 30, 30, slice(10, 30)), ("causal", 40, 25, slice(0, 15)),
     ("~dense", 20, 20, slice(0, 20))],
)
def test_fully_masked_rows_give_zeros_and_zero_grads(text, lq, lk, empty_rows):
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16, torch.float32)
    out = run(q, k, v, text, None, None)
    assert torch.equal(out[:, :, empty_rows], torch.zeros_like(out[:, :, empty_rows]))
    dq, = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(dq[:, :, empty_rows], torch.zeros_like(dq[:, :, empty_rows]))
    check_against_oracle(run, q, k, v, text)


def test_bias_masking_whole_rows():
    q, k, v = make_qkv(1, 2, 1, 24, 24, 16, torch.float32)
    bias = torch.zeros(1, 1, 24, 24)
    bias[..., 5, :] = float("-inf")
    out = run(q, k, v, "dense", None, bias)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    check_against_oracle(run, q, k, v, "dense", bias=bias)


@pytest.mark.parametrize(
    "text, lq, lk",
    [("sliding(40)", 80, 80), ("local(41)", 77, 83), ("block(32)", 80, 80),
     ("window(20, 30)", 70, 90), ("causal & sliding(33)", 90, 75), ("prefix(50)", 80, 80)],
)
def test_wide_intervals_mix_full_and_partial_blocks(text, lq, lk):
    # Windows several tiles wide: the in-kernel ranges then contain FULL blocks (no mask) on
    # both sides of PARTIAL ones, in the forward, dQ and dK/dV passes.
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16, torch.float32)
    check_against_oracle(run, q, k, v, text)
