"""Benchmark: a Doge-shaped training step with the model's mask folded vs checked in the data.

``DogeModel`` from a config (``--layers`` layers, hidden 2048, 16 query / 8 kv heads of 128,
``keep_window_size = --keep``, bf16, batch 1, ``--length`` tokens, ``use_cache=False``),
compiled with ``backend="sparse"`` twice in one process:

* ``folded``: the backend proves Doge's mask (causal and key padding) from the graph and calls
  ``dma_attention(causal=True, keys)``; its backward reuses the forward's selection;
* ``data-checked``: the same compile with the proof switched off
  (``dynamic_mask.detect._folded_arguments`` returns None), so the op receives the model's
  ``[B, 1, L, L]`` mask and ``dma_attention_masked`` checks it in the data, then recomputes the
  forward and the selection in its backward: what every Doge step did before the fold.

Per variant: the training step (forward + backward of mean(h²) of the last hidden state,
median of ``--repeats`` after two warm-up steps), the number of selections
(``dynamic_mask.op.dma_select`` calls) per step, peak memory, first-call time; and the two
variants' last hidden states and parameter gradients compared. Writes the table with device,
versions, date and command to ``--out``.

    python bench/doge_step.py --length 32768 --out bench/results/doge-step-h100.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import cuda_ms  # noqa: E402


def build(layers: int, keep: int) -> Any:
    from transformers import DogeConfig
    from transformers.models.doge.modeling_doge import DogeModel

    config = DogeConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                        keep_window_size=keep, max_position_embeddings=1 << 17,
                        attention_bias=False, is_moe=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DogeModel(config).to("cuda", torch.bfloat16)
    with torch.no_grad():  # A = 0 at init makes every delta equal: give the mask content
        for layer in model.layers:
            layer.self_attn.A.normal_(0.0, 1.0)
    return model


def run_variant(name: str, model: Any, ids: torch.Tensor, mask: torch.Tensor,
                repeats: int) -> dict:
    import sparse_compile.dynamic_mask.detect as detect
    import sparse_compile.dynamic_mask.op as op

    real_fold, real_select = detect._folded_arguments, op.dma_select
    selections = []

    def counted(*args, **kwargs):
        selections.append(1)
        return real_select(*args, **kwargs)

    if name == "data-checked":
        detect._folded_arguments = lambda gm, site: None
    op.dma_select = counted
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse")
        params = [p for _, p in trainable(model)]

        def step() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            h = compiled(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            h.float().pow(2).mean().backward()
            return h

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        step()
        torch.cuda.reset_peak_memory_stats()
        selections.clear()
        ms = cuda_ms(step, repeats)
        per_step = len(selections) / repeats
        peak = torch.cuda.max_memory_allocated() / 2**30
        out = step().detach().float()
        grads = [p.grad.detach().float().clone() for p in params]
    finally:
        detect._folded_arguments, op.dma_select = real_fold, real_select
    return {"ms": ms, "first": first, "peak": peak, "selections": per_step, "out": out,
            "grads": grads}


def trainable(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The model's trainable parameters with their names, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--keep", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers
    import triton

    model = build(args.layers, args.keep)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (1, args.length), generator=gen).cuda()
    mask = torch.ones(1, args.length, dtype=torch.long, device="cuda")
    results = {name: run_variant(name, model, ids, mask, args.repeats)
               for name in ("data-checked", "folded")}
    before, after = results["data-checked"], results["folded"]
    names = [n for n, _ in trainable(model)]
    errs = sorted(((rel(a, b), n, b.norm().item()) for n, a, b in
                   zip(names, after["grads"], before["grads"], strict=True)), reverse=True)
    median_err = errs[len(errs) // 2][0]
    worst = "; ".join(f"`{n}` {e:.2e} (gradient norm {g:.2e})" for e, n, g in errs[:3])
    lines = [
        f"# Doge-shaped training step: mask folded vs checked in the data "
        f"({torch.cuda.get_device_name()})",
        "",
        f"DogeModel, {args.layers} layers, hidden 2048, 16 query / 8 kv heads (head dim 128), "
        f"keep_window_size {args.keep}, bf16, batch 1, {args.length} tokens, use_cache=False, "
        f"A ~ N(0, 1); torch {torch.__version__}, triton {triton.__version__}, transformers "
        f"{transformers.__version__}; {datetime.date.today()}; median of {args.repeats}; "
        f"command: `python {' '.join(sys.argv)}`.",
        "",
        "| variant | train step ms | selections / step | peak GiB | first call s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ms']:.1f} | {r['selections']:g} | {r['peak']:.1f} "
                     f"| {r['first']:.1f} |")
    lines += [
        "",
        f"- folded vs data-checked: {before['ms'] / after['ms']:.2f}x the step; last hidden "
        f"state relative difference {rel(after['out'], before['out']):.2e}; parameter "
        f"gradients' relative differences: median {median_err:.2e} over {len(errs)} "
        f"parameters, the largest {worst}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
