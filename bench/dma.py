"""DMA benchmark: fused dynamic-mask attention against dense causal SDPA, FlexAttention with the
equivalent block mask, and Doge's eager path.

B=1, H=16, D=128, bf16, causal, keep=2048; delta = exp(A * softplus(V W + b)) from random V
through a random projection (kept keys scattered over the whole sequence). Prints one table and
saves it with the conditions to bench/results/dma-<gpu>.md.

    python bench/dma.py                      # L = 8k, 32k, 128k on the GPU
    python bench/dma.py --lengths 256 --keep 64 --heads 2 --dim 16 --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sparse_compile.codegen.tl.dma.backward import KvPass, dma_backward
from sparse_compile.codegen.tl.dma.forward import dma_forward
from sparse_compile.codegen.tl.dma.select import dma_gather_lists, dma_select, selection_rank_order

from sparse_compile.dynamic_mask.flex import dma_block_mask, dma_key_ranges
from sparse_compile.dynamic_mask.functional import dma_attention, dma_delta
from sparse_compile.dynamic_mask.op import backward_span, block_sizes, forward_stages
from sparse_compile.dynamic_mask.reference import keep_mask


def timed(fn, device: str) -> float:
    """Median milliseconds of fn() (triton do_bench on CUDA, a wall-clock loop elsewhere)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_problem(length, heads, dim, keep, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    weight = torch.randn(heads, heads * dim, device=device, dtype=dtype, generator=gen)
    weight = weight / math.sqrt(heads * dim)
    bias = torch.zeros(heads, device=device, dtype=dtype)
    a = torch.rand(heads, device=device, dtype=dtype, generator=gen) * 4
    delta = dma_delta(v, weight, bias, a)
    return q, k, v, delta.contiguous()


def kept_entries(length: int, keep: int) -> int:
    """Kept (q, k) entries of one head under causal DMA: sum over rows of min(keep, p + 1)."""
    full = min(keep, length)
    return full * (full + 1) // 2 + max(0, length - keep) * keep


def flex_equivalent(q, k, v, delta, keep, device):
    """FlexAttention with DMA's exact selection: the BlockMask and mask_mod come from each key's
    row range (``dma_flex``), delta is the score_mod bias. Returns (run_fn, build_ms,
    block_mask); build_ms is the median of the whole build (selection, ranges, BlockMask)."""
    from torch.nn.attention.flex_attention import flex_attention

    heads, length = q.shape[1], q.shape[2]
    d = delta[0].float()

    def build():
        start, end = dma_key_ranges(delta, None, length, keep, True)
        return dma_block_mask(start, end, 1, heads, length)

    block_mask = build()
    build_ms = timed(build, device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + d[h, kv_idx]

    flex = torch.compile(flex_attention, dynamic=False)

    def run(qq, kk, vv):
        return flex(qq, kk, vv, score_mod=score_mod, block_mask=block_mask)

    return run, build_ms, block_mask


def doge_eager(q, k, v, delta, keep):
    """Doge's own path: prepare_dynamic_mask on the 4D causal mask, then eager attention."""
    from transformers.models.doge import modeling_doge as doge

    length = q.shape[2]
    low = torch.finfo(q.dtype).min
    causal = torch.full((length, length), low, device=q.device, dtype=q.dtype).triu(1)
    causal = causal[None, None]
    hidden = q.new_empty(1, length, 1)

    class Stub:
        num_key_value_groups = 1
        training = False

    mask = doge.DogeAttention.prepare_dynamic_mask(None, hidden, delta, keep, causal)
    out, _ = doge.eager_attention_forward(Stub(), q, k, v, mask, q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


def exact_check(device: str) -> str:
    """Public op (fused path) against the float64 reference at a small size: forward and the
    gradients of q, k, v and delta, float32 inputs, GQA, key padding."""
    from sparse_compile.dynamic_mask.reference import dma_reference

    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(2, 4, 1000, 64, device=device, generator=gen)
    k, v = (torch.randn(2, 2, 1000, 64, device=device, generator=gen) for _ in range(2))
    delta = torch.randint(0, 50, (2, 2, 1000), device=device, generator=gen).float() / 10
    pad = torch.ones(2, 1000, dtype=torch.bool, device=device)
    pad[1, :37] = False
    inputs = [t.requires_grad_() for t in (q, k, v, delta)]
    out = dma_attention(*inputs, 100, True, pad)
    ref = dma_reference(*inputs, 100, True, pad[:, None, None, :])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    errs = [rel(out, ref)] + [rel(g, w) for g, w in zip(got, want, strict=True)]
    names = ["out", "dq", "dk", "dv", "ddelta"]
    return "exact check vs float64 reference (f32 inputs, exact f32 dots): " + ", ".join(
        f"{n} {e:.1e}" for n, e in zip(names, errs, strict=True))


def dv_spot_check(q, k, v, delta, dout, keep, dv_ours, dv_flex) -> str:
    """dV of 16 keys of head 0 in float64 from first principles (P column by column)."""
    length, scale = q.shape[2], q.shape[-1] ** -0.5
    sel = dma_select(delta, None, length, keep, True, 64)
    order, _ = selection_rank_order(delta, None)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(length, device=q.device, dtype=order.dtype).expand_as(order))
    q0, k0, v0, d0, do0 = (t[0, 0].double() for t in (q, k, v, delta, dout))
    thr0, rank0 = sel.thr[0].long(), rank[0].long()
    rows = torch.arange(length, device=q.device)
    # lse per row from the kept set, in chunks of rows (float64)
    lse = torch.empty(length, dtype=torch.float64, device=q.device)
    for start in range(0, length, 2048):
        r = rows[start:start + 2048]
        s = scale * q0[r] @ k0.T + d0
        kept = (rows[None, :] <= r[:, None]) & (rank0[None, :] <= thr0[r][:, None])
        lse[r] = torch.logsumexp(s.masked_fill(~kept, float("-inf")), dim=-1)
    keys = torch.cat([order[0, :8].long(), torch.randint(0, length, (8,), device=q.device)])
    s = scale * q0 @ k0[keys].T + d0[keys]
    kept = (keys[None, :] <= rows[:, None]) & (rank0[keys][None, :] <= thr0[:, None])
    p = torch.exp(s - lse[:, None]).masked_fill(~kept, 0.0)
    want = p.T @ do0
    return (f"dV spot check (16 keys, float64): ours {rel(dv_ours[0, 0, keys], want):.1e}, "
            f"flex {rel(dv_flex[0, 0, keys], want):.1e}")


def fused_fns(q, k, v, delta, keep, cfg_fwd, cfg_bwd, kv=None, stages=2):
    """fwd() and fwd_bwd(dout) of the kernels with these tiles; ``kv`` a KvPass or None
    (dK/dV by atomics inside the dQ kernel). The backward reuses the forward's selection when
    the query block sizes agree (as the public op does)."""
    scale = q.shape[-1] ** -0.5
    bm_f, bn_f, w_f = cfg_fwd
    bm_b, bn_b, w_b = cfg_bwd

    def fwd_sel():
        sel = dma_select(delta, None, q.shape[2], keep, True, bm_f)
        return (*dma_forward(q, k, v, delta, None, sel, True, scale, bn_f, w_f, stages), sel)

    def fwd():
        return fwd_sel()[:2]

    def fwd_bwd(dout):
        out, lse, sel = fwd_sel()
        if bm_b != bm_f:
            sel = dma_select(delta, None, q.shape[2], keep, True, bm_b)
        return dma_backward(dout, q, k, v, delta, None, out, lse, sel, True, scale, bn_b, w_b,
                            kv_pass=kv)

    return fwd, fwd_bwd


def tune(q, k, v, delta, keep, device):
    """Pick forward tiles and the backward (tiles, span pass) at this size."""
    dout = torch.randn_like(q)
    best_f, best_b, rows = None, None, []
    for cfg, stages in [((64, 32, 4), 2), ((64, 64, 4), 2), ((128, 64, 8), 2),
                        ((64, 32, 4), 3)]:
        fwd, _ = fused_fns(q, k, v, delta, keep, cfg, cfg, stages=stages)
        ms = timed(fwd, device)
        rows.append(f"fwd {cfg} stages {stages}: {ms:.3f} ms")
        print(rows[-1], flush=True)
        best_f = min(best_f or (ms, cfg, stages), (ms, cfg, stages))
    variants = [((128, 32, 8), None)]
    for dq_cfg in ((64, 32, 4), (64, 64, 4)):
        for span in (512, 1024):
            variants.append((dq_cfg, KvPass(span, 64, 64, 4)))
    variants.append(((64, 32, 4), KvPass(1024, 128, 64, 8)))
    for cfg, kv in variants:
        _, fb = fused_fns(q, k, v, delta, keep, best_f[1], cfg, kv, best_f[2])
        try:
            ms = timed(lambda fb=fb: fb(dout), device)
        except Exception as err:  # noqa: BLE001 - a tile that does not compile is skipped
            rows.append(f"fwd+bwd {cfg} {kv}: failed {type(err).__name__}")
            continue
        rows.append(f"fwd+bwd {cfg} {kv}: {ms:.3f} ms")
        print(rows[-1], flush=True)
        best_b = min(best_b or (ms, cfg, kv), (ms, cfg, kv), key=lambda x: x[0])
    return best_f, best_b, rows


def precision_check(length, args, device, dtype) -> str:
    """Every head of the bench problem (the real delta range: up to ~1e7 where A ~ 4): the
    fused op's out, dQ (8 rows), dK, dV, d delta (16 keys: the 8 best, 8 random) against
    float64 from first principles. Errors are relative over the sampled entries of all heads."""
    q, k, v, delta = make_problem(length, args.heads, args.dim, args.keep, device, dtype)
    dout = torch.randn_like(q)
    cfg_f, cfg_b = block_sizes(q.device), block_sizes(q.device, backward=True)
    results = {}
    for name, kv in (("atomic dK/dV", None), ("span pass", backward_span(q.device))):
        fwd, fwd_bwd = fused_fns(q, k, v, delta, args.keep, cfg_f, cfg_b, kv,
                                 forward_stages(q.device))
        out, _ = fwd()
        results[name] = (out, *fwd_bwd(dout))
    scale = args.dim ** -0.5
    sel = dma_select(delta, None, length, args.keep, True, 64)
    order, _ = selection_rank_order(delta, None)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(length, device=q.device, dtype=order.dtype).expand_as(order))
    rows_all = torch.arange(length, device=q.device)
    gen = torch.Generator(device=q.device).manual_seed(7)
    want = {n: [] for n in ("out", "dq", "dk", "dv", "dd")}
    got = {name: {n: [] for n in want} for name in results}
    for h in range(args.heads):
        q0, k0, v0, d0, do0 = (t[0, h].double() for t in (q, k, v, delta, dout))
        thr0, rank0 = sel.thr[h].long(), rank[h].long()
        out64 = torch.empty_like(q0)
        lse = torch.empty(length, dtype=torch.float64, device=q.device)
        for start in range(0, length, 2048):
            r = rows_all[start:start + 2048]
            s = scale * q0[r] @ k0.T + d0
            kept = (rows_all[None, :] <= r[:, None]) & (rank0[None, :] <= thr0[r][:, None])
            s = s.masked_fill(~kept, float("-inf"))
            lse[r] = torch.logsumexp(s, dim=-1)
            out64[r] = torch.exp(s - lse[r, None]) @ v0
        di = (do0 * out64).sum(-1)
        keys = torch.cat([order[h, :8].long(),
                          torch.randint(0, length, (8,), device=q.device, generator=gen)])
        s = scale * q0 @ k0[keys].T + d0[keys]
        kept = (keys[None, :] <= rows_all[:, None]) & (rank0[keys][None, :] <= thr0[:, None])
        p = torch.exp(s - lse[:, None]).masked_fill(~kept, 0.0)
        ds = p * (do0 @ v0[keys].T - di[:, None])
        rows = torch.randint(0, length, (8,), device=q.device, generator=gen)
        s_r = scale * q0[rows] @ k0.T + d0
        kept_r = (rows_all[None, :] <= rows[:, None]) & (rank0[None, :] <= thr0[rows][:, None])
        p_r = torch.exp(s_r - lse[rows, None]).masked_fill(~kept_r, 0.0)
        ds_r = p_r * (do0[rows] @ v0.T - di[rows, None])
        want["out"].append(out64[rows])
        want["dq"].append(scale * ds_r @ k0)
        want["dk"].append(scale * ds.T @ q0)
        want["dv"].append(p.T @ do0)
        want["dd"].append(ds.sum(0))
        for name, (o, dq, dk, dv, dd) in results.items():
            got[name]["out"].append(o[0, h, rows])
            got[name]["dq"].append(dq[0, h, rows])
            got[name]["dk"].append(dk[0, h, keys])
            got[name]["dv"].append(dv[0, h, keys])
            got[name]["dd"].append(dd[0, h, keys])
    parts = []
    for name in results:
        errs = ", ".join(f"{n} {rel(torch.cat(got[name][n]), torch.cat(want[n])):.1e}"
                         for n in want)
        parts.append(f"{name}: {errs}")
    return (f"L={length} all {args.heads} heads vs float64 (delta up to "
            f"{delta.float().max():.1e}): " + "; ".join(parts))


def profile(fn) -> str:
    """CUDA time per kernel of fn() (3 calls after a warm-up), largest first; then the PyTorch
    ops whose own kernels take the most CUDA time (which op launched the elementwise work)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.split("(")[0][:48]
            totals[name] = totals.get(name, 0.0) + event.device_time / 1e3 / 3
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    ops = [(e.key, e.self_device_time_total / 1e3 / 3, e.count // 3)
           for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sorted((o for o in ops if o[1] > 0), key=lambda o: -o[1])[:8]
    return (f"total {sum(totals.values()):.3f} ms/call: "
            + ", ".join(f"{n} {ms:.3f}" for n, ms in top)
            + "; by PyTorch op (own CUDA ms/call, calls/call): "
            + ", ".join(f"{n} {ms:.3f} ({c})" for n, ms, c in ops))


def flex_row(length, args, q, k, v, delta, dout, qg, kg, vg, out_ours, op_grads, device, add,
             lines):
    """FlexAttention with the same selection: build, compile, fwd, fwd+bwd, checks vs ours."""
    sdpa_b = None
    run, build_ms, block_mask = flex_equivalent(q, k, v, delta, args.keep, device)
    start = time.perf_counter()
    out_flex = run(q, k, v)
    torch.cuda.synchronize() if device == "cuda" else None
    compile_s = time.perf_counter() - start
    check = f"out vs ours {rel(out_flex, out_ours):.1e}"
    flex_f = timed(lambda run=run: run(q, k, v), device)

    def flex_fb(run=run):
        run(qg, kg, vg).backward(dout)

    # FlexAttention has no CPU backward (smoke runs only).
    flex_b = timed(flex_fb, device) if device == "cuda" else None
    if device == "cuda":
        qg.grad = kg.grad = vg.grad = None
        run(qg, kg, vg).backward(dout)
        check += (f"; grads vs ours q {rel(qg.grad, op_grads[0]):.1e} k "
                  f"{rel(kg.grad, op_grads[1]):.1e} v {rel(vg.grad, op_grads[2]):.1e}")
        if length == args.lengths[0]:
            spot = dv_spot_check(q, k, v, delta, dout, args.keep, op_grads[2], vg.grad)
            lines.append(f"L={length}: {spot}")
    add("FlexAttention (same selection)", flex_f, flex_b, sdpa_b, check)
    lines.append(f"L={length}: flex BlockMask build (selection + ranges + from_kv_blocks) "
                 f"{build_ms:.2f} ms, {block_mask.sparsity():.1f}% of tiles skipped; "
                 f"flex first call (compile) {compile_s:.1f} s")
    del block_mask, run


def default_sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Name of the CUDA kernel PyTorch's default SDPA dispatch runs for a causal forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    if not events:
        return "no CUDA kernel recorded"
    return max(events, key=lambda e: e.device_time_total).key[:90]


def bench_length(length, args, cfg_f, cfg_b, device, dtype, table, lines, kv=None, stages=2):
    """Time every variant at one sequence length; appends rows to table and notes to lines."""
    q, k, v, delta = make_problem(length, args.heads, args.dim, args.keep, device, dtype)
    dout = torch.randn_like(q)
    work = 4 * args.heads * args.dim * kept_entries(length, args.keep)
    fwd, fwd_bwd = fused_fns(q, k, v, delta, args.keep, cfg_f, cfg_b, kv, stages)

    base: dict[str, float] = {}

    def add(name, f_ms, fb_ms, sdpa_fb, check):
        tf = work / (f_ms * 1e-3) / 1e12 if f_ms else float("nan")
        sp = [f"{base[n] / fb_ms:.2f}x" if fb_ms and n in base else "-"
              for n in ("flash", "cudnn")]
        fb = f"{fb_ms:.2f}" if fb_ms else "-"
        table.append(f"| {length} | {name} | {f_ms:.2f} | {fb} | {tf:.1f} | {sp[0]} | {sp[1]} "
                     f"| {check} |")
        print(table[-1], flush=True)

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def sdpa_fb():
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        out.backward(dout)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash has no float32 kernel: float32 runs compare against the memory-efficient backend
    # (in the "flash" column, the row names it)
    backend, label = ((SDPBackend.EFFICIENT_ATTENTION, "memory-efficient")
                      if q.dtype == torch.float32 else (SDPBackend.FLASH_ATTENTION, "flash"))
    with sdpa_kernel(backend):
        sdpa_f = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                       device)
        sdpa_b = timed(sdpa_fb, device)
    base["flash"] = sdpa_b
    add(f"dense causal SDPA ({label})", sdpa_f, sdpa_b, sdpa_b, "-")
    if device == "cuda":
        default_ms = timed(sdpa_fb, device)
        lines.append(f"L={length}: F.scaled_dot_product_attention(is_causal=True) with no "
                     f"backend chosen runs {default_sdpa_kernel(q, k, v)}; fwd+bwd "
                     f"{default_ms:.2f} ms")
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cf = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                       device)
            cb = timed(sdpa_fb, device)
        base["cudnn"] = cb
        add("dense causal SDPA (cuDNN)", cf, cb, sdpa_b, "-")
    except RuntimeError as err:
        lines.append(f"cuDNN SDPA unavailable at L={length}: {str(err)[:80]}")

    start = time.perf_counter()
    out_ours, _ = fwd()
    torch.cuda.synchronize() if device == "cuda" else None
    first = time.perf_counter() - start
    f_ms = timed(fwd, device)
    fb_ms = timed(lambda: fwd_bwd(dout), device)
    sel = dma_select(delta, None, length, args.keep, True, cfg_f[0])
    sel_ms = timed(lambda: dma_select(delta, None, length, args.keep, True, cfg_f[0]), device)
    span_ms = timed(lambda: dma_gather_lists(sel, delta, length, kv.rows), device) if kv else 0
    lines.append(f"L={length}: selection alone {sel_ms:.3f} ms (kept for the backward: "
                 f"{sel.nbytes() / 2**20:.1f} MiB); the dK/dV pass's span lists "
                 f"{span_ms:.3f} ms; kernels first call {first:.2f} s")
    add("ours: kernels (default tiles)", f_ms, fb_ms, sdpa_b, "-")

    # the public op: autograd (saves the selection), and its two ops called directly with the
    # saved selection or with [] (selects again: the previous behaviour)
    op_f = timed(lambda: dma_attention(q, k, v, delta, args.keep), device)
    q_o, k_o, v_o, d_o = (t.detach().clone().requires_grad_() for t in (q, k, v, delta))

    def op_fb():
        dma_attention(q_o, k_o, v_o, d_o, args.keep).backward(dout)

    op_fb_ms = timed(op_fb, device)
    ops = torch.ops.sparse_compile
    scale = args.dim ** -0.5

    def direct(saved):
        out, lse, *selection = ops.dma_attention_fwd(q, k, v, delta, None, None, args.keep,
                                                     True, scale)
        return ops.dma_attention_bwd(dout, q, k, v, delta, None, None, out, lse,
                                     selection if saved else [], args.keep, True, scale)

    saved_ms = timed(lambda: direct(True), device)
    again_ms = timed(lambda: direct(False), device)
    # model layout ([B, L, H, D] viewed as [B, H, L, D]): no copies any more
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                     for t in (q, k, v))
    d_t = delta.detach().clone().requires_grad_()

    def op_fb_strided():
        dma_attention(q_t, k_t, v_t, d_t, args.keep).backward(dout)

    strided_ms = timed(op_fb_strided, device)
    lines.append(f"L={length}: public op fwd+bwd through autograd {op_fb_ms:.3f} ms; the two "
                 f"ops called directly: selection saved {saved_ms:.3f} ms, selected again "
                 f"{again_ms:.3f} ms; kernels alone {fb_ms:.3f} ms; autograd with q/k/v in "
                 f"the model layout (strided) {strided_ms:.3f} ms")
    q_o.grad = k_o.grad = v_o.grad = d_o.grad = None  # the timing runs accumulated them
    out_op = dma_attention(q_o, k_o, v_o, d_o, args.keep)
    out_op.backward(dout)
    # copies: later backward calls (the profile) accumulate into the same .grad tensors
    op_grads = tuple(t.grad.clone() for t in (q_o, k_o, v_o))
    add("ours: public op dma_attention", op_f, op_fb_ms, sdpa_b,
        f"out vs kernels {rel(out_op, out_ours):.1e}")
    if args.profile == length and device == "cuda":
        try:
            lines.append(f"L={length}: profile of the public op fwd+bwd (3 calls): "
                         + profile(op_fb))
        except Exception as err:  # noqa: BLE001 - report and go on to the timings
            lines.append(f"L={length}: profile failed: {type(err).__name__}: {str(err)[:200]}")

    if length <= args.flex_max:
        try:
            flex_row(length, args, q, k, v, delta, dout, qg, kg, vg, out_ours, op_grads,
                     device, add, lines)
        except Exception as err:  # noqa: BLE001 - report and go on
            lines.append(f"L={length}: FlexAttention failed: {type(err).__name__}: "
                         f"{str(err)[:300]}")

    if args.kv_variants == length and device == "cuda":
        rows = []
        for variant in (KvPass(1024, 32, 64, 4, 3), KvPass(2048, 64, 64, 4, 2),
                        KvPass(4096, 32, 64, 4, 3), KvPass(512, 32, 64, 4, 3),
                        KvPass(2048, 32, 128, 8, 3)):
            _, fb = fused_fns(q, k, v, delta, args.keep, cfg_f, cfg_b, variant, stages)
            try:
                rows.append(f"{variant}: {timed(lambda fb=fb: fb(dout), device):.3f} ms")
            except Exception as err:  # noqa: BLE001 - a tile that does not compile is skipped
                rows.append(f"{variant}: failed {type(err).__name__}")
        lines.append(f"L={length}: kernels fwd+bwd with other dK/dV passes: " + "; ".join(rows))

    if length <= args.doge_max:
        try:
            out_doge = doge_eager(q, k, v, delta, args.keep)
            doge_ms = timed(lambda: doge_eager(q, k, v, delta, args.keep), device)

            def doge_fb():
                doge_eager(qg, kg, vg, delta, args.keep).backward(dout)

            doge_fb_ms = timed(doge_fb, device)
            add("Doge eager (dense mask + topk)", doge_ms, doge_fb_ms, sdpa_b,
                f"rel err ours vs Doge {rel(out_ours, out_doge):.1e}")
        except (ImportError, torch.OutOfMemoryError) as err:
            lines.append(f"Doge eager skipped at L={length}: {type(err).__name__}")


class EchoList(list):
    """A list of result notes that also prints each note as it comes (a run cut short by a
    timeout still shows what it measured)."""

    def append(self, item) -> None:
        super().append(item)
        print(item, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--keep", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tune", action="store_true", help="sweep block sizes first")
    parser.add_argument("--doge-max", type=int, default=8192, help="largest L for Doge eager")
    parser.add_argument("--flex-max", type=int, default=131072, help="largest L for Flex")
    parser.add_argument("--precision", type=int, default=0,
                        help="run the all-heads float64 check at this L (0: skip)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="precision check and tuning only (no comparison table)")
    parser.add_argument("--profile", type=int, default=0,
                        help="profile the public op's fwd+bwd at this L (0: skip)")
    parser.add_argument("--kv-variants", type=int, default=0,
                        help="time other dK/dV span passes at this L (0: skip)")
    parser.add_argument("--out", default="", help="results file (default bench/results/...)")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    device, dtype = args.device, getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    tag = gpu.split()[-1].lower().replace("/", "-") if device == "cuda" else "cpu"
    lines: list[str] = EchoList()

    # Ties: CUDA torch.topk keeps the lower index among equal values (our documented rule).
    tie_delta = torch.randint(0, 4, (2, 3, 6000), device=device).to(dtype)
    allowed = torch.ones(1, 1, 1, 6000, dtype=torch.bool, device=device)
    ties_ok = all(torch.equal(keep_mask(tie_delta, allowed, n, "topk"),
                              keep_mask(tie_delta, allowed, n)) for n in (1, 100, 2048))
    lines.append(f"torch.topk ties == lower-index rule on {device}: {ties_ok}")

    lines.append(exact_check(device))

    if args.precision:
        try:
            lines.append(precision_check(args.precision, args, device, dtype))
        except Exception as err:  # noqa: BLE001 - report and go on to the timings
            lines.append(f"precision check failed: {type(err).__name__}: {str(err)[:300]}")
        torch.cuda.empty_cache() if device == "cuda" else None
    cfg_f = block_sizes(torch.device(device))
    cfg_b = block_sizes(torch.device(device), backward=True)
    kv = backward_span(torch.device(device))
    stages = forward_stages(torch.device(device))
    if args.tune:  # at the first length; the table then uses the best tiles found
        length0 = args.lengths[0]
        q, k, v, delta = make_problem(length0, args.heads, args.dim, args.keep, device, dtype)
        best_f, best_b, tune_rows = tune(q, k, v, delta, args.keep, device)
        lines.append(f"tuning at L={length0}: " + "; ".join(tune_rows))
        del q, k, v, delta
        (_, cfg_f, stages), (_, cfg_b, kv) = best_f, best_b
    lines.append(f"blocks (BLOCK_M, BLOCK_N, warps): fwd {cfg_f} stages {stages}, bwd dQ "
                 f"{cfg_b}, dK/dV {kv if kv else 'atomics in the dQ kernel'}")

    header = ("| L | variant | fwd ms | fwd+bwd ms | fwd TFLOP/s eff | fwd+bwd vs flash SDPA "
              "| fwd+bwd vs cuDNN SDPA | check |")
    table = [header, "|---|---|---|---|---|---|---|---|"]

    def save():
        text = "\n".join([
            f"# DMA benchmark on {gpu}", "",
            f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"- torch {torch.__version__}, triton {__import__('triton').__version__}, "
            f"python {platform.python_version()}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- B=1, H={args.heads}, D={args.dim}, {args.dtype}, causal, keep={args.keep}; "
            "delta from random V through a random projection; median of triton do_bench.",
            "- TFLOP/s eff = 4*B*H*D*(kept entries)/fwd time (kept entries of DMA for every "
            "variant); fwd+bwd counts 3.5x the forward's work.",
            "- ours fwd includes the selection (sort + scan); the backward reuses the "
            "forward's selection.",
            "- FlexAttention runs the same selection: BlockMask from each key's row range "
            "(sparse_compile.dynamic_mask.flex), delta as score_mod; its backward gives no "
            "d delta.", "",
            *[f"- {x}" for x in lines], "", *table, "",
        ])
        suffix = "-sweep" if args.sweep_only else ""
        out = Path(args.out or Path(__file__).parent / "results" / f"dma-{tag}{suffix}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)

    if args.sweep_only:
        save()
        print("\n".join(lines))
        return
    for length in args.lengths:
        bench_length(length, args, cfg_f, cfg_b, device, dtype, table, lines, kv, stages)
        save()
        torch.cuda.empty_cache() if device == "cuda" else None
    print("\n".join(lines))
    print("\n".join(table))


if __name__ == "__main__":
    main()
