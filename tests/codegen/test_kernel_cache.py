"""The kernel cache runs only the source the generator produces, whatever sits on disk.

Each test points ``SPARSE_COMPILE_CACHE`` at a fresh directory and empties the in-memory caches,
so every pattern's module is loaded through the disk cache; where a test runs kernels, the output
is compared with ``reference_attention``.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import logging
import os
import py_compile
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from sparse_compile.codegen import cache
from sparse_compile.codegen.attention import static_kernels
from sparse_compile.codegen.tl import module
from sparse_compile.patterns import parse

from sparse_compile.functional import attention
from sparse_compile.reference import reference_attention
from tests.codegen.attention_cases import TOL, make_qkv
from tests.conftest import rel_error


@pytest.fixture
def kernels(monkeypatch, tmp_path) -> Path:
    """The kernel directory of a fresh cache (not yet created); nothing loaded in memory."""
    monkeypatch.setenv(cache.DIRECTORY_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cache.SHARED_ENV, raising=False)
    monkeypatch.setattr(module, "_MODULES", {})
    monkeypatch.setattr(cache, "_logged", set())
    static_kernels.cache_clear()
    yield tmp_path / "cache" / "kernels"
    static_kernels.cache_clear()


def cache_file(directory: Path, text: str) -> Path:
    return directory / f"sc_{module.source_key(parse(text))}.py"


def genuine(text: str) -> str:
    return module.module_source(parse(text))


def assert_attention_right(text: str) -> None:
    q, k, v = make_qkv(1, 2, 1, 24, 24, 16, torch.float32)
    with torch.no_grad():
        out = attention(q, k, v, text)
    assert rel_error(out, reference_attention(q, k, v, text)) < TOL[torch.float32]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sparse_compile" and r.levelno == logging.WARNING]


def test_fresh_cache_is_private_and_holds_the_source(kernels):
    text = "causal & sliding(5)"
    mod = module.kernel_module(parse(text))
    path = cache_file(kernels, text)
    assert mod.__file__ == str(path)
    assert path.read_text() == genuine(text)
    for d in (kernels, kernels.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert not (kernels / "__pycache__").exists()


def test_planted_file_is_never_executed(kernels, tmp_path, caplog):
    text = "causal & sliding(6)"
    marker = tmp_path / "planted-ran"
    path = cache_file(kernels, text)
    kernels.mkdir(parents=True, mode=0o700)
    path.write_text(f"open({str(marker)!r}, 'w').close()\n" + genuine(text))
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        module.kernel_module(parse(text))
        module.kernel_module(parse(text))
    assert not marker.exists()
    assert path.read_text() == genuine(text)
    replaced = [m for m in warnings_of(caplog) if str(path) in m]
    assert len(replaced) == 1 and "replacing" in replaced[0]
    assert_attention_right(text)
    assert not marker.exists()


def test_planted_bytecode_is_never_executed(kernels, tmp_path):
    """A .pyc that Python's own loader would run unchecked (unchecked-hash) beside the genuine
    source."""
    text = "local(7)"
    marker = tmp_path / "bytecode-ran"
    path = cache_file(kernels, text)
    kernels.mkdir(parents=True, mode=0o700)
    path.write_text(genuine(text))
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n")
    py_compile.compile(str(evil), cfile=importlib.util.cache_from_source(str(path)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    module.kernel_module(parse(text))
    assert not marker.exists()
    assert_attention_right(text)


@pytest.mark.parametrize("damage", ["truncated", "empty", "stale", "symlink", "directory"])
def test_damaged_file_is_rebuilt(kernels, tmp_path, damage):
    text = "strided(3) | sink(2)"
    path = cache_file(kernels, text)
    kernels.mkdir(parents=True, mode=0o700)
    source = genuine(text)
    if damage == "truncated":
        path.write_text(source[: len(source) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "stale":  # what an older generator could have written under this key
        path.write_text(source.replace("def _fwd_kernel", "def _old_fwd_kernel"))
    elif damage == "symlink":
        target = tmp_path / "elsewhere.py"
        target.write_text(source)
        path.symlink_to(target)
    else:
        path.mkdir()
    mod = module.kernel_module(parse(text))
    if damage == "directory":  # cannot be replaced by a file: the call goes on elsewhere
        assert Path(mod.__file__).parent == cache.fallback_directory()
    else:
        assert not path.is_symlink() and path.read_text() == source
    assert_attention_right(text)


def test_file_changed_after_loading_is_not_what_triton_reads(kernels):
    """The interpreter reads a kernel's source at its first call, after the module loaded: it
    must still see the verified text, not the file."""
    text = "axial(6) | sink(2)"
    mod = module.kernel_module(parse(text))
    path = Path(mod.__file__)
    path.write_text("raise SystemExit('read from disk')\n" * (path.stat().st_size // 35))
    assert_attention_right(text)


def make_foreign(directory: Path, monkeypatch) -> None:
    if os.geteuid() == 0:
        os.chown(directory, 65534, 65534)
    else:  # only root can give a directory away: be another user instead
        uid = directory.stat().st_uid + 1
        monkeypatch.setattr(os, "geteuid", lambda: uid)


@pytest.mark.parametrize("how", ["owned by another user", "world-writable", "group-writable"])
def test_directory_others_can_write_is_refused(kernels, monkeypatch, caplog, how):
    text = "block(12)"
    kernels.mkdir(parents=True)
    if how == "owned by another user":
        make_foreign(kernels, monkeypatch)
    else:
        kernels.chmod(0o777 if how == "world-writable" else 0o770)
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        mod = module.kernel_module(parse(text))
    assert Path(mod.__file__).parent == cache.fallback_directory()
    assert not cache_file(kernels, text).exists()
    assert any(str(kernels) in m and cache.SHARED_ENV in m for m in warnings_of(caplog))
    assert_attention_right(text)

    # Opted in, the same directory is used, its files readable by the others sharing it.
    monkeypatch.setenv(cache.SHARED_ENV, "1")
    monkeypatch.setattr(module, "_MODULES", {})
    mod = module.kernel_module(parse(text))
    assert mod.__file__ == str(cache_file(kernels, text))
    assert stat.S_IMODE(os.stat(mod.__file__).st_mode) == 0o644


@pytest.mark.parametrize("failure", ["read-only directory", "disk full", "mkdir fails"])
def test_unwritable_cache_falls_back(kernels, tmp_path, monkeypatch, caplog, failure):
    text = "prefix(10) | causal"
    if failure == "mkdir fails":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        monkeypatch.setenv(cache.DIRECTORY_ENV, str(blocker))
    else:
        kernels.mkdir(parents=True, mode=0o700)
        if failure == "read-only directory":
            kernels.chmod(0o500)
        # Root writes through mode bits: refuse the write as a read-only or full file system would.
        if failure == "disk full" or os.geteuid() == 0:
            code = errno.ENOSPC if failure == "disk full" else errno.EROFS
            mkstemp = tempfile.mkstemp

            def refuse(*args, dir=None, **kwargs):
                if Path(dir) == kernels:
                    raise OSError(code, os.strerror(code))
                return mkstemp(*args, dir=dir, **kwargs)

            monkeypatch.setattr(cache.tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        mod = module.kernel_module(parse(text))
    assert Path(mod.__file__).parent == cache.fallback_directory()
    assert Path(mod.__file__).read_text() == genuine(text)
    assert any(str(cache.fallback_directory()) in m for m in warnings_of(caplog))
    assert_attention_right(text)


def test_no_writable_directory_at_all_still_runs(kernels, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.DIRECTORY_ENV, str(blocker))

    def no_temp() -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache, "fallback_directory", no_temp)
    text = "sliding(7) & ~sink(1)"
    mod = module.kernel_module(parse(text))
    assert not Path(mod.__file__).exists()
    # What triton.jit reads (the interpreter would quietly run the kernel unrewritten without).
    assert inspect.getsource(mod._fwd_kernel.fn).lstrip().startswith("@triton.jit")
    assert_attention_right(text)


RACER = textwrap.dedent("""
    import os, sys, time
    import torch
    from sparse_compile import attention, reference_attention
    from sparse_compile.codegen.tl.module import kernel_module, module_source
    from sparse_compile.patterns import parse

    texts = [f"causal & sliding({w})" for w in range(2, 14)]
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.005)
    for text in texts:
        mod = kernel_module(parse(text))
        assert open(mod.__file__).read() == module_source(parse(text))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    err = (attention(q, k, v, texts[-1]) - reference_attention(q, k, v, texts[-1])).abs().max()
    assert err < 1e-4, err
    print("ok", flush=True)
""")


def test_two_processes_racing_on_the_same_keys_both_succeed(tmp_path):
    env = dict(os.environ, SPARSE_COMPILE_CACHE=str(tmp_path / "cache"))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(go)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]
    try:
        for racer in racers:  # both imported: start them together
            assert racer.stdout.readline().strip() == "ready", racer.communicate()[1]
        go.touch()
        deadline = time.monotonic() + 120
        for racer in racers:
            out, err = racer.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert racer.returncode == 0 and out.strip() == "ok", err
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    kernels = tmp_path / "cache" / "kernels"
    assert len(list(kernels.glob("sc_*.py"))) == 12
    assert not list(kernels.glob(".*.tmp"))
