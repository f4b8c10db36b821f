"""Make a kernel's Triton cache key independent of the order kernels compile in.

Triton keys a compiled kernel (in memory and in its cache directory) by, among other things,
the hash of its source and of every ``@jit`` function it calls, including the constexpr
globals they read. Before Triton 3.9 a caller merged each callee's globals *before* working
out the callee's own key, so a callee whose key was not worked out yet added none: the
caller's key then depended on which kernels had compiled earlier in the process. Two
processes compiling the same kernel, one after another kernel sharing its helpers and one
without, got different keys, and the binary one compiled for the other was never found
(seen with the compile helpers of ``compile_processes.py``: the dQ pass's key differed by a
constexpr of ``gluon/visit.py`` that the forward had registered first).

``settle_cache_key(kernel)`` works the keys out callees first, so every function's globals
are complete before a caller merges them, whatever ran before; ``launch`` calls it once per
kernel. On a Triton that already orders it so, it only computes what would be computed anyway.
"""

from __future__ import annotations

import ast
import threading
import types
from typing import Any

_settled: set[int] = set()
_lock = threading.RLock()  # one thread settles at a time: a half-settled tree is not settled


def _is_jit_function(value: Any) -> bool:
    """Whether ``value`` is a ``@triton.jit`` / ``@gluon.jit`` function (by type: asking for
    its ``cache_key`` attribute would work the key out, in whatever order it is asked)."""
    from triton.runtime import jit

    return isinstance(value, getattr(jit, "JITCallable", jit.JITFunction))


def _callees(fn: Any) -> list[Any]:
    """The ``@jit`` functions ``fn``'s source names: globals of its module, or attributes of
    a module it names (``helpers.fn``)."""
    scope = fn.fn.__globals__
    found = []
    for node in ast.walk(fn.parse()):
        value = None
        if isinstance(node, ast.Name):
            value = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = scope.get(node.value.id)
            if isinstance(owner, types.ModuleType):
                value = getattr(owner, node.attr, None)
        if _is_jit_function(value) and value is not fn and value not in found:
            found.append(value)
    return found


def settle_cache_key(kernel: Any) -> None:
    """Work out the cache keys of ``kernel`` and of the ``@jit`` functions it calls, callees
    first (once per function in this process; nothing for objects that are not ``@jit``
    functions, and nothing is raised: it only steers which binary the cache finds)."""
    if id(kernel) in _settled:  # every launch asks: one set lookup once settled
        return
    if not _is_jit_function(kernel):  # the interpreter's functions, stand-ins in tests
        _settled.add(id(kernel))
        return
    with _lock:
        if id(kernel) in _settled:
            return
        try:
            for callee in _callees(kernel):
                settle_cache_key(callee)
            kernel.cache_key  # noqa: B018 - computed for its side effect: the key is cached
        except Exception:  # noqa: BLE001 - an unusual function: Triton works its key out later
            pass
        _settled.add(id(kernel))
