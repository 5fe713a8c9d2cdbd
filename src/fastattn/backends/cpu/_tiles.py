"""The one place that picks CPU tile sizes ("cache-sized tiles").

Per thread, one work item keeps these in cache (compute itemsize ``isz``: 4 for
float32/float16/bfloat16, 8 for float64)::

    Q tile   block_q  x d        (scaled copy)
    K^T tile d        x block_kv (packed, kv contiguous)
    V tile   block_kv x d
    S/P tile block_q  x block_kv (scores, then probabilities)
    O acc    block_q  x d
    m_i, l_i block_q  each

The K and V tiles are read by every row block of the query tile; together they take a
quarter of L2 (at most 256 keys: longer tiles measured slower, see docs/design.md), and
the S tile with the Q and O rows that stream through it another quarter.
"""

from __future__ import annotations

import dataclasses
import functools
import os

_FALLBACK = {"l1d": 32 * 1024, "l2": 1024 * 1024, "l3": 8 * 1024 * 1024}


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=1)
def cache_sizes() -> dict:
    """Per-core L1d and L2, and L3, in bytes (sysfs, then sysconf, then a fallback)."""
    sizes: dict = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            try:
                with open(os.path.join(path, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(path, "type")) as f:
                    kind = f.read().strip()
                with open(os.path.join(path, "size")) as f:
                    size = _parse_size(f.read())
            except (OSError, ValueError):
                continue
            if kind == "Instruction":
                continue
            sizes[{1: "l1d", 2: "l2", 3: "l3"}.get(level, f"l{level}")] = size
    except OSError:
        pass
    for key, name in (("l1d", "SC_LEVEL1_DCACHE_SIZE"), ("l2", "SC_LEVEL2_CACHE_SIZE"), ("l3", "SC_LEVEL3_CACHE_SIZE")):
        if not sizes.get(key):
            try:
                value = os.sysconf(name)
            except (ValueError, OSError, AttributeError):
                value = 0
            if value > 0:
                sizes[key] = int(value)
    return {key: sizes.get(key) or fallback for key, fallback in _FALLBACK.items()}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_down(value: int, multiple: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, (value // multiple) * multiple))


def choose_tiles(head_dim: int, itemsize: int, block_q: int | None = None, block_kv: int | None = None,
                 seq_q: int | None = None, seq_kv: int | None = None) -> tuple[int, int]:
    """(block_q, block_kv): explicit values are kept, missing ones sized to the caches.

    Given the sequence lengths, a tile never exceeds its sequence: a longer one would cover
    the same rows while its scratch grew with the requested size.
    """
    l2 = cache_sizes()["l2"]
    chosen_q = block_q is None
    if block_kv is None:
        block_kv = _round_down(l2 // (8 * head_dim * itemsize), 16, 16, 256)
    if block_q is None:
        block_q = _round_down(l2 // (4 * (block_kv + 2 * head_dim) * itemsize), 8, 8, 256)
    if seq_q is not None:
        if chosen_q and seq_q > block_q:
            # the same number of tiles, as even as possible: no short tail item to wait for
            n_tiles = _ceil_div(seq_q, block_q)
            block_q = min(block_q, _ceil_div(_ceil_div(seq_q, n_tiles), 8) * 8)
        block_q = max(1, min(block_q, seq_q))
    if seq_kv is not None:
        block_kv = max(1, min(block_kv, seq_kv))
    return block_q, block_kv


def working_set_bytes(block_q: int, block_kv: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one thread's tile working set (see the module docstring)."""
    return itemsize * (2 * block_q * head_dim + 2 * block_kv * head_dim + block_q * block_kv + 2 * block_q)


# ----------------------------------------------------------------------------------------------------
# What the compiled kernel allocates, in Python: twins of the size arithmetic of kernels/flash_tile.h
# (kern<T>::layout, panel_elems, scratch_new) and of the group and thread choice of _flash_cpu.pyx.
# fastattn.memory_savings builds its estimate from these; tests/test_memory.py checks the total
# against the peak resident memory measured around real calls.

#: bytes of one SIMD vector on each CPU path (FA_VBYTES in kernels/flash_cpu.cpp)
VECTOR_BYTES = {"avx512": 64, "avx2": 32, "generic": 16}


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


def num_tiles(seq: int, block: int) -> int:
    """Tiles of ``block`` rows covering ``seq`` rows (fa_num_q_tiles)."""
    return _ceil_div(seq, block)


def panel_group(n_heads: int, n_q_tiles: int, threads: int) -> int:
    """Heads whose packed K/V panels the driver keeps at once: enough for ~4 work items per
    thread, raised (up to 4x, where the heads allow) until the group's items are a multiple of
    the thread count, so no thread waits alone at the group's barrier."""
    group = min(n_heads, max(1, _ceil_div(4 * threads, n_q_tiles)))
    for size in range(group, min(n_heads, 4 * group) + 1):
        if (size * n_q_tiles) % threads == 0:
            return size
    return group


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """How the driver runs one call: tiles, threads, heads packed at once."""

    block_q: int
    block_kv: int
    n_q_tiles: int
    threads: int
    group: int


def plan_call(*, n_heads: int, seq_q: int, seq_kv: int, head_dim: int, compute_itemsize: int, flops: int,
              threads: int, block_q: int | None = None, block_kv: int | None = None, group: int = 1) -> CallPlan:
    """The one plan of a call (used by the backend and by ``fastattn.memory_savings``).

    ``n_heads`` counts the packed K/V panels (batch entries x k/v heads); each has ``seq_q · group``
    query rows (the ``group`` query heads of a k/v head are packed as rows) against ``seq_kv`` keys.
    ``flops`` is the call's work (``AttentionSpec.flops``); ``threads`` is the most the caller allows
    (see ``_threads.choose_threads``)."""
    from ._threads import cpu_limit

    # the CPUs this process may use now are part of the key: the plan itself is a pure function
    return _plan(n_heads, seq_q, seq_kv, head_dim, compute_itemsize, flops, min(threads, cpu_limit()), block_q,
                 block_kv, group)


@functools.lru_cache(maxsize=1024)
def _plan(n_heads: int, seq_q: int, seq_kv: int, head_dim: int, compute_itemsize: int, flops: int, threads: int,
          block_q: int | None, block_kv: int | None, group: int) -> CallPlan:
    from ._threads import choose_threads

    rows = seq_q * group
    block_q, block_kv = choose_tiles(head_dim, compute_itemsize, block_q, block_kv, rows, seq_kv)
    n_q = num_tiles(rows, block_q)
    if n_heads * n_q == 0:
        return CallPlan(block_q, block_kv, n_q, 1, 0)  # nothing to compute
    used = choose_threads(
        threads, flops=flops, kv_elements=2 * n_heads * seq_kv * head_dim, compute_itemsize=compute_itemsize,
        items=n_heads * n_q,
    )
    return CallPlan(block_q, block_kv, n_q, used, panel_group(n_heads, n_q, used))


def panel_bytes(seq_kv: int, head_dim: int, block_kv: int, itemsize: int, simd: str) -> int:
    """Bytes of one head's packed K/V panel, in the compute type (``itemsize``): Kᵀ tiles
    ``[n_kv_tiles][d][bkvp]``, V tiles ``[n_kv_tiles][bkvp][dp]``, one flag and one max |k| per tile, where
    ``bkvp`` and ``dp`` are ``block_kv`` and ``d`` rounded up to the vector width of ``simd``."""
    width = VECTOR_BYTES[simd] // itemsize
    n_tiles = num_tiles(seq_kv, block_kv)
    return (n_tiles * _round_up(block_kv, width) * (head_dim + _round_up(head_dim, width)) + 2 * n_tiles) * itemsize


def scratch_bytes(block_q: int, block_kv: int, head_dim: int, itemsize: int, simd: str) -> int:
    """Bytes of one thread's tile scratch: the Q tile (block_q x d), the S/P tile (block_q x bkvp),
    the O accumulator (block_q x dp), m_i and alpha (block_q each), l_i (block_q doubles) and four
    int64 per row (its visible keys' ends, its position and head), each slot rounded up to a cache
    line plus one line of slack, in one 64-byte aligned block."""
    width = VECTOR_BYTES[simd] // itemsize
    line = 64 // itemsize
    wide = block_q * (8 // itemsize)
    slots = (block_q * head_dim, block_q * _round_up(block_kv, width), block_q * _round_up(head_dim, width),
             block_q, block_q, wide, wide, wide, wide, wide)
    return _round_up(sum(_round_up(n, line) + line for n in slots) * itemsize, 64)


# ----------------------------------------------------------------------------------------------------
# The backward (kernels/flash_bwd_tile.h): one work item is (batch entry, k/v head, chunk of its query tiles).

#: panel bytes the backward keeps at once beyond one per thread (more heads per group: fewer barriers)
BACKWARD_PANELS_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """How the driver runs one backward call: tiles, threads, heads packed at once, chunks per head."""

    block_q: int
    block_kv: int
    threads: int
    group: int
    nchunk: int


def backward_panel_bytes(seq_kv: int, head_dim: int, head_dim_v: int, block_kv: int, itemsize: int, simd: str) -> int:
    """Bytes of one (batch entry, k/v head)'s backward panel: per key tile Kᵀ (d x bkvp), Vᵀ (dv x bkvp)
    and K (bkvp x dp), then a flag and the largest |k| per tile (bwd_panel_elems)."""
    width = VECTOR_BYTES[simd] // itemsize
    n_tiles = num_tiles(seq_kv, block_kv)
    bkvp = _round_up(block_kv, width)
    return (n_tiles * bkvp * (head_dim + head_dim_v + _round_up(head_dim, width)) + 2 * n_tiles) * itemsize


def plan_backward(*, n_heads: int, seq_q: int, seq_kv: int, head_dim: int, head_dim_v: int, compute_itemsize: int,
                  flops: int, threads: int, simd: str, block_q: int | None = None, block_kv: int | None = None,
                  group: int = 1) -> BackwardPlan:
    """The plan of a backward call.  Tiles: 64 query rows x 128 keys unless given (the S, dP tiles and the
    K^T, V^T, K tiles of one key tile stay in L2).  When the heads alone cannot keep the threads busy, each
    head's query tiles are cut into ``nchunk`` interleaved chunks (each with its own partial dK/dV rows,
    added in chunk order: deterministic for a given thread count)."""
    from ._threads import choose_threads

    rows = seq_q * group
    block_q = max(1, min(block_q or 64, max(rows, 1)))
    block_kv = max(1, min(block_kv or 128, max(seq_kv, 1)))
    n_q = num_tiles(rows, block_q)
    if n_heads * n_q == 0:
        return BackwardPlan(block_q, block_kv, 1, 1, 1)
    used = choose_threads(threads, flops=flops, kv_elements=n_heads * seq_kv * (2 * head_dim + head_dim_v),
                          compute_itemsize=compute_itemsize, items=n_heads * n_q)
    nchunk = 1 if n_heads >= used else min(n_q, _ceil_div(used, n_heads))
    panel = max(1, backward_panel_bytes(seq_kv, head_dim, head_dim_v, block_kv, compute_itemsize, simd))
    heads = max(used, BACKWARD_PANELS_BYTES // panel)
    if nchunk > 1:
        heads = n_heads
    heads = min(n_heads, heads)
    if heads >= used and nchunk == 1:
        heads = max(used, heads // used * used)  # whole rounds of heads: no thread waits alone at a barrier
    return BackwardPlan(block_q, block_kv, used, min(heads, n_heads), nchunk)
