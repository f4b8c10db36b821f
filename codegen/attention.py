"""Forward and backward of pattern-sparse attention through the generated kernels.

These functions take plain tensors and a Pattern and run the kernels; the differentiable
custom op (sparse_compile/op.py) wraps them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
from sparse_compile.codegen import precompile
from sparse_compile.codegen.gluon.backward import launch_gluon_backward
from sparse_compile.codegen.gluon.forward import launch_gluon_forward
from sparse_compile.codegen.gluon.key_mask import is_key_mask
from sparse_compile.codegen.gluon.rows import (
    RowPieces,
    document_rows,
    interval_rows,
    position_only,
    shifted_rows,
)
from sparse_compile.codegen.gluon.score import NO_MODS, ScoreMods
from sparse_compile.codegen.gluon.support import gluon_device, gluon_extended, gluon_head_dims
from sparse_compile.codegen.launch.config import (
    LONG_ROWS,
    TileConfig,
    default_config,
    long_rows_config,
)
from sparse_compile.codegen.launch.fallbacks import (
    FellBack,
    fall_back_on_failure,
    family_available,
)
from sparse_compile.codegen.launch.positions import (
    DEFAULT_FRAME,
    DOCUMENTS,
    FIXED,
    PER_BATCH,
    Frame,
)
from sparse_compile.codegen.launch.tables import (
    CLOSED_FORM,
    HULL,
    ROW_BOUNDS,
    TABLES,
    Visit,
    block_tables,
    layout_for,
    row_bounds,
)
from sparse_compile.codegen.routes.residue import (
    ResidueRoute,
    as_layout,
    class_grid,
    class_layout,
    residue_route,
    rows_of_grid,
    to_classes,
)
from sparse_compile.codegen.routes.strided_union import StridedUnion, strided_union_route
from sparse_compile.codegen.tl.backward_delta import launch_delta
from sparse_compile.codegen.tl.backward_dkdv import launch_dkdv
from sparse_compile.codegen.tl.backward_dq import launch_dq
from sparse_compile.codegen.tl.backward_table import launch_table_grad, relative_table_grad
from sparse_compile.codegen.tl.decode import decode_applies, launch_decode
from sparse_compile.codegen.tl.forward import launch_forward
from sparse_compile.codegen.tl.merge import add_rows_, merge_parts
from sparse_compile.codegen.tl.module import kernel_module
from sparse_compile.codegen.tl.predicate import interval_bounds, interval_pieces, pattern_heads

from sparse_compile.heads_layout import laid_out_like


@lru_cache(maxsize=256)
def parse_pattern(text: str) -> Any:
    """Pattern for its DSL text (cached)."""
    from sparse_compile.patterns import parse

    return parse(text)


@lru_cache(maxsize=256)
def _is_interval(text: str) -> bool:
    return interval_bounds(parse_pattern(text)) is not None


@lru_cache(maxsize=256)
def _pieces(text: str) -> int:
    """How many intervals make a row of the pattern (1 or 2), 0 when it is no such union."""
    pieces = interval_pieces(parse_pattern(text))
    return 0 if pieces is None else max(len(p) for p in pieces)


@lru_cache(maxsize=256)
def mean_row_keys(pattern_text: str, lq: int, lk: int) -> float:
    """Mean number of keys a query row visits (128-wide blocks) for interval patterns; 0 for
    the others (their blocks are scattered: the small default tiles suit them)."""
    if not _is_interval(pattern_text) or lq == 0 or lk == 0:
        return 0.0
    lay = layout_for(parse_pattern(pattern_text), lq, lk, 128, 128)
    return float((lay.kv_end - lay.kv_start).float().mean()) * 128


@lru_cache(maxsize=1024)
def _call_config(pattern_text: str, device: torch.device, d: int, dtype: torch.dtype, lq: int,
                 lk: int, interpret: str | None, base: TileConfig | None) -> TileConfig:
    cfg = base or default_config(device, d, dtype)
    if mean_row_keys(pattern_text, lq, lk) >= LONG_ROWS:
        cfg = long_rows_config(cfg, device, d, dtype)
    return cfg


def select_config(
    pattern_text: str, q: torch.Tensor, lk: int, base: TileConfig | None = None
) -> TileConfig:
    """Tiles for this call: ``base`` (default: the device's defaults), with the backward's
    long-row tiles when the pattern's rows are long (config.LONG_ROWS). Cached per pattern,
    device, head dim, dtype and lengths: it runs on every call."""
    return _call_config(pattern_text, q.device, q.shape[-1], q.dtype, q.shape[2], lk,
                        os.environ.get("TRITON_INTERPRET"), base)


@lru_cache(maxsize=256)
def static_kernels(pattern_text: str) -> tuple[ModuleType, int]:
    """(generated kernel module, number of pattern heads) of a static pattern's text."""
    pattern = parse_pattern(pattern_text)
    if pattern.is_dynamic:
        raise NotImplementedError(f"dynamic pattern {pattern_text!r} has no static kernel")
    return kernel_module(pattern), pattern_heads(pattern)


def visit_plan(
    pattern_text: str, lq: int, lk: int, block_m: int, block_n: int, device: torch.device,
    transposed: bool = False, frame: Frame = DEFAULT_FRAME,
) -> Visit:
    """How a kernel with ``block_m x block_n`` tiles finds its blocks: closed-form bounds,
    row bounds of an interval union, or the layout's compact tables (per query block, or per
    key block when ``transposed``). Row bounds and tables are built for the default alignment:
    under another ``frame`` the patterns without a closed form visit their hull."""
    if _is_interval(pattern_text):
        return Visit(CLOSED_FORM)
    if not frame.is_default(lq, lk):
        return Visit(HULL)
    pattern = parse_pattern(pattern_text)
    rows = row_bounds(pattern, lq, lk, device)
    if rows is not None:
        return Visit(ROW_BOUNDS, rows=rows)
    kv, q_tables = block_tables(pattern, lq, lk, block_m, block_n, device)
    return Visit(TABLES, tables=q_tables if transposed else kv)


def kernel_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """Bias as the kernels read it: 4-D view, bool as uint8 (no copy)."""
    if bias is None:
        return None
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return bias.view(torch.uint8) if bias.dtype == torch.bool else bias


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern_text: str,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    cfg: TileConfig | None = None,
    softcap: float = 0.0,
    out_dtype: torch.dtype | None = None,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    query_layout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, Hq, Lq, D] (``out_dtype``, default q's) and lse [B, Hq, Lq] (float32,
    log2 units, +inf if empty). out is contiguous, or with ``query_layout`` laid out like q
    (sparse_compile/heads_layout.py: the op's layout; the kernels that write any layout write
    it directly, the other routes' outputs are copied into it).

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], bias None or broadcastable to [B, Hq, Lq, Lk];
    softcap > 0 caps the logits as softcap * tanh(scale * q.k / softcap) before bias / masks;
    ``frame``: where queries and keys sit (codegen/launch/positions.py; the residue and
    strided-union routes serve the default alignment only); ``alibi``: None or float32
    per-query-head slopes ``[Hq]``, adding ``slope * (k_pos - q_pos)`` to the logits;
    ``rel_bias``: None or a float32 relative-bias table ``[Hq or 1, Lq + Lk - 1]``, adding
    ``table[h, clamp(q_pos - k_pos + Lq - 1, 0, Lq + Lk - 2)]``.
    """
    out, lse = _forward(q, k, v, pattern_text, scale, bias, dropout_p, seed, cfg, softcap,
                        out_dtype, frame, alibi, rel_bias, query_layout)
    return (laid_out_like(out, q) if query_layout else out), lse


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str, scale: float,
             bias: torch.Tensor | None, dropout_p: float, seed: int, cfg: TileConfig | None,
             softcap: float, out_dtype: torch.dtype | None, frame: Frame,
             alibi: torch.Tensor | None, rel_bias: torch.Tensor | None, query_layout: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` through the first route that serves the call; with ``query_layout`` the
    Gluon and ``tl`` kernels write out in q's layout, the other routes contiguously."""
    lq, lk = q.shape[2], k.shape[2]
    if decode_applies(q, k, dropout_p, frame) and family_available("decode"):
        module, n_heads = static_kernels(pattern_text)
        precision = TileConfig.precision(q.dtype, q.shape[-1])
        try:
            with fall_back_on_failure("decode"):
                return launch_decode(module, q, k, v, kernel_bias(bias), n_heads,
                                     _pieces(pattern_text), scale, precision, softcap,
                                     out_dtype, frame, alibi, rel_bias)
        except FellBack:
            pass  # the general kernels below compute the same
    if frame.is_default(lq, lk) and alibi is None and rel_bias is None:
        parts = strided_union_route(pattern_text, lq, lk, bias is not None, dropout_p)
        if parts is not None:
            return _union_forward(parts, q, k, v, scale, cfg, softcap, out_dtype)
        route = residue_route(pattern_text, lq, lk, bias is not None, dropout_p)
        if route is not None:
            return _residue_forward(route, q, k, v, scale, cfg, softcap, out_dtype)
    cfg = cfg or select_config(pattern_text, q, lk)
    if _gluon_call(cfg, bias, dropout_p, softcap, alibi, rel_bias, frame, lq, lk):
        result = _gluon_forward(q, k, v, pattern_text, scale, out_dtype, frame, query_layout,
                                ScoreMods(softcap, alibi, rel_bias), *_gluon_biases(bias, lk))
        if result is not None:
            return result
    module, n_heads = static_kernels(pattern_text)
    visit = visit_plan(pattern_text, lq, lk, cfg.fwd_m, cfg.fwd_n, q.device, frame=frame)
    return launch_forward(
        module, q, k, v, kernel_bias(bias), visit, n_heads, scale, dropout_p, seed, cfg, softcap,
        out_dtype, frame, alibi, rel_bias, query_layout,
    )


