"""CuPy side of the CUDA backward pass (``kernels/flash_bwd.cu``): kernel choice, grids, launches.

    fa_bwd_prep                      D = rowsum(dO o O)                              (every dtype)
    float16 / bfloat16:
      fa_bwd_sm90 (flash_bwd_sm90.cu) on compute capability 9.0: warpgroup MMA (wgmma), the same work as
                                     fa_bwd_split_mma (padded head dims 64 / 128, q/k and v alike, 16-byte rows,
                                     no dropout, no dbias, dQ through the float32 buffer)
      fa_bwd_split_mma               dK, dV per key tile; dQ into a float32 buffer with atomics
                                     (FlashAttention-2's warp layouts: padded head dims 64 / 128, q/k and v
                                     alike, where a block may take its shared memory)
      fa_bwd_mma                     the same work for every other head dim (each warp owns 16 keys)
      fa_bwd_dq_convert              dq = scale * that buffer, in the input dtype
      deterministic=True: either of them without dQ, then fa_bwd_dq_mma (dQ per query tile, no atomics)
    float32 / float64: fa_bwd_simt_kv (dK, dV) and fa_bwd_simt_q (dQ), exact FMA, deterministic; a row whose
                       keys lie in one chunk has its P normalized (kernels/bwd.cuh, "Local rows"), the sums
                       passed from the first kernel to the second in a float buffer of 2 x lse's size

Every launch's arguments but the pointers are a pure function of the call's geometry: worked out once per
geometry and cached, as the forward's launch plan (``_launch``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..._dropout import dropout_threshold
from ..._validate import AttentionSpec
from . import _specs
from ._launch import (
    UNBOUNDED,
    _dynamic_args,
    _elem_strides,
    _mask_geometry,
    _mma_scales,
    _vec_ok,
    _window,
    cp_device,
    device_capability,
    get_kernel,
    mask_flags,
)

_MASK_KINDS = {"bool": 1, "float16": 2, "bfloat16": 3, "float32": 4, "float64": 5}
_NULL = np.uint64(0)


class BwdPlan(NamedTuple):
    """What a backward call runs: the main kernel's tiles and family, and the kernels with their launch
    geometry and static arguments."""

    block_q: int
    block_kv: int
    threads: int
    smem: int
    kernel: str        # "wgmma", "mma.sync" or "simt"
    d_pad: int
    main: tuple        # (kernel, grid, threads, smem, static args) of fa_bwd_mma / fa_bwd_simt_kv
    dq: tuple | None   # fa_bwd_dq_mma / fa_bwd_simt_q, or None (dQ through atomics)
    convert: tuple | None  # fa_bwd_dq_convert (kernel, grid, static args), with the atomics
    prep: tuple        # fa_bwd_prep (kernel, grid, static args)


_PLANS: dict[tuple, BwdPlan] = {}

#: take fa_bwd_split_mma where _specs.bwd_split_config offers tiles (False: fa_bwd_mma for every call; the
#: benchmarks and tests compare the two)
SPLIT_KERNEL = True
#: take fa_bwd_sm90 (wgmma) on compute capability 9.0 where _specs.bwd_sm90_serves the call (False: the
#: mma.sync kernels; the benchmarks and tests compare them)
SM90_KERNEL = True


def _cupy():
    import cupy

    return cupy


def _smem_optin() -> int:
    """Shared memory a block may take on the current device (opt-in limit)."""
    cp = _cupy()
    dev = cp.cuda.Device()
    try:
        return int(dev.attributes["MaxSharedMemoryPerBlockOptin"])
    except Exception:  # noqa: BLE001 - an attribute this CuPy does not name: the A100's limit, safe everywhere
        return 163 * 1024


def _grad_like(x: Any, spec: AttentionSpec, dim: int) -> Any:
    """An uninitialized gradient of view ``x``'s (batch, heads, rows) with ``dim`` columns, in the caller's
    memory order (the forward's output rule: (batch, seq, heads, dim) for "bshd" and packed calls)."""
    cp = _cupy()
    b, h, s, _ = (int(n) for n in x.shape)
    if spec.layout == "bshd" or spec.ragged == "packed":
        return cp.empty((b, s, h, dim), dtype=x.dtype).swapaxes(1, 2)
    return cp.empty((b, h, s, dim), dtype=x.dtype)


def _dynamic(spec: AttentionSpec) -> tuple:
    """The per-call pointers: attn_mask, alibi_slopes, the ragged lengths / offsets (NULL when absent)."""
    return _dynamic_args(spec)[:4]  # the forward's, less its V-scan flag


def _make_plan(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, dq: Any, dk: Any, dv: Any,
               spec: AttentionSpec, dtype: str, deterministic: bool, want_dbias: bool = False) -> BwdPlan:
    d, dvd = spec.head_dim, spec.head_dim_v
    heads, group, batch = spec.heads, spec.group, spec.batch
    vb, _, view_q, _ = (int(n) for n in q.shape)
    view_kv = int(k.shape[2])
    if max(spec.seq_q, spec.seq_kv, view_q, view_kv) >= UNBOUNDED:
        raise ValueError(f"sequences of {UNBOUNDED} or more rows are beyond the cuda backend; got seq_q "
                         f"{view_q}, seq_kv {view_kv}")
    mma = _specs.is_mma_dtype(dtype)
    interval, mods = mask_flags(spec)
    d_pad, dv_pad = _specs.padded_dims(d, dvd, dtype)
    i32, i64 = np.int32, np.int64
    arr = spec.arrays
    m_s = _elem_strides(arr.attn_mask) if arr.attn_mask is not None else (0, 0, 0, 0)
    mask_kind = _MASK_KINDS[str(arr.attn_mask.dtype)] if arr.attn_mask is not None else 0
    slopes_sb = heads if (arr.alibi_slopes is not None and arr.alibi_slopes.shape[0] > 1) else 0
    left, right = _window(spec)
    ragged = {"none": 0, "padded": 1, "packed": 2}[spec.ragged]
    seed = int(spec.seed or 0)
    dropout = spec.dropout_p > 0.0
    threshold = dropout_threshold(spec.dropout_p) if spec.dropout_p > 0.0 else 0
    if mma:
        tail = (np.float32(spec.rule.softcap), *_mma_scales(spec.scale), np.uint64(seed), np.uint32(threshold),
                np.float32(1.0 / (1.0 - spec.dropout_p)))
    else:
        tail = (np.float64(spec.rule.softcap), np.float64(spec.scale), np.uint64(seed), np.uint32(threshold),
                np.float64(1.0 / (1.0 - spec.dropout_p)))
    lse_s = _elem_strides(lse)

    def static(num_blocks: int) -> tuple:
        return (
            i32(heads), i32(group), i32(spec.seq_q), i32(spec.seq_kv), i32(d), i32(dvd), i32(view_q), i32(view_kv),
            *(i64(s) for s in _elem_strides(q)), *(i64(s) for s in _elem_strides(k)),
            *(i64(s) for s in _elem_strides(v)), *(i64(s) for s in _elem_strides(dout)),
            *(i64(s) for s in _elem_strides(dq)[:3]), *(i64(s) for s in _elem_strides(dk)[:3]),
            *(i64(s) for s in _elem_strides(dv)[:3]), i64(lse_s[0]), i64(lse_s[1]),
            *(i64(s) for s in m_s), i32(slopes_sb), i32(num_blocks), i32(ragged), i32(mask_kind),
            i32(spec.rule.bottom_right), i32(left), i32(right), *tail,
        )

    rows = vb * heads * view_q
    do_s, o_s = _elem_strides(dout), _elem_strides(out)
    prep = (get_kernel(_specs.bwd_prep_name(dtype), 0), (max(1, -(-rows // 8)),),
            (i32(heads), i32(view_q), i32(dvd), *(i64(s) for s in do_s), *(i64(s) for s in o_s), i64(rows)))
    if mma:
        vec = all(_vec_ok(x, n) for x, n in ((q, d), (k, d), (v, dvd), (dout, dvd)))
        split = _specs.bwd_split_config(d_pad, dv_pad, _smem_optin()) if SPLIT_KERNEL else None
        sm90 = (SM90_KERNEL and vec and not deterministic and not dropout and not want_dbias
                and _specs.bwd_sm90_serves(d_pad, dv_pad, interval, mods) and device_capability() == (9, 0)
                and _specs.bwd_sm90_smem_bytes(d_pad) <= _smem_optin())
        if sm90:
            smem = _specs.bwd_sm90_smem_bytes(d_pad)
            name = _specs.bwd_sm90_name(dtype, d_pad, interval, mods)
            nkb = -(-spec.seq_kv // _specs.BWD_SM90_BLOCK_KV)
            main = (get_kernel(name, smem), (nkb * batch * (heads // group),), (256,), smem, static(nkb))
            block_q, block_kv, threads, family = (_specs.BWD_SM90_BLOCK_Q[d_pad], _specs.BWD_SM90_BLOCK_KV, 256,
                                                  "wgmma")
        elif split is not None:
            cfg = split
            smem = _specs.bwd_split_smem_bytes(d_pad, dv_pad, cfg)
            name = _specs.bwd_split_name(dtype, d_pad, dv_pad, cfg, interval, mods, dropout, vec)
        else:
            cfg = _specs.bwd_mma_config(d_pad, dv_pad, _smem_optin())
            smem = _specs.bwd_mma_smem_bytes(d_pad, dv_pad, cfg)
            name = _specs.bwd_mma_name(dtype, d_pad, dv_pad, cfg, interval, mods, dropout, vec)
        if not sm90:
            nkb = -(-spec.seq_kv // cfg.block_kv)
            main = (get_kernel(name, smem), (nkb * batch * (heads // group),), (cfg.warps * 32,), smem, static(nkb))
            block_q, block_kv, threads, family = cfg.block_q, cfg.block_kv, cfg.warps * 32, "mma.sync"
        dq_plan = convert = None
        if deterministic:
            dcfg = _specs.BWD_DQ_CONFIGS[d_pad]
            dsmem = _specs.bwd_dq_smem_bytes(d_pad, dv_pad, dcfg)
            nqb = -(-spec.seq_q // dcfg.block_q)
            dq_plan = (get_kernel(_specs.bwd_dq_name(dtype, d_pad, dv_pad, dcfg, interval, mods, dropout, vec),
                                  dsmem),
                       (nqb * batch * heads,), (dcfg.warps * 32,), dsmem, static(nqb))
        else:
            total = rows * d
            dq_s = _elem_strides(dq)
            convert = (get_kernel(_specs.bwd_convert_name(dtype), 0), (max(1, -(-total // 256)),),
                       (i32(heads), i32(view_q), i32(d), i32(d_pad), i64(dq_s[0]), i64(dq_s[1]), i64(dq_s[2]),
                        np.float32(min(spec.scale, float(np.finfo(np.float32).max))), i64(total)))
    else:
        rows_t, cols_t = _specs.BWD_SIMT_CONFIGS[(dtype, d_pad)]
        kv_name, q_name = _specs.bwd_simt_names(dtype, d_pad, interval, mods)
        smem_kv, smem_q = _specs.bwd_simt_smem_bytes(dtype, d_pad)
        nkb = -(-spec.seq_kv // rows_t)
        nqb = -(-spec.seq_q // rows_t)
        main = (get_kernel(kv_name, smem_kv), (nkb * batch * (heads // group),), (rows_t * 4,), smem_kv, static(nkb))
        dq_plan = (get_kernel(q_name, smem_q), (nqb * batch * heads,), (rows_t * 4,), smem_q, static(nqb))
        convert = None
        block_q, block_kv, threads, smem, family = cols_t, rows_t, rows_t * 4, smem_kv, "simt"
    for launch in (main, dq_plan):
        if launch is not None and launch[1][0] >= 2**31:
            raise ValueError(f"too many blocks for one launch ({launch[1][0]}); split the batch")
    return BwdPlan(block_q, block_kv, threads, smem, family, d_pad, main, dq_plan, convert, prep)


def backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, *,
             want_dbias: bool = False, deterministic: bool = False) -> tuple:
    """(dq, dk, dv, dbias, plan) on the current device and stream (see the module docstring)."""
    cp = _cupy()
    dtype = spec.dtype.name
    dq = _grad_like(q, spec, spec.head_dim)
    dk = _grad_like(k, spec, spec.head_dim)
    dv = _grad_like(v, spec, spec.head_dim_v)
    vb, _, view_q, _ = (int(n) for n in q.shape)
    view_kv = int(k.shape[2])
    lse_dtype = np.float64 if dtype == "float64" else np.float32
    dbias = cp.zeros((vb, spec.heads, view_q, view_kv), dtype=lse_dtype) if want_dbias else None
    if view_q == 0 or view_kv == 0 or vb * spec.heads == 0 or spec.batch == 0:
        for g in (dq, dk, dv):
            g.fill(0)
        return dq, dk, dv, dbias, None
    lse = cp.ascontiguousarray(lse)  # dsum shares its layout
    key = (cp_device(), dtype, q.shape, k.shape, v.shape, q.strides, k.strides, v.strides, dout.strides,
           out.strides, tuple(x.data.ptr % 16 == 0 for x in (q, k, v, dout)), spec.scale, spec.dropout_p,
           spec.seed, spec.rule, spec.ragged, spec.layout, spec.batch, spec.seq_q, spec.seq_kv, _mask_geometry(spec),
           deterministic, want_dbias, SPLIT_KERNEL, SM90_KERNEL)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(dout, q, k, v, out, lse, dq, dk, dv, spec, dtype, deterministic, want_dbias)
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    dsum = cp.empty(lse.shape, dtype=lse_dtype)
    kernel, grid, args = plan.prep
    kernel(grid, (256,), (dout, out, dsum, *args))
    dq_acc = None
    if plan.kernel == "simt":  # the local rows' (sum of P, D), fa_bwd_simt_kv to fa_bwd_simt_q (flash_bwd.cu)
        dq_acc = cp.zeros(2 * lse.size, dtype=lse_dtype)
    if plan.convert is not None:
        dq_acc = cp.zeros((vb, spec.heads, view_q, plan.d_pad), dtype=np.float32)
    ptrs = (q, k, v, dout, lse, dsum, dq, dk, dv, _NULL if dq_acc is None else dq_acc,
            _NULL if dbias is None else dbias, *_dynamic(spec))
    kernel, grid, threads, smem, args = plan.main
    kernel(grid, threads, (*ptrs, *args), shared_mem=smem)
    if plan.dq is not None:
        kernel, grid, threads, smem, args = plan.dq
        kernel(grid, threads, (*ptrs, *args), shared_mem=smem)
    if plan.convert is not None:
        kernel, grid, args = plan.convert
        kernel(grid, (256,), (dq_acc, dq, *args))
    return dq, dk, dv, dbias, plan
