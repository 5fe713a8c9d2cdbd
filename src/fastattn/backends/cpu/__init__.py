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
import dataclasses
import functools
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
from .. import BackendStats, BackwardOutput, ForwardOutput
from . import _threads
from ._tiles import cache_sizes, panel_group, plan_backward, plan_call, working_set_bytes

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
    from_env = _flash_cpu.simd_from_env()  # os.environ's value (its writes go through putenv)
    if from_env:
        from_env = from_env.strip().lower()
        if from_env:
            return _checked_simd(from_env, "FASTATTN_SIMD=")
    return _best_isa()


@functools.lru_cache(maxsize=1)
def _best_isa() -> str:
    return _flash_cpu.best_isa()


def _checked_simd(name: str, source: str = "") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}a SIMD path is a str ({', '.join(SIMD_NAMES)}), got {name!r}")
    name = str(name)  # a str subclass (numpy.str_) as the plain str the kernel takes
    if name not in SIMD_NAMES:
        raise ValueError(f"{source}{name!r} is not a SIMD path; use {', '.join(SIMD_NAMES)}")
    if name not in simd_paths():
        raise RuntimeError(f"SIMD path {name!r} is not supported by this CPU; supported: {simd_paths()}")
    return name


@contextlib.contextmanager
def set_simd(name: str) -> Iterator[None]:
    """Forces a SIMD path for calls made on this thread inside the ``with`` block."""
    name = _checked_simd(name)
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
    if x.flags.c_contiguous and x.dtype.isnative:   # the common case, without a look at each stride
        return x
    if x.dtype.byteorder not in ("=", "|") or any(s % x.itemsize for s in x.strides):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    return x


