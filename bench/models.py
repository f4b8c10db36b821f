"""Whole-model benchmark: a Llama-shaped model, ``backend="sparse"`` vs Inductor + SDPA.

For each sequence length, times an inference forward (``torch.no_grad``) and a training step
(forward + backward of a scalar loss on the last hidden state) of ``LlamaModel`` (8 layers,
hidden 2048, 16 heads by default, bf16, batch 1), compiled

- dense:  ``torch.compile(model)`` with SDPA attention (FlashAttention, causal), and
- sparse: ``torch.compile(model, backend="sparse", options={"pattern": PATTERN})``,

and reports the first call of each (compile time: Dynamo + Inductor + kernel builds) and the
time spent in the sparse pass itself. Both compile with ``dynamic=True`` so that each
(backend, mode) compiles once for all lengths. Prints one markdown table and writes it, with
the conditions, to ``--out``.

    python bench/models.py --lengths 8192 32768 65536 --out bench/results/models-h100.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PATTERN = "causal & sliding(1024)"


def build(layers: int, hidden: int, heads: int) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1 << 17,
    )
    torch.manual_seed(0)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu",
                                                                             torch.float32)
    model = transformers.LlamaModel(config).to(device=device, dtype=dtype)
    try:
        model.set_attn_implementation("sdpa")
    except AttributeError:
        model.config._attn_implementation = "sdpa"
    return model.train()


def _cuda_ms(fn: Callable[[], Any], repeats: int) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _first_call_s(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["train", "infer"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import sparse_compile.backend as backend_module

    pass_seconds = [0.0]
    original_pass = backend_module.sparsify_graph

    def timed_pass(gm: Any, config: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_pass(gm, config)
        finally:
            pass_seconds[0] += time.perf_counter() - start

    backend_module.sparsify_graph = timed_pass

    model = build(args.layers, args.hidden, args.heads)
    compiled = {
        "dense": torch.compile(model, dynamic=True),
        "sparse": torch.compile(model, backend="sparse", dynamic=True,
                                options={"pattern": PATTERN}),
    }
    lines = [
        "# Llama-shaped model, sparse backend vs Inductor + SDPA "
        f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU dry run'})",
        "",
        f"LlamaModel: {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
        f"(head dim {args.hidden // args.heads}), bf16, batch 1; sparse pattern `{PATTERN}`; "
        f"torch {torch.__version__}; median of {args.repeats}; training step = forward + "
        "backward of mean(h²) of the last hidden state; compile = first call of each "
        "(backend, mode) at the first length (dynamic=True).",
        "",
        "| mode | tokens | dense ms | sparse ms | speed-up | dense compile s | sparse compile s"
        " | sparse pass s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def write() -> None:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    compile_s: dict[tuple[str, ...], float] = {}
    for length in args.lengths:
        ids = torch.randint(0, 32000, (1, length), device=model.device)
        for mode in args.modes:
            row = {}
            for name, fn in compiled.items():
                def step(fn: Any = fn, mode: str = mode, ids: torch.Tensor = ids) -> None:
                    if mode == "infer":
                        with torch.no_grad():
                            fn(input_ids=ids)
                    else:
                        fn(input_ids=ids).last_hidden_state.float().square().mean().backward()

                try:
                    before = pass_seconds[0]
                    first = _first_call_s(step)
                    if (name, mode) not in compile_s:
                        compile_s[name, mode] = first
                        compile_s[name, mode, "pass"] = pass_seconds[0] - before
                    row[name] = _cuda_ms(step, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    row[name] = float("nan")
                model.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            speedup = row["dense"] / row["sparse"]
            line = (f"| {mode} | {length} | {row['dense']:.1f} | {row['sparse']:.1f} | "
                    f"{speedup:.2f}x | {compile_s.get(('dense', mode), 0):.1f} | "
                    f"{compile_s.get(('sparse', mode), 0):.1f} | "
                    f"{compile_s.get(('sparse', mode, 'pass'), 0):.2f} |")
            lines.append(line)
            print(line, flush=True)
            write()


if __name__ == "__main__":
    main()
