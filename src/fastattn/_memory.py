"""How much memory attention needs: estimated (``memory_savings``) and measured (``memory_report``).

Both figures are for one whole call on ``(batch, heads, seq_len, head_dim)`` inputs: the peak
of what the call allocates on top of its inputs (q, k and v are in neither).  Units are
binary: KiB, MiB, GiB.

Flash path (the compiled CPU kernel), from the size arithmetic of the kernel itself (the
twins in ``backends.cpu._tiles``, beside ``choose_tiles``, the one place tiles are picked)::

    flash   = stats + out + max(tiles + panels, cast)

    tiles   = threads · scratch_bytes(block_q, block_kv, d)   every thread's Q, S/P and O tiles
                                                              and its m_i, l_i, alpha rows
    panels  = group · panel_bytes(seq_kv, d, block_kv)        the packed Kᵀ/V panels of the heads
                                                              worked on at once (padded to the
                                                              SIMD width)
    stats   = batch · heads · seq_q · c                       lse
    out     = batch · heads · seq_q · d · c                   the output, in the compute dtype
    cast    = batch · heads · seq_q · d · i                   its copy in the input dtype
                                                              (float16 / bfloat16 only)

Tiles and panels are freed when the kernel returns, before the output is cast, hence the
``max``.  ``threads`` is the number the call runs on (``backends.cpu._threads.choose_threads``:
the request or OpenMP's default, capped by the usable CPUs and the work), ``group`` the heads the
driver packs together (both from ``backends.cpu._tiles.plan_call``, as the backend does); ``c`` is the compute
itemsize (8 for float64, else 4), ``i`` the input itemsize.

Materialized path (``standard_attention``: one head's full score matrix at a time, computed in
float32 even for float16/bfloat16 inputs, float64 for float64)::

    naive   = out + stats + max(squares + 3 · seq · d · c, cast)
    squares = 4 · seq_q · seq_kv · c          the score-sized arrays alive at once (scores,
                                              exponentials, probabilities, a temporary; counted
                                              with tracemalloc around NumPy's calls)
            + seq_q · seq_kv                  the boolean causal mask (causal only)

(``3 · seq · d · c``: one head's q, k, v in the compute dtype; ``cast``: as above, made once
every head is done, for every dtype.)

``reduction_factor = naive / flash``.  ``tests/test_memory.py`` checks both estimates against the
peaks measured here (within ``ESTIMATE_TOLERANCE``).

Measurement (``memory_report(measure=True)``): each call runs in a fresh interpreter
(``sys.executable -c``) so that nothing of this process (its heap, its high-water mark)
leaks into the number, and so that memory the C kernels ``malloc`` (invisible to
``tracemalloc``) is counted.  The child allocates the inputs, warms the path up on a
tiny problem (library initialisation is not the call's memory), resets the kernel's
resident-set high-water mark (``/proc/self/clear_refs`` ← 5), runs the call once and
reports ``VmHWM − VmRSS_before``: the peak resident memory the call added, its output
included.  Where ``clear_refs`` cannot be written (not Linux) it falls back to the rise
of ``ru_maxrss``, which can only under-report (the earlier high-water mark hides a
smaller peak); the report names the method it used.

Why not ``ru_maxrss`` alone on Linux: a child started through vfork/posix_spawn (as
``subprocess`` does) inherits its parent's high-water mark at exec, so a child of a
400 MB pytest process reports ~400 MB before it has done anything, and a smaller peak of
its own never shows.  ``VmHWM`` belongs to the child's own address space.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._checks import check_bool, check_positive_int
from ._validate import SUPPORTED_DTYPES

#: default cap on the estimated memory of one measured call
DEFAULT_MATERIALIZED_LIMIT = 4 * 1024**3

#: full (seq_q, seq_kv) compute-dtype arrays alive at once in the materialized NumPy path
#: (measured with tracemalloc around ``standard_attention``: 4.03 per head for float32,
#: float16 and float64 at N = 2048)
_MATERIALIZED_SQUARES = 4

#: how far an estimate may lie from the measured peak, as a factor either way, for calls whose
#: estimate is at least ESTIMATE_MIN_BYTES.  Measured on this project's 2-core machine (Zen 5,
#: AVX-512; B=1..2, H=1..8, D=64/80/128, N=256..8192, every dtype, causal and not, 1 and 2 threads):
#: the flash estimate was 1.03-1.17x the measured peak, the materialized one 0.75-0.99x (the
#: materialized path also touches OpenBLAS buffers and reuses freed heap; neither is modelled).
#: Smaller calls are dominated by allocator reuse (a 60 KiB estimate measured 10 KiB) and are
#: not held to it.
ESTIMATE_TOLERANCE = 1.5
ESTIMATE_MIN_BYTES = 2 * 1024**2

#: how the measurement script names the path: "flash" (flash_attention) or "materialized"
_PATHS = ("flash", "materialized")

#: install hint for the optional plotting dependency (from a clone of the repository)
PLOT_HINT = 'pip install matplotlib (or, from the fastattn clone, pip install ".[plot]")'


def format_bytes(n: float, digits: int = 1) -> str:
    """Binary units, ``digits`` decimals: 16777216 -> "16.0 MiB", 50176 -> "49.0 KiB"."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{int(n)} B"


