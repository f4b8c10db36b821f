"""topk(k, block): block selection against a direct dense construction, attention against the
float64 oracle with the selected mask."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.dynamic_mask.topk import topk_attention, topk_blocks
from tests.conftest import rel_error


def dense_kept(q, k, k_blocks, block, causal):
    """Per-row keep mask [B, Hkv, Lq, Lk] built entry by entry from the block choice."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hkv, lq, lk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            qs = q[bi, h * (hq // hkv):(h + 1) * (hq // hkv)].double()
            for i in range(0, lq, block):
                qm = qs[:, i:i + block].mean(1).mean(0)
                p_first, p_last = i + lk - lq, min(i + block, lq) - 1 + lk - lq
                cands = []
                for j in range(0, lk, block):
                    if causal and j > p_last:
                        continue
                    cands.append((-(qm @ k[bi, h, j:j + block].double().mean(0)).item(), j))
                chosen = {j for _, j in sorted(cands)[:k_blocks]}
                chosen |= {j for j in range(0, lk, block)
                           if j <= p_last and j + block - 1 >= p_first}
                for j in chosen:
                    out[bi, h, i:i + block, j:j + block] = True
    if causal:
        pos = torch.arange(lq)[:, None] + lk - lq
        out &= torch.arange(lk)[None, :] <= pos
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,hq,hkv,lq,lk,kb,block", [(1, 2, 2, 64, 64, 1, 16),
                                                      (2, 4, 2, 40, 56, 2, 16),
                                                      (1, 2, 1, 48, 48, 9, 32)])
def test_topk_attention_matches_oracle(b, hq, hkv, lq, lk, kb, block, causal, kernel_device):
    gen = torch.Generator().manual_seed(lq + kb)
    q = torch.randn(b, hq, lq, 16, generator=gen, device="cpu")
    k = torch.randn(b, hkv, lk, 16, generator=gen, device="cpu")
    v = torch.randn(b, hkv, lk, 16, generator=gen, device="cpu")
    q, k, v = (t.to(kernel_device).requires_grad_() for t in (q, k, v))
    kept_blocks = topk_blocks(q, k, kb, block, causal)
    assert kept_blocks.shape == (b, hkv, -(-lq // block), -(-lk // block))
    mask = dense_kept(q.detach(), k.detach(), kb, block, causal)
    group = hq // hkv
    kept = mask.repeat_interleave(group, dim=1)
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) / 4.0
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1).nan_to_num(0.0)
    ref = probs @ v.double().repeat_interleave(group, 1)
    out = topk_attention(q, k, v, kb, block, causal)
    assert rel_error(out, ref) < 1e-4
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad.double()), strict=True):
        assert rel_error(g, w) < 1e-4
