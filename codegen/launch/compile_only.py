"""Launch a kernel, or, inside ``compile_only()``, only compile it.

The launchers of the kernels the background precompilation covers (``codegen/precompile.py``)
start their kernels through ``launch``. Inside ``compile_only()`` (a context variable: per
thread) it calls ``kernel.warmup`` with the same arguments, which compiles the kernel for
exactly the specialisation the real launch will ask for (Triton keys a binary by the
arguments' dtypes, 16-byte alignment and the integers' divisibility, all read from the same
values) and runs nothing: the launcher can then be driven with ``meta`` tensors of the real
shapes and strides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_COMPILE_ONLY: ContextVar[bool] = ContextVar("sparse_compile_compile_only", default=False)


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Within the block, ``launch`` compiles its kernel and runs nothing."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


def compiling_only() -> bool:
    """Whether launches in this thread only compile (``compile_only``)."""
    return _COMPILE_ONLY.get()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compile_only()`` its compilation alone."""
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
