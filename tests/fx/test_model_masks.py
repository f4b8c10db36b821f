"""The model's own mask, read from the graph: folded into the op (no Lq × Lk tensor reaches it),
with the queries at their real positions (static caches, left padding, chunked prefill) and
packed documents kept apart; what cannot be proven stays a bias and ``explain`` says why."""

from __future__ import annotations

import pytest
import torch

import sparse_compile as sc
from sparse_compile.backend import UnsupportedAttentionError
from sparse_compile.report import collecting
from tests.conftest import rel_error
from tests.fx.by_hand import pattern_by_hand
from tests.fx.conftest import assert_grads_close, no_lq_by_lk, recording_op_inputs
from tests.fx.hf_models import training_step

transformers = pytest.importorskip("transformers")

SINKS = "causal & (sink(2) | sliding(4))"


def _config(family: str, **extra):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **extra))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **extra))
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, **extra))
    raise ValueError(family)


def _model(family: str, impl: str = "sdpa", **extra):
    torch.manual_seed(0)
    model = _config(family, **extra)
    model.set_attn_implementation(impl)
    return model.eval()


def greedy_by_hand(model, ids: torch.Tensor, steps: int, pattern: str) -> list[list[int]]:
    """Greedy tokens with the pattern applied by hand, recomputing the whole sequence at every
    step without a cache: a reference that shares nothing with any cache's bookkeeping (nor
    with transformers' reshaping of single-query GQA attention)."""
    seq = ids
    with pattern_by_hand(pattern), torch.no_grad():
        for _ in range(steps):
            logits = model(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
    return seq.tolist()


# Causal and sliding-window masks under both attention implementations; key padding under each
# implementation once, in Llama and in Qwen2 (the same masking code).
@pytest.mark.parametrize(("family", "extra", "padded", "folded", "impl"), [
    ("llama", {}, False, "causal", "eager"),
    ("llama", {}, False, "causal", "sdpa"),
    ("llama", {}, True, "key padding", "eager"),
    ("mistral", {"sliding_window": 4}, False, "sliding(4)", "eager"),
    ("mistral", {"sliding_window": 4}, False, "sliding(4)", "sdpa"),
    ("qwen2", {}, True, "key padding", "sdpa"),
])
def test_position_masks_are_folded_not_read(family, extra, padded, folded, impl) -> None:
    """Training setting (no cache, gradients): the mask is proven and folded, the op never
    receives an Lq × Lk tensor, and logits and gradients equal the pattern applied by hand."""
    model = _model(family, impl, **extra)
    model.train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "use_cache": False}
    if padded:
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        inputs["attention_mask"] = mask
    pattern = "causal & sliding(3)"
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": pattern, "compiler": "eager"})
    with collecting() as report, recording_op_inputs() as calls:
        out, grads = training_step(model, inputs, compiled)
    assert report and all(folded in row.mask and row.rewritten for row in report), str(report)
    no_lq_by_lk(calls)
    with pattern_by_hand(pattern):
        ref, ref_grads = training_step(model, inputs)
    rows = slice(None) if not padded else (1, slice(3, None))
    assert rel_error(out[rows], ref[rows]) < 1e-4
    if not padded:
        assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize(("family", "cache"), [("llama", "static"), ("llama", "dynamic"),
                                               ("qwen2", "static")])
def test_generate_with_a_cache_equals_the_pattern_by_hand(family, cache) -> None:
    """Greedy decoding through the backend, with the model's static or dynamic cache: the
    tokens the pattern applied by hand gives (a static cache's queries sit at the cache's
    fill level, not at its capacity)."""
    model = _model(family)
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(2))
    ref = greedy_by_hand(model, ids, 4, SINKS)
    model.forward = torch.compile(model.forward, backend="sparse",
                                  options={"pattern": SINKS, "compiler": "eager"})
    with collecting() as report, recording_op_inputs() as calls, torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    assert out.tolist() == ref, str(report)
    assert all(row.rewritten for row in report), str(report)
    no_lq_by_lk(calls)


