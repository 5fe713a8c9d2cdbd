"""The backward benchmark on the CPU (``python -m fastattn bench --backward``): the gradients of attention
given the forward's results, beside PyTorch's CPU SDPA backward on the same inputs.

Each shape (fp32, self-attention, queries = keys) times, in this process, in interleaved rounds (each
implementation once per round after a pause that lets the other's threads go idle, the median over rounds
kept, so a slow spell of a busy machine falls on both alike):

- ``fastattn``: ``flash_attention_backward(dout, q, k, v, out, lse)`` with ``out, lse`` from one
  ``flash_attention(..., return_lse=True)`` made before the timing (the forward is not timed);
- ``torch``: ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`` on
  ``out = scaled_dot_product_attention(q, k, v, is_causal=...)`` built once before the timing, so only
  the backward node runs (on fp32 CPU tensors that is PyTorch's flash CPU kernel; the row names the
  grad_fn that ran).

Rates count the backward as 2.5x the forward's FLOPs (FlashAttention's convention), the forward being
2·(head_dim + head_dim_v) per attended (query, key) pair: 4·N²·D per head, about half of it causal.
The gradients of the two are compared once per shape (relative error of dq, dk, dv).

``--memory`` measures, in a child process per implementation, the peak resident memory of one forward +
backward at N=32k (B=1, H=4, D=64, fp32) above what its inputs, outputs and gradients take (the issue's
target: at most 64 MiB); ``ru_maxrss`` of the child sees every allocation, C and OpenMP included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

BACKWARD_FLOP_FACTOR = 2.5


def _median_rounds(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Seconds per call of each implementation: one warm-up each, then ``rounds`` interleaved rounds of one
    call each, every call after a pause (the thread pools of the call before, PyTorch's or fastattn's OpenMP,
    spin for a while after it and would steal the cores); the median over rounds."""
    import time

    from ._bench import SETTLE_SECONDS

    for fn in calls.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


@dataclasses.dataclass(frozen=True)
class BackwardShape:
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads} N{self.seq} D{self.head_dim}{' causal' if self.causal else ''}"

    @property
    def forward_flops(self) -> int:
        pairs = self.seq * (self.seq + 1) // 2 if self.causal else self.seq * self.seq
        return 4 * self.head_dim * pairs * self.batch * self.heads

    @property
    def backward_flops(self) -> float:
        return BACKWARD_FLOP_FACTOR * self.forward_flops


FULL_SEQS = (1024, 2048, 4096)
QUICK_SEQS = (256, 512)


def backward_grid(quick: bool = False, seqs: tuple[int, ...] | None = None,
                  head_dims: tuple[int, ...] | None = None, heads: int = 8, batch: int = 1) -> list[BackwardShape]:
    """B=1 H=8, N 1024..4096, D 64/128, causal and not (quick: N 256/512, D 64)."""
    seqs = tuple(seqs) if seqs else (QUICK_SEQS if quick else FULL_SEQS)
    head_dims = tuple(head_dims) if head_dims else ((64,) if quick else (64, 128))
    return [BackwardShape(batch, heads, n, d, causal) for d in head_dims for causal in (False, True) for n in seqs]


def fastattn_backend() -> tuple[str, str | None]:
    """The backend fastattn's backward runs on: "cpu" when the compiled backend has a backward, else
    "reference" with the reason (named in the table)."""
    from . import backends

    cpu = backends.get_backend("cpu")
    reason = cpu.availability()
    if reason is None and getattr(cpu, "backward", None) is not None:
        return "cpu", None
    why = reason or "the compiled cpu backend has no backward pass in this build"
    return "reference", why


