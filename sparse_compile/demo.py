"""The main demonstration: make a model you did not write use sliding-window attention.

Builds a small ``transformers`` Llama from a config (nothing is downloaded), compiles it with
``torch.compile(model, backend="sparse", options={"pattern": ...})``, prints the explain
table, checks the logits against the same model whose attention runs
``reference_attention`` with the pattern, and times the forward pass against the dense model
compiled with Inductor (SDPA attention). Runs on the GPU when there is one, else on the CPU
(where the sparse op takes its chunked PyTorch path and timings say little).

Run it as ``python -m sparse_compile demo`` (see ``main`` for the options).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparse_compile.report import explain


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sparse_compile demo",
                                 description="Sparse attention in a transformers Llama, "
                                             "no code edits.")
    ap.add_argument("--pattern", default=None,
                    help='pattern (default "causal & sliding(W)" with W = --window)')
    ap.add_argument("--window", type=int, default=None, help="sliding window (default L/8)")
    ap.add_argument("--length", type=int, default=None,
                    help="sequence length (default 8192 on GPU, 512 on CPU)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10, help="timed forward passes")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    return ap


def build_llama(layers: int, hidden: int, heads: int, device: str, dtype: torch.dtype) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` with GQA (heads // 2 kv heads), SDPA."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=1 << 17,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def _reference_attention_impl(pattern: Any) -> Callable[..., Any]:
    """A transformers attention function running ``reference_attention`` with ``pattern``."""
    from sparse_compile.patterns import causal
    from sparse_compile.reference import reference_attention

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out = reference_attention(query, key, value, pattern & causal, scale=scaling,
                                  bias=attention_mask)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def reference_logits(model: Any, ids: torch.Tensor, pattern: Any) -> torch.Tensor:
    """Logits of ``model`` with its attention replaced by the float64 reference."""
    from transformers import AttentionInterface

    AttentionInterface.register("sparse_compile_reference", _reference_attention_impl(pattern))
    model.set_attn_implementation("sparse_compile_reference")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation("sdpa")


def _time_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when the sparse logits match the reference, 1 otherwise."""
    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if gpu:
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        print("device: CPU (no GPU found): the sparse op runs its chunked PyTorch path, "
              "so the timings below do not show the kernels' speed")
    dtype = torch.bfloat16 if gpu else torch.float32
    length = args.length or (8192 if gpu else 512)
    window = args.window or max(1, length // 8)
    pattern_text = args.pattern or f"causal & sliding({window})"
    layers = args.layers or (4 if gpu else 2)
    hidden = args.hidden or (1024 if gpu else 128)
    heads = args.heads or (8 if gpu else 4)

    from sparse_compile.patterns import parse

    pattern = parse(pattern_text)
    model = build_llama(layers, hidden, heads, device, dtype)
    ids = torch.randint(0, 1024, (1, length), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    print(f"model: LlamaForCausalLM, {layers} layers, hidden {hidden}, {heads} heads, "
          f"{length} tokens, {dtype}; pattern: {pattern_text}\n")

    print(explain(model, ids, pattern=pattern_text))
    torch._dynamo.reset()

    sparse = torch.compile(model, backend="sparse", options={"pattern": pattern_text})
    with torch.no_grad():
        logits = sparse(ids).logits
    expected = reference_logits(model, ids, pattern)
    error = ((logits.double() - expected.double()).norm() / expected.double().norm()).item()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
    verdict = "OK" if error <= tolerance else "MISMATCH"
    print(f"\nlogits vs reference: relative error {error:.2e} (tolerance {tolerance:.0e}) "
          f"{verdict}")

    dense = torch.compile(model)
    with torch.no_grad():
        dense_ms = _time_ms(lambda: dense(ids), args.repeats, device)
        sparse_ms = _time_ms(lambda: sparse(ids), args.repeats, device)
    print(f"forward, median of {args.repeats}: dense (Inductor + SDPA) {dense_ms:.1f} ms, "
          f"sparse {sparse_ms:.1f} ms, speed-up {dense_ms / sparse_ms:.2f}x")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    raise SystemExit(main())
