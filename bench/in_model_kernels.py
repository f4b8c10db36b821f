"""Our attention kernels inside a compiled model against the same kernels on the same tensors.

Builds the Mistral-shaped model of ``bench/models.py`` (GQA, bf16, batch 1), compiles it with
``backend="sparse"`` and the pattern, and records the arguments of the first forward and
backward kernel calls the model makes (``codegen/attention.py``'s ``forward`` and
``backward``: the model's actual q, k, v, dout, with their strides). Then, from the profiler:

- in the model: the GPU time of our attention kernels during one training step (and one
  inference), per layer;
- standalone: the same kernel calls on the recorded tensors, per call.

A ratio near 1 means the model hands the kernels what they run best on (no mask to read, no
copies); the in-model issue asks for within 5%. The standalone calls are timed twice: right
away, and after ``--warm`` seconds of the same calls (the GPU then runs at the clock a busy
model step leaves it at); during each measurement a sampler reads the SM clock and power
from ``nvidia-smi``, so a difference of clocks can be told from one of the kernels' inputs;
a third timing overwrites the L2 before each forward and backward, as the model's own kernels
do, so a difference of cache state can be told too.
Writes a table with device, versions, date and command to ``--out``.

    python bench/in_model_kernels.py --length 32768 --window 4096
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from sparse_compile.codegen import attention as kernels

sys.path.insert(0, str(Path(__file__).parent))
from models import build, train_and_infer  # noqa: E402

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


class ClockSampler:
    """Samples the GPU's SM clock (MHz) and power (W) from ``nvidia-smi`` in a thread while
    a measurement runs; ``summary()`` gives the medians (empty when nvidia-smi is absent)."""

    def __init__(self, period_s: float = 0.05) -> None:
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 "--id=0"]
        while not self._stop.is_set():
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                clock, power = (float(x) for x in line.strip().split(",")[:2])
                self.samples.append((clock, power))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            time.sleep(self.period_s)

    def __enter__(self) -> ClockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "-"
        clock = statistics.median(c for c, _ in self.samples)
        power = statistics.median(p for _, p in self.samples)
        return f"{clock:.0f} MHz, {power:.0f} W"


def measured(fn: Callable[[], Any], calls: int, repeat: int = 1) -> tuple[dict[str, float], str]:
    """``kernel_ms`` of ``calls`` runs (the profiled window repeated ``repeat`` times under the
    clock sampler, the last window's times kept) and the clock and power during them."""
    with ClockSampler() as clocks:
        for _ in range(repeat):
            times = kernel_ms(fn, calls)
    return times, clocks.summary()


def warm_up(fn: Callable[[], Any], seconds: float) -> None:
    """Run ``fn`` for about ``seconds`` of wall time (synchronising), to bring the GPU to the
    clock and temperature of sustained work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize()


def clone_like(t: Any) -> Any:
    """A copy with the same strides (what the kernels see), or ``t`` if it is no tensor."""
    if not isinstance(t, torch.Tensor):
        return t
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return copy.copy_(t)


def route_is_gluon(args: tuple, kw: dict) -> bool:
    """Whether the recorded forward call takes the Gluon kernels: the forward's own tests
    (``_gluon_call``, ``_gluon_rows``) and operands TMA can walk."""
    from sparse_compile.codegen.gluon.forward import row_view
    from sparse_compile.codegen.launch.positions import DEFAULT_FRAME

    q, k, v, pattern = args[:4]
    bias = kw.get("bias", args[5] if len(args) > 5 else None)
    dropout_p = kw.get("dropout_p", args[6] if len(args) > 6 else 0.0)
    frame = kw.get("frame") or DEFAULT_FRAME
    cfg = kernels.select_config(pattern, q, k.shape[2])
    plain = kernels._gluon_call(cfg, bias, dropout_p, kw.get("softcap", 0.0), kw.get("alibi"),
                                kw.get("rel_bias"), frame, q.shape[2], k.shape[2])
    return (plain and kernels._gluon_rows(q, k, v, pattern, frame) is not None
            and all(row_view(t) is not None for t in (q, k, v)))


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
    ap.add_argument("--warm", type=float, default=3.0,
                    help="seconds of standalone calls before the second standalone timing")
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
    train, infer = train_and_infer(compiled, ids)

    for _ in range(2):
        train()
        infer()
    in_train_ms, train_clock = measured(train, 3, repeat=2)
    in_train = {k: v / args.layers for k, v in in_train_ms.items()}
    in_infer = {k: v / args.layers for k, v in kernel_ms(infer, 3).items()}
    f_args, f_kw = seen["forward"]
    b_args, b_kw = seen["backward"]
    print(f"recorded forward: Gluon route {route_is_gluon(f_args, f_kw)}, bias "
          f"{f_kw.get('bias', f_args[5] if len(f_args) > 5 else None) is not None}, q strides "
          f"{f_args[0].stride()}, k strides {f_args[1].stride()}", flush=True)

    def alone() -> None:
        kernels.forward(*f_args, **f_kw)
        kernels.backward(*b_args, **b_kw)

    l2_sized = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def alone_flushed() -> None:
        # In the model the kernels before ours leave the L2 holding other data; back to back,
        # a call finds the previous one's operands there. Overwriting 256 MiB (5x the H100's
        # L2) before the forward and before the backward starts each from the model's state.
        l2_sized.zero_()
        kernels.forward(*f_args, **f_kw)
        l2_sized.zero_()
        kernels.backward(*b_args, **b_kw)

    cold, cold_clock = measured(alone, 10)
    warm_up(alone, args.warm)
    warm, warm_clock = measured(alone, 10, repeat=2)
    flushed, flushed_clock = measured(alone_flushed, 10, repeat=2)
    q, k = f_args[0], f_args[1]
    bias = f_kw.get("bias", f_args[5] if len(f_args) > 5 else None)
    frame = f_kw.get("frame")
    default = frame is None or frame.is_default(q.shape[2], k.shape[2])
    shapes = (f"q {tuple(q.shape)} strides {q.stride()}, k {tuple(k.shape)} strides "
              f"{k.stride()}, v strides {f_args[2].stride()}, pattern `{f_args[3]}`, bias "
              f"{'none' if bias is None else tuple(bias.shape)}, positions "
              f"{'default' if default else 'given'}"
              f", Gluon route {'yes' if route_is_gluon(f_args, f_kw) else 'no'}")
    rows = ["| kernel | in model, training (ms per layer) | in model, inference | standalone, "
            "same tensors (ms per call) | after warm-up | warmed, L2 flushed | training / "
            "standalone | training / warmed standalone | training / warmed flushed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in OUR_KERNELS:
        if not cold.get(name) and name not in in_train:
            continue
        rows.append(f"| `{name}` | {in_train.get(name, 0.0):.3f} | "
                    f"{in_infer.get(name, 0.0):.3f} | {cold.get(name, 0.0):.3f} | "
                    f"{warm.get(name, 0.0):.3f} | {flushed.get(name, 0.0):.3f} | "
                    f"{_ratio(in_train, cold, name)} | {_ratio(in_train, warm, name)} | "
                    f"{_ratio(in_train, flushed, name)} |")
    total = {"all": sum(in_train.values())}
    rows.append(f"| all | {total['all']:.3f} | {sum(in_infer.values()):.3f} | "
                f"{sum(cold.values()):.3f} | {sum(warm.values()):.3f} | "
                f"{sum(flushed.values()):.3f} | "
                f"{_ratio(total, {'all': sum(cold.values())}, 'all')} | "
                f"{_ratio(total, {'all': sum(warm.values())}, 'all')} | "
                f"{_ratio(total, {'all': sum(flushed.values())}, 'all')} |")
    rows.append(f"| SM clock, power (median) | {train_clock} | | {cold_clock} | {warm_clock} "
                f"| {flushed_clock} | | | |")
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
            f"standalone per call (10 calls), again after {args.warm:g} s of the same calls, "
            "then with the L2 overwritten (256 MiB) before each forward and each backward "
            "(the model's kernels before ours leave other data there); clock and power sampled "
            "from nvidia-smi during each", ""]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _ratio(a: dict[str, float], b: dict[str, float], name: str) -> str:
    return f"{a.get(name, 0.0) / b[name]:.3f}" if b.get(name) else "-"


if __name__ == "__main__":
    main()
