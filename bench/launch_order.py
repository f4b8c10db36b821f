"""Launch order A/B: programs issued in groups of heads (``TileConfig.head_group``) against all
heads fastest (0), same inputs, same process.

With many batch x head programs and heads varying fastest, the programs resident at once belong
to different heads and share no K/V in L2; grouping keeps a few heads' query tiles together.
Times the kernels (forward, forward+backward through codegen.attention) per group size and
checks that every size gives bit-identical outputs. Writes a table to --out.

    python bench/launch_order.py --out bench/results/launch-order-<gpu>.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from dataclasses import replace

import torch
import triton
from sparse_compile.codegen import attention as kernels
from sparse_compile.patterns import parse

CASES = [  # (D, L, B, pattern)
    (128, 4096, 16, "causal & sliding(1024)"),
    (128, 4096, 16, "block(512)"),
    (128, 4096, 16, "causal"),
    (128, 4096, 16, "global(16) | local(512)"),
    (128, 16384, 4, "causal & sliding(1024)"),
    (128, 16384, 4, "causal"),
    (128, 16384, 1, "causal & sliding(1024)"),
    (64, 4096, 16, "causal & sliding(1024)"),
    (64, 4096, 16, "causal"),
]
GROUPS = (0, 16, 8, 4)


def run_case(d: int, length: int, b: int, text: str, heads: int, rep: int) -> list[str]:
    """One table row per group size: forward and forward+backward ms, TF/s, identical?"""
    q, k, v, do = (torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    scale = d ** -0.5
    kept = parse(text).layout(length, length, 128, 128).density * length * length
    flops = 4 * b * heads * d * kept
    base = kernels.select_config(text, q, length)
    rows, ref = [], None
    for group in GROUPS:
        cfg = replace(base, head_group=group)

        def fwd(cfg=cfg):
            return kernels.forward(q, k, v, text, scale, cfg=cfg)

        def both(cfg=cfg):
            o, lse = fwd(cfg)
            return kernels.backward(do, q, k, v, o, lse, text, scale, cfg=cfg)

        o, lse = fwd()
        outs = [o, *both()[:3]]
        same = "-" if ref is None else str(all(torch.equal(a, r) for a, r in zip(outs, ref,
                                                                                  strict=True)))
        ref = ref or outs
        t_f = triton.testing.do_bench(fwd, rep=rep)
        t_fb = triton.testing.do_bench(both, rep=rep)
        rows.append(f"| {d} | {length} | {b} | {text.replace('|', chr(92) + '|')} | {group} | "
                    f"{t_f:.3f} | {flops / t_f / 1e9:.0f} | {t_fb:.3f} | "
                    f"{3.5 * flops / t_fb / 1e9:.0f} | {same} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rep", type=int, default=50, help="do_bench rep in ms")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    lines = [f"# Launch order A/B on {gpu}", "",
             f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
             f"- torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- bf16, H={args.heads}; group = heads per launch group (0: all heads fastest, the "
             "order before version 8); f+b TF/s counts the backward as 2.5x the forward; "
             "`same`: outputs and gradients bit-identical to group 0", "",
             "| D | L | B | pattern | group | fwd ms | fwd TF/s | f+b ms | f+b TF/s | same |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for d, length, b, text in CASES:
        lines += run_case(d, length, b, text, args.heads, args.rep)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
