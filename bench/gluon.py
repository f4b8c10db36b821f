"""Benchmark: the Hopper Gluon kernels against our ``tl`` kernels, FlexAttention and cuDNN SDPA.

One process, side by side on the same inputs (bf16, ``B·L = --tokens``, H = 16): per pattern,
head dim and length, the Gluon output and gradients are checked against the ``tl`` kernels'
and FlexAttention's, then the forward and forward+backward are timed (median of
``triton.testing.do_bench``): ours through Gluon (the default on sm90), ours with
``TileConfig(gluon=False)`` (the ``tl`` kernels), compiled FlexAttention with the same
mask_mod (block mask built once, outside the timed region) and, for ``dense`` and ``causal``,
cuDNN SDPA. Effective TFLOP/s count the kept entries only (forward 4·B·H·D·kept, backward
2.5 times that). Writes the table with device, versions, date and command to ``--out``
(default ``bench/results/gluon-<gpu>.md``).

    python bench/gluon.py
    python bench/gluon.py --dims 128 --lengths 16384 --patterns "causal" --no-bwd
    python bench/gluon.py --sweep --dims 128 --lengths 16384   # the kernels' tile options
    python bench/gluon.py --mods softcap   # logits capped at 50 (Gemma 2), Flex by score_mod

``--mods softcap`` / ``alibi`` time calls with logit soft-capping (cap 50) or ALiBi slopes
(2^(-8(h+1)/H)) computed in the kernels, FlexAttention with the same ``score_mod``;
``--mods keys`` a padding mask (batch row i keeps all but its last (i + 1)/16 of the keys) as
the ``[B, 1, 1, L]`` key mask a model's ``attention_mask`` folds to, FlexAttention with the
same keys in its ``mask_mod``. cuDNN sits those rows out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton
from sparse_compile.codegen import attention as kernels
from sparse_compile.codegen.gluon.support import KERNELS_ENV, gluon_device
from sparse_compile.codegen.launch.config import default_config
from sparse_compile.patterns import parse
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sparse_compile.functional import attention

sys.path.insert(0, str(Path(__file__).parent))
from attention import check_mask_mod, mask_mod_for  # noqa: E402

PATTERNS = ["causal & sliding(4096)", "local(1024)", "block(512)", "causal & sliding(1024)",
            "causal & (sink(4) | sliding(1024))", "causal", "dense"]


def kept_entries(text: str, length: int) -> float:
    """Kept entries of the ``length x length`` pattern, from its exact layout (no L x L mask)."""
    return parse(text).layout(length, length, 128, 128).density * length * length


def median_ms(fn, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=rep // 4, rep=rep, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd(fn, q, k, v, dout):
    """Forward and backward of ``fn(q, k, v)`` with ``dout`` (q, k, v require grad)."""
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)


SOFTCAP = 50.0


def logit_mods(kind: str, heads: int) -> tuple[dict, object]:
    """(keyword arguments of our calls, FlexAttention's ``score_mod``) of ``--mods``."""
    if kind == "softcap":
        return {"softcap": SOFTCAP}, lambda s, b, h, q, k: SOFTCAP * torch.tanh(s / SOFTCAP)
    if kind == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)],
                              device="cuda")
        return {"alibi": slopes}, lambda s, b, h, q, k: s + slopes[h] * (k - q)
    return {}, None


