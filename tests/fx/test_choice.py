"""Choosing patterns: decorator on classes, functions and methods, ``assign`` by path glob and
class name, the precedence assign > decorator > pattern > default, and ``min_length``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparse_compile.decorate import sparsify
from sparse_compile.report import collecting, explain
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.zoo import Entry, ViTSelf


@sparsify("sliding(2)")
class DecoratedAttention(ViTSelf):
    """A ViT attention whose class declares its pattern."""

    def forward(self, x):
        return super().forward(x)


@sparsify("block(4)")
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An attention function declaring its pattern."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


class UsesFunction(Entry):
    def forward(self, x):
        return self.merge(attend(*self.qkv(x)))


class UsesMethod(Entry):
    @sparsify("strided(2)")
    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x):
        return self.merge(self.attention(*self.qkv(x)))


class Stack(nn.Module):
    """Two layers: a decorated class and a plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([DecoratedAttention(), ViTSelf()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _patterns(model, x, **options) -> list[str]:
    options.setdefault("compiler", "eager")
    with collecting() as report:
        torch.compile(model, backend="sparse", options=options)(x)
    assert all(r.rewritten for r in report), str(report)
    return [r.pattern for r in report]


def test_decorated_class_needs_no_options():
    torch.manual_seed(0)
    model, x = DecoratedAttention(), Entry.example_input()
    out = torch.compile(model, backend="sparse")(x)
    with pattern_by_hand("sliding(2)"):
        ref = model(x)
    assert rel_error(out, ref) < 1e-4


def test_decorated_function_and_method():
    x = Entry.example_input()
    assert _patterns(UsesFunction(), x) == ["block(4)"]
    torch._dynamo.reset()
    assert _patterns(UsesMethod(), x) == ["strided(2)"]


def test_undecorated_default_is_dense_and_pattern_option_applies():
    x = Entry.example_input()
    assert _patterns(ViTSelf(), x) == ["dense"]
    torch._dynamo.reset()
    assert _patterns(ViTSelf(), x, pattern="local(4)") == ["local(4)"]


def test_precedence_assign_over_decorator_over_pattern():
    x = Entry.example_input()
    assert _patterns(Stack(), x, pattern="causal") == ["sliding(2)", "causal"]
    torch._dynamo.reset()
    assert _patterns(Stack(), x, pattern="causal", assign={"blocks.0": "block(2)"}) == [
        "block(2)", "causal"]
    torch._dynamo.reset()
    assert _patterns(Stack(), x, assign={"ViTSelf": "local(2)"}) == ["local(2)", "local(2)"]
    torch._dynamo.reset()
    assert _patterns(Stack(), x, assign={"blocks.*": "sink(1)"}) == ["sink(1)", "sink(1)"]


def test_min_length_keeps_short_sites_dense():
    model, x = ViTSelf(), Entry.example_input()
    report = explain(model, x, pattern="sliding(2)", min_length=16, compiler="eager")
    assert [r.rewritten for r in report] == [False]
    assert "min_length" in report[0].reason
    out = torch.compile(model, backend="sparse",
                        options={"pattern": "sliding(2)", "min_length": 16})(x)
    assert rel_error(out, model(x)) < 1e-6


def test_explain_rows_and_table():
    model, x = Stack(), Entry.example_input()
    report = explain(model, x, pattern="causal")
    assert [r.module_path for r in report] == ["blocks.0", "blocks.1"]
    assert report[1].shapes["q"] == (2, 2, 8, 8)
    assert abs(report[1].density - 36 / 64) < 1e-9
    assert all(r.rewritten and r.reason is None for r in report)
    table = str(report)
    assert "blocks.0" in table and "sliding(2)" in table and "2 rewritten" in table


def test_explain_reports_a_model_whose_forward_reached_the_recompile_limit():
    model, x = ViTSelf(), Entry.example_input()
    for _ in range(12):  # each new backend callable recompiles the same frame
        torch.compile(model, backend=lambda gm, inputs: gm)(x)
    report = explain(model, x, pattern="causal", compiler="eager")
    assert [r.rewritten for r in report] == [True]


def test_assign_by_module_path_glob_and_class_name_in_a_transformers_model():
    from tests.fx.hf_models import llama

    model, inputs, layers = llama("sdpa")
    report = explain(model, inputs["input_ids"], compiler="eager", assign={
        "model.layers.0.self_attn": "sliding(2)", "LlamaAttention": "block(4)"})
    assert [r.module_path for r in report] == [f"model.layers.{i}.self_attn"
                                               for i in range(layers)]
    assert [r.pattern for r in report] == ["sliding(2) & causal", "block(4) & causal"]


class TwoSites(Entry):
    """Two attentions in one module: matmul/softmax, then SDPA, over the same projections."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        first = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1) @ v
        return self.merge(first + F.scaled_dot_product_attention(q, k, v))


class TwoSiteStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TwoSites(), TwoSites()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_assign_keys_with_a_site_index_tell_two_sites_of_one_module_apart():
    x = Entry.example_input()
    assign = {"blocks.0#1": "block(2)", "TwoSites#0": "sliding(2)", "blocks.*": "local(2)"}
    assert _patterns(TwoSiteStack(), x, assign=assign) == [
        "sliding(2)", "block(2)", "sliding(2)", "local(2)"]
    torch._dynamo.reset()
    # Only digits after '#' make an index: any other key is matched whole.
    assert _patterns(TwoSiteStack(), x, assign={"blocks.0#a": "block(2)", "blocks.1#2": "causal"},
                     pattern="sink(1)") == ["sink(1)"] * 4
