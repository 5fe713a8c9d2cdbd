"""The benchmark workload grid, defined once (``python -m fastattn bench`` and ``bench/`` both use it),
the implementations it compares, the CPU timer and the tables.

Timing: inputs are fresh standard-normal arrays (never zeros: an all-zero input takes
fast paths through exp and the FMA units that real data does not), one warm-up call, then
the median of ``repeat`` calls timed with ``time.perf_counter``.  FLOPs count 4·head_dim
per attended (query, key) pair (``fastattn._validate.attended_pairs``), so causal runs do
about half the work of full ones; GFLOP/s = flops / time for every implementation alike.
Every table puts the competitors beside fastattn with the ratio (competitor time ÷ time,
so above 1 means faster than that competitor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ._validate import attended_pairs

#: the default quick run: a few seconds on a 2-core machine
DEFAULT_SEQS: tuple[int, ...] = (1024,)
DEFAULT_HEAD_DIMS: tuple[int, ...] = (64,)
#: ``--compare torch``: the full grid
FULL_SEQS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
FULL_HEAD_DIMS: tuple[int, ...] = (64, 128)
#: ``--quick``
QUICK_SEQS: tuple[int, ...] = (256, 512)
QUICK_HEAD_DIMS: tuple[int, ...] = (64,)
CAUSAL: tuple[bool, ...] = (False, True)
BATCH = 1
HEADS = 8

#: the materialized NumPy path is skipped where one call would need more than this
MATERIALIZED_LIMIT_BYTES = 1024**3
#: the float64 reference backend (the test oracle) is timed only up to this length
REFERENCE_MAX_SEQ = 1024
#: ``--device cuda --quick`` (the CUDA grid itself lives in ``fastattn._bench_cuda``)
CUDA_QUICK_SEQS: tuple[int, ...] = (1024, 4096)
CUDA_QUICK_HEAD_DIMS: tuple[int, ...] = (64, 128)
#: the fp32 matmul that calibrates "fraction of peak": (n, n) @ (n, n)
MATMUL_N = 2048

FASTATTN_CPU = "fastattn-cpu"
FASTATTN_REFERENCE = "fastattn-reference"
NUMPY = "numpy-materialized"
TORCH = "torch-sdpa"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One attention problem: (batch, heads, seq, head_dim) self-attention."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: str = "float32"

    @property
    def flops(self) -> int:
        return 4 * self.head_dim * attended_pairs(self.seq, self.seq, self.causal) * self.batch * self.heads

    @property
    def label(self) -> str:
        return (f"B{self.batch} H{self.heads} N{self.seq} D{self.head_dim} {self.dtype}"
                f"{' causal' if self.causal else ''}")

    def inputs(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fresh random q, k, v (standard normal, never zeros)."""
        rng = rng if rng is not None else np.random.default_rng()
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        return tuple(rng.standard_normal(shape, dtype=np.float32).astype(self.dtype, copy=False)
                     for _ in range(3))  # type: ignore[return-value]


def grid(
    seqs: Iterable[int] = FULL_SEQS,
    head_dims: Iterable[int] = FULL_HEAD_DIMS,
    causal: Iterable[bool] = CAUSAL,
    *,
    batch: int = BATCH,
    heads: int = HEADS,
    dtype: str = "float32",
) -> list[Workload]:
    """The workloads, ordered by head_dim, then seq, then causal."""
    return [Workload(batch, heads, n, d, c, dtype) for d in head_dims for n in seqs for c in causal]


def default_grid() -> list[Workload]:
    return grid(DEFAULT_SEQS, DEFAULT_HEAD_DIMS)


def quick_grid() -> list[Workload]:
    return grid(QUICK_SEQS, QUICK_HEAD_DIMS)


def full_grid() -> list[Workload]:
    return grid(FULL_SEQS, FULL_HEAD_DIMS)


# --------------------------------------------------------------------------- implementations


def _fastattn_unavailable(name: str) -> str | None:
    from . import backends

    return backends.get_backend(name).availability()


#: PyTorch's own command for its CPU-only build (the plain package index resolves a CUDA build)
TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def torch_unavailable() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return f"PyTorch is not installed (for its CPU build: {TORCH_CPU_INSTALL})"
    return None


def unavailable(impl: str) -> str | None:
    """None when ``impl`` can run here, else why not."""
    if impl == FASTATTN_CPU:
        return _fastattn_unavailable("cpu")
    if impl == FASTATTN_REFERENCE:
        return _fastattn_unavailable("reference")
    if impl == NUMPY:
        return None
    if impl == TORCH:
        return torch_unavailable()
    from . import _bench_peers

    if impl in _bench_peers.PEERS.values():
        return _bench_peers.unavailable(impl)
    raise ValueError(f"unknown implementation {impl!r}")


