"""Whole-model benchmark against the strongest peer: the same transformers model, three ways.

For a Mistral-shaped GQA model (``--family mistral``: 16 query / 4 kv heads) or a Llama-shaped
MHA one (``--family llama``), 8 layers, hidden 2048, bf16, batch 1, times in one run

- ``sparse``: ``torch.compile(model, backend="sparse", options={"pattern": P})``, the model on
  its SDPA path with its own ``sliding_window`` (the backend folds the model's mask);
- ``sparse-on-flex``: the model on transformers' ``attn_implementation="flex_attention"`` path
  with the same window, compiled with ``backend="sparse"`` and the same pattern: the backend
  replaces every ``flex_attention`` call by the op (``mask_mod`` folded);
- ``flex``: transformers' ``attn_implementation="flex_attention"`` with the same window,
  ``torch.compile(model)`` (Inductor); for ``--sinks`` (no transformers config for it) the
  flex path gets a ``BlockMask`` built from the same mask_mod as its ``attention_mask`` (the
  ``sparse-on-flex`` variant too);
- ``sdpa``: the dense causal model (no window) on SDPA, ``torch.compile(model)``: what a
  window saves at all.

Per variant: a training step (forward + backward of mean(h²) of the last hidden state),
inference (``torch.no_grad``), peak memory, first-call time (compile included), with
``--profile`` the attention kernels' share of one step's GPU time, how many attention sites
the backend rewrote (sparse variants), and the agreement of the sparse variants' outputs with
flex's. Prints one markdown table and writes it, with the conditions, to ``--out``.

    python bench/models.py --family mistral --lengths 32768 --windows 1024 4096 \\
        --out bench/results/models-vs-flex-h100.md
    python bench/models.py --family mistral --lengths 32768 --windows 4096 --profile \\
        --variants sparse-on-flex flex --out bench/results/models-sparse-on-flex-h100.md
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

ATTENTION_KERNELS = ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_delta", "_document_bounds",
                     "_tile_bounds_kernel",
                     "flex_attention", "flash", "fmha", "cudnn")
# Inductor's pointwise and reduction fusions are named after every op they touch: a RoPE kernel
# feeding the attention op is called ``triton_poi_fused_..._attention_...`` but is no attention.
# FlexAttention's backward reduction (its rowsum(dO * O), our ``_delta``) is one, and counts.
NOT_ATTENTION_PREFIXES = ("triton_poi_", "triton_red_", "triton_per_")
VARIANTS = ("sparse", "sparse-on-flex", "flex", "sdpa")
SPARSE = ("sparse", "sparse-on-flex")


def build(family: str, layers: int, window: int | None, impl: str,
          own_class: str | None = None) -> Any:
    """The model of ``family`` on attention path ``impl``: ``mistral`` (GQA, its own
    ``sliding_window``), ``llama`` (MHA, no window setting: a window reaches its flex path as a
    BlockMask), ``gemma3`` (Gemma-3-like: GQA, five ``sliding_attention`` layers of ``window``
    keys to one ``full_attention`` layer, transformers' own per-layer windows; ``window=None``
    makes every layer full).

    ``own_class``: the model is an instance of a subclass of that name, so that Dynamo keeps its
    compiled code apart from other variants' in the process. Without it, a model on the SDPA
    path called after one of the same class on the flex path was compiled ran the flex model's
    cached code: that code graph-breaks at the mask function, so its guards never look at the
    attention implementation, and the SDPA model then built its mask in a separate graph and
    handed it to the attention as a dense bias (reproduced on the CPU; 0.90x instead of
    1.10x on the H100)."""
    import transformers

    heads, kv = (16, 16) if family == "llama" else (16, 4)
    common = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=1 << 17)
    if family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=window)
        cls = transformers.MistralModel
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(
            **common, head_dim=128, query_pre_attn_scalar=128, sliding_window=window or 4096,
            layer_types=gemma3_layer_types(layers, window is not None))
        cls = transformers.Gemma3TextModel
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaModel
    if own_class:
        cls = type(f"{cls.__name__}_{own_class.replace('-', '_')}", (cls,), {})
    torch.manual_seed(0)
    model = cls(config).to(device="cuda", dtype=torch.bfloat16)
    model.set_attn_implementation(impl)
    return model


def train_and_infer(compiled: Any, ids: torch.Tensor) -> tuple[Callable[[], None],
                                                                Callable[[], None]]:
    """A training step (forward and backward of mean(h²) of the last hidden state) and an
    inference call (``torch.no_grad``) of a compiled model on ``ids``, without a cache."""
    def train() -> None:
        out = compiled(input_ids=ids, use_cache=False).last_hidden_state
        out.float().square().mean().backward()

    def infer() -> None:
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)

    return train, infer


def gemma3_layer_types(layers: int, local: bool) -> list[str]:
    """Gemma 3's layer pattern: five sliding-window layers, then one global, repeated."""
    return ["full_attention" if not local or i % 6 == 5 else "sliding_attention"
            for i in range(layers)]