def _torch_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, causal: bool
                    ) -> tuple[Callable[[], Any], str]:
    import torch

    qt, kt, vt = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))  # the same memory, no copies
    dt = torch.from_numpy(dout)
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def run() -> Any:
        return torch.autograd.grad(out, (qt, kt, vt), dt, retain_graph=True)

    return run, type(out.grad_fn).__name__


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _time_shape(shape: BackwardShape, rng: np.random.Generator, backend: str, threads: int | None, rounds: int,
                compare_torch: bool) -> dict:
    import fastattn

    from ._bench import FASTATTN_CPU, TORCH, thread_limit

    dims = (shape.batch, shape.heads, shape.seq, shape.head_dim)
    q, k, v, dout = (rng.standard_normal(dims, dtype=np.float32) for _ in range(4))
    out, lse = fastattn.flash_attention(q, k, v, causal=shape.causal, return_lse=True, backend=backend,
                                        num_threads=threads)

    def ours() -> Any:
        return fastattn.flash_attention_backward(dout, q, k, v, out, lse, causal=shape.causal, backend=backend,
                                                 num_threads=threads)

    calls: dict[str, Callable[[], Any]] = {"fastattn": ours}
    row: dict[str, Any] = {}
    if compare_torch:
        theirs, kernel = _torch_backward(q, k, v, dout, shape.causal)
        calls["torch"] = theirs
        row["torch_grad_fn"] = kernel
        row["max_rel_diff"] = max(_rel(a, b.numpy()) for a, b in zip(ours(), theirs(), strict=True))
    with thread_limit(FASTATTN_CPU, threads), thread_limit(TORCH, threads):
        seconds = _median_rounds(calls, rounds)
    for name, s in seconds.items():
        row[f"{name}_ms"] = s * 1e3
        row[f"{name}_gflops"] = shape.backward_flops / s / 1e9
    return row


