"""Compile the Hopper Gluon kernels for sm_90a on a machine without a GPU; print what ptxas says.

Run as a script (``python tests/codegen/gluon_sm90_compile.py``) in its own process: it makes
Triton's active driver a stand-in that reports an sm_90 target, which nothing else in a process
should see. For each kernel in its default configuration (forward; dQ and dK/dV passes) it
compiles through Triton to PTX and runs the ptxas bundled with Triton with
``-v``, then prints one JSON line per kernel: ``{"kernel", "spill_bytes", "serialized"}``.
``serialized`` is ptxas's C7514 warning ("wgmma.mma_async instructions are serialized"): the
asynchronous products then wait for each other, which undoes the kernels' pipelining.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from sparse_compile.codegen.launch.target_driver import TargetDriver
from triton.backends.compiler import GPUTarget


def sm90_driver() -> TargetDriver:
    """Triton's driver stand-in that compiles for sm_90 (the Hopper GPUs) without a GPU."""
    return TargetDriver(GPUTarget("cuda", 90, 32))


def _ptxas() -> str | None:
    """The ptxas Triton itself uses for sm_90 (its bundled one; the release varies)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # an older layout: the bundled binary
        base = os.path.dirname(triton.__file__)
        found = glob.glob(os.path.join(base, "backends", "nvidia", "bin", "ptxas"))
        return found[0] if found else None


def ptxas_report(name: str, ptx: str) -> dict:
    """Spill bytes and wgmma serialisation from ``ptxas -v`` on ``ptx``."""
    ptxas = _ptxas()
    if ptxas is None:
        return {"kernel": name, "spill_bytes": None, "serialized": None}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {"kernel": name, "spill_bytes": sum(spills), "serialized": "serialized" in log}


# (SOFTCAP, PBIAS, KEY_MASK, BIAS) of each name
MODS = {"": (False, 0, False, 0), "softcap": (True, 0, False, 0), "alibi": (False, 1, False, 0),
        "table": (False, 2, False, 0), "keys": (False, 0, True, 0), "bias": (False, 0, False, 1),
        "mask": (False, 0, False, 2), "mods": (True, 3, True, 1)}


def compile_all(d: int = 128, pieces: int = 1, mods: str = "") -> list[dict]:
    """Each kernel for head dim ``d`` and rows of ``pieces`` intervals, with the logit
    modifications ``mods`` names (``MODS``: none, ``softcap``, ``alibi``, a relative-bias
    ``table``, a key mask ``keys``, an additive ``bias`` tensor, a boolean ``mask`` tensor,
    or all of them: ``mods``); the backward passes only at
    the head dims they serve (``GLUON_BACKWARD_HEAD_DIMS``)."""
    triton.runtime.driver.set_active(sm90_driver())
    from sparse_compile.codegen.gluon import backward, forward, support
    from sparse_compile.codegen.gluon.support import gl

    lq = lk = 1000
    hq, hkv = 4, 2
    q = torch.empty(2, hq, lq, d, dtype=torch.bfloat16)
    k = torch.empty(2, hkv, lk, d, dtype=torch.bfloat16)
    q2, k2 = q.view(-1, d), k.view(-1, d)
    lse = torch.empty(2, hq, lq)
    bounds = torch.zeros(1, lq, dtype=torch.int32)
    strides = (hq * lq, lq, 0, hkv * lk, lk, 0)  # q_rb, q_rh, q_ch, k_rb, k_rh, k_ch

    def desc(view, rows):
        return backward._descriptor(view, rows, d, gl.bfloat16)

    softcap, pbias, key_mask, bias = MODS[mods]
    flags = dict(SOFTCAP=softcap, PBIAS=pbias, KEY_MASK=key_mask, BIAS=bias)
    common = dict(HEAD_DIM=d, STAGES=2, PIECES=pieces, grid=(1,), **flags)
    table = torch.empty(hq, lq + lk - 1)
    keys = torch.empty(2, 1, 1, lk, dtype=torch.uint8)
    dense = torch.empty(2, 1, lq, lk, dtype=torch.uint8 if bias == 2 else torch.bfloat16)
    # cap_in, cap_out, Slopes, Rel, s_rh; KeyMask, km_sb, km_sk; Bias, sbb, sbh, sbm, sbn
    mod_args = (0.05, 72.0, lse, table, table.stride(0), keys, keys.stride(0), 1, dense,
                dense.stride(0), 0, dense.stride(2), 1)
    split = dict(common, num_warps=support.CONSUMER_WARPS)  # one warpgroup per consumer
    reports = []
    bn = 64 if d > 128 else 128  # launch_gluon_forward's default
    fwd = forward._fwd_kernel.warmup(
        desc(q2, 64), desc(k2, bn), desc(k2, bn), q, lse, bounds, bounds, hq, hq // hkv, 1,
        lq, lk, *strides, q.stride(0), q.stride(1), q.stride(2), 0.1, *mod_args, BM=128,
        BN=bn, **split)
    reports.append(dict(ptxas_report("forward", fwd.asm["ptx"]),
                        shared_bytes=fwd.metadata.shared))
    if d not in support.GLUON_BACKWARD_HEAD_DIMS:
        return reports
    (dq_m, dq_n), (kv_m, kv_n) = backward.default_tiles(d)
    dq = backward._dq_kernel.warmup(
        desc(q2, dq_m // 2), desc(k2, dq_n), desc(k2, dq_n), desc(q2, dq_m // 2), q, lse, lse,
        q, bounds, bounds,
        hq, hq // hkv, 1, lq, lk, *strides, hq * lq, lq, 0, q.stride(0), q.stride(1),
        q.stride(2), *q.stride(), 0.1, 0.1, *mod_args, BM=dq_m, BN=dq_n, OVERLAP=False,
        **split)
    reports.append(dict(ptxas_report("dq pass", dq.asm["ptx"]), shared_bytes=dq.metadata.shared))
    kv_args = (desc(q2, kv_m), desc(k2, kv_n // 2), desc(k2, kv_n // 2), desc(q2, kv_m), k, k)
    tail = (lse, lse, bounds, bounds, bounds, bounds, hq, hq // hkv, 1, lq, lk, *strides,
            hq * lq, lq, 0, k.stride(0), k.stride(1), k.stride(2), 0.1, 0.1, *mod_args)
    names = {3: "dk/dv pass", 1: "dv pass", 2: "dk pass"}
    for grads in backward.gradient_launches(d):
        dkdv = backward._dkdv_kernel.warmup(*kv_args, *tail, BM=kv_m, BN=kv_n, GRADS=grads,
                                            **split)
        reports.append(dict(ptxas_report(names[grads], dkdv.asm["ptx"]),
                            shared_bytes=dkdv.metadata.shared))
    return reports


if __name__ == "__main__":
    head_dim = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    pieces = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    mods = sys.argv[3] if len(sys.argv) > 3 else ""
    try:
        reports = compile_all(head_dim, pieces, mods)
    except Exception as error:  # the innermost cause first: Triton chains long tracebacks
        root = error
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        print(f"innermost error: {root!r}", file=sys.stderr)
        raise
    for report in reports:
        print(json.dumps(report))
