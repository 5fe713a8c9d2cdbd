"""Ring attention benchmark: per-rank time of ``fastattn.distributed.ring_attention`` beside the same rank's
compute alone and beside one process running the whole sequence.

    # CPU (gloo), 2 processes x 1 thread, spawned here:
    python -m fastattn._bench_ring --spawn 2 --device cpu
    # GPUs (NCCL), one process per GPU:
    torchrun --nproc-per-node 2 -m fastattn._bench_ring --device cuda --json ring-h200x2.json

For each total length N (each rank holds N / W tokens) and each pass (forward, forward + backward):

- ``ring``: ``ring_attention`` on the rank's shard, communication included (the slowest rank's time).
- ``compute``: the same rank's kernel calls and merges, step for step, with the K/V (and dK/dV) exchange
  replaced by a local copy: what the rank would take if communication were free and fully hidden.
- ``overhead`` = ring / compute - 1: the part of the communication that is *not* hidden, plus the ring's
  own bookkeeping.
- ``single``: one process (one GPU, or one process with the same thread count) on the whole sequence with
  ``flash_attention`` (``--no-single`` skips it; it is skipped where it would not fit); ``scaling`` =
  single / (W · ring): 100% is ideal.

Times are medians over ``--reps`` of the slowest rank's time; every repetition starts from a barrier.
Rank 0 prints the table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from typing import Any


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastattn._bench_ring", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--spawn", type=int, default=0, metavar="W",
                   help="spawn W local processes (CPU / gloo) instead of being launched by torchrun")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="total sequence lengths (default: 2048 4096 8192 on cpu, 65536 ... 524288 on cuda)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 4 on cpu, 16 on cuda)")
    p.add_argument("--heads-kv", type=int, default=None, help="k/v heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 64 on cpu, 128 on cuda)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default=None,
                   help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--no-causal", action="store_true", help="full attention instead of causal")
    p.add_argument("--load-balance", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-single", action="store_true", help="skip the one-process run of the whole sequence")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.seq_lens = a.seq_lens or ([65536, 131072, 262144, 524288] if gpu else [2048, 4096, 8192])
    a.heads = a.heads or (16 if gpu else 4)
    a.heads_kv = a.heads_kv or a.heads
    a.head_dim = a.head_dim or (128 if gpu else 64)
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    return a


class _LocalRing:
    """Stands in for the ring in the compute-alone runs: every 'received' buffer is a local copy of the sent one
    (same shapes, finite values), so each step runs exactly the kernels and merges of the real run."""

    def start(self, sends: list, recvs: list) -> Any:
        for (s, _), (r, _) in zip(sends, recvs, strict=True):
            r.copy_(s)
        return None

    def wait(self, handle: Any) -> None:
        return None

    def compute(self) -> Any:
        from .distributed import _nullcontext

        return _nullcontext()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: list, device: Any, reps: int, warmup: int, group: bool = True) -> list[float]:
    """For each function, the median over reps of the slowest rank's seconds.  The functions take turns within
    each repetition (so a busy moment of the machine falls on both), and every run starts from a barrier."""
    import torch
    import torch.distributed as dist

    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if group:
                dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            if group:
                t = torch.tensor([dt], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                dt = float(t.item())
            times[i].append(dt)
    return [statistics.median(t) for t in times]


def _run(a: argparse.Namespace, rank: int, world: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    rows = []
    for total in a.seq_lens:
        if total % (2 * world if a.load_balance == "zigzag" else world):
            raise SystemExit(f"N={total} does not split over {world} ranks ({a.load_balance})")
        for pas in a.passes:
            row = _measure(a, rank, world, total, pas, device)   # the shards are freed before the single run
            t_single = None if a.no_single else _single(a, rank, total, pas, not a.no_causal, getattr(torch, a.dtype),
                                                        device, a.threads if a.device == "cpu" else None)
            row["single_ms"] = None if t_single is None else t_single * 1e3
            row["scaling_pct"] = None if t_single is None else 100.0 * t_single / (world * row["ring_ms"] / 1e3)
            rows.append(row)
            if rank == 0:
                _print_row(row)
    dist.barrier()
    return rows


def _measure(a: argparse.Namespace, rank: int, world: int, total: int, pas: str, device: Any) -> dict:
    """One row's ring and compute-alone times for one total length and one pass."""
    import torch

    from .distributed import _backward, _Call, _forward, ring_attention

    dtype = getattr(torch, a.dtype)
    causal = not a.no_causal
    threads = a.threads if a.device == "cpu" else None
    n = total // world
    g = torch.Generator(device=device).manual_seed(1234 + rank)   # drawn where they are used (512k tokens)

    def rnd(heads: int) -> Any:
        return torch.randn(1, heads, n, a.head_dim, generator=g, device=device, dtype=dtype)

    q, k, v, dout = rnd(a.heads), rnd(a.heads_kv), rnd(a.heads_kv), rnd(a.heads)
    local = _Call(_LocalRing() if world > 1 else None, rank, world, "bhsd", 2, causal, (-1, -1), 0.0,
                  1.0 / math.sqrt(a.head_dim), a.load_balance, threads)

    def ring_fn() -> None:
        if pas == "fwd":
            with torch.no_grad():
                ring_attention(q, k, v, causal=causal, load_balance=a.load_balance, num_threads=threads,
                               check=False)
        else:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            ring_attention(qg, kg, vg, causal=causal, load_balance=a.load_balance, num_threads=threads,
                           check=False).backward(dout)

    def compute_fn() -> None:
        out, lse = _forward(local, q, k, v)
        if pas != "fwd":
            _backward(local, dout, q, k, v, out, lse)

    t_ring, t_comp = _time([ring_fn, compute_fn], device, a.reps, a.warmup)
    flops = 4.0 * total * total * a.heads * a.head_dim * (0.5 if causal else 1.0)
    if pas != "fwd":
        flops *= 3.5   # forward + backward: the backward counted as 2.5x the forward (FlashAttention's convention)
    return dict(n_total=total, n_per_rank=n, world=world, pass_=pas, ring_ms=t_ring * 1e3,
                compute_ms=t_comp * 1e3, overhead_pct=100.0 * (t_ring / t_comp - 1.0),
                single_ms=None, scaling_pct=None, ring_tflops_per_rank=flops / world / t_ring / 1e12)


