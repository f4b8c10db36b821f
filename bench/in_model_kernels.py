"""Our attention kernels inside a compiled model against the same kernels on the same tensors.

Builds the Mistral-shaped model of ``bench/models.py`` (GQA, bf16, batch 1), compiles it with
``backend="sparse"`` and the pattern, and records the arguments of the first forward and
backward kernel calls the model makes (``codegen/attention.py``'s ``forward`` and
``backward``: the model's actual q, k, v, dout, with their strides). Then, from the profiler:

- in the model: the GPU time of our attention kernels during one training step (and one
  inference), per layer;
- standalone: the same kernel calls on the recorded tensors, per call.

A ratio near 1 means the model hands the kernels what they run best on (no mask to read, no
copies); the in-model issue asks for within 5%. Writes a table with device, versions, date and
command to ``--out``.

    python bench/in_model_kernels.py --length 32768 --window 4096
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import triton
from sparse_compile.codegen import attention as kernels

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402

OUR_KERNELS = ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_delta_kernel")


def kernel_ms(fn, calls: int = 1) -> dict[str, float]:
    """GPU ms per kernel name (ours only) of ``calls`` runs of ``fn``, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        name = next((k for k in OUR_KERNELS if k in event.key), None)
        if name is None or "CUDA" not in str(event.device_type):
            continue
        ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3
        out[name] = out.get(name, 0.0) + ms / calls
    return out


def clone_like(t: Any) -> Any:
    """A copy with the same strides (what the kernels see), or ``t`` if it is no tensor."""
    if not isinstance(t, torch.Tensor):
        return t
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return copy.copy_(t)


def record_first_calls() -> dict[str, tuple]:
    """Wrap kernels.forward / backward to keep the arguments of their first call."""
    seen: dict[str, tuple] = {}
    for name in ("forward", "backward"):
        real = getattr(kernels, name)

        def wrapped(*args, _real=real, _name=name, **kw):
            if _name not in seen:
                seen[_name] = (tuple(clone_like(a) for a in args),
                               {k: clone_like(v) for k, v in kw.items()})
            return _real(*args, **kw)

        setattr(kernels, name, wrapped)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kernels", choices=["default", "tl", "gluon"], default="default",
                    help="our kernel family on Hopper (SPARSE_COMPILE_KERNELS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.kernels != "default":
        import os

        os.environ["SPARSE_COMPILE_KERNELS"] = args.kernels
    pattern = f"causal & sliding({args.window})"
    model = build("mistral", args.layers, args.window, "sdpa")
    seen = record_first_calls()
    compiled = torch.compile(model, backend="sparse", options={"pattern": pattern})
    ids = torch.randint(0, 32000, (1, args.length), device="cuda")

    def train() -> None:
        out = compiled(input_ids=ids, use_cache=False).last_hidden_state
        out.float().square().mean().backward()

    def infer() -> None:
        with torch.no_grad():
            compiled(input_ids=ids, use_cache=False)

    for _ in range(2):
        train()
        infer()
    in_train = {k: v / args.layers for k, v in kernel_ms(train, 3).items()}
    in_infer = {k: v / args.layers for k, v in kernel_ms(infer, 3).items()}
    f_args, f_kw = seen["forward"]
    b_args, b_kw = seen["backward"]
    alone_f = kernel_ms(lambda: kernels.forward(*f_args, **f_kw), 10)
    alone_b = kernel_ms(lambda: kernels.backward(*b_args, **b_kw), 10)
    q, k = f_args[0], f_args[1]
    bias = f_kw.get("bias", f_args[5] if len(f_args) > 5 else None)
    shapes = (f"q {tuple(q.shape)} strides {q.stride()}, k {tuple(k.shape)} strides "
              f"{k.stride()}, pattern `{f_args[3]}`, bias {'none' if bias is None else 'yes'}")
    rows = ["| kernel | in model, training (ms per layer) | in model, inference | standalone, "
            "same tensors (ms per call) | training / standalone |", "|---|---|---|---|---|"]
    for name in OUR_KERNELS:
        alone = alone_f.get(name, 0.0) + alone_b.get(name, 0.0)
        if not alone and name not in in_train:
            continue
        ratio = in_train.get(name, 0.0) / alone if alone else float("nan")
        rows.append(f"| `{name}` | {in_train.get(name, 0.0):.3f} | "
                    f"{in_infer.get(name, 0.0):.3f} | {alone:.3f} | {ratio:.3f} |")
    total_model = sum(in_train.values())
    total_alone = sum(alone_f.values()) + sum(alone_b.values())
    rows.append(f"| all | {total_model:.3f} | {sum(in_infer.values()):.3f} | "
                f"{total_alone:.3f} | {total_model / total_alone:.3f} |")
    gpu = torch.cuda.get_device_name()
    head = [f"# Attention kernels in the model vs standalone ({gpu})", "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, triton {triton.__version__}, python "
            f"{platform.python_version()}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- MistralModel, {args.layers} layers, hidden 2048, 16 / 4 heads, bf16, B = 1, "
            f"L = {args.length}, `backend=\"sparse\"`, pattern `{pattern}`, our kernels: "
            f"{args.kernels}",
            f"- first recorded call: {shapes}",
            "- GPU time of our kernels from the profiler: in the model per layer (3 steps), "
            "standalone per call (10 calls)", ""]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
