"""Eager fast path: the generated kernels under a plain ``autograd.Function``.

The custom op (sparse_compile/op.py) is what graphs see, but its dispatch (schema defaults,
autograd wrapper, redispatch) costs ~100-200 µs of Python per eager call, more than the kernel
itself on short bands. Outside tracing, ``attention`` calls the same kernels through this module
instead: same forward, same backward, same results.
"""

from __future__ import annotations

import torch

from sparse_compile.op import kernel_frame, kernels_available
from sparse_compile.tracing import is_tracing


def fast_path_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call may skip the custom op: plain tensors the kernels can run on, no
    compilation, tracing mode or functorch transform watching (they need the op's node)."""
    if is_tracing(*tensors) or torch._C._are_functorch_transforms_active():
        return False
    return kernels_available(tensors[0])


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


class _KernelAttention(torch.autograd.Function):
    """out = the kernels' forward; backward = the kernels' dQ and dK/dV passes."""

    @staticmethod
    def forward(ctx, q, k, v, bias, pattern, scale, dropout_p, seed, softcap, frame, alibi,
                rel_bias):
        from sparse_compile.codegen.attention import forward

        out, lse = forward(q, k, v, pattern, scale, bias, dropout_p, seed, softcap=softcap,
                           frame=frame, alibi=alibi, rel_bias=rel_bias, query_layout=True)
        ctx.save_for_backward(q, k, v, bias, out, lse, rel_bias)
        ctx.args = (pattern, scale, dropout_p, seed, softcap, frame, alibi)
        ctx.bias_grad = bias is not None and bias.requires_grad and bias.is_floating_point()
        ctx.rel_grad = rel_bias is not None and rel_bias.requires_grad
        return out

    @staticmethod
    def backward(ctx, dout):
        from sparse_compile.codegen.attention import backward, relative_bias_grad

        q, k, v, bias, out, lse, rel_bias = ctx.saved_tensors
        pattern, scale, dropout_p, seed, softcap, frame, alibi = ctx.args
        dq, dk, dv, db = backward(
            dout, q, k, v, out, lse, pattern, scale, bias, ctx.bias_grad, dropout_p, seed,
            softcap=softcap, frame=frame, alibi=alibi, rel_bias=rel_bias,
        )
        drel = None
        if ctx.rel_grad:
            drel = relative_bias_grad(dout, q, k, v, out, lse, pattern, scale, bias, dropout_p,
                                      seed, softcap, frame, alibi, rel_bias)
        return dq, dk, dv, db, None, None, None, None, None, None, None, drel


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: str,
    scale: float,
    dropout_p: float,
    seed: int,
    softcap: float,
    starts: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernels' attention ([B, Hq, Lq, D]), differentiable when an input requires grad.

    ``pattern`` is canonical DSL text of a static pattern; arguments as the custom op's.
    """
    frame = kernel_frame(q, starts, documents)
    if _needs_grad(q, k, v, bias, rel_bias):
        return _KernelAttention.apply(q, k, v, bias, pattern, scale, dropout_p, seed, softcap,
                                      frame, alibi, rel_bias)
    from sparse_compile.codegen.attention import forward

    return forward(q, k, v, pattern, scale, bias, dropout_p, seed, softcap=softcap,
                   frame=frame, alibi=alibi, rel_bias=rel_bias, query_layout=True)[0]