def gemma3_assign(layers: int, window: int) -> dict[str, str]:
    """The backend's per-layer patterns for the Gemma-3-like model (``assign``)."""
    return {f"layers.{i}.self_attn": "causal" if kind == "full_attention"
            else f"causal & sliding({window})"
            for i, kind in enumerate(gemma3_layer_types(layers, True))}


def pattern_block_mask(length: int, window: int, sinks: int = 0) -> Any:
    """FlexAttention BlockMask of ``causal & sliding(window)`` (``| sink(sinks)`` inside the
    causal part when ``sinks``): what transformers' flex path gets where its config has no
    setting for the pattern (sinks; windows on Llama)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & ((k < sinks) | (q - k < window))

    return create_block_mask(mask_mod, None, None, length, length, device="cuda")


def fresh_caches(warm: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator running its function inside fresh, empty Inductor and Triton cache
    directories, after our kernels compiled in this process are forgotten (unless ``warm``):
    the variant that runs second must not find the first one's compiled kernels, or its
    first-call time would not compare."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if warm:
            return fn

        def fresh(*a: Any, **kw: Any) -> Any:
            forget_our_compiled_kernels()
            with empty_inductor_cache():
                return fn(*a, **kw)
        return fresh
    return wrap


def forget_our_compiled_kernels() -> int:
    """Drop the in-process compiled binaries of every Triton kernel of ours (the package's
    modules and the generated kernel modules, ``sparse_compile_kernels_*``) and the cached row
    intervals, so that the next call compiles them again (from the Triton cache directory in
    effect then); returns how many kernels were reset."""
    from triton.runtime.jit import JITFunction

    reset = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("sparse_compile"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, JITFunction) and hasattr(value, "device_caches"):
                value.device_caches.clear()
                reset += 1
    from sparse_compile.codegen import precompile
    from sparse_compile.codegen.gluon import rows

    rows._ROWS.clear()
    precompile.forget()
    return reset


def empty_inductor_cache() -> Any:
    """Inductor's context of fresh, empty Inductor and Triton cache directories (named
    ``fresh_cache`` from torch 2.8 on, ``fresh_inductor_cache`` before)."""
    from torch._inductor import utils

    return (getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache)()


def warm_process() -> float:
    """Pay the process's one-time costs before any variant's first call is timed: CUDA's and
    cuBLAS's start, Inductor's compile workers, Triton's driver modules (in a throw-away cache).
    Whichever variant ran first would otherwise carry them; a user's process pays them once,
    whatever it compiles. Returns the seconds spent."""
    start = time.perf_counter()
    with empty_inductor_cache():
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        torch.compile(lambda a: (a @ a).relu().sum(-1))(x)
        torch.cuda.synchronize()
    torch._dynamo.reset()
    return time.perf_counter() - start


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


def attention_share(fn: Callable[[], Any], label: str = "", top: int = 12
                    ) -> tuple[float, float]:
    """(attention kernels' GPU ms, all kernels' GPU ms) of one call, from the profiler. With a
    ``label``, also prints the ``top`` kernels by GPU time (``*`` = counted as attention), so
    that what differs between variants outside the attention can be read off the log."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = attention = 0.0
    kernels = []
    for event in prof.key_averages():
        ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3
        if event.device_type.name != "CUDA" and "CUDA" not in str(event.device_type):
            continue
        total += ms
        counted = (any(name in event.key for name in ATTENTION_KERNELS)
                   and (not event.key.startswith(NOT_ATTENTION_PREFIXES)
                        or "flex_attention_backward" in event.key))
        if counted:
            attention += ms
        kernels.append((ms, event.count, counted, event.key))
    if label:
        for ms, count, counted, key in sorted(kernels, reverse=True)[:top]:
            print(f"  {label}: {ms:8.2f} ms x{count:<4} {'*' if counted else ' '} {key[:90]}",
                  flush=True)
    return attention, total


