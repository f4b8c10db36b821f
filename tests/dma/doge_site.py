"""Helpers for DMA tests: a tiny Doge model whose dynamic-mask attention site can be swapped."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

doge = pytest.importorskip("transformers.models.doge.modeling_doge")
from transformers import DogeConfig  # noqa: E402


def tiny_doge(keep: int, kv_heads: int = 2, seed: int = 0, a_scale: float = 1.0):
    """One-layer DogeForCausalLM (4 query heads, head dim 8), random A (zeros if a_scale=0)."""
    torch.manual_seed(seed)
    config = DogeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        keep_window_size=keep,
        max_position_embeddings=256,
        attention_bias=True,
        is_moe=False,
    )
    config._attn_implementation = "eager"
    model = doge.DogeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.copy_(a_scale * torch.randn_like(layer.self_attn.A))
    return model


@contextlib.contextmanager
def replace_dma_site(attention: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Run Doge with ``attention(q, k, v, delta, keep, bias, scale)`` in place of its masked
    eager attention; q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, delta ``[B, Hkv, L]``, bias the
    model's 4D float mask. The dynamic mask Doge builds is ignored."""
    cls = doge.DogeAttention
    original_prepare = cls.prepare_dynamic_mask
    original_eager = doge.eager_attention_forward
    stash: dict[str, object] = {}

    def prepare(self, hidden_states, dt_states, keep_window_size=2048, attention_mask=None):
        stash["delta"], stash["bias"], stash["keep"] = dt_states, attention_mask, keep_window_size
        return original_prepare(self, hidden_states, dt_states, keep_window_size, attention_mask)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out = attention(query, key, value, stash["delta"], stash["keep"], stash["bias"], scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    cls.prepare_dynamic_mask = prepare
    doge.eager_attention_forward = eager
    try:
        yield
    finally:
        cls.prepare_dynamic_mask = original_prepare
        doge.eager_attention_forward = original_eager


def doge_inputs(
    batch: int, length: int, pad: list[int] | None = None, seed: int = 1, repeats: bool = False
):
    """Token ids ``[batch, length]`` and a left-padding attention mask (``pad[b]`` pad tokens).

    Without ``repeats`` every row holds distinct tokens; in a one-layer model delta depends on
    the token only, so repeated tokens give exactly tied deltas."""
    gen = torch.Generator().manual_seed(seed)
    if repeats:
        ids = torch.randint(0, 6, (batch, length), generator=gen)
    else:
        ids = torch.stack([torch.randperm(64, generator=gen)[:length] for _ in range(batch)])
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pad or []):
        mask[row, :n] = 0
    return ids, mask


def valid_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: query rows with at least one allowed key (non-padding under left pad)."""
    return mask.bool()
