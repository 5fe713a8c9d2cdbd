"""How much memory attention needs: estimated (``memory_savings``) and measured (``memory_report``).

Estimates, per head (batch x heads multiplies both sides alike)::

    naive  = seq_len² · itemsize                    the score matrix a materialized path holds
    flash  = working_set_bytes(block_q, block_kv)   one thread's tiles (backends.cpu._tiles)
           + 3 · seq_len · stats_itemsize           the O(N) row statistics m_i, l_i, lse

``itemsize`` is the input dtype's; ``stats_itemsize`` and the tiles use the compute
itemsize (8 for float64, else 4).  Tile sizes come from ``backends.cpu._tiles.choose_tiles``,
the one place that picks them; a tile never spans more rows than the sequence has.

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

#: row statistics kept per query row: m_i, l_i and lse
_STATS_PER_ROW = 3

#: full (seq_q, seq_kv) arrays alive at once in the materialized NumPy path
#: (scores, masked scores, exp, normalized probabilities)
_MATERIALIZED_SQUARES = 4


def format_bytes(n: float, digits: int = 1) -> str:
    """Binary units, ``digits`` decimals: 16777216 -> "16.0MB", 50176 -> "49.0KB"."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{unit}"
    return f"{int(n)}B"


def _format_factor(factor: float) -> str:
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


def _itemsizes(dtype_name: str) -> tuple[int, int]:
    """(input itemsize, compute itemsize)."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype_name]
    return itemsize, 8 if dtype_name == "float64" else 4


@dataclasses.dataclass(frozen=True)
class MemorySavings:
    """Estimated bytes per head of the materialized path and of the flash path."""

    seq_len: int
    naive_bytes: int
    flash_bytes: int
    reduction_factor: float
    head_dim: int = 64
    block_size_q: int = 0
    block_size_kv: int = 0
    dtype: str = "float32"

    def __str__(self) -> str:
        return (
            f"seq_len={self.seq_len}: naive={format_bytes(self.naive_bytes)}, "
            f"flash={format_bytes(self.flash_bytes)}, {_format_factor(self.reduction_factor)} reduction"
        )


def memory_savings(
    seq_len: int,
    *,
    head_dim: int = 64,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
    dtype: Any = "float32",
) -> MemorySavings:
    """Estimated memory per head: the full score matrix against the flash path's tiles.

    ``naive_bytes = seq_len² · itemsize``; ``flash_bytes`` = one thread's tile working set
    (tile sizes from the CPU tile chooser, or the given ``block_size_*``, at most
    ``seq_len`` rows) plus ``m_i``, ``l_i`` and ``lse`` for every row.

    >>> print(fastattn.memory_savings(2048))  # doctest: +SKIP
    seq_len=2048: naive=16.0MB, flash=..., ...x reduction
    """
    from .backends.cpu._tiles import choose_tiles, working_set_bytes

    seq_len_ = check_positive_int("seq_len", seq_len, allow_none=False)
    head_dim_ = check_positive_int("head_dim", head_dim, allow_none=False)
    block_q = check_positive_int("block_size_q", block_size_q)
    block_kv = check_positive_int("block_size_kv", block_size_kv)
    assert seq_len_ is not None and head_dim_ is not None
    name = _check_dtype(dtype)
    itemsize, compute_itemsize = _itemsizes(name)
    block_q, block_kv = choose_tiles(head_dim_, compute_itemsize, block_q, block_kv, seq_len_, seq_len_)
    naive = seq_len_ * seq_len_ * itemsize
    flash = working_set_bytes(block_q, block_kv, head_dim_, compute_itemsize)
    flash += _STATS_PER_ROW * seq_len_ * compute_itemsize
    return MemorySavings(
        seq_len=seq_len_, naive_bytes=naive, flash_bytes=flash, reduction_factor=naive / flash,
        head_dim=head_dim_, block_size_q=block_q, block_size_kv=block_kv, dtype=name,
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
        return fastattn.flash_attention(q, k, v, causal=p["causal"], backend=p["backend"])
    return fastattn.standard_attention(q, k, v, causal=p["causal"])

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
out = call(q, k, v)
peak = status()["VmHWM"] if method.startswith("VmHWM") else maxrss()
print(json.dumps({"increase": max(peak - before, 0), "baseline": before, "peak": peak, "method": method}))
"""