def _gluon_call(cfg: TileConfig, bias: torch.Tensor | None, dropout_p: float, softcap: float,
                alibi: torch.Tensor | None, rel_bias: torch.Tensor | None, frame: Frame, lq: int,
                lk: int) -> bool:
    """Whether a call is one the Gluon kernels serve and ``cfg`` allows them: no dropout;
    default positions or packed documents of one batch row, where ``gluon_extended()``
    allows also with soft-capping, ALiBi or relative-bias tables (which the kernels place at
    the default alignment) or a bias tensor (``key_mask.py``, ``bias.py``); positions set by
    one pair of starts without logit modifications, where ``gluon_extended()`` allows. A
    bias's gradient keeps the backward on the ``tl`` passes (``backward``)."""
    if not cfg.gluon or dropout_p != 0.0:
        return False
    if bias is not None and not gluon_extended():
        return False
    mods = bool(softcap) or alibi is not None or rel_bias is not None
    if frame.is_default(lq, lk) or _one_row_of_documents(frame):
        return not mods or gluon_extended()
    return _one_pair_of_starts(frame) and not mods and gluon_extended()


def _gluon_biases(bias: torch.Tensor | None, lk: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key mask, other bias) of a call's bias for the Gluon kernels: a boolean ``[B or 1, 1,
    1, Lk]`` one goes the cheaper per-key way (``key_mask.py``), any other is read tile by
    tile (``bias.py``)."""
    if bias is None:
        return None, None
    if is_key_mask(bias, lk):
        return kernel_bias(bias), None
    return None, kernel_bias(bias)


def _one_pair_of_starts(frame: Frame) -> bool:
    """Whether ``frame`` places every batch row's queries and keys by the same starts: fixed
    ones, or per-batch ones read on the device with one row (``rows.shifted_rows``)."""
    if frame.mode == FIXED:
        return True
    return frame.mode == PER_BATCH and frame.starts is not None and frame.starts.shape[0] == 1


def _frame_starts(frame: Frame, lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """``[1, 2]`` (q_start, k_start) of a frame ``_one_pair_of_starts`` accepts, on
    ``device``: the per-batch tensor plus the fixed starts, added on the device as scalars
    (no host-to-device copy, which a CUDA graph capture would refuse)."""
    q_first = lk - lq if frame.q_first is None else frame.q_first
    if frame.starts is None:
        return torch.stack([torch.full((1,), q_first, dtype=torch.int64, device=device),
                            torch.full((1,), frame.k_first, dtype=torch.int64, device=device)],
                           dim=1)
    starts = frame.starts.to(torch.int64)
    if q_first == 0 and frame.k_first == 0:
        return starts
    return torch.stack([starts[:, 0] + q_first, starts[:, 1] + frame.k_first], dim=1)


def _one_row_of_documents(frame: Frame) -> bool:
    """Whether ``frame`` places packed documents of a single batch row (the Gluon kernels read
    one set of row intervals for every program)."""
    return frame.mode == DOCUMENTS and frame.doc_start is not None and (
        frame.doc_start.shape[0] == 1)


def _gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str,
                   scale: float, out_dtype: torch.dtype | None, frame: Frame = DEFAULT_FRAME,
                   query_layout: bool = False, mods: ScoreMods = NO_MODS,
                   key_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The forward through the Hopper Gluon kernel where it applies (``_gluon_rows``, and
    TMA-walkable layouts), else None; a Gluon failure is logged once and the ``tl`` kernels
    take over."""
    if not family_available("gluon_forward"):
        return None
    rows = _gluon_rows(q, k, v, pattern_text, frame)
    if rows is None:
        return None
    precompile.finish_call(q, k, v, None, pattern_text, False, frame.mode == DOCUMENTS)
    try:
        with fall_back_on_failure("gluon_forward"):
            return launch_gluon_forward(q, k, v, rows, scale, out_dtype,
                                        query_layout=query_layout, mods=mods,
                                        key_mask=key_mask, bias=bias)
    except FellBack:
        return None


