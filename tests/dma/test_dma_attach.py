"""attach_dma on a model without DMA (Llama) and on Doge (which already has it)."""

from __future__ import annotations

import pytest
import torch
from doge_site import tiny_doge

from sparse_compile.dynamic_mask.attach import attach_dma, module_delta
from sparse_compile.dynamic_mask.functional import dma_attention

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config)


def test_attach_registers_trainable_parameters():
    model = tiny_llama()
    before = {id(p) for p in model.parameters()}
    attached = attach_dma(model, keep=8)
    assert [a.path for a in attached] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for a in attached:
        module = model.get_submodule(a.path)
        assert (a.kv_heads, a.head_dim, module.dma_keep) == (2, 8, 8)
        assert torch.equal(module.A, torch.zeros(2))
        assert module.dt_proj.weight.shape == (2, 16)
        assert 0 < module.dt_proj.weight.std() < 0.1
        assert id(module.A) not in before and id(module.A) in {id(p) for p in model.parameters()}

    module = model.get_submodule(attached[0].path)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 8, generator=gen)
    k, v = (torch.randn(1, 2, 20, 8, generator=gen) for _ in range(2))
    delta = module_delta(module, v)
    assert torch.allclose(delta, torch.ones(1, 2, 20))  # A = 0: Doge's starting point
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dma_attention(q, k, v, delta, keep=5).square().sum().backward()
    assert module.A.grad.abs().sum() > 0 and module.dt_proj.weight.grad is not None
    optimizer.step()
    assert module.A.abs().sum() > 0


def test_attach_keeps_doge_parameters():
    model = tiny_doge(4)
    attn = model.model.layers[0].self_attn
    a_before = attn.A.detach().clone()
    attached = attach_dma(model, keep=6)
    assert [a.path for a in attached] == ["model.layers.0.self_attn"]
    assert torch.equal(attn.A, a_before) and attn.dma_keep == 6


def test_attach_named_modules_and_errors():
    model = tiny_llama()
    attached = attach_dma(model, keep=4, modules=["model.layers.1.self_attn"])
    assert [a.path for a in attached] == ["model.layers.1.self_attn"]
    assert not hasattr(model.model.layers[0].self_attn, "A")
    with pytest.raises(ValueError, match="no such modules|cannot read"):
        attach_dma(model, keep=4, modules=["model.nope"])
    with pytest.raises(ValueError, match="keep"):
        attach_dma(model, keep=0)


def test_attach_needs_a_value_projection():
    """Modules whose values come from a fused projection must name it (or fail clearly)."""

    class OddAttention(torch.nn.Module):
        num_heads, num_key_value_heads, head_dim = 2, 2, 8

        def __init__(self):
            super().__init__()
            self.qk = torch.nn.Linear(16, 32)
            self.values = torch.nn.Linear(16, 16)  # V_flat [B, L, Hkv * D], unusual name

    model = torch.nn.Sequential(OddAttention())
    with pytest.raises(ValueError, match="value_projection"):
        attach_dma(model, keep=4)
    assert not hasattr(model[0], "A")  # nothing half-attached
    attached = attach_dma(model, keep=4, value_projection="values")
    assert [a.path for a in attached] == ["0"] and model[0].A.shape == (2,)
    assert model[0].values._dma_value_hook is not None
