"""Attention against a KV cache on the GPU: ``kvcache(call)`` for ``flash_attention_with_kvcache``.

    kvcache(call)  values checked (unless a CUDA graph is being captured), then one launch of
                   fa_decode_mma (float16 / bfloat16) or fa_decode_simt (float32 / float64) that appends
                   the new k / v into the cache in place and attends, split over the keys; the
                   splits are merged by each unit's last block (counters from _Sems) or, where that
                   does not apply, by fa_decode_combine
    Repeat.run     a torch call whose geometry passed every check before (_kvcache keys it): pointers,
                   lengths, stream, output, launch

Everything runs on the caller's current stream: torch's current stream when q is a torch tensor, CuPy's
otherwise.  The cache is read in place (contiguous with any strides, or paged through block_table on the
device); cache_seqlens and block_table are read by the kernels, on the device.

CUDA graphs.  A call is capturable (``torch.cuda.graph``, CuPy's ``Stream.begin_capture``): while the
stream is capturing nothing is copied to the host and nothing is synchronized; the outputs and the
splits' scratch are one allocation from the capturing framework's allocator (torch's graph pool for
torch tensors; for CuPy, a buffer that the returned out / lse keep alive).  The value checks
(``check_values``: negative lengths, an append past the capacity, block ids out of range) need the
values on the host, so:

- not capturing: a device cache_seqlens / block_table is read to the host (a synchronization) and checked
  before anything is launched; host ints and NumPy arrays are checked as they are and uploaded;
- capturing: cache_seqlens and block_table must be device arrays (or cache_seqlens an int) and are not
  checked; the kernels guard instead: a length is clamped to [0, capacity], the append stops at the
  capacity, a block id outside [0, num_blocks) reads as zeros and is never written, so nothing is read or
  written out of bounds, and the result for such input is unspecified.  ALiBi slopes are not checked for
  finiteness while capturing either.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import threading
from typing import Any, NamedTuple

import numpy as np

from . import _specs
from ._launch import UNBOUNDED, _mma_scales, get_kernel

_I32, _I64, _U64 = np.int32, np.int64, np.uint64


def _cupy():
    import cupy

    return cupy


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


class _Arr(NamedTuple):
    """Where a device array is: pointer, element strides, device, the array (kept alive)."""

    ptr: int
    strides: tuple[int, ...]
    device: int
    ref: Any


def _arr(x: Any) -> _Arr:
    if _is_torch(x):
        return _Arr(x.data_ptr(), x.stride(), x.get_device(), x)
    cp = _cupy()
    if not isinstance(x, cp.ndarray):
        x = cp.asarray(x)  # __cuda_array_interface__ / DLPack objects, zero-copy
    item = x.itemsize
    return _Arr(int(x.data.ptr), tuple(int(s) // item for s in x.strides), int(x.device.id), x)


def _bshd(strides: tuple[int, ...], layout: str) -> tuple[int, int, int, int]:
    """(batch, seq, heads, d) strides of a 4-D array in the call's layout."""
    sb, s1, s2, sd = strides
    return (sb, s1, s2, sd) if layout == "bshd" else (sb, s2, s1, sd)


_EXTERNAL: dict[tuple[int, int], Any] = {}


def _external_stream(torch_stream: Any, device: int) -> Any:
    """torch's stream as a CuPy stream (one object per stream pointer)."""
    ptr = int(torch_stream.cuda_stream)
    found = _EXTERNAL.get((ptr, device))
    if found is None:
        cp = _cupy()
        if ptr == 0:
            found = cp.cuda.Stream.null
        elif hasattr(cp.cuda.Stream, "from_external") and hasattr(torch_stream, "__cuda_stream__"):
            found = cp.cuda.Stream.from_external(torch_stream)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                found = cp.cuda.ExternalStream(ptr, device)
        _EXTERNAL[(ptr, device)] = found
    return found


def _stream(call: Any, device: int) -> tuple[Any, bool]:
    """The caller's current stream as a CuPy stream, and whether it is capturing a graph."""
    if _is_torch(call.q):
        import torch

        ts = torch.cuda.current_stream(device)
        return _external_stream(ts, device), bool(torch.cuda.is_current_stream_capturing())
    cp = _cupy()
    stream = cp.cuda.get_current_stream()
    return stream, _capturing(stream)


def _capturing(stream: Any) -> bool:
    cp = _cupy()
    try:
        return bool(stream.is_capturing())
    except AttributeError:  # an older CuPy: ask the runtime
        return bool(cp.cuda.runtime.streamIsCapturing(stream.ptr))
    except Exception:  # noqa: BLE001 - the legacy null stream cannot capture
        return False


@functools.cache
def _device_facts(device: int) -> tuple[int, int]:
    """(multiprocessors, shared memory per multiprocessor) of a device."""
    props = _cupy().cuda.runtime.getDeviceProperties(device)
    return int(props["multiProcessorCount"]), int(props.get("sharedMemPerMultiprocessor", 228 * 1024))


def _to_host_ints(x: Any, stream: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.int64)
    if _is_torch(x):
        return x.cpu().numpy().astype(np.int64)  # ordered after the caller's work on torch's stream
    cp = _cupy()
    return cp.asnumpy(cp.asarray(x), stream=stream).astype(np.int64)


_INT_KIND = {"int32": 4, "int64": 8}


def _device_ints(x: Any, q: Any, name: str, capturing: bool) -> tuple[Any, int]:
    """An integer array as a device array the kernels read (int32 / int64 zero-copy) and its kind."""
    if isinstance(x, np.ndarray):
        if capturing:
            raise ValueError(f"{name} must be a device array (or, for cache_seqlens, an int) while a CUDA graph "
                             "is being captured: a host array cannot be part of the graph")
        x = np.ascontiguousarray(x, dtype=np.int32 if x.dtype.itemsize <= 4 else np.int64)
        if _is_torch(q):
            import torch

            return torch.from_numpy(x).to(q.device), _INT_KIND[x.dtype.name]
        return _cupy().asarray(x), _INT_KIND[x.dtype.name]
    name_ = str(x.dtype).removeprefix("torch.")
    if name_ not in _INT_KIND:
        if _is_torch(x):
            import torch

            return x.to(torch.int64).contiguous(), 8
        return _cupy().ascontiguousarray(x.astype(np.int64)), 8
    if x.ndim == 1 and x.shape[0] > 1 and _arr(x).strides[0] != 1:  # the kernels read lens[b] at unit stride
        x = x.contiguous() if _is_torch(x) else _cupy().ascontiguousarray(x)
    return x, _INT_KIND[name_]


