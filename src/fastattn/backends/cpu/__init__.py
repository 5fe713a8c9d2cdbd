"""The CPU backend: Cython + OpenMP driver over SIMD micro-kernels (kernels/).

SIMD path: the best one this CPU supports, unless forced by the environment variable
``FASTATTN_SIMD`` (``avx512``, ``avx2`` or ``generic``; read at each call) or by the
context manager :func:`set_simd`.  Threads: ``_threads.choose_threads`` (at most ``num_threads``
when given, else OpenMP's default, which honours ``OMP_NUM_THREADS`` and
``threadpoolctl.threadpool_limits``; never more than the CPUs this process may use or than the
work can keep busy).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..._arrays import like_input
from ..._dropout import dropout_threshold
from ..._validate import AttentionSpec
from .. import BackendStats, ForwardOutput
from . import _threads
from ._tiles import cache_sizes, panel_group, plan_call, working_set_bytes

NAME = "cpu"

_threads.configure_openmp_wait()  # read by libgomp when the extension loads it
try:  # import_module: a missing extension reads "No module named ...", not "circular import"
    _flash_cpu = importlib.import_module(f"{__name__}._flash_cpu")
except ImportError as exc:  # pragma: no cover - only without the compiled extension
    _flash_cpu = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""
finally:
    _threads.restore_environment()

SIMD_NAMES = ("avx512", "avx2", "generic")

_forced = threading.local()

# GNU OpenMP's thread pool does not survive fork(): a child forked after the parent ran a
# parallel region would wait forever for threads that no longer exist.  A forked child
# therefore runs the kernel on one thread (its own), and says so once.
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def availability() -> str | None:
    if _flash_cpu is None:
        return f"the compiled extension fastattn.backends.cpu._flash_cpu is missing ({_IMPORT_ERROR})"
    return None


def simd_paths() -> list[str]:
    """The SIMD paths this CPU can run, slowest first (``generic`` always)."""
    return _flash_cpu.supported_isas()


def simd_in_use() -> str:
    """The path the next call on this thread will take."""
    forced = getattr(_forced, "name", None)
    if forced:
        return forced
    from_env = os.environ.get("FASTATTN_SIMD", "").strip().lower()
    return _checked_simd(from_env, "FASTATTN_SIMD=") if from_env else _flash_cpu.best_isa()


def _checked_simd(name: str, source: str = "") -> str:
    if name not in SIMD_NAMES:
        raise ValueError(f"{source}{name!r} is not a SIMD path; use {', '.join(SIMD_NAMES)}")
    if name not in simd_paths():
        raise RuntimeError(f"SIMD path {name!r} is not supported by this CPU; supported: {simd_paths()}")
    return name


@contextlib.contextmanager
def set_simd(name: str) -> Iterator[None]:
    """Forces a SIMD path for calls made on this thread inside the ``with`` block."""
    _checked_simd(name)
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


_warned_fork = False


def _warn_forked_once() -> None:
    global _warned_fork
    if not _warned_fork:
        _warned_fork = True
        warnings.warn(
            "fastattn: running on one thread in this forked process (OpenMP cannot be used after fork); "
            "use the 'spawn' or 'forkserver' start method for multi-threaded workers",
            RuntimeWarning, stacklevel=4,
        )


def prepare(x: Any) -> np.ndarray:
    return np.asarray(x)


def restore(y: Any, like: Any) -> Any:
    return like_input(y, like)


def check_spec(spec: AttentionSpec) -> None:
    """The cpu kernel runs every variant."""


def describe() -> dict:
    try:
        simd = simd_in_use()
    except (ValueError, RuntimeError) as exc:  # a bad FASTATTN_SIMD: report it, don't crash info()
        simd = f"invalid: {exc}"
    return {
        "simd": simd,
        "simd_available": simd_paths(),
        "threads": min(_flash_cpu.default_threads(), _threads.cpu_limit()),
        "openmp": _flash_cpu.openmp_enabled(),
        "openmp_spin_count": _threads.openmp_wait_policy(),
        "cache_bytes": cache_sizes(),
    }


def _kernel_view(x: np.ndarray) -> np.ndarray:
    """The array itself when its byte strides are usable; a copy only for odd cases."""
    if x.dtype.byteorder not in ("=", "|") or any(s % x.itemsize for s in x.strides):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    return x


def _host(x: Any) -> Any:
    return None if x is None else np.ascontiguousarray(x)


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: AttentionSpec) -> ForwardOutput:
    compute = np.float64 if spec.dtype == np.float64 else np.float32
    itemsize = np.dtype(compute).itemsize
    n_panels = spec.batch * spec.heads_kv
    plan = plan_call(n_heads=n_panels, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
                     head_dim=max(spec.head_dim, spec.head_dim_v), compute_itemsize=itemsize, flops=spec.flops,
                     threads=spec.num_threads or _flash_cpu.default_threads(),
                     block_q=spec.block_q, block_kv=spec.block_kv, group=spec.group)
    block_q, block_kv, threads, group = plan.block_q, plan.block_kv, plan.threads, plan.group
    b4, h4, s4 = q.shape[:3]
    if spec.layout == "bshd" or spec.ragged == "packed":  # memory in the caller's (batch, seq, heads) order
        out = np.empty((b4, s4, h4, spec.head_dim_v), dtype=compute).swapaxes(1, 2)
    else:
        out = np.empty((b4, h4, s4, spec.head_dim_v), dtype=compute)
    lse = np.empty((b4, h4, s4), dtype=compute)
    if _forked_child and threads > 1:
        _warn_forked_once()
        threads = 1
        group = panel_group(n_panels, plan.n_q_tiles, 1) if group else 0
    drop = spec.dropout_p > 0.0
    simd = simd_in_use()
    rule, arrays = spec.rule, spec.arrays
    used = _flash_cpu.forward(
        _kernel_view(q), _kernel_view(k), _kernel_view(v), out, lse,
        batch=spec.batch, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
        block_q=block_q, block_kv=block_kv, scale=spec.scale, causal=rule.causal, bottom_right=rule.bottom_right,
        window_left=rule.window_left, window_right=rule.window_right, softcap=rule.softcap,
        alibi=_host(arrays.alibi_slopes), mask=arrays.attn_mask, lens_q=_host(arrays.seqlens_q),
        lens_kv=_host(arrays.seqlens_kv), cu_q=_host(arrays.cu_seqlens_q), cu_kv=_host(arrays.cu_seqlens_kv),
        dropout=drop, drop_threshold=dropout_threshold(spec.dropout_p) if drop else 0,
        drop_scale=1.0 / (1.0 - spec.dropout_p), seed=spec.seed if drop else 0,
        isa=simd, num_threads=threads, group=group,
    )
    stats = BackendStats(
        block_q=block_q, block_kv=block_kv,
        peak_sram_bytes=working_set_bytes(block_q, block_kv, spec.head_dim, itemsize),
        num_threads=max(used, 1), simd=simd,
    )
    if out.dtype != spec.dtype:
        out = out.astype(spec.dtype)
    return ForwardOutput(out, lse, stats)
