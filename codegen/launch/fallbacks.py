"""Kernel families that may be missing on this GPU or Triton, and the logged way around them.

A newer kernel family (the decoding kernels, the document-bounds kernel) is chosen where it
applies; if its first launch fails to compile or run on this machine (a Triton version without
an operation it uses, say), the call falls back to the general kernels or PyTorch, which compute
the same thing, the failure is logged once with its cause, and the family is not tried again in
this process. A wrong answer is never the fallback: only a failed launch is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger("sparse_compile")

_failed: dict[str, str] = {}


class FellBack(Exception):  # noqa: N818 - a signal between a family and its caller
    """Raised inside ``fall_back_on_failure`` when the family's launch failed."""


def family_available(name: str) -> bool:
    """Whether the kernel family ``name`` has not failed in this process."""
    return name not in _failed


@contextlib.contextmanager
def fall_back_on_failure(name: str) -> Iterator[None]:
    """Run a family's launch; on failure, log once, disable the family and raise
    ``FellBack`` for the caller to take its general path."""
    try:
        yield
    except FellBack:
        raise
    except Exception as e:  # noqa: BLE001 - any compile or launch failure of the family
        _failed[name] = f"{type(e).__name__}: {e}"
        log.warning("sparse_compile: the %s kernels failed on this machine (%s); using the "
                    "general kernels from now on", name, _failed[name][:300])
        raise FellBack(name) from e