def run_backward_bench(*, quick: bool = False, threads: int | None = None, rounds: int = 5,
                       compare_torch: bool = True, seqs: tuple[int, ...] | None = None,
                       head_dims: tuple[int, ...] | None = None, heads: int = 8, batch: int = 1,
                       progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per shape: ms and GFLOP/s of each implementation's backward (see the module docstring)."""
    backend, why = fastattn_backend()
    rng = np.random.default_rng(0)
    rows = []
    for shape in backward_grid(quick, seqs, head_dims, heads, batch):
        row = dict(case=shape.label, batch=shape.batch, heads=shape.heads, seq=shape.seq, head_dim=shape.head_dim,
                   causal=shape.causal, dtype="float32", backend=backend, backward_flops=shape.backward_flops,
                   threads=threads)
        if why is not None:
            row["backend_note"] = why
        row.update(_time_shape(shape, rng, backend, threads, rounds, compare_torch))
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_backward_table(rows: list[dict]) -> str:
    """fastattn beside PyTorch: ms, GFLOP/s (backward = 2.5x forward FLOPs), the ratio (torch ms / ours)."""
    lines = ["| shape | fastattn ms | fastattn GFLOP/s | torch SDPA ms | torch SDPA GFLOP/s | vs torch | "
             "grad rel diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("torch_ms")
        name = r["case"] + ("" if r.get("backend", "cpu") == "cpu" else f" ({r['backend']} backend)")
        lines.append(f"| {name} | {r['fastattn_ms']:.1f} | {r['fastattn_gflops']:.1f} | "
                     + (f"{t:.1f} | {r['torch_gflops']:.1f} | {t / r['fastattn_ms']:.2f}x | "
                        f"{r['max_rel_diff']:.1e}" if t else "- | - | - | -") + " |")
    return "\n".join(lines)


def table_title(rows: list[dict], facts: dict, threads: int | None, rounds: int) -> str:
    kernels = sorted({r["torch_grad_fn"] for r in rows if r.get("torch_grad_fn")})
    backend = rows[0]["backend"] if rows else "cpu"
    lines = [f"CPU attention backward, fp32, median of {rounds} interleaved rounds, forward not timed; "
             f"{facts.get('cpu', facts['machine'])}, {facts.get('cpu_count')} logical CPUs, SIMD {facts['simd']}",
             f"fastattn {facts['fastattn']} (backend {backend}) beside torch {facts.get('torch', '-')} "
             f"({', '.join(kernels) or 'not run'}); threads: {threads or 'each library default'}; "
             f"GFLOP/s count the backward as {BACKWARD_FLOP_FACTOR}x the forward's 4*N^2*D per head (causal: pairs "
             f"attended); vs torch = torch ms / fastattn ms"]
    notes = {r["backend_note"] for r in rows if r.get("backend_note")}
    lines += [f"note: fastattn ran on the reference backend: {n}" for n in sorted(notes)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- peak memory (child processes)

_MEMORY_CHILD = r"""
import json, resource, sys
import numpy as np
impl, seq, heads, dim, causal, backend, threads = sys.argv[1:8]
seq, heads, dim, causal = int(seq), int(heads), int(dim), causal == "1"
threads = int(threads) or None

def rss():  # resident now, bytes (/proc/self/statm: pages)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

if impl == "torch":
    import torch
    if threads:
        torch.set_num_threads(threads)
else:
    import fastattn
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((1, heads, seq, dim), dtype=np.float32) for _ in range(4))
if impl == "torch":
    qt, kt, vt = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    before = rss(); peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    grads = torch.autograd.grad(out, (qt, kt, vt), torch.from_numpy(dout))
    kept = out.numel() * 4 + sum(g.numel() * 4 for g in grads) + heads * seq * 4  # + the saved logsumexp
else:
    before = rss(); peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out, lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend=backend, num_threads=threads)
    grads = fastattn.flash_attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend,
                                              num_threads=threads)
    kept = out.nbytes + lse.nbytes + sum(g.nbytes for g in grads)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(before=before, peak_before=peak_before, peak=peak, kept=kept,
                      inputs=4 * q.nbytes)))
"""

MEMORY_TARGET_MIB = 64


def measure_memory(impl: str, *, seq: int = 32768, heads: int = 4, head_dim: int = 64, causal: bool = False,
                   backend: str = "cpu", threads: int | None = None, timeout: float = 1800) -> dict:
    """Peak resident growth of one forward + backward in a child process, and the part of it above the
    outputs and gradients the call returns (the inputs, q k v dout, were resident before)."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, impl, str(seq), str(heads), str(head_dim),
                           "1" if causal else "0", backend, str(threads or 0)],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    row: dict[str, Any] = dict(impl=impl, seq=seq, heads=heads, head_dim=head_dim, causal=causal, batch=1,
                               dtype="float32")
    if proc.returncode != 0:
        row["note"] = f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        return row
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = got["peak"] - got["before"]
    row.update(inputs_mib=got["inputs"] / 2**20, kept_mib=got["kept"] / 2**20, growth_mib=growth / 2**20,
               extra_mib=(growth - got["kept"]) / 2**20)
    if got["peak_before"] > got["before"] + growth:
        row["note"] = "the child's peak before the call was higher than during it: growth not measurable"
    return row


def run_memory_bench(*, compare_torch: bool = True, seq: int = 32768, heads: int = 4, head_dim: int = 64,
                     causal: bool = False, threads: int | None = None) -> list[dict]:
    backend, why = fastattn_backend()
    rows = []
    if why is not None and seq * seq * 8 * 3 > 2**31:
        rows.append(dict(impl="fastattn", seq=seq, heads=heads, head_dim=head_dim, causal=causal,
                         note=f"not run: {why}, and the reference backend materializes seq x seq"))
    else:
        rows.append({**measure_memory("fastattn", seq=seq, heads=heads, head_dim=head_dim, causal=causal,
                                      backend=backend, threads=threads), "backend": backend})
    if compare_torch:
        rows.append(measure_memory("torch", seq=seq, heads=heads, head_dim=head_dim, causal=causal, threads=threads))
    return rows


def format_memory_table(rows: list[dict]) -> str:
    lines = [f"| implementation | shape | inputs MiB | outputs + grads MiB | peak growth MiB | above outputs + grads "
             f"MiB (target <= {MEMORY_TARGET_MIB}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"B1 H{r['heads']} N{r['seq']} D{r['head_dim']}{' causal' if r['causal'] else ''} fp32"
        name = "torch SDPA" if r["impl"] == "torch" else f"fastattn ({r.get('backend', 'cpu')})"
        if "extra_mib" not in r:
            lines.append(f"| {name} | {shape} | {r.get('note', 'not run')} ||||")
            continue
        verdict = "" if r["impl"] == "torch" else (" (met)" if r["extra_mib"] <= MEMORY_TARGET_MIB else " (missed)")
        lines.append(f"| {name} | {shape} | {r['inputs_mib']:.0f} | {r['kept_mib']:.1f} | {r['growth_mib']:.1f} | "
                     f"{r['extra_mib']:.1f}{verdict}" + (f"; {r['note']}" if r.get("note") else "") + " |")
    return "\n".join(lines)
