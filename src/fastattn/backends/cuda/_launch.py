"""CuPy side of the CUDA backend: run-time compilation and caching, kernel choice, grid math, launch.

Kernels of ``flash_fwd.cu`` are compiled per device by NVRTC through ``cupy.RawModule`` (CuPy caches
the binary on disk).  The Hopper kernel of ``flash_fwd_sm90.cu`` needs the architecture-specific
target sm_90a (``wgmma``), which RawModule cannot ask for, so it goes through NVRTC directly and its
cubin is cached on disk here, keyed by source, options and NVRTC version.

Which kernel serves a call (``_make_plan``): on compute capability 9.0, float16/bfloat16 without
dropout, head_dim padding to 64 or 128, unit stride along d and 16-byte aligned rows -> ``fa_fwd_sm90``;
other float16/bfloat16 calls -> ``fa_fwd_mma``; float32/float64 -> ``fa_fwd_simt``.  The environment
variable ``FASTATTN_CUDA_KERNEL=mma`` turns the Hopper kernel off (for comparisons).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..._dropout import dropout_threshold
from ..._validate import AttentionSpec
from . import _specs

_OPTIONS = ("-std=c++17",)
_SM90_OPTIONS = ("-std=c++17", "-arch=sm_90a")
_KERNELS: dict[tuple[int, str, tuple[str, ...]], list] = {}  # key -> [kernel, smem limit set, module]
_LOCK = threading.Lock()
_SOURCES: dict[str, str] = {}
_MAX_DYNAMIC_SMEM_ATTRIBUTE = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class Plan(NamedTuple):
    """What a launch ran: tiles, threads per block, shared memory per block, kernel family."""

    block_q: int
    block_kv: int
    threads: int
    smem: int
    kernel: str  # "wgmma" (fa_fwd_sm90), "mma.sync" (fa_fwd_mma) or "simt" (fa_fwd_simt)


def _cupy():
    import cupy

    return cupy


def _source(name: str) -> str:
    file = _specs.source_of(name)
    if file not in _SOURCES:
        _SOURCES[file] = _specs.kernel_source(file)
    return _SOURCES[file]


def _cache_dir() -> Path:
    env = os.environ.get("FASTATTN_CACHE_DIR")
    if env:
        return Path(env)
    try:
        return Path(_cupy().cuda.compiler.get_cache_dir()) / "fastattn"
    except Exception:  # noqa: BLE001 - a CuPy without get_cache_dir: CuPy's documented default
        return Path.home() / ".cupy" / "kernel_cache" / "fastattn"


def _nvrtc_cubin(source: str, name: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    """(cubin, lowered name) of one name expression, compiled by NVRTC or read from the disk cache."""
    from cupy_backends.cuda.libs import nvrtc

    version = nvrtc.getVersion()
    key = hashlib.sha256("\0".join((source, name, *options, repr(version))).encode()).hexdigest()
    path = _cache_dir() / f"{key}.cubin"
    try:
        blob = path.read_bytes()
        lowered, _, cubin = blob.partition(b"\n")
        if cubin and hashlib.sha256(cubin).hexdigest().encode() == lowered[:64]:
            return cubin, lowered[64:].decode()
    except OSError:
        pass
    prog = nvrtc.createProgram(source, _specs.KERNEL_SOURCE_SM90, (), ())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC could not compile {name} ({' '.join(options)}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from exc
        lowered = nvrtc.getLoweredName(prog, name)
        cubin = bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    try:  # atomic replace: a concurrent writer or a torn file is never read as valid
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(hashlib.sha256(cubin).hexdigest().encode() + lowered.encode() + b"\n" + cubin)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only cache directory costs a recompile next time, nothing else
    return cubin, lowered


def get_kernel(name: str, smem_bytes: int, extra_options: tuple[str, ...] = ()) -> Any:
    """The compiled kernel for one name expression on the current device (compiled on first use).

    ``extra_options`` (e.g. ``("-DFA_ALWAYS_RESCALE",)``) are for experiments only.
    """
    cp = _cupy()
    key = (cp.cuda.runtime.getDevice(), name, extra_options)
    entry = _KERNELS.get(key)
    if entry is None:
        with _LOCK:
            entry = _KERNELS.get(key)
            if entry is None:
                if _specs.is_sm90_name(name):
                    cubin, lowered = _nvrtc_cubin(_source(name), name, _SM90_OPTIONS + extra_options)
                    module = cp.cuda.function.Module()
                    module.load(cubin)
                    entry = [module.get_function(lowered), 48 * 1024, module]
                else:
                    module = cp.RawModule(code=_source(name), options=_OPTIONS + extra_options,
                                          name_expressions=[name])
                    entry = [module.get_function(name), 48 * 1024, module]
                _KERNELS[key] = entry
    if smem_bytes > entry[1]:  # raise the dynamic shared-memory limit once, not per launch
        kernel = entry[0]
        if hasattr(kernel, "max_dynamic_shared_size_bytes"):  # cupy.RawKernel
            kernel.max_dynamic_shared_size_bytes = smem_bytes
        else:  # cupy.cuda.function.Function of a loaded cubin
            driver = cp.cuda.driver
            attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", _MAX_DYNAMIC_SMEM_ATTRIBUTE)
            driver.funcSetAttribute(kernel.ptr, attr, smem_bytes)
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


def kernel_family() -> str:
    """"auto" (the Hopper kernel where it applies) or "mma" (FASTATTN_CUDA_KERNEL=mma: never)."""
    family = os.environ.get("FASTATTN_CUDA_KERNEL", "auto").strip().lower() or "auto"
    if family not in ("auto", "mma"):
        raise ValueError(f"FASTATTN_CUDA_KERNEL must be 'auto' or 'mma', got {family!r}")
    return family


def sm90_can_serve(spec: AttentionSpec, dtype: str, vec: bool) -> bool:
    """Is the call one the Hopper kernel computes (dtype, dropout, 16-byte rows: d and dv multiples of 8)?"""
    return _specs.is_mma_dtype(dtype) and spec.dropout_p == 0.0 and vec


def uses_sm90(spec: AttentionSpec, dtype: str, vec: bool, capability: tuple[int, int], family: str = "auto") -> bool:
    """Does the Hopper kernel serve this call (by default, on this device)?"""
    return family == "auto" and capability == (9, 0) and sm90_can_serve(spec, dtype, vec)


def mask_tiles_ok(spec: AttentionSpec) -> bool:
    """Can the Hopper kernel copy attn_mask's tiles into shared memory with 16-byte cp.async (elements
    of up to 4 bytes, unit stride along keys, every row start 16-byte aligned)?  Else its hook reads
    the mask where it lies (any strides, float64)."""
    m = spec.arrays.attn_mask
    if m is None or m.itemsize > 4 or m.ndim != 4:
        return False
    strides = _elem_strides(m)
    if strides[3] != 1 and m.shape[3] > 1:
        return False
    if m.data.ptr % 16 != 0:
        return False
    return all((s * m.itemsize) % 16 == 0 for s, n in zip(strides[:3], m.shape[:3], strict=True) if n > 1)


def mask_flags(spec: AttentionSpec) -> tuple[bool, bool]:
    """(interval, mods) of a call: causal / a window; softcap / ALiBi / attn_mask."""
    rule = spec.rule
    return rule.has_interval, rule.modifies_logits or rule.mask != "none"


def dims(spec: AttentionSpec, dtype: str, sm90: bool) -> tuple[int, int]:
    """(D, DV): the padded head dims of the kernel that serves the call."""
    if sm90:
        return _specs.sm90_padded_dims(spec.head_dim, spec.head_dim_v)
    return _specs.padded_dims(spec.head_dim, spec.head_dim_v, dtype)


def tile_config(spec: AttentionSpec, dtype: str, d_pad: int, sm90: bool) -> Any:
    """The tables' tile configuration for a call: Sm90Config, MmaConfig or SimtConfig."""
    interval, mods = mask_flags(spec)
    if sm90:  # softcap / ALiBi without attn_mask keep the call's own interval flag (MODS_FORM 2)
        has_mask = spec.rule.mask != "none"
        return _specs.sm90_config(d_pad, interval or (mods and has_mask), spec.seq_kv, mods, has_mask,
                                  mask_tiles_ok(spec))
    interval = interval or mods  # a mods kernel has the interval flag on (_specs.kernel_flags)
    if _specs.is_mma_dtype(dtype):
        return _specs.MMA_CONFIGS[(d_pad, interval)]
    return _specs.SIMT_CONFIGS[(dtype, d_pad)]


