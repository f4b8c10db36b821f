"""Queries placed by the KV cache a model writes in place: gpt-fast's ``KVCache.update``
(``k_cache[:, :, input_pos] = k``), decoding and chunked prefill, against the model run
uncompiled in float64 with the pattern written into its own mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sparse_compile.patterns import parse

from sparse_compile.report import collecting
from tests.conftest import rel_error

CAPACITY = 32


class KVCache(torch.nn.Module):
    """gpt-fast's static cache: a buffer of ``CAPACITY`` keys written at ``input_pos``."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, CAPACITY, dim))
        self.register_buffer("v_cache", torch.zeros(1, heads, CAPACITY, dim))

    def update(self, input_pos, k, v):
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        return k_out, v_out


class Attention(torch.nn.Module):
    """gpt-fast's attention: GQA over the whole cache, its causal mask gathered at
    ``input_pos`` (a bias the pass cannot read as positions)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        dim = heads * head_dim
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.kv_cache = KVCache(kv_heads, head_dim)
        self.register_buffer("causal_mask", torch.tril(torch.ones(CAPACITY, CAPACITY,
                                                                  dtype=torch.bool)))

    def forward(self, x, input_pos):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, t, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(
            2, dim=1)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask = self.causal_mask[None, None, input_pos]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(b, t, -1)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("pattern", ["causal & sliding(8)", "causal & (sink(2) | sliding(4))"])
def test_a_cache_written_by_setitem_places_the_queries(pattern, dynamic) -> None:
    """Chunked prefill (6 then 4 tokens) and three decoding steps: every step's output equals
    the model's own in float64 with ``pattern`` written into its causal mask."""
    torch.manual_seed(0)
    model = Attention().eval()
    by_hand = copy.deepcopy(model).double()
    by_hand.causal_mask &= parse(pattern).mask(CAPACITY, CAPACITY)
    compiled = torch.compile(model, backend="sparse", dynamic=dynamic,
                             options={"pattern": pattern, "compiler": "eager"})
    x = torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(1))
    steps = [(0, 6), (6, 10), (10, 11), (11, 12), (12, 13)]
    with collecting() as report, torch.no_grad():
        for start, end in steps:
            pos = torch.arange(start, end)
            out = compiled(x[:, start:end], pos)
            expected = by_hand(x[:, start:end].double(), pos)
            error = rel_error(out, expected)
            assert error < 1e-4, (start, end, error)
    assert report and all(r.rewritten for r in report), str(report)
    assert all("positions from the cache" in r.mask for r in report), str(report)


def test_cache_positions_with_a_gap_are_refused_at_run_time() -> None:
    """Positions the pass cannot read are taken on the condition that they are consecutive:
    a step written at positions with a gap raises instead of placing its queries wrongly."""
    from sparse_compile.positions import PositionError

    model = Attention().eval()
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "causal & sliding(8)", "compiler": "eager"})
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        compiled(x, torch.arange(3))
        with pytest.raises(PositionError, match="consecutive"):
            compiled(x, torch.tensor([3, 4, 6]))
