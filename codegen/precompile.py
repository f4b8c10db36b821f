"""Compile an attention call's kernels in the background, before the call.

A model's first call under ``torch.compile`` spends seconds compiling: Inductor compiles the
forward graph, runs it, then compiles the backward graph (lazily, at the first backward) and
runs that. Our kernels would compile inside those runs, one after the other, at their first
launch. Yet their shapes, strides, dtypes and pattern are known as soon as the graph is traced:
the op's fake implementation sees the forward's operands, the backward op's fake
implementation those of the backward, the gradient's layout included (an eager call's
autograd ``setup_context`` starts the backward's, the gradient taken in the output's layout).
``precompile`` then starts a job per call and direction on a small thread pool; the job
builds the call's rows and has three helper processes compile the kernels
(``codegen/launch/compile_processes.py``) into Triton's cache while Inductor compiles the rest
of the model; a launch waits for its own call's job, if still running, and finds its kernels
there. Compiled on threads of this process instead (``SPARSE_COMPILE_PRECOMPILE=threads``),
the kernels would contend with ``torch.compile``'s main thread for the interpreter lock, which
Triton's compiler holds for much of its work, and barely get ahead of the launch.

What is compiled is exactly what the launch will ask for: the real launchers run inside
``compile_only()`` (``codegen/launch/compile_only.py``) on ``meta`` tensors with the
operands' shapes and strides, so every argument that Triton specialises on is the same. It
covers the Gluon route of plain calls (no bias, dropout, soft-capping, position bias; default
positions, or packed documents of one batch row, which transformers' FlexAttention path hands
every compiled model), the one a model's sliding-window or causal attention takes on sm90;
other calls compile at their launch, as before. A failure here is logged at debug level and
changes nothing: the launch compiles what is missing. ``SPARSE_COMPILE_PRECOMPILE=0`` turns it
off, ``=threads`` keeps it in this process.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from sparse_compile.codegen.launch.compile_only import compile_only
from sparse_compile.codegen.launch.compile_processes import CompileProcesses

from sparse_compile.tracing import is_tracing

log = logging.getLogger("sparse_compile")

PRECOMPILE_ENV = "SPARSE_COMPILE_PRECOMPILE"
_KINDS = ("forward", "backward")
# Jobs, one per call and direction, in a pool per direction (a forward's compilation never
# queues behind backward ones); their kernels compile side by side in a third.
_pools: dict[str, ThreadPoolExecutor] = {}
_compilers: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_seen: set[tuple] = set()
_pending: dict[tuple, Future] = {}  # job key -> its job, while it runs
# The helper processes that compile (None: not started yet, False: could not start); a
# backward job's kernels are split between two of them (the dK/dV pass, the rest), so the
# three a forward and a backward job keep busy compile side by side.
HELPERS = 3
_SPLITS: dict[str, list[tuple[frozenset[str] | None, bool]]] = {
    "forward": [(None, False)],
    "backward": [(frozenset({"_dkdv_kernel"}), False), (frozenset({"_dkdv_kernel"}), True)],
}
_processes: CompileProcesses | bool | None = None
# How long a launch waits for its call's job before compiling for itself (a stuck helper must
# not hang the model).
FINISH_TIMEOUT_S = 300.0
_helper_target: tuple | None = None  # in a helper: the target its driver compiles for
_unmerged = False  # a helper job ended since its binaries were last copied into the cache


def precompile_enabled() -> bool:
    """Whether background compilation is on (``SPARSE_COMPILE_PRECOMPILE`` unset or not 0)."""
    return os.environ.get(PRECOMPILE_ENV, "1").strip() != "0"


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(x, int) for x in (*t.shape, *t.stride()))


def _described(*tensors: torch.Tensor | None) -> tuple | None:
    """(shape, strides, dtype) of each tensor (None stays None), or None when a size is
    symbolic or unreadable."""
    try:
        if not all(t is None or _static(t) for t in tensors):
            return None
        return tuple(None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype)
                     for t in tensors)
    except Exception:  # noqa: BLE001 - a tensor subclass without plain sizes: nothing to do
        return None


def job_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None,
            pattern_text: str, backward: bool, documents: bool) -> tuple | None:
    """What identifies a job: the operands' shapes, strides and dtypes (the gradient's for the
    backward, when known), device, pattern, direction, route; None when not static."""
    described = _described(q, k, v, dout if backward else None)
    if described is None:
        return None
    return (described, q.device, pattern_text, _KINDS[backward], documents)


def _gluon_device(device: torch.device) -> bool:
    """Whether ``device`` runs the Gluon kernels (never raises: a fake ``cuda`` device on a
    machine without one says no)."""
    from sparse_compile.codegen.gluon.support import gluon_device

    try:
        return gluon_device(device)
    except Exception:  # noqa: BLE001
        return False


def precompile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern_text: str,
               scale: float, backward: bool, documents: bool = False,
               dout: torch.Tensor | None = None) -> list[Future]:
    """Start compiling the forward kernels (with ``backward``, the backward's instead, for a
    gradient like ``dout``, by default in the output's layout) of a plain call on operands
    like q, k, v, which may be fake tensors of a graph being traced (``documents``: a call on
    packed documents, the Gluon kernels' other route); returns the jobs started (none when
    off, already started for these operands, not on a GPU the Gluon kernels run on, or with
    symbolic shapes). Never raises for the call's sake: it only saves time."""
    if not precompile_enabled() or q.device.type != "cuda" or not _gluon_device(q.device):
        return []
    key = job_key(q, k, v, dout, pattern_text, backward, documents)
    if key is None:
        return []
    with _lock:
        if key in _seen:
            return []
        try:
            _start_pools()
            # A context of its own per job: Triton's compile mode is a context variable, and a
            # pool thread would otherwise carry one job's state into the next.
            future = _pools[_KINDS[backward]].submit(
                contextvars.Context().run, _compile, key, scale, is_tracing(q, k, v))
        except RuntimeError as error:  # interpreter shutting down, no thread to be had
            log.debug("precompiling %r not started: %r", pattern_text, error)
            return []
        _seen.add(key)
        _pending[key] = future
    # Only running jobs stay pending, so that launches check nothing once all have ended
    # (a job whose call never launches, or launches with other strides, would otherwise stay).
    future.add_done_callback(lambda _, key=key: _pending.pop(key, None))
    return [future]


def finish(key: tuple | None) -> None:
    """Wait for the job of ``key`` (``job_key`` of the call about to launch) if it is still
    running, so that the launch does not compile the same kernels a second time beside it.
    Other jobs are not waited for."""
    if not _pending or key is None:
        return
    with _lock:
        future = _pending.pop(key, None)
    if future is None:
        return
    try:
        future.exception(timeout=FINISH_TIMEOUT_S)  # waits; failures were logged by the job
    except FutureTimeout:  # a helper stuck: the launch compiles for itself rather than hang
        log.warning("sparse_compile: a background compile job of %r took over %.0f s; the "
                    "launch compiles its kernels itself", key[2], FINISH_TIMEOUT_S)


def finish_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None,
                pattern_text: str, backward: bool, documents: bool) -> None:
    """``finish`` for the call about to launch (a backward also waits for a job started with
    the gradient's layout assumed: an eager call's). Free when no job is pending."""
    if _pending:
        finish(job_key(q, k, v, dout, pattern_text, backward, documents))
        if backward and dout is not None:
            finish(job_key(q, k, v, None, pattern_text, backward, documents))
    if _unmerged:
        _merge_helper_binaries()


