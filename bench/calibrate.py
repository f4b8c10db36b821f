"""Calibration on a model trained here: per-head patterns from ``sparse_compile.calibrate``
against one uniform pattern at the same density.

The training data mix local and long-range structure. A sequence opens with BOS and 6 tokens that
each bind a key to a value (one token per (key, value) pair); the rest is a local stream
(``x[t] = x[t-2] + 1`` mod 24 over the stream's own tokens, 10% of them random) interrupted
every 8 or more tokens by a query ``QUERY key`` whose answer is the key's value: answering
needs the opening, up to the whole sequence back; the stream needs only the last few tokens.
A small ``transformers`` Llama (2 layers, 4 heads, hidden 64) is trained from scratch on the
CPU for a fixed number of steps, then calibrated on held-out batches and evaluated on others.

Rows of the table, each the model compiled with ``backend="sparse"`` (compiler ``eager``: on a
CPU without ``TRITON_INTERPRET`` the sparse op runs its chunked PyTorch path):

- dense: ``pattern="dense"`` (the model's own causal mask only);
- calibrated: ``assign=result.assign`` from ``calibrate``, at each recall target;
- uniform: for each target, ``causal & sliding(w)`` and ``causal & (sink(4) | sliding(w))``
  with ``w`` chosen so that the density at the evaluation length is the calibrated mapping's.

Loss is the mean cross-entropy over scored tokens (stream tokens after the first 4, query
answers), then over each kind separately.

    python bench/calibrate.py [--steps 800] [--length 256] [--recall 0.95 0.9 0.97]
        [--out bench/results/calibrate-cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

BOS, QUERY = 0, 1
KEYS, VALUES, STREAM, PAIRS = 8, 8, 24, 6
KEY0 = 2
PAIR0 = KEY0 + KEYS
VALUE0 = PAIR0 + KEYS * VALUES
STREAM0 = VALUE0 + VALUES
VOCAB = STREAM0 + STREAM
LOCAL, ANSWER = 1, 2  # kinds of scored tokens

WINDOWS = (8, 16, 32, 64, 128)
CANDIDATES = [f"causal & (sink(4) | sliding({w}))" for w in WINDOWS] + [
    f"causal & sliding({w})" for w in WINDOWS] + ["causal"]


def make_batch(n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, kind)``, int64 ``[n, length]``: tokens, and per token 0 (not scored),
    ``LOCAL`` (a stream token predictable from the last few) or ``ANSWER`` (a query answer)."""
    ids = torch.empty(n, length, dtype=torch.int64)
    kind = torch.zeros(n, length, dtype=torch.int64)

    def draw(high: int) -> int:
        return int(torch.randint(high, (), generator=gen))

    for row in range(n):
        keys = torch.randperm(KEYS, generator=gen)[:PAIRS].tolist()
        values = [draw(VALUES) for _ in keys]
        seq = [BOS] + [PAIR0 + k * VALUES + v for k, v in zip(keys, values, strict=True)]
        kinds = [0] * len(seq)
        stream = [draw(STREAM), draw(STREAM)]
        since = 0
        while len(seq) < length:
            if since >= 8 and torch.rand((), generator=gen) < 0.3:
                j = draw(PAIRS)
                seq += [QUERY, KEY0 + keys[j], VALUE0 + values[j]]
                kinds += [0, 0, ANSWER]
                since = 0
                continue
            x = draw(STREAM) if torch.rand((), generator=gen) < 0.1 else (stream[-2] + 1) % STREAM
            stream.append(x)
            seq.append(STREAM0 + x)
            kinds.append(LOCAL if len(stream) > 4 else 0)
            since += 1
        ids[row], kind[row] = torch.tensor(seq[:length]), torch.tensor(kinds[:length])
    return ids, kind


