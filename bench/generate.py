"""Whole-model decoding: tokens/s of ``generate()`` with a static cache and CUDA graphs.

A Llama-shaped model (8 layers, hidden 2048, 16 query / 4 kv heads, bf16) prefilled with a
``--context``-token prompt per sequence, then ``--new`` greedy tokens, batch ``--batch``, with
``cache_implementation="static"``, so ``generate()`` compiles its decoding forward with the model's
``generation_config.compile_config`` (``mode="reduce-overhead"``: CUDA graphs; the prefill runs
eagerly, in chunks of ``--prefill-chunk`` tokens), three ways in one run:

- ``sparse``: ``CompileConfig(backend="sparse", options={"pattern": ..., "mode":
  "reduce-overhead"})`` with ``--pattern`` (default the StreamingLLM pattern
  ``causal & (sink(4) | sliding(4096))``);
- ``flex``: transformers' FlexAttention path, with the model's ``sliding_window`` when
  ``--pattern`` is a plain ``causal & sliding(w)``, else dense causal (transformers has no
  configuration for sinks);
- ``sdpa``: dense SDPA over the whole cache.

Reports decode tokens/s (prefill excluded), the prefill time, and the split of one decode step
between attention and the rest (weights, norms, sampling): the attention part is one layer's
attention at the model's shapes (one query row against the filled static cache, the variant's
own kernel: ours, compiled FlexAttention or SDPA over the whole cache) timed as GPU time in a
CUDA graph, times the layers; the rest is the step time minus that. Prints one markdown table
and writes it to ``--out``.

    python bench/generate.py --context 32768 --batch 32 --out bench/results/generate-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from decode import flex_decode, graph_ms

import sparse_compile as sc

LAYERS, HQ, HKV, D = 8, 16, 4, 128


def build(impl: str, window: int | None) -> object:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=LAYERS,
        num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=1 << 17)
    if window is not None:
        config = transformers.MistralConfig(**config.to_dict(), sliding_window=window)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    model.set_attn_implementation(impl)
    return model


class StepClock:
    """A logits processor that records when each generated token's logits are ready: the
    first stamp closes the prefill, the rest are decode steps."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def decode_rate(model: object, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of greedy generate with a static cache: one warm-up
    call (compiles and captures), then one timed call whose step clock splits prefill from the
    decode steps."""
    from transformers import LogitsProcessorList

    with torch.no_grad():
        model.generate(ids, max_new_tokens=new + 1, do_sample=False,
                       cache_implementation="static")
        clock = StepClock()
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False,
                       cache_implementation="static",
                       logits_processor=LogitsProcessorList([clock]))
    steps = len(clock.stamps) - 1
    return clock.stamps[0] - start, ids.shape[0] * steps / (clock.stamps[-1] - clock.stamps[0])


def attention_ms(variant: str, pattern: str, batch: int, cache: int, filled: int,
                 window: int | None) -> float:
    """GPU ms of one layer's decode-step attention at the model's shapes, the variant's kernel."""
    k, v = (torch.randn(batch, HKV, cache, D, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    position = torch.full((batch,), filled - 1, device="cuda", dtype=torch.int32)
    if variant == "sparse":
        return graph_ms(lambda: sc.attention(q, k, v, pattern, q_start=position))
    if variant == "flex":
        return graph_ms(flex_decode(q, k, v, cache, window, position=filled - 1))
    return graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--pattern", default="causal & (sink(4) | sliding(4096))")
    ap.add_argument("--variants", nargs="+", default=["sparse", "flex", "sdpa"])
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import CompileConfig

    torch._dynamo.config.cache_size_limit = 64
    plain = re.fullmatch(r"causal & sliding\((\d+)\)", args.pattern)
    window = int(plain.group(1)) if plain else None
    lines = [
        f"# generate() with a static cache and CUDA graphs ({torch.cuda.get_device_name()})", "",
        f"Llama-shaped, 8 layers, hidden 2048, 16 query / 4 kv heads, bf16; context "
        f"{args.context}, {args.new} new tokens; pattern `{args.pattern}`; torch "
        f"{torch.__version__}; {datetime.date.today()}. Command: `python "
        + " ".join(sys.argv) + "`", "",
        "| batch | variant | prefill s | decode tokens/s | step ms | attention ms/step "
        "| rest ms/step |", "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for batch in args.batch:
        ids = torch.randint(0, 32000, (batch, args.context), device="cuda")
        for variant in args.variants:
            impl = {"sparse": "sdpa", "flex": "flex_attention", "sdpa": "sdpa"}[variant]
            model = build(impl, window if variant != "sdpa" else None)
            # generate() compiles the decoding forward itself when the cache is static (its
            # prefill stays eager, in chunks here so the prefill's masks fit); the user's way
            # to choose the compiler is its CompileConfig.
            model.generation_config.compile_config = (
                CompileConfig(backend="sparse", mode=None, options={
                    "pattern": args.pattern, "mode": "reduce-overhead"})
                if variant == "sparse" else CompileConfig(mode="reduce-overhead"))
            model.generation_config.prefill_chunk_size = args.prefill_chunk
            try:
                prefill, rate = decode_rate(model, ids, args.new)
                step = 1e3 * batch / rate
                # transformers sizes the static cache to the prompt plus the new tokens.
                attn = LAYERS * attention_ms(
                    variant, args.pattern, batch, args.context + args.new + 1,
                    args.context + args.new // 2, window if variant == "flex" else None)
                lines.append(f"| {batch} | {variant} | {prefill:.2f} | {rate:.0f} | {step:.2f} "
                             f"| {attn:.2f} | {step - attn:.2f} |")
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                traceback.print_exc()
                lines.append(f"| {batch} | {variant} | error: {type(e).__name__}: "
                             f"{str(e)[:80]} | - | - | - | - |")
            print(lines[-1], flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
