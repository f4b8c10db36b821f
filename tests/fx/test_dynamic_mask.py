"""A Doge model compiled with ``backend="sparse"``: its dynamic-mask attention goes to the DMA
op through the backend, with no options, and the logits stay those of the eager model."""

from __future__ import annotations

import torch

from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.dma.doge_site import doge_inputs, tiny_doge, valid_rows


def test_doge_attention_is_routed_to_dma():
    model = tiny_doge(keep=4, kv_heads=2)
    ids, mask = doge_inputs(2, 12, [0, 3])
    compiled = torch.compile(model, backend="sparse", options={"compiler": "eager"})
    with collecting() as report, torch.no_grad():
        logits = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert [(r.form, r.pattern, r.rewritten) for r in report] == [("dma", "dma(keep=4)", True)]
    rows = valid_rows(mask)
    assert rel_error(logits[rows], expected[rows]) < 1e-4