def _gluon_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str,
                frame: Frame = DEFAULT_FRAME, backward: bool = False) -> RowPieces | None:
    """Row intervals for the Gluon kernels where they apply to this call (sm90, a supported
    Triton, 16-bit operands, a head dim of ``gluon_head_dims(backward)``, rows of one or two
    intervals; inside the documents of ``frame`` when it places some, at its starts when it
    sets one pair: ``shifted_rows``), else None."""
    if not _gluon_serves(q, k, v, q.device, backward):
        return None
    lq, lk = q.shape[2], k.shape[2]
    if frame.mode == DOCUMENTS:
        return document_rows(parse_pattern(pattern_text), frame.doc_start[0], frame.doc_end[0])
    if not frame.is_default(lq, lk):
        return shifted_rows(parse_pattern(pattern_text), lq, lk,
                            _frame_starts(frame, lq, lk, q.device))
    return interval_rows(parse_pattern(pattern_text), lq, lk, q.device)


def _gluon_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device: torch.device,
                  backward: bool = False) -> bool:
    """Whether the Gluon forward (``backward``: backward) kernels take operands like these on
    ``device``."""
    if not gluon_device(device):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return q.shape[-1] in gluon_head_dims(backward) and q.numel() > 0 and k.shape[2] > 0


def plain_gluon_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str,
                     device: torch.device, rows_device: torch.device, documents: bool = False,
                     backward: bool = False) -> RowPieces | None:
    """Row intervals (built on ``rows_device``) shaped like those a plain call (no bias,
    dropout, soft-capping, position bias; default positions, or packed ``documents``) with
    operands shaped like q, k, v on ``device`` would hand the Gluon kernels, or None when such
    a call takes another route (decoding, residue or strided-union routes, documents over
    several batch rows, ``tl`` kernels). With ``documents`` the values differ from the call's
    (``document_rows`` are built from the documents on the device), the shapes and dtypes, all
    the kernels specialise on, do not. The operands may be ``meta`` tensors: only their shapes
    and dtypes are read. What ``forward`` and ``backward`` decide for that call, asked ahead of
    it (``codegen/precompile.py``)."""
    lq, lk = q.shape[2], k.shape[2]
    pattern = parse_pattern(pattern_text)
    if documents:  # _one_row_of_documents, and document_rows' own condition
        if lq != lk or q.shape[0] != 1 or not position_only(pattern):
            return None
    elif decode_applies(q, k, 0.0, DEFAULT_FRAME) and family_available("decode"):
        return None
    elif (strided_union_route(pattern_text, lq, lk, False, 0.0) is not None
            or residue_route(pattern_text, lq, lk, False, 0.0) is not None):
        return None
    cfg = _call_config(pattern_text, device, q.shape[-1], q.dtype, lq, lk,
                       os.environ.get("TRITON_INTERPRET"), None)
    if not cfg.gluon or not _gluon_serves(q, k, v, device, backward):
        return None
    return interval_rows(pattern, lq, lk, rows_device)


