"""Benchmark: generated sparse attention vs FlexAttention vs dense SDPA (flash, cuDNN).

One process, one call: for each head dim, length and pattern it checks our forward output and
gradients against FlexAttention on the exact timed inputs, then times forward and
forward+backward (median of triton.testing.do_bench) of ours and of compiled FlexAttention
(same mask_mod, block mask built once outside the timed region), plus dense SDPA, and reports
effective TFLOP/s on kept entries (forward 4·B·H·D·kept; backward counted as 2.5x the forward's
work) and first-call cost (layout + codegen + compile) separately. Prints one table and writes
it with the conditions to bench/results/<gpu>.md (or --out).

    python bench/attention.py                       # the full grid of the issue
    python bench/attention.py --dims 128 --lengths 16384 --patterns "causal"
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.launch.config import TileConfig, default_config
from sparse_compile.patterns import parse
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

PATTERNS = [
    "dense",
    "causal",
    "causal & sliding(1024)",
    "local(1024)",
    "block(512)",
    "axial(128)",
    "causal & (sink(4) | sliding(1024))",
    "global(16) | local(512)",
    "causal & strided(64)",
]


def mask_mod_for(text: str) -> Callable:
    """FlexAttention mask_mod with exactly the pattern's semantics (Lq == Lk here)."""
    mods = {
        "dense": lambda b, h, q, k: q >= 0,
        "causal": lambda b, h, q, k: k <= q,
        "causal & sliding(1024)": lambda b, h, q, k: (k <= q) & (q - k < 1024),
        "causal & sliding(4096)": lambda b, h, q, k: (k <= q) & (q - k < 4096),
        "local(1024)": lambda b, h, q, k: (q - k <= 512) & (k - q <= 512),
        "block(512)": lambda b, h, q, k: q // 512 == k // 512,
        "axial(128)": lambda b, h, q, k: (q // 128 == k // 128) | (q % 128 == k % 128),
        "causal & (sink(4) | sliding(1024))": lambda b, h, q, k: (k <= q)
        & ((k < 4) | (q - k < 1024)),
        "global(16) | local(512)": lambda b, h, q, k: (k < 16) | (q < 16)
        | ((q - k <= 256) & (k - q <= 256)),
        "causal & strided(64)": lambda b, h, q, k: (k <= q) & ((q - k) % 64 == 0),
        # the Sparse Transformer's pattern (codegen/routes/strided_union.py's route)
        "causal & (sliding(1024) | strided(128))": lambda b, h, q, k: (k <= q)
        & ((q - k < 1024) | ((q - k) % 128 == 0)),
    }
    return mods[text]


def check_mask_mod(text: str, n: int = 700) -> None:
    """The mask_mod agrees with the pattern's numeric truth on an n x n grid."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    ours = parse(text).evaluate(q, k)
    theirs = mask_mod_for(text)(0, 0, q, k).expand(n, n)
    assert torch.equal(ours, theirs), f"mask_mod for {text!r} disagrees with the pattern"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fn: Callable, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=rep // 4, rep=rep, return_mode="median")


def first_call(fn: Callable) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


# Tile options per kernel: (m, n, warps, stages, tma, merged); m x n = query x key tile (the
# dK/dV pass: m queries per step, n keys per program). The first option is the error reference.
SWEEP = {
    "fwd": [(64, 64, 4, 3, True, False), (64, 64, 4, 3, True, True), (64, 64, 4, 2, True, True),
            (128, 64, 8, 3, True, True), (64, 64, 4, 3, False, True),
            (128, 128, 8, 3, True, True), (64, 128, 4, 3, True, True)],
    "dq": [(64, 32, 4, 3, True, False), (64, 32, 4, 3, True, True), (64, 64, 4, 3, True, True),
           (128, 64, 8, 3, False, True), (64, 32, 4, 3, False, True)],
    "kv": [(32, 64, 4, 3, True, False), (32, 64, 4, 3, True, True), (64, 64, 4, 3, True, True),
           (64, 128, 8, 3, False, True), (32, 64, 4, 2, True, True)],
}
# --sweep-set merge: each kernel with and without the merged loop (for table routes: one loop
# over the PARTIAL and FULL block lists, predicate under a runtime branch).
SWEEP_MERGE = {
    "fwd": [(64, 64, 4, 3, True, False), (64, 64, 4, 3, True, True)],
    "dq": [(64, 32, 4, 3, True, False), (64, 32, 4, 3, True, True)],
    "kv": [(32, 64, 4, 3, True, False), (32, 64, 4, 3, True, True)],
}
# --sweep-set wide: forward tiles with more query rows per program (half the K/V tile traffic
# per kept entry), and deeper pipelines.
SWEEP_WIDE = {
    "fwd": [(64, 64, 4, 3, True, True), (128, 32, 8, 3, True, True),
            (128, 64, 8, 2, True, True), (64, 64, 4, 4, True, True),
            (64, 32, 4, 4, True, True), (128, 32, 8, 4, True, True)],
    "dq": [(64, 32, 4, 3, True, True), (64, 32, 4, 4, True, True), (128, 32, 8, 3, True, True)],
    "kv": [(32, 64, 4, 3, True, True), (32, 64, 4, 4, True, True), (16, 64, 4, 3, True, True)],
}
# --sweep-set d64: head dim 64 (its defaults predate TMA loads and merged loops).
SWEEP_D64 = {
    "fwd": [(64, 64, 4, 3, False, False), (64, 64, 4, 3, True, False),
            (64, 64, 4, 3, True, True), (128, 64, 8, 3, True, True), (128, 64, 4, 3, True, True)],
    "dq": [(64, 64, 4, 3, False, False), (64, 64, 4, 3, True, True), (64, 32, 4, 3, True, True),
           (128, 64, 8, 3, True, True)],
    "kv": [(64, 64, 4, 3, False, False), (64, 64, 4, 3, True, True), (32, 64, 4, 3, True, True),
           (64, 128, 8, 3, True, True)],
}
SWEEP_SETS = {"default": SWEEP, "merge": SWEEP_MERGE, "wide": SWEEP_WIDE, "d64": SWEEP_D64}
# --tune: the few options that decide between the candidate defaults (before the grid).
TUNE = {name: opts[:3] for name, opts in SWEEP.items()}


def with_option(cfg: TileConfig, kernel: str, opt: tuple) -> TileConfig:
    m, n, w, s, tma, merged = opt
    return replace(cfg, **{f"{kernel}_m": m, f"{kernel}_n": n, f"{kernel}_warps": w,
                           f"{kernel}_stages": s, f"{kernel}_tma": tma,
                           f"{kernel}_merged": merged})


def time_kernels(text: str, length: int, d: int, heads: int, base: TileConfig, options: dict,
                 rep: int, deadline: float, emit: Callable[[str], None]) -> TileConfig:
    """Time the forward, dQ and dK/dV kernels alone for each option (B=1, bf16) and return
    ``base`` with each kernel's fastest option; outputs are checked against the first option."""
    from sparse_compile.codegen.attention import visit_plan
    from sparse_compile.codegen.tl.backward_delta import launch_delta
    from sparse_compile.codegen.tl.backward_dkdv import launch_dkdv
    from sparse_compile.codegen.tl.backward_dq import launch_dq
    from sparse_compile.codegen.tl.forward import launch_forward
    from sparse_compile.codegen.tl.module import kernel_module
    from sparse_compile.codegen.tl.predicate import pattern_heads

    dev = torch.device("cuda")
    q, k, v, do = (torch.randn(1, heads, length, d, device=dev, dtype=torch.bfloat16)
                   for _ in range(4))
    scale = 1 / math.sqrt(d)
    pattern = parse(text)
    module, nph = kernel_module(pattern), pattern_heads(pattern)
    flops = 4 * heads * d * pattern.layout(length, length, 128, 128).density * length ** 2
    label = text.replace("|", "\\|")
    o, lse = kernels.forward(q, k, v, text, scale, cfg=base)
    delta = launch_delta(o, do)
    t = bench(partial(launch_delta, o, do), rep)
    emit(f"| {label} | Δ kernel alone (one-pass form only; the dQ pass computes Δ) | - | "
         f"{t:.3f} | - | - |")
    dq_visit = visit_plan(text, length, length, base.dq_m, base.dq_n, dev)
    dq_args = (module, q, k, v, None, do, lse, delta, None, dq_visit, nph, scale, 0.0, 0, base)
    t_read = bench(partial(launch_dq, *dq_args), rep)
    t_own = bench(partial(launch_dq, *dq_args, 0.0, o), rep)
    emit(f"| {label} | dQ pass reading Δ / computing Δ itself | {base.dq_m}x{base.dq_n} | "
         f"{t_read:.3f} / {t_own:.3f} | - | - |")
    best = base
    for kernel, work in (("fwd", 1.0), ("dq", 1.0), ("kv", 1.5)):
        ref, best_t = None, float("inf")
        for opt in options[kernel]:
            if time.perf_counter() > deadline:
                return best
            cfg = with_option(base, kernel, opt)
            m, n = opt[0], opt[1]
            if kernel == "fwd":
                visit = visit_plan(text, length, length, m, n, dev)
                fn = partial(launch_forward, module, q, k, v, None, visit, nph, scale, 0.0, 0,
                             cfg)
            elif kernel == "dq":
                visit = visit_plan(text, length, length, m, n, dev)
                fn = partial(launch_dq, module, q, k, v, None, do, lse, delta, None, visit, nph,
                             scale, 0.0, 0, cfg, 0.0, o)
            else:
                visit = visit_plan(text, length, length, m, n, dev, transposed=True)
                fn = partial(launch_dkdv, module, q, k, v, None, do, lse, delta, visit, nph,
                             scale, 0.0, 0, cfg)
            name = (f"{m}x{n} w{opt[2]} s{opt[3]}{' tma' if opt[4] else ''}"
                    f"{' merged' if opt[5] else ''}")
            try:
                out = torch.cat([t.flatten() for t in fn()])
                t = bench(fn, rep)
            except Exception as e:  # resource limits: this tile does not fit
                emit(f"| {label} | {kernel} | {name} | failed {type(e).__name__} | | |")
                continue
            ref = out if ref is None else ref
            emit(f"| {label} | {kernel} | {name} | {t:.3f} | {work * flops / t / 1e9:.0f} | "
                 f"{rel(out, ref):.1e} |")
            if t < best_t:
                best_t = t
                best = with_option(best, kernel, opt)
    return best


def sweep_header(title: str, length: int, d: int, heads: int) -> list[str]:
    return [f"# {title} on {torch.cuda.get_device_name()}", "",
            f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- B=1, H={heads}, L={length}, D={d}, bf16; each kernel alone, median ms of "
            "do_bench; TF/s on kept entries (dK/dV counted 1.5x the forward); err = relative "
            "error vs the kernel's first option", "",
            "| pattern | kernel | tiles (m x n, warps, stages) | ms | TF/s | err |",
            "|---|---|---|---|---|---|"]


def sweep(args) -> None:
    """--sweep: every option of SWEEP on each pattern, plus cuDNN SDPA as a drift anchor."""
    t_start = time.perf_counter()
    d, length, h = int(args.dims.split(",")[-1]), int(args.lengths.split(",")[0]), args.heads
    lines = sweep_header("Tile sweep", length, d, h)
    out = Path(args.out) if args.out else Path("sweep.md")

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        out.write_text("\n".join(lines) + "\n")

    q, k, v = (torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    for name, causal in (("cudnn dense", False), ("cudnn causal", True)):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
            t = bench(partial(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                              is_causal=causal), args.rep)
        flops = 4 * h * d * length * length * (0.5 if causal else 1.0)
        emit(f"| {name} (SDPA anchor) | fwd | - | {t:.3f} | {flops / t / 1e9:.0f} | - |")
    base = default_config(torch.device("cuda"), d, torch.bfloat16)
    for text in [p.strip() for p in args.patterns.split(";") if p.strip()]:
        time_kernels(text, length, d, h, base, SWEEP_SETS[args.sweep_set], args.rep,
                     t_start + args.deadline, emit)


# --bwd-sweep: one-pass backward options (kv_m, kv_n, warps, stages, bwd_fused); bwd_fused 1 =
# pointer atomics into the float32 dQ buffer, 2 = TMA reduce-add of each dQ tile.
# Most promising first: a pattern's share of the deadline may cut the last ones.
BWD_SWEEP = [(64, 128, 8, 3, 1), (32, 64, 4, 3, 1), (64, 64, 4, 3, 1), (128, 64, 8, 3, 1),
             (64, 128, 8, 3, 2), (64, 64, 8, 3, 1), (64, 128, 8, 2, 1), (32, 64, 4, 2, 1),
             (32, 64, 4, 3, 2)]
BWD_PATTERNS = ["block(512)", "causal", "causal & sliding(1024)", "local(1024)",
                "causal & (sink(4) | sliding(1024))", "global(16) | local(512)"]


def backward_problem(text: str, length: int, d: int, h: int, base: TileConfig, rep: int):
    """Random bf16 inputs [1, h, length, d], the forward at the pattern's selected tiles, and
    the two-pass backward's gradients and median time: what the one-pass diagnostics compare
    against. Returns (q, k, v, do, o, lse, scale, two-pass config, (dq, dk, dv), ms)."""
    q, k, v, do = (torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    scale = 1 / math.sqrt(d)
    two = kernels.select_config(text, q, length, base=base)
    o, lse = kernels.forward(q, k, v, text, scale, cfg=two)
    fn = partial(kernels.backward, do, q, k, v, o, lse, text, scale, cfg=two)
    return q, k, v, do, o, lse, scale, two, fn()[:3], bench(fn, rep)


def one_pass_option(base: TileConfig, m: int, n: int, warps: int, stages: int,
                    mode: int) -> tuple[TileConfig, str]:
    """``base`` with one-pass dK/dV tiles (m queries x n keys) and its table label."""
    cfg = replace(base, kv_m=m, kv_n=n, kv_warps=warps, kv_stages=stages, bwd_fused=mode)
    return cfg, f"{m}x{n} w{warps} s{stages}{' tma-reduce' if mode == 2 else ''}"


def time_one_pass(cfg: TileConfig, text: str, problem: tuple, rep: int) -> tuple[float, float]:
    """(ms, max relative error of dq/dk/dv vs the two-pass gradients) of the whole backward
    with one-pass tiles ``cfg``; ``problem`` = (q, k, v, do, o, lse, scale, ref) from
    ``backward_problem``. Raises where the tiles do not fit."""
    q, k, v, do, o, lse, scale, ref = problem
    fn = partial(kernels.backward, do, q, k, v, o, lse, text, scale, cfg=cfg)
    got = fn()[:3]
    return bench(fn, rep), max(rel(a, b) for a, b in zip(got, ref, strict=True))


def bwd_sweep(args) -> None:
    """--bwd-sweep: whole backward (Δ + passes + epilogue) of the two-pass form (the current
    selection, long-row tiles included) against the one-pass form with atomic dQ per option;
    gradients of every option checked against the two-pass ones. Kernels only (no Flex)."""
    t_start = time.perf_counter()
    d, length, h = int(args.dims.split(",")[-1]), int(args.lengths.split(",")[0]), args.heads
    out_path = Path(args.out) if args.out else Path("bwd_sweep.md")
    lines = [f"# One-pass backward sweep on {torch.cuda.get_device_name()}", "",
             f"- torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- B=1, H={h}, L={length}, D={d}, bf16; whole backward (codegen.attention."
             "backward: Δ, passes, dQ epilogue), median ms of do_bench; TF/s on kept entries "
             "counted 2.5x the forward's work; err = max relative error of dq/dk/dv vs the "
             "two-pass backward", "",
             "| pattern | form | kv tiles (m x n, warps, stages) | ms | TF/s | x two-pass | err |",
             "|---|---|---|---|---|---|---|"]

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        out_path.write_text("\n".join(lines) + "\n")

    dev = torch.device("cuda")
    base = default_config(dev, d, torch.bfloat16)
    buf = torch.empty(1, h, length, d, device=dev, dtype=torch.float32)
    cast = torch.empty(1, h, length, d, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: (buf.zero_(), torch.mul(buf, 0.5, out=cast)), args.rep)
    emit(f"| (any) | one-pass dQ buffer: zero + scale-and-cast epilogue | - | {t:.3f} | | | |")
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    for idx, text in enumerate(patterns):
        # Each pattern gets an equal share of the time left.
        now = time.perf_counter()
        stop = now + (t_start + args.deadline - now) / (len(patterns) - idx)
        label = text.replace("|", "\\|")
        kept = parse(text).layout(length, length, 128, 128).density * length ** 2
        flops = 2.5 * 4 * h * d * kept
        q, k, v, do, o, lse, scale, two, ref, t_two = backward_problem(
            text, length, d, h, base, args.rep)
        emit(f"| {label} | two-pass | dq {two.dq_m}x{two.dq_n} w{two.dq_warps}, kv {two.kv_m}x"
             f"{two.kv_n} w{two.kv_warps} s{two.kv_stages} | {t_two:.3f} | "
             f"{flops / t_two / 1e9:.0f} | 1.00 | - |")
        for m, n, w, st, mode in BWD_SWEEP:
            if time.perf_counter() > stop:
                emit(f"| {label} | deadline: later options not run | | | | | |")
                break
            cfg, name = one_pass_option(base, m, n, w, st, mode)
            try:
                t, err = time_one_pass(cfg, text, (q, k, v, do, o, lse, scale, ref), args.rep)
            except Exception as e:  # resource limits or an unsupported descriptor op
                emit(f"| {label} | one-pass | {name} | failed {type(e).__name__}: "
                     f"{str(e)[:60].replace('|', '/')} | | | |")
                continue
            emit(f"| {label} | one-pass | {name} | {t:.3f} | {flops / t / 1e9:.0f} | "
                 f"{t_two / t:.2f} | {err:.1e} |")
        del q, k, v, do, o, lse, ref


# --bwd-parts: wider key tiles (fewer atomics per matmul) and the parts of one backward.
BWD_WIDE = [(32, 64, 4, 3, 1), (32, 128, 8, 3, 1), (32, 128, 8, 3, 2), (32, 128, 4, 3, 1),
            (16, 128, 4, 3, 1), (64, 128, 8, 3, 2)]
BWD_PARTS_PATTERNS = ["causal & sliding(1024)", "block(512)", "global(16) | local(512)",
                      "causal"]
_ATOMIC = 'tl.atomic_add(dq_ptrs, dq_part, mask=dq_mask, sem="relaxed")'


def no_traffic_module(text: str) -> object:
    """The pattern's kernel module with the dQ atomics predicated off at run time (rows
    q_idx < 0): same instructions and registers, no atomic memory traffic (diagnostic only)."""
    import importlib.util
    import tempfile

    from sparse_compile.codegen.tl.module import module_source

    src = module_source(parse(text))
    assert _ATOMIC in src
    off = _ATOMIC.replace("mask=dq_mask", "mask=dq_mask & (q_idx < 0)[:, None]")
    src = src.replace(_ATOMIC, off)
    path = Path(tempfile.mkdtemp()) / "sc_no_traffic.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"sc_no_traffic_{abs(hash(text))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def bwd_parts(args) -> None:
    """--bwd-parts: whole backward for BWD_WIDE options, then each kernel alone: the two-pass
    dQ and dK/dV passes, the one-pass dK/dV kernel with and without its atomic traffic."""
    from sparse_compile.codegen.attention import visit_plan
    from sparse_compile.codegen.tl.backward_delta import launch_delta
    from sparse_compile.codegen.tl.backward_dkdv import launch_dkdv
    from sparse_compile.codegen.tl.backward_dq import launch_dq
    from sparse_compile.codegen.tl.module import kernel_module
    from sparse_compile.codegen.tl.predicate import pattern_heads

    t_start = time.perf_counter()
    d, length, h = int(args.dims.split(",")[-1]), int(args.lengths.split(",")[0]), args.heads
    out_path = Path(args.out) if args.out else Path("bwd_parts.md")
    lines = [f"# One-pass backward: wide tiles and parts, {torch.cuda.get_device_name()}", "",
             f"- torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- B=1, H={h}, L={length}, D={d}, bf16; median ms of do_bench", "",
             "| pattern | what | tiles | ms | x two-pass | err |", "|---|---|---|---|---|---|"]

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        out_path.write_text("\n".join(lines) + "\n")

    dev = torch.device("cuda")
    base = default_config(dev, d, torch.bfloat16)
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    for idx, text in enumerate(patterns):
        now = time.perf_counter()
        stop = now + (t_start + args.deadline - now) / (len(patterns) - idx)
        label = text.replace("|", "\\|")
        q, k, v, do, o, lse, scale, two, ref, t_two = backward_problem(
            text, length, d, h, base, args.rep)
        emit(f"| {label} | two-pass backward | current selection | {t_two:.3f} | 1.00 | - |")
        module, nph = kernel_module(parse(text)), pattern_heads(parse(text))
        delta = launch_delta(o, do)
        dq_visit = visit_plan(text, length, length, two.dq_m, two.dq_n, dev)
        kv_visit = visit_plan(text, length, length, two.kv_m, two.kv_n, dev, transposed=True)
        t = bench(partial(launch_dq, module, q, k, v, None, do, lse, delta, None, dq_visit, nph,
                          scale, 0.0, 0, two), args.rep)
        emit(f"| {label} | two-pass: dQ kernel | {two.dq_m}x{two.dq_n} | {t:.3f} | | |")
        t = bench(partial(launch_dkdv, module, q, k, v, None, do, lse, delta, kv_visit, nph,
                          scale, 0.0, 0, two), args.rep)
        emit(f"| {label} | two-pass: dK/dV kernel | {two.kv_m}x{two.kv_n} | {t:.3f} | | |")
        try:
            quiet = no_traffic_module(text)
        except Exception as e:
            emit(f"| {label} | no-traffic module failed: {type(e).__name__} | | | | |")
            quiet = None
        acc = torch.zeros(1, h, length, d, device=dev, dtype=torch.float32)
        for m, n, w, st, mode in BWD_WIDE:
            if time.perf_counter() > stop:
                emit(f"| {label} | deadline: later options not run | | | | |")
                break
            cfg, name = one_pass_option(base, m, n, w, st, mode)
            try:
                t, err = time_one_pass(cfg, text, (q, k, v, do, o, lse, scale, ref), args.rep)
                emit(f"| {label} | one-pass backward | {name} | {t:.3f} | {t_two / t:.2f} | "
                     f"{err:.1e} |")
                visit = visit_plan(text, length, length, m, n, dev, transposed=True)
                t = bench(partial(launch_dkdv, module, q, k, v, None, do, lse, delta, visit, nph,
                                  scale, 0.0, 0, cfg, 0.0, acc), args.rep)
                emit(f"| {label} | one-pass: dK/dV + dQ kernel | {name} | {t:.3f} | | |")
                if quiet is not None and mode == 1:
                    t = bench(partial(launch_dkdv, quiet, q, k, v, None, do, lse, delta, visit,
                                      nph, scale, 0.0, 0, cfg, 0.0, acc), args.rep)
                    emit(f"| {label} | same, atomics predicated off | {name} | {t:.3f} | | |")
            except Exception as e:  # resource limits or an unsupported descriptor op
                emit(f"| {label} | one-pass | {name} | failed {type(e).__name__}: "
                     f"{str(e)[:60].replace('|', '/')} | | |")
        del q, k, v, do, o, lse, ref, acc


def run_case(text, b, h, length, d, cfg, rep, do_bwd, sdpa_cache):
    dev = "cuda"
    dt = torch.bfloat16
    q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dt, requires_grad=True)
               for _ in range(3))
    do = torch.randn(b, h, length, d, device=dev, dtype=dt)
    scale = 1 / math.sqrt(d)
    layout = parse(text).layout(length, length, 128, 128)
    kept = layout.density * length * length
    base, cfg = cfg, kernels.select_config(text, q, length, base=cfg)
    flops_f = 4 * b * h * d * kept
    row = {"pattern": text + (" *" if cfg != base else ""), "D": d, "L": length, "B": b,
           "H": h, "density": layout.density}

    qd, kd, vd = q.detach(), k.detach(), v.detach()

    def ours_fwd():
        return kernels.forward(qd, kd, vd, text, scale, cfg=cfg)

    def ours_bwd(o, lse):
        return kernels.backward(do, qd, kd, vd, o, lse, text, scale, cfg=cfg)

    def ours_both():
        o, lse = ours_fwd()
        return ours_bwd(o, lse)

    row["ours_first_ms"] = first_call(ours_both if do_bwd else ours_fwd)

    mask_mod = mask_mod_for(text)
    flex = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=dev,
                                   _compile=True)

    def flex_fwd():
        return flex(q, k, v, block_mask=block_mask, scale=scale)

    def flex_both():
        return torch.autograd.grad(flex_fwd(), (q, k, v), do)

    (flex_both if do_bwd else flex_fwd)()
    torch.cuda.synchronize()
    row["flex_first_ms"] = (time.perf_counter() - t0) * 1e3

    # Correctness on the timed inputs: ours vs FlexAttention (both bf16, fp32 accumulation).
    o, lse = ours_fwd()
    with torch.no_grad():
        fo = flex_fwd()
    row["err_fwd"] = rel(o, fo)
    if do_bwd:
        dq, dk, dv, _ = ours_bwd(o, lse)
        fq, fk, fv = flex_both()
        row["err_bwd"] = max(rel(dq, fq), rel(dk, fk), rel(dv, fv))

    row["ours_fwd"] = bench(ours_fwd, rep)
    with torch.no_grad():
        row["flex_fwd"] = bench(flex_fwd, rep)
    if do_bwd:
        row["ours_fb"] = bench(ours_both, rep)
        row["flex_fb"] = bench(flex_both, rep)
    row["tflops_fwd"] = flops_f / row["ours_fwd"] / 1e9
    if do_bwd:
        bwd = row["ours_fb"] - row["ours_fwd"]
        row["tflops_bwd"] = 2.5 * flops_f / bwd / 1e9
        row["flex_tflops_bwd"] = 2.5 * flops_f / (row["flex_fb"] - row["flex_fwd"]) / 1e9

    causal = text == "causal"
    key = (b, h, length, d, causal)
    if key not in sdpa_cache:
        sdpa_cache[key] = sdpa_times(q, k, v, do, causal, rep, do_bwd)
    row.update(sdpa_cache[key])
    return row


def sdpa_times(q, k, v, do, causal, rep, do_bwd):
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                def fwd():
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal)

                def both():
                    return torch.autograd.grad(fwd(), (q, k, v), do)

                with torch.no_grad():
                    out[f"{name}_fwd"] = bench(fwd, rep)
                if do_bwd:
                    out[f"{name}_fb"] = bench(both, rep)
        except RuntimeError as e:
            print(f"  sdpa {name}: unavailable ({str(e)[:80]})")
    return out


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(rows, do_bwd):
    head = ["D", "L", "pattern", "dens%", "ours fwd ms", "flex fwd ms", "fwd x", "TF/s fwd",
            "flash ms", "cudnn ms"]
    if do_bwd:
        head += ["ours f+b ms", "flex f+b ms", "bwd x", "TF/s bwd", "flex TF/s bwd",
                 "flash f+b", "cudnn f+b"]
    head += ["err fwd", "err bwd", "1st ours ms", "1st flex ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["D"], r["L"], r["pattern"].replace("|", "\\|"), fmt(100 * r["density"], ".2f"),
                 fmt(r["ours_fwd"]), fmt(r["flex_fwd"]), fmt(r["flex_fwd"] / r["ours_fwd"], ".2f"),
                 fmt(r["tflops_fwd"], ".0f"), fmt(r.get("flash_fwd")), fmt(r.get("cudnn_fwd"))]
        if do_bwd:
            ob = r["ours_fb"] - r["ours_fwd"]
            fb = r["flex_fb"] - r["flex_fwd"]
            cells += [fmt(r["ours_fb"]), fmt(r["flex_fb"]), fmt(fb / ob, ".2f"),
                      fmt(r["tflops_bwd"], ".0f"), fmt(r["flex_tflops_bwd"], ".0f"),
                      fmt(r.get("flash_fb")), fmt(r.get("cudnn_fb"))]
        cells += [fmt(r["err_fwd"], ".1e"), fmt(r.get("err_bwd"), ".1e"),
                  fmt(r["ours_first_ms"], ".0f"), fmt(r["flex_first_ms"], ".0f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated DSL texts")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=65536,
                    help="B = max(1, tokens // L): 64k tokens per call keep forward+backward "
                    "GPU-bound (bench/NOTES.md, version 7)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep in ms")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--tune", action="store_true", help="pick tiles per head dim first")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="time each kernel alone per tile option (first length, last dim)")
    ap.add_argument("--sweep-set", default="default", choices=sorted(SWEEP_SETS),
                    help="tile options of --sweep (SWEEP, SWEEP_MERGE, SWEEP_WIDE, SWEEP_D64)")
    ap.add_argument("--bwd-sweep", action="store_true",
                    help="one-pass vs two-pass backward per kv tile option (first length, "
                    "last dim; default patterns: BWD_PATTERNS)")
    ap.add_argument("--bwd-parts", action="store_true",
                    help="one-pass backward with wider key tiles, and each kernel alone "
                    "(default patterns: BWD_PARTS_PATTERNS)")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="stop starting new options (--sweep) or cases after this many seconds")
    ap.add_argument("--dense-up-to", type=int, default=1 << 30,
                    help="skip the dense pattern above this length (its timings are long)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.sweep:
        sweep(args)
        return
    if args.bwd_sweep:
        if args.patterns == ";".join(PATTERNS):
            args.patterns = ";".join(BWD_PATTERNS)
        bwd_sweep(args)
        return
    if args.bwd_parts:
        if args.patterns == ";".join(PATTERNS):
            args.patterns = ";".join(BWD_PARTS_PATTERNS)
        bwd_parts(args)
        return
    torch._dynamo.config.cache_size_limit = 1000
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1000
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 10000
    do_bwd = not args.no_bwd
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    for p in patterns:
        check_mask_mod(p)
    gpu = torch.cuda.get_device_name()
    rows, configs, sdpa_cache, tune_lines = [], {}, {}, []
    for d in (int(x) for x in args.dims.split(",")):
        cfg = default_config(torch.device("cuda"), d, torch.bfloat16)
        if args.tune:
            t_end = time.perf_counter() + 120
            cfg = time_kernels("causal & sliding(1024)", 16384, d, args.heads, cfg, TUNE,
                               args.rep, t_end, tune_lines.append)
            print("\n".join(tune_lines), flush=True)
        configs[d] = cfg
        for length in (int(x) for x in args.lengths.split(",")):
            b = max(1, args.tokens // length)
            for p in patterns:
                if p == "dense" and length > args.dense_up_to:
                    continue
                if time.perf_counter() - t_start > args.deadline:
                    print(f"deadline: skipping D={d} L={length} {p}", flush=True)
                    continue
                r = run_case(p, b, args.heads, length, d, cfg, args.rep, do_bwd, sdpa_cache)
                rows.append(r)
                print(f"D={d} L={length} {p}: ours {r['ours_fwd']:.3f} flex {r['flex_fwd']:.3f}"
                      f" fb {r.get('ours_fb', 0):.3f}/{r.get('flex_fb', 0):.3f}"
                      f" err {r['err_fwd']:.1e}/{r.get('err_bwd', 0):.1e}", flush=True)
                write_results(args, gpu, configs, rows, do_bwd, tune_lines)
    print(write_results(args, gpu, configs, rows, do_bwd, tune_lines))


def write_results(args, gpu, configs, rows, do_bwd, tune_lines) -> str:
    """Write the results file (after every case, so a cut-off run keeps what it measured)."""
    tab = table(rows, do_bwd)
    cfg_lines = "\n".join(f"- D={d}: `{c}`" for d, c in configs.items())
    text = (
        f"# Attention benchmark on {gpu}\n\n"
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}\n"
        f"- torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}\n"
        f"- command: `python {' '.join(sys.argv)}`\n"
        f"- bf16, H={args.heads}, B=max(1, {args.tokens}//L), Lq=Lk=L; times are medians of "
        "triton.testing.do_bench in ms; `fwd x`/`bwd x` = FlexAttention time / ours (backward = "
        "f+b − fwd); TF/s on kept entries (fwd 4·B·H·D·kept, bwd 2.5x that); flash/cudnn are "
        "dense SDPA (is_causal for `causal`); err = relative error vs FlexAttention on the timed "
        "inputs; 1st = first call (layout + codegen + compile, or block mask + compile)\n"
        f"- tiles (base; `*` after the pattern: the backward's long-row tiles, "
        f"codegen/launch/config.py LONG_ROWS):\n{cfg_lines}\n\n{tab}\n"
    )
    if tune_lines:
        text += ("\n## Tuning (--tune, each kernel alone on causal & sliding(1024), L=16384)\n\n"
                 "| pattern | kernel | tiles | ms | TF/s | err |\n|---|---|---|---|---|---|\n"
                 + "\n".join(tune_lines) + "\n")
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / (gpu.replace(" ", "_") + ".md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return tab


if __name__ == "__main__":
    main()