def _slot(x: Any) -> int:
    """A kernel argument (a NumPy scalar) as the 8-byte slot that holds it: its bytes, little-endian, low first."""
    raw = np.asarray(x).tobytes()
    return int.from_bytes(raw + bytes(8 - len(raw)), "little")


def _func_ptr(kernel: Any) -> int:
    """The CUfunction of a compiled kernel (a ``cupy.RawKernel`` or a ``cupy.cuda.function.Function``)."""
    fn = getattr(kernel, "kernel", kernel)
    return int(fn.ptr)


class _Launch:
    """One kernel's launches through ``cuLaunchKernel`` with a parameter buffer built once per call geometry.

    CuPy's ``RawKernel.__call__`` converts and packs every argument on every call (tens of microseconds for
    the ~65 arguments of the decode kernels).  Here every argument lives in an 8-byte slot of one ctypes
    array (a 4-byte argument in the slot's low bytes: the driver reads ``sizeof`` of each parameter from
    its pointer), with the array of the slots' addresses beside it, both built once; a call writes the few
    slots that change (pointers, lengths, the split count: non-negative ints) and launches, under a lock
    (two threads must not interleave their writes; the driver copies the parameters at the launch)."""

    __slots__ = ("func", "params", "_addrs", "addrs", "lock")

    def __init__(self, kernel: Any, args: tuple) -> None:
        self.func = _func_ptr(kernel)
        self.params = (ctypes.c_uint64 * len(args))(*(_slot(a) for a in args))
        base = ctypes.addressof(self.params)
        self._addrs = (ctypes.c_void_p * len(args))(*(base + 8 * i for i in range(len(args))))
        self.addrs = ctypes.addressof(self._addrs)
        self.lock = threading.Lock()

    def launch(self, front: tuple, at: int, more: tuple, grid: tuple[int, int], threads: int, smem: int,
               stream_ptr: int) -> None:
        """Slots [0, len(front)) and [at, at + len(more)) take these values, then the launch."""
        with self.lock:
            p = self.params
            p[:len(front)] = front
            if more:
                p[at:at + len(more)] = more
            _launch_kernel()(self.func, grid[0], grid[1], 1, threads, 1, 1, smem, stream_ptr, self.addrs, 0)


@functools.cache
def _launch_kernel() -> Any:
    """CuPy's binding of cuLaunchKernel."""
    return _cupy().cuda.driver.launchKernel


#: per-call slots of the attention kernel before static_mid (pointers, lengths, table, slopes)
_FRONT = 18
#: splits a unit's last block merges itself (dec_merge_unit: four splits a lane) and counters per slice
_FUSED_MAX_SPLITS = 128
#: ... and only for units of this few rows: the merging block reads every split's rows after its own tiles
#: (a unit of 64 rows with 32 splits reads 1 MB alone), where the combine launch spreads the merge over many
#: blocks.  H100, fp16, D 128, 4k / 16k keys: units of 1-4 rows merged in place 0-4% faster, of 16-64 rows
#: 2-32% slower (tools/gpu_decode_fuse_probe.py)
_FUSED_MAX_ROWS = 8
_SEM_SLICE = 2048
_SEM_POOL = 1 << 20