def implementations(compare_torch: bool, peers: Sequence[str] = ()) -> list[str]:
    """What a run compares: fastattn's compiled CPU backend (the float64 reference oracle at
    small sizes only, where the compiled one is missing), NumPy materialized, PyTorch, and the
    other peers asked for (``fastattn._bench_peers``: ONNX Runtime, OpenVINO)."""
    impls = [FASTATTN_CPU if unavailable(FASTATTN_CPU) is None else FASTATTN_REFERENCE, NUMPY]
    if compare_torch:
        impls.append(TORCH)
    return impls + list(peers)


def materialized_need_bytes(w: Workload) -> int:
    from ._memory import _call_need_bytes

    return _call_need_bytes("materialized", "numpy", w.seq, w.head_dim, w.batch * w.heads, w.dtype)


def skip_reason(impl: str, w: Workload, materialized_limit_bytes: int = MATERIALIZED_LIMIT_BYTES) -> str | None:
    """Why ``impl`` is not timed on ``w`` (too much memory or time), or None."""
    from ._memory import format_bytes

    if impl == NUMPY:
        need = materialized_need_bytes(w)
        if need > materialized_limit_bytes:
            return (f"skipped: would need ~{format_bytes(need, 2)}, over the "
                    f"{format_bytes(materialized_limit_bytes, 2)} limit")
    if impl == FASTATTN_REFERENCE and w.seq > REFERENCE_MAX_SEQ:
        return f"skipped: float64 oracle, timed only up to N={REFERENCE_MAX_SEQ}"
    return None


def make_call(impl: str, w: Workload, q: np.ndarray, k: np.ndarray, v: np.ndarray,
              threads: int | None) -> Callable[[], Any]:
    """A zero-argument callable running ``impl`` once on these inputs.  fastattn's callable
    also keeps, as its ``threads_used`` attribute, the thread count its last call ran on."""
    import fastattn

    if impl in (FASTATTN_CPU, FASTATTN_REFERENCE):
        cfg = fastattn.FlashAttentionConfig(head_dim=w.head_dim, num_heads=w.heads, causal=w.causal)
        fa = fastattn.FlashAttention(cfg, backend="cpu" if impl == FASTATTN_CPU else "reference")

        def run_fastattn() -> Any:
            res = fa.forward_multi_head(q, k, v, num_threads=threads)
            run_fastattn.threads_used = res.num_threads  # type: ignore[attr-defined]
            return res.output

        run_fastattn.threads_used = None  # type: ignore[attr-defined]
        return run_fastattn
    if impl == NUMPY:
        return lambda: fastattn.standard_attention(q, k, v, causal=w.causal)
    if impl == TORCH:
        import torch

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def run() -> Any:
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=w.causal)

        return run
    from . import _bench_peers

    if impl in _bench_peers.PEERS.values():
        return _bench_peers.make_call(impl, q, k, v, w.causal, threads)
    raise ValueError(f"unknown implementation {impl!r}")


def threads_in_use(impl: str, call: Callable[[], Any] | None = None) -> int | None:
    """Threads ``impl`` runs on now (call inside :func:`thread_limit`): fastattn's as its last
    call reported, NumPy's BLAS pool as threadpoolctl sees it, PyTorch's intra-op pool."""
    if impl in (FASTATTN_CPU, FASTATTN_REFERENCE) or impl not in (TORCH, NUMPY):
        return getattr(call, "threads_used", None)
    if impl == TORCH:
        import torch

        return int(torch.get_num_threads())
    if impl == NUMPY:
        from threadpoolctl import threadpool_info

        blas = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
        return max(blas) if blas else None
    return None


@contextlib.contextmanager
def thread_limit(impl: str, threads: int | None) -> Iterator[None]:
    """Holds ``impl`` to ``threads`` threads (fastattn takes ``num_threads`` itself)."""
    if threads is None:
        yield
        return
    if impl == TORCH:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        yield


#: pause before timing an implementation: thread pools of the one timed before (OpenBLAS,
#: PyTorch's or fastattn's OpenMP) keep spinning for a while after their last call and
#: would steal the cores from the next one
SETTLE_SECONDS = 0.3