def _format_factor(factor: float | None) -> str:
    if factor is None:
        return "-"
    return f"{factor:.0f}x" if factor >= 10 else f"{factor:.2g}x"


def _check_dtype(dtype: object) -> str:
    import numpy as np

    from ._validate import numpy_dtype

    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except TypeError:
            name = str(dtype)
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}; got {dtype!r}")
    numpy_dtype(name)  # bfloat16 needs ml_dtypes: fail here, clearly
    return name


def _check_timeout(timeout: object) -> float | None:
    """None (no limit) or a positive finite number of seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    value = float(timeout)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"timeout must be a positive, finite number of seconds or None, got {timeout!r}")
    return value


def _itemsizes(dtype_name: str) -> tuple[int, int]:
    """(input itemsize, compute itemsize)."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype_name]
    return itemsize, 8 if dtype_name == "float64" else 4


def _cpu_defaults() -> tuple[int, str]:
    """(OpenMP's default thread count, the SIMD path in use) of the CPU backend; without the
    compiled extension, the CPU count and the portable path."""
    from . import backends

    cpu = backends.get_backend("cpu")
    if cpu.availability() is not None:
        return os.cpu_count() or 1, "generic"
    facts = cpu.describe()
    simd = facts["simd"] if facts["simd"] in cpu.SIMD_NAMES else cpu.simd_paths()[-1]
    return int(facts["threads"]), simd


@dataclasses.dataclass(frozen=True)
class MemorySavings:
    """Estimated peak bytes of one call: the materialized path against the flash path.

    ``naive_bytes`` and ``flash_bytes`` are whole-call figures (all heads, all threads, the
    outputs); the ``*_bytes`` fields after them split ``flash_bytes`` into its parts.
    """

    seq_len: int
    naive_bytes: int  # materialized path: score-sized arrays of one head + outputs
    flash_bytes: int  # flash path: tiles + panels + stats + outputs
    reduction_factor: float  # naive_bytes / flash_bytes
    head_dim: int = 64
    block_size_q: int = 0
    block_size_kv: int = 0
    dtype: str = "float32"
    num_heads: int = 1
    batch: int = 1
    causal: bool = False
    num_threads: int = 1  # threads the flash call runs on
    simd: str = ""  # the SIMD path whose vector width pads the panels and tiles
    panel_heads: int = 1  # heads whose packed K/V panels are alive at once
    scores_bytes: int = 0  # one head's seq_len² score matrix in the compute dtype
    tiles_bytes: int = 0  # every thread's tile scratch
    panel_bytes: int = 0  # the packed K/V panels alive at once
    stats_bytes: int = 0  # lse in the compute dtype (m_i, l_i are in the tiles)
    output_bytes: int = 0  # out in the compute dtype, plus its cast to the input dtype (made after
    #                        the tiles and panels are freed: flash_bytes is not the plain sum)

    @property
    def compute_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    def __str__(self) -> str:
        return (
            f"seq_len={self.seq_len}: materialized ~{format_bytes(self.naive_bytes)}, "
            f"flash ~{format_bytes(self.flash_bytes)}, {_format_factor(self.reduction_factor)} reduction "
            f"(estimated peaks of one call: B={self.batch} H={self.num_heads} D={self.head_dim} {self.dtype}, "
            f"{self.num_threads} thread{'s' if self.num_threads != 1 else ''})"
        )


