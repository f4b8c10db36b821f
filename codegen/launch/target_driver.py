"""A Triton driver that compiles for a named GPU target without touching a GPU.

``JITFunction.warmup`` asks the active driver for the current device, stream and target and
compiles for that target; nothing else of the driver is needed to compile. The compile
processes of ``compile_processes.py`` make this stand-in their active driver, so that they
build the kernels for the parent's GPU (its target is sent along with each request) without
creating a CUDA context of their own (no GPU memory, no start-up time); the sm_90 compile
checks in ``tests/codegen`` use it on machines without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch


class TargetDriver:
    """Just enough of Triton's driver interface for ``JITFunction.warmup`` to compile for
    ``target`` (a ``triton.backends.compiler.GPUTarget``)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True

    def get_device_interface(self) -> Any:
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return "void*"


def use_target(backend: str, arch: int | str, warp_size: int) -> None:
    """Make a ``TargetDriver`` for ``GPUTarget(backend, arch, warp_size)`` Triton's active
    driver in this process."""
    import triton
    from triton.backends.compiler import GPUTarget

    triton.runtime.driver.set_active(TargetDriver(GPUTarget(backend, arch, warp_size)))