def token_losses(logits: torch.Tensor, ids: torch.Tensor, kind: torch.Tensor) -> dict[str, Any]:
    """Summed cross-entropy and counts over next-token targets, all scored and per kind."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)
    target = kind[:, 1:]
    return {name: (loss[mask].sum().item(), int(mask.sum()))
            for name, mask in (("all", target > 0), ("local", target == LOCAL),
                               ("answer", target == ANSWER))}


def build_model() -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model


def train(model: Any, steps: int, length: int, batch: int) -> float:
    """AdamW at a constant rate after a warm-up, decayed linearly over the last 20% of the
    steps; returns the seconds spent."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / 50, 0.1 + 0.9 * (steps - step) / (0.2 * steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids, kind = make_batch(batch, length, gen)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                               reduction="none").view(batch, -1)[kind[:, 1:] > 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return time.perf_counter() - start


def evaluate(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]],
             options: dict[str, Any] | None) -> dict[str, float]:
    """Mean losses of ``model`` compiled with the sparse backend and ``options`` (uncompiled
    when None)."""
    torch._dynamo.reset()
    run = model if options is None else torch.compile(
        model, backend="sparse", options={"compiler": "eager", "on_unsupported": "error",
                                          **options})
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for ids, kind in batches:
            for name, (total, count) in token_losses(run(input_ids=ids).logits, ids,
                                                     kind).items():
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += total
                acc[1] += count
    return {name: total / count for name, (total, count) in sums.items()}


def kept_by_row_kind(model: Any, ids: torch.Tensor, kind: torch.Tensor,
                     result: Any) -> list[str]:
    """A markdown table: per layer and head, the chosen pattern and the mean mass it keeps
    over all rows, over key rows (the row before an answer) and over the other rows, read
    from the model's own attention weights (eager attention, ``output_attentions``)."""
    from sparse_compile.patterns import dense

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    key_rows = torch.zeros_like(kind, dtype=torch.bool)
    key_rows[:, :-1] = kind[:, 1:] == ANSWER
    table = ["| layer | head | chosen | kept, all rows | kept, key rows | kept, other rows |",
             "|---:|---:|---|---:|---:|---:|"]
    for layer, (site, weights) in enumerate(zip(result.sites, attentions, strict=True)):
        for head in range(weights.shape[1]):
            j = site.chosen[head]
            pattern = dense if j is None else result.candidates[j].for_head(head)
            keep = pattern.mask(ids.shape[1], ids.shape[1])
            kept = (weights[:, head].double() * keep).sum(-1)
            table.append(f"| {layer} | {head} | `{_cell(str(pattern))}` | "
                         f"{kept.mean():.3f} | {kept[key_rows].mean():.3f} | "
                         f"{kept[~key_rows].mean():.3f} |")
    return table


