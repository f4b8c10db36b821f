"""Whether code runs under a tracer rather than on real tensors.

``torch.compiler.is_compiling()`` alone is not enough: it is true while Dynamo traces, but not
on every torch version while a backend traces the captured graph again (AOTAutograd's
``make_fx`` over fake tensors), where a host read such as ``bool(t)`` cannot be answered and
fails the whole compilation. Checks that read a tensor on the host ask this instead and, under
a tracer, assert on the device.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def is_tracing(*tensors: torch.Tensor | None) -> bool:
    """True under Dynamo, under a dispatch mode (make_fx, fake tensors), or when a tensor is a
    subclass (fake or functional) rather than a plain ``torch.Tensor``."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) is not torch.Tensor for t in tensors)
