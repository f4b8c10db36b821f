"""FlexAttention calls (``sparse_compile.fx.flex*``): a call whose ``mask_mod`` and ``score_mod``
are proven becomes one call of the sparse op and gives what FlexAttention gives, outputs and
gradients (with the pattern applied by hand, as a ``mask_mod``, where one is added); the block
mask built for it is not computed any more; what cannot be proven stays FlexAttention, with the
reason in ``explain``.

FlexAttention has no backward on the CPU eagerly (``_validate_device`` refuses inputs that
require grad); its compiled graph does, through the higher-order op's own autograd, which is
the reference here (the ``flex_grads`` fixture lifts the check)."""

from __future__ import annotations

import logging

import pytest
import torch
from sparse_compile.patterns import parse
from torch.nn.attention.flex_attention import (
    BlockMask,
    and_masks,
    create_block_mask,
    flex_attention,
)

import sparse_compile as sc
from sparse_compile.backend import sparsify_graph
from sparse_compile.fx.choose import BackendOptions
from sparse_compile.fx.flex import find_flex_calls
from sparse_compile.positions import PositionError
from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.conftest import assert_grads_close, no_lq_by_lk, recording_op_inputs

B, HQ, HKV, L, D = 2, 4, 2, 16, 8
DOCUMENT = torch.tensor([0] * 5 + [1] * 6 + [2] * 5)
PADDING = torch.ones(B, L, dtype=torch.bool)
PADDING[1, :3] = False


def causal_window(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 6)


def same_document(b, h, q_idx, kv_idx):
    return (DOCUMENT[q_idx] == DOCUMENT[kv_idx]) & (kv_idx <= q_idx)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | ((q_idx < 5) & (kv_idx < 5))


def padded_keys(b, h, q_idx, kv_idx):
    return PADDING[b, kv_idx] & (kv_idx <= q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


def alibi(score, b, h, q_idx, kv_idx):
    return score + (h + 1) * 0.25 * (kv_idx - q_idx)


RELATIVE = torch.linspace(-1.0, 1.0, 2 * L)


def absolute_positions(score, b, h, q_idx, kv_idx):
    return score + RELATIVE[q_idx] * RELATIVE[kv_idx]


class RelativeBias(torch.nn.Module):
    """FlexModule's projections and a learned relative-bias table ``[Hq, 2L - 1]`` (T5 /
    Swin style) read by the score_mod at ``h, q_idx - kv_idx + L - 1``."""

    def __init__(self, mask_mod, by_hand: torch.Tensor | None = None,
                 per_head: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, (HQ + 2 * HKV) * D)
        self.table = torch.nn.Parameter(0.5 * torch.randn(HQ if per_head else 1, 2 * L - 1))
        self.mask_mod, self.by_hand, self.per_head = mask_mod, by_hand, per_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).view(B, L, HQ + 2 * HKV, D).transpose(1, 2)
        q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
        table = self.table if self.per_head else self.table[0]
        if self.per_head:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[h, q_idx - kv_idx + (L - 1)]
        else:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[(L - 1) + (q_idx - kv_idx)]
        mask_mod = self.mask_mod
        if self.by_hand is not None:
            keep = self.by_hand
            mask_mod = and_masks(mask_mod, lambda b, h, q_idx, kv_idx: keep[q_idx, kv_idx])
        block_mask = create_block_mask(mask_mod, B, None, L, L, device=x.device, BLOCK_SIZE=8)
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=0.3,
                             enable_gqa=True)
        return out.transpose(1, 2).reshape(B, L, -1)


class FlexModule(torch.nn.Module):
    """Projections, then ``flex_attention`` with GQA, an explicit scale, a ``score_mod`` and a
    block mask built inside the forward (so in the graph) from ``mask_mod`` and, for the
    reference, the pattern applied by hand (``by_hand``: its keep-mask ``[L, L]``)."""

    def __init__(self, mask_mod, score_mod=None, by_hand: torch.Tensor | None = None,
                 return_lse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, (HQ + 2 * HKV) * D)
        self.mask_mod, self.score_mod, self.by_hand = mask_mod, score_mod, by_hand
        self.return_lse = return_lse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).view(B, L, HQ + 2 * HKV, D).transpose(1, 2)
        q, k, v = qkv.split([HQ, HKV, HKV], dim=1)
        mask_mod = self.mask_mod
        if self.by_hand is not None:
            keep = self.by_hand
            mask_mod = and_masks(mask_mod, lambda b, h, q_idx, kv_idx: keep[q_idx, kv_idx])
        block_mask = create_block_mask(mask_mod, B, None, L, L, device=x.device, BLOCK_SIZE=8)
        out = flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask,
                             scale=0.3, enable_gqa=True, return_lse=self.return_lse)
        if self.return_lse:
            out, lse = out
            return out.transpose(1, 2).reshape(B, L, -1), lse
        return out.transpose(1, 2).reshape(B, L, -1)