def matching_window(template: str, density: float, length: int) -> tuple[str, float]:
    """The pattern ``template.format(w)`` whose density at ``length`` is closest to
    ``density``, and that density."""
    from sparse_compile.patterns import parse

    from sparse_compile.calibration.choice import pattern_density

    best = min(range(1, length + 1), key=lambda w: abs(
        pattern_density(parse(template.format(w)), length, length) - density))
    text = template.format(best)
    return text, pattern_density(parse(text), length, length)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _device() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--recall", type=float, nargs="+", default=[0.95, 0.9, 0.97],
                    help="recall targets; the first one's tables are saved in full")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for this size on a shared machine)")
    ap.add_argument("--out", default="bench/results/calibrate-cpu.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    import triton

    import sparse_compile as sc

    model = build_model()
    train_seconds = train(model, args.steps, args.length, args.batch)
    gen = torch.Generator().manual_seed(2)
    calibration = [make_batch(16, args.length, gen) for _ in range(4)]
    evaluation = [make_batch(args.batch, args.length, gen) for _ in range(4)]

    start = time.perf_counter()
    result = sc.calibrate(model, batches=[ids for ids, _ in calibration], candidates=CANDIDATES,
                          recall=args.recall[0])
    calibrate_seconds = time.perf_counter() - start
    print(result)

    runs = [("eager (not compiled)", "-", 1.0, None),
            ("dense", "`dense` (the model's causal mask)", 1.0, {"pattern": "dense"})]
    mappings = {}
    for target in args.recall:
        chosen = result.at_recall(target)
        mappings[target] = chosen.assign
        runs.append((f"calibrated, recall ≥ {target:g}", "per head (below)", chosen.density,
                     {"assign": chosen.assign}))
        for template in ("causal & sliding({})", "causal & (sink(4) | sliding({}))"):
            text, density = matching_window(template, chosen.density, args.length)
            runs.append((f"uniform at the density of recall {target:g}", f"`{_cell(text)}`",
                         density, {"pattern": text}))
    rows = [(name, pattern, density, evaluate(model, evaluation, options))
            for name, pattern, density, options in runs]
    dense_loss = rows[1][3]["all"]
    table = ["| run | pattern | density | loss | Δ vs dense | local loss | answer loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, pattern, density, loss in rows:
        table.append(f"| {name} | {pattern} | {density:.3f} | {loss['all']:.4f} | "
                     f"{loss['all'] - dense_loss:+.4f} | {loss['local']:.4f} | "
                     f"{loss['answer']:.4f} |")
    verdicts = []
    for i, target in enumerate(args.recall):
        calibrated, *uniform = rows[2 + 3 * i: 5 + 3 * i]
        gap = calibrated[3]["all"] - dense_loss
        for row in uniform:
            other = row[3]["all"] - dense_loss
            verdicts.append(
                f"recall {target:g}: calibrated ({gap:+.4f} vs dense) is "
                f"{'closer to' if abs(gap) < abs(other) else 'NOT closer to'} dense than "
                f"{row[1]} ({other:+.4f}) at the same density")
    print("\n".join(table))
    print("\n".join(verdicts))
    rows_table = kept_by_row_kind(model, *calibration[0], result.at_recall(args.recall[0]))
    print("\n".join(rows_table))

    command = "python " + " ".join(sys.argv)
    lines = [
        "# Calibration on a model trained on the CPU",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: {_device()}; load average at the end: {os.getloadavg()[0]:.1f} "
        "(the machine is shared)",
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, triton {triton.__version__}",
        f"- command: `{command}`",
        f"- model: LlamaForCausalLM, 2 layers, 4 heads (4 kv heads), hidden 64, vocab {VOCAB}, "
        f"SDPA attention; trained from scratch, {args.steps} steps of {args.batch} x "
        f"{args.length} tokens, in {train_seconds:.0f} s",
        f"- calibration: 4 held-out batches of 16 x {args.length}, {len(CANDIDATES)} "
        f"candidates, {calibrate_seconds:.1f} s; evaluation: 4 other batches of "
        f"{args.batch} x {args.length}",
        "- every compiled run: `backend=\"sparse\"`, compiler `eager`; without a GPU or "
        "`TRITON_INTERPRET` the sparse op runs its chunked PyTorch path",
        f"- density: kept fraction of the L x L entries at L = {args.length} (as `explain` "
        "shows it: `causal` is 0.502 at 256, `dense` 1)",
        "",
        *table,
        "",
        *[f"- {verdict}" for verdict in verdicts],
        "",
        f"Where the mass goes: at recall {args.recall[0]:g}, the mass each head's chosen "
        "pattern keeps, over all rows (the calibration's figure), on the key rows of queries "
        "(the query's key; its next token is the answer, bound up to the whole sequence back) "
        "and on the other rows (one calibration batch, the model's own attention weights):",
        "",
        *rows_table,
        "",
        "The calibrated mappings (`result.at_recall(r).assign`):",
        "",
        "```python",
        *[f"{target:g}: {mapping!r}" for target, mapping in mappings.items()],
        "```",
        "",
        f"The calibration table at recall {args.recall[0]:g} (`print(result)`):",
        "",
        "```",
        str(result),
        "```",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        result.draw(os.path.splitext(args.out)[0] + ".png")
    except ImportError as err:
        print(err)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
