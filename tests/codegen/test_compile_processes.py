"""The compile helpers (``codegen/launch/compile_processes.py``) and settled cache keys
(``codegen/launch/cache_keys.py``), host side: no GPU needed. That the helpers' binaries are
the ones the launches then load is checked in ``test_gluon.py`` (sm_90 stand-in, and on the
GPU)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sparse_compile.codegen.launch.compile_processes import (
    CompileProcesses,
    read_message,
    write_message,
)


def test_messages_round_trip_and_a_closed_stream_is_an_eof() -> None:
    stream = io.BytesIO()
    write_message(stream, {"a": 1, "b": [1.5, "x"]})
    write_message(stream, (True, 3))
    stream.seek(0)
    assert read_message(stream) == {"a": 1, "b": [1.5, "x"]}
    assert read_message(stream) == (True, 3)
    with pytest.raises(EOFError):
        read_message(stream)
    truncated = io.BytesIO()
    write_message(truncated, "a longer message")
    with pytest.raises(EOFError):
        read_message(io.BytesIO(truncated.getvalue()[:-3]))


def test_a_helper_reports_a_failed_request_and_stays_usable() -> None:
    helpers = CompileProcesses(1)
    for _ in range(2):  # the same helper answers both
        with pytest.raises(RuntimeError, match="compile helper failed.*unexpected keyword"):
            helpers.run({"not_an_argument": 1})
    assert helpers.alive == 1
    helpers.close()


def test_a_dead_helper_is_not_used_again() -> None:
    helpers = CompileProcesses(1)
    helper = helpers._idle.get()
    helper.kill()
    helper.wait()
    helpers._idle.put(helper)
    with pytest.raises(RuntimeError, match="was lost"):
        helpers.run({"kind": "forward"})
    assert helpers.alive == 0
    with pytest.raises(RuntimeError, match="no compile helper is left"):
        helpers.run({"kind": "forward"})
    helpers.close()


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGSTOP"), reason="needs SIGSTOP")
def test_a_silent_helper_is_given_up_and_killed(monkeypatch) -> None:
    """A helper that stops answering (stuck) must not hold its job, or the process's exit,
    forever: past ``HELPER_TIMEOUT_S`` the request fails and the helper is killed."""
    import signal

    from sparse_compile.codegen.launch import compile_processes

    monkeypatch.setattr(compile_processes, "HELPER_TIMEOUT_S", 1.0)
    helpers = CompileProcesses(1)
    helper = helpers._helpers[0]
    helper.send_signal(signal.SIGSTOP)
    with pytest.raises(RuntimeError, match="was lost.*no answer"):
        helpers.run({"not_an_argument": 1})
    assert helpers.alive == 0 and helper.poll() is not None  # killed and reaped
    helpers.close()


def test_helper_binaries_are_merged_into_the_cache_where_launches_look(tmp_path) -> None:
    """Each helper compiles into its own directory; ``merge_into`` copies every complete
    group (Triton writes a group's ``__grp__`` index last) into the launching process's
    current cache, skips groups still being written and ones already there, and ``close``
    removes the helpers' directories."""
    helpers = CompileProcesses(1)
    source = Path(helpers.cache_dirs[0])
    done = source / "GROUPA"
    done.mkdir()
    (done / "k.cubin").write_bytes(b"binary")
    (done / "__grp__k.json").write_text("{}")
    (source / "GROUPB").mkdir()  # no index yet: still being written
    (source / "GROUPB" / "k.ptx").write_text("ptx")
    present = tmp_path / "cache" / "GROUPC"
    present.mkdir(parents=True)
    (source / "GROUPC").mkdir()
    (source / "GROUPC" / "__grp__k.json").write_text("helper's")
    (present / "__grp__k.json").write_text("already here")
    assert helpers.merge_into(str(tmp_path / "cache")) == 1
    assert (tmp_path / "cache" / "GROUPA" / "k.cubin").read_bytes() == b"binary"
    assert not (tmp_path / "cache" / "GROUPB").exists()
    assert (present / "__grp__k.json").read_text() == "already here"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["GROUPA", "GROUPC"]
    (source / "GROUPB" / "__grp__k.json").write_text("{}")  # finished meanwhile
    assert helpers.merge_into(str(tmp_path / "cache")) == 1
    helpers.close()
    assert not source.exists()


_KERNELS = '''
import triton
import triton.language as tl

_WIDTH = tl.constexpr(4)


@triton.jit
def inner(x):
    return x * _WIDTH


@triton.jit
def middle(x):
    return inner(x) + 1


@triton.jit
def kernel_a(X):
    tl.store(X, middle(tl.load(X)))


@triton.jit
def kernel_c(X):
    tl.store(X, inner(tl.load(X)))
'''


def _key_of_kernel_a(tmp_path, first: list[str], settle: bool) -> str:
    """kernel_a's cache key in a fresh process, after the keys of ``first`` (settled, or
    read in Triton's own order)."""
    (tmp_path / "order_kernels.py").write_text(_KERNELS)
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import order_kernels as m
        from sparse_compile.codegen.launch.cache_keys import settle_cache_key
        for name in {first!r} + ["kernel_a"]:
            settle_cache_key(getattr(m, name)) if {settle} else getattr(m, name).cache_key
        print(json.dumps(m.kernel_a.cache_key))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_settled_cache_key_does_not_depend_on_what_was_keyed_before(tmp_path) -> None:
    """kernel_a reaches a constexpr global through two levels of calls. Before Triton 3.9 its
    key, read in Triton's own order, depended on whether ``inner``'s key had been read before
    (through kernel_c); settled, it is the same either way, as a compile helper and the
    model's process need it to be. (Triton 3.9 keys callees first itself: there the test
    checks that settling changes nothing.)"""
    from sparse_compile.codegen.gluon.support import triton_version

    if triton_version() < (3, 9):  # the order dependence settling guards against is there
        assert (_key_of_kernel_a(tmp_path, [], settle=False)
                != _key_of_kernel_a(tmp_path, ["kernel_c"], settle=False))
    alone = _key_of_kernel_a(tmp_path, [], settle=True)
    after_c = _key_of_kernel_a(tmp_path, ["kernel_c"], settle=True)
    assert alone == after_c
    # and it is the key of the complete dependencies: the one Triton's order gives when
    # every callee was keyed before its caller
    assert alone == _key_of_kernel_a(tmp_path, ["inner", "middle"], settle=False)


def test_a_launch_stops_waiting_for_a_stuck_job(monkeypatch, caplog) -> None:
    """A job that never ends (a helper stuck) must not hang the model: the launch's wait
    gives up after ``FINISH_TIMEOUT_S`` and says so; the launch then compiles for itself."""
    from concurrent.futures import Future

    from sparse_compile.codegen import precompile

    key = ((), "cuda", "causal", "forward", False)
    monkeypatch.setitem(precompile._pending, key, Future())  # never finishes
    monkeypatch.setattr(precompile, "FINISH_TIMEOUT_S", 0.05)
    with caplog.at_level("WARNING", logger="sparse_compile"):
        precompile.finish(key)
    assert key not in precompile._pending
    assert "compiles its kernels itself" in caplog.text


def test_callees_named_through_a_module_are_settled_too(tmp_path) -> None:
    """``helpers.inner(x)`` is a callee as much as ``inner(x)`` (Triton follows both)."""
    (tmp_path / "order_helpers.py").write_text(
        "import triton\n\n\n@triton.jit\ndef inner(x):\n    return x + 1\n")
    (tmp_path / "order_caller.py").write_text(
        "import order_helpers\nimport triton\nimport triton.language as tl\n\n\n"
        "@triton.jit\ndef kernel(X):\n    tl.store(X, order_helpers.inner(tl.load(X)))\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import order_caller
        from sparse_compile.codegen.launch.cache_keys import _callees
        print([c.fn.__name__ for c in _callees(order_caller.kernel)])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "['inner']"


@pytest.mark.parametrize("traced", [True, False])
def test_jobs_of_a_compiled_model_send_the_ptxas_inductor_will_use(traced, monkeypatch) -> None:
    """Inductor sets ``TRITON_PTXAS_PATH`` to torch's own ptxas when it compiles its first
    kernel, after our jobs started; every kernel's cache key follows the ptxas. A job of a
    traced graph sets it first, as Inductor would, and the helpers get it with the request;
    an eager call's job leaves the environment alone (no Inductor will change it)."""
    from sparse_compile.codegen import attention, precompile
    from torch._inductor.runtime import compile_tasks

    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    monkeypatch.setattr(compile_tasks, "_set_triton_ptxas_path",
                        lambda: os.environ.setdefault("TRITON_PTXAS_PATH", "/torch/bin/ptxas"))
    monkeypatch.setattr(attention, "plain_gluon_rows", lambda *a, **kw: "rows")
    monkeypatch.setattr(precompile, "_target", lambda device: ("cuda", 90, 32))
    requests = []

    class Helpers:
        def run(self, request):
            requests.append(request)
            return 1

    monkeypatch.setattr(precompile, "_helpers", lambda: Helpers())
    precompile._start_pools()
    described = (((1, 2, 64, 128), (16384, 8192, 128, 1), torch.bfloat16),) * 3 + (None,)
    key = (described, "cuda", "causal", "forward", False)
    assert precompile._compile(key, 0.1, traced=traced) == 1
    assert requests[0]["env"].get("TRITON_PTXAS_PATH") == ("/torch/bin/ptxas" if traced else None)
    os.environ.pop("TRITON_PTXAS_PATH", None)
