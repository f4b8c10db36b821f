"""Launch a kernel, or, inside ``compile_only()``, only compile it.

The launchers of the kernels the background precompilation covers (``codegen/precompile.py``)
start their kernels through ``launch``. Inside ``compile_only()`` (a context variable: per
thread) it calls ``kernel.warmup`` with the same arguments, which compiles the kernel for
exactly the specialisation the real launch will ask for (Triton keys a binary by the
arguments' dtypes, 16-byte alignment and the integers' divisibility, all read from the same
values) and runs nothing: the launcher can then be driven with ``meta`` tensors of the real
shapes and strides. A selection of kernels (by name) lets one job's kernels be compiled by
several processes (``codegen/launch/compile_processes.py``); launches of the others then do
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from sparse_compile.codegen.launch.cache_keys import settle_cache_key

_COMPILE_ONLY: ContextVar[bool] = ContextVar("sparse_compile_compile_only", default=False)
# (kernel names, whether they are the ones to skip) or None: every kernel
_SELECTION: ContextVar[tuple[frozenset[str], bool] | None] = ContextVar(
    "sparse_compile_compile_selection", default=None)


@contextlib.contextmanager
def compile_only(names: frozenset[str] | None = None, skip: bool = False) -> Iterator[None]:
    """Within the block, ``launch`` compiles its kernel and runs nothing; with ``names``, only
    the kernels so named (with ``skip``: all but those) compile, the others are left alone."""
    token = _COMPILE_ONLY.set(True)
    chosen = _SELECTION.set(None if names is None else (frozenset(names), skip))
    try:
        yield
    finally:
        _SELECTION.reset(chosen)
        _COMPILE_ONLY.reset(token)


def kernel_name(kernel: Any) -> str:
    """The name of a ``@triton.jit`` / ``@gluon.jit`` kernel's function."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def compiling_only() -> bool:
    """Whether launches in this thread only compile (``compile_only``)."""
    return _COMPILE_ONLY.get()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compile_only()`` its compilation alone;
    either way with the kernel's cache key settled first (``cache_keys.py``: the same in every
    process, so that a binary the compile helpers made is found)."""
    settle_cache_key(kernel)
    if _COMPILE_ONLY.get():
        selection = _SELECTION.get()
        if selection is not None and (kernel_name(kernel) in selection[0]) == selection[1]:
            return
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
