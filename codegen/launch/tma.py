"""Hopper TMA (tensor memory accelerator) descriptors for the kernels' inner-loop loads.

A kernel's loop reads whole row tiles of one operand (K and V in the forward and dQ passes, Q and
dO in the dK/dV pass). When the operand's rows are uniformly strided (``[B, H, L, D]`` with
``(b, h, l)`` flattening to one row index: contiguous tensors and their usual views), a 2-D
descriptor over ``[B * H * L, D]`` lets the TMA unit copy each tile into shared memory with no
address arithmetic in the kernel. Used only where it is exact and safe: 16-bit dtypes, a
power-of-two head dim, L a multiple of the tile (a tile never crosses into the next head),
16-byte aligned base and row stride; otherwise the kernels keep their pointer loads.
"""

from __future__ import annotations

from functools import lru_cache

import torch

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side descriptors
    TensorDescriptor = None


@lru_cache(maxsize=64)
def tma_supported(device: torch.device) -> bool:
    """Whether descriptors can be used on ``device`` (Hopper or newer GPU, or the interpreter).
    Cached: asked on every launch, and the capability query costs host time."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return True  # only reached under the interpreter
    return torch.cuda.get_device_capability(device)[0] >= 9


def row_descriptor(t: torch.Tensor, block_rows: int) -> object | None:
    """Descriptor of ``t`` [B, H, L, D] as rows [B*H*L, D] with ``block_rows x D`` tiles, or
    None when its layout does not allow it (see the module docstring)."""
    b, h, length, d = t.shape
    s = t.stride()
    if t.dtype not in (torch.float16, torch.bfloat16) or d < 16 or d & (d - 1) or d > 256:
        return None
    if s[3] != 1 or s[2] < 1 or length % block_rows or t.numel() == 0:
        return None  # (an expanded gradient can have zero strides: not a TMA layout)
    if (h > 1 and s[1] != length * s[2]) or (b > 1 and s[0] != h * length * s[2]):
        return None
    if (s[2] * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, [b * h * length, d], [s[2], 1], [block_rows, d])


def row_descriptors(
    enabled: bool, block_rows: int, *tensors: torch.Tensor
) -> tuple[object, ...] | None:
    """Descriptors of all ``tensors`` or None (all or nothing: one constexpr switches them)."""
    if not enabled or not tma_supported(tensors[0].device):
        return None
    descs = tuple(row_descriptor(t, block_rows) for t in tensors)
    return None if any(x is None for x in descs) else descs