def plan(dtype: str, d_pad: int, cfg: Any, dv_pad: int | None = None, mask_tiles: bool = False) -> Plan:
    """The tiles, threads, shared memory and kernel family of one tile configuration (``mask_tiles``:
    the Hopper kernel's attn_mask tiles in shared memory, calls with an attn_mask)."""
    if isinstance(cfg, _specs.Sm90Config):
        return Plan(cfg.block_q, cfg.block_kv, cfg.threads,
                    _specs.sm90_smem_bytes(d_pad, cfg, head_dim_v=dv_pad, mask_tiles=mask_tiles), "wgmma")
    if isinstance(cfg, _specs.MmaConfig):
        return Plan(cfg.block_q, cfg.block_kv, cfg.warps * 32,
                    _specs.mma_smem_bytes(d_pad, cfg, head_dim_v=dv_pad), "mma.sync")
    itemsize = 8 if dtype == "float64" else 4
    return Plan(cfg.block_q, cfg.block_kv, cfg.block_q * 4, _specs.simt_smem_bytes(d_pad, cfg, itemsize), "simt")


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINIEST = float(np.finfo(np.float32).tiny)  # the smallest normal: never flushed to zero


def _mma_scales(scale: float) -> tuple[np.float32, np.float32]:
    """(scale * log2(e), scale) as the float32 arguments of the tensor-core kernels.

    The kernels form each exponent as (s - max) * scale_log2.  Kept inside float32's range so that
    0 * it stays 0 (the row max) and -inf * it stays -inf (masked keys): a scale above float32's
    range gives the same float16 weights as the largest float (every nonzero gap of float16 scores
    is a multiple of 2^-48, so either factor drives it far below exp2's range); a scale below
    2^-126 (float32's smallest normal, which no flush-to-zero arithmetic turns into 0, and 0 * -inf
    is NaN) gives weights within 1e-6 of 1, as the exact one does.  ``scale`` itself serves
    lse = max * scale + log l.
    """
    log2e = float(np.log2(np.e))
    scale_log2 = min(max(scale * log2e, _F32_TINIEST), _F32_MAX)
    return np.float32(scale_log2), np.float32(min(scale, _F32_MAX))


