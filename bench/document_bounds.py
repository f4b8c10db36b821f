"""Document bounds: GPU time of ``codegen.tl.documents.document_bounds`` per batch of packed ids.

For each length and batch size, each row is a random split into documents of ``--low`` to
``--high`` tokens with a tenth of the documents turned into padding (int64 ids, as the op gets
them). It reports, per call, the median over ``--rounds`` rounds of ``--calls`` calls of

- ``kernels``: the kernels' device time under the profiler (launch gaps drop out), the number
  that counts against a layer's attention when the calls sit in a captured or GPU-bound stream;
- ``events``: CUDA events around back-to-back calls, launch gaps included;
- ``reference``: ``document_bounds_reference`` (PyTorch) the same way, for scale;

after checking the kernels against the reference. Prints one markdown table and writes it with
the conditions to ``--out``.

    python bench/document_bounds.py --out bench/results/document-bounds-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import triton
from sparse_compile.codegen.tl.documents import (
    document_bounds,
    document_bounds_reference,
    tile_size,
)

sys.path.insert(0, str(Path(__file__).parent))
from documents import kernel_ms, timed  # noqa: E402 - the same timers as bench/documents.py


def packed_ids(batch: int, length: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, length]`` int64 ids on the GPU, one random split per row."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(low, high + 1, (length // low + 1,), generator=gen)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:length]
        padding = torch.rand(len(lengths), generator=gen) < 0.1
        rows.append(torch.where(padding[ids], -1, ids))
    return torch.stack(rows).cuda()


def median_us(measure, fn, args: argparse.Namespace) -> float:
    return 1e3 * statistics.median(measure(fn, args.calls) for _ in range(args.rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 1 << 20])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--low", type=int, default=2048)
    ap.add_argument("--high", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [
        f"# Document bounds per batch of packed ids ({torch.cuda.get_device_name()})", "",
        f"int64 ids, documents of {args.low}-{args.high} tokens, a tenth of them padding; "
        f"median over {args.rounds} rounds of {args.calls} calls; torch {torch.__version__}, "
        f"triton {triton.__version__}; {datetime.date.today()}. "
        "Command: `python " + " ".join(sys.argv) + "`", "",
        "| B | L | tile | kernels µs | events µs | reference events µs | reference / kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for length in args.lengths:
        for batch in args.batches:
            ids = packed_ids(batch, length, args.low, args.high, gen)
            got, want = document_bounds(ids), document_bounds_reference(ids)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                raise SystemExit(f"document_bounds differs from the reference at B={batch}, "
                                 f"L={length}")
            ours = median_us(kernel_ms, lambda ids=ids: document_bounds(ids), args)
            ours_events = median_us(timed, lambda ids=ids: document_bounds(ids), args)
            ref = median_us(timed, lambda ids=ids: document_bounds_reference(ids), args)
            lines.append(f"| {batch} | {length} | {tile_size(length)} | {ours:.1f} | "
                         f"{ours_events:.1f} | {ref:.1f} | {ref / ours:.0f}x |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
