"""Context parallelism: sharded sparse attention against an all-gather of K/V, per pattern.

For each pattern and sharding, on every rank of a ``torchrun`` group (NCCL, 2-4 GPUs), times
one layer's attention of a sequence split over the ranks:

- ``ours``: ``sparse_compile.distributed.sharded_attention`` (only the keys the pattern keeps
  travel; plan.py);
- ``all-gather``: every rank gathers all K/V (what ring attention and PyTorch's context
  parallelism move per layer) and runs ``sc.attention`` on its query chunks at their
  positions;

forward and forward+backward, median over ``--rep`` runs after ``--warmup`` (CUDA events, the
slowest rank counts), with the bytes each rank receives (the plan's figures, checked against
the bytes the collectives carried). Outputs are checked against ``sc.attention`` of the whole
sequence on one GPU. Prints one table and writes it with the conditions to
``bench/results/context-parallel-<gpu>-x<world>.md`` (or ``--out``).

    torchrun --nproc-per-node 4 bench/context_parallel.py --length 65536
    python bench/context_parallel.py --smoke      # CPU, gloo, 2 processes, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

PATTERNS = ["causal & sliding(1024)", "causal & (sink(4) | sliding(4096))", "block(2048)",
            "causal"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--shardings", nargs="+", default=["contiguous", "zigzag"])
    ap.add_argument("--length", type=int, default=65536, help="whole sequence length")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--out", default="", help="results file (default bench/results/...)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU gloo run with tiny sizes on --world processes (Triton interpreter)")
    ap.add_argument("--world", type=int, default=2, help="processes of --smoke")
    return ap.parse_args(argv)


def _timer(device: torch.device):
    """A function timing ``fn()`` in ms (CUDA events on GPUs, wall clock on CPUs)."""
    def time_ms(fn) -> float:
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return time_ms


def _slowest(ms: float, device: torch.device) -> float:
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _all_gather_attention(q, k, v, pattern, sharding, rank):
    """Baseline: all K/V gathered (differentiably), each query chunk at its positions."""
    import torch.distributed.nn.functional as dnn

    import sparse_compile as sc

    length = q.shape[2] * sharding.world
    k_all = sharding.unshard(list(dnn.all_gather(k.contiguous())), dim=2)
    v_all = sharding.unshard(list(dnn.all_gather(v.contiguous())), dim=2)
    parts, offset = [], 0
    for a, b in sharding.ranges(length, rank):
        parts.append(sc.attention(q[:, :, offset:offset + b - a], k_all, v_all, pattern,
                                  q_start=a, k_start=0))
        offset += b - a
    return torch.cat(parts, dim=2)


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> str | None:
    import sparse_compile as sc
    import sparse_compile.distributed.exchange as exchange
    from sparse_compile.distributed import (
        Sharding,
        communication_report,
        register_group,
        sharded_attention,
    )

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    name = register_group(dist.group.WORLD)
    carried: list[int] = []
    collective = exchange.dist.all_to_all_single

    def counting(out, inp, **kwargs):
        carried.append(out.numel() * out.element_size())
        return collective(out, inp, **kwargs)

    exchange.dist.all_to_all_single = counting
    time_ms = _timer(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    shape_q = (args.batch, args.heads, args.length, args.dim)
    shape_kv = (args.batch, args.kv_heads, args.length, args.dim)
    q, k, v = (torch.randn(s, generator=g).to(device, dtype)
               for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=g).to(device, dtype)
    rows = []
    for pattern in args.patterns:
        whole = sc.attention(q, k, v, pattern) if rank == 0 else None
        for kind in args.shardings:
            sharding = Sharding(kind, world)
            local = [sharding.shard(x, rank, dim=2).requires_grad_() for x in (q, k, v)]
            grad = sharding.shard(dout, rank, dim=2)
            report = communication_report(pattern, args.length, sharding, batch=args.batch,
                                          kv_heads=args.kv_heads, head_dim=args.dim,
                                          dtype=dtype)
            carried.clear()
            out = sharded_attention(*local, pattern, sharding=kind, group_name=name)
            assert sum(carried) == report.ranks[rank].forward_bytes, "bytes differ from plan"
            parts = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(parts, out.detach().contiguous())
            err = float("nan")
            if rank == 0:
                full = sharding.unshard(parts, dim=2).float()
                err = ((full - whole.float()).norm() / whole.float().norm()).item()
            variants = {
                "ours": (sharded_attention, {"sharding": kind, "group_name": name}),
                "all-gather": (_all_gather_attention, {"sharding": sharding, "rank": rank}),
            }
            for variant, (fn, kwargs) in variants.items():
                times = {}
                for step in ("fwd", "fwd+bwd"):
                    def call(fn=fn, kwargs=kwargs, step=step, local=local, pattern=pattern,
                             grad=grad):
                        o = fn(*local, pattern, **kwargs)
                        if step == "fwd+bwd":
                            o.backward(grad)
                    for _ in range(args.warmup):
                        call()
                    times[step] = statistics.median(
                        _slowest(time_ms(call), device) for _ in range(args.rep))
                mine = report.ranks[rank]
                received = (mine.forward_bytes if variant == "ours" else mine.all_gather_bytes)
                worst = torch.tensor([received], dtype=torch.float64, device=device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                rows.append((pattern, kind, variant, f"{times['fwd']:.3f}",
                             f"{times['fwd+bwd']:.3f}", f"{float(worst) / 2**20:.2f}",
                             f"{err:.1e}" if variant == "ours" else ""))
    if rank != 0:
        return None
    cols = ("pattern", "sharding", "variant", "fwd ms", "fwd+bwd ms", "max MiB in / rank (fwd)",
            "rel. err")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _worker(rank: int, args: argparse.Namespace, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), TRITON_INTERPRET="1")
    main_in_group(args)


def main_in_group(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else (
        torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    try:
        table = run(args, rank, world, device)
    finally:
        dist.destroy_process_group()
    if table is None:
        return
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu (gloo, Triton interpreter)"
    import triton

    header = (f"# Context parallelism, {world} ranks\n\n{gpu}, torch {torch.__version__}, "
              f"triton {triton.__version__}, {datetime.date.today()}\n\n"
              f"`{' '.join(['bench/context_parallel.py', *sys.argv[1:]])}`\n\n"
              f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}, "
              f"L={args.length}; times: median, slowest rank\n\n")
    print(header + table)
    out = args.out or ("" if args.smoke else
                       f"bench/results/context-parallel-{gpu.replace(' ', '_')}-x{world}.md")
    if out:
        with open(out, "w") as fh:
            fh.write(header + table + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke and "WORLD_SIZE" not in os.environ:
        import socket

        import torch.multiprocessing as mp

        args.patterns = [p for p in args.patterns if p != PATTERNS[1]] or args.patterns
        args.patterns = ["causal & sliding(24)" if p == PATTERNS[0] else
                         "block(32)" if p == PATTERNS[2] else p for p in args.patterns]
        args.length, args.heads, args.kv_heads, args.dim = 128, 2, 1, 16
        args.warmup, args.rep = 0, 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args, args.world, port), nprocs=args.world, join=True)
        return
    main_in_group(args)


if __name__ == "__main__":
    main()
