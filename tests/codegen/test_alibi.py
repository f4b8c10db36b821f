"""ALiBi computed in the kernels (``slope[h] * (k_pos - q_pos)``, nothing Lq x Lk built): every
kernel family and route, at every kind of position, against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.patterns import parse

from sparse_compile import fallback
from sparse_compile.functional import attention
from sparse_compile.reference import reference_attention
from tests.codegen.attention_cases import check_against_oracle, make_qkv
from tests.conftest import rel_error


def _slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])


TEXTS = ["causal & sliding(9)", "global(2) | local(6)", "dense"]
POSITIONS = [None, {"q_start": torch.tensor([30, 5])},
             {"documents": torch.tensor([0] * 13 + [1] * 11)}]
# Every pattern at two kinds of positions, every kind under two patterns (not the product).
CASES = [(text, POSITIONS[(i + j) % len(POSITIONS)]) for i, text in enumerate(TEXTS)
         for j in range(2)]


@pytest.mark.parametrize(("text", "positions"), CASES, ids=lambda x: None if isinstance(x, str)
                         else "-".join(x or ["default positions"]))
def test_alibi_matches_the_oracle(text, positions) -> None:
    lq, lk = (24, 24) if positions and "documents" in positions else (19, 37)
    q, k, v = make_qkv(2, 4, 2, lq, lk, 16, torch.float32)
    check_against_oracle(attention, q, k, v, text, positions=positions, alibi=_slopes(4))


def test_alibi_while_decoding() -> None:
    q, k, v = make_qkv(2, 4, 2, 1, 300, 16, torch.float32)
    check_against_oracle(attention, q, k, v, "causal & (sink(4) | sliding(40))",
                         positions={"q_start": 200}, grads=False, alibi=_slopes(4))


def test_alibi_on_the_chunked_pytorch_path() -> None:
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 9, 21, 8, torch.float32))
    out = fallback.chunked_attention(q, k, v, parse("causal"), max_scores=64,
                                     alibi=_slopes(4))
    assert rel_error(out, reference_attention(q, k, v, "causal", alibi=_slopes(4))) < 1e-5


def test_alibi_needs_one_slope_per_query_head() -> None:
    q, k, v = (t.detach() for t in make_qkv(1, 4, 2, 8, 8, 16, torch.float32))
    with pytest.raises(ValueError, match="3 slopes for 4 query heads"):
        attention(q, k, v, "causal", alibi=torch.ones(3))
