"""Background precompilation compiles exactly what the launches ask for; checked without a GPU.

Run as a script in its own process (it swaps Triton's driver for the sm_90 stand-in of
``gluon_sm90_compile.py`` and pretends the process has an sm90 GPU). It runs the precompile
jobs (``codegen/precompile.py``) for a model-like call (sequence-major q, k, v, GQA), then
drives the launchers with real tensors of the same shapes and strides, as the forward and
backward of that call would, inside ``compile_only()``: every kernel they ask for must already
be compiled. With ``documents`` as third argument the call is one on packed documents (B = 1),
the launches reading the rows built from three documents with padding; with ``moved``, Triton's
cache directory changes between the jobs and the launches, as Inductor's first kernel makes it
do where none was set. The jobs compile in the
helper processes (``compile_processes.py``), or on threads of this process with
``SPARSE_COMPILE_PRECOMPILE=threads``; either way the binaries land in Triton's cache
directory (``TRITON_CACHE_DIR``), so what a launch compiled shows as files it added there.
Prints one JSON line: ``{"jobs": [...], "precompiled": [...], "compiled_at_launch": [...]}``
(kernel names: in the cache after the jobs, added to it by the launches).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from gluon_sm90_compile import sm90_driver  # noqa: E402


def cache_files() -> set[str]:
    """Every file in Triton's cache directory."""
    from triton import knobs

    return {os.path.join(root, name) for root, _, names in os.walk(knobs.cache.dir)
            for name in names}


def kernel_names(files: set[str]) -> list[str]:
    """The kernels whose compiled metadata is among ``files`` (one ``<kernel>.json`` each)."""
    return [os.path.basename(f)[:-5] for f in files
            if f.endswith(".json") and not os.path.basename(f).startswith("__grp__")]


def main(head_dim: int, pattern: str, documents: bool = False, moved: bool = False) -> dict:
    triton.runtime.driver.set_active(sm90_driver())
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.device = lambda device: contextlib.nullcontext()
    from sparse_compile.codegen import precompile
    from sparse_compile.codegen.gluon import support
    from sparse_compile.codegen.gluon.backward import launch_gluon_backward
    from sparse_compile.codegen.gluon.forward import launch_gluon_forward
    from sparse_compile.codegen.gluon.rows import document_rows, interval_rows
    from sparse_compile.codegen.launch.compile_only import compile_only
    from sparse_compile.codegen.tl.documents import document_bounds_reference
    from sparse_compile.patterns import parse

    support._is_sm90.cache_clear()
    b, hq, hkv, length, d = 1, 8, 2, 1000, head_dim
    # a model's layout: [B, L, H, D] viewed as [B, H, L, D]
    q = torch.randn(b, length, hq, d, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, length, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, length, hkv, d, dtype=torch.bfloat16).transpose(1, 2)
    cuda = torch.device("cuda", 0)

    def key(backward: bool, dout: torch.Tensor | None = None) -> tuple:
        described = tuple(None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype)
                          for t in (q, k, v, dout))
        return (described, cuda, pattern, "backward" if backward else "forward", documents)

    # the gradient's layout unknown (taken as the output's), then known and different: a
    # contiguous one, as a graph may hand it over (other row offsets: other specialisations
    # where the length is not a multiple of 16)
    contiguous = torch.empty(b, hq, length, d, dtype=torch.bfloat16)
    counts = [precompile._compile(key(False), 0.1), precompile._compile(key(True), 0.1),
              precompile._compile(key(True, contiguous), 0.1)]
    if moved:  # Inductor points Triton at its own cache when it loads its first kernel
        os.environ["TRITON_CACHE_DIR"] = os.environ["TRITON_CACHE_DIR"] + "-inductor"
    # what a launch does first: wait for its job, bring the helpers' binaries into the cache
    precompile.finish_call(q, k, v, None, pattern, False, documents)
    after_jobs = cache_files()
    if documents:  # three documents and padding: the rows the call builds from them
        ids = torch.tensor([[0] * 300 + [1] * 500 + [-1] * 50 + [2] * 150])
        start, end = document_bounds_reference(ids)
        rows = document_rows(parse(pattern), start[0], end[0])
    else:
        rows = interval_rows(parse(pattern), length, length, q.device)
    with compile_only():
        out, lse = launch_gluon_forward(q, k, v, rows, 0.1, query_layout=True)
        launch_gluon_backward(torch.empty_like(out), q, k, v, out, lse, rows, 0.1)
        launch_gluon_backward(contiguous, q, k, v, out, lse, rows, 0.1)
    return {"jobs": counts, "precompiled": kernel_names(after_jobs),
            "compiled_at_launch": kernel_names(cache_files() - after_jobs)}


if __name__ == "__main__":
    head_dim = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    pattern = sys.argv[2] if len(sys.argv) > 2 else "causal & sliding(64)"
    flags = sys.argv[3:]
    print(json.dumps(main(head_dim, pattern, "documents" in flags, "moved" in flags)))
