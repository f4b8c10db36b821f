"""Softmax in its spellings (``sparse_compile.fx.softmax``): every way of writing a softmax over
the key axis by hand is one rewritable site; the forms recognised only in part are reported
with the reason they are not a softmax, and left as they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_compile as sc
from sparse_compile.fx.detect import find_sites


def _by_hand(s):
    a = s - s.amax(-1, keepdim=True)
    a = a.exp()
    return a / a.sum(-1, keepdim=True)


def _values_reciprocal(s):
    e = torch.exp(s - s.max(dim=3, keepdim=True).values)
    return e * e.sum(dim=3, keepdim=True).reciprocal()


def _index_one_over(s):
    e = torch.exp(s - torch.max(s, -1, keepdim=True)[0].detach())
    return e * (1 / torch.sum(e, dim=[-1], keepdim=True))


def _reciprocal_times_one(s):
    # How Dynamo records ``1 / sum`` in some states: ``sum.reciprocal() * 1``.
    e = torch.exp(s)
    return e * (torch.sum(e, dim=-1, keepdim=True).reciprocal() * 1)


def _reciprocal_first(s):
    e = s.exp()
    return torch.reciprocal(e.sum(-1, True)) * e


def _torch_div(s):
    e = torch.exp(s)
    return torch.div(e, e.sum(-1, keepdim=True))


def _div_method(s):
    e = s.exp()
    return e.div(e.sum(-1, keepdim=True))


def _exp_twice(s):
    return torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)


def _upcast(s):
    a = s.double()
    a = a - a.amax(3, keepdim=True)
    a = a.exp()
    return (a / a.sum(3, keepdim=True)).float()


def _in_place(s):
    e = s.exp()
    e /= e.sum(-1, keepdim=True)
    return e


SOFTMAXES = [
    _by_hand, _values_reciprocal, _index_one_over, _reciprocal_times_one, _reciprocal_first,
    _torch_div, _div_method,
    _exp_twice,
    _upcast, _in_place,
    lambda s: torch.exp(torch.log_softmax(s, -1)),
    lambda s: F.log_softmax(s, dim=3).exp(),
    lambda s: s.log_softmax(-1).exp(),
]


class _Attention(torch.nn.Module):
    """``weights(x xᵀ / 2) x``; ``weights`` may also return a second result, returned too."""

    def __init__(self, weights) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, x):
        w = self.weights(x @ x.transpose(-1, -2) / 2)
        return (w[0] @ x, w[1]) if isinstance(w, tuple) else w @ x


def _sites(weights, x: torch.Tensor) -> list:
    """The sites found in the graph Dynamo captures for ``_Attention(weights)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_Attention(weights), backend=capture)(x)
    return find_sites(graphs[0])


@pytest.mark.parametrize("weights", SOFTMAXES, ids=lambda f: f.__name__.strip("_<>"))
def test_softmax_spellings_are_one_rewritable_site(weights):
    sites = _sites(weights, torch.randn(2, 2, 8, 4))
    assert [(site.form, site.reason) for site in sites] == [("matmul", None)]


def _max_over_queries(s):
    e = (s - s.amax(-2, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def _relu_normalised(s):
    w = s.relu()
    return w / w.sum(-1, keepdim=True)


PARTIAL = [
    (lambda s: s.exp() / s.exp().sum(-2, keepdim=True), "softmax over axis -2"),
    (lambda s: torch.exp(torch.log_softmax(s, -2)), "softmax over axis -2"),
    (_max_over_queries, "maximum over axis -2"),
    (lambda s: s / s.sum(-1, keepdim=True), "without an exp"),
    (_relu_normalised, "without an exp"),
    (lambda s: s.exp() / s.exp().sum(-1), "without keepdim"),
    (lambda s: s.exp() / (1 + s.exp().sum(-1, keepdim=True)), "not divided by its sum"),
    (lambda s: s.exp(), "not divided by its sum"),
]


@pytest.mark.parametrize("weights,reason", PARTIAL, ids=lambda x: x if isinstance(x, str) else "")
def test_partial_forms_are_reported_with_their_reason(weights, reason):
    model, x = _Attention(weights), torch.randn(8, 8, 4)
    report = sc.explain(model, x, pattern="sliding(2)", compiler="eager")
    assert [(r.rewritten, reason in (r.reason or "")) for r in report] == [(False, True)], str(
        report)
    out = torch.compile(model, backend="sparse", options={"compiler": "eager"})(x)
    assert torch.equal(out, model(x))


def _exp_returned(s):
    e = torch.exp(s)
    return e / e.sum(-1, keepdim=True), e


def test_exp_of_a_written_out_softmax_used_elsewhere_is_not_rewritten():
    sites = _sites(_exp_returned, torch.randn(2, 2, 8, 4))
    assert [site.reason for site in sites] == [
        "the attention weights or scores are used elsewhere (returned or stored)"]
