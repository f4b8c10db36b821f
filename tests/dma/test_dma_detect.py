"""The Doge pass: DogeForCausalLM compiled with the DMA rewrite equals the eager model."""

from __future__ import annotations

import pytest
import torch
from doge_site import doge_inputs, tiny_doge, valid_rows

from sparse_compile.dynamic_mask.detect import find_dma_sites, rewrite_dma_sites
from tests.conftest import rel_error


def compile_with_pass(model, sites):
    """Rewrite, then run the graph as is (Doge's backward under ``aot_eager`` fails on torch
    2.13 without any rewrite: a traced ``view`` meets a non-contiguous gradient)."""

    def backend(gm, example_inputs):
        sites.extend(rewrite_dma_sites(gm))
        assert not any("topk" in str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def loss_and_grads(model, fn, ids, mask):
    model.zero_grad()
    logits = fn(input_ids=ids, attention_mask=mask, use_cache=False).logits
    rows = valid_rows(mask)
    (logits[rows] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    attn = model.model.layers[0].self_attn
    params = [attn.A, attn.dt_proj.weight, attn.dt_proj.bias, attn.q_proj.weight,
              attn.v_proj.weight]
    return logits.detach()[rows], [p.grad.clone() for p in params]


@pytest.mark.parametrize("keep,kv_heads,pad", [(4, 2, [0, 3]), (5, 4, None), (40, 1, [2, 0])])
def test_doge_compiled_with_dma_pass_matches_eager(keep, kv_heads, pad):
    model = tiny_doge(keep, kv_heads)
    ids, mask = doge_inputs(2, 12, pad)
    expected, expected_grads = loss_and_grads(model, model, ids, mask)
    sites = []
    compiled = compile_with_pass(model, sites)
    actual, grads = loss_and_grads(model, compiled, ids, mask)
    assert len(sites) == 1 and sites[0].reason is None
    assert sites[0].module_path.endswith("layers.0.self_attn")
    assert sites[0].pattern == f"dma(keep={keep if keep < 12 else 2**31 - 1})"
    assert rel_error(actual, expected) < 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_error(g, e) < 2e-3


def test_dropout_in_training_is_not_rewritten():
    model = tiny_doge(4)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    ids, mask = doge_inputs(1, 10)
    found = []

    def backend(gm, example_inputs):
        found.extend(find_dma_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(found) == 1 and "dropout" in found[0].reason


def test_doge_with_pass_under_inductor():
    """The rewritten graph goes through AOTAutograd and Inductor (custom ops' fake kernels)."""
    from torch._inductor.compile_fx import compile_fx

    model = tiny_doge(4, 2)
    ids, mask = doge_inputs(2, 12, [0, 3])
    expected, expected_grads = loss_and_grads(model, model, ids, mask)
    sites = []

    def backend(gm, example_inputs):
        sites.extend(rewrite_dma_sites(gm))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    actual, grads = loss_and_grads(model, torch.compile(model, backend=backend), ids, mask)
    assert len(sites) == 1 and sites[0].reason is None
    assert rel_error(actual, expected) < 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_error(g, e) < 2e-3


def test_doge_mask_is_folded_and_its_backward_reuses_the_selection(monkeypatch, kernel_device):
    """Doge's mask (causal and padding, built from positions) is proven from the graph: the
    fused op runs, and its backward reuses the forward's selection instead of selecting
    again (one selection per step, where the data-checked path made two)."""
    from transformers import DogeConfig
    from transformers.models.doge.modeling_doge import DogeForCausalLM

    import sparse_compile.dynamic_mask.op as op

    calls = []
    real = op.dma_select

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "dma_select", counted)
    torch.manual_seed(0)
    config = DogeConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, keep_window_size=5,
                        max_position_embeddings=256, attention_bias=True, is_moe=False)
    config._attn_implementation = "eager"
    model = DogeForCausalLM(config).to(kernel_device)
    with torch.no_grad():
        model.model.layers[0].self_attn.A.copy_(torch.randn(2))
    ids, mask = doge_inputs(2, 12, [0, 3])
    ids, mask = ids.to(kernel_device), mask.to(kernel_device)
    expected, expected_grads = loss_and_grads(model, model, ids, mask)
    assert not calls
    sites = []
    actual, grads = loss_and_grads(model, compile_with_pass(model, sites), ids, mask)
    assert len(calls) == 1, f"{len(calls)} selections for one forward and backward"
    assert rel_error(actual, expected) < 1e-4
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_error(g, e) < 2e-3
