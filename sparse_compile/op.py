"""The differentiable custom op ``torch.ops.sparse_compile.attention``.

A ``torch.library.custom_op`` with a fake implementation and a registered autograd formula, so
Dynamo, AOTAutograd and Inductor see one opaque, differentiable node (static or dynamic shapes).
The pattern travels as its canonical DSL text. Where the kernels can run (CUDA tensors, or CPU
tensors with ``TRITON_INTERPRET=1``) both directions launch the generated Triton kernels;
otherwise they use the chunked PyTorch path, the backward recomputing it under autograd.
"""

from __future__ import annotations

import os

import torch

from sparse_compile.fallback import chunked_attention
from sparse_compile.heads_layout import empty_heads, laid_out_like
from sparse_compile.tracing import is_tracing

_NS = "sparse_compile"


def kernels_available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless k and v have the same heads and q's heads are a multiple of
    them (GQA: query head h reads kv head h // (Hq // Hkv)). Symbolic head counts are
    guarded on (another ratio recompiles)."""
    hq, hkv = q.shape[1], k.shape[1]
    if v.shape[1] != hkv or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads (q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}): Hq must "
                         "be a multiple of Hkv, and k and v must have the same heads")


def _seed_int(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _fallback(q, k, v, bias, pattern, scale, dropout_p, seed, softcap=0.0, starts=None,
              documents=None, alibi=None, rel_bias=None):
    from sparse_compile.codegen.attention import parse_pattern

    with torch.random.fork_rng(devices=[q.device] if q.is_cuda else [], enabled=dropout_p > 0):
        if dropout_p > 0:
            torch.manual_seed(_seed_int(seed))
        return chunked_attention(q, k, v, parse_pattern(pattern), scale, bias, dropout_p,
                                 softcap=softcap, starts=starts, documents=documents,
                                 alibi=alibi, rel_bias=rel_bias)


def kernel_frame(q: torch.Tensor, starts: torch.Tensor | None,
                 documents: torch.Tensor | None):
    """The kernels' Frame for the op's ``starts`` / ``documents`` (sparse_compile.positions)."""
    from sparse_compile.codegen.launch.positions import (
        DEFAULT_FRAME,
        documents_frame,
        starts_frame,
    )

    if documents is not None:
        return documents_frame(documents, q.shape[0])
    if starts is not None:
        return starts_frame(starts)
    return DEFAULT_FRAME


@torch.library.custom_op(f"{_NS}::prepare_documents", mutates_args=())
def prepare_documents(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Each token's document as key indices, int32 ``[2, batch, L]`` (start, end), from ids
    ``[B or 1, L]``: the work that depends on the ids, done once per graph by the backend and
    handed to every attention call as its ``documents`` (see ``positions.document_bounds_of``)
    instead of once per layer and again in each backward."""
    from sparse_compile.positions import document_bounds_of

    return torch.stack(document_bounds_of(ids, batch))


@prepare_documents.register_fake
def _(ids, batch):
    return ids.new_empty((2, batch, ids.shape[-1]), dtype=torch.int32)


@torch.library.custom_op(f"{_NS}::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: str,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    softcap: float = 0.0,
    starts: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Lq, D] (q's dtype, in q's layout: sparse_compile/heads_layout.py) and lse
    [B, Hq, Lq] float32 (log2 units; kernel path).

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], bias None or broadcastable to [B, Hq, Lq, Lk],
    pattern: canonical DSL text, seed: int64 scalar tensor on the CPU (dropout only),
    softcap: when > 0, logits are capped as softcap * tanh(scale * q.k / softcap) before the
    bias and the pattern (Gemma-2 style); 0 = off. starts: None or int ``[B or 1, 2]``
    (positions of query row 0 and key 0 per batch row); documents: None or integer ids
    ``[B or 1, L]`` (sparse_compile.positions; trusted here, checked by ``attention``);
    alibi: None or float32 slopes ``[Hq]`` (logits + slope * (k_pos - q_pos)); rel_bias: None
    or a float32 relative-bias table ``[Hq or 1, Lq + Lk - 1]`` (sparse_compile.relative_bias;
    differentiable).
    Raises ``ValueError`` when Hq is not a multiple of Hkv.
    """
    check_heads(q, k, v)
    if kernels_available(q):
        from sparse_compile.codegen.attention import forward

        return forward(q, k, v, pattern, scale, bias, dropout_p, _seed_int(seed),
                       softcap=softcap, frame=kernel_frame(q, starts, documents), alibi=alibi,
                       rel_bias=rel_bias, query_layout=True)
    out = _fallback(q, k, v, bias, pattern, scale, dropout_p, seed, softcap, starts, documents,
                    alibi, rel_bias)
    lse = torch.zeros(q.shape[:3], device=q.device, dtype=torch.float32)
    return laid_out_like(out, q), lse


def _precompile(q, k, v, pattern, scale, plain: bool, documents, backward: bool,
                dout=None) -> None:
    """Start compiling the kernels a plain call (default positions or packed ``documents``)
    will launch (``codegen/precompile.py``) while the graph around it is traced and
    compiled."""
    if plain and q.device.type == "cuda":
        from sparse_compile.codegen import precompile

        precompile.precompile(q, k, v, pattern, scale, backward, documents is not None, dout)


def _plain(bias, dropout_p, softcap, starts, alibi, rel_bias) -> bool:
    """Whether a call has no bias, dropout, soft-capping, start positions or position bias."""
    return (bias is None and not dropout_p and not softcap and starts is None
            and alibi is None and rel_bias is None)


@attention_op.register_fake
def _(q, k, v, bias, pattern, scale, dropout_p, seed, softcap=0.0, starts=None, documents=None,
      alibi=None, rel_bias=None):
    check_heads(q, k, v)
    _precompile(q, k, v, pattern, scale, _plain(bias, dropout_p, softcap, starts, alibi, rel_bias),
                documents, False)
    b, hq, lq, d = q.shape
    return empty_heads(q, (b, hq, lq, d), q.dtype), q.new_empty((b, hq, lq), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: str,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    bias_grad: bool,
    softcap: float = 0.0,
    starts: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    rel_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias, drel); dbias has bias's shape when ``bias_grad`` else is empty,
    drel the table's when ``rel_grad`` else is empty."""
    drel = None
    if kernels_available(q):
        from sparse_compile.codegen.attention import backward, relative_bias_grad

        frame = kernel_frame(q, starts, documents)
        dq, dk, dv, db = backward(
            dout, q, k, v, out, lse, pattern, scale, bias, bias_grad, dropout_p, _seed_int(seed),
            softcap=softcap, frame=frame, alibi=alibi, rel_bias=rel_bias,
        )
        if rel_grad:
            drel = relative_bias_grad(dout, q, k, v, out, lse, pattern, scale, bias, dropout_p,
                                      _seed_int(seed), softcap, frame, alibi, rel_bias)
    else:
        # The op runs below the autograd dispatch key: differentiate with torch.func instead.
        with_bias = bias is not None and bias_grad and bias.is_floating_point()
        with_rel = rel_bias is not None and rel_grad

        def fn(q_, k_, v_, b_, r_):
            return _fallback(q_, k_, v_, b_, pattern, scale, dropout_p, seed, softcap, starts,
                             documents, alibi, r_)

        names = ["q", "k", "v"] + ["bias"] * with_bias + ["rel"] * with_rel

        def wrt(*args):
            given = dict(zip(names, args, strict=True))
            return fn(given["q"], given["k"], given["v"], given.get("bias", bias),
                      given.get("rel", rel_bias))

        primals = [q, k, v] + [bias] * with_bias + [rel_bias] * with_rel
        _, vjp = torch.func.vjp(wrt, *primals)
        grads = dict(zip(names, vjp(dout), strict=True))
        dq, dk, dv, db, drel = (grads["q"], grads["k"], grads["v"], grads.get("bias"),
                                grads.get("rel"))
    if db is None:
        db = q.new_empty((0,))
    if drel is None:
        drel = q.new_empty((0,))
    # The fake implementation promises contiguous results.
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), db.contiguous(), drel.contiguous()


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, pattern, scale, dropout_p, seed, bias_grad, softcap=0.0,
      starts=None, documents=None, alibi=None, rel_bias=None, rel_grad=False):
    _precompile(q, k, v, pattern, scale, _plain(bias, dropout_p, softcap, starts, alibi, rel_bias),
                documents, True, dout)
    db = bias.new_empty(bias.shape) if (bias is not None and bias_grad) else q.new_empty((0,))
    drel = rel_bias.new_empty(rel_bias.shape) if (rel_bias is not None and rel_grad) \
        else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db, drel


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, pattern, scale, dropout_p, seed, *rest = inputs
    softcap, starts, documents, alibi, rel_bias = (
        list(rest) + [0.0, None, None, None, None][len(rest):])[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, seed, starts, documents, alibi, rel_bias)
    ctx.pattern, ctx.scale, ctx.dropout_p = pattern, scale, dropout_p
    ctx.softcap = softcap
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.rel_grad = rel_bias is not None and rel_bias.requires_grad
    # An eager call's backward will follow: its kernels can compile meanwhile (a traced
    # graph's start from the backward op's fake implementation, which sees the gradient).
    if not is_tracing(q, k, v):
        _precompile(q, k, v, pattern, scale,
                    _plain(bias, dropout_p, softcap, starts, alibi, rel_bias), documents, True)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse, seed, starts, documents, alibi, rel_bias = ctx.saved_tensors
    # The kernels read dout with any strides; a model's gradient arrives in the output's
    # (sequence-major) layout, which a copy to head-major order would only slow down.
    dq, dk, dv, db, drel = attention_backward_op(
        grad_out, q, k, v, out, lse, bias, ctx.pattern, ctx.scale, ctx.dropout_p,
        seed, ctx.bias_grad, ctx.softcap, starts, documents, alibi, rel_bias, ctx.rel_grad,
    )
    return (dq, dk, dv, (db if ctx.bias_grad else None), None, None, None, None, None, None,
            None, None, (drel if ctx.rel_grad else None))


attention_op.register_autograd(_backward, setup_context=_setup_context)
