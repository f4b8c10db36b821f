"""Key masks (a model's padding mask, folded to a boolean ``[B or 1, 1, 1, Lk]`` bias) in the
Hopper Gluon kernels (codegen/gluon/key_mask.py): which biases count as one and where such
calls are routed (tested everywhere), and the kernels' results against the float64 oracle
(sm90 GPU only)."""

from __future__ import annotations

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon import support
from sparse_compile.codegen.gluon.key_mask import is_key_mask, key_mask_args
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME

from sparse_compile.functional import attention
from tests.codegen.attention_cases import (
    check_against_oracle,
    make_qkv,
    needs_gluon_gpu,
    strict_gluon,
)

CPU = torch.device("cpu")


# --- host side: runs everywhere (CI) ---------------------------------------------------------

def test_which_biases_are_key_masks() -> None:
    lk = 40
    assert is_key_mask(torch.ones(3, 1, 1, lk, dtype=torch.bool, device=CPU), lk)
    assert is_key_mask(torch.ones(1, 1, 1, lk, dtype=torch.bool, device=CPU), lk)
    assert is_key_mask(torch.ones(lk, dtype=torch.bool, device=CPU), lk)  # broadcast to 4-D
    assert is_key_mask(torch.ones(3, 1, 1, 50, dtype=torch.bool, device=CPU)[..., :lk], lk)
    assert not is_key_mask(torch.ones(3, 1, 1, lk, device=CPU), lk)  # additive: a real bias
    assert not is_key_mask(torch.ones(3, 1, 7, lk, dtype=torch.bool, device=CPU), lk)
    assert not is_key_mask(torch.ones(3, 2, 1, lk, dtype=torch.bool, device=CPU), lk)
    assert not is_key_mask(torch.ones(3, 1, 1, lk + 1, dtype=torch.bool, device=CPU), lk)
    assert not is_key_mask(None, lk)


def test_key_mask_arguments() -> None:
    like = torch.zeros(1, device=CPU)
    mask = torch.ones(3, 1, 1, 50, dtype=torch.bool, device=CPU)[..., :40]  # a sliced cache's
    (flags, sb, sk), constexprs = key_mask_args(mask, like)
    assert constexprs == {"KEY_MASK": True} and flags.dtype == torch.uint8
    assert (sb, sk) == (50, 1) and flags.data_ptr() == mask.data_ptr()  # a view, no copy
    (_, sb, _), _ = key_mask_args(mask[:1], like)
    assert sb == 0  # one row for every batch row
    assert key_mask_args(None, like)[1] == {"KEY_MASK": False}


@pytest.mark.parametrize("request_env", ["", "gluon"])
def test_key_masks_take_the_gluon_kernels_only_where_allowed(monkeypatch, request_env) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, request_env)
    cfg = TileConfig()
    keys = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=CPU)

    def call(bias, dropout_p=0.0):
        return kernels._gluon_call(cfg, bias, dropout_p, 0.0, None, None, DEFAULT_FRAME, 10, 40)

    asked = request_env == "gluon"
    assert call(keys) == asked
    assert kernels._gluon_biases(keys, 40)[0] is not None  # the per-key way
    other = torch.ones(2, 1, 10, 40, dtype=torch.bool, device=CPU)
    assert call(other) == asked and kernels._gluon_biases(other, 40)[0] is None
    assert kernels._gluon_biases(other, 40)[1].data_ptr() == other.data_ptr()  # read tile-wise
    assert not call(keys, dropout_p=0.1)


# --- the kernels themselves: sm90 GPU only -----------------------------------------------------



def _padding(b: int, lk: int, device) -> torch.Tensor:
    """[B, 1, 1, Lk] key masks: right padding of different lengths, a hole, and (in the last
    batch row when B > 2) no key at all."""
    keep = torch.ones(b, lk, dtype=torch.bool)
    for i in range(b):
        keep[i, lk - 37 * (i + 1):] = False
    keep[0, 5:9] = False
    if b > 2:
        keep[-1] = False
    return keep.reshape(b, 1, 1, lk).to(device)


