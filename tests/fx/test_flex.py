"""FlexAttention calls (``sparse_compile.fx.flex``): each is an attention site of ``explain``
(form ``flex``), read into its operands, logged as left to FlexAttention, and the model runs
exactly as it does without the backend."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import sparse_compile as sc
from sparse_compile.fx.flex import LEFT_TO_FLEX, find_flex_calls

B, HQ, HKV, L, D = 2, 4, 2, 16, 8


class Documents(torch.nn.Module):
    """Packed documents with a relative-position bias, FlexAttention's way: ``mask_mod`` keeps
    causal pairs of one document (it reads the document ids), ``score_mod`` adds a per-head
    bias that reads a table; GQA, an explicit scale, small blocks."""

    def __init__(self, return_lse: bool = False) -> None:
        super().__init__()
        self.register_buffer("document", torch.tensor([0] * 10 + [1] * 6), persistent=False)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(HQ, 2 * L))
        self.return_lse = return_lse

    def forward(self, q, k, v):
        document, bias = self.document, self.bias

        def same_document_causal(b, h, q_idx, kv_idx):
            return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx - kv_idx + L]

        mask = create_block_mask(same_document_causal, None, None, L, L, device="cpu",
                                 BLOCK_SIZE=8)
        return flex_attention(q, k, v, score_mod=relative_bias, block_mask=mask, scale=0.25,
                              enable_gqa=True, return_lse=self.return_lse)


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, HQ, L, D, generator=g), torch.randn(B, HKV, L, D, generator=g),
            torch.randn(B, HKV, L, D, generator=g))


def _calls(model: torch.nn.Module, *args: torch.Tensor) -> list:
    calls = []

    def capture(gm, example_inputs):
        calls.extend(find_flex_calls(gm))
        return gm.forward

    torch.compile(model, backend=capture)(*args)
    return calls


def test_explain_reports_the_flex_site_and_its_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        report = sc.explain(Documents(), *_inputs(), pattern="causal & sliding(8)",
                            compiler="eager")
    assert [(r.form, r.shapes["q"], r.shapes["k"], r.rewritten, r.reason) for r in report] == [
        ("flex", (B, HQ, L, D), (B, HKV, L, D), False, LEFT_TO_FLEX)]
    assert any(LEFT_TO_FLEX in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_flex_model_runs_as_before(compiler):
    model, (q, k, v) = Documents(), _inputs()
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "sliding(2)", "compiler": compiler})
    out = compiled(q, k, v)
    out.square().sum().backward()
    grad = model.bias.grad.clone()
    model.zero_grad()
    ref = model(q, k, v)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, model.bias.grad, rtol=1e-4, atol=1e-6)


def test_flex_call_operands():
    q, k, v = _inputs()
    (call,) = _calls(Documents(return_lse=True), q, k, v)
    assert [n.meta["example_value"].shape for n in (call.query, call.key, call.value)] == [
        q.shape, k.shape, v.shape]
    assert (call.scale, call.enable_gqa, call.return_lse) == (0.25, True, True)
    mask = call.block_mask
    assert (mask.q_length, mask.kv_length, mask.q_block, mask.kv_block) == (L, L, 8, 8)
    assert mask.kv_num_blocks.meta["example_value"].shape == (1, 1, L // 8)
    assert mask.kv_indices.meta["example_value"].shape == (1, 1, L // 8, L // 8)
    assert isinstance(mask.mask_mod, torch.fx.GraphModule)
    assert isinstance(call.score_mod, torch.fx.GraphModule)
    # Each mod reads its tensor from outside: the document ids, the bias table.
    assert [t.meta["example_value"].shape for t in mask.mask_mod_buffers] == [(L,)]
    assert [t.meta["example_value"].shape for t in call.score_mod_buffers] == [(HQ, 2 * L)]
    assert "OUTPUT_LOGSUMEXP" in call.kernel_options


def test_flex_site_raises_with_on_unsupported_error():
    compiled = torch.compile(Documents(), backend="sparse",
                             options={"on_unsupported": "error", "compiler": "eager"})
    with pytest.raises(Exception, match="left to FlexAttention"):
        compiled(*_inputs())