class _Plan:
    """Everything a call's geometry (shapes, strides, dtypes, options, device, alignment) decides."""

    __slots__ = ("kernel", "threads", "smem", "block_rows", "block_kv", "per_sm", "combine", "mid_len", "acc",
                 "attend", "merge", "q_tiles", "units", "n_rows", "out_shape", "lse_shape", "dv", "fusable",
                 "sms", "splits_by_tiles", "at_splits", "long", "unit_rows")

    def splits(self, max_len: int, requested: int | None) -> int:
        key_tiles = -(-max_len // self.block_kv)
        if requested is not None:
            return max(1, min(requested, max(key_tiles, 1), 65535))
        found = self.splits_by_tiles.get(key_tiles)
        if found is None:
            found = choose_splits(self.units, key_tiles, self.sms, self.per_sm)
            if len(self.splits_by_tiles) > 4096:
                self.splits_by_tiles.clear()
            self.splits_by_tiles[key_tiles] = found
        return found


_PLANS: dict[tuple, _Plan] = {}


def _vec_ok(arrs: list[tuple[_Arr, int, tuple[int, ...]]], itemsize: int) -> bool:
    """16-byte cp.async rows: unit stride along d, d % 8 == 0, every row start 16-byte aligned."""
    for a, d, shape in arrs:
        if d % 8 or a.ptr % 16:
            return False
        if a.strides[-1] != 1 and shape[-1] > 1:
            return False
        if any((s * itemsize) % 16 for s, n in zip(a.strides[:-1], shape[:-1], strict=True) if n > 1):
            return False
    return True


def _plan(call: Any, facts: dict) -> _Plan:
    dtype = call.dtype
    d, dv = call.head_dim, call.head_dim_v
    interval = call.causal or call.window[0] >= 0 or call.window[1] >= 0
    mods = call.softcap > 0.0 or call.alibi_slopes is not None
    rows = call.group * call.seq_q
    sms, smem_sm = _device_facts(facts["device"])
    if _specs.is_mma_dtype(dtype):
        from . import _check_device

        _check_device(dtype)
        dp, dvp = _specs.padded_dims(d, dv, dtype)
        cfg = _specs.decode_config(rows, dp, dvp, call.paged)
        name = _specs.decode_mma_name(dtype, dp, dvp, cfg, interval, mods)
        smem = _specs.decode_mma_smem_bytes(dp, dvp, cfg)
        threads, block_rows, block_kv, acc = cfg.threads, cfg.block_rows, cfg.block_kv, "float32"
        tail = (np.float32(call.softcap), *_mma_scales(call.scale))
    else:
        dp, _ = _specs.padded_dims(d, dv, dtype)
        name = _specs.decode_simt_name(dtype, dp, interval, mods)
        smem = _specs.decode_simt_smem_bytes(dp, 8 if dtype == "float64" else 4)
        threads, block_rows, block_kv = 128, _specs.DECODE_SIMT_ROWS, _specs.DECODE_SIMT_BLOCK_KV
        acc = "float64" if dtype == "float64" else "float32"
        tail = (np.float64(call.softcap), np.float64(call.scale))
    kernel = get_kernel(name, smem)
    combine = get_kernel(_specs.decode_combine_name(dtype), 0)
    regs = max(1, int(getattr(kernel, "num_regs", 0)) or 128)
    per_sm = max(1, min(smem_sm // (smem + 1024), 65536 // (regs * threads), 2048 // threads))
    left = call.window[0] if call.window[0] >= 0 else UNBOUNDED
    right = call.window[1] if call.window[1] >= 0 else UNBOUNDED
    if call.causal:
        right = min(right, 0)
    q_s, k_s, v_s, kn_s, vn_s = (facts[n] for n in ("q", "kc", "vc", "kn", "vn"))
    mid = (
        _I32(call.batch), _I32(call.heads_kv), _I32(call.group), _I32(call.seq_q), _I32(call.seq_new),
        _I32(call.capacity), _I32(call.block_size), _I32(call.num_blocks), _I32(d), _I32(dv),
        *(_I64(x) for x in (q_s[0], q_s[1], q_s[2], q_s[3])),
        *(_I64(x) for x in k_s), *(_I64(x) for x in v_s), *(_I64(x) for x in kn_s), *(_I64(x) for x in vn_s),
        *(_I64(x) for x in facts["out"]), _I64(call.heads_q * call.seq_q), _I64(call.seq_q),
    )
    static_tail = (_I32(left), _I32(right), _I32(1 if facts["vec"] else 0), *tail)
    front = (*(_U64(0),) * 11, _I32(0), _I32(0), _U64(0), _I32(0), _I64(0), _U64(0), _I32(0))
    assert len(front) == _FRONT
    hq, sq = call.heads_q, call.seq_q
    n_rows = call.batch * hq * sq
    p = _Plan()
    p.kernel, p.threads, p.smem, p.block_rows, p.block_kv, p.per_sm, p.combine = (
        kernel, threads, smem, block_rows, block_kv, per_sm, combine)
    p.mid_len, p.acc, p.dv, p.sms, p.n_rows = len(mid), acc, dv, sms, n_rows
    q_tiles = max(1, -(-rows // block_rows))
    p.attend = _Launch(kernel, (*front, *mid, _I32(1), _I32(q_tiles), *static_tail))
    p.merge = _Launch(combine, (*(_U64(0),) * 4, _I32(1), _I32(hq), _I32(sq), _I32(dv), _I64(n_rows),
                                *(_I64(x) for x in facts["out"]), _I64(hq * sq), _I64(sq)))
    p.q_tiles = q_tiles
    p.unit_rows = min(rows, block_rows)
    p.at_splits = _FRONT + len(mid)
    p.units = call.batch * call.heads_kv * p.q_tiles
    b = call.batch
    p.out_shape = (b, sq, hq, dv) if call.layout == "bshd" else (b, hq, sq, dv)
    p.lse_shape = (b, hq, sq)
    # the unit's last block merges its splits: the tensor-core kernel, rows x splits weights in its shared
    # memory, 16-byte partial rows, a counter slice wide enough
    p.fusable = (acc == "float32" and _specs.is_mma_dtype(dtype) and dv % 4 == 0 and p.units <= _SEM_SLICE
                 and (block_rows * _FUSED_MAX_SPLITS + 2 * block_rows) * 4 <= smem and _FUSE)
    p.splits_by_tiles = {}
    p.long = _long_plan(call, facts, (*front, *mid, _I32(1), _I32(q_tiles), *static_tail[:3])) \
        if facts["long"] else None
    return p


#: the fused merge (a unit's last block merges its splits); False: always the combine launch (experiments)
_FUSE = True


def _fused(plan: _Plan, splits: int) -> bool:
    """Does a unit's last block merge the splits (else the combine launch does)?"""
    return plan.fusable and splits <= _FUSED_MAX_SPLITS and plan.unit_rows <= _FUSED_MAX_ROWS

#: the cost model's fixed terms, in key tiles of one block: a block's start and end (its first tiles'
#: latency, the epilogue), and the combine kernel of a split launch
_BLOCK_COST_TILES = 1
_COMBINE_COST_TILES = 2


def choose_splits(units: int, key_tiles: int, multiprocessors: int, per_sm: int) -> int:
    """Splits of the key range (flash-decoding).  The blocks run in waves of ``multiprocessors x per_sm``
    resident blocks, so a launch takes about waves x (key tiles per split + a block's fixed cost), plus
    the combine when split: the smallest such time wins (fewer splits unless more win by 3%), each split keeping two
    key tiles at least.  This fills the machine at batch 1 and avoids a last wave of a few blocks (one
    wave and a third takes as long as two)."""
    if key_tiles < 4:
        return 1
    wave = max(1, multiprocessors * per_sm)
    best, best_cost = 1, -(-units // wave) * (key_tiles + _BLOCK_COST_TILES)
    if units >= 8 * wave:  # many waves: the last one's share is small
        return 1
    for splits in range(2, min(key_tiles // 2, 128) + 1):
        cost = (-(-units * splits // wave) * (-(-key_tiles // splits) + _BLOCK_COST_TILES)
                + _COMBINE_COST_TILES)
        if cost * 1.03 < best_cost:  # a split must win by more than the model's noise
            best, best_cost = splits, cost
    return best


class _Sems:
    """Zeroed counters for the fused merge, one slice of ``_SEM_SLICE`` per user: each (device, stream) of
    calls outside graph capture (a stream runs its launches one after another, and every launch leaves its
    counters at zero), and each call captured into a graph (its own slice for good: a graph may be
    replayed on any stream, beside anything).  The pool is allocated and zeroed outside capture; while
    capturing with no pool, or with the pool used up, the splits go through the combine launch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pools: dict[int, list] = {}  # device -> [array, base pointer, next free slice]
        self.by_stream: dict[tuple[int, int], int] = {}

    def get(self, device: int, stream_ptr: int, capturing: bool) -> int:
        if not capturing:
            found = self.by_stream.get((device, stream_ptr))
            if found is not None:
                return found
        with self.lock:
            if not capturing and (device, stream_ptr) in self.by_stream:
                return self.by_stream[(device, stream_ptr)]
            pool = self.pools.get(device)
            if pool is None or pool[2] >= _SEM_POOL // _SEM_SLICE:
                if capturing:
                    return 0
                cp = _cupy()
                with cp.cuda.Device(device):
                    arr = cp.zeros(_SEM_POOL, dtype=cp.uint32)
                    cp.cuda.get_current_stream().synchronize()  # zero before any stream reads it
                pool = self.pools[device] = [arr, int(arr.data.ptr), 0]
                if len(self.by_stream) > 4096:  # streams come and go: old slices are left with their pool
                    self.by_stream.clear()
            ptr = pool[1] + 4 * _SEM_SLICE * pool[2]
            pool[2] += 1
            if not capturing:
                self.by_stream[(device, stream_ptr)] = ptr
            return ptr


_SEMS = _Sems()


def _alloc(call: Any, device: int, shapes: list[tuple[tuple[int, ...], str]]) -> list[tuple[Any, int]]:
    """Arrays of these (shape, dtype): [(array, pointer)].  torch callers: from torch's allocator (its graph
    pool while capturing: the splits' scratch is freed into that pool, which the graph owns).  CuPy: one
    buffer cut into the arrays, so that out / lse keep the scratch alive (a captured graph writes it on
    every replay; freed into CuPy's pool it could be handed to another array)."""
    sizes, offsets, total = [], [], 0
    for shape, dt in shapes:
        n = math.prod(shape) * np.dtype(dt if dt != "bfloat16" else "uint16").itemsize
        offsets.append(total)
        sizes.append(n)
        total += -(-max(n, 1) // 256) * 256
    out = []
    if _is_torch(call.q):  # torch's stream-ordered allocator (its graph pool while capturing)
        import torch

        for shape, dt in shapes:
            t = torch.empty(shape, dtype=call.q.dtype if dt == call.dtype else getattr(torch, dt),
                            device=call.q.device)
            out.append((t, t.data_ptr()))
        return out
    cp = _cupy()
    with cp.cuda.Device(device):
        buf = cp.empty(total, dtype=cp.uint8)
    base = int(buf.data.ptr)
    q_dtype = _arr(call.q).ref.dtype
    for (shape, dt), off, n in zip(shapes, offsets, sizes, strict=True):
        cdt = q_dtype if dt == call.dtype else np.dtype(dt)
        out.append((buf[off:off + n].view(cdt).reshape(shape), base + off))
    return out


def kvcache(call: Any) -> tuple[Any, Any]:
    """Appends call.k / call.v into the cache in place and attends (see the module docstring)."""
    if not call.on_gpu:  # host arrays with backend="cuda": the generic path
        from ..._kvcache import _gathered

        return _gathered(call, "cuda")
    from ..._kvcache import check_values

    q = _arr(call.q)
    kc, vc = _arr(call.k_cache), _arr(call.v_cache)
    device = q.device
    if kc.device != device or vc.device != device:
        raise ValueError(f"q and the caches must live on one GPU; got devices {device}, {kc.device}, {vc.device}")
    if call.capacity >= UNBOUNDED or call.seq_q >= UNBOUNDED:
        raise ValueError(f"caches of {UNBOUNDED} or more tokens are beyond the cuda backend; got {call.capacity}")
    if max(call.head_dim, call.head_dim_v) > _specs.MAX_HEAD_DIM:
        raise ValueError(_specs.MAX_HEAD_DIM_ERROR.format(d=max(call.head_dim, call.head_dim_v),
                                                          max=_specs.MAX_HEAD_DIM))
    cp = _cupy()
    prev_device = cp.cuda.runtime.getDevice()
    if prev_device != device:
        cp.cuda.runtime.setDevice(device)
    try:
        stream, capturing = _stream(call, device)
        with stream:
            return _run(call, q, kc, vc, device, stream, capturing, check_values)
    finally:
        if prev_device != device:
            cp.cuda.runtime.setDevice(prev_device)


def _plan_of(call: Any, q: _Arr, kc: _Arr, vc: _Arr, kn: _Arr | None, vn: _Arr | None, device: int,
             max_len: int) -> _Plan:
    """The plan of a call's geometry (built once per geometry and route; ``aligned``: every base pointer
    16-byte aligned, which the 16-byte loads need; ``max_len``: the longest sequence, for long_route)."""
    route = long_route(call, max_len, _device_facts(device)[0])
    layout, new = call.layout, kn is not None
    q_s = _bshd(q.strides, layout)
    if call.paged:
        k_s, v_s = kc.strides, vc.strides
    else:
        k_s, v_s = _bshd(kc.strides, layout), _bshd(vc.strides, layout)
    kn_s = _bshd(kn.strides, layout) if new else (0, 0, 0, 0)
    vn_s = _bshd(vn.strides, layout) if new else (0, 0, 0, 0)
    sq, hq, dv = call.seq_q, call.heads_q, call.head_dim_v
    out_s = (sq * hq * dv, hq * dv, dv) if layout == "bshd" else (hq * sq * dv, dv, sq * dv)
    aligned = ((q.ptr | kc.ptr | vc.ptr | (kn.ptr | vn.ptr if new else 0)) % 16) == 0
    key = (device, call.dtype, layout, call.paged, call.batch, sq, hq, call.heads_kv, call.head_dim, dv,
           call.seq_new, call.capacity, call.block_size, call.num_blocks, q_s, k_s, v_s, kn_s, vn_s, aligned,
           call.causal, call.window, call.softcap, call.alibi_slopes is not None, call.scale, route,
           int(call.alibi_slopes.shape[0]) if call.alibi_slopes is not None else 0)
    plan = _PLANS.get(key)
    if plan is None:
        vec = False
        if _specs.is_mma_dtype(call.dtype) and aligned:
            shapes = [(q, call.head_dim, tuple(call.q.shape)), (kc, call.head_dim, tuple(call.k_cache.shape)),
                      (vc, dv, tuple(call.v_cache.shape))]
            if new:
                shapes += [(kn, call.head_dim, tuple(call.k.shape)), (vn, dv, tuple(call.v.shape))]
            vec = _vec_ok(shapes, 2) and dv % 8 == 0
        facts = dict(device=device, q=q_s, kc=k_s, vc=v_s, kn=kn_s, vn=vn_s, out=out_s, vec=vec, aligned=aligned,
                     long=route)
        plan = _plan(call, facts)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _run(call: Any, q: _Arr, kc: _Arr, vc: _Arr, device: int, stream: Any, capturing: bool,
         check_values: Any) -> tuple[Any, Any]:
    lens_in, table_in = call.cache_seqlens, call.block_table
    stream_ptr = int(stream.ptr)
    max_len = call.capacity
    if isinstance(lens_in, int) and not call.paged:  # one length (check_call saw it is >= 0)
        if lens_in + call.seq_new > min(call.capacity, 2**31 - 1):
            check_values(call, np.full(call.batch, lens_in, np.int64), None)  # raises, naming the sequence
        max_len = lens_in + call.seq_new
    elif not capturing:  # the values on the host, checked before anything is launched
        lens_h = (np.full(call.batch, lens_in, np.int64) if isinstance(lens_in, int)
                  else _to_host_ints(lens_in, stream))
        table_h = _to_host_ints(table_in, stream) if call.paged else None
        check_values(call, lens_h, table_h)
        max_len = int((lens_h + call.seq_new).max(initial=0))
    lens_const, lens_kind, lens_dev = 0, 0, None
    if isinstance(lens_in, int):
        lens_const = lens_in
    elif isinstance(lens_in, np.ndarray) and not capturing and lens_in.size and (lens_in == lens_in.flat[0]).all():
        lens_const = int(lens_in.flat[0])  # one length for every sequence: no upload
    else:
        lens_dev, lens_kind = _device_ints(lens_in, call.q, "cache_seqlens", capturing)
    if lens_const >= UNBOUNDED:
        raise ValueError(f"cache_seqlens {lens_const} is beyond the cuda backend")
    table_ptr, table_kind, table_sb, table_dev = 0, 0, 0, None
    if call.paged:
        table_dev, table_kind = _device_ints(table_in, call.q, "block_table", capturing)
        ta = _arr(table_dev)
        if ta.strides[1] != 1 and int(table_dev.shape[1]) > 1:
            table_dev = table_dev.contiguous() if _is_torch(table_dev) else _cupy().ascontiguousarray(table_dev)
            ta = _arr(table_dev)
        table_ptr, table_sb = ta.ptr, ta.strides[0]
    lens_ptr = _arr(lens_dev).ptr if lens_dev is not None else 0

    slopes_ptr, slopes_sb = 0, 0
    slopes = call.alibi_slopes
    if slopes is not None:
        sa = _arr(slopes)
        rows, heads = int(slopes.shape[0]), int(slopes.shape[-1])
        if (heads > 1 and sa.strides[-1] != 1) or (rows > 1 and sa.strides[0] != heads):  # (rows, heads) rows
            slopes = slopes.contiguous() if _is_torch(slopes) else _cupy().ascontiguousarray(slopes)
            sa = _arr(slopes)
        slopes_ptr = sa.ptr
        slopes_sb = sa.strides[0] if int(slopes.shape[0]) > 1 else 0

    new = call.k is not None
    kn = _arr(call.k) if new else None
    vn = _arr(call.v) if new else None
    plan = _plan_of(call, q, kc, vc, kn, vn, device, max_len)
    if plan.long is not None:  # a long chunk: the append alone, then the forward kernel
        values = (lens_ptr, lens_kind, lens_const, table_ptr, table_kind, table_sb, slopes_ptr)
        out, lse = _run_long(call, plan.long, q, kc, vc, kn, vn, device, values, stream_ptr)
        del lens_dev, table_dev, slopes
        return out, lse
    splits = plan.splits(max_len, call.num_splits)
    sem = _SEMS.get(device, stream_ptr, capturing) if splits > 1 and _fused(plan, splits) else 0
    lse_dt = "float64" if call.dtype == "float64" else "float32"
    want = [(plan.out_shape, call.dtype), (plan.lse_shape, lse_dt)]
    if splits > 1:  # the splits' partial outputs, then their lse, in one allocation
        want.append(((splits * plan.n_rows * (plan.dv + 1),), plan.acc))
    arrays = _alloc(call, device, want)
    (out, out_ptr), (lse, lse_ptr) = arrays[0], arrays[1]
    scratch = arrays[2][1] if splits > 1 else 0
    _launch_call(plan, (q.ptr, kc.ptr, vc.ptr, kn.ptr if new else 0, vn.ptr if new else 0), out_ptr, lse_ptr,
                 scratch, sem, splits, (lens_ptr, lens_kind, lens_const, table_ptr, table_kind, table_sb,
                                        slopes_ptr, slopes_sb), stream_ptr)
    # keep what the launches read alive until they are enqueued (stream-ordered allocators do the rest)
    del lens_dev, table_dev, slopes
    return out, lse


def _launch_call(plan: _Plan, ptrs: tuple, out_ptr: int, lse_ptr: int, scratch: int, sem: int, splits: int,
                 values: tuple, stream_ptr: int) -> None:
    """The attention launch (and the combine launch when split without the fused merge).  ``scratch``: the
    splits' partial outputs (splits x rows x dv) then their lse (splits x rows), 8-byte aligned."""
    if plan.units == 0:
        return
    if plan.units >= 2**31:
        raise ValueError(f"too many blocks for one launch ({plan.units}); split the batch")
    item = 8 if plan.acc == "float64" else 4
    po_ptr = scratch
    pl_ptr = scratch + splits * plan.n_rows * plan.dv * item if splits > 1 else 0
    plan.attend.launch((*ptrs, out_ptr, lse_ptr, po_ptr, pl_ptr, sem, *values), plan.at_splits, (splits,),
                       (plan.units, splits), plan.threads, plan.smem, stream_ptr)
    if splits > 1 and not sem:
        plan.merge.launch((po_ptr, pl_ptr, out_ptr, lse_ptr, splits), 0, (), (plan.n_rows, 1), 128, 0,
                          stream_ptr)  # one block a row


# --- long chunks: the append alone, then the forward kernel on the cache in place -----------------------

# Which kernel serves a float16 / bfloat16 chunk (long_route).  The forward kernel runs one block per
# (128-row query tile, batch entry, query head) over all of the tile's keys; the decode kernel splits the keys
# (so a few rows still fill the machine) but computes 64-row tiles at about half the forward's rate.  So the
# forward wins once its tiles keep enough of the machine busy: fill = useful query rows / (SMs x 128), the
# rows of partial tiles counted by their share of a tile (a 64-row chunk fills half of each tile it takes),
# and wastes no more than half of each tile.  Measured on the H100 with each kernel forced (fp16, head_dim
# 128, heads 32/8 and 32/32, batch 1 and 4, caches 4k / 8k / 16k, seq_q 16-512; docs/cuda.md, "Long
# chunks"): the forward ahead from fill 0.4 at every cache length, from fill 0.2 on caches up to 4k keys (at
# fill 0.24: 84 vs 70 TFLOP/s at 4k, 92 vs 107 at 8k, 97 vs 148 at 16k); this rule picks the faster kernel
# in every measured row.

#: rows per k/v head (seq_q x heads_q / heads_kv) below which the decode kernel always serves
LONG_MIN_ROWS = 128
#: the least share of its 128-row tiles a chunk must fill (seq_q 64 fills half of one)
LONG_MIN_SHARE = 0.5
#: fill from which the forward kernel serves at any cache length
LONG_FILL = 0.4
#: fill from which it serves calls whose longest sequence holds at most LONG_SHORT_KEYS keys
LONG_FILL_SHORT = 0.2
LONG_SHORT_KEYS = 6144
#: "auto" (the rule above), or "decode" / "forward" for every eligible call (benchmarks and tests)
LONG_ROUTE = "auto"
#: query rows of a forward block (fa_fwd_sm90's two warpgroups; fa_fwd_mma's four warps of 32 rows)
_FWD_ROWS = 128


def long_share(call: Any) -> float:
    """The share of its 128-row query tiles a chunk's rows fill."""
    return call.seq_q / (-(-call.seq_q // _FWD_ROWS) * _FWD_ROWS)


def long_fill(call: Any, multiprocessors: int) -> float:
    """The share of the machine the forward kernel's query tiles keep busy (see above)."""
    return call.batch * call.heads_q * call.seq_q * long_share(call) / (multiprocessors * _FWD_ROWS)


def long_route(call: Any, max_len: int, multiprocessors: int) -> bool:
    """Does a call go the long-chunk way (append, then the forward kernel)?  float16 / bfloat16, no
    explicit num_splits (a split of the keys is the decode kernel's: num_splits keeps a call there), a
    nonempty batch, cache and chunk, then the rule above (``max_len``: the longest sequence after the append, the
    capacity where unknown).  A paged cache also needs the Hopper kernel: ``_long_plan`` says None where it
    cannot serve."""
    if not (_specs.is_mma_dtype(call.dtype) and call.num_splits is None and call.batch > 0 and call.capacity > 0
            and call.seq_q > 0):
        return False
    if LONG_ROUTE != "auto":
        return LONG_ROUTE == "forward"
    if call.seq_q * call.group < LONG_MIN_ROWS or long_share(call) < LONG_MIN_SHARE:
        return False
    fill = long_fill(call, multiprocessors)
    return fill >= LONG_FILL or (fill >= LONG_FILL_SHORT and max_len <= LONG_SHORT_KEYS)


class _LongPlan(NamedTuple):
    """The two launches of a long chunk: fa_kv_append (the decode kernels' parameter buffer plus rag) and
    the forward kernel (its parameter buffer: pointers first, the block table last when paged)."""

    append: _Launch
    append_grid: tuple[int, int]
    forward: _Launch
    forward_grid: tuple[int, int]
    threads: int
    smem: int
    paged_at: int  # the block table's slot (paged), else 0
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    kernel: str


def _view(ptr: int, device: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> Any:
    """A CuPy array over device memory it does not own (the forward launcher's plan reads its shape,
    strides and alignment; launches take the pointers of each call)."""
    cp = _cupy()
    dt = np.uint16 if itemsize == 2 else np.float32
    mem = cp.cuda.UnownedMemory(ptr, 1, None, device)
    return cp.ndarray(shape, dtype=dt, memptr=cp.cuda.MemoryPointer(mem, 0),
                      strides=tuple(int(s) * itemsize for s in strides))


def _long_plan(call: Any, facts: dict, append_args: tuple) -> _LongPlan | None:
    """The long-chunk launches of a call's geometry, or None where the decode kernel must serve it (a paged
    cache without the Hopper kernel: only fa_fwd_sm90 has the block-table loads)."""
    from ..._masks import MaskRule
    from ..._validate import AttentionSpec, MaskArrays, numpy_dtype
    from . import _launch as fwd

    device, dtype = facts["device"], call.dtype
    b, hq, hkv, sq, d, dv = call.batch, call.heads_q, call.heads_kv, call.seq_q, call.head_dim, call.head_dim_v
    cap = call.capacity
    base = 1 << 20  # a 16-byte aligned stand-in pointer: alignment is part of the plan's key
    if not facts["aligned"]:
        base += 2
    qs, os_ = facts["q"], facts["out"]  # (b, s, h, d); out (b, s, h) element strides
    q_v = _view(base, device, (b, hq, sq, d), (qs[0], qs[2], qs[1], qs[3]), 2)
    out_v = _view(1 << 20, device, (b, hq, sq, dv), (os_[0], os_[2], os_[1], 1), 2)
    lse_v = _view(1 << 20, device, (b, hq, sq), (hq * sq, sq, 1), 4)
    ks, vs = facts["kc"], facts["vc"]  # contiguous: (b, s, h, d); paged: (block, row, h, d)
    if call.paged:
        k_v = _view(base, device, (b, hkv, cap, d), (0, ks[2], ks[1], ks[3]), 2)
        v_v = _view(base, device, (b, hkv, cap, dv), (0, vs[2], vs[1], vs[3]), 2)
    else:
        k_v = _view(base, device, (b, hkv, cap, d), (ks[0], ks[2], ks[1], ks[3]), 2)
        v_v = _view(base, device, (b, hkv, cap, dv), (vs[0], vs[2], vs[1], vs[3]), 2)
    slopes = call.alibi_slopes
    rule = MaskRule(causal=call.causal, bottom_right=True, window_left=call.window[0],
                    window_right=call.window[1], softcap=call.softcap, alibi=slopes is not None)
    spec = AttentionSpec(batch=b, heads=hq, seq_q=sq, seq_kv=cap, head_dim=d, dtype=numpy_dtype(dtype),
                         causal=call.causal, scale=call.scale, dropout_p=0.0, seed=None, block_q=None, block_kv=None,
                         num_threads=None, q_shape=(b, hq, sq, d), heads_kv=hkv, head_dim_v=dv, layout="bhsd",
                         rule=rule, ragged="padded",
                         arrays=MaskArrays(alibi_slopes=_SlopesShape(int(slopes.shape[0])) if slopes is not None
                                           else None))
    family, extra, config = fwd.kernel_family(), (), None
    if call.paged:
        vec = facts["vec"]
        if not (vec and family == "auto" and fwd.device_capability() == (9, 0) and device not in fwd._SM90_FAILED):
            return None
        d_pad, _ = fwd.dims(spec, dtype, True)
        config, extra = fwd.tile_config(spec, dtype, d_pad, True), _specs.SM90_PAGED_OPTIONS
    try:
        kernel, grid, threads, smem, static_args, used, _ = fwd._make_plan(
            q_v, k_v, v_v, out_v, lse_v, spec, dtype, config, extra, family)
    except Exception:  # noqa: BLE001 - the paged Hopper kernel did not build here: the decode kernel serves
        if not call.paged:
            raise
        return None
    ptrs = (_U64(0),) * 10  # q, k, v, out, lse, attn_mask, slopes, rag_q, rag_kv, v_flag
    paged = ()
    if call.paged:
        paged = (_U64(0), _I32(0), _I64(0), _I32(call.block_size), _I32(call.num_blocks), _I64(ks[0]),
                 _I64(vs[0]))
    args = (*ptrs, *static_args, *paged)
    append = _Launch(get_kernel(_specs.kv_append_name(dtype), 0), (*append_args, _U64(0)))
    return _LongPlan(append=append, append_grid=(b * hkv, max(1, -(-call.seq_new // _APPEND_TOKENS))),
                     forward=_Launch(kernel, args), forward_grid=(int(grid[0]), 1), threads=int(threads[0]),
                     smem=int(smem), paged_at=len(ptrs) + len(static_args) if call.paged else 0,
                     out_shape=(b, sq, hq, dv) if call.layout == "bshd" else (b, hq, sq, dv), lse_shape=(b, hq, sq),
                     kernel=used.kernel)


#: new tokens a block of fa_kv_append copies (decode.cu: DEC_APPEND_TOKENS)
_APPEND_TOKENS = 16


class _SlopesShape(NamedTuple):
    """What the forward's plan reads of alibi_slopes: its batch axis (the pointer is the call's)."""

    rows: int

    @property
    def shape(self) -> tuple[int]:
        return (self.rows,)


def _run_long(call: Any, lp: _LongPlan, q: _Arr, kc: _Arr, vc: _Arr, kn: _Arr | None, vn: _Arr | None,
              device: int, values: tuple, stream_ptr: int) -> tuple[Any, Any]:
    """fa_kv_append (the new tokens into the cache, and the forward's lengths: seq_q and cached + new per
    sequence), then the forward kernel reading the cache in place (bottom-right causal, ragged keys), on one
    stream: no copy of the cache, capturable as the decode path is."""
    lens_ptr, lens_kind, lens_const, table_ptr, table_kind, table_sb, slopes_ptr = values
    arrays = _alloc(call, device, [(lp.out_shape, call.dtype), (lp.lse_shape, "float32"),
                                   ((2 * call.batch,), "int32")])
    (out, out_ptr), (lse, lse_ptr), (_, rag_ptr) = arrays
    new_ptrs = (kn.ptr, vn.ptr) if kn is not None else (0, 0)
    front = (q.ptr, kc.ptr, vc.ptr, *new_ptrs, out_ptr, lse_ptr, 0, 0, 0, lens_ptr, lens_kind, lens_const,
             table_ptr, table_kind, table_sb, slopes_ptr, 0)
    lp.append.launch(front, len(lp.append.params) - 1, (rag_ptr,), lp.append_grid, 128, 0, stream_ptr)
    lp.forward.launch((q.ptr, kc.ptr, vc.ptr, out_ptr, lse_ptr, 0, slopes_ptr, rag_ptr, rag_ptr + 4 * call.batch, 0),
                      lp.paged_at, (table_ptr, table_kind, table_sb) if lp.paged_at else (), lp.forward_grid,
                      lp.threads, lp.smem, stream_ptr)
    del arrays
    return out, lse


# --- the repeat path: a call whose geometry was seen (torch tensors, outside graph capture) ---------------

class Repeat:
    """A checked call's geometry, for its repeats (``_kvcache`` keys it by every shape, stride, dtype,
    device and option of the call): a repeat reads the data pointers, the lengths and the stream, checks
    the values, allocates the output and launches.  ``run`` returns None where it cannot serve a call
    (another alignment, graph capture, another current device, a value to refuse): the full path takes it
    and raises where it must."""

    __slots__ = ("call", "plan", "device", "aligned", "limit", "seq_new", "new", "paged", "table_kind",
                 "table_sb", "lens_kind", "num_splits", "return_lse", "tdevice", "torch", "float32", "get_device",
                 "capturing", "raw_stream", "launch")

    def run(self, q: Any, kc: Any, vc: Any, k: Any, v: Any, lens: Any, table: Any) -> tuple[Any, Any] | None:
        dev = self.device
        if self.get_device() != dev or self.capturing():
            return None
        qp, kp, vp = q.data_ptr(), kc.data_ptr(), vc.data_ptr()
        if self.new:
            knp, vnp = k.data_ptr(), v.data_ptr()
        else:
            knp = vnp = 0
        if (((qp | kp | vp | knp | vnp) & 15) == 0) != self.aligned:
            return None
        lens_ptr = table_ptr = 0
        if type(lens) is int and not self.paged:
            if lens < 0 or lens + self.seq_new > self.limit:
                return None  # the full path names the error
            lens_const, max_len = lens, lens + self.seq_new
        else:  # the values read to the host and checked (a synchronization), as on the full path
            from ..._kvcache import check_values

            if type(lens) is int:
                if lens < 0 or lens >= UNBOUNDED:
                    return None
                lens_h, lens_const = np.full(self.call.batch, lens, np.int64), lens
            else:
                lens_h, lens_ptr, lens_const = _to_host_ints(lens, None), lens.data_ptr(), 0
            table_h = None
            if self.paged:
                table_h, table_ptr = _to_host_ints(table, None), table.data_ptr()
            check_values(self.call, lens_h, table_h)
            max_len = int((lens_h + self.seq_new).max(initial=0))
        plan = self.plan
        splits = None if self.num_splits is not None else plan.splits_by_tiles.get(-(-max_len // plan.block_kv))
        if splits is None:
            splits = plan.splits(max_len, self.num_splits)
        out = q.new_empty(plan.out_shape)
        lse = q.new_empty(plan.lse_shape, dtype=self.float32) if self.return_lse else None
        stream_ptr = self.raw_stream(dev)
        po_ptr = pl_ptr = sem = 0
        if splits > 1:
            po_ptr = _scratch(self.torch, dev, self.tdevice, stream_ptr, splits * plan.n_rows * (plan.dv + 1))
            pl_ptr = po_ptr + splits * plan.n_rows * plan.dv * 4
            if _fused(plan, splits):
                sem = _SEMS.get(dev, stream_ptr, False)
        out_ptr, lse_ptr = out.data_ptr(), lse.data_ptr() if lse is not None else 0
        attend = plan.attend
        with attend.lock:
            p = attend.params
            p[:_FRONT] = (qp, kp, vp, knp, vnp, out_ptr, lse_ptr, po_ptr, pl_ptr, sem, lens_ptr, self.lens_kind,
                          lens_const, table_ptr, self.table_kind, self.table_sb, 0, 0)
            p[plan.at_splits] = splits
            self.launch(attend.func, plan.units, splits, 1, plan.threads, 1, 1, plan.smem, stream_ptr, attend.addrs,
                        0)
        if splits > 1 and not sem:
            plan.merge.launch((po_ptr, pl_ptr, out_ptr, lse_ptr, splits), 0, (), (plan.n_rows, 1), 128, 0,
                              stream_ptr)
        return out, lse


#: the splits' scratch of repeat calls, per (device, stream): a stream runs its launches in order, so the
#: next call on it may reuse the buffer (graph capture never takes this path: captured calls own theirs)
_SCRATCH: dict[tuple[int, int], Any] = {}
_SCRATCH_MAX_FLOATS = 16 << 20  # larger scratch is allocated per call


def _scratch(torch: Any, dev: int, tdevice: Any, stream_ptr: int, floats: int) -> int:
    if floats > _SCRATCH_MAX_FLOATS:  # torch's allocator is stream-ordered: freed once enqueued is safe
        return torch.empty(floats, dtype=torch.float32, device=tdevice).data_ptr()
    buf = _SCRATCH.get((dev, stream_ptr))
    if buf is None or buf.numel() < floats:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        buf = _SCRATCH[(dev, stream_ptr)] = torch.empty(max(floats, 1 << 16), dtype=torch.float32,
                                                         device=tdevice)
    return buf.data_ptr()


def repeat_entry(call: Any) -> Repeat | None:
    """The repeat state of a call that just ran (torch CUDA tensors, float16 / bfloat16 / float32 / float64
    without ALiBi), or None."""
    import torch

    if not call.on_gpu or not _is_torch(call.q) or call.alibi_slopes is not None:
        return None
    lens, table = call.cache_seqlens, call.block_table
    lens_kind = table_kind = table_sb = 0
    if not isinstance(lens, int):
        if not _is_torch(lens) or str(lens.dtype).removeprefix("torch.") not in _INT_KIND or (
                lens.stride(0) != 1 and lens.shape[0] > 1):
            return None
        lens_kind = _INT_KIND[str(lens.dtype).removeprefix("torch.")]
    if call.paged:
        if not _is_torch(table) or str(table.dtype).removeprefix("torch.") not in _INT_KIND or (
                table.stride(1) != 1 and table.shape[1] > 1):
            return None
        table_kind, table_sb = _INT_KIND[str(table.dtype).removeprefix("torch.")], table.stride(0)
    q, kc, vc = _arr(call.q), _arr(call.k_cache), _arr(call.v_cache)
    new = call.k is not None
    kn, vn = (_arr(call.k), _arr(call.v)) if new else (None, None)
    if long_route(call, 0, _device_facts(q.device)[0]):  # chunks the forward kernel may serve: the full path
        return None  # (it routes by each call's lengths; their launches outweigh its host time)
    r = Repeat()
    r.plan = _plan_of(call, q, kc, vc, kn, vn, q.device, 0)
    r.call = dataclasses.replace(call, q=None, k_cache=None, v_cache=None, k=None, v=None, like=None,
                                 cache_seqlens=None, block_table=None)  # check_values' facts, no arrays
    r.device, r.new, r.paged, r.seq_new = q.device, new, call.paged, call.seq_new
    r.aligned = ((q.ptr | kc.ptr | vc.ptr | (kn.ptr | vn.ptr if new else 0)) % 16) == 0
    r.limit = min(call.capacity, 2**31 - 1, UNBOUNDED - 1)
    r.lens_kind, r.table_kind, r.table_sb = lens_kind, table_kind, table_sb
    r.num_splits, r.return_lse = call.num_splits, call.return_lse
    r.tdevice, r.torch, r.float32 = call.q.device, torch, torch.float32
    if call.dtype == "float64" or not all(hasattr(torch._C, n) for n in (
            "_cuda_getCurrentRawStream", "_cuda_isCurrentStreamCapturing", "_cuda_getDevice")):
        return None  # float64's lse is float64 (the repeat path allocates float32); an older torch
    r.get_device, r.capturing = torch._C._cuda_getDevice, torch._C._cuda_isCurrentStreamCapturing
    r.raw_stream, r.launch = torch._C._cuda_getCurrentRawStream, _launch_kernel()
    return r
