"""Logit modifications in the Hopper Gluon kernels (codegen/gluon/score.py): soft-capping,
ALiBi and relative-bias tables. Where they are chosen and what the kernels are handed (tested
everywhere), and the kernels' results against the float64 oracle (sm90 GPU only)."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon import support
from sparse_compile.codegen.gluon.score import NO_MODS, ScoreMods
from sparse_compile.codegen.launch.config import TileConfig
from sparse_compile.codegen.launch.positions import DEFAULT_FRAME, documents_frame

from sparse_compile.functional import attention
from sparse_compile.reference import position_grid
from tests.codegen.attention_cases import (
    check_against_oracle,
    make_qkv,
    needs_gluon_gpu,
    strict_gluon,
)
from tests.conftest import rel_error

CAP = 2.0


def _slopes(heads: int, device=None) -> torch.Tensor:
    return torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)], device=device)


def _table(heads: int, lq: int, lk: int, device=None) -> torch.Tensor:
    return (0.5 * torch.randn(heads, lq + lk - 1, device=device)).requires_grad_(True)


# --- host side: runs everywhere (CI) ---------------------------------------------------------

def test_kernel_arguments_of_each_modification() -> None:
    like = torch.zeros(1)
    slopes, table = _slopes(4), _table(4, 9, 9).detach()
    (cap_in, cap_out, s, r, s_rh), flags = ScoreMods(30.0, slopes, table).kernel_args(0.125,
                                                                                      like)
    assert flags == {"SOFTCAP": True, "PBIAS": 3}
    assert cap_in == pytest.approx(0.125 / 30) and cap_out == pytest.approx(30 / math.log(2))
    assert s is slopes and r is table and s_rh == table.stride(0)
    assert ScoreMods(alibi=slopes).kernel_args(0.1, like)[1] == {"SOFTCAP": False, "PBIAS": 1}
    assert ScoreMods(rel_bias=table[:1]).kernel_args(0.1, like)[0][4] == 0  # one shared row
    assert NO_MODS.kernel_args(0.1, like)[1] == {"SOFTCAP": False, "PBIAS": 0}
    assert not NO_MODS.any and ScoreMods(softcap=1.0).any and ScoreMods(alibi=slopes).any


@pytest.mark.parametrize("request_env", ["", "gluon", "tl"])
@pytest.mark.parametrize("by_default", [False, True])
def test_modified_logits_take_the_gluon_kernels_only_where_allowed(monkeypatch, request_env,
                                                                   by_default) -> None:
    """A call with soft-capping, ALiBi or a relative-bias table goes to the Gluon kernels when
    asked for (``SPARSE_COMPILE_KERNELS=gluon``) or on by default, never with dropout; plain
    calls as before."""
    monkeypatch.setenv(support.KERNELS_ENV, request_env)
    monkeypatch.setattr(support, "GLUON_EXTENDED_BY_DEFAULT", by_default)
    cfg = TileConfig()
    slopes, table = _slopes(2), _table(2, 40, 40)
    allowed = request_env == "gluon" or (request_env == "" and by_default)

    def call(softcap=0.0, alibi=None, rel_bias=None, bias=None, dropout_p=0.0):
        return kernels._gluon_call(cfg, bias, dropout_p, softcap, alibi, rel_bias,
                                   DEFAULT_FRAME, 40, 40)

    assert call()
    assert call(softcap=CAP) == allowed
    assert call(alibi=slopes) == allowed
    assert call(rel_bias=table) == allowed
    assert call(softcap=CAP, bias=torch.zeros(1, 1, 40, 40)) == allowed  # bias.py
    assert not call(alibi=slopes, dropout_p=0.1)
    assert not kernels._gluon_call(TileConfig(gluon=False), None, 0.0, CAP, None, None,
                                   DEFAULT_FRAME, 40, 40)


def test_off_by_default_until_run_on_a_gpu(monkeypatch) -> None:
    monkeypatch.delenv(support.KERNELS_ENV, raising=False)
    assert not support.GLUON_EXTENDED_BY_DEFAULT and not support.gluon_extended()


@pytest.mark.parametrize("lq, lk", [(23, 23), (9, 31), (31, 9)])
def test_row_differences_are_position_differences_on_every_kept_pair(lq, lk) -> None:
    """The kernels place query row ``i`` at ``i + Lk − Lq`` and key ``j`` at ``j`` for both
    position terms, also inside packed documents, where positions count from each document's
    start: on every pair a document keeps, the two differences are equal."""
    rows = torch.arange(lq, device="cpu")[:, None] + (lk - lq)
    keys = torch.arange(lk, device="cpu")[None, :]
    q_pos, k_pos = position_grid(1, lq, lk, torch.device("cpu"))
    assert torch.equal((k_pos - q_pos)[0], keys - rows)
    if lq == lk:
        ids = torch.tensor([[0] * 7 + [1] * 3 + [-1] * 2 + [2] * (lq - 12)], device="cpu")
        q_pos, k_pos = position_grid(1, lq, lk, torch.device("cpu"), documents=ids)
        frame = documents_frame(ids, 1)
        same = (keys >= frame.doc_start[0][:, None]) & (keys <= frame.doc_end[0][:, None])
        assert same.any()
        assert torch.equal((k_pos - q_pos)[0][same], (keys - rows).expand(lq, lk)[same])


# --- the kernels themselves: sm90 GPU only -----------------------------------------------------

def _ids(length: int, device) -> torch.Tensor:
    """One batch row of four documents of uneven lengths with a padding gap (id -1)."""
    cuts = [0, 130, 400, 420, length - 60, length]
    ids = torch.empty(length, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        ids[a:b] = i if i != 2 else -1
    return ids.reshape(1, length).to(device)


GPU_CASES = [
    # (pattern, B, Hq, Hkv, Lq, Lk, D, modifications, packed documents)
    ("causal & sliding(70)", 1, 4, 2, 517, 517, 128, "softcap", False),
    ("causal", 2, 2, 2, 300, 300, 64, "softcap", False),
    ("causal & (sink(4) | sliding(100))", 1, 4, 2, 700, 700, 128, "alibi", False),
    ("sliding(33)", 1, 2, 2, 129, 257, 128, "alibi", False),  # Lq < Lk
    ("causal", 1, 2, 2, 200, 77, 128, "table", False),  # Lq > Lk: rows without keys
    ("local(50)", 2, 2, 2, 333, 333, 64, "table", False),
    ("causal & sliding(64)", 1, 4, 2, 400, 400, 128, "all", False),
    ("dense", 1, 2, 1, 256, 256, 128, "all", False),
    ("causal & sliding(64)", 1, 2, 1, 300, 300, 256, "all", False),
    ("causal", 1, 4, 2, 777, 777, 128, "alibi", True),
    ("causal & sliding(100)", 1, 4, 2, 777, 777, 64, "all", True),
]


def _modified(kind: str, hq: int, lq: int, lk: int, device) -> tuple[float, dict]:
    """(softcap, keyword arguments) of one case's modifications."""
    softcap = CAP if kind in ("softcap", "all") else 0.0
    extra = {}
    if kind in ("alibi", "all"):
        extra["alibi"] = _slopes(hq, device)
    if kind in ("table", "all"):
        extra["rel_bias"] = _table(hq, lq, lk, device)
    return softcap, extra