def run_variant(name: str, args: Any, length: int, window: int | None, pattern: str,
                ids: torch.Tensor) -> dict[str, Any]:
    """Build and compile one variant and make its first call per mode (first-call time, sites,
    peak memory of its own: weights, gradients, activations); returns its results with its step
    functions under ``"steps"`` for the timing, which runs later, interleaved with the other
    variants' (``time_interleaved``)."""
    from sparse_compile.report import collecting

    model_window = None if args.sinks else window
    if args.model_window and name in SPARSE:
        model_window = args.model_window
    block_mask = args.sinks or args.family == "llama"
    options: dict[str, Any] = {"pattern": pattern}
    if args.family == "gemma3":
        options = {"assign": gemma3_assign(args.layers, window)}
    baseline = torch.cuda.memory_allocated()
    if name == "sdpa":
        model = build(args.family, args.layers, None, "sdpa", name)
        compiled = torch.compile(model)
    elif name == "flex":
        model = build(args.family, args.layers, model_window, "flex_attention", name)
        compiled = torch.compile(model)
    else:
        impl = "flex_attention" if name == "sparse-on-flex" else "sdpa"
        model = build(args.family, args.layers, model_window, impl, name)
        compiled = torch.compile(model, backend="sparse", options=options)
    extra = {}
    if name in ("flex", "sparse-on-flex") and block_mask:
        extra["attention_mask"] = pattern_block_mask(length, window, 4 if args.sinks else 0)
    result: dict[str, Any] = {"steps": {}}
    for mode in args.modes:
        def step(mode: str = mode) -> Any:
            if mode == "infer":
                with torch.no_grad():
                    return compiled(input_ids=ids, use_cache=False, **extra).last_hidden_state
            out = compiled(input_ids=ids, use_cache=False, **extra).last_hidden_state
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            return None

        try:
            torch.cuda.reset_peak_memory_stats()
            with collecting() as report:
                result[mode, "first"] = first_call_s(step)
            if name in SPARSE:
                result[mode, "sites"] = f"{len(report.rewritten)}/{len(report)}"
                print("\n".join(f"  {name} {mode}: {row.line()}" for row in report), flush=True)
            step()
            result[mode, "peak"] = (torch.cuda.max_memory_allocated() - baseline) / 2**30
            result["steps"][mode] = step
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            result[mode, "error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"  {name} {mode}: {result[mode, 'error']}", flush=True)
        model.zero_grad(set_to_none=True)
    failed = any(isinstance(key, tuple) and key[1] == "error" for key in result)
    if name in (*SPARSE, "flex") and not failed:
        with torch.no_grad():
            result["output"] = compiled(input_ids=ids, use_cache=False,
                                        **extra).last_hidden_state.float().cpu()
    return result


def compiled_graphs() -> int:
    """How many graphs Dynamo has compiled in this process so far (0 where the counter is
    missing): a step that raises it ran code other than what its first call compiled (a
    recompile, or another variant's cached code failing its guards)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def time_interleaved(results: dict[str, dict[str, Any]], args: Any) -> None:
    """Median step time of every variant and mode, the variants' calls interleaved round by
    round (a GPU slows as a run goes on: timed one after the other, a later variant would pay
    for it), then with ``--profile`` one profiled step each; fills ``"ms"`` (and ``"attn"``,
    ``"total"``) in ``results``."""
    times: dict[tuple[str, str], list[float]] = {}
    # One untimed round first: a later variant's compilation may have made an earlier one's
    # kernels load again (``forget_our_compiled_kernels``).
    for round_ in range(args.repeats + 1):
        for name, result in results.items():
            for mode, step in list(result["steps"].items()):
                try:
                    graphs = compiled_graphs()
                    times.setdefault((name, mode), []).append(cuda_ms(step, 1))
                    recompiled = compiled_graphs() > graphs
                    if recompiled and round_ == 0:
                        print(f"  {name} {mode}: Dynamo compiled again in the untimed round",
                              flush=True)
                    elif recompiled:  # not the code its first call compiled
                        result[mode, "recompiled"] = True
                        print(f"  {name} {mode}: Dynamo compiled again during the timing",
                              flush=True)
                except Exception as e:  # noqa: BLE001 - one variant failing must not lose all
                    result[mode, "error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    print(f"  {name} {mode}: {result[mode, 'error']}", flush=True)
                    del result["steps"][mode]
    for (name, mode), ms in times.items():
        if (mode, "error") not in results[name]:
            results[name][mode, "ms"] = statistics.median(ms[1:])
    if args.profile:
        for name, result in results.items():
            for mode, step in result["steps"].items():
                result[mode, "attn"], result[mode, "total"] = attention_share(
                    step, f"{name} {mode} kernels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["mistral", "llama", "gemma3"], default="mistral")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--sinks", action="store_true", help="causal & (sink(4) | sliding(w))")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS,
                    default=["sparse", "sparse-on-flex", "flex", "sdpa"])
    ap.add_argument("--modes", nargs="+", default=["train", "infer"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", choices=["default", "tl", "gluon"], default="default",
                    help="our kernel family on Hopper (SPARSE_COMPILE_KERNELS)")
    ap.add_argument("--model-window", type=int, default=None,
                    help="the sparse variants' model has this sliding_window of its own and "
                    "the pattern narrows it (a user pattern on top of the model's mask); flex "
                    "gets the pattern's window, i.e. the pattern applied by hand")
    ap.add_argument("--warm-caches", action="store_true",
                    help="share Inductor's and Triton's caches between variants (default: "
                    "each variant compiles into fresh, empty caches, so first-call times "
                    "compare)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.kernels != "default":
        import os

        os.environ["SPARSE_COMPILE_KERNELS"] = args.kernels
    # Every variant compiles the same forward code objects: past the limit Dynamo would run
    # the last ones eagerly, without a word.
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    import transformers

    lines = [
        f"# {args.family}-shaped model: sparse backend vs transformers FlexAttention vs dense "
        f"SDPA ({torch.cuda.get_device_name()})", "",
        f"{args.layers} layers, hidden 2048, "
        f"{'16' if args.family == 'llama' else '16 query / 4 kv'} heads (head dim 128), "
        + ("five sliding-window layers to one global (transformers' layer_types; the "
           "sparse variants get the same per layer through `assign`), "
           if args.family == "gemma3" else "")
        + ("the flex variants get a BlockMask of the pattern (no transformers setting), "
           if args.family == "llama" or args.sinks else "")
        + (f"the sparse variants' model has its own sliding_window={args.model_window}, which "
           "the pattern narrows, flex gets the pattern's window (the pattern applied by hand), "
           if args.model_window else "")
        + f"our kernels: {args.kernels}; "
        + ("caches shared between variants; " if args.warm_caches
           else "each variant compiles into fresh Inductor/Triton caches, our kernels "
           "compiled anew; ")
        + f"bf16, batch 1; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today()}; median of {args.repeats}, the variants' steps interleaved "
        "round by round; train = forward + backward of "
        "mean(h²) of the last hidden state; first = first call (compile included; the "
        "process's one-time costs paid before any variant); peak = "
        "max GPU memory allocated by the variant (its weights, gradients, activations); "
        "attn = attention kernels' share of one step's GPU time "
        "(profiler). first s and peak GiB list " + " / ".join(args.variants) + ", attn ms "
        "the same but sdpa; vs flex (flex's time over the variant's: >1 is faster than flex), "
        "attn vs flex (the attention kernels' in-model time over flex's) and sites (attention "
        "sites the backend rewrote / found) list " + " / ".join(
            v for v in SPARSE if v in args.variants) + ". Command: `python "
        + " ".join(sys.argv) + "`", "",
        "| tokens | pattern | mode | " + " | ".join(f"{v} ms" for v in args.variants)
        + " | vs flex | first s | peak GiB | attn ms | attn vs flex | sites |",
        "|" + "---|" * (len(args.variants) + 9),
    ]
    print("\n".join(lines), flush=True)
    print(f"process warm-up (CUDA, cuBLAS, Inductor workers, Triton driver): "
          f"{warm_process():.1f} s, before any variant", flush=True)

    def write() -> None:
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    for length in args.lengths:
        for window in args.windows:
            pattern = (f"causal & (sink(4) | sliding({window}))" if args.sinks
                       else f"causal & sliding({window})")
            if args.family == "gemma3":
                pattern = f"5 x causal & sliding({window}), 1 x causal"
            ids = torch.randint(0, 32000, (1, length), device="cuda")
            results = {name: fresh_caches(args.warm_caches)(run_variant)(
                name, args, length, window, pattern, ids) for name in args.variants}
            time_interleaved(results, args)
            results = {name: {k: v for k, v in r.items() if k != "steps"}
                       for name, r in results.items()}
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            for mode in args.modes:
                lines.append(_row(length, pattern, mode, results, args.variants))
                print(lines[-1], flush=True)
            recompiled = [f"{name} {mode}" for name, r in results.items()
                          for mode in args.modes if r.get((mode, "recompiled"))]
            if recompiled:  # its time is not that of the code its first call compiled
                lines.append("|  | Dynamo compiled again while timing: " + ", ".join(recompiled)
                             + " |" * (len(args.variants) + 8))
                print(lines[-1], flush=True)
            for name in SPARSE:
                if "output" in results.get(name, {}) and "output" in results.get("flex", {}):
                    a, b = results[name]["output"], results["flex"]["output"]
                    rel = ((a - b).norm() / b.norm()).item()
                    lines.append(f"|  | outputs: {name} vs flex relative error {rel:.2e} (bf16)"
                                 + " |" * (len(args.variants) + 8))
                    print(lines[-1], flush=True)
            write()


def _row(length: int, pattern: str, mode: str, results: dict, variants: list[str]) -> str:
    """One table row: per-variant times, ratios against flex, first-call, memory, attention."""
    def cell(name: str, key: str) -> str:
        r = results.get(name, {})
        if (mode, "error") in r:
            return "error"
        value = r.get((mode, key))
        return "-" if value is None else value if isinstance(value, str) else f"{value:.1f}"

    def ratio(name: str, key: str, inverse: bool = False) -> str:
        mine, flex = results.get(name, {}).get((mode, key)), results.get("flex", {}).get(
            (mode, key))
        if mine is None or flex is None:
            return "-"
        return f"{mine / flex:.2f}x" if inverse else f"{flex / mine:.2f}x"

    sparse = [v for v in SPARSE if v in variants]
    return (f"| {length} | `{pattern}` | {mode} | "
            + " | ".join(cell(v, "ms") for v in variants)
            + " | " + " / ".join(ratio(v, "ms") for v in sparse)
            + " | " + " / ".join(cell(v, "first") for v in variants)
            + " | " + " / ".join(cell(v, "peak") for v in variants)
            + " | " + " / ".join(cell(v, "attn") for v in variants if v != "sdpa")
            + " | " + " / ".join(ratio(v, "attn", inverse=True) for v in sparse)
            + " | " + " / ".join(cell(v, "sites") for v in sparse) + " |")


if __name__ == "__main__":
    main()
