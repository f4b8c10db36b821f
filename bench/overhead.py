"""Benchmark: the public ``sparse_compile.attention`` call against its kernels alone.

The difference is host time: pattern lookup, configuration, autograd bookkeeping and launch
arguments, paid on every eager call. Two measures per pattern: (1) GPU medians of
``triton.testing.do_bench`` for the public call and for the launches alone (forward, and
forward+backward with inputs requiring grad); (2) host microseconds per call, from a loop of
back-to-back calls at a tiny length (the GPU idles, so the loop runs at the host's pace), with
the custom op (what graphs call) beside the eager path. Prints one table and writes it with the
conditions to bench/results/overhead-<gpu>.md (or --out).

    python bench/overhead.py
    python bench/overhead.py --length 4096 --patterns "causal & sliding(1024)"
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from sparse_compile.codegen import attention as kernels

from sparse_compile.functional import attention
from sparse_compile.op import attention_op

PATTERNS = ["causal & sliding(1024)", "local(1024)", "block(512)", "global(16) | local(512)",
            "causal & (sink(4) | sliding(1024))", "causal"]


def bench(fn, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def host_us(fn, calls: int = 300) -> float:
    """Microseconds per call of ``fn`` issued back to back (one sync at the end)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def inputs(length: int, heads: int, dim: int, grad: bool):
    q, k, v, do = (torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, do


def case(text: str, args) -> dict:
    """GPU times (public vs kernels) at --length and host µs per call at --host-length."""
    scale = 1 / math.sqrt(args.dim)
    q, k, v, do = inputs(args.length, args.heads, args.dim, True)
    cfg = kernels.select_config(text, q, args.length)

    def public_fwd():
        with torch.no_grad():
            return attention(q, k, v, text)

    def public_both():
        return torch.autograd.grad(attention(q, k, v, text), (q, k, v), do)

    def kernels_fwd():
        return kernels.forward(q, k, v, text, scale, cfg=cfg)

    def kernels_both():
        o, lse = kernels.forward(q, k, v, text, scale, cfg=cfg)
        return kernels.backward(do, q, k, v, o, lse, text, scale, cfg=cfg)

    row = {"pattern": text}
    row["kernels fwd"], row["public fwd"] = bench(kernels_fwd, args.rep), bench(public_fwd,
                                                                                 args.rep)
    row["kernels f+b"], row["public f+b"] = bench(kernels_both, args.rep), bench(public_both,
                                                                                  args.rep)
    err = (public_fwd().float() - kernels_fwd()[0].float()).abs().max().item()
    row["max |public - kernels|"] = err

    qs, ks, vs, dos = inputs(args.host_length, args.heads, args.dim, True)

    def op_call():
        return attention_op(qs, ks, vs, None, text, scale, 0.0, None, 0.0)[0]

    row["host us eager fwd"] = host_us(lambda: attention(qs, ks, vs, text))
    row["host us op fwd"] = host_us(op_call)
    row["host us eager f+b"] = host_us(
        lambda: torch.autograd.grad(attention(qs, ks, vs, text), (qs, ks, vs), dos))
    row["host us op f+b"] = host_us(lambda: torch.autograd.grad(op_call(), (qs, ks, vs), dos))
    return row


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r[c] if isinstance(r[c], str) else
                 (f"{r[c]:.1e}" if c.startswith("max") else
                  f"{r[c]:.0f}" if c.startswith("host") else f"{r[c]:.3f}") for c in cols]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--host-length", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep in ms")
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated DSL texts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"overhead-{gpu.replace(' ', '_')}.md")
    for text in [p.strip() for p in args.patterns.split(";") if p.strip()]:
        rows.append(case(text, args))
        tab = table(rows)
        print(tab.splitlines()[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            f"# Public call vs kernels alone on {gpu}\n\n"
            f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}\n"
            f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}, CPU {platform.processor() or 'unknown'}\n"
            f"- command: `python {' '.join(sys.argv)}`\n"
            f"- bf16, B=1, H={args.heads}, D={args.dim}; GPU columns: median ms of do_bench at "
            f"L={args.length} (f+b = forward + backward, inputs requiring grad); host columns: "
            f"µs per call of back-to-back calls at L={args.host_length} (eager = "
            "`sparse_compile.attention`, op = `torch.ops.sparse_compile.attention`, what "
            "compiled graphs call)\n\n" + tab + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
