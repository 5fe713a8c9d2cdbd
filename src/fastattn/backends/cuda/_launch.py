"""CuPy side of the CUDA backend: RawModule compilation and caching, grid math, the launch.

Each template instance (a name expression of ``_specs``) is compiled once per device by NVRTC
through ``cupy.RawModule`` and kept in a dict; CuPy also caches the binary on disk, so a new
process pays only a module load.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from ..._dropout import dropout_threshold
from ..._validate import AttentionSpec
from . import _specs

_OPTIONS = ("-std=c++17",)
_KERNELS: dict[tuple[int, str, tuple[str, ...]], list] = {}  # key -> [kernel, smem limit set]
_LOCK = threading.Lock()
_SOURCE: str | None = None


def _cupy():
    import cupy

    return cupy


def get_kernel(name: str, smem_bytes: int, extra_options: tuple[str, ...] = ()) -> Any:
    """The compiled kernel for one name expression on the current device (compiled on first use).

    ``extra_options`` (e.g. ``("-DFA_ALWAYS_RESCALE",)``) are for experiments only.
    """
    global _SOURCE
    cp = _cupy()
    key = (cp.cuda.runtime.getDevice(), name, extra_options)
    entry = _KERNELS.get(key)
    if entry is None:
        with _LOCK:
            entry = _KERNELS.get(key)
            if entry is None:
                if _SOURCE is None:
                    _SOURCE = _specs.kernel_source()
                module = cp.RawModule(code=_SOURCE, options=_OPTIONS + extra_options, name_expressions=[name])
                entry = [module.get_function(name), 48 * 1024]
                _KERNELS[key] = entry
    if smem_bytes > entry[1]:  # raise the dynamic shared-memory limit once, not per launch
        entry[0].max_dynamic_shared_size_bytes = smem_bytes
        entry[1] = smem_bytes
    return entry[0]


def _elem_strides(x: Any) -> tuple[int, ...]:
    return tuple(int(s) // x.itemsize for s in x.strides)


def _vec_ok(x: Any, d: int) -> bool:
    """16-byte cp.async chunks are legal: unit stride along d, d % 8 == 0, every row start aligned."""
    if d % 8 != 0:
        return False
    sb, sh, ss, sd = _elem_strides(x)
    if sd != 1 and x.shape[3] > 1:
        return False
    if x.data.ptr % 16 != 0:
        return False
    return all((s * x.itemsize) % 16 == 0 for s, n in zip((sb, sh, ss), x.shape[:3], strict=True) if n > 1)


def device_capability() -> tuple[int, int]:
    """(major, minor) of the current device."""
    return _capability(_cupy().cuda.runtime.getDevice())


@functools.cache
def _capability(device_id: int) -> tuple[int, int]:
    cc = _cupy().cuda.Device(device_id).compute_capability  # e.g. "90"
    return int(cc[:-1]), int(cc[-1])


def plan(spec: AttentionSpec, dtype: str, head_dim_pad: int | None = None,
         mma_config: _specs.MmaConfig | None = None) -> tuple[int, int, int, int]:
    """(block_q, block_kv, threads, shared memory bytes) of the kernel that serves ``spec``."""
    d_pad = head_dim_pad or _specs.padded_head_dim(spec.head_dim, dtype)
    if _specs.is_mma_dtype(dtype):
        cfg = mma_config or _specs.MMA_CONFIGS[(d_pad, spec.causal)]
        return cfg.block_q, cfg.block_kv, cfg.warps * 32, _specs.mma_smem_bytes(d_pad, cfg)
    scfg = _specs.SIMT_CONFIGS[(dtype, d_pad)]
    itemsize = 8 if dtype == "float64" else 4
    return scfg.block_q, scfg.block_kv, scfg.block_q * 4, _specs.simt_smem_bytes(d_pad, scfg, itemsize)


def launch(q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, dtype: str,
           mma_config: _specs.MmaConfig | None = None,
           extra_options: tuple[str, ...] = ()) -> tuple[int, int, int, int]:
    """Runs the forward kernel on the current stream; returns plan() of what ran.

    Everything but the five array pointers is a pure function of the call's geometry, so it is
    worked out once per (device, dtype, shapes, strides, alignment, flags) and cached: a repeated
    call costs a dict lookup and the launch itself.
    """
    key = (cp_device(), dtype, q.shape, k.shape, q.strides, k.strides, v.strides, out.strides, lse.strides,
           q.data.ptr % 16 == 0, k.data.ptr % 16 == 0, v.data.ptr % 16 == 0, spec.causal, spec.scale,
           spec.dropout_p, spec.seed, mma_config, extra_options)
    entry = _PLANS.get(key)
    if entry is None:
        entry = _make_plan(q, k, v, out, lse, spec, dtype, mma_config, extra_options)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = entry
    kernel, grid, threads, smem, static_args, used = entry
    if kernel is not None:
        kernel(grid, threads, (q, k, v, out, lse, *static_args), shared_mem=smem)
    return used


_PLANS: dict[tuple, tuple] = {}


def cp_device() -> int:
    return _cupy().cuda.runtime.getDevice()


def _make_plan(q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, dtype: str,
               mma_config: _specs.MmaConfig | None, extra_options: tuple[str, ...]) -> tuple:
    batch, heads, seq_q, d = (int(s) for s in q.shape)
    seq_kv = int(k.shape[2])
    d_pad = _specs.padded_head_dim(d, dtype)
    block_q, block_kv, threads, smem = used = plan(spec, dtype, d_pad, mma_config)
    if batch * heads * seq_q == 0:
        return None, None, None, None, None, used

    dropout = spec.dropout_p > 0.0
    seed = int(spec.seed or 0)
    threshold = dropout_threshold(spec.dropout_p) if dropout else 0
    if _specs.is_mma_dtype(dtype):
        cfg = mma_config or _specs.MMA_CONFIGS[(d_pad, spec.causal)]
        vec = all(_vec_ok(x, d) for x in (q, k, v))
        name = _specs.mma_name(dtype, d_pad, cfg, spec.causal, dropout, vec)
        tail = (np.float32(spec.scale * np.log2(np.e)), np.uint64(seed), np.uint32(threshold),
                np.float32(1.0 / (1.0 - spec.dropout_p)))
    else:
        name = _specs.simt_name(dtype, d_pad, _specs.SIMT_CONFIGS[(dtype, d_pad)], spec.causal, dropout)
        tail = (np.float64(spec.scale), np.uint64(seed), np.uint32(threshold),
                np.float64(1.0 / (1.0 - spec.dropout_p)))
    kernel = get_kernel(name, smem, extra_options)

    num_q_blocks = -(-seq_q // block_q)
    batch_heads = batch * heads
    grid = (num_q_blocks * batch_heads,)
    if grid[0] >= 2**31:
        raise ValueError(f"too many blocks for one launch ({grid[0]}); split the batch")
    i64 = np.int64
    o_s, l_s = _elem_strides(out), _elem_strides(lse)
    static_args = (
        np.int32(batch_heads), np.int32(heads), np.int32(seq_q), np.int32(seq_kv), np.int32(d),
        *(i64(s) for s in _elem_strides(q)),
        *(i64(s) for s in _elem_strides(k)),
        *(i64(s) for s in _elem_strides(v)),
        i64(o_s[0]), i64(o_s[1]), i64(o_s[2]),
        i64(l_s[0]), i64(l_s[1]),
        np.int32(num_q_blocks), *tail,
    )
    return kernel, grid, (threads,), smem, static_args, used