#: a window side without bound (the kernels' FA_UNBOUNDED); lengths must stay below it
UNBOUNDED = 1 << 29
_MASK_KINDS = {"bool": 1, "float16": 2, "bfloat16": 3, "float32": 4, "float64": 5}
_NULL = np.uint64(0)


def _window(spec: AttentionSpec) -> tuple[int, int]:
    """(left, right) of the key interval around i + off (common.cuh: fa_mask), causal folded in."""
    rule = spec.rule
    left = rule.window_left if rule.window_left >= 0 else UNBOUNDED
    right = rule.window_right if rule.window_right >= 0 else UNBOUNDED
    if rule.causal:
        right = min(right, 0)
    return left, right


def _mask_geometry(spec: AttentionSpec) -> tuple:
    """What of the mask arrays the launch plan depends on (dtype, strides, 16-byte alignment, slopes'
    batch axis)."""
    arr = spec.arrays
    m = arr.attn_mask
    mask = (str(m.dtype), _elem_strides(m), m.data.ptr % 16 == 0) if m is not None else None
    slopes = int(arr.alibi_slopes.shape[0]) if arr.alibi_slopes is not None else None
    return mask, slopes


def _dynamic_args(spec: AttentionSpec, v_flag: Any = None) -> tuple:
    """The per-call pointers: attn_mask, alibi_slopes, the ragged lengths / offsets, the V scan's
    flag (NULL when absent)."""
    arr = spec.arrays
    if spec.ragged == "packed":
        rag_q, rag_kv = arr.cu_seqlens_q, arr.cu_seqlens_kv
    elif spec.ragged == "padded":
        rag_q, rag_kv = arr.seqlens_q, arr.seqlens_kv
    else:
        rag_q = rag_kv = None
    return tuple(_NULL if x is None else x for x in (arr.attn_mask, arr.alibi_slopes, rag_q, rag_kv, v_flag))