def padding_keys(b: int, length: int) -> torch.Tensor:
    """``[B, L]``: batch row i keeps all but its last (i + 1)/16 of the keys (``--mods keys``)."""
    keep = torch.ones(b, length, dtype=torch.bool, device="cuda")
    for i in range(b):
        keep[i, length - (i + 1) * length // 16:] = False
    return keep


def run(text: str, length: int, d: int, heads: int, tokens: int, rep: int,
        flex_compiled, do_bwd: bool, mods: str = "none") -> dict:
    b = max(1, tokens // length)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    scale = d ** -0.5
    tl_cfg = replace(default_config(q.device, d, q.dtype), gluon=False)
    mod_kw, score_mod = logit_mods(mods, heads)
    mask_mod = mask_mod_for(text)
    if mods == "keys":
        keep = padding_keys(b, length)
        mod_kw = {"bias": keep[:, None, None, :]}
        base_mod = mask_mod

        def mask_mod(b_, h, q_idx, kv_idx):
            return base_mod(b_, h, q_idx, kv_idx) & keep[b_, kv_idx]
    kernels_forward = partial(kernels.forward, **mod_kw)
    attention_mod = partial(attention, softcap=mod_kw.get("softcap"), alibi=mod_kw.get("alibi"),
                            bias=mod_kw.get("bias"))
    flex_mod = partial(flex_compiled, score_mod=score_mod)
    out_g, _ = kernels_forward(q, k, v, text, scale)
    out_t, _ = kernels_forward(q, k, v, text, scale, cfg=tl_cfg)
    check_mask_mod(text)
    mask = create_block_mask(mask_mod, b if mods == "keys" else None, None, length, length,
                             device="cuda")
    out_f = flex_mod(q, k, v, block_mask=mask, scale=scale)
    label = text if mods == "none" else f"{text}, {mods}"
    row = {"pattern": label, "L": length, "B": b, "D": d,
           "err_tl": rel(out_g, out_t), "err_flex": rel(out_g, out_f)}
    flops = 4 * b * heads * d * kept_entries(text, length)
    if do_bwd:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        dout = torch.randn_like(q)
        with_gluon = fwd_bwd(lambda a, b_, c: attention_mod(a, b_, c, text, scale), qg, kg,
                             vg, dout)
        with_flex = fwd_bwd(lambda a, b_, c: flex_mod(a, b_, c, block_mask=mask, scale=scale),
                            qg, kg, vg, dout)
        row["err_grad_flex"] = max(rel(a, b_) for a, b_ in zip(with_gluon, with_flex, strict=True))
    timings = {
        "gluon": lambda: kernels_forward(q, k, v, text, scale),
        "tl": lambda: kernels_forward(q, k, v, text, scale, cfg=tl_cfg),
        "flex": lambda: flex_mod(q, k, v, block_mask=mask, scale=scale),
    }
    if text in ("dense", "causal") and not mod_kw:
        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=text == "causal", scale=scale)
        timings["cudnn"] = cudnn
    for name, fn in timings.items():
        ms = median_ms(fn, rep)
        row[name] = ms
        row[name + "_tflops"] = flops / ms / 1e9
    if do_bwd:
        def ours():
            return fwd_bwd(lambda a, b_, c: attention_mod(a, b_, c, text, scale), qg, kg, vg,
                           dout)

        def tl_ours():
            os.environ[KERNELS_ENV] = "tl"
            try:
                return ours()
            finally:
                os.environ[KERNELS_ENV] = "gluon"

        both = {"gluon": ours, "tl": tl_ours,
                "flex": lambda: fwd_bwd(lambda a, b_, c: flex_mod(
                    a, b_, c, block_mask=mask, scale=scale), qg, kg, vg, dout)}
        if text in ("dense", "causal") and not mod_kw:
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def cudnn_both():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return fwd_bwd(lambda a, b_, c: sdpa(a, b_, c, is_causal=text == "causal",
                                                         scale=scale), qg, kg, vg, dout)
            both["cudnn"] = cudnn_both
        for name, fn in both.items():
            ms = median_ms(fn, rep)
            row[name + "_fb"] = ms
            row[name + "_fb_tflops"] = 3.5 * flops / ms / 1e9
    return row


def format_row(r: dict, suffix: str = "") -> str:
    """One table line of a ``run`` result: forward (``suffix=""``) or forward+backward
    (``"_fb"``)."""
    cud = r.get("cudnn" + suffix)
    cud_ms = "-" if cud is None else f"{cud:.3f}"
    cud_tf = "-" if cud is None else f"{r['cudnn' + suffix + '_tflops']:.0f}"
    g, t, f = (r[n + suffix] for n in ("gluon", "tl", "flex"))
    vs_cud = "-" if cud is None else f"{cud / g:.2f}x"
    err = (f"{r['err_tl']:.1e} | {r['err_flex']:.1e}" if not suffix
           else f"- | {r.get('err_grad_flex', float('nan')):.1e}")
    what = "fwd" if not suffix else "fwd+bwd"
    return (f"| `{r['pattern']}` | {what} | {r['L']} | {r['B']} | {r['D']} | {g:.3f} | "
            f"{t:.3f} | {f:.3f} | {cud_ms} | {r['gluon' + suffix + '_tflops']:.0f} | "
            f"{r['tl' + suffix + '_tflops']:.0f} | {r['flex' + suffix + '_tflops']:.0f} | "
            f"{cud_tf} | {t / g:.2f}x | {f / g:.2f}x | {vs_cud} | {err} |")


# Tile options of the Gluon kernels for --sweep: forward (query rows, keys, stages); dQ pass
# (query rows, keys); dK/dV pass (query rows per step, keys per program). The first of each is
# the default. Query rows (forward, dQ) and keys (dK/dV) per program are split between two
# consumer warpgroups of 64 rows or more.
FWD_TILES = [(128, 128, 2), (128, 64, 2), (128, 64, 3), (128, 128, 3)]
DQ_TILES = [(128, 64), (128, 128)]
KV_TILES = [(64, 128), (128, 128)]


def sweep_case(text: str, length: int, d: int, heads: int, tokens: int, rep: int,
               kv_heads: int | None = None) -> list[str]:
    """Table lines of every tile option of the three Gluon kernels on one shape (``kv_heads``
    key/value heads, GQA; default ``heads``)."""
    from sparse_compile.codegen.gluon.backward import launch_gluon_backward
    from sparse_compile.codegen.gluon.forward import launch_gluon_forward
    from sparse_compile.codegen.gluon.rows import interval_rows

    b = max(1, tokens // length)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16,
                         generator=gen) for _ in range(2))
    k, v = (torch.randn(b, kv_heads or heads, length, d, device="cuda", dtype=torch.bfloat16,
                        generator=gen) for _ in range(2))
    rows = interval_rows(parse(text), length, length, q.device)
    flops = 4 * b * heads * d * kept_entries(text, length)
    scale = d ** -0.5

    def forward(m: int, n: int, st: int):
        return launch_gluon_forward(q, k, v, rows, scale, block_m=m, block_n=n, stages=st)

    ref_out, lse = forward(*FWD_TILES[0])

    def backward(dq_t: tuple[int, int], kv_t: tuple[int, int], overlap: bool = False,
                 stages: int = 2):
        return launch_gluon_backward(do, q, k, v, ref_out, lse, rows, scale, dq_tiles=dq_t,
                                     kv_tiles=kv_t, stages=stages, overlap=overlap)

    lines = []
    for m, n, st in FWD_TILES:
        if m * d * 2 + 2 * st * n * d * 2 > 227 * 1024:
            continue  # over the shared memory of an sm90 block
        err = rel(forward(m, n, st)[0], ref_out)
        ms = median_ms(partial(forward, m, n, st), rep)
        lines.append(f"| `{text}` | {length} | {d} | fwd | {m}x{n}, {st} stages | {ms:.3f} | "
                     f"{flops / ms / 1e9:.0f} | {err:.1e} |")
        print(lines[-1], flush=True)
    ref = backward(DQ_TILES[0], KV_TILES[0])
    options = ([(t, KV_TILES[0], False, 2) for t in DQ_TILES]
               + [(DQ_TILES[0], t, False, 2) for t in KV_TILES[1:]]
               + [(DQ_TILES[0], KV_TILES[0], True, 2), (DQ_TILES[0], KV_TILES[0], False, 3)])
    for dq_t, kv_t, overlap, stages in options:  # one option at a time
        grads = backward(dq_t, kv_t, overlap, stages)
        err = max(rel(a, r) for a, r in zip(grads, ref, strict=True))
        ms = median_ms(partial(backward, dq_t, kv_t, overlap, stages), rep)
        waits = ", dQ in flight" if overlap else ""
        lines.append(f"| `{text}` | {length} | {d} | bwd | dQ {dq_t[0]}x{dq_t[1]}, dK/dV "
                     f"{kv_t[0]}x{kv_t[1]}, {stages} stages{waits} | {ms:.3f} | "
                     f"{2.5 * flops / ms / 1e9:.0f} | {err:.1e} |")
        print(lines[-1], flush=True)
    return lines