def _materialized_bytes(n_heads: int, seq: int, head_dim: int, itemsize: int, compute: int,
                        causal: bool, lse_cast: bool = False) -> int:
    """Estimated peak of the materialized path (see the module docstring)."""
    squares = _MATERIALIZED_SQUARES * seq * seq * compute + (seq * seq if causal else 0)
    head_copies = 3 * seq * head_dim * compute  # one head's q, k, v in the compute dtype
    outputs = n_heads * seq * (head_dim + 1) * compute
    cast = n_heads * seq * (head_dim + (1 if lse_cast else 0)) * itemsize
    return outputs + max(squares + head_copies, cast)


def memory_savings(
    seq_len: int,
    *,
    head_dim: int = 64,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
    dtype: Any = "float32",
    num_heads: int = 1,
    batch: int = 1,
    causal: bool = False,
    num_threads: int | None = None,
    simd: str | None = None,
) -> MemorySavings:
    """Estimated peak memory of one self-attention call, materialized path against flash path.

    Counts what each path allocates beyond its inputs (module docstring): for the flash path
    every thread's tiles, the packed K/V panels, lse and the output; for the materialized path
    one head's score-sized arrays and the outputs.  ``num_threads`` defaults to what a call
    without ``num_threads`` runs on (OpenMP's default, at most one per work item), ``simd`` to
    the SIMD path in use, tile sizes to the CPU tile chooser's.

    >>> print(fastattn.memory_savings(4096, num_heads=8, num_threads=2, simd="avx512"))  # doctest: +SKIP
    seq_len=4096: materialized ~267.1 MiB, flash ~12.6 MiB, 21x reduction (estimated peaks of one call: \
B=1 H=8 D=64 float32, 2 threads)
    """
    from .backends.cpu._tiles import (
        VECTOR_BYTES,
        panel_bytes,
        plan_call,
        scratch_bytes,
    )

    seq_len_ = check_positive_int("seq_len", seq_len, allow_none=False)
    head_dim_ = check_positive_int("head_dim", head_dim, allow_none=False)
    block_q = check_positive_int("block_size_q", block_size_q)
    block_kv = check_positive_int("block_size_kv", block_size_kv)
    heads_ = check_positive_int("num_heads", num_heads, allow_none=False)
    batch_ = check_positive_int("batch", batch, allow_none=False)
    threads = check_positive_int("num_threads", num_threads)
    assert seq_len_ is not None and head_dim_ is not None and heads_ is not None and batch_ is not None
    causal_ = check_bool("causal", causal)
    name = _check_dtype(dtype)
    if simd is not None and simd not in VECTOR_BYTES:
        raise ValueError(f"simd must be one of {', '.join(VECTOR_BYTES)} or None, got {simd!r}")
    default_threads, default_simd = _cpu_defaults() if threads is None or simd is None else (0, "")
    threads = threads or default_threads
    simd = simd or default_simd

    itemsize, compute = _itemsizes(name)
    n_heads = batch_ * heads_
    from ._validate import attended_pairs

    flops = 4 * head_dim_ * attended_pairs(seq_len_, seq_len_, causal_) * n_heads
    plan = plan_call(n_heads=n_heads, seq_q=seq_len_, seq_kv=seq_len_, head_dim=head_dim_, compute_itemsize=compute,
                     flops=flops, threads=threads, block_q=block_q, block_kv=block_kv)
    block_q, block_kv, used, group = plan.block_q, plan.block_kv, plan.threads, plan.group
    tiles = used * scratch_bytes(block_q, block_kv, head_dim_, compute, simd)
    panels = group * panel_bytes(seq_len_, head_dim_, block_kv, compute, simd)
    stats = n_heads * seq_len_ * compute
    out = n_heads * seq_len_ * head_dim_ * compute
    cast = n_heads * seq_len_ * head_dim_ * itemsize if itemsize != compute else 0
    flash = stats + out + max(tiles + panels, cast)  # tiles and panels are freed before the cast
    naive = _materialized_bytes(n_heads, seq_len_, head_dim_, itemsize, compute, causal_)
    return MemorySavings(
        seq_len=seq_len_, naive_bytes=naive, flash_bytes=flash, reduction_factor=naive / flash,
        head_dim=head_dim_, block_size_q=block_q, block_size_kv=block_kv, dtype=name,
        num_heads=heads_, batch=batch_, causal=causal_, num_threads=used, simd=simd, panel_heads=group,
        scores_bytes=seq_len_ * seq_len_ * compute, tiles_bytes=tiles, panel_bytes=panels,
        stats_bytes=stats, output_bytes=out + cast,
    )


