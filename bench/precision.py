"""float32 inputs: speed and error of the kernels' tl.dot precisions, same inputs, one process.

``TileConfig.precision`` picks three TF32 products ("tf32x3") for float32 by default and one
("tf32") where PyTorch allows TF32; this script times both against exact products ("ieee"),
forcing each in turn, through the public ``attention`` (``causal & sliding(1024)``) and
``dma_attention`` (keep=2048) calls. Errors: attention against float64 SDPA with the dense
mask (first two heads); DMA against ``dma_reference`` in float64 at L=1024, keep=256.

    python bench/precision.py --out bench/results/precision-<gpu>.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
from sparse_compile.codegen.launch.config import TileConfig

import sparse_compile
from sparse_compile.dynamic_mask.reference import dma_reference

PRECISIONS = ("ieee", "tf32x3", "tf32")
DEVICE = "cuda"
DEFAULT_RULE = TileConfig.precision


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def force_precision(name: str) -> None:
    """Every float32 tl.dot of the kernels at ``name`` (other dtypes as configured)."""
    TileConfig.precision = staticmethod(
        lambda dtype, head_dim, rule=DEFAULT_RULE: name if dtype == torch.float32
        else rule(dtype, head_dim))


def timed_pair(forward: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...],
               dout: torch.Tensor, rep: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms), medians of do_bench."""
    def both() -> None:
        for t in leaves:
            t.grad = None
        forward().backward(dout)
    return (triton.testing.do_bench(forward, rep=rep), triton.testing.do_bench(both, rep=rep))


def attention_rows(length: int, heads: int, d: int, rep: int) -> list[str]:
    text = "causal & sliding(1024)"
    q, k, v = (torch.randn(1, heads, length, d, device=DEVICE, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    idx = torch.arange(length, device=DEVICE)
    mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < 1024)
    q2, k2, v2 = (t[:, :2].detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    ref.backward(dout[:, :2].double())
    rows = []
    for name in PRECISIONS:
        force_precision(name)
        out = sparse_compile.attention(q, k, v, text)
        for t in (q, k, v):
            t.grad = None
        out.backward(dout)
        errs = [rel(out[:, :2], ref)] + [rel(t.grad[:, :2], r.grad)
                                         for t, r in ((q, q2), (k, k2), (v, v2))]
        t_f, t_fb = timed_pair(lambda: sparse_compile.attention(q, k, v, text), (q, k, v),
                               dout, rep)
        rows.append(f"| attention `{text}` | {name} | {t_f:.3f} | {t_fb:.3f} | "
                    + " ".join(f"{e:.1e}" for e in errs) + " |")
        print(rows[-1], flush=True)
    t_sdpa = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rep=rep)
    rows.append(f"| SDPA, same mask (default backend) | - | {t_sdpa:.3f} | - | - |")
    return rows


def dma_rows(length: int, heads: int, d: int, keep: int, rep: int) -> list[str]:
    q, k, v = (torch.randn(1, heads, length, d, device=DEVICE, requires_grad=True)
               for _ in range(3))
    delta = (torch.rand(1, heads, length, device=DEVICE) * 4).requires_grad_()
    dout = torch.randn_like(q)
    rows = []
    for name in PRECISIONS:
        force_precision(name)
        t_f, t_fb = timed_pair(lambda: sparse_compile.dma_attention(q, k, v, delta, keep),
                               (q, k, v, delta), dout, rep)
        small = [t[:, :2, :1024].detach().clone().requires_grad_() for t in (q, k, v, delta)]
        out = sparse_compile.dma_attention(*small, 256)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, small, grad)
        exact = [t.detach().double().requires_grad_() for t in small]
        ref = dma_reference(*exact, 256, True)
        want = torch.autograd.grad(ref, exact, grad.double())
        errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(got, want, strict=True)]
        rows.append(f"| dma_attention keep={keep} | {name} | {t_f:.3f} | {t_fb:.3f} | "
                    + " ".join(f"{e:.1e}" for e in errs) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--keep", type=int, default=2048)
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep in ms")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = [f"# float32 tl.dot precision on {torch.cuda.get_device_name()}", "",
             f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- float32, B=1, H={args.heads}, D={args.dim}, L={args.length}; median ms of "
             "do_bench through the public calls; errors: attention out, dq, dk, dv vs float64 "
             "SDPA (two heads); DMA out, dq, dk, dv, d delta vs dma_reference in float64 "
             "(L=1024, keep=256, two heads)", "",
             "| call | precision | fwd ms | fwd+bwd ms | errors |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    try:
        lines += attention_rows(args.length, args.heads, args.dim, args.rep)
        lines += dma_rows(args.length, args.heads, args.dim, args.keep, args.rep)
    finally:
        TileConfig.precision = staticmethod(DEFAULT_RULE)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