def _inputs() -> torch.Tensor:
    return torch.randn(B, L, 32, generator=torch.Generator().manual_seed(1))


def _step(model: torch.nn.Module, compiled) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = compiled(_inputs())
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.usefixtures("flex_grads")
@pytest.mark.parametrize(("mask_mod", "score_mod", "pattern", "folded"), [
    (causal_window, None, "dense", "sliding(6)"),
    (same_document, None, "sliding(3)", "documents (checked at run time)"),
    (prefix_lm, softcap, "dense", "causal | prefix(5)"),
    (padded_keys, softcap, "causal & sliding(4)", "key padding"),
    (causal_window, alibi, "dense", "sliding(6)"),
])
def test_proven_flex_calls_equal_flex_attention(mask_mod, score_mod, pattern, folded):
    """Outputs and gradients of the rewritten call equal FlexAttention's with the pattern
    applied by hand; the op never receives an Lq × Lk tensor."""
    model = FlexModule(mask_mod, score_mod)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": pattern, "compiler": "eager"})
    with collecting() as report, recording_op_inputs() as calls:
        out, grads = _step(model, compiled)
    assert [(r.form, r.rewritten) for r in report] == [("flex", True)], str(report)
    assert folded in report[0].mask, str(report)
    no_lq_by_lk(calls)
    torch._dynamo.reset()
    reference = FlexModule(mask_mod, score_mod, by_hand=parse(pattern).mask(L, L))
    ref, ref_grads = _step(reference, torch.compile(reference, backend="eager"))
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)


