"""Compile kernels in helper processes, away from the interpreter lock of the model's process.

Background precompilation (``codegen/precompile.py``) runs while ``torch.compile`` traces and
compiles the model on the main thread, which holds the interpreter lock most of that time.
Triton's compiler needs the lock for much of its work (the Gluon front end and the MLIR passes
it drives), so kernels compiled on threads of that process crawl: on two cores, a forward
and a backward job that took 5.3 s alone took 17-18 s beside a busy main thread, which lost
only 6% of its own pace. Compiled in processes of their own, they take as long as they would
alone, on other cores.

A helper is ``python -m sparse_compile.codegen.launch.compile_processes``: it reads requests
from its stdin and answers on its stdout (each a length-prefixed pickle), compiles for the
target each request names through ``target_driver.TargetDriver`` (so it never creates a CUDA
context: no GPU memory, no start-up time) and writes the binaries to Triton's cache directory,
which the request names too. There the model's process finds them at the first launch: Triton
keys its cache by the kernel's source, the specialisation of its arguments, the target and the
compile options, all the same in both processes, and loads a cached binary instead of
compiling. Nothing here is needed for correctness: a helper that fails or dies leaves the
launch to compile as before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

log = logging.getLogger("sparse_compile")

_HEADER = struct.Struct(">Q")
# How long a request may wait for a free helper before the job gives up (the launch compiles).
_WAIT_FOR_HELPER_S = 600.0


def write_message(stream: BinaryIO, message: Any) -> None:
    """One length-prefixed pickle on ``stream``."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_message(stream: BinaryIO) -> Any:
    """The next message written by ``write_message``; raises EOFError when the stream ends."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other end closed the stream")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended inside a message")
    return pickle.loads(data)


class CompileProcesses:
    """``count`` helper processes, started at once (they import torch and Triton side by side)
    and kept for the life of the process; ``run`` hands a request to a free one and returns
    its answer."""

    def __init__(self, count: int) -> None:
        if not sys.executable:
            raise OSError("no Python executable to start compile helpers with")
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""  # a helper compiles only: it must not touch a GPU
        # the modules this process imports, found where it found them (a checkout put on
        # sys.path by a script, say): the kernels' source is part of their cache keys
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._idle: queue.Queue[subprocess.Popen] = queue.Queue()
        self._alive = count
        self._lock = threading.Lock()
        for _ in range(count):
            self._idle.put(subprocess.Popen(
                [sys.executable, "-m", "sparse_compile.codegen.launch.compile_processes"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, start_new_session=True))
        atexit.register(self.close)

    def close(self) -> None:
        """Let the idle helpers go (each exits when its stdin closes)."""
        while True:
            try:
                helper = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(OSError):
                helper.stdin.close()

    @property
    def alive(self) -> int:
        """How many helpers have not died."""
        return self._alive

    def run(self, request: dict[str, Any]) -> Any:
        """The answer of a free helper to ``request``; raises RuntimeError when the helper
        fails or dies (a dead one is not used again) or none is left."""
        if self._alive == 0:
            raise RuntimeError("no compile helper is left")
        try:
            helper = self._idle.get(timeout=_WAIT_FOR_HELPER_S)
        except queue.Empty as error:
            raise RuntimeError("no compile helper became free") from error
        try:
            write_message(helper.stdin, request)
            ok, answer = read_message(helper.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as error:
            with self._lock:
                self._alive -= 1
            helper.kill()
            raise RuntimeError(f"a compile helper died: {error!r}") from error
        self._idle.put(helper)
        if not ok:
            raise RuntimeError(f"the compile helper failed: {answer}")
        return answer

    def forget_in_child(self) -> None:
        """In a forked child: the helpers and their pipes are the parent's; drop them."""
        self._alive = 0
        self._idle = queue.Queue()


def _serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The helper's loop: each request is ``precompile.compile_in_helper``'s keyword
    arguments; the answer ``(True, result)`` or ``(False, error text)``."""
    from sparse_compile.codegen import precompile

    while True:
        try:
            request = read_message(requests)
        except EOFError:
            return
        try:
            answer = (True, precompile.compile_in_helper(**request))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which logs it
            answer = (False, repr(error)[:2000])
        write_message(answers, answer)


def main() -> None:
    """Run as a helper: answers go to the stdout the parent reads; anything else printed
    goes to stderr."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
