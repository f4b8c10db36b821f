"""transformers' FlexAttention path (``attn_implementation="flex_attention"``), Llama and Qwen2
from tiny configs, compiled with the sparse backend: every layer's ``flex_attention`` call is
rewritten, its ``mask_mod`` folded (causal, key padding, packed documents), and logits and
gradients equal the FlexAttention model's, or, with a pattern added, the model's SDPA path with
the pattern applied by hand.

transformers builds the ``BlockMask`` in a graph of its own (``create_block_mask(_compile=True)``
breaks the graph on torch 2.13), so the flex calls receive it, and the tensors its ``mask_mod``
reads, as inputs: the packed document ids are checked when the op runs."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close, no_lq_by_lk, recording_op_inputs

transformers = pytest.importorskip("transformers")

LENGTHS = [4, 3, 5]  # packed documents


def _model(family: str, impl: str = "flex_attention"):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.set_attn_implementation(impl)
    return model.eval()


def _inputs(kind: str) -> dict:
    ids = torch.randint(0, 64, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "use_cache": False}
    if kind == "padded":
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        inputs["attention_mask"] = mask
    if kind == "packed":
        inputs["position_ids"] = torch.cat([torch.arange(n) for n in LENGTHS])[None].expand(2, -1)
    return inputs


def _step(model, compiled, inputs):
    out = compiled(**inputs).logits
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.usefixtures("flex_grads")
@pytest.mark.parametrize(("family", "kind", "folded"), [
    ("llama", "padded", "folded: causal, key padding"),
    ("qwen2", "packed", "folded: causal, documents (checked at run time)"),
])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_flex_path_equals_flex_attention(family, kind, folded, compiler):
    """``aot_eager`` re-traces the rewritten graph over fake tensors, as Inductor does: the
    path where the document checks once read the ids on the host and failed the compilation
    (on torch 2.11; ``test_layout_checks_trace_into_device_asserts`` pins the mechanism on
    every torch)."""
    model, inputs = _model(family), _inputs(kind)
    compiled = torch.compile(model, backend="sparse", options={"compiler": compiler})
    with collecting() as report, recording_op_inputs() as calls:
        out, grads = _step(model, compiled, inputs)
    assert [(r.form, r.rewritten, r.mask) for r in report] == [("flex", True, folded)] * 2, (
        str(report))
    no_lq_by_lk(calls)
    torch._dynamo.reset()
    ref, ref_grads = _step(model, torch.compile(model, backend="eager"), inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)


@pytest.mark.usefixtures("flex_grads")
def test_flex_path_with_a_pattern_equals_the_pattern_by_hand():
    pattern = "causal & sliding(3)"
    model, inputs = _model("llama"), _inputs("plain")
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": pattern, "compiler": "eager"})
    with collecting() as report:
        out, grads = _step(model, compiled, inputs)
    assert all(r.form == "flex" and r.rewritten for r in report) and len(report) == 2
    model.set_attn_implementation("sdpa")
    with pattern_by_hand(pattern):
        ref, ref_grads = _step(model, model, inputs)
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)