def forget() -> None:
    """Forget which calls were precompiled (after the compiled kernels were dropped)."""
    with _lock:
        _seen.clear()


def _side_by_side() -> contextlib.AbstractContextManager:
    """Triton's asynchronous compile mode on the compiler pool where this Triton has it: the
    job's kernels then compile side by side (leaving the block waits for all of them; a
    kernel that fails is left to its launch)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older or newer layout: one after the other
        return contextlib.nullcontext()
    with _lock:
        _start_pools()
    return AsyncCompileMode(_compilers, ignore_errors=True)


def _start_pools() -> None:
    """Make the thread pools on first use; call with ``_lock`` held."""
    global _compilers
    if not _pools:
        for kind in _KINDS:
            _pools[kind] = ThreadPoolExecutor(2, thread_name_prefix=f"sparse_compile-{kind}")
        _compilers = ThreadPoolExecutor(4, thread_name_prefix="sparse_compile-compile")


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: its copies of the pools would never
    run a job, the parent's jobs never finish there, and the lock may have been held by one of
    those threads. Start from nothing (the kernels compiled so far stay compiled)."""
    global _lock, _compilers, _processes
    _lock = threading.Lock()
    if isinstance(_processes, CompileProcesses):
        _processes.forget_in_child()
    _processes = None
    _pools.clear()
    _compilers = None
    _pending.clear()
    _seen.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _ptxas_as_inductor_sets_it() -> None:
    """Where ``TRITON_PTXAS_PATH`` is unset, Inductor sets it to torch's own ptxas when it
    compiles its first kernel (a newer one than Triton's: 13.0 against 12.8 on the H100
    image), which changes every kernel's cache key and binary from then on. Our jobs start
    before that, so in a compiled model they set it first, the way Inductor does, and the
    helpers compile with the ptxas the launches will key by."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # a torch without it: nothing to align with
        return
    _set_triton_ptxas_path()


def _compile(key: tuple, scale: float, traced: bool = False) -> int:
    """The job: the call's rows, then its kernels compiled by the helper processes (by this
    process's threads where they are off or could not start); returns how many kernel
    launches it compiled for (0 when the call takes another route or anything failed).
    ``traced``: the call is one of a graph torch.compile traces (``_ptxas_as_inductor_sets_it``)."""
    described, device, pattern_text, kind, documents = key
    start = time.perf_counter()
    try:
        from sparse_compile.codegen.attention import plain_gluon_rows

        stand_ins = _meta(described)
        rows = plain_gluon_rows(*stand_ins[:3], pattern_text, device, torch.device("cpu"),
                                documents, backward=kind == "backward")
        if rows is None:
            return 0
        if traced:
            _ptxas_as_inductor_sets_it()
        helpers = _helpers()
        if helpers is None:
            with torch.cuda.device(device), compile_only(), _side_by_side():
                return compile_kernels(kind, described, rows, scale)
        request = dict(target=_target(device), env=_triton_environment(), kind=kind,
                       described=described, rows=rows, scale=scale)
        parts = [_compilers.submit(helpers.run, dict(request, names=names, skip=skip))
                 for names, skip in _SPLITS[kind]]
        wait(parts)
        global _unmerged
        _unmerged = True  # the next launch copies the binaries into this process's cache
        return max(part.result() for part in parts)
    except Exception as error:  # noqa: BLE001 - the launch will compile what is missing
        log.debug("precompiling the %s kernels of %r failed: %r", kind, pattern_text, error)
        return 0
    finally:
        log.debug("precompile job (%s) of %r done in %.2f s", kind, pattern_text,
                  time.perf_counter() - start)


def _meta(described: tuple) -> list[torch.Tensor | None]:
    """``meta`` stand-ins of q, k, v and the gradient with the described shapes and strides."""
    return [None if d is None else torch.empty_strided(d[0], d[1], dtype=d[2], device="meta")
            for d in described]


def compile_kernels(kind: str, described: tuple, rows: Any, scale: float) -> int:
    """Drive the Gluon launchers of a ``kind`` ("forward" or "backward") call on ``meta``
    stand-ins of the described operands with ``rows``; inside ``compile_only()`` this compiles
    what the call's launches will ask for. Returns how many kernel launches it went through
    (0 when the launcher declined the operands)."""
    from sparse_compile.codegen.gluon.backward import gradient_launches, launch_gluon_backward
    from sparse_compile.codegen.gluon.forward import launch_gluon_forward

    from sparse_compile.heads_layout import empty_output

    q, k, v, dout = _meta(described)
    if kind == "forward":
        return 0 if launch_gluon_forward(q, k, v, rows, scale, query_layout=True) is None else 1
    b, hq, lq, d = q.shape
    out = empty_output(q, (b, hq, lq, d), q.dtype, True)  # the op's output layout
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device="meta")
    grads = launch_gluon_backward(out if dout is None else dout, q, k, v, out, lse, rows, scale)
    # the dQ pass (Δ included) and the dK/dV pass's launches
    return 0 if grads is None else 1 + len(gradient_launches(d))


def compile_in_helper(target: tuple, env: dict[str, str], kind: str, described: tuple,
                      rows: Any, scale: float, names: frozenset[str] | None,
                      skip: bool) -> int:
    """In a helper process (``compile_processes``): compile for ``target`` (backend, arch,
    warp size), with the model's process's Triton settings ``env``, into the helper's own
    cache directory the kernels of a ``kind`` call that ``names`` selects (all but those with
    ``skip``), side by side."""
    from sparse_compile.codegen.launch.target_driver import use_target

    global _helper_target
    if target != _helper_target:
        use_target(*target)
        _helper_target = target
    for name in set(_triton_environment()) - set(env):  # unset there since the last request
        del os.environ[name]
    os.environ.update(env)
    with compile_only(names, skip), _side_by_side():
        return compile_kernels(kind, described, rows, scale)


def _triton_environment() -> dict[str, str]:
    """This process's ``TRITON_*`` settings now (some change the compile options, so the
    cache keys; Inductor sets some late), for the helpers; the cache directory is theirs."""
    return {name: value for name, value in os.environ.items()
            if name.startswith("TRITON_") and name != "TRITON_CACHE_DIR"}


def _merge_helper_binaries() -> None:
    """Copy what the helpers compiled into this process's Triton cache directory as it is
    now, where the launch about to happen looks."""
    global _unmerged
    helpers = _processes
    _unmerged = False
    cache_dir = _cache_dir()
    if isinstance(helpers, CompileProcesses):
        try:
            helpers.merge_into(cache_dir)
        except OSError as error:  # an unwritable cache: the launch compiles
            log.debug("copying the compile helpers' binaries failed: %r", error)


def _target(device: torch.device) -> tuple:
    """(backend, arch, warp size) of the Triton target ``device`` compiles for."""
    import triton

    with torch.cuda.device(device):
        target = triton.runtime.driver.active.get_current_target()
    return target.backend, target.arch, target.warp_size


def _cache_dir() -> str:
    """This process's Triton cache directory now (where the launches look)."""
    from triton import knobs

    return knobs.cache.dir


def _helpers() -> CompileProcesses | None:
    """The helper processes (started on first use), or None where precompilation runs on
    threads (``SPARSE_COMPILE_PRECOMPILE=threads``) or the helpers could not start or have all
    died."""
    global _processes
    if os.environ.get(PRECOMPILE_ENV, "").strip() == "threads":
        return None
    with _lock:
        _start_pools()  # a job's parts go to the helpers from the compiler pool's threads
        if _processes is None:
            try:
                _processes = CompileProcesses(HELPERS)
            except OSError as error:
                log.debug("compile helpers not started (%r): compiling on threads", error)
                _processes = False
        if _processes is False or _processes.alive <= 0:
            return None
        return _processes
