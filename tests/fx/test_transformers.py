"""``transformers`` models from tiny configs, eager and SDPA attention: every attention layer
is found and rewritten, and logits and gradients equal the same model with the pattern applied
to its attention by hand. With FlexAttention, every layer is reported and left as it is."""

from __future__ import annotations

import pytest
import torch

import sparse_compile as sc
from sparse_compile.fx.flex import LEFT_TO_FLEX
from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close
from tests.fx.hf_models import MODELS, gemma2, llama

PATTERN = "sliding(3) | strided(4)"


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _step(model, inputs, compiled=None):
    out = _logits((model if compiled is None else compiled)(**inputs))
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_pattern_by_hand(name, impl):
    torch.manual_seed(0)
    model, inputs, layers = MODELS[name](impl)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": PATTERN, "compiler": "aot_eager"})
    with collecting() as report:
        out, grads = _step(model, inputs, compiled)
    assert len(report) == layers, str(report)
    assert all(row.rewritten for row in report), str(report)
    with pattern_by_hand(PATTERN):
        ref, ref_grads = _step(model, inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)
    with torch.no_grad():
        dense = _logits(model(**inputs))
    assert rel_error(out, dense) > 1e-3, "the pattern should change this model's logits"



def test_gemma2_soft_capped_attention_is_rewritten_with_its_cap():
    torch.manual_seed(0)
    model, inputs, layers = gemma2("eager")
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": PATTERN, "compiler": "aot_eager"})
    with collecting() as report:
        out, grads = _step(model, inputs, compiled)
    assert len(report) == layers and all(row.rewritten for row in report), str(report)
    with pattern_by_hand(PATTERN):
        ref, ref_grads = _step(model, inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with pattern_by_hand(PATTERN), torch.no_grad():
        uncapped = _logits(model(**inputs))
    assert rel_error(out, uncapped) > 1e-3, "the cap should change this model's logits"


def test_flex_attention_layers_are_reported_and_left_to_flex_attention():
    """The reference is the model's SDPA path, which computes the same causal attention: the
    flex path run uncompiled would first compile FlexAttention with Inductor."""
    torch.manual_seed(0)
    model, inputs, layers = llama("flex_attention")
    report = sc.explain(model, inputs["input_ids"], pattern=PATTERN, compiler="eager")
    assert [(r.form, r.rewritten, r.reason) for r in report] == [
        ("flex", False, LEFT_TO_FLEX)] * layers, str(report)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": PATTERN, "compiler": "eager"})
    with torch.no_grad():
        out = _logits(compiled(**inputs))
        model.set_attn_implementation("sdpa")
        ref = _logits(model(**inputs))
    assert rel_error(out, ref) < 1e-5