# --------------------------------------------------------------------------- measurement

_MEASURE_SCRIPT = r"""
import json, resource, sys
import numpy as np
import fastattn
from fastattn._validate import numpy_dtype

p = json.loads(sys.argv[1])
dtype = numpy_dtype(p["dtype"])
rng = np.random.default_rng(p["seed"])

def make(seq):
    # filled head by head: no full-size temporary raises the high-water mark before the call
    x = np.empty((p["batch"], p["heads"], seq, p["head_dim"]), dtype=dtype)
    for b in range(p["batch"]):
        for h in range(p["heads"]):
            x[b, h] = rng.standard_normal((seq, p["head_dim"]), dtype=np.float32)
    return x

def call(q, k, v):
    if p["path"] == "flash":
        cfg = fastattn.FlashAttentionConfig(head_dim=p["head_dim"], num_heads=p["heads"], causal=p["causal"])
        res = fastattn.FlashAttention(cfg, backend=p["backend"]).forward_multi_head(
            q, k, v, num_threads=p["threads"])
        return res.output, res.num_threads
    return fastattn.standard_attention(q, k, v, causal=p["causal"]), None

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out

def maxrss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024

call(make(16), make(16), make(16))  # initialise BLAS, thread pools, the kernel's dispatch
q, k, v = make(p["seq"]), make(p["seq"]), make(p["seq"])
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status()["VmRSS"]
    method = "VmHWM after clear_refs"
except OSError:
    before = maxrss()
    method = "ru_maxrss rise (lower bound)"
out, threads = call(q, k, v)
peak = status()["VmHWM"] if method.startswith("VmHWM") else maxrss()
print(json.dumps({"increase": max(peak - before, 0), "baseline": before, "peak": peak, "method": method,
                  "threads": threads}))
"""