def _measure_in_subprocess(params: dict, timeout: float | None = None) -> dict:
    """Runs one call in a fresh interpreter; returns its peak resident-memory increase."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_SCRIPT, json.dumps(params)],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"measuring {params['path']} at seq_len={params['seq']} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One sequence length of a :class:`MemoryReport` (bytes; measured ones for the whole call)."""

    seq_len: int
    naive_bytes: int  # estimate per head: seq_len² · itemsize
    flash_bytes: int  # estimate per head: tiles + row statistics
    reduction_factor: float
    inputs_bytes: int  # q, k, v and the output, the whole batch
    flash_peak_bytes: int | None = None  # measured rise of resident memory during the call
    materialized_peak_bytes: int | None = None
    flash_note: str = ""  # why a measurement is missing
    materialized_note: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Estimated and measured memory of the flash path and the materialized path."""

    rows: tuple[MemoryRow, ...]
    head_dim: int
    num_heads: int
    batch: int
    dtype: str
    causal: bool
    backend: str  # the backend the flash path ran on
    measured: bool
    method: str  # how peaks were measured

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}
        out["rows"] = [dataclasses.asdict(row) for row in self.rows]
        return out

    def __str__(self) -> str:
        head = (
            f"memory: batch={self.batch} heads={self.num_heads} head_dim={self.head_dim} dtype={self.dtype} "
            f"causal={self.causal} flash backend={self.backend}\n"
            f"estimates per head; measured = peak resident memory added by the whole call "
            f"({self.method if self.measured else 'not measured'})\n"
        )
        cols = ("seq_len", "naive/head", "flash/head", "reduction", "inputs+out", "flash peak", "materialized peak")
        lines = []
        for r in self.rows:
            lines.append((
                str(r.seq_len), format_bytes(r.naive_bytes), format_bytes(r.flash_bytes),
                _format_factor(r.reduction_factor), format_bytes(r.inputs_bytes),
                format_bytes(r.flash_peak_bytes) if r.flash_peak_bytes is not None else r.flash_note or "-",
                format_bytes(r.materialized_peak_bytes) if r.materialized_peak_bytes is not None
                else r.materialized_note or "-",
            ))
        widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        table = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines]
        return head + "\n".join(table)

    def plot(self, path: str | os.PathLike) -> Path:
        """Writes a PNG (log-log bytes against seq_len); needs matplotlib (``pip install fastattn[plot]``)."""
        try:
            import matplotlib
        except ImportError as exc:
            raise ImportError(
                "MemoryReport.plot needs matplotlib; install it with `pip install fastattn[plot]`"
            ) from exc
        if "matplotlib.pyplot" not in sys.modules:  # never switch (and so close) a user's pyplot figures
            matplotlib.use("Agg")
        from matplotlib.figure import Figure

        heads = self.batch * self.num_heads
        seqs = [r.seq_len for r in self.rows]
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        ax.plot(seqs, [r.naive_bytes * heads for r in self.rows], "--", label="materialized, estimate (scores)")
        ax.plot(seqs, [r.flash_bytes * heads for r in self.rows], "--", label="flash, estimate (tiles + stats)")
        for attr, label in (("materialized_peak_bytes", "materialized, measured peak"),
                            ("flash_peak_bytes", f"flash ({self.backend}), measured peak")):
            points = [(r.seq_len, getattr(r, attr)) for r in self.rows if getattr(r, attr)]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("bytes (all heads)")
        ax.set_title(f"B={self.batch} H={self.num_heads} D={self.head_dim} {self.dtype}"
                     f"{' causal' if self.causal else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=110)
        return path


def _call_need_bytes(path: str, backend: str, seq: int, head_dim: int, heads_total: int, dtype: str) -> int:
    """Estimated peak of one call (inputs excluded), used to skip what would not fit."""
    itemsize, compute = _itemsizes(dtype)
    if path == "materialized" or backend == "reference":  # one head's square matrices at a time
        square_itemsize = 8 if backend == "reference" and path == "flash" else compute
        return _MATERIALIZED_SQUARES * seq * seq * square_itemsize + heads_total * seq * head_dim * itemsize
    return (os.cpu_count() or 1) * memory_savings(seq, head_dim=head_dim, dtype=dtype).flash_bytes \
        + heads_total * seq * (head_dim + _STATS_PER_ROW) * compute


def memory_report(
    seq_lens: Iterable[int] = (512, 1024, 2048, 4096),
    *,
    head_dim: int = 64,
    num_heads: int = 8,
    batch: int = 1,
    dtype: Any = "float32",
    causal: bool = False,
    backend: str = "auto",
    measure: bool = True,
    materialized_limit_bytes: int = DEFAULT_MATERIALIZED_LIMIT,
    timeout: float | None = 600.0,
) -> MemoryReport:
    """Estimates, and measures while running, the memory of the flash and materialized paths.

    For every ``seq_len`` the report holds the per-head estimates of :func:`memory_savings`
    and, with ``measure=True``, the peak resident memory that one call of
    ``flash_attention(..., backend=backend)`` and one of ``standard_attention`` added,
    each run alone in a fresh interpreter (see the module docstring).  A call whose
    estimated need exceeds ``materialized_limit_bytes`` is skipped and says what it would
    need.  ``backend`` must run on the host ("auto" picks "cpu", or "reference" where
    the compiled kernel is missing); the row records which one ran.
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
    limit = check_positive_int("materialized_limit_bytes", materialized_limit_bytes, allow_none=False)
    assert head_dim_ is not None and num_heads_ is not None and batch_ is not None and limit is not None
    name = _check_dtype(dtype)
    causal_ = check_bool("causal", causal)
    measure_ = check_bool("measure", measure)
    if backend == "cuda":
        raise ValueError("memory_report measures host memory; use backend 'auto', 'cpu' or 'reference'")
    engine = backends.resolve(backend)  # no arrays: a host backend ("auto" -> cpu, else reference)
    itemsize, _ = _itemsizes(name)
    heads_total = batch_ * num_heads_
    method = "VmHWM after clear_refs" if sys.platform.startswith("linux") else "ru_maxrss rise (lower bound)"

    rows = []
    for seq in sorted(dict.fromkeys(seqs)):
        assert seq is not None
        est = memory_savings(seq, head_dim=head_dim_, dtype=name)
        peaks: dict[str, int | None] = {"flash": None, "materialized": None}
        notes = {"flash": "", "materialized": ""}
        if measure_:
            for path in ("flash", "materialized"):
                need = _call_need_bytes(path, engine.NAME, seq, head_dim_, heads_total, name)
                if need > limit:
                    notes[path] = f"skipped: would need ~{format_bytes(need)}"
                    continue
                params = dict(path=path, backend=engine.NAME, batch=batch_, heads=num_heads_, seq=seq,
                              head_dim=head_dim_, dtype=name, causal=causal_, seed=seq)
                result = _measure_in_subprocess(params, timeout=timeout)
                peaks[path] = int(result["increase"])
                method = result["method"]
        rows.append(MemoryRow(
            seq_len=seq, naive_bytes=est.naive_bytes, flash_bytes=est.flash_bytes,
            reduction_factor=est.reduction_factor, inputs_bytes=4 * heads_total * seq * head_dim_ * itemsize,
            flash_peak_bytes=peaks["flash"], materialized_peak_bytes=peaks["materialized"],
            flash_note=notes["flash"], materialized_note=notes["materialized"],
        ))
    return MemoryReport(
        rows=tuple(rows), head_dim=head_dim_, num_heads=num_heads_, batch=batch_, dtype=name, causal=causal_,
        backend=engine.NAME, measured=measure_, method=method,
    )

