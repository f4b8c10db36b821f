"""Compile an attention call's kernels in the background, before the call.

A model's first call under ``torch.compile`` spends seconds compiling: Inductor compiles the
forward graph, runs it, then compiles the backward graph (lazily, at the first backward) and
runs that. Our kernels would compile inside those runs, one after the other, at their first
launch. Yet their shapes, strides, dtypes and pattern are known as soon as the graph is traced:
the op's fake implementation sees the forward's operands, its autograd ``setup_context`` sees
that a backward will follow. ``precompile`` then hands the kernels the call will launch to a
small thread pool, which compiles them (Triton's compiler and ptxas release the interpreter
lock for most of their work) while Inductor compiles the rest of the model; the launches later
find them compiled.

What is compiled is exactly what the launch will ask for: the real launchers run inside
``compile_only()`` (``codegen/launch/compile_only.py``) on ``meta`` tensors with the
operands' shapes and strides, so every argument that Triton specialises on is the same. It
covers the Gluon route of plain calls (no bias, dropout, soft-capping, position bias; default
positions, or packed documents of one batch row, which transformers' FlexAttention path hands
every compiled model), the one a model's sliding-window or causal attention takes on sm90;
other calls compile at their launch, as before. A failure here is logged at debug level and changes
nothing: the launch compiles what is missing. ``SPARSE_COMPILE_PRECOMPILE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from sparse_compile.codegen.launch.compile_only import compile_only

log = logging.getLogger("sparse_compile")

PRECOMPILE_ENV = "SPARSE_COMPILE_PRECOMPILE"
_pool: ThreadPoolExecutor | None = None  # the jobs: one per call and direction
_compilers: ThreadPoolExecutor | None = None  # their kernels' compilations, side by side
_lock = threading.Lock()
_seen: set[tuple] = set()
_pending: dict[str, list[Future]] = {"forward": [], "backward": []}


def precompile_enabled() -> bool:
    """Whether background compilation is on (``SPARSE_COMPILE_PRECOMPILE`` unset or not 0)."""
    return os.environ.get(PRECOMPILE_ENV, "1").strip() != "0"


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(x, int) for x in (*t.shape, *t.stride()))


def precompile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str,
               scale: float, backward: bool, documents: bool = False) -> list[Future]:
    """Start compiling the forward kernels (with ``backward``, the backward's instead) of a
    plain call on operands like q, k, v, which may be fake tensors of a graph being traced
    (``documents``: a call on packed documents, the Gluon kernels' other route); returns the
    jobs started (none when off, already started for these operands, off the GPU, or with
    symbolic shapes). Never raises for the call's sake: it only saves time."""
    if not precompile_enabled() or q.device.type != "cuda":
        return []
    try:
        if not all(_static(t) for t in (q, k, v)):
            return []
        described = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v))
    except Exception:  # noqa: BLE001 - a tensor subclass without plain sizes: nothing to do
        return []
    kind = "backward" if backward else "forward"
    key = (described, q.device, pattern_text, kind, documents)
    with _lock:
        if key in _seen:
            return []
        _seen.add(key)
        _start_pools()
        future = _pool.submit(_compile, described, q.device, pattern_text, scale, backward,
                              documents)
        _pending[kind].append(future)
    return [future]


def finish(kind: str) -> None:
    """Wait for the started compilations of ``kind`` ("forward" or "backward"; the backward
    waits for both) so that a launch does not compile a kernel a second time beside them."""
    kinds = ("forward", "backward") if kind == "backward" else ("forward",)
    if not any(_pending[k] for k in kinds):
        return
    with _lock:
        futures = [f for k in kinds for f in _pending[k]]
        for k in kinds:
            _pending[k].clear()
    for future in futures:
        future.exception()  # waits; failures were logged by the job


def forget() -> None:
    """Forget which calls were precompiled (after the compiled kernels were dropped)."""
    with _lock:
        _seen.clear()


def _side_by_side() -> contextlib.AbstractContextManager:
    """Triton's asynchronous compile mode on the compiler pool where this Triton has it: the
    job's kernels then compile side by side (leaving the block waits for all of them)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older or newer layout: one after the other
        return contextlib.nullcontext()
    with _lock:
        _start_pools()
    return AsyncCompileMode(_compilers)


def _start_pools() -> None:
    """Make the thread pools on first use; call with ``_lock`` held."""
    global _pool, _compilers
    if _pool is None:
        _pool = ThreadPoolExecutor(2, thread_name_prefix="sparse_compile-precompile")
        _compilers = ThreadPoolExecutor(4, thread_name_prefix="sparse_compile-compile")


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: its copies of the pools would never
    run a job, the parent's jobs never finish there, and the lock may have been held by one of
    those threads. Start from nothing (the kernels compiled so far stay compiled)."""
    global _lock, _pool, _compilers
    _lock = threading.Lock()
    _pool = _compilers = None
    for kind in _pending:
        _pending[kind].clear()
    _seen.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _compile(described: tuple, device: torch.device, pattern_text: str, scale: float,
             backward: bool, documents: bool = False) -> int:
    """The job: the launchers on meta stand-ins inside ``compile_only()``; returns how many
    kernels it asked for (0 when the call takes another route)."""
    from sparse_compile.codegen.attention import plain_gluon_rows
    from sparse_compile.codegen.gluon.backward import launch_gluon_backward
    from sparse_compile.codegen.gluon.forward import launch_gluon_forward

    from sparse_compile.heads_layout import empty_output

    start = time.perf_counter()
    try:
        q, k, v = (torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                   for shape, stride, dtype in described)
        rows = plain_gluon_rows(q, k, v, pattern_text, device, torch.device("cpu"), documents)
        if rows is None:
            return 0
        with torch.cuda.device(device), compile_only(), _side_by_side():
            if not backward:
                launched = launch_gluon_forward(q, k, v, rows, scale, query_layout=True)
                return 0 if launched is None else 1
            b, hq, lq, d = q.shape
            out = empty_output(q, (b, hq, lq, d), q.dtype, True)
            lse = torch.empty((b, hq, lq), dtype=torch.float32, device="meta")
            # The gradient of the output usually arrives in the output's layout.
            grads = launch_gluon_backward(out, q, k, v, out, lse, rows, scale)
            return 0 if grads is None else 3
    except Exception as error:  # noqa: BLE001 - the launch will compile what is missing
        log.debug("precompiling %s kernels of %r failed: %r", "backward" if backward else
                  "forward", pattern_text, error)
        return 0
    finally:
        log.debug("precompile job (%s) of %r done in %.2f s", "backward" if backward else
                  "forward", pattern_text, time.perf_counter() - start)
