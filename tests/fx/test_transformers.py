"""``transformers`` models from tiny configs, eager and SDPA attention: every attention layer
is found and rewritten, and logits and gradients equal the same model with the pattern applied
to its attention by hand. (transformers' FlexAttention path: ``test_flex_models.py``.)"""

from __future__ import annotations

import pytest
import torch

from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close
from tests.fx.hf_models import MODELS, gemma2, logits_of, training_step

PATTERN = "sliding(3) | strided(2)"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_pattern_by_hand(name, impl):
    torch.manual_seed(0)
    model, inputs, layers = MODELS[name](impl)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": PATTERN, "compiler": "aot_eager"})
    with collecting() as report:
        out, grads = training_step(model, inputs, compiled)
    assert len(report) == layers, str(report)
    assert all(row.rewritten for row in report), str(report)
    with pattern_by_hand(PATTERN):
        ref, ref_grads = training_step(model, inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)
    with torch.no_grad():
        dense = logits_of(model(**inputs))
    assert rel_error(out, dense) > 1e-3, "the pattern should change this model's logits"



def test_gemma2_soft_capped_attention_is_rewritten_with_its_cap():
    torch.manual_seed(0)
    model, inputs, layers = gemma2("eager")
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": PATTERN, "compiler": "aot_eager"})
    with collecting() as report:
        out, grads = training_step(model, inputs, compiled)
    assert len(report) == layers and all(row.rewritten for row in report), str(report)
    with pattern_by_hand(PATTERN):
        ref, ref_grads = training_step(model, inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with pattern_by_hand(PATTERN), torch.no_grad():
        uncapped = logits_of(model(**inputs))
    assert rel_error(out, uncapped) > 1e-3, "the cap should change this model's logits"
