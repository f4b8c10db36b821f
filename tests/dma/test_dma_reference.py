"""The float64 DMA reference against DogeAttention itself and against a brute-force rule."""

from __future__ import annotations

import pytest
import torch
from doge_site import doge_inputs, replace_dma_site, tiny_doge, valid_rows

from sparse_compile.dynamic_mask.reference import dma_reference, keep_mask
from tests.conftest import rel_error


def run_doge(model, ids, mask, site=None):
    """Logits and grads of (A, dt_proj.weight, dt_proj.bias, q_proj.weight) for a fixed loss."""
    model.zero_grad()
    if site is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
    else:
        with replace_dma_site(site):
            logits = model(input_ids=ids, attention_mask=mask).logits
    rows = valid_rows(mask)
    weight = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
    (logits[rows] * weight).sum().backward()
    attn = model.model.layers[0].self_attn
    grads = [attn.A.grad, attn.dt_proj.weight.grad, attn.dt_proj.bias.grad, attn.q_proj.weight.grad]
    return logits.detach()[rows], [g.clone() for g in grads]


def reference_site(causal: bool, rule: str):
    def site(q, k, v, delta, keep, bias, scale):
        return dma_reference(q, k, v, delta, keep, causal=causal, bias=bias, scale=scale, rule=rule)

    return site


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "keep,kv_heads,pad", [(5, 2, None), (3, 1, [0, 4]), (1, 4, [2, 0]), (40, 2, [3, 0])]
)
def test_reference_matches_doge(causal, keep, kv_heads, pad):
    """Random A (no ties): logits and gradients through delta to A / dt_proj equal Doge's."""
    model = tiny_doge(keep, kv_heads)
    ids, mask = doge_inputs(2, 13, pad)
    expected, expected_grads = run_doge(model, ids, mask)
    actual, grads = run_doge(model, ids, mask, reference_site(causal, "index"))
    assert rel_error(actual, expected) < 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert keep == 1 or e.abs().sum() > 0
        assert rel_error(g, e) < 2e-3


@pytest.mark.parametrize("a_scale", [0.0, 1.0])
def test_reference_topk_rule_matches_doge_with_ties(a_scale):
    """A = 0 makes every delta equal (Doge's initial state); repeated tokens tie delta exactly.
    The topk rule reproduces Doge's choice among ties on this device."""
    model = tiny_doge(4, a_scale=a_scale)
    ids, mask = doge_inputs(2, 16, [0, 3], repeats=True)
    expected, expected_grads = run_doge(model, ids, mask)
    actual, grads = run_doge(model, ids, mask, reference_site(True, "topk"))
    assert rel_error(actual, expected) < 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_error(g, e) < 2e-3


def brute_keep(delta, allowed, keep):
    """Row by row: the `keep` allowed keys of largest delta, lower index first among equals."""
    b, h, lk = delta.shape
    lq = allowed.shape[-2]
    out = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qi in range(lq):
                keys = [j for j in range(lk) if allowed[bi, 0, qi, j]]
                keys.sort(key=lambda j: (-delta[bi, hi, j].item(), j))
                out[bi, hi, qi, keys[:keep]] = True
    return out


@pytest.mark.parametrize("keep", [1, 2, 5, 9])
def test_index_rule_is_lowest_index_first(keep):
    gen = torch.Generator().manual_seed(keep)
    delta = torch.randint(0, 3, (2, 2, 9), generator=gen).float()
    allowed = torch.rand(2, 1, 7, 9, generator=gen) > 0.3
    assert torch.equal(keep_mask(delta, allowed, keep, "index"), brute_keep(delta, allowed, keep))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA torch.topk tie order")
def test_cuda_topk_breaks_ties_by_lower_index():
    delta = torch.randint(0, 4, (3, 4, 5000), device="cuda").float()
    allowed = torch.ones(1, 1, 1, 5000, dtype=torch.bool, device="cuda")
    for keep in (1, 100, 2048):
        assert torch.equal(keep_mask(delta, allowed, keep, "topk"), keep_mask(delta, allowed, keep))
