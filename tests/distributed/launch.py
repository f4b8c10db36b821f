"""Running a function on several CPU processes joined by a gloo process group.

``spawn(fn, world, *args)`` starts ``world`` processes, each calling ``fn(rank, world, *args)``
inside an initialised default group, and raises in the caller with the child's traceback if
any of them fails. The children run the Triton kernels under the interpreter, as the rest of
the suite does without a GPU (tests/conftest.py), and one thread each (the machine is small).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # Every rank done before any tears its connections down (a rank leaving early can
        # abort another's gloo threads mid-exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; ``fn`` must be importable
    (a module-level function)."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