def _measure_in_subprocess(params: dict, timeout: float | None = None) -> dict:
    """Runs one call in a fresh interpreter; returns its peak resident-memory increase."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    what = f"the {params['path']} path at seq_len={params['seq']}"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(params)],
            capture_output=True, text=True, env=env, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"measuring {what} took longer than timeout={timeout:g} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"(no message; exit status {proc.returncode})"]
        raise RuntimeError(f"measuring {what} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One sequence length of a :class:`MemoryReport`: bytes of one whole call (all heads),
    beyond its inputs; estimates from :func:`memory_savings`, peaks measured."""

    seq_len: int
    naive_bytes: int  # estimated peak of the materialized path
    flash_bytes: int  # estimated peak of the flash path
    reduction_factor: float  # naive_bytes / flash_bytes
    inputs_bytes: int  # q, k and v (in neither figure)
    flash_peak_bytes: int | None = None  # measured rise of resident memory during the call
    materialized_peak_bytes: int | None = None
    measured_reduction: float | None = None  # materialized_peak_bytes / flash_peak_bytes
    flash_threads: int | None = None  # threads the measured flash call ran on
    flash_note: str = ""  # why a measurement is missing
    materialized_note: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Estimated and measured peak memory of one call of the flash and the materialized path."""

    rows: tuple[MemoryRow, ...]
    head_dim: int
    num_heads: int
    batch: int
    dtype: str
    causal: bool
    backend: str  # the backend the flash path ran on
    measured: bool
    method: str  # how peaks were measured
    num_threads: int = 1  # threads of the flash estimate (the measured ones are per row)
    simd: str = ""  # the SIMD path of the flash estimate ("" for the reference backend)
    block_size_q: int = 0  # tiles of the flash estimate at the longest seq_len
    block_size_kv: int = 0

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        out["rows"] = [dataclasses.asdict(row) for row in self.rows]
        return out

    def _describe_flash(self) -> str:
        if self.backend == "reference":
            return "flash path on the reference backend (materialized float64: estimated as such)"
        return (f"flash path on the {self.backend} backend: {self.simd}, {self.num_threads} "
                f"thread{'s' if self.num_threads != 1 else ''}, tiles {self.block_size_q} x {self.block_size_kv} "
                f"(block_q x block_kv)")

    def __str__(self) -> str:
        compute = "float64" if self.dtype == "float64" else "float32"
        head = (
            f"memory of one call: batch={self.batch} heads={self.num_heads} head_dim={self.head_dim} "
            f"dtype={self.dtype} (computed in {compute}) causal={self.causal}\n"
            f"{self._describe_flash()}\n"
            f"est. = estimated peak (fastattn.memory_savings); peak = measured rise of resident memory during "
            f"the call ({self.method if self.measured else 'not measured'})\n"
            f"inputs (q, k, v) are in neither; KiB, MiB, GiB = 1024-based\n"
        )
        cols = ("seq_len", "inputs", "materialized est.", "materialized peak", "flash est.", "flash peak",
                "reduction est.", "reduction measured")
        lines = []
        for r in self.rows:
            lines.append((
                str(r.seq_len), format_bytes(r.inputs_bytes),
                format_bytes(r.naive_bytes),
                format_bytes(r.materialized_peak_bytes) if r.materialized_peak_bytes is not None
                else r.materialized_note or "-",
                format_bytes(r.flash_bytes),
                format_bytes(r.flash_peak_bytes) if r.flash_peak_bytes is not None else r.flash_note or "-",
                _format_factor(r.reduction_factor), _format_factor(r.measured_reduction),
            ))
        widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        table = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines]
        return head + "\n".join(table)

    def plot(self, path: str | os.PathLike) -> Path:
        """Writes a PNG: peak bytes against seq_len (estimate dashed, measured solid) and the
        reduction factor, estimated and measured; needs matplotlib."""
        try:
            import matplotlib
        except ImportError as exc:
            raise ImportError(f"MemoryReport.plot needs matplotlib: {PLOT_HINT}") from exc
        if "matplotlib.pyplot" not in sys.modules:  # never switch (and so close) a user's pyplot figures
            matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        seqs = [r.seq_len for r in self.rows]
        fig = Figure(figsize=(11, 4.5))
        ax, ax_red = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        series = (
            ("C0", "materialized", "naive_bytes", "materialized_peak_bytes"),
            ("C1", f"flash ({self.backend})", "flash_bytes", "flash_peak_bytes"),
        )
        values: list[float] = []
        for color, name, est_attr, peak_attr in series:
            est = [getattr(r, est_attr) for r in self.rows]
            ax.plot(seqs, est, "--", color=color, marker="x", label=f"{name}, estimate")
            values += est
            points = [(r.seq_len, getattr(r, peak_attr)) for r in self.rows if getattr(r, peak_attr)]
            if points:
                ax.plot(*zip(*points, strict=True), "-", color=color, marker="o", label=f"{name}, measured peak")
                values += [p[1] for p in points]
        _log_axis_if_wide(ax.set_yscale, values)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_bytes(y, 0) if y > 0 else "0"))
        ax.set_ylabel("peak memory of one call (beyond q, k, v)")
        ax.set_title(f"B={self.batch} H={self.num_heads} D={self.head_dim} {self.dtype}"
                     f"{' causal' if self.causal else ''}, flash on {self.backend}"
                     f"{f' ({self.simd}, {self.num_threads} threads)' if self.simd else ''}")

        ax_red.plot(seqs, [r.reduction_factor for r in self.rows], "--", color="C2", marker="x", label="estimate")
        measured = [(r.seq_len, r.measured_reduction) for r in self.rows if r.measured_reduction]
        if measured:
            ax_red.plot(*zip(*measured, strict=True), "-", color="C2", marker="o", label="measured")
        _log_axis_if_wide(ax_red.set_yscale, [r.reduction_factor for r in self.rows] + [m[1] for m in measured])
        ax_red.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax_red.set_ylabel("materialized ÷ flash")
        ax_red.set_title("memory reduction")
        for a in (ax, ax_red):
            if len(seqs) > 1 and max(seqs) / min(seqs) >= 4:
                a.set_xscale("log", base=2)
            a.xaxis.set_major_locator(FixedLocator(seqs))
            a.xaxis.set_minor_locator(NullLocator())
            a.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            a.set_xlabel("sequence length N (queries = keys)")
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize="small")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=110)
        return path


def _log_axis_if_wide(set_scale: Any, values: list[float]) -> None:
    """A log axis where the positive values span more than a decade."""
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 10:
        set_scale("log", base=2)


def _estimates(backend: str, seq: int, head_dim: int, num_heads: int, batch: int, dtype: str, causal: bool,
               num_threads: int | None) -> MemorySavings:
    """memory_savings for the backend that runs the flash path: the reference backend is a
    materialized float64 path and is estimated as one."""
    est = memory_savings(seq, head_dim=head_dim, num_heads=num_heads, batch=batch, dtype=dtype,
                         causal=causal, num_threads=num_threads)
    if backend != "reference":
        return est
    itemsize, _ = _itemsizes(dtype)
    flash = _materialized_bytes(batch * num_heads, seq, head_dim, itemsize, 8, causal, lse_cast=itemsize != 8)
    return dataclasses.replace(est, flash_bytes=flash, reduction_factor=est.naive_bytes / flash, simd="",
                               num_threads=1, tiles_bytes=0, panel_bytes=0, panel_heads=0, stats_bytes=0,
                               output_bytes=0)


def _call_need_bytes(path: str, backend: str, seq: int, head_dim: int, heads_total: int, dtype: str,
                     causal: bool = False, num_threads: int | None = None) -> int:
    """Estimated peak of one call (inputs excluded), used to skip what would not fit."""
    est = _estimates(backend, seq, head_dim, heads_total, 1, dtype, causal, num_threads)
    return est.flash_bytes if path == "flash" else est.naive_bytes


def memory_report(
    seq_lens: Iterable[int] = (512, 1024, 2048, 4096),
    *,
    head_dim: int = 64,
    num_heads: int = 8,
    batch: int = 1,
    dtype: Any = "float32",
    causal: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
    measure: bool = True,
    materialized_limit_bytes: int = DEFAULT_MATERIALIZED_LIMIT,
    timeout: float | None = 600.0,
    progress: bool = False,
) -> MemoryReport:
    """Estimates, and measures while running, the peak memory of the flash and materialized paths.

    For every ``seq_len`` the report holds the estimates of :func:`memory_savings` and, with
    ``measure=True``, the peak resident memory that one call of ``flash_attention(...,
    backend=backend, num_threads=num_threads)`` and one of ``standard_attention`` added, each
    run alone in a fresh interpreter (see the module docstring).  A call whose estimated need
    exceeds ``materialized_limit_bytes`` is skipped and says what it would need.  ``backend``
    must run on the host ("auto" picks "cpu", or "reference" where the compiled kernel is
    missing); the report records which one ran.  ``timeout`` (seconds, or None) bounds each
    measured call; one that runs longer raises TimeoutError.  ``progress=True`` shows a
    progress bar on stderr.
    """
    from . import backends

    if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Iterable):
        raise TypeError(f"seq_lens must be a sequence of positive ints, got {seq_lens!r}")
    seqs = [check_positive_int("seq_lens[]", s, allow_none=False) for s in seq_lens]
    if not seqs:
        raise ValueError("seq_lens must hold at least one sequence length")
    head_dim_ = check_positive_int("head_dim", head_dim, allow_none=False)
    num_heads_ = check_positive_int("num_heads", num_heads, allow_none=False)
    batch_ = check_positive_int("batch", batch, allow_none=False)
    threads = check_positive_int("num_threads", num_threads)
    limit = check_positive_int("materialized_limit_bytes", materialized_limit_bytes, allow_none=False)
    assert head_dim_ is not None and num_heads_ is not None and batch_ is not None and limit is not None
    name = _check_dtype(dtype)
    causal_ = check_bool("causal", causal)
    measure_ = check_bool("measure", measure)
    progress_ = check_bool("progress", progress)
    timeout_ = _check_timeout(timeout)
    if backend == "cuda":
        raise ValueError("memory_report measures host memory; use backend 'auto', 'cpu' or 'reference'")
    engine = backends.resolve(backend)  # no arrays: a host backend ("auto" -> cpu, else reference)
    itemsize, _ = _itemsizes(name)
    heads_total = batch_ * num_heads_
    method = "VmHWM after clear_refs" if sys.platform.startswith("linux") else "ru_maxrss rise (lower bound)"
    ordered = [s for s in sorted(dict.fromkeys(seqs)) if s is not None]

    from tqdm.auto import tqdm

    rows = []
    est = None
    with tqdm(total=len(ordered) * len(_PATHS) if measure_ else 0, desc="memory", unit="call",
              disable=not (progress_ and measure_), file=sys.stderr, leave=False) as bar:
        for seq in ordered:
            est = _estimates(engine.NAME, seq, head_dim_, num_heads_, batch_, name, causal_, threads)
            peaks: dict[str, int | None] = {"flash": None, "materialized": None}
            notes = {"flash": "", "materialized": ""}
            flash_threads = None
            for path in _PATHS if measure_ else ():
                bar.set_postfix_str(f"{path} N={seq}")
                need = est.flash_bytes if path == "flash" else est.naive_bytes
                if need > limit:
                    notes[path] = f"skipped: would need ~{format_bytes(need)}"
                    bar.update()
                    continue
                params = dict(path=path, backend=engine.NAME, batch=batch_, heads=num_heads_, seq=seq,
                              head_dim=head_dim_, dtype=name, causal=causal_, seed=seq, threads=threads)
                result = _measure_in_subprocess(params, timeout=timeout_)
                peaks[path] = int(result["increase"])
                method = result["method"]
                if path == "flash":
                    flash_threads = result.get("threads")
                bar.update()
            flash_peak, naive_peak = peaks["flash"], peaks["materialized"]
            rows.append(MemoryRow(
                seq_len=seq, naive_bytes=est.naive_bytes, flash_bytes=est.flash_bytes,
                reduction_factor=est.reduction_factor, inputs_bytes=3 * heads_total * seq * head_dim_ * itemsize,
                flash_peak_bytes=flash_peak, materialized_peak_bytes=naive_peak,
                measured_reduction=naive_peak / flash_peak if flash_peak and naive_peak else None,
                flash_threads=flash_threads, flash_note=notes["flash"], materialized_note=notes["materialized"],
            ))
        bar.refresh()  # the final count drawn before the bar (leave=False) is cleared, however fast the last call
    assert est is not None
    return MemoryReport(
        rows=tuple(rows), head_dim=head_dim_, num_heads=num_heads_, batch=batch_, dtype=name, causal=causal_,
        backend=engine.NAME, measured=measure_, method=method, num_threads=est.num_threads, simd=est.simd,
        block_size_q=est.block_size_q, block_size_kv=est.block_size_kv,
    )
