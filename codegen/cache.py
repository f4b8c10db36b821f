"""The kernel cache: a verified on-disk store of generated kernel sources.

Each generated module is written as ``sc_<key>.py`` under one directory, so that tracebacks and
Triton's error messages point to a file a person can open. The file is never trusted: a module
is loaded by regenerating its source, comparing it with the file byte for byte (writing the file
anew when they differ) and executing the source just generated, not the file. Bytecode caches
are neither read nor written.

Writes go only to a directory this user owns and no one else can write to, created with mode
0700; anything else (another user's directory, a group- or world-writable one, a read-only or
full disk) falls back to a private temporary directory made once per process, and the reason
is logged once. ``SPARSE_COMPILE_CACHE_SHARED=1`` accepts a directory that others can write to,
for a cache shared between users: files are then written readable by all, and still verified
before anything runs.
"""

from __future__ import annotations

import atexit
import contextlib
import linecache
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("sparse_compile")

DIRECTORY_ENV = "SPARSE_COMPILE_CACHE"
SHARED_ENV = "SPARSE_COMPILE_CACHE_SHARED"

_logged: set[str] = set()
_fallback_lock = threading.Lock()
# (pid, directory): a forked child makes its own rather than share its parent's.
_fallback: tuple[int, Path] | None = None


@dataclass(frozen=True)
class KernelCache:
    """Where generated sources are written.

    directory: the kernel directory, ``$SPARSE_COMPILE_CACHE/kernels`` (default
        ``~/.cache/sparse_compile/kernels``).
    shared: accept a directory other users own or can write to (``SPARSE_COMPILE_CACHE_SHARED``
        set to ``1``, ``true`` or ``yes``).
    """

    directory: Path
    shared: bool = False

    @classmethod
    def from_environment(cls) -> KernelCache:
        """The cache the environment variables describe (read on every call)."""
        root = os.environ.get(DIRECTORY_ENV)
        base = Path(root).expanduser() if root else Path.home() / ".cache" / "sparse_compile"
        shared = os.environ.get(SHARED_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(base / "kernels", shared)


def load_module(cache: KernelCache, key: str, source: str) -> ModuleType:
    """Execute ``source`` as the module ``sparse_compile_kernels_<key>`` after making sure the
    file ``sc_<key>.py`` of the cache holds exactly ``source``; the module's ``__file__`` is
    that file."""
    path = store(cache, f"sc_{key}.py", source)
    return execute(f"sparse_compile_kernels_{key}", source, path)


def store(cache: KernelCache, filename: str, source: str) -> Path:
    """Path of a file named ``filename`` that holds exactly ``source``: in the cache's directory
    when writes may go there, else in the process's private temporary directory.

    A file that differs (stale, truncated, planted) is logged once and replaced atomically;
    concurrent processes storing the same source all succeed.
    """
    data = source.encode()
    directory, refusal = writable_directory(cache)
    if directory is not None:
        path = directory / filename
        held = _holds(path, data)
        if held:
            return path
        if held is False:
            _log_once(f"kernel cache: {path} does not hold the source this version generates "
                      "(stale, truncated or written by something else); ignoring and replacing it")
        try:
            _publish(directory, filename, data, readable_by_all=cache.shared)
            return path
        except OSError as err:
            refusal = f"cannot write to {directory} ({err.strerror or err})"
    try:
        fallback = fallback_directory()
        if not _holds(fallback / filename, data):
            _publish(fallback, filename, data, readable_by_all=False)
    except OSError as err:
        # The module still runs: execute() hands Triton the source through linecache.
        _log_once(f"kernel cache: {refusal}, and no temporary directory can be written either "
                  f"({err.strerror or err}); kernels run from memory only")
        return cache.directory / filename
    _log_once(f"kernel cache: {refusal}; writing kernels to the private temporary directory "
              f"{fallback} for this process instead")
    return fallback / filename


def execute(name: str, source: str, path: Path) -> ModuleType:
    """The module ``name`` made by executing ``source`` with ``path`` as its file name, entered
    in ``sys.modules``; ``inspect`` (and so ``triton.jit``) reads its functions' source from
    ``source``, not from the file."""
    filename = str(path)
    # triton.jit, compiler and interpreter alike, reads a kernel's source through inspect, which
    # reads linecache: this entry makes that the verified text, never a later re-read of the file
    # (the interpreter reads it at a kernel's first call, long after the import). An mtime of
    # None keeps linecache.checkcache from replacing it when the file changes; only
    # linecache.clearcache() drops it, and the file then read is the one just verified, in a
    # directory no one else writes to unless the shared opt-in is set. No file is needed at all:
    # inspect accepts a file name that only linecache knows.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = compile(source, filename, "exec", dont_inherit=True)
    module = ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def writable_directory(cache: KernelCache) -> tuple[Path | None, str]:
    """(the cache's directory, "") when writes may go there, else (None, why not); creates the
    directory and its missing parents with mode 0700."""
    directory = cache.directory
    try:
        _make_private(directory)
        st = os.stat(directory)
    except OSError as err:
        return None, f"cannot create {directory} ({err.strerror or err})"
    refusal = write_refusal(st, cache.shared)
    if refusal:
        return None, f"{directory} {refusal}"
    return directory, ""


def write_refusal(st: os.stat_result, shared: bool) -> str | None:
    """Why a directory with status ``st`` must not receive writes (None when it may): it is not
    a directory, or, unless ``shared``, another user owns it or group or others can write to
    it."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if shared:
        return None
    hint = f"(set {SHARED_ENV}=1 to use it anyway)"
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if euid is not None and st.st_uid != euid:
        return f"is owned by another user (uid {st.st_uid}) {hint}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}) {hint}"
    return None


def fallback_directory() -> Path:
    """A private (0700) temporary directory, made once per process and removed at its exit."""
    global _fallback
    with _fallback_lock:
        if _fallback is None or _fallback[0] != os.getpid():
            path = Path(tempfile.mkdtemp(prefix="sparse_compile-kernels-"))
            atexit.register(_remove, os.getpid(), path)
            _fallback = (os.getpid(), path)
        return _fallback[1]


def _remove(pid: int, path: Path) -> None:
    # A forked child inherits the exit hooks of its parent, whose directory is not its own.
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _make_private(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700 (existing ones keep theirs)."""
    missing = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            path.mkdir(mode=0o700)


def _holds(path: Path, data: bytes) -> bool | None:
    """Whether the regular file at ``path`` holds exactly ``data`` (None: nothing there).

    Symbolic links are not followed and at most ``len(data) + 1`` bytes are read, so whatever
    sits at the path (a link, a pipe, a huge file) is judged quickly and replaced."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with open(fd, "rb", closefd=False) as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def _publish(directory: Path, filename: str, data: bytes, readable_by_all: bool) -> None:
    """Write ``data`` to ``directory / filename`` atomically: readers see the old file or the
    whole new one. No fsync: a file cut short by a crash fails verification and is rewritten."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if readable_by_all:
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp, directory / filename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning("sparse_compile %s", message)