def _single(a: argparse.Namespace, rank: int, total: int, pas: str, causal: bool, dtype: Any, device: Any,
            threads: int | None) -> float | None:
    """Rank 0 runs the whole sequence alone (the others wait at a barrier); the time is broadcast."""
    import torch
    import torch.distributed as dist

    import fastattn

    t = torch.tensor([math.nan], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if rank == 0:
        try:
            g = torch.Generator(device=device).manual_seed(99)
            q, k, v = (torch.randn(1, h, total, a.head_dim, generator=g, device=device, dtype=dtype)
                       for h in (a.heads, a.heads_kv, a.heads_kv))
            opts = dict(causal=causal)
            if threads is not None:
                opts["num_threads"] = threads

            def fn() -> None:
                out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **opts)
                if pas != "fwd":
                    fastattn.flash_attention_backward(out, q, k, v, out, lse, **opts)

            t[0] = _time([fn], device, a.reps, a.warmup, group=False)[0]
            del q, k, v
        except (RuntimeError, MemoryError) as exc:   # does not fit: reported as missing
            print(f"single-process run of N={total} skipped: {exc}", file=sys.stderr)
    dist.broadcast(t, src=0)
    val = float(t.item())
    return None if math.isnan(val) else val


def _print_header(a: argparse.Namespace, world: int, device: str) -> None:
    print(f"ring attention: {world} ranks on {device}, {a.dtype}, heads {a.heads}/{a.heads_kv}, head dim "
          f"{a.head_dim}, {'causal' if not a.no_causal else 'full'} {a.load_balance}"
          + (f", {a.threads} thread(s) per process" if a.device == "cpu" else ""))
    print(f"{'N total':>9} {'N/rank':>8} {'pass':>8} {'ring ms':>10} {'compute ms':>11} {'overhead':>9} "
          f"{'single ms':>10} {'scaling':>8} {'TFLOP/s/rank':>13}")


def _print_row(r: dict) -> None:
    single = "-" if r["single_ms"] is None else f"{r['single_ms']:.2f}"
    scaling = "-" if r["scaling_pct"] is None else f"{r['scaling_pct']:.1f}%"
    print(f"{r['n_total']:>9} {r['n_per_rank']:>8} {r['pass_']:>8} {r['ring_ms']:>10.2f} {r['compute_ms']:>11.2f} "
          f"{r['overhead_pct']:>8.1f}% {single:>10} {scaling:>8} {r['ring_tflops_per_rank']:>13.4f}", flush=True)


def _device_name(a: argparse.Namespace) -> str:
    import torch

    if a.device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} logical CPUs)"


def _main_rank(a: argparse.Namespace, rank: int, world: int, init_method: str | None) -> None:
    import torch
    import torch.distributed as dist

    if a.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # point-to-point needs no NVLink multicast; shared hosts ban it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    backend = "nccl" if a.device == "cuda" else "gloo"
    kwargs: dict = dict(timeout=timedelta(seconds=600))
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group(backend, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        _print_header(a, world, _device_name(a))
    rows = _run(a, rank, world)
    if rank == 0 and a.json:
        import fastattn

        info = dict(device=_device_name(a), world=world, backend=backend, dtype=a.dtype, heads=a.heads,
                    heads_kv=a.heads_kv, head_dim=a.head_dim, causal=not a.no_causal, load_balance=a.load_balance,
                    threads_per_process=a.threads if a.device == "cpu" else None, reps=a.reps,
                    torch=torch.__version__, fastattn=fastattn.__version__, argv=sys.argv[1:], rows=rows)
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {a.json}")
    dist.destroy_process_group()


def _spawned(rank: int, a: argparse.Namespace, world: int, port: int) -> None:
    _main_rank(a, rank, world, f"tcp://127.0.0.1:{port}")


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    if a.spawn:
        import socket

        import torch.multiprocessing as mp

        if a.device != "cpu":
            raise SystemExit("--spawn is for the CPU (gloo); launch GPU runs with torchrun")
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(a, a.spawn, port), nprocs=a.spawn, join=True)
    else:
        _main_rank(a, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), None)


if __name__ == "__main__":
    main()