def sweep(args) -> list[str]:
    """Times each Gluon kernel at every tile option on one shape per pattern (errors against
    the default option's results, which the oracle tests cover), for choosing the defaults."""
    lines = ["| pattern | L | D | kernel | tiles | ms | TFLOP/s | err vs default |",
             "|---|---|---|---|---|---|---|---|"]
    for d in [int(x) for x in args.dims.split(",")]:
        for length in [int(x) for x in args.lengths.split(",")]:
            for text in args.patterns.split(";"):
                lines += sweep_case(text, length, d, args.heads, args.tokens, args.rep,
                                    args.kv_heads)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--lengths", default="16384,4096,65536")
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated DSL texts")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="key/value heads of --sweep's shapes (GQA; default: --heads)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--sweep", action="store_true",
                    help="time the Gluon kernels' tile options instead (FWD/DQ/KV_TILES)")
    ap.add_argument("--mods", choices=["none", "softcap", "alibi", "keys"], default="none",
                    help="logit modification of every call (see the module docstring)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    os.environ[KERNELS_ENV] = "gluon"
    if not gluon_device(device):
        raise SystemExit(f"{gpu}: the Gluon kernels do not run here (sm90 and a supported "
                         f"triton needed; triton {triton.__version__})")
    if args.sweep:
        lines = sweep(args)
        out = args.out or f"bench/results/gluon-tiles-{gpu.replace(' ', '_')}.md"
        head = [f"# Gluon kernels' tile options ({gpu})", "",
                f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
                f"- torch {torch.__version__}, triton {triton.__version__}",
                f"- command: `python {' '.join(sys.argv)}`", ""]
        Path(out).write_text("\n".join(head + lines) + "\n")
        print("wrote", out)
        return
    flex_compiled = torch.compile(flex_attention)
    rows = []
    header = ("| pattern | pass | L | B | D | gluon ms | tl ms | flex ms | cudnn ms | "
              "gluon TFLOP/s | tl TFLOP/s | flex TFLOP/s | cudnn TFLOP/s | gluon vs tl | "
              "gluon vs flex | gluon vs cudnn | err vs tl | err vs flex |")
    do_bwd = not args.no_bwd
    print(header, flush=True)
    lines = [header, "|" + "---|" * 18]
    for d in [int(x) for x in args.dims.split(",")]:
        for length in [int(x) for x in args.lengths.split(",")]:
            for text in args.patterns.split(";"):
                r = run(text, length, d, args.heads, args.tokens, args.rep, flex_compiled,
                        do_bwd, args.mods)
                rows.append(r)
                for suffix in ("", "_fb") if do_bwd else ("",):
                    line = format_row(r, suffix)
                    print(line, flush=True)
                    lines.append(line)
    head = [f"# Gluon kernels vs tl kernels, FlexAttention and cuDNN ({gpu})", "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, triton {triton.__version__}, python "
            f"{platform.python_version()}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- bf16, H = {args.heads}, B·L = {args.tokens}; median of do_bench (rep {args.rep} "
            f"ms); effective TFLOP/s = 4·B·H·D·kept entries / time (fwd+bwd: 3.5 times that)",
            "- errors: relative (Frobenius) against the tl kernels' and FlexAttention's output; "
            "fwd+bwd rows: the largest of dq, dk, dv against FlexAttention's", ""]
    out = args.out or f"bench/results/gluon-{gpu.replace(' ', '_')}.md"
    Path(out).write_text("\n".join(head + lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