def test_the_block_mask_is_not_computed_once_the_call_is_rewritten():
    """create_block_mask ran inside the graph: its evaluation of mask_mod over every (q, k)
    and its block tables go with the call (the document ids are read by the op instead)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sparsify_graph(gm, BackendOptions.from_mapping({"pattern": "dense"})))
        return graphs[-1].forward

    with torch.no_grad():
        torch.compile(FlexModule(same_document), backend=backend)(_inputs())
    (graph,) = graphs
    targets = {str(n.target) for n in graph.graph.nodes}
    assert not any(name in t for t in targets for name in ("flex_attention", "argsort",
                                                           "_remove_batch_dim", "setitem"))
    assert any("placed_attention" in t for t in targets)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_document_ids_out_of_order_stop_the_program(compiler):
    """Ids the pass cannot prove in order are checked when the op runs: a document split in
    two runs (FlexAttention would let its halves attend each other) is refused, not read
    wrongly."""
    model = FlexModule(same_document)
    compiled = torch.compile(model, backend="sparse", options={"compiler": compiler})
    with torch.no_grad():
        compiled(_inputs())  # in order: fine
        DOCUMENT[-2:] = 0
        try:
            with pytest.raises((PositionError, RuntimeError), match="documents|runs"):
                compiled(_inputs())
        finally:
            DOCUMENT[-2:] = 2


@pytest.mark.usefixtures("flex_grads")
@pytest.mark.parametrize(("mask_mod", "pattern", "per_head"), [
    (causal_window, "dense", True),
    (same_document, "sliding(3)", True),
    (causal_window, "causal & (sink(2) | sliding(4))", False),
])
def test_a_relative_bias_table_is_computed_in_the_op(mask_mod, pattern, per_head):
    """A learned table read at ``q_idx - kv_idx``: the rewritten call equals FlexAttention in
    outputs and in every gradient, the table's included; the op receives the table
    ``[Hq, 2L - 1]``, never an Lq x Lk tensor."""
    model = RelativeBias(mask_mod, per_head=per_head)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": pattern, "compiler": "eager"})
    with collecting() as report, recording_op_inputs() as calls:
        out, grads = _step(model, compiled)
    assert [(r.form, r.rewritten) for r in report] == [("flex", True)], str(report)
    no_lq_by_lk(calls)
    assert all(c["rel_bias"] == (HQ, 2 * L - 1) for c in calls), calls
    torch._dynamo.reset()
    reference = RelativeBias(mask_mod, by_hand=parse(pattern).mask(L, L), per_head=per_head)
    ref, ref_grads = _step(reference, torch.compile(reference, backend="eager"))
    assert rel_error(out, ref) < 1e-4
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize(("options", "reason"), [
    ({"score_mod": absolute_positions}, "bias of query and key positions"),
    ({"return_lse": True}, "log-sum-exp"),
])
def test_unproven_calls_stay_flex_attention_with_their_reason(options, reason, caplog):
    model = FlexModule(causal_window, **options)
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        report = sc.explain(model, _inputs(), pattern="causal & sliding(4)", compiler="eager")
    assert [(r.form, r.rewritten) for r in report] == [("flex", False)]
    assert reason in report[0].reason
    assert any(reason in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparse", options={"compiler": "eager"})
    with torch.no_grad():
        out, ref = compiled(_inputs()), torch.compile(model, backend="eager")(_inputs())
    torch.testing.assert_close(out, ref)


def test_blocks_without_a_mask_mod_are_not_read():
    """BlockMask.from_kv_blocks without a mask_mod: the blocks alone decide what is kept."""

    class Blocks(torch.nn.Module):
        def forward(self, q, k, v):
            counts = torch.ones(1, 1, 2, dtype=torch.int32)
            indices = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)
            mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=8, seq_lengths=(L, L))
            return flex_attention(q, k, v, block_mask=mask)

    q = torch.randn(1, 2, L, D)
    report = sc.explain(Blocks(), q, q, q, compiler="eager")
    assert not report[0].rewritten and "blocks alone decide" in report[0].reason


def test_flex_site_raises_with_on_unsupported_error():
    compiled = torch.compile(FlexModule(causal_window, absolute_positions), backend="sparse",
                             options={"on_unsupported": "error", "compiler": "eager"})
    with pytest.raises(Exception, match="bias of query and key positions"), torch.no_grad():
        compiled(_inputs())


def test_flex_call_operands():
    calls = []

    def capture(gm, example_inputs):
        calls.extend(find_flex_calls(gm))
        return gm.forward

    with torch.no_grad():
        torch.compile(FlexModule(same_document, softcap, return_lse=True),
                      backend=capture)(_inputs())
    (call,) = calls
    assert [tuple(n.meta["example_value"].shape) for n in (call.query, call.key, call.value)
            ] == [(B, HQ, L, D), (B, HKV, L, D), (B, HKV, L, D)]
    assert (call.scale, call.enable_gqa, call.return_lse) == (0.3, True, True)
    mask = call.block_mask
    assert (mask.q_length, mask.kv_length, mask.q_block, mask.kv_block) == (L, L, 8, 8)
    assert mask.kv_num_blocks.meta["example_value"].shape == (B, 1, L // 8)
    assert mask.kv_indices.meta["example_value"].shape == (B, 1, L // 8, L // 8)
    assert isinstance(mask.mask_mod, torch.fx.GraphModule)
    assert isinstance(call.score_mod, torch.fx.GraphModule)
    # The mask_mod reads the document ids from outside.
    assert [t.meta["example_value"].shape for t in mask.mask_mod_buffers] == [(L,)]
    assert "OUTPUT_LOGSUMEXP" in call.kernel_options


def test_calibration_does_not_measure_flex_calls():
    result = sc.calibrate(FlexModule(causal_window), _inputs(),
                          candidates=["causal & sliding(2)"], recall=0.9)
    assert [reason for _, reason in result.skipped] == [
        "FlexAttention calls are not measured: the probes do not apply their mask_mod"]


def test_changing_lengths_reuse_one_graph():
    """Dynamic shapes: the block mask, the scale and the lengths are graph values."""

    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            n = q.shape[2]
            mask = create_block_mask(causal_window, None, None, n, n, device=q.device,
                                     BLOCK_SIZE=8)
            return flex_attention(q, k, v, score_mod=softcap, block_mask=mask)

    compiled = torch.compile(Window(), backend="sparse", dynamic=True,
                             options={"compiler": "eager"})
    reference = torch.compile(Window(), backend="eager", dynamic=True)
    with collecting() as report, torch.no_grad():
        for n in (16, 24):
            q, k, v = torch.randn(3, 1, 2, n, D, generator=torch.Generator().manual_seed(n))
            assert rel_error(compiled(q, k, v), reference(q, k, v)) < 1e-5
    assert [(r.form, r.rewritten) for r in report] == [("flex", True)]
