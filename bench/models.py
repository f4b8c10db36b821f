"""Whole-model benchmark against the strongest peer: the same transformers model, three ways.

For a Mistral-shaped GQA model (``--family mistral``: 16 query / 4 kv heads) or a Llama-shaped
MHA one (``--family llama``), 8 layers, hidden 2048, bf16, batch 1, times in one run

- ``sparse``: ``torch.compile(model, backend="sparse", options={"pattern": P})``, the model on
  its SDPA path with its own ``sliding_window`` (the backend folds the model's mask);
- ``flex``: transformers' ``attn_implementation="flex_attention"`` with the same window,
  ``torch.compile(model)`` (Inductor); for ``--sinks`` (no transformers config for it) the
  flex path gets a ``BlockMask`` built from the same mask_mod as its ``attention_mask``;
- ``sdpa``: the dense causal model (no window) on SDPA, ``torch.compile(model)``: what a
  window saves at all.

Per variant: a training step (forward + backward of mean(h²) of the last hidden state),
inference (``torch.no_grad``), peak memory, first-call time (compile included), with
``--profile`` the attention kernels' share of one step's GPU time, and the agreement of the
sparse and flex outputs. Prints one markdown table and writes it, with the conditions, to
``--out``.

    python bench/models.py --family mistral --lengths 32768 --windows 1024 4096 \\
        --out bench/results/models-vs-flex-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ATTENTION_KERNELS = ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_delta", "flex_attention",
                     "flash", "fmha", "cudnn", "attention")


def build(family: str, layers: int, window: int | None, impl: str) -> Any:
    import transformers

    heads, kv = (16, 4) if family == "mistral" else (16, 16)
    common = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=1 << 17)
    if family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=window)
        cls = transformers.MistralModel
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaModel
    torch.manual_seed(0)
    model = cls(config).to(device="cuda", dtype=torch.bfloat16)
    model.set_attn_implementation(impl)
    return model


def sink_block_mask(length: int, window: int, sinks: int = 4) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & ((k < sinks) | (q - k < window))

    return create_block_mask(mask_mod, None, None, length, length, device="cuda")


def cuda_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_s(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def attention_share(fn: Callable[[], Any]) -> tuple[float, float]:
    """(attention kernels' GPU ms, all kernels' GPU ms) of one call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = attention = 0.0
    for event in prof.key_averages():
        ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3
        if event.device_type.name != "CUDA" and "CUDA" not in str(event.device_type):
            continue
        total += ms
        if any(name in event.key for name in ATTENTION_KERNELS):
            attention += ms
    return attention, total


def run_variant(name: str, args: Any, length: int, window: int | None, pattern: str,
                ids: torch.Tensor) -> dict[str, Any]:
    if name == "sdpa":
        model = build(args.family, args.layers, None, "sdpa")
        compiled = torch.compile(model)
    elif name == "flex":
        model = build(args.family, args.layers, None if args.sinks else window,
                      "flex_attention")
        compiled = torch.compile(model)
    else:
        model = build(args.family, args.layers, None if args.sinks else window, "sdpa")
        compiled = torch.compile(model, backend="sparse", options={"pattern": pattern})
    extra = {}
    if name == "flex" and args.sinks:
        extra["attention_mask"] = sink_block_mask(length, window)
    result: dict[str, Any] = {}
    for mode in args.modes:
        def step(mode: str = mode) -> Any:
            if mode == "infer":
                with torch.no_grad():
                    return compiled(input_ids=ids, use_cache=False, **extra).last_hidden_state
            out = compiled(input_ids=ids, use_cache=False, **extra).last_hidden_state
            out.float().square().mean().backward()
            return None

        try:
            torch.cuda.reset_peak_memory_stats()
            result[mode, "first"] = first_call_s(step)
            result[mode, "ms"] = cuda_ms(step, args.repeats)
            result[mode, "peak"] = torch.cuda.max_memory_allocated() / 2**30
            if args.profile:
                result[mode, "attn"], result[mode, "total"] = attention_share(step)
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            result[mode, "error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"  {name} {mode}: {result[mode, 'error']}", flush=True)
        model.zero_grad(set_to_none=True)
    if name in ("sparse", "flex") and "error" not in str(result):
        with torch.no_grad():
            result["output"] = compiled(input_ids=ids, use_cache=False,
                                        **extra).last_hidden_state.float().cpu()
    torch._dynamo.reset()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["mistral", "llama"], default="mistral")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--sinks", action="store_true", help="causal & (sink(4) | sliding(w))")
    ap.add_argument("--variants", nargs="+", default=["sparse", "flex", "sdpa"])
    ap.add_argument("--modes", nargs="+", default=["train", "infer"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    import transformers

    lines = [
        f"# {args.family}-shaped model: sparse backend vs transformers FlexAttention vs dense "
        f"SDPA ({torch.cuda.get_device_name()})", "",
        f"{args.layers} layers, hidden 2048, "
        f"{'16 query / 4 kv' if args.family == 'mistral' else '16'} heads (head dim 128), "
        f"bf16, batch 1; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today()}; median of {args.repeats}; train = forward + backward of "
        "mean(h²) of the last hidden state; first = first call (compile included); peak = "
        "max GPU memory allocated; attn = attention kernels' share of one step's GPU time "
        "(profiler). Command: `python " + " ".join(sys.argv) + "`", "",
        "| tokens | pattern | mode | sparse ms | flex ms | sdpa ms | vs flex | first s "
        "(sparse / flex / sdpa) | peak GiB (sparse / flex / sdpa) | attn ms (sparse / flex) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def write() -> None:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    for length in args.lengths:
        for window in args.windows:
            pattern = (f"causal & (sink(4) | sliding({window}))" if args.sinks
                       else f"causal & sliding({window})")
            ids = torch.randint(0, 32000, (1, length), device="cuda")
            results = {name: run_variant(name, args, length, window, pattern, ids)
                       for name in args.variants}
            torch.cuda.empty_cache()
            for mode in args.modes:
                def cell(name: str, key: str, mode: str = mode, results: dict = results) -> str:
                    r = results.get(name, {})
                    if (mode, "error") in r:
                        return "error"
                    return f"{r[mode, key]:.1f}" if (mode, key) in r else "-"

                ratio = "-"
                s, f = results.get("sparse", {}), results.get("flex", {})
                if (mode, "ms") in s and (mode, "ms") in f:
                    ratio = f"{f[mode, 'ms'] / s[mode, 'ms']:.2f}x"
                lines.append(
                    f"| {length} | `{pattern}` | {mode} | {cell('sparse', 'ms')} | "
                    f"{cell('flex', 'ms')} | {cell('sdpa', 'ms')} | {ratio} | "
                    f"{cell('sparse', 'first')} / {cell('flex', 'first')} / "
                    f"{cell('sdpa', 'first')} | {cell('sparse', 'peak')} / "
                    f"{cell('flex', 'peak')} / {cell('sdpa', 'peak')} | "
                    f"{cell('sparse', 'attn')} / {cell('flex', 'attn')} |")
                print(lines[-1], flush=True)
            if "output" in results.get("sparse", {}) and "output" in results.get("flex", {}):
                a, b = results["sparse"]["output"], results["flex"]["output"]
                rel = ((a - b).norm() / b.norm()).item()
                lines.append(f"|  | outputs: sparse vs flex relative error {rel:.2e} "
                             "(bf16) |  |  |  |  |  |  |  |  |")
                print(lines[-1], flush=True)
            write()


if __name__ == "__main__":
    main()