def time_call(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``repeat`` calls after ``warmup`` untimed ones."""
    time.sleep(SETTLE_SECONDS)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = MATMUL_N, repeat: int = 5, threads: int | None = None) -> float:
    """GFLOP/s of NumPy's fp32 ``a @ b`` on (n, n) matrices (2·n³ flops), in this process now."""
    rng = np.random.default_rng()
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with thread_limit(NUMPY, threads):
        seconds = time_call(lambda: a @ b, repeat)
    return 2 * n**3 / seconds / 1e9


def run_cpu_bench(
    workloads: Sequence[Workload],
    impls: Sequence[str],
    *,
    threads: int | None = None,
    repeat: int = 3,
    progress: bool = True,
    measure_matmul: bool = False,
    materialized_limit_bytes: int = MATERIALIZED_LIMIT_BYTES,
) -> dict:
    """Times every implementation on every workload; returns ``{"matmul_gflops", "results"}``.

    Each result is a dict: device, impl, batch, heads, seq, head_dim, causal, dtype,
    threads_requested (``threads``), threads (what the implementation really ran on: None when
    not run), ms and gflops (None when not run) and note (why not).
    """
    from tqdm.auto import tqdm

    matmul = matmul_gflops(threads=threads) if measure_matmul else None
    rng = np.random.default_rng()
    results = []
    with tqdm(total=len(workloads) * len(impls), desc="bench", unit="run", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for w in workloads:
            q, k, v = w.inputs(rng)
            for impl in impls:
                bar.set_postfix_str(f"{impl} {w.label}")
                record = dict(device="cpu", impl=impl, batch=w.batch, heads=w.heads, seq=w.seq,
                              head_dim=w.head_dim, causal=w.causal, dtype=w.dtype, threads_requested=threads,
                              threads=None, ms=None, gflops=None, note="")
                reason = unavailable(impl) or skip_reason(impl, w, materialized_limit_bytes)
                if reason is None:
                    call = make_call(impl, w, q, k, v, threads)
                    with thread_limit(impl, threads):
                        seconds = time_call(call, repeat)
                        record["threads"] = threads_in_use(impl, call)
                    record["ms"] = seconds * 1e3
                    record["gflops"] = w.flops / seconds / 1e9
                else:
                    record["note"] = reason
                results.append(record)
                bar.update()
    return {"matmul_gflops": matmul, "results": results}


def machine_facts() -> dict:
    """What the numbers were measured on (the threads each result ran on are in the result)."""
    import platform

    import fastattn

    facts = {"python": platform.python_version(), "machine": platform.machine(), "numpy": np.__version__,
             "fastattn": fastattn.__version__, "cpu_count": os.cpu_count(), "simd": fastattn_simd()}
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if model:
            facts["cpu"] = model
    except OSError:
        pass
    return facts


def fastattn_simd() -> str:
    """The SIMD path fastattn's cpu backend runs here, or why there is none."""
    from . import backends

    cpu = backends.get_backend("cpu")
    if cpu.availability() is not None:
        return "none (compiled cpu backend missing)"
    return str(cpu.describe()["simd"])


# --------------------------------------------------------------------------- tables and plots

#: how the tables name a workload, explained once above them
LABEL_LEGEND = ("workload B<batch> H<heads> N<sequence length, queries = keys> D<head dim> <dtype>; "
                "causal: top-left causal mask")


def threads_summary(results: Sequence[dict]) -> str:
    """The threads each implementation really ran on, e.g. "fastattn-cpu 2, numpy-materialized 2"."""
    used: dict[str, set[int]] = {}
    for r in results:
        if r.get("threads") is not None:
            used.setdefault(r["impl"], set()).add(int(r["threads"]))
    parts = []
    for impl, counts in used.items():
        lo, hi = min(counts), max(counts)
        parts.append(f"{impl} {lo}" if lo == hi else f"{impl} {lo}-{hi}")
    return ", ".join(parts) or "none ran"


def header(results: Sequence[dict], *, requested: int | None, repeat: int, facts: dict) -> str:
    """The lines above a CPU table: what ran, on what, with how many threads, and the legend."""
    asked = f"--threads {requested} for every implementation" if requested else "each library's default"
    return "\n".join([
        f"CPU attention, median of {repeat} after a warm-up; {facts.get('cpu', facts['machine'])}, "
        f"{facts.get('cpu_count')} logical CPUs",
        f"fastattn {facts['fastattn']}, SIMD path {facts['simd']}; threads used ({asked}): {threads_summary(results)}",
        LABEL_LEGEND,
    ])


def _workload_key(r: dict) -> tuple:
    return (r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"], r["dtype"])


def _workload_label(r: dict) -> str:
    return Workload(r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"], r["dtype"]).label


def format_table(results: Sequence[dict], competitors: Sequence[str], *, matmul_gflops: float | None = None,
                 tera: bool = False, best_of: Sequence[str] = ()) -> str:
    """One block per workload, one line per implementation: ms, GFLOP/s (TFLOP/s with
    ``tera``), the speed ratio to each competitor (its ms ÷ this ms), to the fastest of ``best_of``
    (two or more peers) and, given the same run's matmul GFLOP/s, the fraction of it."""
    unit = "TFLOP/s" if tera else "GFLOP/s"
    best_of = list(best_of) if len(best_of) > 1 else []
    cols = ["workload", "impl", "ms", unit] + [f"vs {c}" for c in competitors] + (["vs best peer"] if best_of else [])
    if matmul_gflops:
        cols.append("of matmul")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_workload_key(r), []).append(r)
    lines: list[list[str]] = []
    for rows in groups.values():
        by_impl = {r["impl"]: r for r in rows}
        for i, r in enumerate(rows):
            line = [_workload_label(r) if i == 0 else "", r["impl"]]
            if r.get("ms") is None:
                lines.append(line + [r.get("note") or "not run"])
                continue
            rate = r["gflops"] / 1e3 if tera else r["gflops"]
            line += [f"{r['ms']:.2f}", f"{rate:.2f}" if tera else f"{rate:.1f}"]
            for c in competitors:
                other = by_impl.get(c)
                line.append(f"{other['ms'] / r['ms']:.2f}x" if other and other.get("ms") else "-")
            if best_of:
                times = [by_impl[c]["ms"] for c in best_of if c in by_impl and by_impl[c].get("ms")]
                line.append(f"{min(times) / r['ms']:.2f}x" if times else "-")
            if matmul_gflops:
                line.append(f"{r['gflops'] / matmul_gflops:.0%}")
            lines.append(line)
    widths = [len(c) for c in cols]
    for line in lines:
        if len(line) == len(cols):
            widths = [max(w, len(x)) for w, x in zip(widths, line, strict=True)]
        else:  # a skipped line: its note spans the value columns
            widths[0], widths[1] = max(widths[0], len(line[0])), max(widths[1], len(line[1]))

    def fmt(line: list[str]) -> str:
        head = f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}"
        if len(line) != len(cols):
            return f"{head}  {line[2]}"
        return head + "".join(f"  {x:>{w}}" for x, w in zip(line[2:], widths[2:], strict=True))

    out = [fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines]
    notes = [f"ratios: competitor's time / this time (above 1 = faster than it); {unit} from 4·D per "
             "attended pair (causal ≈ half)"]
    if matmul_gflops:
        notes.append(f"of matmul: fraction of this run's fp32 NumPy {MATMUL_N}x{MATMUL_N} matmul, "
                     f"{matmul_gflops:.1f} GFLOP/s")
    return "\n".join(out + notes)


def cuda_results(rows: Iterable[dict]) -> list[dict]:
    """``_bench_cuda.run_cuda_bench`` rows in this module's record shape (gflops from tflops)."""
    out = []
    for r in rows:
        rec = dict(r)
        rec.setdefault("note", "")
        tflops = rec.get("tflops")
        rec["gflops"] = tflops * 1e3 if tflops is not None else None
        out.append(rec)
    return out


def plot(results: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """GFLOP/s against seq_len, one line per (implementation, head_dim, causal); PNG via matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        from ._memory import PLOT_HINT

        raise ImportError(f"plotting needs matplotlib: {PLOT_HINT}") from exc
    if "matplotlib.pyplot" not in sys.modules:  # never switch (and so close) a user's pyplot figures
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in results:
        if r.get("gflops"):
            series.setdefault((r["head_dim"], r["impl"], r["causal"]), []).append((r["seq"], r["gflops"]))
    head_dims = sorted({key[0] for key in series}) or [0]
    impls = sorted({key[1] for key in series})
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    fig = Figure(figsize=(5.5 * len(head_dims), 4.5))
    axes = fig.subplots(1, len(head_dims), squeeze=False, sharey=True)[0]
    for ax, d in zip(axes, head_dims, strict=True):
        for (dim, impl, causal), points in sorted(series.items()):
            if dim != d:
                continue
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "--" if causal else "-", marker="o",
                    color=colors[impl], label=f"{impl}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_title(f"head_dim={d}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("GFLOP/s")
    fig.suptitle(title or "attention throughput")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=110)
