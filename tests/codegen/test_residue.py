"""The residue-class route of ``strided(s) & R`` patterns (codegen/routes/residue.py) against the
float64 oracle and against the general route, through the kernels and the public call."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.routes.residue import ResidueRoute, residue_route

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    check_against_oracle,
    check_route_matches_general,
    check_routed_case,
    count_calls,
    make_qkv,
)


@pytest.mark.parametrize(
    "text, inner",
    [("causal & strided(4)", "causal"), ("strided(8)", "dense"),
     ("strided(4) & sliding(9)", "sliding(3)"), ("local(9) & strided(2)", "window(2, 2)"),
     ("window(5, 7) & strided(3)", "window(1, 2)"), ("causal & sliding(6) & strided(3)",
                                                    "causal & sliding(2)")],
)
def test_route_compresses_the_rest_of_the_pattern(text, inner):
    assert residue_route(text, 48, 48, False, 0.0) == ResidueRoute(int(text.split("strided(")[1]
                                                                       .split(")")[0]), inner)


@pytest.mark.parametrize(
    "text, lq, lk, bias, dropout",
    [("strided(4) | causal", 64, 64, False, 0.0), ("strided(4) & block(8)", 64, 64, False, 0.0),
     ("causal & strided(4)", 62, 64, False, 0.0), ("causal & strided(4)", 64, 64, True, 0.0),
     ("causal & strided(4)", 64, 64, False, 0.1), ("strided(1) & causal", 64, 64, False, 0.0),
     ("heads(strided(4), causal)", 64, 64, False, 0.0)],
)
def test_route_is_not_taken_where_it_does_not_hold(text, lq, lk, bias, dropout):
    assert residue_route(text, lq, lk, bias, dropout) is None


# Each case in one input layout (not every case in both): the residue classes are then viewed
# by batch (contiguous, Hq == Hkv), by head (model layout, with and without GQA) or from a copy
# (contiguous with GQA; the backward's contiguous dout beside model-layout inputs).
C, M = False, True  # contiguous, model layout ([B, L, H, D] storage)


@pytest.mark.parametrize(
    "text, lq, lk, hq, hkv, noncontiguous",
    [("causal & strided(4)", 32, 32, 2, 2, C), ("strided(4)", 32, 48, 2, 1, C),
     ("sliding(9) & strided(4)", 48, 48, 4, 2, M), ("local(9) & strided(2)", 40, 40, 2, 2, M),
     ("causal & strided(8)", 48, 32, 2, 2, C), ("causal & strided(8)", 48, 32, 2, 2, M)],
    ids=lambda x: {False: "contiguous", True: "model-layout"}.get(x) if isinstance(x, bool)
    else None,
)
def test_routed_kernels_match_the_oracle(text, lq, lk, hq, hkv, noncontiguous):
    # Lq > Lk under causal leaves the first rows without keys: zeros, never NaN.
    assert residue_route(text, lq, lk, False, 0.0) is not None
    check_routed_case(text, lq, lk, hq, hkv, noncontiguous)


def test_routed_and_general_routes_agree(monkeypatch):
    check_route_matches_general(monkeypatch, "residue_route", "causal & strided(4)")


def test_public_call_takes_the_route(monkeypatch):
    calls = count_calls(monkeypatch, kernels, "_residue_forward")
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16, torch.bfloat16, noncontiguous=True)
    check_against_oracle(attention, q, k, v, "causal & strided(6)")
    assert calls