def _gluon_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, pattern_text: str, scale: float,
                    frame: Frame = DEFAULT_FRAME, mods: ScoreMods = NO_MODS,
                    key_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(dq, dk, dv) through the Hopper Gluon backward where it applies, else None; a Gluon
    failure is logged once and the ``tl`` passes take over."""
    if not family_available("gluon_backward"):
        return None
    rows = _gluon_rows(q, k, v, pattern_text, frame, backward=True)
    if rows is None:
        return None
    precompile.finish_call(q, k, v, dout, pattern_text, True, frame.mode == DOCUMENTS)
    try:
        with fall_back_on_failure("gluon_backward"):
            return launch_gluon_backward(dout, q, k, v, out, lse, rows, scale, mods=mods,
                                         key_mask=key_mask, bias=bias)
    except FellBack:
        return None


def fused_backward(cfg: TileConfig, bias_grad: bool) -> bool:
    """Whether the backward runs as one dK/dV pass with atomic dQ (cfg.bwd_fused) rather than
    two passes. Two passes when deterministic algorithms are requested (float atomics add in
    a run-dependent order: not bitwise reproducible) or when the bias needs its gradient
    (written by the dQ pass)."""
    return (cfg.bwd_fused != 0 and not bias_grad
            and not torch.are_deterministic_algorithms_enabled())


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern_text: str,
    scale: float,
    bias: torch.Tensor | None = None,
    bias_requires_grad: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
    cfg: TileConfig | None = None,
    softcap: float = 0.0,
    frame: Frame = DEFAULT_FRAME,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dbias) for the forward above; dbias has bias's shape or None."""
    lq, lk = q.shape[2], k.shape[2]
    if frame.is_default(lq, lk) and alibi is None and rel_bias is None:
        parts = strided_union_route(pattern_text, lq, lk, bias is not None, dropout_p)
        if parts is not None:
            return _union_backward(parts, dout, q, k, v, out, lse, scale, cfg, softcap)
        route = residue_route(pattern_text, lq, lk, bias is not None, dropout_p)
        if route is not None:
            return _residue_backward(route, dout, q, k, v, out, lse, scale, cfg, softcap)
    cfg = cfg or select_config(pattern_text, q, lk)
    bias_grad = bias is not None and bias_requires_grad and bias.is_floating_point()
    if not bias_grad and _gluon_call(cfg, bias, dropout_p, softcap, alibi, rel_bias, frame, lq,
                                     lk):
        grads = _gluon_backward(dout, q, k, v, out, lse, pattern_text, scale, frame,
                                ScoreMods(softcap, alibi, rel_bias), *_gluon_biases(bias, lk))
        if grads is not None:
            return (*grads, None)
    module, n_heads = static_kernels(pattern_text)
    kb = kernel_bias(bias)
    dbias = None
    if bias_grad:
        dbias = torch.zeros(kb.shape, device=q.device, dtype=torch.float32)
    kv_visit = visit_plan(pattern_text, lq, lk, cfg.kv_m, cfg.kv_n, q.device, transposed=True,
                          frame=frame)
    if fused_backward(cfg, dbias is not None):
        delta = launch_delta(out, dout)
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dk, dv = launch_dkdv(
            module, q, k, v, kb, dout, lse, delta, kv_visit, n_heads, scale, dropout_p, seed,
            cfg, softcap, dq_acc, frame, alibi, rel_bias,
        )
        # One epilogue pass: scale and cast (in place for float32 inputs).
        if q.dtype == torch.float32:
            dq = dq_acc.mul_(scale)
        else:
            dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
            torch.mul(dq_acc, scale, out=dq)
        return dq, dk, dv, None
    dq_visit = visit_plan(pattern_text, lq, lk, cfg.dq_m, cfg.dq_n, q.device, frame=frame)
    # The dQ pass computes Δ = rowsum(dO ∘ O) for its rows and leaves it for the dK/dV pass.
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    dq = launch_dq(
        module, q, k, v, kb, dout, lse, delta, dbias, dq_visit, n_heads, scale, dropout_p,
        seed, cfg, softcap, out, frame, alibi, rel_bias,
    )
    dk, dv = launch_dkdv(
        module, q, k, v, kb, dout, lse, delta, kv_visit, n_heads, scale, dropout_p, seed, cfg,
        softcap, None, frame, alibi, rel_bias,
    )
    if dbias is not None:
        dbias = dbias.reshape(bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias


def relative_bias_grad(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern_text: str,
    scale: float,
    bias: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    softcap: float,
    frame: Frame,
    alibi: torch.Tensor | None,
    rel_bias: torch.Tensor,
) -> torch.Tensor:
    """Gradient of the relative-bias table ``rel_bias`` (float32 ``[Hq or 1, Lq + Lk - 1]``)
    for the forward above: dS summed per diagonal in the kernels (codegen/tl/backward_table.py,
    deterministic), then mapped to the table's entries."""
    module, n_heads = static_kernels(pattern_text)
    delta = launch_delta(out, dout)
    diagonals = launch_table_grad(module, q, k, v, kernel_bias(bias), dout, lse, delta, n_heads,
                                  scale, dropout_p, seed, softcap, frame, alibi, rel_bias)
    return relative_table_grad(diagonals, frame, q.shape[2], k.shape[2], rel_bias.shape[0])


def _class_views(route: ResidueRoute, tensors: list[torch.Tensor], same_heads: bool
                 ) -> tuple[str, list[torch.Tensor]]:
    """(layout, the tensors viewed by residue class); a copy only for strides no view fits."""
    layout = class_layout(tensors, same_heads)
    if layout == "copy":
        layout = "batch" if same_heads else "head"
        tensors = [as_layout(t, layout) for t in tensors]
    return layout, [to_classes(t, route.s, layout) for t in tensors]


def _residue_forward_grid(route: ResidueRoute, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, scale: float, cfg: TileConfig | None, softcap: float,
                          out_dtype: torch.dtype | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of a ``strided(s) & R`` pattern as ``route.inner`` over residue classes:
    out and lse as ``[B, Hq, Lq / s, s, (D)]`` views of the class-ordered outputs (no copy)."""
    b, hq = q.shape[:2]
    layout, (qc, kc, vc) = _class_views(route, [q, k, v], hq == k.shape[1])
    out, lse = forward(qc, kc, vc, route.inner, scale, cfg=cfg, softcap=softcap,
                       out_dtype=out_dtype)
    return class_grid(out, b, hq, layout), class_grid(lse, b, hq, layout)


def _residue_forward(route: ResidueRoute, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float, cfg: TileConfig | None, softcap: float,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_residue_forward_grid`` in row order (contiguous [B, Hq, Lq, D] and [B, Hq, Lq])."""
    out, lse = _residue_forward_grid(route, q, k, v, scale, cfg, softcap, out_dtype)
    return rows_of_grid(out), rows_of_grid(lse)


def _residue_backward_grid(route: ResidueRoute, dout: torch.Tensor, q: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, scale: float, cfg: TileConfig | None,
                           softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``_residue_forward`` (same classes, same inner pattern): dq, dk, dv as
    ``[B, H, L / s, s, D]`` views of the class-ordered gradients (no copy)."""
    b, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    layout, (qc, kc, vc, oc, doc) = _class_views(route, [q, k, v, out, dout], hq == hkv)
    # The kernels read the log-sum-exp row-dense: a (small) copy in class order.
    lse_c = to_classes(as_layout(lse, layout), route.s, layout).contiguous()
    dq, dk, dv, _ = backward(doc, qc, kc, vc, oc, lse_c, route.inner, scale, cfg=cfg,
                             softcap=softcap)
    return (class_grid(dq, b, hq, layout), class_grid(dk, b, hkv, layout),
            class_grid(dv, b, hkv, layout))


def _residue_backward(route: ResidueRoute, dout: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      scale: float, cfg: TileConfig | None, softcap: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """``_residue_backward_grid`` in row order (contiguous gradients)."""
    grads = _residue_backward_grid(route, dout, q, k, v, out, lse, scale, cfg, softcap)
    dq, dk, dv = (rows_of_grid(g) for g in grads)
    return dq, dk, dv, None


def _union_forward(parts: StridedUnion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, cfg: TileConfig | None, softcap: float,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A strided union's forward: its two parts, merged (codegen/routes/strided_union.py). The parts
    keep their outputs in float32 so that the merged output is rounded once; the strided
    part's is merged where the residue classes left it (codegen/tl/merge.py)."""
    b, hq, lq, d = q.shape
    out_main, lse_main = forward(q, k, v, parts.main, scale, cfg=cfg, softcap=softcap,
                                 out_dtype=torch.float32)
    route = residue_route(parts.strided, lq, k.shape[2], False, 0.0)
    out_strided, lse_strided = _residue_forward_grid(route, q, k, v, scale, cfg, softcap,
                                                     torch.float32)
    grid = lse_strided.shape
    out, lse = merge_parts(out_main.view(*grid, d), lse_main.view(grid), out_strided,
                           lse_strided, out_dtype or q.dtype)
    return out.view(b, hq, lq, d), lse.view(b, hq, lq)


def _union_backward(parts: StridedUnion, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                    cfg: TileConfig | None, softcap: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Each part's passes with the merged output and log-sum-exp give that part's share of
    the gradients (P and Δ are the whole pattern's); their sum is the pattern's. The strided
    part's shares are added where the residue classes left them (no reordering copy)."""
    grads = backward(dout, q, k, v, out, lse, parts.main, scale, cfg=cfg, softcap=softcap)[:3]
    route = residue_route(parts.strided, q.shape[2], k.shape[2], False, 0.0)
    shares = _residue_backward_grid(route, dout, q, k, v, out, lse, scale, cfg, softcap)
    for grad, share in zip(grads, shares, strict=True):
        add_rows_(grad.view(share.shape), share)
    dq, dk, dv = grads
    return dq, dk, dv, None