def test_left_padding_counts_positions_from_each_rows_first_token() -> None:
    """A left-padded batch generates, row by row, what each prompt generates alone: positional
    primitives (here sinks) count from the row's first real token."""
    model = _model("llama")
    prompts = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
               for n in (12, 8)]
    alone = [greedy_by_hand(model, p[None], 4, SINKS)[0][-4:] for p in prompts]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 12 - len(p):] = p
        mask[row, 12 - len(p):] = 1
    model.forward = torch.compile(model.forward, backend="sparse",
                                  options={"pattern": SINKS, "compiler": "eager"})
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             cache_implementation="static", pad_token_id=0)
    assert [row[-4:].tolist() for row in out] == alone


def test_chunked_prefill_into_a_static_cache() -> None:
    """Two chunks of a prompt written into a static cache: the second chunk's logits equal
    those of the whole prompt at once, pattern by hand."""
    model = _model("llama")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))
    with pattern_by_hand(SINKS), torch.no_grad():
        ref = model(ids, use_cache=False).logits[:, 10:]
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": SINKS, "compiler": "eager"})
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        compiled(ids[:, :10], past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(10))
        out = compiled(ids[:, 10:], past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(10, 16)).logits
    assert rel_error(out, ref) < 1e-4


def test_a_sliding_window_cache_refuses_absolute_positions() -> None:
    """A sliding-window cache drops its oldest keys: sinks would need them. Refused with an
    error naming the problem; a pattern of relative positions still works there."""
    model = _model("mistral", sliding_window=6)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    model.forward = torch.compile(model.forward, backend="sparse",
                                  options={"pattern": SINKS, "compiler": "eager"})
    with pytest.raises(Exception, match="absolute position") as raised, torch.no_grad():
        model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    # Dynamo reports the backend's error as the cause of its own.
    error = raised.value
    assert isinstance(getattr(error, "inner_exception", error), UnsupportedAttentionError)
    relative = "causal & sliding(3)"
    model = _model("mistral", sliding_window=6)
    ref = greedy_by_hand(model, ids, 6, relative)
    model.forward = torch.compile(model.forward, backend="sparse",
                                  options={"pattern": relative, "compiler": "eager"})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False,
                             cache_implementation="static")
    assert out.tolist() == ref


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_packed_documents_equal_each_document_alone(family) -> None:
    """transformers' packed training (position_ids restarting per document, no mask, no
    cache): the compiled model gives every document what it gives that document alone,
    and the op receives document ids, not a mask."""
    model = _model(family)
    lengths = [5, 7, 4]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "causal & sink(2)", "compiler": "eager"})
    with collecting() as report, recording_op_inputs() as calls:
        packed = compiled(ids, position_ids=position_ids, use_cache=False).logits
    assert all("documents" in row.mask for row in report), str(report)
    assert all(c["documents"] is not None for c in calls)
    no_lq_by_lk(calls)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = compiled(ids[:, part], use_cache=False).logits
        assert rel_error(packed[:, part], alone) < 1e-4
        start += n


def test_a_mask_that_is_not_positional_stays_a_bias_and_explain_says_why() -> None:
    class Scrambled(torch.nn.Module):
        def forward(self, q, k, v, keep):
            scores = q @ k.transpose(-1, -2) / 4.0
            scores = scores.masked_fill(~keep, float("-inf"))
            return torch.softmax(scores, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    keep = torch.rand(6, 6) > 0.3
    keep[:, 0] = True
    report = sc.explain(Scrambled(), q, k, v, keep, pattern="dense", compiler="eager")
    assert len(report) == 1 and report[0].rewritten
    assert report[0].mask.startswith("bias: "), str(report)


def test_explain_takes_keyword_inputs_and_shows_the_folded_mask() -> None:
    model = _model("llama")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(6))
    report = sc.explain(model, ids, model_kwargs={"attention_mask": torch.ones(1, 12),
                                                  "use_cache": False},
                        pattern="causal & sliding(4)", compiler="eager")
    assert len(report) == 2 and all(r.mask == "folded: causal, key padding" for r in report)
    assert "model mask" in str(report)


