"""Dynamic patterns through ``sparse_compile.attention`` and through the backend's generic site
rewrite: dma (with delta) and topk, against the float64 oracles."""

from __future__ import annotations

import pytest
import torch
from test_dma_topk import dense_kept

from sparse_compile import attention
from sparse_compile.dynamic_mask.dispatch import MissingDeltaError, split_dynamic
from sparse_compile.dynamic_mask.reference import dma_reference
from sparse_compile.dynamic_mask.topk import topk_attention
from tests.conftest import rel_error

transformers = pytest.importorskip("transformers")


def qkv(b=2, hq=4, hkv=2, lq=24, lk=24, d=16, seed=0, device="cpu"):
    """q, k, v requiring grad on ``device``, drawn on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen, device="cpu")
    k, v = (torch.randn(b, hkv, lk, d, generator=gen, device="cpu") for _ in range(2))
    return [t.to(device).requires_grad_() for t in (q, k, v)]


def causal_padding_mask(b, lq, lk, pads):
    """Additive [B, 1, Lq, Lk] mask (0 / finfo.min): causal and left padding."""
    keys = torch.ones(b, lk, dtype=torch.bool)
    for row, n in enumerate(pads):
        keys[row, :n] = False
    pos = torch.arange(lq)[:, None] + lk - lq
    allowed = (torch.arange(lk)[None, :] <= pos)[None] & keys[:, None, :]
    low = torch.finfo(torch.float32).min
    return torch.where(allowed, 0.0, low)[:, None], keys


def assert_matches(out, ref, inputs, tol=1e-4):
    assert rel_error(out, ref) < tol
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) < tol


@pytest.mark.parametrize("masked", [False, True])
def test_attention_dma(masked, kernel_device):
    q, k, v = qkv(device=kernel_device)
    gen = torch.Generator().manual_seed(1)
    delta = (torch.rand(2, 2, 24, generator=gen, device="cpu") * 3).to(kernel_device)
    delta.requires_grad_()
    if masked:  # the model's dense mask: causal & padding, found at run time
        mask, _ = causal_padding_mask(2, 24, 24, [0, 5])
        out = attention(q, k, v, "dma(keep=5)", bias=mask, delta=delta)
        ref = dma_reference(q, k, v, delta, 5, causal=False, bias=mask)
    else:
        out = attention(q, k, v, "causal & dma(keep=5)", delta=delta)
        ref = dma_reference(q, k, v, delta, 5, causal=True)
    assert_matches(out, ref, (q, k, v, delta))


def test_attention_dma_needs_delta():
    q, k, v = qkv()
    with pytest.raises(MissingDeltaError, match="delta"):
        attention(q, k, v, "dma(keep=4)")


@pytest.mark.parametrize("text", ["dma(4) | causal", "topk(2) & sliding(8)", "~dma(3)"])
def test_unsupported_dynamic_forms(text):
    with pytest.raises(ValueError, match="not supported"):
        split_dynamic(text)


def topk_oracle(q, k, v, k_blocks, block, causal, keys=None):
    kept = dense_kept(q.detach(), k.detach(), k_blocks, block, causal)
    group = q.shape[1] // k.shape[1]
    kept = kept.repeat_interleave(group, dim=1)
    if keys is not None:
        kept = kept & keys[:, None, None, :]
    kk, vv = (t.double().repeat_interleave(group, 1) for t in (k, v))
    logits = (q.double() @ kk.transpose(-1, -2)) / q.shape[-1] ** 0.5
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1).nan_to_num(0.0)
    return probs @ vv


@pytest.mark.parametrize("mask_kind", ["causal", "keys", "dense"])
def test_attention_topk(mask_kind, kernel_device):
    q, k, v = qkv(lq=40, lk=40, seed=3, device=kernel_device)
    mask, keys = causal_padding_mask(2, 40, 40, [0, 9])
    if mask_kind == "causal":
        out = attention(q, k, v, "topk(1, block=16) & causal")
        ref = topk_oracle(q, k, v, 1, 16, True)
    elif mask_kind == "keys":  # [B, Lk] bool key padding, not causal
        out = attention(q, k, v, "topk(2, block=16)", bias=keys)
        ref = topk_oracle(q, k, v, 2, 16, False, keys)
    else:  # the model's dense causal & padding mask
        out = attention(q, k, v, "topk(1, block=16)", bias=mask)
        ref = topk_oracle(q, k, v, 1, 16, True, keys)
    assert_matches(out, ref, (q, k, v))


def test_topk_refuses_other_masks():
    q, k, v = qkv(lq=32, lk=32)
    band = torch.ones(32, 32, dtype=torch.bool).tril().triu(-4)[None, None].expand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="causal and key-padding"):
        attention(q, k, v, "topk(1, block=16)", bias=band)


def by_hand_topk(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    out = topk_attention(query, key, value, 1, 16, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("topk_by_hand", by_hand_topk)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_backend_topk_pattern(impl, kernel_device):
    """pattern="topk(1, block=16)" on a Llama: the rewritten model equals the model whose
    attention calls topk_attention by hand (itself checked against the oracle above)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("topk_by_hand")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 40), generator=gen, device="cpu").to(kernel_device)
    want = model(input_ids=ids).logits
    model.set_attn_implementation(impl)
    compiled = torch.compile(model, backend="sparse", options={
        "pattern": "topk(1, block=16)", "compiler": "aot_eager", "on_unsupported": "error"})
    got = compiled(input_ids=ids).logits
    assert rel_error(got, want) < 1e-5
    dense = model(input_ids=ids).logits  # the plain model differs: the pattern is active
    assert rel_error(dense, want) > 1e-3
