"""First-call time, each variant in its own fresh process: what a user waits for once.

``bench/models.py`` measures first calls inside one process, one variant after another; this
script starts one Python process per variant with empty Inductor and Triton caches (fresh
temporary directories), builds the Mistral-shaped model of ``bench/models.py``, pays the
process's one-time costs every variant shares (CUDA, cuBLAS, Inductor's compile workers:
``models.warm_process``), then times the first training step and the first inference (compile
included). In the ``sparse`` variants Triton's JIT hooks time the compilation of each of our
kernels, so the table splits the first call into our kernels' compilation and the rest
(tracing, the backend's pass, Inductor compiling the model, running). Our kernels compile in
the background while Inductor compiles the model (``codegen/precompile.py``), in helper
processes; ``sparse-threads`` compiles them on threads of the model's process instead
(``SPARSE_COMPILE_PRECOMPILE=threads``, where they contend with the main thread for the
interpreter lock), ``sparse-no-precompile`` not in the background at all
(``SPARSE_COMPILE_PRECOMPILE=0``), each kernel then compiling at its first launch.

    python bench/first_call.py --length 32768 --window 4096 --variants sparse flex \\
        --out bench/results/first-call-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("sparse", "sparse-threads", "sparse-no-precompile", "sparse-on-flex", "flex", "sdpa")
# the sparse variant with its background compilation on threads of the model's process instead
# of helper processes, or off
_PRECOMPILE = {"sparse-threads": "threads", "sparse-no-precompile": "0"}


def compile_timer() -> list[tuple[str, float]]:
    """Install Triton JIT hooks that time every kernel compiled in this process through a
    ``@triton.jit`` / ``@gluon.jit`` launch (ours; Inductor compiles its own elsewhere); returns
    the list they fill with (kernel name, seconds). Triton versions without the hooks leave it
    empty."""
    from triton import knobs

    compiled: list[tuple[str, float]] = []
    started: dict[Any, float] = {}
    runtime = knobs.runtime
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def on_compile(*a: Any, key: Any = None, fn: Any = None, **kw: Any) -> bool | None:
        started[id(fn.jit_function), str(key)] = time.perf_counter()
        return before(*a, key=key, fn=fn, **kw) if before else None

    def on_compiled(*a: Any, key: Any = None, fn: Any = None, **kw: Any) -> Any:
        start = started.pop((id(fn.jit_function), str(key)), None)
        if start is not None:
            compiled.append((fn.name, time.perf_counter() - start))
        return after(*a, key=key, fn=fn, **kw) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_compile, on_compiled
    return compiled


def compile_phases() -> dict[str, float]:
    """Seconds spent so far in each of torch.compile's timed phases (Dynamo's tracing, AOT
    autograd, the backend, Inductor's code generation...; ``torch._dynamo.utils``' metrics),
    summed over the graphs compiled; nested phases count in their parents too."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: float(sum(times)) for name, times in compilation_time_metrics.items()}


def precompile_wait_timer() -> list[float]:
    """Time our launches spend waiting for their background precompilation job
    (``precompile.finish``): a one-element list the wrapper adds to."""
    from sparse_compile.codegen import precompile

    waited = [0.0]
    finish = precompile.finish

    def timed_finish(key: Any) -> None:
        start = time.perf_counter()
        finish(key)
        waited[0] += time.perf_counter() - start

    precompile.finish = timed_finish
    return waited


