"""attach_dma + backend="sparse" with pattern="dma(keep=...)" on a model that never had DMA
(Llama): logits and gradients (A and dt_proj included) against a float64 copy of the model whose
attention applies the same DMA by hand (``dma_reference``)."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_compile.dynamic_mask.attach import attach_dma, module_delta
from sparse_compile.dynamic_mask.reference import dma_reference
from tests.conftest import rel_error

transformers = pytest.importorskip("transformers")
KEEP = 3


def by_hand(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: DMA in float64 with delta from the module's own
    A and dt_proj; the model's mask (or causality when it passes none) is kept."""
    delta = module_delta(module, value)
    causal = attention_mask is None
    out = dma_reference(query, key, value, delta, KEEP, causal=causal, bias=attention_mask,
                        scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("dma_by_hand", by_hand)


def tiny_llama(impl: str, hidden: int = 64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(impl)
    attach_dma(model, keep=KEEP)
    with torch.no_grad():  # a trained-looking A: selections that differ per head and key
        for layer in model.model.layers:
            layer.self_attn.A.copy_(torch.randn(2))
    return model


def grads(model, loss):
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


# head dim 16 runs the fused kernels (on the kernel device), head dim 8 the chunked path (on the
# CPU)
@pytest.mark.parametrize("impl,hidden", [("eager", 64), ("sdpa", 64), ("eager", 32)])
def test_attached_dma_trains_through_backend(impl, hidden, request):
    device = request.getfixturevalue("kernel_device") if hidden == 64 else "cpu"
    model = tiny_llama(impl, hidden)
    reference = copy.deepcopy(model).double()
    reference.set_attn_implementation("dma_by_hand")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 10), generator=gen, device="cpu").to(device)

    # Uncompiled, the attached model is the plain model: the hook does nothing eagerly.
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:
        for hook_owner in (layer.self_attn.v_proj,):
            hook_owner._dma_value_hook.remove()
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)

    compiled = torch.compile(model, backend="sparse", options={
        "pattern": f"dma(keep={KEEP})", "compiler": "aot_eager", "on_unsupported": "error"})
    logits = compiled(input_ids=ids).logits
    want = reference(input_ids=ids).logits
    assert rel_error(logits, want) < 1e-4
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(logits.shape, generator=gen, device="cpu").to(device)
    got = grads(model, (logits * weight).sum())
    ref = grads(reference, (want * weight.double()).sum())
    for name in ("model.layers.0.self_attn.A", "model.layers.1.self_attn.dt_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight"):
        assert got[name] is not None and got[name].abs().sum() > 0, name
        assert rel_error(got[name], ref[name]) < 1e-4, name


def test_dma_without_attach_fails_loudly():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    compiled = torch.compile(model, backend="sparse", options={
        "pattern": "dma(keep=4)", "compiler": "eager", "on_unsupported": "error"})
    with pytest.raises(Exception, match="attach_dma"):
        compiled(input_ids=torch.zeros(1, 8, dtype=torch.long))
