"""Bias tensors in the Hopper Gluon kernels: an additive float bias or a boolean mask
broadcastable to ``[B, Hq, Lq, Lk]``, read tile by tile beside the scores.

What reaches the op as a bias is what the backend could not fold into the pattern (a model's
mask it could not prove from positions, a position bias that is not a table). Each kernel
loads the bias entries of the score tile it computes, from any strides (0 along broadcast
dimensions), and adds them in log2 units (additive) or drops the scores they mask (boolean),
before the pattern's mask, as the ``tl`` kernels do. A call that needs the bias's gradient
keeps the ``tl`` kernels (they write it in the dQ pass); a key mask (``[B or 1, 1, 1, Lk]``
boolean) takes the cheaper per-key path of ``key_mask.py``.
"""

from __future__ import annotations

import torch
from sparse_compile.codegen.gluon.support import gl, gluon_jit
from sparse_compile.codegen.tl.forward import bias_args as bias_strides

# BIAS constexpr values
NO_BIAS, ADDITIVE, BOOLEAN = 0, 1, 2


def bias_args(bias: torch.Tensor | None, like: torch.Tensor) -> tuple[tuple, dict]:
    """Kernel arguments ``(Bias, sbb, sbh, sbm, sbn)`` and the constexpr ``{BIAS}`` of a bias
    as the kernels read it (``codegen.attention.kernel_bias``: 4-D, bool viewed as uint8,
    which the public entry leaves as the only integer bias: a keep-mask) or of None; the
    strides are the ``tl`` kernels' (0 along broadcast dimensions)."""
    flat, strides = bias_strides(bias, like)
    kind = NO_BIAS if bias is None else BOOLEAN if bias.dtype == torch.uint8 else ADDITIVE
    return (flat, *strides), {"BIAS": kind}


@gluon_jit
def biased(x, bt, rows, cols, BIAS: gl.constexpr):
    """Log2-unit logits ``x`` with the bias entries at query ``rows`` and key ``cols``
    (broadcast to ``x``: ``[M, 1]`` / ``[1, N]``, or transposed) added (``ADDITIVE``) or
    masked (``BOOLEAN``: dropped to −inf); ``bt`` = (Bias, b, h, Lq, Lk, sbb, sbh, sbm, sbn).
    Entries past Lq or Lk are read as 0 (those rows are never stored, those keys never
    kept). (A 64-bit tile origin with 32-bit offsets spilled more in ptxas, not less.)"""
    if BIAS != 0:
        Bias, b, h, Lq, Lk, sbb, sbh, sbm, sbn = bt
        base = Bias + b.to(gl.int64) * sbb + h.to(gl.int64) * sbh
        ok = (rows < Lq) & (cols < Lk)
        values = gl.load(base + rows.to(gl.int64) * sbm + cols.to(gl.int64) * sbn, mask=ok,
                         other=0)
        if BIAS == 1:
            x = x + values.to(gl.float32) * 1.4426950408889634
        else:
            x = gl.where(values != 0, x, float("-inf"))
    return x