def test_packed_documents_gradients_equal_each_document_alone(monkeypatch) -> None:
    """Backward too: the packed batch's gradients are the sum of each document's alone; the
    ids are prepared once for the whole step (both layers, forward and backward)."""
    import sparse_compile.codegen.tl.documents as documents_module

    prepared = []
    real = documents_module.document_bounds
    monkeypatch.setattr(documents_module, "document_bounds",
                        lambda ids: prepared.append(ids.shape) or real(ids))
    model = _model("qwen2")
    model.train()
    lengths = [6, 5]
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(7))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.linspace(-1, 1, sum(lengths) * 64).view(1, sum(lengths), 64)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "causal & sink(2)", "compiler": "eager"})
    packed = compiled(ids, position_ids=position_ids, use_cache=False).logits
    (packed * weights).sum().backward()
    assert len(prepared) == 1, prepared
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = compiled(ids[:, part], use_cache=False).logits
        (alone * weights[:, part]).sum().backward()
        start += n
    assert_grads_close(grads, [p.grad for p in model.parameters()])


@pytest.mark.parametrize("written", ["kv_first", "q_first"])
def test_offsets_on_either_side_become_query_and_key_starts(written) -> None:
    """``kv + b <= q + a`` (either way round) reads as causal with queries from ``a`` and keys
    from ``b``: the offsets are graph values, not guessed from the lengths."""
    from sparse_compile.fx.index_values import IndexReader
    from sparse_compile.fx.model_mask import read_model_mask

    captured = {}

    def backend(gm, example_inputs):
        (node,) = [n for n in gm.graph.nodes if n.op == "output"]
        captured["mask"] = node.args[0][0] if isinstance(node.args[0], tuple) else node.args[0]
        captured["names"] = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        return gm

    def mask(q_off, k_off):
        q = (torch.arange(4) + q_off)[:, None]
        k = (torch.arange(9) + k_off)[None, :]
        return (k <= q) if written == "kv_first" else (q >= k)

    torch.compile(mask, backend=backend)(torch.tensor(5), torch.tensor(2))
    found = read_model_mask(IndexReader(), captured["mask"], "keep", 4, 9)
    assert str(found.pattern) == "causal", found
    (q_node, q_const), (k_node, k_const) = found.q_start, found.k_start
    assert "q_off" in q_node.name and "k_off" in k_node.name and q_const == k_const == 0


class _TopLeftMask(torch.nn.Module):
    """Attention under a mask the module builds itself from ``arange``: query row ``i`` at
    position ``i`` (top-left), causal, and within ``window`` keys when given."""

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        rows = torch.arange(q.shape[-2], device=q.device)[:, None]
        cols = torch.arange(k.shape[-2], device=q.device)[None, :]
        keep = cols <= rows
        if self.window is not None:
            keep = keep & (rows - cols < self.window)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("lq", "lk"), [(5, 9), (9, 5), (6, 6)])
def test_a_top_left_mask_keeps_queries_from_position_zero(lq, lk, window, dynamic) -> None:
    """``k_idx <= q_idx`` from ``arange`` with Lq != Lk (or lengths only known at run time)
    places query row 0 at position 0, not at the default ``Lk - Lq``."""
    model = _TopLeftMask(window)
    compiled = torch.compile(model, backend="sparse", dynamic=dynamic,
                             options={"pattern": "dense", "compiler": "eager"})
    gen = torch.Generator().manual_seed(lq * 10 + lk)
    for step in range(2):  # a second shape: dynamic=True reuses the symbolic graph
        q = torch.randn(2, 2, lq + step, 16, generator=gen)
        k, v = (torch.randn(2, 2, lk + 2 * step, 16, generator=gen) for _ in range(2))
        with collecting() as report, recording_op_inputs() as calls, torch.no_grad():
            out = compiled(q, k, v)
        if step == 0:
            assert len(report) == 1 and report[0].rewritten, str(report)
            assert report[0].mask.startswith("folded"), str(report)
        no_lq_by_lk(calls)
        # A row with no kept key (Lq > Lk with a window) is zeros in the op, NaN in the model.
        expected = model(q.double(), k.double(), v.double()).nan_to_num(0.0)
        error = rel_error(out, expected)
        assert error < 1e-5, (step, error)
