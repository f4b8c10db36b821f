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
context: no GPU memory, no start-up time), with the model's process's ``TRITON_*`` settings
of the moment, into a cache directory of its own. The launch about to use the kernels first
copies what the helpers compiled into its process's Triton cache directory as it is then
(``merge_into``; Inductor points Triton at a directory of its own when it loads its first
kernel, after our jobs started), where Triton finds each binary by its key: the kernel's
source, the specialisation of its arguments, the target and the compile options, all the same
in both processes (``cache_keys.py``). A request gets ``HELPER_TIMEOUT_S`` to be answered;
a helper that fails it, or dies, is killed and not used again, and at exit every helper is
ended before the interpreter waits for the threads that may be waiting on one. Nothing here
is needed for correctness: whatever fails leaves the launch to compile as before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import queue
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

log = logging.getLogger("sparse_compile")

_HEADER = struct.Struct(">Q")
# How long a request may wait for a free helper, and for its answer, before the job gives up
# (the launch then compiles; its own wait, ``precompile.FINISH_TIMEOUT_S``, is longer).
HELPER_TIMEOUT_S = 240.0


def write_message(stream: BinaryIO, message: Any) -> None:
    """One length-prefixed pickle on ``stream``."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_frame(read_exactly: Callable[[int], bytes]) -> Any:
    """One ``write_message`` message, its bytes taken from ``read_exactly(n)`` (exactly n
    bytes, or EOFError)."""
    size = _HEADER.unpack(read_exactly(_HEADER.size))[0]
    return pickle.loads(read_exactly(size))


def read_message(stream: BinaryIO) -> Any:
    """The next message written by ``write_message``; raises EOFError when the stream ends."""

    def read_exactly(size: int) -> bytes:
        data = stream.read(size)
        if len(data) < size:
            raise EOFError("the stream ended inside a message" if data else
                           "the other end closed the stream")
        return data

    return _read_frame(read_exactly)


def _read_answer(fd: int, deadline: float) -> Any:
    """The helper's next answer on the pipe ``fd`` by ``deadline`` (``time.monotonic``);
    TimeoutError past it, EOFError when the pipe closes first."""

    def read_exactly(size: int) -> bytes:
        chunks, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no answer within {HELPER_TIMEOUT_S:.0f} s")
            chunk = os.read(fd, left)
            if not chunk:
                raise EOFError("the helper closed its answers")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return _read_frame(read_exactly)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class CompileProcesses:
    """``count`` helper processes, started at once (they import torch and Triton side by side)
    and kept for the life of the process, each compiling into a cache directory of its own
    (``cache_dirs``: what it compiled is copied into this process's Triton cache by
    ``merge_into``, whatever directory that is by then: Inductor moves it to its own when it
    loads its first kernel); ``run`` hands a request to a free one and returns its answer."""

    def __init__(self, count: int) -> None:
        if not sys.executable:
            raise OSError("no Python executable to start compile helpers with")
        self._idle: queue.Queue[subprocess.Popen] = queue.Queue()
        self._helpers: list[subprocess.Popen] = []
        self._alive = 0
        self._lock = threading.Lock()
        self._merged: set[tuple[str, str]] = set()
        self.cache_dirs = [tempfile.mkdtemp(prefix="sparse_compile-helper-") for _ in range(count)]
        try:
            for cache_dir in self.cache_dirs:
                self._start(cache_dir)
        except BaseException:
            self.close()
            raise
        # before interpreter exit joins the thread pools whose threads may wait on a helper
        register = getattr(threading, "_register_atexit", atexit.register)
        register(self.close)

    def _start(self, cache_dir: str) -> None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""  # a helper compiles only: it must not touch a GPU
        env["TRITON_CACHE_DIR"] = cache_dir
        # the modules this process imports, found where it found them (a checkout put on
        # sys.path by a script, say): the kernels' source is part of their cache keys
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        helper = subprocess.Popen(
            [sys.executable, "-m", "sparse_compile.codegen.launch.compile_processes"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, bufsize=0)
        self._helpers.append(helper)
        self._alive += 1
        self._idle.put(helper)

    @property
    def alive(self) -> int:
        """How many helpers have not died."""
        return self._alive

    def run(self, request: dict[str, Any]) -> Any:
        """The answer of a free helper to ``request`` (within ``HELPER_TIMEOUT_S`` of asking);
        raises RuntimeError when the helper fails, dies or stays silent (it is then killed and
        not used again) or none is left."""
        deadline = time.monotonic() + HELPER_TIMEOUT_S
        helper = None
        while helper is None:
            if self._alive <= 0:
                raise RuntimeError("no compile helper is left")
            if time.monotonic() > deadline:
                raise RuntimeError("no compile helper became free")
            with contextlib.suppress(queue.Empty):
                helper = self._idle.get(timeout=1.0)
        try:
            write_message(helper.stdin, request)
            ok, answer = _read_answer(helper.stdout.fileno(), deadline)
        except BaseException as error:
            self._drop(helper)
            raise RuntimeError(f"a compile helper was lost: {error!r}") from error
        self._idle.put(helper)
        if not ok:
            raise RuntimeError(f"the compile helper failed: {answer}")
        return answer

    def _drop(self, helper: subprocess.Popen) -> None:
        """Kill a helper that failed, reap it, close its pipes."""
        with self._lock:
            self._alive -= 1
        with contextlib.suppress(OSError):
            helper.kill()
        with contextlib.suppress(Exception):
            helper.wait(timeout=10)
        for pipe in (helper.stdin, helper.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def merge_into(self, cache_dir: str) -> int:
        """Copy the kernels the helpers compiled and ``cache_dir`` (this process's Triton
        cache directory now) lacks into it, each group of files as one directory renamed into
        place (a reader never sees half of one); returns how many it copied."""
        copied = 0
        os.makedirs(cache_dir, exist_ok=True)
        for source in self.cache_dirs:
            for name in _listdir(source):
                if (cache_dir, name) in self._merged or name.startswith("."):
                    continue
                group = os.path.join(source, name)
                if not any(f.startswith("__grp__") for f in _listdir(group)):
                    continue  # still being written (Triton writes the group's index last)
                target = os.path.join(cache_dir, name)
                if not os.path.exists(target):
                    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
                    try:
                        shutil.copytree(group, staging, dirs_exist_ok=True)
                        os.replace(staging, target)
                        copied += 1
                    except OSError:  # written meanwhile by Triton itself, or unreadable
                        shutil.rmtree(staging, ignore_errors=True)
                        continue
                self._merged.add((cache_dir, name))
        return copied

    def close(self) -> None:
        """End every helper (the idle ones exit when their stdin closes; busy ones are
        killed: nothing waits for them any more) and remove their cache directories."""
        for helper in self._helpers:
            with contextlib.suppress(OSError):
                helper.stdin.close()
            with contextlib.suppress(OSError):
                helper.kill()
        self._alive = 0
        for cache_dir in self.cache_dirs:
            shutil.rmtree(cache_dir, ignore_errors=True)

    def forget_in_child(self) -> None:
        """In a forked child: the helpers and their pipes are the parent's; drop them (and
        leave the parent's directories alone)."""
        self._alive = 0
        self._idle = queue.Queue()
        self._helpers = []
        self.cache_dirs = []


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
