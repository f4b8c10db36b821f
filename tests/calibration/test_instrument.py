"""The probes: the model's output is unchanged, sites are found and keyed as the backend keys
them, and other forms (``nn.MultiheadAttention``, 3-D attention, transformers' Llama with
padding) measure what the model's own attention weights say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse_compile.patterns import parse
from torch import nn

import sparse_compile as sc
from sparse_compile.calibration.instrument import SiteTable, calibration_backend
from tests.calibration.models import B, C, L, Stack, counted_rows, oracle_recall, padding_mask
from tests.conftest import rel_error

CANDIDATES = [parse(t) for t in ("causal & sliding(3)", "causal & sliding(6)", "sink(1)")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_probed_model_computes_what_the_model_computes() -> None:
    torch.manual_seed(0)
    model, x, keep = Stack().eval(), torch.randn(B, L, C), padding_mask([L - 2, L - 7], L)
    table = SiteTable()
    with torch.no_grad():
        out = torch.compile(model, backend=calibration_backend(table, CANDIDATES))(x, keep)
        expected = model(x, keep)
    assert rel_error(out, expected) < 1e-6
    assert [(r.module_path, r.index, r.form) for r in table.records.values()] == [
        ("layers.0", 0, "matmul"), ("layers.0", 1, "sdpa"),
        ("layers.1", 0, "matmul"), ("layers.1", 1, "sdpa")]


class CausalMHA(nn.Module):
    """``nn.MultiheadAttention`` with a causal bool mask and key padding."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(C, 4, batch_first=True)

    def forward(self, x: torch.Tensor, padded: torch.Tensor, need_weights: bool = False):
        n = x.shape[1]
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        return self.mha(x, x, x, need_weights=need_weights, attn_mask=future,
                        key_padding_mask=padded, average_attn_weights=False)


def test_multihead_attention_against_its_own_weights() -> None:
    torch.manual_seed(0)
    model, x = CausalMHA().eval(), 3 * torch.randn(B, L, C)
    keep = padding_mask([L, L - 4], L)
    result = sc.calibrate(model, x, ~keep, candidates=CANDIDATES)
    (site,) = result.sites
    assert (site.key, site.form, site.heads) == ("", "mha", 4)  # torch.nn leaves are skipped
    with torch.no_grad():
        _, weights = model(x, ~keep, need_weights=True)
    counted = counted_rows(keep)
    for j, candidate in enumerate(CANDIDATES):
        mean, minimum = oracle_recall(weights.double(), candidate, counted)
        torch.testing.assert_close(site.mean[:, j], mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(site.minimum[:, j], minimum, rtol=0, atol=1e-5)


class Bmm3d(nn.Module):
    """fairseq-style 3-D attention: ``[B·H, L, D]`` tensors, ``torch.bmm``, causal mask."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.h, self.qkv = heads, nn.Linear(C, 3 * C)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.h, -1).transpose(1, 2).reshape(b * self.h, n, -1)

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        n = x.shape[1]
        w = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
        w = w + torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                              float("-inf"))
        return F.softmax(w, dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, v = self.weights(x)
        return torch.bmm(probs, v)


def test_three_dimensional_attention_pools_its_heads() -> None:
    torch.manual_seed(0)
    model, x = Bmm3d(), 3 * torch.randn(B, L, C)
    result = sc.calibrate(model, x, candidates=CANDIDATES)
    (site,) = result.sites
    assert site.pooled and site.heads == 1 and site.key == ""
    assert "<root>  all" in str(result)
    with torch.no_grad():
        probs, _ = model.weights(x)
    for j, candidate in enumerate(CANDIDATES):
        mean, minimum = _pooled_oracle(probs.double(), candidate)
        torch.testing.assert_close(site.mean[0, j], mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(site.minimum[0, j], minimum, rtol=0, atol=1e-5)


def _pooled_oracle(probs: torch.Tensor, pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and minimum kept mass over every row of ``probs [B·H, L, L]``."""
    mass = (probs * pattern.mask(probs.shape[1], probs.shape[2])).sum(-1)
    return mass.mean(), mass.min()


def test_transformers_llama_with_padding_against_its_attention_weights() -> None:
    from tests.fx.hf_models import llama

    model, _, _ = llama("eager")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    keep = padding_mask([12, 8], 12)
    batch = {"input_ids": ids, "attention_mask": keep.long()}
    result = sc.calibrate(model, batches=[batch], candidates=CANDIDATES)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    assert [site.key for site in result.sites] == [f"model.layers.{i}.self_attn"
                                                   for i in range(len(attentions))]
    counted = counted_rows(keep)
    for site, weights in zip(result.sites, attentions, strict=True):
        for j, candidate in enumerate(CANDIDATES):
            mean, minimum = oracle_recall(weights.double(), candidate, counted)
            torch.testing.assert_close(site.mean[:, j], mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(site.minimum[:, j], minimum, rtol=0, atol=1e-5)
