"""Key masks in the Hopper Gluon kernels: a boolean ``[B or 1, 1, 1, Lk]`` bias, which keeps a
key for every query row of its batch row or for none.

That is what the backend hands the op for a model's padding mask (``attention_mask`` from a
tokenizer, folded: sparse_compile/fx/placed.py), so every batched call with padding, and every
call given an all-ones ``attention_mask``, carries one. The general ``tl`` kernels read it as
an Lq x Lk bias; here it is one vector of ``BN`` flags per key tile: the forward and the dQ
pass drop the masked keys' scores (resp. P) in every visited block, FULL ones included, and
the dK/dV pass, whose program owns its keys, writes zero dK and dV rows for masked keys (a
key's row of Pᵀ and dSᵀ reaches no other key's gradient, so masking once at the end is exact).
A row whose every key is masked gets zero output and +inf log-sum-exp, as an empty row does.
"""

from __future__ import annotations

import torch
from sparse_compile.codegen.gluon.support import gl, gluon_jit


def is_key_mask(bias: torch.Tensor | None, lk: int) -> bool:
    """Whether ``bias`` (as the op takes it: broadcastable to ``[B, H, Lq, Lk]``) is a key
    mask these kernels read: boolean, broadcast over heads and query rows, ``lk`` keys."""
    if bias is None or bias.dtype != torch.bool or not 1 <= bias.dim() <= 4:
        return False
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    return shape[1] == 1 and shape[2] == 1 and shape[3] == lk


def key_mask_args(bias: torch.Tensor | None, like: torch.Tensor) -> tuple[tuple, dict]:
    """Kernel arguments ``(KeyMask, km_sb, km_sk)`` (uint8 flags, batch and key strides; 0
    along a broadcast batch) and the constexpr ``{KEY_MASK}`` of a key mask or None."""
    if bias is None:
        return (like, 0, 0), {"KEY_MASK": False}
    flags = bias.view(torch.uint8) if bias.dtype == torch.bool else bias
    batch_stride = 0 if flags.shape[0] == 1 else flags.stride(0)
    return (flags, batch_stride, flags.stride(3)), {"KEY_MASK": True}


@gluon_jit
def keys_kept(KeyMask, b, keys, Lk, km_sb, km_sk):
    """Which of ``keys`` (any layout) batch row ``b`` keeps; keys past ``Lk`` are not kept."""
    flags = gl.load(KeyMask + b.to(gl.int64) * km_sb + keys.to(gl.int64) * km_sk,
                    mask=keys < Lk, other=0)
    return flags != 0