@needs_gluon_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-d{c[6]}-{c[7]}"
                         + ("-documents" if c[8] else ""))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_kernels_modify_logits_as_the_oracle(monkeypatch, case, dtype) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    text, b, hq, hkv, lq, lk, d, kind, packed = case
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype)
    if kind in ("softcap", "all"):  # logits large enough that the cap bites
        q = (q.detach() * 4).requires_grad_(True)
    softcap, extra = _modified(kind, hq, lq, lk, q.device)
    positions = {"documents": _ids(lq, q.device)} if packed else None

    def capped(*args, **kw):
        return attention(*args, softcap=softcap or None, **kw)

    check_against_oracle(capped, q, k, v, text, softcap=softcap, positions=positions,
                         alibi=extra.get("alibi"), rel_bias=extra.get("rel_bias"))
    assert fwd and bwd, "the Gluon kernels did not run"


@needs_gluon_gpu
@pytest.mark.parametrize("kind", ["softcap", "alibi", "table", "all"])
def test_gluon_and_tl_agree_and_the_backward_repeats_bit_for_bit(monkeypatch, kind) -> None:
    monkeypatch.setenv(support.KERNELS_ENV, "gluon")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fwd, bwd = strict_gluon(monkeypatch, kernels)
    q, k, v = (t.detach() for t in make_qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16))
    softcap, extra = _modified(kind, 8, 1000, 1000, q.device)
    extra = {name: t.detach() for name, t in extra.items()}
    text, dout = "causal & (sink(4) | sliding(200))", torch.randn_like(q)
    kw = dict(softcap=softcap, **extra)
    out, lse = kernels.forward(q, k, v, text, 0.1, **kw)
    first = kernels.backward(dout, q, k, v, out, lse, text, 0.1, **kw)[:3]
    again = kernels.backward(dout, q, k, v, out, lse, text, 0.1, **kw)[:3]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert len(fwd) == 1 and len(bwd) == 2, "the Gluon kernels did not run"
    tl_cfg = TileConfig(gluon=False)
    out_t, lse_t = kernels.forward(q, k, v, text, 0.1, cfg=tl_cfg, **kw)
    assert rel_error(out, out_t) < 1e-2
    assert (lse - lse_t).abs().max().item() < 1e-2
    tl = kernels.backward(dout, q, k, v, out_t, lse_t, text, 0.1, cfg=tl_cfg, **kw)[:3]
    for a, b in zip(first, tl, strict=True):
        assert rel_error(a, b) < 2e-2