def _wants_v_scan(spec: AttentionSpec) -> bool:
    """Does every tile of the call hide keys from some rows (a boolean mask)?  Then the Hopper kernel's
    per-tile masked-V checks are worth replacing by one scan of V (fa_v_nonfinite) first.  Windows
    keep the per-tile checks (their edge tiles only): measured on an H100 (fp16, d 128, causal,
    tools/gpu_mods_probe.py window), the scan and its flag cost more than the checks, 0.39-0.49x the
    plain kernel per attended pair with it against 0.45-0.60x without for a 256-key band."""
    return spec.rule.mask == "bool"


def launch(q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, dtype: str,
           config: _specs.MmaConfig | _specs.Sm90Config | None = None,
           extra_options: tuple[str, ...] = ()) -> Plan:
    """Runs the forward kernel on the current stream; returns the Plan of what ran.

    Everything but the array pointers is a pure function of the call's geometry, so it is
    worked out once per (device, dtype, shapes, strides, alignment, mask geometry, flags) and cached:
    a repeated call costs a dict lookup and the launch itself.  ``config`` forces a tile configuration
    (an ``Sm90Config`` forces the Hopper kernel); it is for the benchmark sweep.
    """
    family = kernel_family()
    key = (cp_device(), dtype, q.shape, k.shape, v.shape, q.strides, k.strides, v.strides, out.strides,
           lse.strides, q.data.ptr % 16 == 0, k.data.ptr % 16 == 0, v.data.ptr % 16 == 0, spec.scale,
           spec.dropout_p, spec.seed, spec.rule, spec.ragged, spec.batch, spec.seq_q, spec.seq_kv,
           _mask_geometry(spec), config, extra_options, family)
    entry = _PLANS.get(key)
    if entry is None:
        entry = _make_plan(q, k, v, out, lse, spec, dtype, config, extra_options, family)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = entry
    kernel, grid, threads, smem, static_args, used, scan = entry
    if kernel is not None:
        flag = None
        if scan is not None:  # does V hold inf / NaN?  (the Hopper kernel then checks tiles, else not)
            scan_kernel, scan_grid, scan_args = scan
            flag = _cupy().zeros((1,), dtype=np.int32)
            scan_kernel(scan_grid, (256,), (v, *scan_args, flag))
        kernel(grid, threads, (q, k, v, out, lse, *_dynamic_args(spec, flag), *static_args), shared_mem=smem)
    return used


_PLANS: dict[tuple, tuple] = {}
_SM90_FAILED: dict[int, str] = {}  # device -> why the Hopper kernel could not be compiled there


def cp_device() -> int:
    return _cupy().cuda.runtime.getDevice()


