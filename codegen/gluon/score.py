"""Logit modifications inside the Hopper Gluon kernels: soft-capping, ALiBi and relative-bias
tables, computed from (head, query row, key) on every score tile, never materialised.

The ``tl`` kernels' semantics (codegen/tl/forward.py, codegen/tl/visit.py), in the same order:
the scaled logit ``x = scale·s`` is first capped to ``softcap·tanh(x / softcap)``, then ALiBi's
``slope[h]·(k_pos − q_pos)`` and the table's ``table[h, clamp(q_pos − k_pos + Lq − 1, 0,
Lq + Lk − 2)]`` are added, then the pattern masks. The Gluon kernels place query row ``i`` at
``i + Lk − Lq`` and key ``j`` at ``j`` (the default alignment); inside packed documents
(``Lq == Lk``) positions count from each document's start, which changes neither term for the
pairs a document keeps (both positions move by the same start). The kernels' scores stay in
log2 units: without modifications ``scale·log2(e)`` is folded into the exponent; with them
``logits`` returns the log2-unit logit itself and the softmax uses it as is. The gradient of
the cap, ``1 − tanh²``, multiplies dS (the pre-cap scale is applied to dQ and dK at the end,
as without a cap); the kernels keep the tanh tile ``logits`` returns for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sparse_compile.codegen.gluon.support import gl, gluon_jit
from sparse_compile.codegen.tl.forward import position_bias_args, softcap_args

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ScoreMods:
    """A call's logit modifications (``softcap`` > 0: capped; ``alibi``: float32 slopes
    ``[Hq]``; ``rel_bias``: a float32 table ``[Hq or 1, Lq + Lk − 1]`` with unit stride along
    the table). The default modifies nothing."""

    softcap: float = 0.0
    alibi: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        """Whether the kernels compute any modification."""
        return self.softcap > 0 or self.alibi is not None or self.rel_bias is not None

    def kernel_args(self, scale: float, like: torch.Tensor) -> tuple[tuple, dict]:
        """Runtime arguments ``(cap_in, cap_out, Slopes, Rel, s_rh)`` and the constexprs
        ``{SOFTCAP, PBIAS}`` (PBIAS: bit 1 ALiBi, bit 2 the table) for a call with scale
        ``scale``; placeholders where a modification is off."""
        (slopes, rel, s_rh), flags = position_bias_args(self.alibi, self.rel_bias, like)
        cap_in, cap_out = softcap_args(scale, self.softcap)
        return (cap_in, cap_out, slopes, rel, s_rh), {"SOFTCAP": self.softcap > 0,
                                                      "PBIAS": flags}


NO_MODS = ScoreMods()


@gluon_jit
def head_terms(Slopes, Rel, s_rh, h, PBIAS: gl.constexpr):
    """Query head ``h``'s ALiBi slope in log2 units (0.0 without ALiBi) and its row of the
    relative-bias table."""
    if (PBIAS & 1) != 0:
        slope = gl.load(Slopes + h) * 1.4426950408889634
    else:
        slope = 0.0
    return slope, Rel + h * s_rh


@gluon_jit
def logits(s, q_pos, k_pos, cap_in, cap_out, qk_scale, slope, rel_row, rel_off, rel_last,
           SOFTCAP: gl.constexpr, PBIAS: gl.constexpr):
    """Log2-unit logits of the raw scores ``s`` (``Q Kᵀ`` tile) at query / key positions
    ``q_pos`` / ``k_pos`` (broadcast to ``s``) and ``tanh`` of the capped logit (``s`` itself
    without a cap: then unused). ``rel_off`` = Lq − 1 (the table's index of difference 0),
    ``rel_last`` = Lq + Lk − 2. tanh goes through exp2, as in the ``tl`` kernels, so that the
    two families round alike and saturate exactly to ±1."""
    if SOFTCAP:
        e = gl.exp2(s * (cap_in * 2.8853900817779268))  # exp(2 x), x = s * cap_in
        t = 1.0 - 2.0 / (e + 1.0)
        x = t * cap_out
    else:
        t = s
        x = s * qk_scale
    if (PBIAS & 1) != 0:  # the exact integer difference first, as the ``tl`` kernels do
        x = x + slope * (k_pos - q_pos).to(gl.float32)
    if (PBIAS & 2) != 0:
        idx = gl.minimum(gl.maximum(q_pos - k_pos + rel_off, 0), rel_last)
        x = x + gl.load(rel_row + idx) * 1.4426950408889634
    return x, t

