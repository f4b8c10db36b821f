"""Packed documents: one layer's attention over a batch of packed documents, three ways.

Each step draws a new split of ``--tokens`` tokens into documents of 2k-32k tokens (B = 1,
H = 16, D = 128, bf16) and runs forward + backward of

- ``ours``: ``sc.attention(q, k, v, pattern, documents=ids)`` (the ids' preparation, all the
  work that depends on them, is inside the call and counted);
- ``flex``: FlexAttention with the document mask_mod composed with the same pattern, its
  ``create_block_mask`` for the new split counted in the step;
- ``sdpa``: each document padded to the longest one, one SDPA call on [n_docs, H, Lmax, D]
  (the default backend: cuDNN or flash), padding and unpadding counted.

It reports the median step time over ``--steps`` splits, our preparation alone (GPU time per
batch of ``codegen.tl.documents.document_bounds``, the only work that depends on the ids:
its kernels' device time under the profiler, so that launch gaps drop out), and the recompiles of a
``torch.compile``d call over those steps. Every variant is checked against the others on the
first split. Prints one markdown table and writes it to ``--out``.

    python bench/documents.py --out bench/results/documents-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
import torch.nn.functional as F
from sparse_compile.codegen.tl.documents import document_bounds

import sparse_compile as sc


def split(tokens: int, low: int, high: int, gen: torch.Generator) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, high + 1, (), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    if lengths[-1] <= 0:
        lengths.pop()
        lengths[-1] += tokens - sum(lengths)
    return lengths


def ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                   torch.tensor(lengths, device="cuda"))[None]


def flex_block_mask(ids, window, length):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = ids[0]

    def mask_mod(b, h, qi, ki):
        keep = (doc[qi] == doc[ki]) & (ki <= qi)
        if window is not None:
            keep = keep & (qi - ki < window)
        return keep

    return create_block_mask(mask_mod, None, None, length, length, device="cuda")


def flex_step(q, k, v, ids, window):
    return FLEX(q, k, v, block_mask=flex_block_mask(ids, window, q.shape[2]))


FLEX = None


def padded_sdpa(q, k, v, lengths, window):
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    longest = max(lengths)

    def pad(t):
        parts = [F.pad(t[0, :, s:s + n], (0, 0, 0, longest - n)) for s, n in zip(starts, lengths,
                                                                                    strict=True)]
        return torch.stack(parts)

    qp, kp, vp = pad(q), pad(k), pad(v)
    if window is None:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    else:
        i = torch.arange(longest, device="cuda")
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)
    return torch.cat([out[j, :, :n] for j, n in enumerate(lengths)], dim=1)[None]


def timed(fn, repeats: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def kernel_ms(fn, calls: int = 10) -> float:
    """GPU time per call of ``fn``: the CUDA kernels' device time under the profiler, so that
    launch gaps drop out (no CUDA graph: the benchmark's tensors leave it no memory)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.key_averages())
    return device_us / calls / 1e3


def main() -> None:
    global FLEX
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--low", type=int, default=2048)
    ap.add_argument("--high", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--windows", nargs="+", default=["none", "1024"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    FLEX = torch.compile(flex_attention)
    torch._dynamo.config.cache_size_limit = 64
    h, d = 16, 128
    lines = [
        f"# Packed documents, one attention layer ({torch.cuda.get_device_name()})", "",
        f"B = 1, H = {h}, D = {d}, bf16, {args.tokens} tokens per batch split into documents of "
        f"{args.low}-{args.high} tokens, a new split every step; forward + backward, median of "
        f"{args.steps} steps, mask preparation included; torch {torch.__version__}; "
        f"{datetime.date.today()}. Command: `python " + " ".join(sys.argv) + "`", "",
        "| pattern | ours ms | flex ms (create_block_mask incl.) | sdpa padded ms | vs flex | "
        "our prep ms | flex create_block_mask ms | graphs compiled (ours, all splits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for window_text in args.windows:
        window = None if window_text == "none" else int(window_text)
        lines += measure(window, args, h, d)
        print("\n".join(lines[-2:]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")


def measure(window: int | None, args: argparse.Namespace, h: int, d: int) -> list[str]:
    """The table's two lines for one pattern."""
    pattern = "causal" if window is None else f"causal & sliding({window})"
    gen = torch.Generator().manual_seed(0)
    splits = [split(args.tokens, args.low, args.high, gen) for _ in range(args.steps)]
    q, k, v = (torch.randn(1, h, args.tokens, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def ours(ids):
        out = sc.attention(q, k, v, pattern, documents=ids)
        out.backward(dout)
        return out

    def flex(ids):
        out = flex_step(q, k, v, ids, window)
        out.backward(dout)
        return out

    def sdpa(lengths):
        out = padded_sdpa(q, k, v, lengths, window)
        out.backward(dout)
        return out

    first = splits[0]
    ids0 = ids_of(first)
    a, b, c = ours(ids0).float(), flex(ids0).float(), sdpa(first).float()
    err_flex = ((a - b).norm() / b.norm()).item()
    err_sdpa = ((a - c).norm() / c.norm()).item()
    for fn, arg in ((ours, ids0), (flex, ids0), (sdpa, first)):
        fn(arg)  # warm up every variant once more
    times: dict[str, list[float]] = {"ours": [], "flex": [], "sdpa": [], "prep": [], "mask": []}
    for lengths in splits:
        ids = ids_of(lengths)
        times["ours"].append(timed(lambda ids=ids: ours(ids)))
        times["flex"].append(timed(lambda ids=ids: flex(ids)))
        times["sdpa"].append(timed(lambda lengths=lengths: sdpa(lengths)))
        times["prep"].append(kernel_ms(lambda ids=ids: document_bounds(ids)))
        times["mask"].append(timed(lambda ids=ids: flex_block_mask(ids, window, args.tokens)))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(
        lambda q_, k_, v_, ids: sc.attention(q_, k_, v_, pattern, documents=ids))
    with torch.no_grad():
        for lengths in splits:
            compiled(q, k, v, ids_of(lengths))
    graphs = counters["stats"].get("unique_graphs", 0)
    med = {key: statistics.median(val) for key, val in times.items()}
    return [
        f"| `{pattern}` | {med['ours']:.2f} | {med['flex']:.2f} | {med['sdpa']:.2f} | "
        f"{med['flex'] / med['ours']:.2f}x | {med['prep']:.3f} | {med['mask']:.2f} | "
        f"{graphs} graph(s) |",
        f"|  | errors vs flex {err_flex:.1e}, vs padded sdpa {err_sdpa:.1e} (bf16) |  |  |  "
        "|  |  |  |",
    ]

if __name__ == "__main__":
    main()
