"""Train a small Doge model on associative recall: eager references vs the DMA rewrite.

Sequences ``k1 v1 k2 v2 ... kn vn q`` (keys from the lower half of the vocabulary, values from
the upper half); the model must emit the value paired with the query key ``q``. With
``keep_window_size`` < sequence length the dynamic mask is active, and its parameters (A,
dt_proj) train. Per seed, three runs start from the same weights and see the same batches:

* ``eager-index``: Doge eager with its top-k made stable (ties: lower key index first, the rule
  of ``dma_attention``), the reference the rewritten model must match;
* ``eager-topk``: Doge eager as shipped (CPU ``torch.topk`` picks an arbitrary subset of ties);
* ``sparse``: compiled, every DMA site rewritten by ``sparse_compile.dynamic_mask.detect``;
* ``control``: ``eager-index`` again from weights perturbed by one part in 1e6: how far two runs
  of the same computation drift apart (AdamW turns round-off in near-zero gradients into
  full-size steps, and top-k choices flip on near-ties), i.e. the noise level.

At initialisation A = 0, so every delta is 1 and the selection is decided by ties alone: the
tie rule decides which keys the model trains with. Saves the curves to
bench/results/dma-training.png and a table to bench/results/dma-training.md.

    python bench/dma_train.py --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
import types
from pathlib import Path

import torch
import transformers
from transformers import DogeConfig, DogeForCausalLM

from sparse_compile.dynamic_mask.detect import rewrite_dma_sites

VOCAB = 64


def recall_batch(gen: torch.Generator, batch: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, 2 * pairs + 1]`` and the target value id per row."""
    keys = torch.stack([torch.randperm(VOCAB // 2, generator=gen)[:pairs] for _ in range(batch)])
    values = torch.randint(VOCAB // 2, VOCAB, (batch, pairs), generator=gen)
    ids = torch.stack([keys, values], dim=-1).reshape(batch, 2 * pairs)
    pick = torch.randint(0, pairs, (batch,), generator=gen)
    query = keys[torch.arange(batch), pick]
    return torch.cat([ids, query[:, None]], dim=1), values[torch.arange(batch), pick]


def make_model(keep: int, seed: int) -> DogeForCausalLM:
    torch.manual_seed(seed)
    config = DogeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        keep_window_size=keep, max_position_embeddings=256, is_moe=False)
    config._attn_implementation = "eager"
    return DogeForCausalLM(config)


def index_tie_dynamic_mask(self, hidden_states, dt_states, keep_window_size=2048,
                           attention_mask=None):
    """Doge's ``prepare_dynamic_mask`` with a stable top-k: among equal scores the lower key
    index wins (``dma_attention``'s documented rule). Everything else is Doge's code."""
    min_dtype = torch.finfo(hidden_states.dtype).min
    attn_mask = dt_states[:, :, None, :].expand(-1, -1, hidden_states.shape[1], -1)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, min_dtype).to(hidden_states.dtype)
        attn_mask = attn_mask.masked_fill(attention_mask[:, :, :, : attn_mask.shape[-1]] != 0,
                                          min_dtype)
    if attn_mask.shape[-1] > keep_window_size:
        order = torch.sort(attn_mask, dim=-1, descending=True, stable=True).indices
        active = torch.zeros_like(attn_mask).scatter(-1, order[..., :keep_window_size], 1.0)
        attn_mask = attn_mask.masked_fill(active == 0.0, min_dtype)
    return attn_mask


def with_index_ties(model: DogeForCausalLM) -> DogeForCausalLM:
    for module in model.modules():
        if hasattr(module, "prepare_dynamic_mask"):
            module.prepare_dynamic_mask = types.MethodType(index_tie_dynamic_mask, module)
    return model


def train(model, forward, steps, batch, pairs, lr, seed) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        ids, target = recall_batch(gen, batch, pairs)
        logits = forward(input_ids=ids, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def perturbed(model: DogeForCausalLM, seed: int) -> DogeForCausalLM:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-6 * torch.randn(p.shape, generator=gen))
    return model


def first_step_gradients(args, base, compiled_forward, sparse_model, seed) -> float:
    """Largest relative gradient difference (over parameters) between eager-index and the
    rewritten model on the first batch, before any update."""
    ids, target = recall_batch(torch.Generator().manual_seed(1000 + seed), args.batch, args.pairs)
    index_model = with_index_ties(copy.deepcopy(base))
    grads = []
    for model, forward in ((index_model, index_model), (sparse_model, compiled_forward)):
        model.zero_grad()
        logits = forward(input_ids=ids, use_cache=False).logits[:, -1]
        torch.nn.functional.cross_entropy(logits, target).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    sparse_model.zero_grad()
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
               for a, b in zip(grads[1], grads[0], strict=True))


def run_seed(args, seed: int) -> tuple[dict[str, list[float]], int, float]:
    """Loss curves of the four runs for one seed, the number of rewritten sites and the
    first-step gradient difference."""
    base = make_model(args.keep, seed)
    curves = {}
    control = with_index_ties(perturbed(copy.deepcopy(base), seed))
    curves["control"] = train(control, control, args.steps, args.batch, args.pairs, args.lr,
                              1000 + seed)
    index_model = with_index_ties(copy.deepcopy(base))
    curves["eager-index"] = train(index_model, index_model, args.steps, args.batch, args.pairs,
                                  args.lr, 1000 + seed)
    topk_model = copy.deepcopy(base)
    curves["eager-topk"] = train(topk_model, topk_model, args.steps, args.batch, args.pairs,
                                 args.lr, 1000 + seed)
    sites = []

    def backend(gm, example_inputs):
        sites.extend(rewrite_dma_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    sparse_model = copy.deepcopy(base)
    compiled = torch.compile(sparse_model, backend=backend)
    grad_diff = first_step_gradients(args, base, compiled, sparse_model, seed)
    curves["sparse"] = train(sparse_model, compiled, args.steps, args.batch, args.pairs,
                             args.lr, 1000 + seed)
    return curves, sum(s.reason is None for s in sites), grad_diff


def smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(values):
        acc += x - (values[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


LABELS = {"eager-index": "Doge eager, stable top-k (lower index wins ties)",
          "control": "same, weights perturbed by 1e-6 (noise level)",
          "eager-topk": "Doge eager, CPU torch.topk (arbitrary ties)",
          "sparse": "compiled, DMA sites rewritten to dma_attention"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    results, rewritten, grad_diffs = {}, [], []
    for seed in args.seeds:
        results[seed], n, g = run_seed(args, seed)
        rewritten.append(n)
        grad_diffs.append(g)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    tail = max(1, args.steps // 10)
    final = {s: {r: sum(c[-tail:]) / tail for r, c in runs.items()} for s, runs in results.items()}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"eager-index": "tab:blue", "control": "tab:green", "eager-topk": "tab:gray",
              "sparse": "tab:orange"}
    for run in ("eager-topk", "control", "eager-index", "sparse"):
        for runs in results.values():
            ax.plot(smooth(runs[run], 10), color=colors[run], alpha=0.3, lw=0.8)
        mean = [sum(runs[run][i] for runs in results.values()) / len(results)
                for i in range(args.steps)]
        ax.plot(smooth(mean, 10), color=colors[run], lw=2,
                ls="--" if run in ("eager-topk", "control") else "-",
                label=LABELS[run] + " (mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (10-step mean; thin: seeds)")
    ax.set_title(f"associative recall, {args.pairs} pairs, keep={args.keep}, "
                 f"seeds {', '.join(map(str, args.seeds))}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    results_dir = Path(__file__).parent / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(results_dir / "dma-training.png", dpi=120)

    rows = [f"| {s} | {f['eager-index']:.3f} | {f['sparse']:.3f} | "
            f"{f['sparse'] - f['eager-index']:+.3f} | {f['control'] - f['eager-index']:+.3f} | "
            f"{f['eager-topk']:.3f} |" for s, f in final.items()]
    n = len(final)

    def mean_of(key):
        return sum(f[key] for f in final.values()) / n

    def mean_abs(key):
        return sum(abs(f[key] - f["eager-index"]) for f in final.values()) / n

    rows.append(f"| mean | {mean_of('eager-index'):.3f} | {mean_of('sparse'):.3f} | "
                f"abs {mean_abs('sparse'):.3f} | abs {mean_abs('control'):.3f} | "
                f"{mean_of('eager-topk'):.3f} |")
    text = "\n".join([
        "# DMA training check (CPU)", "",
        f"- date: {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- command: `python {' '.join(sys.argv)}`",
        "- model: DogeForCausalLM, 2 layers, hidden 64, 4 heads / 2 kv heads, "
        f"keep_window_size {args.keep}; sequences of {2 * args.pairs + 1} tokens; per seed the "
        "three runs share init and batches.",
        f"- DMA sites rewritten per compiled run: {rewritten}",
        "- first-step gradients, rewritten vs eager-index (max over parameters of the relative "
        f"difference): {', '.join(f'{g:.1e}' for g in grad_diffs)}",
        "- curves: dma-training.png", "",
        f"Mean loss over the last {tail} steps:", "",
        "| seed | eager, stable top-k | compiled (rewritten) | rewritten - eager | "
        "control - eager | eager, CPU topk |",
        "|---|---|---|---|---|---|", *rows, "",
    ])
    (results_dir / "dma-training.md").write_text(text)
    print(text)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