def _host(x: Any) -> Any:
    return None if x is None else np.ascontiguousarray(x)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What a forward call passes to the kernel besides its arrays: a function of the spec and of the
    machine state in ``key`` (threads allowed, CPUs usable, SIMD path), so a spec that repeats (the
    validation memo returns the same object) plans once per state."""

    key: tuple
    compute: Any
    threads: int
    group: int
    n_q_tiles: int
    kernel_args: dict
    stats: BackendStats
    decode_len: int = -1  # >= 0: rows this short run the decode kernel over this many keys (_decode_route)


#: the decode kernel serves flash_attention calls whose rows per k/v head are this few, against at least twice as
#: many keys as queries (_decode_route).  One thread, Zen 5, against the forward kernel: seq_q 1 with 128-4096 keys
#: 1.3-3.8x faster (H 8/8, 32/8, 32/32), 16 rows against 512 keys 2.2-4.8x, 16 against 16 0.76-0.96x
_ROUTE_MAX_ROWS = 16


def _decode_route(spec: AttentionSpec) -> int:
    """The keys each row block sees when a plain call is a decode step in disguise (a few query rows per k/v
    head against their keys: no mask array, dropout, ragged lengths or explicit tiles), so the decode kernel
    reads K and V where they lie instead of packing them; -1 otherwise (also past its int32 key counts).  The
    decode kernel aligns its rule bottom-right over that many keys: the call's own keys when its rule is
    bottom-right or cannot tell the alignments apart, its first seq_q keys for top-left causal (query i sees
    keys 0..i either way)."""
    rule, arrays = spec.rule, spec.arrays
    rows = spec.seq_q * spec.group
    if (rows > _ROUTE_MAX_ROWS or spec.seq_q == 0 or spec.seq_kv < 2 * spec.seq_q or spec.seq_kv >= 2**31
            or spec.ragged != "none"
            or arrays.attn_mask is not None or spec.dropout_p > 0.0 or spec.block_q is not None
            or spec.block_kv is not None):
        return -1
    windowed = rule.window_left >= 0 or rule.window_right >= 0
    if rule.bottom_right or spec.seq_q == spec.seq_kv or not (rule.causal or windowed):
        return spec.seq_kv
    if rule.causal and not windowed and arrays.alibi_slopes is None and spec.seq_q <= spec.seq_kv:
        return spec.seq_q
    return -1


def _launch(spec: AttentionSpec) -> _Launch:
    simd = simd_in_use()
    threads_asked = spec.num_threads or _flash_cpu.default_threads()
    key = (threads_asked, _threads.cpu_limit(), simd)
    cached = spec.__dict__.get("_cpu_launch")
    if cached is not None and cached.key == key:
        return cached
    compute = np.float64 if spec.dtype == np.float64 else np.float32
    itemsize = np.dtype(compute).itemsize
    plan = plan_call(n_heads=spec.batch * spec.heads_kv, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
                     head_dim=max(spec.head_dim, spec.head_dim_v), compute_itemsize=itemsize, flops=spec.flops,
                     threads=threads_asked, block_q=spec.block_q, block_kv=spec.block_kv, group=spec.group)
    drop = spec.dropout_p > 0.0
    rule, arrays = spec.rule, spec.arrays
    kernel_args = dict(
        batch=spec.batch, seq_q=spec.seq_q, seq_kv=spec.seq_kv,
        block_q=plan.block_q, block_kv=plan.block_kv, scale=spec.scale, causal=rule.causal,
        bottom_right=rule.bottom_right, window_left=rule.window_left, window_right=rule.window_right,
        softcap=rule.softcap, alibi=_host(arrays.alibi_slopes), mask=arrays.attn_mask, lens_q=_host(arrays.seqlens_q),
        lens_kv=_host(arrays.seqlens_kv), cu_q=_host(arrays.cu_seqlens_q), cu_kv=_host(arrays.cu_seqlens_kv),
        dropout=drop, drop_threshold=dropout_threshold(spec.dropout_p) if drop else 0,
        drop_scale=1.0 / (1.0 - spec.dropout_p), seed=spec.seed if drop else 0,
        isa=simd, num_threads=plan.threads, group=plan.group,
    )
    decode_len = _decode_route(spec)
    # the tiles of the kernel that runs (the decode kernel: the item's rows against 32 keys at a time)
    tile_q, tile_kv = (spec.seq_q * spec.group, _DECODE_TILE) if decode_len >= 0 else (plan.block_q, plan.block_kv)
    stats = BackendStats(block_q=tile_q, block_kv=tile_kv,
                         peak_sram_bytes=working_set_bytes(tile_q, tile_kv, spec.head_dim, itemsize),
                         num_threads=plan.threads, simd=simd)
    launch = _Launch(key, compute, plan.threads, plan.group, plan.n_q_tiles, kernel_args, stats, decode_len)
    spec.__dict__["_cpu_launch"] = launch  # lives and dies with the spec (a cache beside its cached flops)
    return launch


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: AttentionSpec) -> ForwardOutput:
    launch = _launch(spec)
    compute, kernel_args = launch.compute, launch.kernel_args
    b4, h4, s4 = q.shape[:3]
    if spec.layout == "bshd" or spec.ragged == "packed":  # memory in the caller's (batch, seq, heads) order
        out = np.empty((b4, s4, h4, spec.head_dim_v), dtype=compute).swapaxes(1, 2)
    else:
        out = np.empty((b4, h4, s4, spec.head_dim_v), dtype=compute)
    lse = np.empty((b4, h4, s4), dtype=compute)
    if launch.decode_len >= 0:
        k4, v4 = _kernel_view(k), _kernel_view(v)
        q4 = _kernel_view(q)
        st = _decode_static(q4, k4, v4, scale=spec.scale, causal=spec.rule.causal,
                            window=(kernel_args["window_left"], kernel_args["window_right"]), softcap=spec.rule.softcap,
                            slopes=kernel_args["alibi"], head_dim=spec.head_dim, itemsize=np.dtype(compute).itemsize)
        used = _decode_run(st, q4, k4, v4, out, lse, np.full(spec.batch, launch.decode_len, np.int32), None,
                           kernel_args["isa"], spec.num_threads or _flash_cpu.default_threads(), None,
                           launch.decode_len)
    else:
        if _forked_child and launch.threads > 1:
            _warn_forked_once()
            group = panel_group(spec.batch * spec.heads_kv, launch.n_q_tiles, 1) if launch.group else 0
            kernel_args = dict(kernel_args, num_threads=1, group=group)
        used = _flash_cpu.forward(_kernel_view(q), _kernel_view(k), _kernel_view(v), out, lse, **kernel_args)
    stats = launch.stats
    if max(used, 1) != stats.num_threads:
        stats = dataclasses.replace(stats, num_threads=max(used, 1))
    if out.dtype != spec.dtype:
        out = out.astype(spec.dtype)
    return ForwardOutput(out, lse, stats)


def _grad_array(b: int, h: int, s: int, d: int, dtype: Any, caller_order: bool) -> np.ndarray:
    """A zeroed (b, h, s, d) gradient array of the compute type, in (b, s, h, d) memory when ``caller_order``."""
    if caller_order:
        return np.zeros((b, s, h, d), dtype=dtype).swapaxes(1, 2)
    return np.zeros((b, h, s, d), dtype=dtype)


def backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
             spec: AttentionSpec, *, want_dbias: bool = False, deterministic: bool = False) -> BackwardOutput:
    """The backward kernel (deterministic whatever ``deterministic`` says: no atomics, fixed-order sums)."""
    compute = np.float64 if spec.dtype == np.float64 else np.float32
    itemsize = np.dtype(compute).itemsize
    simd = simd_in_use()
    n_heads = spec.batch * spec.heads_kv
    plan = plan_backward(n_heads=n_heads, seq_q=spec.seq_q, seq_kv=spec.seq_kv, head_dim=spec.head_dim,
                         head_dim_v=spec.head_dim_v, compute_itemsize=itemsize, flops=spec.flops * 5 // 2,
                         threads=spec.num_threads or _flash_cpu.default_threads(), simd=simd,
                         block_q=spec.block_q, block_kv=spec.block_kv, group=spec.group)
    threads, group, nchunk = plan.threads, plan.group, plan.nchunk
    if _forked_child and threads > 1:
        _warn_forked_once()
        threads = 1
    pad = _flash_cpu.dim_pad(simd, spec.dtype.name)
    dp, dvp = -(-spec.head_dim // pad) * pad, -(-spec.head_dim_v // pad) * pad
    b4, h4, sq4 = q.shape[:3]
    hk4, sk4 = k.shape[1], k.shape[2]
    caller_order = spec.layout == "bshd" or spec.ragged == "packed"
    dq = _grad_array(b4, h4, sq4, dp, compute, caller_order)
    dk = _grad_array(b4, hk4, sk4, dp, compute, caller_order)
    dv = _grad_array(b4, hk4, sk4, dvp, compute, caller_order)
    dbias = np.zeros((b4, h4, sq4, sk4), dtype=compute) if want_dbias else None
    lse_c = np.ascontiguousarray(lse, dtype=np.float64)  # read in double: the kernel splits it in two floats
    drop = spec.dropout_p > 0.0
    rule, arrays = spec.rule, spec.arrays
    used = _flash_cpu.backward(
        _kernel_view(q), _kernel_view(k), _kernel_view(v), _kernel_view(dout), _kernel_view(out), lse_c,
        dq, dk, dv, dbias, batch=spec.batch, seq_q=spec.seq_q, seq_kv=spec.seq_kv, block_q=plan.block_q,
        block_kv=plan.block_kv, scale=spec.scale, causal=rule.causal, bottom_right=rule.bottom_right,
        window_left=rule.window_left, window_right=rule.window_right, softcap=rule.softcap,
        alibi=_host(arrays.alibi_slopes), mask=arrays.attn_mask, lens_q=_host(arrays.seqlens_q),
        lens_kv=_host(arrays.seqlens_kv), cu_q=_host(arrays.cu_seqlens_q), cu_kv=_host(arrays.cu_seqlens_kv),
        dropout=drop, drop_threshold=dropout_threshold(spec.dropout_p) if drop else 0,
        drop_scale=1.0 / (1.0 - spec.dropout_p), seed=spec.seed if drop else 0,
        isa=simd, num_threads=threads, group=group, nchunk=nchunk,
    )
    grads = [x[..., :n] if x.shape[3] != n else x
             for x, n in ((dq, spec.head_dim), (dk, spec.head_dim), (dv, spec.head_dim_v))]
    if compute != spec.dtype:
        grads = [x.astype(spec.dtype) for x in grads]
    stats = BackendStats(block_q=plan.block_q, block_kv=plan.block_kv,
                         peak_sram_bytes=working_set_bytes(plan.block_q, plan.block_kv, spec.head_dim, itemsize),
                         num_threads=max(used, 1), simd=simd)
    return BackwardOutput(grads[0], grads[1], grads[2], dbias, stats)


#: the decode kernel runs when a k/v head's query rows (seq_q x heads_q / heads_kv) are at most this many;
#: longer chunks go through the forward kernel, whose packed panels pay off over many rows.  Measured on the
#: Zen 5 VM against a 16k-token cache: decode ahead of forward up to 128 rows with 32/8 heads (39 vs 67 ms)
#: and up to 32 with 32/32 (53 vs 112 ms; 128 rows: about even)
DECODE_MAX_ROWS = 128
#: above this many rows per k/v head an item takes one head (its rows' tiles already fill the scratch)
_DECODE_WIDE_ROWS = 16
#: keys per decode tile (decode_tile.h DEC_TK): a split is a whole number of tiles
_DECODE_TILE = 32
#: the fewest keys worth a split of their own (a split also costs its merge)
_MIN_KEYS_PER_SPLIT = 512


def decode_splits(items: int, threads: int, longest: int, asked: int | None) -> int:
    """How many parts each (batch entry, k/v head) cuts its keys into: ``asked`` when given (at most one
    per tile); else 1 when the items already share out evenly over the threads, or the fewest splits that
    bring the last round of the schedule to within 85% of full, keeping every split >= 512 keys."""
    tiles = max(1, -(-longest // _DECODE_TILE))
    if asked is not None:
        return max(1, min(asked, tiles))
    most = max(1, min(tiles, longest // _MIN_KEYS_PER_SPLIT, 64))
    for splits in range(1, most + 1):
        work = items * splits
        if work / (threads * -(-work // threads)) >= 0.85:
            return splits
    return most


#: bytes of k/v rows a decode item reads side by side (a key's heads, up to 32 rows of 512 bytes); measured on
#: the Zen 5 development machine, B1 H32/32 16k fp32: 24 GB/s one head per item, 29 at 4 KiB, 30 at 16 KiB
_DECODE_RUN_BYTES = 16384


def decode_heads_per_item(k4: np.ndarray, heads_kv: int) -> int:
    """k/v heads per decode item: where a key's heads lie side by side in memory ((batch, seq, heads, d) or a
    paged cache), up to ``_DECODE_RUN_BYTES`` of them, so each tile reads a few long runs instead of many short
    rows a stride apart; one head where each head's keys are contiguous already."""
    row_bytes = k4.shape[3] * k4.itemsize
    if heads_kv <= 1 or k4.strides[1] != row_bytes or k4.strides[2] != heads_kv * row_bytes:
        return 1
    return max(1, min(heads_kv, _DECODE_RUN_BYTES // max(row_bytes, 1)))


def _cache_work(lens: np.ndarray, heads_kv: int, seq_q: int, group: int, head_dim: int, head_dim_v: int,
                itemsize: int, threads_asked: int, every: int | None = None) -> tuple[int, int, int]:
    """(longest sequence, FLOPs, threads) of attention against ``lens[b]`` keys per sequence: the thread
    rule's inputs for both kernels of a cache call (one thread in a forked child).  ``every``: the length
    of every sequence, where the caller knows it (lens then is not read)."""
    if every is None:
        longest = int(lens.max(initial=0))
        keys = int(lens.sum()) * heads_kv
    else:
        longest, keys = every, every * len(lens) * heads_kv
    flops = 2 * keys * seq_q * group * (head_dim + head_dim_v)
    threads = _threads.choose_threads(threads_asked, flops=flops, kv_elements=keys * (head_dim + head_dim_v) // 2,
                                      compute_itemsize=itemsize,
                                      items=len(lens) * heads_kv * max(1, -(-longest // _MIN_KEYS_PER_SPLIT)))
    if _forked_child and threads > 1:
        _warn_forked_once()
        threads = 1
    return longest, flops, threads


@dataclasses.dataclass(frozen=True)
class _DecodeStatic:
    """What the decode kernel takes that a call's geometry and options fix (worked out once for a call that
    repeats): the thread rule's inputs, the work items, and the kernel's keyword arguments."""

    heads_kv: int
    seq_q: int
    group: int
    head_dim: int
    head_dim_v: int
    itemsize: int
    items: int
    kwargs: dict


def _decode_static(q4: np.ndarray, k4: np.ndarray, v4: np.ndarray, *, scale: float, causal: bool,
                   window: tuple[int, int], softcap: float, slopes: Any, head_dim: int, itemsize: int) -> _DecodeStatic:
    b, heads_kv, s = q4.shape[0], k4.shape[1], q4.shape[2]
    group = q4.shape[1] // max(heads_kv, 1)
    heads = decode_heads_per_item(k4, heads_kv) if s * group <= _DECODE_WIDE_ROWS else 1
    return _DecodeStatic(heads_kv, s, group, head_dim, v4.shape[3], itemsize, b * -(-heads_kv // heads),
                         dict(scale=scale, causal=causal, window_left=window[0], window_right=window[1],
                              softcap=softcap, alibi=slopes, heads_per_item=heads))


def _decode_run(st: _DecodeStatic, q4: np.ndarray, k4: np.ndarray, v4: np.ndarray, out: np.ndarray,
                lse: np.ndarray, lens: np.ndarray, table: np.ndarray | None, simd: str, threads_asked: int,
                num_splits: int | None, every: int | None = None) -> int:
    """The decode kernel over (b, h, s, d) views (k / v: a contiguous cache's or a paged one's with ``table``),
    each sequence's rule bottom-right over its ``lens[b]`` keys (``every``: all of them that long, where the
    caller knows it): threads and splits planned here for every caller (flash_attention_with_kvcache, and
    flash_attention's short rows)."""
    longest, _, threads = _cache_work(lens, st.heads_kv, st.seq_q, st.group, st.head_dim, st.head_dim_v,
                                      st.itemsize, threads_asked, every)
    splits = decode_splits(st.items, threads, longest, num_splits)
    return _flash_cpu.decode(q4, k4, v4, out, lse, lens_kv=lens, block_table=table, isa=simd,
                             num_threads=max(1, min(threads, st.items * splits)), nsplit=splits, **st.kwargs)


def kvcache(call: Any) -> tuple[Any, Any]:
    """``flash_attention_with_kvcache`` on the CPU: values checked, the new tokens appended in place, then
    the decode kernel (the cache read where it lies, paged blocks through the table, the keys split across
    threads when the heads alone cannot keep them busy) or, for long chunks, the forward kernel reading the
    cache (paged too) through the same row addressing."""
    from ..._kvcache import host_values

    total, table32 = _checked_append(call, call.k_cache, call.v_cache, call.k, call.v, *host_values(call))
    q4, k4, v4 = (_kernel_view(x) for x in _cache_views(call, call.q, call.k_cache, call.v_cache))
    out, lse = _attend_cache(_cache_facts(call, q4, k4, v4), q4, k4, v4, total, table32)
    return like_input(out, call.like), like_input(lse, call.like)


def _checked_append(call: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: np.ndarray,
                    table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The values checked (before any write), then the new tokens appended: (keys per sequence as int32, the
    block table as int32 or None).  ``lens`` and ``table`` are int64 host arrays."""
    from ..._kvcache import append_arrays, check_values

    check_values(call, lens, table)
    if k is not None:
        append_arrays(call, k_cache, v_cache, k, v, lens, table)
    table32 = np.ascontiguousarray(table, dtype=np.int32) if table is not None else None
    return (lens + call.seq_new).astype(np.int32), table32


def _cache_views(call: Any, q: Any, k_cache: Any, v_cache: Any) -> tuple[Any, Any, Any]:
    """q as (b, h, s, d), the caches as (b, h_kv, s, d) or a paged cache's (num_blocks, h_kv, block_size, d)."""
    if call.layout == "bshd":
        return q.swapaxes(1, 2), k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)
    if call.paged:
        return q, k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)
    return q, k_cache, v_cache


@dataclasses.dataclass(frozen=True)
class _CacheFacts:
    """What attending a checked cache call needs besides its arrays and lengths (a repeat keeps it)."""

    call: Any
    compute: Any
    out_bshd: bool       # the output's memory in (batch, seq, heads) order (swapped back at the end)
    out_shape: tuple
    cast: Any            # the caller's dtype where it is not the compute type, else None
    decode: _DecodeStatic | None  # None: the forward kernel (rows per k/v head past DECODE_MAX_ROWS)


def _cache_facts(call: Any, q4: np.ndarray, k4: np.ndarray, v4: np.ndarray) -> _CacheFacts:
    compute = np.float64 if call.dtype == "float64" else np.float32
    b, h, s, dv = call.batch, call.heads_q, call.seq_q, call.head_dim_v
    bshd = call.layout == "bshd"
    decode = None
    if s * call.group <= DECODE_MAX_ROWS:
        decode = _decode_static(q4, k4, v4, scale=call.scale, causal=call.causal, window=call.window,
                                softcap=call.softcap, slopes=_host(call.alibi_slopes), head_dim=call.head_dim,
                                itemsize=np.dtype(compute).itemsize)
    cast = None if np.dtype(call.dtype) == np.dtype(compute) else call.dtype
    return _CacheFacts(call, compute, bshd, (b, s, h, dv) if bshd else (b, h, s, dv), cast, decode)


def _attend_cache(facts: _CacheFacts, q4: np.ndarray, k4: np.ndarray, v4: np.ndarray, total: np.ndarray,
                  table32: np.ndarray | None, every: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attention of a checked cache call (its views, the new tokens already appended; ``total`` int32 keys per
    sequence, ``every``: the length of all of them where one length serves) through the decode kernel or, for
    long chunks, the forward kernel.  Returns NumPy (out, lse) in the caller's layout and dtype."""
    call, compute = facts.call, facts.compute
    out = np.empty(facts.out_shape, dtype=compute)
    out4 = out.swapaxes(1, 2) if facts.out_bshd else out
    lse = np.empty((call.batch, call.heads_q, call.seq_q), dtype=compute)
    simd = simd_in_use()
    threads_asked = call.num_threads or _flash_cpu.default_threads()
    if facts.decode is not None:
        _decode_run(facts.decode, q4, k4, v4, out4, lse, total, table32, simd, threads_asked, call.num_splits, every)
    else:
        b, s, dv = call.batch, call.seq_q, call.head_dim_v
        itemsize = np.dtype(compute).itemsize
        longest, flops, threads = _cache_work(total, call.heads_kv, s, call.group, call.head_dim, dv, itemsize,
                                              threads_asked, every)
        items = b * call.heads_kv
        if not call.paged:
            k4, v4 = k4[:, :, :longest], v4[:, :, :longest]
        plan = plan_call(n_heads=items, seq_q=s, seq_kv=longest, head_dim=max(call.head_dim, dv),
                         compute_itemsize=itemsize, flops=flops, threads=threads, block_q=None, block_kv=None,
                         group=call.group)
        left, right = call.window
        _flash_cpu.forward(
            q4, k4, v4, out4, lse, batch=b, seq_q=s, seq_kv=longest, block_q=plan.block_q, block_kv=plan.block_kv,
            scale=call.scale, causal=call.causal, bottom_right=True, window_left=left, window_right=right,
            softcap=call.softcap, alibi=_host(call.alibi_slopes), mask=None, lens_q=None, lens_kv=total, cu_q=None,
            cu_kv=None, dropout=False, drop_threshold=0, drop_scale=1.0, seed=0, isa=simd,
            num_threads=plan.threads if not _forked_child else 1,
            group=plan.group if not _forked_child else panel_group(items, plan.n_q_tiles, 1),
            block_table=table32,
        )
    if facts.cast is not None:
        out = out.astype(facts.cast)
    return out, lse


class CacheRepeat:
    """A checked NumPy cache call's facts, for its repeats (``_kvcache`` keys them by every shape, stride,
    dtype and option of the call, and by the caches' writeability when appending): a repeat checks the
    lengths and the table, appends, and attends.  ``run`` returns None where the full path must take the
    call (a length to refuse: the full path names the error)."""

    __slots__ = ("facts", "limit", "append")  # append: _kvcache.append_arrays, held here (no import per call)

    def run(self, q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: Any, table: Any) -> Any:
        call = self.facts.call
        if type(lens) is int and not call.paged:
            if lens < 0 or lens + call.seq_new > self.limit:
                return None
            if k is not None:
                self.append(call, k_cache, v_cache, k, v, lens, None)
            every = lens + call.seq_new
            return _attend_cache(self.facts, *_cache_views(call, q, k_cache, v_cache),
                                 np.full(call.batch, every, np.int32), None, every)
        lens_h = np.full(call.batch, lens, np.int64) if type(lens) is int else lens.astype(np.int64)
        table_h = table.astype(np.int64) if call.paged else None
        total, table32 = _checked_append(call, k_cache, v_cache, k, v, lens_h, table_h)
        return _attend_cache(self.facts, *_cache_views(call, q, k_cache, v_cache), total, table32)


def kvcache_repeat(call: Any) -> CacheRepeat | None:
    """The repeat state of a NumPy cache call ``kvcache`` just ran, or None (GPU arrays, ALiBi slopes,
    unsigned 64-bit lengths or tables, views the kernels would need copied)."""
    from ..._kvcache import append_arrays

    arrays = (call.q, call.k_cache, call.v_cache, call.k, call.v, call.cache_seqlens, call.block_table)
    if call.on_gpu or call.alibi_slopes is not None or any(
            x is not None and type(x) is not np.ndarray for x in arrays if type(x) is not int):
        return None
    if any(isinstance(x, np.ndarray) and x.dtype == np.uint64 for x in (call.cache_seqlens, call.block_table)):
        return None  # their values are checked against int64 on the full path
    views = _cache_views(call, call.q, call.k_cache, call.v_cache)
    if any(_kernel_view(x) is not x for x in views):
        return None
    r = CacheRepeat()
    kept = dataclasses.replace(call, q=None, k_cache=None, v_cache=None, k=None, v=None, like=None,
                               cache_seqlens=None, block_table=None)  # check_values' facts, no arrays
    r.facts = dataclasses.replace(_cache_facts(call, *views), call=kept)
    r.limit, r.append = min(call.capacity, 2**31 - 1), append_arrays
    return r
