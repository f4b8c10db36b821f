"""Benchmark: time to build exact block layouts, lq = lk = 2**10 ... 2**20, 128 x 128 blocks.

For each primitive and a few compositions it prints one table of build times per length, then
one table at the longest length with the compact CSR table time (forward + transposed,
non-interval routes only: interval layouts need no tables), the peak resident-memory growth of
building and the block density, then one table of what the kernels read at the longest length
(``codegen.attention.visit_plan`` with the GPU tiles: forward 64 x 64, dK/dV transposed 32 x 64).
Each measurement runs in a fresh subprocess so that peak memory is its own.

    python bench/layout.py [--max-log2 20] [--out bench/results/layout-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

PATTERNS = [
    "dense", "causal", "window(256, 256)", "local(1024)", "sliding(4096)", "block(512)",
    "sink(64)", "prefix(1024)", "strided(4096)", "fanout(2)", "axial(1024)", "global(64)",
    "causal & sliding(4096)", "causal & strided(4096)", "sliding(4096) | sink(64)",
    "causal | prefix(1024)", "causal & axial(1024)",
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | would end the markdown cell


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(text: str, max_log2: int) -> dict:
    """Build times (ms, median of up to 5 runs) for every length; tables/memory at the last."""
    from sparse_compile.patterns import parse
    from sparse_compile.patterns.layout import _build  # layouts are cached: time fresh builds

    p = parse(text)
    _ = p.layout(1024, 1024).kinds  # warm up: sympy caches, torch kernels
    base = _rss_mb()
    out = {"build_ms": {}, "route": None}
    for log2 in range(10, max_log2 + 1):
        n = 1 << log2
        times = []
        while len(times) < 5 and sum(times) < 1.0:
            _build.cache_clear()
            t0 = time.perf_counter()
            layout = p.layout(n, n, 128, 128)
            times.append(time.perf_counter() - t0)
        out["build_ms"][log2] = 1e3 * statistics.median(times)
    out["route"] = layout._source.route
    out["peak_build_mb"] = _rss_mb() - base
    if layout.is_interval:
        out["tables_ms"] = None
    else:
        t0 = time.perf_counter()
        tables = (layout.kv_partial, layout.kv_full, layout.q_partial, layout.q_full)
        out["tables_ms"] = 1e3 * (time.perf_counter() - t0)
        out["table_mb"] = sum(t.offsets.numel() * t.offsets.element_size()
                              + t.indices.numel() * t.indices.element_size()
                              for t in tables) / 2**20
    out["peak_total_mb"] = _rss_mb() - base
    out["block_density"] = layout.block_density
    return out


KERNEL_TILES = ((64, 64, False), (32, 64, True))  # H100 bf16 D=128 forward, dK/dV (config.py)


def measure_kernel(text: str, max_log2: int) -> dict:
    """Wall time, int32 MB handed to the kernels and peak RSS growth of the kernels' visit
    plans (forward tables per query block, dK/dV tables per key block) at ``2**max_log2``."""
    from sparse_compile.codegen.attention import visit_plan

    cpu = torch.device("cpu")
    for bm, bn, transposed in KERNEL_TILES:  # warm up at 2^10
        visit_plan(text, 1024, 1024, bm, bn, cpu, transposed)
    base, n, out = _rss_mb(), 1 << max_log2, {"ms": [], "mb": 0.0, "how": "closed form"}
    for bm, bn, transposed in KERNEL_TILES:
        t0 = time.perf_counter()
        plan = visit_plan(text, n, n, bm, bn, cpu, transposed)
        if plan.tables is not None:
            _ = plan.tables.partial_offsets  # tables are built when a launch first reads them
        out["ms"].append(1e3 * (time.perf_counter() - t0))
        if plan.tables is not None:
            out["how"] = "compact tables"
            t = plan.tables
            out["mb"] += sum(x.numel() * 4 for x in (t.partial_offsets, t.partial_indices,
                                                     t.full_offsets, t.full_indices)) / 2**20
        elif plan.rows is not None:
            out["how"] = "row bounds"
            out["mb"] = (plan.rows.lo.numel() + plan.rows.hi.numel()) * 4 / 2**20
    out["peak_mb"] = _rss_mb() - base
    return out


def _worker(mode: str, text: str, args) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, mode, text, "--max-log2", str(args.max_log2),
         "--threads", str(args.threads)],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-log2", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steady timings on a shared machine)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # subprocess worker
    ap.add_argument("--kernel", default=None, help=argparse.SUPPRESS)  # subprocess worker
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.max_log2)))
        return
    if args.kernel is not None:
        print(json.dumps(measure_kernel(args.kernel, args.max_log2)))
        return
    results, kernel = {}, {}
    for text in PATTERNS:
        results[text] = _worker("--one", text, args)
        kernel[text] = _worker("--kernel", text, args)
        print(f"measured {text}", file=sys.stderr)
    logs = list(range(10, args.max_log2 + 1))
    lines = ["Build time of `pattern.layout(n, n, 128, 128)` in ms (median of up to 5 runs; the "
             "diagonal, split and candidates routes only pick the route here and build their "
             "tables, one direction at a time, on first access: see the next table):", "",
             "| pattern | route | " + " | ".join(f"2^{x}" for x in logs) + " |",
             "|---|---|" + "---:|" * len(logs)]
    for text, r in results.items():
        cells = " | ".join(f"{r['build_ms'][str(x)]:.1f}" for x in logs)
        lines.append(f"| `{_cell(text)}` | {r['route']} | {cells} |")
    n = args.max_log2
    lines += ["", f"At n = 2^{n}: compact CSR tables (forward + transposed, built on first "
              "access; interval layouts need none for the kernels), tables MB = offsets + "
              "indices, peak RSS growth of the process:", "",
              "| pattern | route | build ms | tables ms | build + tables ms | tables MB | "
              "peak MB (build) | peak MB (total) | block density |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for text, r in results.items():
        tables = "-" if r["tables_ms"] is None else f"{r['tables_ms']:.0f}"
        both = r["build_ms"][str(n)] + (r["tables_ms"] or 0)
        table_mb = f"{r['table_mb']:.1f}" if "table_mb" in r else "-"
        lines.append(
            f"| `{_cell(text)}` | {r['route']} | {r['build_ms'][str(n)]:.1f} | {tables} | "
            f"{both:.0f} | {table_mb} | {r['peak_build_mb']:.1f} | {r['peak_total_mb']:.1f} | "
            f"{r['block_density']:.4f} |")
    lines += ["", f"At n = 2^{n}: what the kernels read, `codegen.attention.visit_plan(text, n, n, "
              "bm, bn, cpu, transposed)` for the forward (64 x 64, per query block) and the "
              "dK/dV pass (32 x 64, per key block; H100 bf16 head dim 128 tiles, "
              "codegen/launch/config.py), each call building its layout; MB = int32 arrays "
              "handed to the kernels (both calls); peak = RSS growth of a fresh process:", "",
              "| pattern | kernels read | forward 64x64 ms | dK/dV 32x64 ms | total ms | MB | "
              "peak MB |", "|---|---|---:|---:|---:|---:|---:|"]
    for text, k in kernel.items():
        fwd, bwd = k["ms"]
        lines.append(f"| `{_cell(text)}` | {k['how']} | {fwd:.0f} | {bwd:.0f} | "
                     f"{fwd + bwd:.0f} | {k['mb']:.1f} | {k['peak_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = [
            "# Layout building benchmark (CPU)", "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.platform()}; torch threads: {args.threads}; load average at the end: "
            f"{os.getloadavg()[0]:.1f} (the machine is shared, other jobs were running)",
            f"- python {platform.python_version()}, torch {torch.__version__}",
            f"- command: `python bench/layout.py --max-log2 {n} --threads {args.threads} "
            f"--out {args.out}`",
            "- tables: compact CSR (offsets + one flat int32 index array), built directly by "
            "every route (no padded [rows, longest row] form)",
            "- routes: interval = closed-form per q-block bounds; interval union = the same "
            "bounds from numeric row bounds of a union that stays one interval per row; "
            "diagonal = per-diagonal classification, tables listed from the sorted diagonals; "
            "split = tables listed from the diagonals of the pattern's q - k background with "
            "layer tiles (q - k kinds) and exception tiles (axial bands, global rows, interval "
            "edges, ragged edges, classified exactly) overlaid; "
            "candidates = only tiles inside candidate k-block ranges are classified "
            "(compositions with an opaque predicate); "
            "tiles = per-tile analysis over all nq x nk tiles (chunked; opaque custom predicates "
            "only)",
            "- peak MB: growth of the process's max RSS after a warm-up at 2^10; coarse "
            "(allocator caching), an upper bound for the largest length", "",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(header) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