GPU_CASES = [
    # (pattern, B, Hq, Hkv, Lq, Lk, D, one mask row for every batch row)
    ("causal", 2, 4, 2, 300, 300, 128, False),
    ("causal & sliding(100)", 3, 4, 1, 517, 517, 128, False),
    ("causal & (sink(4) | sliding(64))", 2, 2, 2, 333, 333, 64, False),
    ("dense", 2, 2, 2, 129, 257, 128, True),  # Lq < Lk
    ("causal", 1, 2, 1, 300, 300, 256, False),
]


@needs_gluon_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-{c[4]}x{c[5]}-d{c[6]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_kernels_with_a_key_mask_match_the_oracle(monkeypatch, case, dtype) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    text, b, hq, hkv, lq, lk, d, shared = case
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype)
    keys = _padding(1 if shared else b, lk, q.device)
    check_against_oracle(attention, q, k, v, text, bias=keys)
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
def test_a_batch_row_without_keys_gives_zeros(monkeypatch) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    fwd, _ = strict_gluon(monkeypatch, kernels)
    q, k, v = (t.detach() for t in make_qkv(3, 2, 2, 200, 200, 128, torch.bfloat16))
    keys = _padding(3, 200, q.device)
    out, lse = kernels.forward(q, k, v, "causal", 0.1, bias=keys)
    assert fwd and torch.isfinite(out).all()
    assert out[2].abs().max().item() == 0 and torch.isinf(lse[2]).all()


@needs_gluon_gpu
def test_a_key_mask_inside_packed_documents(monkeypatch) -> None:
    """transformers' flex path hands both: documents of one batch row and a padding mask."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, 2, 400, 400, 128, torch.bfloat16)
    ids = torch.tensor([0] * 150 + [1] * 200 + [2] * 50, device=q.device).reshape(1, 400)
    keys = _padding(1, 400, q.device)
    check_against_oracle(attention, q, k, v, "causal & sliding(64)", bias=keys,
                         positions={"documents": ids})
    assert fwd and bwd, "the Gluon kernels did not run"


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_padded_models_calls_are_ones_the_gluon_kernels_take(monkeypatch, padding) -> None:
    """What the backend hands the op for a transformers model given a padding mask is a key
    mask these kernels read, at positions they serve: every call of a compiled, padded Llama
    (SDPA path, a window pattern) is one ``_gluon_call`` accepts when the kernels are asked
    for (checked on the host: the decision, not the kernels)."""
    transformers = pytest.importorskip("transformers")
    from sparse_compile import functional
    from sparse_compile.op import kernel_frame

    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, -4:] = 0 if padding == "right" else 1
    mask[1, :4] = 0 if padding == "left" else 1
    calls = []
    real = functional._static_attention

    def spy(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents, *rest):
        calls.append((q.shape, k.shape, bias, kernel_frame(q, starts, documents), softcap,
                      dropout_p))
        return real(q, k, v, text, scale, bias, dropout_p, softcap, starts, documents, *rest)

    monkeypatch.setattr(functional, "_static_attention", spy)
    compiled = torch.compile(model, backend="sparse",
                             options={"pattern": "causal & sliding(3)", "compiler": "eager"})
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask, use_cache=False)
    assert calls
    for q_shape, k_shape, bias, frame, softcap, dropout_p in calls:
        lq, lk = q_shape[2], k_shape[2]
        assert is_key_mask(bias, lk), None if bias is None else (bias.dtype, bias.shape)
        assert kernels._gluon_call(TileConfig(), bias, dropout_p, softcap, None, None, frame,
                                   lq, lk)


@needs_gluon_gpu
def test_a_key_mask_at_shifted_positions(monkeypatch) -> None:
    """What the backend hands a left-padded batch row under a pattern that keeps keys by
    absolute position (sinks): a key mask, and positions counted from the row's first
    token (one pair of starts)."""
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(1, 4, 2, 300, 300, 128, torch.bfloat16)
    keys = torch.ones(1, 1, 1, 300, dtype=torch.bool, device=q.device)
    keys[..., :20] = False  # 20 padding tokens on the left
    check_against_oracle(attention, q, k, v, "causal & (sink(4) | sliding(64))", bias=keys,
                         positions={"q_start": -20, "k_start": -20})
    assert fwd and bwd, "the Gluon kernels did not run"
