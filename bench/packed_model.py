"""A packed batch through a whole model: peak GPU memory and step time, no Lq x Lk mask.

transformers trains on packed documents by restarting ``position_ids`` at 0 per document with no
attention mask and no cache; for SDPA it then materialises a ``[B, 1, L, L]`` mask from the
packed-sequence indices. Compiled with ``backend="sparse"``, the backend reads the documents
from the graph instead, so nothing of size L x L should exist. This script runs a Llama-shaped
model (``--layers`` layers, hidden 2048, 16 query / 4 kv heads, bf16, B = 1) on ``--tokens``
tokens split into documents of 2k-32k tokens, a training step (forward + backward of the mean
square of the last hidden state), two ways in one run:

- ``sparse``: ``torch.compile(model, backend="sparse", options={"pattern": P})``;
- ``sdpa``: the same model uncompiled on transformers' SDPA path (it builds the dense mask);

and reports the step time, the peak memory (``torch.cuda.max_memory_allocated``) against the
size of one ``[1, 1, L, L]`` bool mask, the documents the backend found (``explain``'s pattern
column) and the agreement of the two variants' last hidden states.

    python bench/packed_model.py --tokens 65536 --out bench/results/packed-model-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

import sparse_compile as sc


def build(layers: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).to(device="cuda", dtype=torch.bfloat16)
    model.set_attn_implementation("sdpa")
    return model.train()


def split(tokens: int, gen: torch.Generator) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(2048, 32769, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def step(model, ids, position_ids) -> tuple[torch.Tensor, float, float]:
    """(last hidden state, seconds, peak GiB) of one forward + backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    hidden = model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return hidden.detach(), seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pattern", default="causal & sliding(1024)")
    ap.add_argument("--variants", nargs="+", default=["sparse", "sdpa"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    lengths = split(args.tokens, gen)
    ids = torch.randint(0, 32000, (1, args.tokens), generator=gen).cuda()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    mask_gib = args.tokens ** 2 / 2**30
    lines = [
        f"# A packed batch through a whole model ({torch.cuda.get_device_name()})", "",
        f"Llama-shaped, {args.layers} layers, hidden 2048, 16 query / 4 kv heads, bf16, B = 1, "
        f"{args.tokens} tokens in {len(lengths)} documents ({lengths}), position_ids restarting "
        f"per document, no mask, no cache; training step = forward + backward; pattern "
        f"`{args.pattern}` for sparse; one [1, 1, L, L] bool mask is {mask_gib:.2f} GiB; torch "
        f"{torch.__version__}; {datetime.date.today()}. Command: `python "
        + " ".join(sys.argv) + "`", "",
        "| variant | step s (2nd call) | peak GiB | peak - weights GiB | note |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    hidden = {}
    for variant in args.variants:
        model = build(args.layers)
        weights = torch.cuda.memory_allocated() / 2**30
        note = "transformers builds the dense mask"
        run = model
        if variant == "sparse":
            run = torch.compile(model, backend="sparse", options={"pattern": args.pattern})
            report = sc.explain(model, model_kwargs={
                "input_ids": ids, "position_ids": position_ids, "use_cache": False},
                pattern=args.pattern)
            note = "; ".join(sorted({f"{r.pattern} ({r.mask})" for r in report}))[:160]
        try:
            step(run, ids, position_ids)
            out, seconds, peak = step(run, ids, position_ids)
            hidden[variant] = out
            lines.append(f"| {variant} | {seconds:.3f} | {peak:.2f} | {peak - weights:.2f} "
                         f"| {note} |")
        except torch.OutOfMemoryError as e:
            lines.append(f"| {variant} | out of memory | - | - | {str(e)[:80]} |")
        print(lines[-1], flush=True)
        del model, run
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    if len(hidden) == 2:
        a, b = (h.float() for h in hidden.values())
        lines += ["", f"Relative difference of the last hidden states, sparse vs sdpa: "
                  f"{((a - b).norm() / b.norm()).item():.1e} (bf16; sdpa is dense causal "
                  f"within documents, sparse adds the pattern)."]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
