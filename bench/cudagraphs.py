"""Benchmark: a model compiled with ``backend="sparse"``, with and without CUDA graphs.

``options={"mode": "reduce-overhead"}`` hands Inductor its CUDA-graph mode, which captures the
sparse op's kernels with the rest of the graph, so the per-call host cost of launching them
(bench/overhead.py) is paid once at capture. A randomly initialised Llama (transformers, small
config, GQA, bf16) runs inference and a training step both ways; logits, loss and gradients are
compared between the two, and times are medians of ``triton.testing.do_bench``. Prints one
table and writes it with the conditions to bench/results/cudagraphs-<gpu>.md (or --out).

    python bench/cudagraphs.py
    python bench/cudagraphs.py --lengths 2048 --layers 2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import triton

from sparse_compile.demo import build_llama


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / (b.norm() + 1e-12)).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def case(length: int, args) -> dict:
    """Inference and training times, plain vs CUDA graphs, and their agreement, at one length."""
    model = build_llama(args.layers, args.hidden, args.heads, "cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    opts = {"pattern": args.pattern}
    plain = torch.compile(model, backend="sparse", options=opts)
    graphed = torch.compile(model, backend="sparse", options={**opts, "mode": "reduce-overhead"})

    def infer(m, mark: bool):
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        return m(ids).logits

    def train(m, mark: bool):
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        out = m(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach()

    def grads():
        return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    row = {"L": length}
    with torch.no_grad():
        ref = infer(plain, False).float()
        for _ in range(3):  # warm-up runs, then capture, then replay
            got = infer(graphed, True).float()
        row["logits rel diff"] = rel(got, ref)
        row["infer ms"] = bench(lambda: infer(plain, False))
        row["infer graphs ms"] = bench(lambda: infer(graphed, True))
    model.zero_grad(set_to_none=True)
    loss_plain = train(plain, False)
    g_plain = grads()
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss_graphed = train(graphed, True)
    g_graphed = grads()
    row["loss diff"] = abs(loss_plain.float().item() - loss_graphed.float().item())
    row["max grad rel diff"] = max(rel(a, b) for a, b in zip(g_graphed, g_plain, strict=True))
    row["train ms"] = bench(lambda: train(plain, False))
    row["train graphs ms"] = bench(lambda: train(graphed, True))
    torch._dynamo.reset()
    return row


def table(rows: list[dict]) -> str:
    cols = ["L", "infer ms", "infer graphs ms", "infer x", "train ms", "train graphs ms",
            "train x", "logits rel diff", "loss diff", "max grad rel diff"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = {**r, "infer x": r["infer ms"] / r["infer graphs ms"],
             "train x": r["train ms"] / r["train graphs ms"]}
        cells = [str(r[c]) if c == "L" else f"{r[c]:.1e}" if "diff" in c else
                 f"{r[c]:.2f}" if c.endswith(" x") else f"{r[c]:.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--pattern", default="causal & sliding(1024)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / f"cudagraphs-{gpu.replace(' ', '_')}.md")
    rows = []
    for length in args.lengths:
        rows.append(case(length, args))
        tab = table(rows)
        print(tab, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            f"# backend=\"sparse\" with and without CUDA graphs on {gpu}\n\n"
            f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}\n"
            f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"python {platform.python_version()}\n"
            f"- command: `python {' '.join(sys.argv)}`\n"
            f"- Llama (transformers), {args.layers} layers, hidden {args.hidden}, {args.heads} "
            f"heads ({max(1, args.heads // 2)} kv heads), bf16, batch 1, pattern "
            f"`{args.pattern}`; `graphs` = options `mode=\"reduce-overhead\"` (Inductor CUDA "
            "graphs); train = forward + loss + backward; medians of do_bench; diffs are "
            "between the two compiled models\n\n" + tab + "\n")


if __name__ == "__main__":
    main()