def measure_one(variant: str, length: int, window: int, layers: int) -> dict[str, Any]:
    """In this (fresh) process: build, compile and make the first calls of one variant."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from models import build, train_and_infer, warm_process

    result: dict[str, Any] = {"variant": variant, "warm_process_s": warm_process()}
    compiled_kernels = compile_timer()
    pattern = f"causal & sliding({window})"
    impl = "flex_attention" if variant in ("flex", "sparse-on-flex") else "sdpa"
    model = build("mistral", layers, None if variant == "sdpa" else window, impl)
    if variant.startswith("sparse"):
        compiled = torch.compile(model, backend="sparse", options={"pattern": pattern})
    else:
        compiled = torch.compile(model)
    ids = torch.randint(0, 32000, (1, length), device="cuda")
    train, infer = train_and_infer(compiled, ids)

    waited = precompile_wait_timer()
    for mode, step in (("train", train), ("infer", infer)):
        torch.cuda.synchronize()
        before = len(compiled_kernels)
        phases_before = compile_phases()
        waited[0] = 0.0
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        result[mode] = time.perf_counter() - start
        result[mode + "_kernels"] = compiled_kernels[before:]
        result[mode + "_waited"] = waited[0]
        result[mode + "_phases"] = {name: s - phases_before.get(name, 0.0)
                                    for name, s in compile_phases().items()
                                    if s - phases_before.get(name, 0.0) >= 0.5}
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        result[mode + "_second"] = time.perf_counter() - start
    return result


def run_fresh(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure_one`` in a new process with empty cache directories."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{tmp}/triton",
                   TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor")
        if variant in _PRECOMPILE:
            env["SPARSE_COMPILE_PRECOMPILE"] = _PRECOMPILE[variant]
        cmd = [sys.executable, __file__, "--one", "sparse" if variant in _PRECOMPILE else variant,
               "--length", str(args.length), "--window", str(args.window),
               "--layers", str(args.layers)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        return {"variant": variant, "error": (done.stderr or done.stdout)[-400:]}
    return json.loads(lines[-1])


def row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['variant']} | error: {r['error'][-150:]!r} | | | | |"

    def ours(mode: str) -> str:
        kernels = r[mode + "_kernels"]
        if not kernels:
            return "-"
        waited = f"; launches waited {r[mode + '_waited']:.1f} s" if mode + "_waited" in r else ""
        return f"{sum(s for _, s in kernels):.1f} s ({len(kernels)}: " + ", ".join(
            f"{name} {s:.1f}" for name, s in kernels) + ")" + waited

    return (f"| {r['variant']} | {r['train']:.1f} | {ours('train')} | {r['infer']:.1f} | "
            f"{ours('infer')} | {r['train_second']:.2f} / {r['infer_second']:.2f} |")


def phases_line(r: dict[str, Any], mode: str) -> str:
    phases = sorted(r[mode + "_phases"].items(), key=lambda kv: -kv[1])[:8]
    return f"- {r['variant']} {mode}: " + ", ".join(f"{name} {s:.1f}" for name, s in phases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["sparse", "flex"])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.length, args.window, args.layers)))
        return
    import torch
    import transformers
    import triton

    results = []
    for v in args.variants:  # each row printed when its process ends: a time limit keeps them
        results.append(dict(run_fresh(v, args), variant=v))
        print(row(results[-1]), flush=True)
        for mode in ("train", "infer"):
            if results[-1].get(mode + "_phases"):
                print(phases_line(results[-1], mode), flush=True)
    lines = [
        f"# First call, each variant in a fresh process ({torch.cuda.get_device_name()})", "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, triton {triton.__version__}, transformers "
        f"{transformers.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- MistralModel, {args.layers} layers, hidden 2048, 16 / 4 heads, bf16, B = 1, "
        f"L = {args.length}, `causal & sliding({args.window})` (flex: `sliding_window="
        f"{args.window}`); empty Inductor and Triton caches; the process's shared one-time "
        "costs (CUDA, cuBLAS, Inductor's workers) paid before: "
        + ", ".join(f"{r['variant']} {r.get('warm_process_s', 0):.1f} s" for r in results),
        "- first call = compile included, seconds; ours = our kernels' compilation inside it "
        "(Triton's JIT hooks in the model's process: total, count, per kernel; on threads "
        "they overlap Inductor's work, so they are not all waited for; with the helper "
        "processes, the default, what the hooks time is the launch loading the helpers' "
        "binaries from Triton's cache) and how long the launches waited for their "
        "background job; then the second calls", "",
        "| variant | train first s | ours in it | infer first s | ours in it | second calls s "
        "(train / infer) |", "|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    lines += ["", "Where each first call went (torch.compile's timed phases of 0.5 s or more, "
              "seconds; nested phases count in their parents too):", ""]
    lines += [phases_line(r, mode) for r in results for mode in ("train", "infer")
              if r.get(mode + "_phases")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
