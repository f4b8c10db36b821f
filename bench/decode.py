"""Decoding: one query row against a long static KV cache, per-step attention latency.

For cache lengths 32k and 128k, batch 1 / 8 / 32, 32 query / 8 kv heads, D = 128, bf16, and
the patterns ``causal`` and ``causal & (sink(4) | sliding(4096))``, times one decode step's
attention (Lq = 1, the cache filled to its last slot, the query's position given as a device
tensor as a static cache gives it):

- ``ours``: ``sc.attention(q, k_cache, v_cache, pattern, q_start=pos)``;
- ``flex``: compiled FlexAttention with the same mask (``create_block_mask`` for one query row
  at the cache's fill level, built once outside the timed region);
- ``sdpa``: ``F.scaled_dot_product_attention`` over the whole cache (GQA, no mask);

as GPU time (a CUDA graph of 20 calls replayed, so launch costs drop out) and host time per
eager call (``ours``). The floor is the bytes of the K/V the pattern keeps read once at the
copy bandwidth measured in the same run. Every variant is checked against the others. Prints
one markdown table and writes it to ``--out``.

    python bench/decode.py --out bench/results/decode-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import torch.nn.functional as F

import sparse_compile as sc

PATTERNS = {"causal": None, "causal & (sink(4) | sliding(4096))": 4096}


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)


def graph_ms(fn, calls: int = 20) -> float:
    """GPU time per call of ``fn`` captured ``calls`` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * calls)


def host_ms(fn, calls: int = 50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return host


def flex_decode(q, k, v, length: int, window: int | None, position: int | None = None):
    """Compiled FlexAttention for one query row at ``position`` (default: the cache's last
    slot) over a cache of ``length`` keys, causal, with sinks and a window when ``window``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    position = length - 1 if position is None else position

    def mask_mod(b, h, qi, ki):
        keep = ki <= qi + position
        if window is not None:
            keep = keep & ((ki < 4) | (qi + position - ki < window))
        return keep

    block_mask = create_block_mask(mask_mod, None, None, 1, length, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    hq, hkv, d = 32, 8, 128
    bandwidth = copy_bandwidth()
    lines = [
        f"# Decoding against a static KV cache ({torch.cuda.get_device_name()})", "",
        f"Lq = 1, {hq} query / {hkv} kv heads, D = {d}, bf16, the cache filled to its last "
        "slot, the query position a device tensor; GPU time per call from a CUDA graph of 20 "
        f"calls; host = wall time of an eager call (ours); floor = kept K/V bytes at the "
        f"measured copy bandwidth ({bandwidth / 1e12:.2f} TB/s, read + write); torch "
        f"{torch.__version__}; {datetime.date.today()}. Command: `python "
        + " ".join(sys.argv) + "`", "",
        "| cache | batch | pattern | ours µs | flex µs | sdpa µs | floor µs | ours / floor "
        "| vs flex | ours host µs | max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        for batch in args.batches:
            k, v = (torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            position = torch.full((batch,), length - 1, device="cuda", dtype=torch.int32)
            sdpa = graph_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, enable_gqa=True))
            reference = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
            for pattern, window in PATTERNS.items():
                def ours(q=q, k=k, v=v, pattern=pattern, position=position):
                    return sc.attention(q, k, v, pattern, q_start=position)

                out = ours().float()
                flex = flex_decode(q, k, v, length, window)
                err = ((out - flex().float()).abs().max().item())
                if window is None:
                    err = max(err, (out - reference).abs().max().item())
                kept = length if window is None else min(length, window + 4)
                floor = 2 * batch * hkv * kept * d * 2 / bandwidth * 1e6
                t_ours = graph_ms(ours) * 1e3
                t_flex = graph_ms(flex) * 1e3
                lines.append(
                    f"| {length} | {batch} | `{pattern.replace('|', chr(92) + '|')}` | "
                    f"{t_ours:.1f} | {t_flex:.1f} | "
                    f"{sdpa * 1e3:.1f} | {floor:.1f} | {t_ours / floor:.2f} | "
                    f"{t_flex / t_ours:.2f}x | {host_ms(ours) * 1e3:.0f} | {err:.1e} |")
                print(lines[-1], flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        f.write("\n".join(lines) + "\n")
            del k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
