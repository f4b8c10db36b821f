"""Kernel families that may be missing on this GPU or Triton, and the logged way around them.

A newer kernel family (the decoding kernels, the document-bounds kernel) is chosen where it
applies; if its first launch fails to compile or run on this machine (a Triton version without
an operation it uses, say), the call falls back to the general kernels or PyTorch, which compute
the same thing, the failure is logged once with its cause, and the family is not tried again in
this process. A wrong answer is never the fallback: only a failed launch is. Only Triton's own
failures count as one (its error types, or any exception raised from inside Triton, such as its
compiler pipeline's RuntimeError); an error in our launch code is raised as it is, never hidden
behind another family.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import triton
from triton.errors import TritonError

log = logging.getLogger("sparse_compile")

_failed: dict[str, str] = {}
_TRITON = Path(triton.__file__).parent


class FellBack(Exception):  # noqa: N818 - a signal between a family and its caller
    """Raised inside ``fall_back_on_failure`` when the family's launch failed."""


def family_available(name: str) -> bool:
    """Whether the kernel family ``name`` has not failed in this process."""
    return name not in _failed


@contextlib.contextmanager
def fall_back_on_failure(name: str) -> Iterator[None]:
    """Run a family's launch; if Triton fails to compile or run it, log once, disable the
    family and raise ``FellBack`` for the caller to take its general path. Any other
    exception propagates unchanged."""
    try:
        yield
    except Exception as e:
        if not _kernel_failure(e):
            raise
        _failed[name] = f"{type(e).__name__}: {e}"
        log.warning("sparse_compile: the %s kernels failed on this machine (%s); using the "
                    "general kernels from now on", name, _failed[name][:300])
        raise FellBack(name) from e


def _kernel_failure(e: Exception) -> bool:
    """Whether ``e`` is Triton failing to compile or launch a kernel: one of its error types
    (compilation, resources, the interpreter's), a kernel it does not implement, or an
    exception raised from inside the Triton package."""
    if isinstance(e, TritonError | NotImplementedError):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(_TRITON)
