"""Check and time the public ``sparse_compile.attention`` with its default tiles, per head dim.

For each (head dim, pattern): bf16 inputs requiring grad, B=1, H heads, L tokens; output and
gradients of ``attention(q, k, v, pattern)`` against float32 SDPA with the pattern's dense
boolean mask on the first two heads (the same inputs), then forward and forward+backward
medians of ``triton.testing.do_bench``. Prints one table and writes it with the conditions to
bench/results/api-check-<gpu>.md (or --out).

    python bench/api_check.py --dims 64,128 --length 8192
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from sparse_compile.patterns import parse

from sparse_compile.functional import attention

PATTERNS = ["causal & sliding(1024)", "block(512)", "causal & (sink(4) | sliding(1024))",
            "global(16) | local(512)", "causal"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_case(text: str, d: int, length: int, heads: int, rep: int) -> dict:
    """Errors vs float32 SDPA on two heads, and public-call timings on all heads."""
    q, k, v, do = (torch.randn(1, heads, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attention(q, k, v, text)
    grads = torch.autograd.grad(out, (q, k, v), do)
    pos = torch.arange(length, device="cuda")
    mask = parse(text).evaluate(pos[:, None], pos[None, :])
    sub = [t[:, :2].detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*sub, attn_mask=mask)
    ref = torch.nan_to_num(ref)  # rows without keys: zeros, as ours
    ref_grads = torch.autograd.grad(ref, sub, do[:, :2].float())
    errs = [rel(out[:, :2], ref)] + [rel(g[:, :2], r) for g, r in zip(grads, ref_grads,
                                                                          strict=True)]

    def fwd():
        with torch.no_grad():
            return attention(q, k, v, text)

    def both():
        return torch.autograd.grad(attention(q, k, v, text), (q, k, v), do)

    bench = triton.testing.do_bench
    return {"pattern": text, "D": d, "fwd": bench(fwd, warmup=25, rep=rep),
            "fb": bench(both, warmup=25, rep=rep), "err_out": errs[0],
            "err_grad": max(errs[1:])}


ROUTES = ("residue_route", "strided_union_route")  # codegen.attention's pattern-reshaping routes


def general_route(text: str, d: int, length: int, heads: int, rep: int) -> dict:
    """The same case with the residue-class and strided-union routes switched off (every
    block of a strided or axial pattern visited through the layout), for an A/B in one
    process."""
    from sparse_compile.codegen import attention as kernels

    saved = {name: getattr(kernels, name) for name in ROUTES}
    for name in ROUTES:
        setattr(kernels, name, lambda *args: None)
    try:
        row = check_case(text, d, length, heads, rep)
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
    row["pattern"] = text + " (general route)"
    return row


def routed(text: str, length: int) -> bool:
    """Whether a route of ``ROUTES`` takes ``text`` at this length (no bias, no dropout)."""
    from sparse_compile.codegen import attention as kernels

    return any(getattr(kernels, name)(text, length, length, False, 0.0) is not None
               for name in ROUTES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated DSL texts")
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep in ms")
    ap.add_argument("--general-too", action="store_true",
                    help="also time patterns a route of ROUTES takes with the routes off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    rows = []
    for d in (int(x) for x in args.dims.split(",")):
        for text in patterns:
            r = check_case(text, d, args.length, args.heads, args.rep)
            rows.append(r)
            print(r, flush=True)
            if args.general_too and routed(text, args.length):
                rows.append(general_route(text, d, args.length, args.heads, args.rep))
                print(rows[-1], flush=True)
    lines = [f"# Public attention() check on {gpu}", "",
             f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- bf16, B=1, H={args.heads}, L={args.length}, default tiles; errors: relative "
             "(2-norm) vs float32 SDPA with the dense mask on the first two heads; times: "
             "median ms of do_bench through the public call", "",
             "| D | pattern | fwd ms | fwd+bwd ms | err out | err grads (max of q, k, v) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = r["pattern"].replace("|", "\\|")
        lines.append(f"| {r['D']} | {label} | {r['fwd']:.3f} | {r['fb']:.3f} | "
                     f"{r['err_out']:.1e} | {r['err_grad']:.1e} |")
    name = gpu.replace(" ", "_")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"api-check-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
