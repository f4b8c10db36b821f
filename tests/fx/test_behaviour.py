"""The backend as a user meets it: registration, options, unsupported sites, fallback,
inference modes, changing sequence lengths, Inductor, dropout and logging."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparse_compile.backend as backend_module
from sparse_compile.backend import sparse_backend, sparsify_graph
from sparse_compile.fx.choose import BackendOptions
from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close
from tests.fx.zoo import (
    BertSelf,
    BloomAlibi,
    EinsumSeqFirst,
    Entry,
    LlamaEager,
    NanoGPTFlash,
    TanhScores,
    ViTSelf,
)


def test_entry_point_works_without_import_and_options_arrive():
    script = textwrap.dedent("""
        import logging, sys, torch
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        assert "sparse_compile" not in sys.modules
        m = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        def f(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        q = torch.randn(1, 2, 8, 4)
        out = torch.compile(f, backend="sparse",
                            options={"pattern": "sliding(2)", "compiler": "eager"})(q, q, q)
        print("shape", tuple(out.shape))
    """)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shape (1, 2, 8, 4)" in done.stdout
    assert "sliding(2): rewritten" in done.stdout


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="unknown sparse backend option"):
        BackendOptions.from_mapping({"patern": "causal"})
    with pytest.raises(ValueError, match="compiler"):
        BackendOptions.from_mapping({"compiler": "tvm"})


def test_bad_pattern_text_raises_pattern_error():
    from sparse_compile.patterns import PatternError

    with pytest.raises(PatternError):
        BackendOptions.from_mapping({"pattern": "sliding(3"})


def test_unsupported_site_warns_and_runs_unchanged(caplog):
    model, x = TanhScores(), TanhScores.example_input()
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        out = torch.compile(model, backend="sparse", options={"pattern": "sliding(2)"})(x)
    assert rel_error(out, model(x)) < 1e-5
    assert any("soft-capping" in r.getMessage() for r in caplog.records)


def test_unsupported_site_raises_with_on_unsupported_error():
    model, x = TanhScores(), TanhScores.example_input()
    compiled = torch.compile(model, backend="sparse", options={"on_unsupported": "error"})
    with pytest.raises(Exception, match="soft-capping"):
        compiled(x)


def test_internal_failure_falls_back_to_the_captured_graph(monkeypatch, caplog):
    def broken(gm):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr("sparse_compile.backend.find_sites", broken)
    model, x = ViTSelf(), ViTSelf.example_input()
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        out = torch.compile(model, backend="sparse", options={"compiler": "eager"})(x)
    assert rel_error(out, model(x)) < 1e-6
    assert any("detector exploded" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="detector exploded"):
        torch.compile(model, backend="sparse", options={"on_unsupported": "error"})(x)
    assert backend_module.find_sites is broken


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_modes(mode):
    model, x = LlamaEager(), LlamaEager.example_input()
    compiled = torch.compile(model, backend="sparse", options={"pattern": "sliding(3)"})
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = compiled(x)
    with pattern_by_hand("sliding(3)"), torch.no_grad():
        ref = model(x)
    assert rel_error(out, ref) < 1e-4


@pytest.mark.parametrize("entry", [NanoGPTFlash, LlamaEager, BloomAlibi, EinsumSeqFirst],
                         ids=lambda e: e.__name__)
def test_changing_sequence_lengths(entry):
    model = entry()
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "sliding(3)", "compiler": "aot_eager"})
    for n in (8, 12, 16):  # a static graph, then a dynamic one, then that one reused
        x = torch.randn(2, n, 16, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        grad, x.grad = x.grad, None
        with pattern_by_hand("sliding(3)"):
            ref = model(x)
        ref.sum().backward()
        assert rel_error(out, ref) < 1e-4, n
        assert rel_error(grad, x.grad) < 1e-4, n


def test_inductor_training_step_matches():
    torch.manual_seed(0)
    model, x = LlamaEager(), LlamaEager.example_input()
    compiled = torch.compile(model, backend="sparse", options={"pattern": "sliding(3)"})
    with collecting() as report:
        compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with pattern_by_hand("sliding(3)"):
        model(x).square().sum().backward()
    assert [r.rewritten for r in report] == [True]
    assert_grads_close(grads, [p.grad for p in model.parameters()])


def _captured(model, x, **options) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(sparsify_graph(gm, BackendOptions.from_mapping(options)))
        return graphs[-1].forward

    torch.compile(model, backend=capture)(x)
    return graphs[0]


def test_rewritten_graph_has_one_op_call_and_no_softmax():
    gm = _captured(LlamaEager(), LlamaEager.example_input(), pattern="sliding(3)")
    code = gm.code
    assert code.count("functional_attention(") == 1
    assert "softmax" not in code and "matmul(" not in code and "expand" not in code


class _CachedAttention(torch.nn.Module):
    """Attention over a static cache buffer updated in place, the buffer marked static as
    transformers' StaticCache marks its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(1, 2, 16, 8))
        torch._dynamo.mark_static_address(self.keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.keys[:, :, : x.shape[2]].copy_(x)
        return F.scaled_dot_product_attention(x, self.keys, self.keys)


def test_rewritten_graph_keeps_what_dynamo_attached():
    """AOTAutograd finds static inputs (weights, a static cache) through the compile id, the
    parameter sources and each placeholder's source that Dynamo attaches to its graph; the
    rewritten graph must carry them, or Inductor's CUDA graphs copy every weight on each replay
    and refuse graphs that update a cache in place."""
    pairs = []

    def capture(gm, example_inputs):
        pairs.append((gm, sparsify_graph(gm, BackendOptions.from_mapping({"pattern": "causal"}))))
        return pairs[-1][1].forward

    torch.compile(_CachedAttention(), backend=capture)(torch.randn(1, 2, 16, 8))
    (captured, rewritten), = pairs
    assert "functional_attention(" in rewritten.code
    assert rewritten.meta["dynamo_compile_id"] == captured.meta["dynamo_compile_id"]
    assert rewritten._param_name_to_source is captured._param_name_to_source
    before = list(captured.graph.find_nodes(op="placeholder"))
    after = list(rewritten.graph.find_nodes(op="placeholder"))
    assert [n._dynamo_source for n in after] == [n._dynamo_source for n in before]
    static = [n for n in after if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
    assert static, "the static cache buffer lost its static mark"


def test_training_dropout_reaches_the_op():
    model = BertSelf()
    model.dropout.p = 0.25
    gm = _captured(model.train(), BertSelf.example_input())
    assert "dropout_p = 0.25" in gm.code
    gm = _captured(model.eval(), BertSelf.example_input())
    assert "dropout_p = 0.0" in gm.code


def test_kwargs_given_directly_merge_into_options():
    model, x = ViTSelf(), ViTSelf.example_input()
    with collecting() as report:
        torch.compile(model, backend=lambda gm, ex: sparse_backend(
            gm, ex, pattern="block(2)", compiler="eager"))(x)
    assert [r.pattern for r in report] == ["block(2)"]


class CausalCrossLengths(Entry):
    """SDPA ``is_causal=True`` with Lq = 4 < Lk = 8: PyTorch aligns that mask top-left."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q[:, :, :4], k, v, is_causal=True))


@pytest.mark.parametrize("pattern", ["dense", "strided(2)"])
def test_sdpa_is_causal_with_unequal_lengths_keeps_top_left_alignment(pattern):
    model, x = CausalCrossLengths(), Entry.example_input()
    out = torch.compile(model, backend="sparse",
                        options={"pattern": pattern, "compiler": "aot_eager"})(x)
    with pattern_by_hand(pattern):
        ref = model(x)
    assert rel_error(out, ref) < 1e-4


def test_in_place_updates_of_inputs_and_views_are_kept():
    def f(x, y):
        x.add_(1)
        s = y * 2
        view = s.view(-1)
        s.mul_(3)
        return view + 0

    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    out = torch.compile(f, backend="sparse", options={"compiler": "eager"})(x, y)
    assert torch.equal(x, torch.ones(2, 3))
    assert torch.equal(out, torch.full((6,), 6.0))


def test_min_length_with_dynamic_lengths_recompiles_across_the_threshold():
    model = NanoGPTFlash()
    compiled = torch.compile(model, backend="sparse", dynamic=True, options={
        "pattern": "sliding(2)", "min_length": 10, "compiler": "eager"})
    for n, sparse in ((8, False), (16, True), (12, True), (9, False)):
        x = torch.randn(2, n, 16)
        out = compiled(x)
        with pattern_by_hand("sliding(2)" if sparse else "dense"):
            ref = model(x)
        assert rel_error(out, ref) < 1e-4, n
