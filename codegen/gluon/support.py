"""Where the Gluon kernels run: Hopper GPUs, a Triton whose Gluon API they are written against,
and no request for the ``tl`` kernels.

Gluon (``triton.experimental.gluon``) is Triton's lower-level language; its API still moves
between releases (bench/NOTES.md lists what moved from 3.6 to 3.9: the TMA load's name, the
byte count of ``mbarrier.expect``). The kernels are written against the releases in
``SUPPORTED_TRITON`` and use one shim per moved call (``tma_load`` here); any other release, a
missing Gluon, a GPU other than sm90, the interpreter (what CI runs) or
``SPARSE_COMPILE_KERNELS=tl`` keeps the ``tl`` kernels, which compute the same thing. By
default they run where they were measured ahead of the ``tl`` kernels (head dim 128:
``GLUON_DEFAULT_HEAD_DIMS``); ``SPARSE_COMPILE_KERNELS=gluon`` also gives them head dims 64
and 256, calls with logit soft-capping or position biases, calls placed at other positions
than the default alignment by one pair of starts, and calls with a key mask or another bias
tensor (``GLUON_EXTENDED_BY_DEFAULT``).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

# Releases whose Gluon API the kernels are written against (major, minor).
SUPPORTED_TRITON: tuple[tuple[int, int], ...] = ((3, 6), (3, 7), (3, 8), (3, 9))
# "tl" forces the portable ``tl`` kernels everywhere; "gluon" asks for the Gluon kernels where
# they apply; unset: ``GLUON_BY_DEFAULT``.
KERNELS_ENV = "SPARSE_COMPILE_KERNELS"
# Whether sm90 runs the Gluon kernels when nothing asks either way, and for which head dims.
# On: at D = 128 the split-consumer kernels (bench/NOTES.md, version 14) ran the forward at
# 639 TFLOP/s and the backward at 475 effective on `causal & sliding(4096)` at 16k (H200;
# the ``tl`` kernels on an H100: 480 and about 347), and inside an 8-layer Mistral-shaped
# model at 32k the attention took 64.1 ms of a training step against FlexAttention's 85.4
# in the same H100 run (the ``tl`` kernels: 80.9 against 85.8 in an earlier H100 run).
# Head dim 64 has not been timed since the split: it runs them only when asked for.
GLUON_BY_DEFAULT = True
GLUON_DEFAULT_HEAD_DIMS: tuple[int, ...] = (128,)
# Whether the kernels take, when nothing asks for them, calls with logit soft-capping, ALiBi
# or relative-bias tables (``score.py``), calls placed by one pair of starts
# (``rows.shifted_rows``) and calls with a key mask or a bias tensor (``key_mask.py``,
# ``bias.py``). Off until those have
# run against the float64 oracle on a GPU (the sm90 compile check and the CPU tests of the
# host side are all they have had); ``SPARSE_COMPILE_KERNELS=gluon`` turns them on, and the
# ``tl`` kernels serve them otherwise.
GLUON_EXTENDED_BY_DEFAULT = False
# Head dims the kernels are written and tested for: the forward's, and the backward's (at 256
# the dK/dV pass runs as two launches, dV and dK: backward_dkdv.py).
GLUON_HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
GLUON_BACKWARD_HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
# Every kernel forks CONSUMERS (two) consumer partitions of CONSUMER_WARPS warps (one
# warpgroup, the unit of ``warpgroup_mma``) and a producer warp; the second consumer (a worker
# partition) gets CONSUMER_REGS registers per thread, the first (the default partition) what
# the producer and it leave (setmaxnreg).
CONSUMERS = tl.constexpr(2)
CONSUMER_WARPS = 4
CONSUMER_REGS = tl.constexpr(240)

try:  # pragma: no cover - depends on the installed triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA tile load: ``async_load`` from 3.7 on, ``async_copy_global_to_shared`` in 3.6
    # (3.9 keeps the old name only to raise an error pointing to the new one).
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # a barrier among the threads of the calling partition: thread_barrier in 3.6, barrier
    # from 3.9 on
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    GLUON_IMPORTED = True
except ImportError:  # pragma: no cover
    gluon = gl = mbarrier = tma = tma_load = thread_barrier = TensorDescriptor = None
    warpgroup_mma = warpgroup_mma_wait = fence_async_shared = None
    GLUON_IMPORTED = False


def gluon_jit(fn):
    """``gluon.jit(fn)`` where Gluon imported; ``fn`` unchanged otherwise, so that the kernel
    modules import on any Triton (they are then never launched: ``gluon_capable``)."""
    return fn if gluon is None else gluon.jit(fn)


@gluon_jit
def tma_load_halves(desc, row, col, HALF: gl.constexpr, bar, smem):
    """Two TMA tiles of ``HALF`` rows from ``(row, col)`` into ``smem.index(0)`` and
    ``.index(1)``, one per consumer warpgroup, completing ``bar`` (the caller expects twice
    the descriptor's bytes)."""
    for w in gl.static_range(2):
        tma_load(desc, [row + w * HALF, col], bar, smem.index(w))


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def gluon_version_supported(version: tuple[int, int] | None = None) -> bool:
    """Whether the Gluon kernels are written against this Triton release (default: the
    installed one) and Gluon's Hopper modules imported."""
    return GLUON_IMPORTED and (version or triton_version()) in SUPPORTED_TRITON


def requested_kernels() -> str:
    """``"tl"``, ``"gluon"`` or ``""`` (no request) from ``SPARSE_COMPILE_KERNELS``; any other
    value is an error naming the accepted ones."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower()
    if value not in ("", "tl", "gluon"):
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected 'tl', 'gluon' or unset")
    return value


def gluon_wanted() -> bool:
    """Whether the Gluon kernels are asked for (``SPARSE_COMPILE_KERNELS=gluon``) or on by
    default (``GLUON_BY_DEFAULT``) and not forced off."""
    request = requested_kernels()
    return request == "gluon" or (request == "" and GLUON_BY_DEFAULT)


@lru_cache(maxsize=16)
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def gluon_capable(device: torch.device) -> bool:
    """Whether ``device`` can run the Gluon kernels: a CUDA sm90 GPU, a supported Triton, not
    the interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return gluon_version_supported() and _is_sm90(device)


def gluon_head_dims(backward: bool = False) -> tuple[int, ...]:
    """Head dims the Gluon forward (``backward``: backward) kernels take now: all they serve
    when asked for (``SPARSE_COMPILE_KERNELS=gluon``), the measured ones by default."""
    if requested_kernels() != "gluon":
        return GLUON_DEFAULT_HEAD_DIMS
    return GLUON_BACKWARD_HEAD_DIMS if backward else GLUON_HEAD_DIMS


def gluon_extended() -> bool:
    """Whether the Gluon kernels take the calls they have not yet run on a GPU (logit
    modifications, shifted positions, key masks and bias tensors): asked for
    (``SPARSE_COMPILE_KERNELS=gluon``) or on by default (``GLUON_EXTENDED_BY_DEFAULT``)."""
    return requested_kernels() == "gluon" or (requested_kernels() == ""
                                              and GLUON_EXTENDED_BY_DEFAULT)


def gluon_device(device: torch.device) -> bool:
    """Whether ``device`` runs the Gluon kernels: capable (``gluon_capable``) and the kernels
    wanted (``gluon_wanted``). Asked on every launch: the capability query is cached."""
    return gluon_wanted() and gluon_capable(device)