def _make_plan(q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, dtype: str,
               config: _specs.MmaConfig | _specs.Sm90Config | None, extra_options: tuple[str, ...],
               family: str) -> tuple:
    batch, heads, seq_q = spec.batch, spec.heads, spec.seq_q
    d, dv = spec.head_dim, spec.head_dim_v
    if max(spec.seq_q, spec.seq_kv, int(q.shape[2]), int(k.shape[2])) >= UNBOUNDED:
        raise ValueError(f"sequences of {UNBOUNDED} or more rows are beyond the cuda backend; got seq_q "
                         f"{int(q.shape[2])}, seq_kv {int(k.shape[2])}")
    mma = _specs.is_mma_dtype(dtype)
    vec = mma and _vec_ok(q, d) and _vec_ok(k, d) and _vec_ok(v, dv) and _vec_ok(out, dv)
    if isinstance(config, _specs.Sm90Config) and not sm90_can_serve(spec, dtype, vec):
        raise ValueError(f"the Hopper kernel cannot serve this call ({dtype}, head_dim {d}/{dv}, "
                         f"dropout {spec.dropout_p}, 16-byte rows {vec})")
    sm90 = (isinstance(config, _specs.Sm90Config)
            or (config is None and uses_sm90(spec, dtype, vec, device_capability(), family)
                and cp_device() not in _SM90_FAILED))
    d_pad, dv_pad = dims(spec, dtype, sm90)
    forced = isinstance(config, _specs.Sm90Config) or (mma and config is not None)  # an MmaConfig: mma dtypes
    cfg = config if forced else tile_config(spec, dtype, d_pad, sm90)
    tiles = sm90 and mask_tiles_ok(spec)
    used = plan(dtype, d_pad, cfg, dv_pad, mask_tiles=tiles)
    if batch * heads * seq_q == 0:
        return None, None, None, None, None, used, None

    interval, mods = mask_flags(spec)
    dropout = spec.dropout_p > 0.0
    seed = int(spec.seed or 0)
    threshold = dropout_threshold(spec.dropout_p) if dropout else 0
    if used.kernel == "wgmma":
        name = _specs.sm90_name(dtype, d_pad, cfg, interval, dv_pad, mods, spec.rule.mask != "none", tiles)
    elif used.kernel == "mma.sync":
        name = _specs.mma_name(dtype, d_pad, cfg, interval, dropout, vec, dv_pad, mods)
    else:
        name = _specs.simt_name(dtype, d_pad, cfg, interval, dropout, mods)
    if mma:
        tail = (np.float32(spec.rule.softcap), *_mma_scales(spec.scale), np.uint64(seed), np.uint32(threshold),
                np.float32(1.0 / (1.0 - spec.dropout_p)))
    else:
        tail = (np.float64(spec.rule.softcap), np.float64(spec.scale), np.uint64(seed), np.uint32(threshold),
                np.float64(1.0 / (1.0 - spec.dropout_p)))
    try:
        kernel = get_kernel(name, used.smem, extra_options)
    except Exception as exc:  # noqa: BLE001 - any failure to build or load the Hopper kernel
        if used.kernel != "wgmma" or config is not None:
            raise
        # e.g. an NVRTC without sm_90a, or a CuPy without NVRTC's cubin calls: say so once and
        # serve the call (and later ones on this device) with fa_fwd_mma
        _SM90_FAILED[cp_device()] = str(exc)
        warnings.warn(f"fastattn: the Hopper kernel did not compile, using the mma.sync kernel: {exc}",
                      RuntimeWarning, stacklevel=4)
        return _make_plan(q, k, v, out, lse, spec, dtype, config, extra_options, "mma")

    num_q_blocks = -(-seq_q // used.block_q)
    grid = (num_q_blocks * batch * heads,)
    if grid[0] >= 2**31:
        raise ValueError(f"too many blocks for one launch ({grid[0]}); split the batch")
    i64, i32 = np.int64, np.int32
    o_s, l_s = _elem_strides(out), _elem_strides(lse)
    arr = spec.arrays
    m_s = _elem_strides(arr.attn_mask) if arr.attn_mask is not None else (0, 0, 0, 0)
    mask_kind = _MASK_KINDS[str(arr.attn_mask.dtype)] if arr.attn_mask is not None else 0
    slopes_sb = heads if (arr.alibi_slopes is not None and arr.alibi_slopes.shape[0] > 1) else 0
    left, right = _window(spec)
    ragged = {"none": 0, "padded": 1, "packed": 2}[spec.ragged]
    static_args = (
        i32(heads), i32(spec.group), i32(seq_q), i32(spec.seq_kv), i32(d), i32(dv),
        *(i64(s) for s in _elem_strides(q)),
        *(i64(s) for s in _elem_strides(k)),
        *(i64(s) for s in _elem_strides(v)),
        i64(o_s[0]), i64(o_s[1]), i64(o_s[2]),
        i64(l_s[0]), i64(l_s[1]),
        *(i64(s) for s in m_s), i32(slopes_sb),
        i32(num_q_blocks), i32(ragged), i32(mask_kind), i32(spec.rule.bottom_right), i32(left), i32(right),
        *tail,
    )
    scan = None
    if used.kernel == "wgmma" and _wants_v_scan(spec):
        vb, vh, vs, _ = (int(x) for x in v.shape)
        rows = vb * vh * vs
        vs_b, vs_h, vs_s, _ = _elem_strides(v)
        scan = (get_kernel(_specs.v_scan_name(dtype), 0), (max(1, min(-(-rows // 8), 132 * 16)),),
                (i32(vh), i32(max(vs, 1)), i32(dv), i64(vs_b), i64(vs_h), i64(vs_s), i64(rows)))
    return kernel, grid, (used.threads,), used.smem, static_args, used, scan
