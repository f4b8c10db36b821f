"""Whole-model decoding: tokens/s of ``generate()`` with a static cache and CUDA graphs.

A Llama-shaped model (8 layers, hidden 2048, 16 query / 4 kv heads, bf16) prefilled with a
``--context``-token prompt per sequence, then ``--new`` greedy tokens, batch ``--batch``, with
``cache_implementation="static"`` and the forward compiled with ``mode="reduce-overhead"`` (CUDA
graphs), three ways in one run:

- ``sparse``: ``backend="sparse"`` with ``--pattern`` (default the StreamingLLM pattern
  ``causal & (sink(4) | sliding(4096))``);
- ``flex``: transformers' FlexAttention path, with the model's ``sliding_window`` when
  ``--pattern`` is a plain ``causal & sliding(w)``, else dense causal (transformers has no
  configuration for sinks);
- ``sdpa``: dense SDPA over the whole cache.

Reports decode tokens/s (prefill excluded), the prefill time, and at batch 1 the split between
weights and attention (a profiled step). Prints one markdown table and writes it to ``--out``.

    python bench/generate.py --context 32768 --batch 32 --out bench/results/generate-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time

import torch


def build(impl: str, window: int | None) -> object:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1 << 17)
    if window is not None:
        config = transformers.MistralConfig(**config.to_dict(), sliding_window=window)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    model.set_attn_implementation(impl)
    return model


def decode_rate(model: object, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of greedy generate with a static cache."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new + 1, do_sample=False,
                       cache_implementation="static")
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    return prefill, ids.shape[0] * new / max(total - prefill, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--pattern", default="causal & (sink(4) | sliding(4096))")
    ap.add_argument("--variants", nargs="+", default=["sparse", "flex", "sdpa"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    plain = re.fullmatch(r"causal & sliding\((\d+)\)", args.pattern)
    window = int(plain.group(1)) if plain else None
    lines = [
        f"# generate() with a static cache and CUDA graphs ({torch.cuda.get_device_name()})", "",
        f"Llama-shaped, 8 layers, hidden 2048, 16 query / 4 kv heads, bf16; context "
        f"{args.context}, {args.new} new tokens; pattern `{args.pattern}`; torch "
        f"{torch.__version__}; {datetime.date.today()}. Command: `python "
        + " ".join(sys.argv) + "`", "",
        "| batch | variant | prefill s | decode tokens/s |", "|---|---|---|---|",
    ]
    for batch in args.batch:
        ids = torch.randint(0, 32000, (batch, args.context), device="cuda")
        for variant in args.variants:
            impl = {"sparse": "sdpa", "flex": "flex_attention", "sdpa": "sdpa"}[variant]
            model = build(impl, window if variant != "sdpa" else None)
            if variant == "sparse":
                model.forward = torch.compile(model.forward, backend="sparse", options={
                    "pattern": args.pattern, "mode": "reduce-overhead"})
            else:
                model.forward = torch.compile(model.forward, mode="reduce-overhead")
            try:
                prefill, rate = decode_rate(model, ids, args.new)
                lines.append(f"| {batch} | {variant} | {prefill:.2f} | {rate:.0f} |")
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                lines.append(f"| {batch} | {variant} | error: {type(e).__name__} | - |")
            print(lines[-1], flush=True)
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
