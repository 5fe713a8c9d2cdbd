"""CUDA backend: FlashAttention-2 forward kernels compiled at run time by CuPy (NVRTC).

    prepare(x)  CuPy array as is; torch CUDA tensors and other DLPack / __cuda_array_interface__
                objects zero-copy; NumPy (host) arrays copied to the current device
    backward    _backward.backward -> fa_bwd_prep, fa_bwd_mma (+ fa_bwd_dq_mma or fa_bwd_dq_convert) for
                float16 / bfloat16; fa_bwd_simt_kv + fa_bwd_simt_q for float32 / float64 (kernels/flash_bwd.cu)
    forward     _launch.launch -> fa_fwd_sm90 (float16, bfloat16 on compute capability 9.0: wgmma)
                               -> fa_fwd_mma  (float16, bfloat16: mma.sync tensor cores, fp32 accumulation)
                               -> fa_fwd_simt (float32, float64: exact FMA in the input precision)
    restore     back to where the caller's q lives: NumPy -> host copy, torch -> torch (DLPack), CuPy as is
    kvcache     flash_attention_with_kvcache: _decode.kvcache -> fa_decode_mma / fa_decode_simt (append +
                split-KV attention against the cache in place), fa_decode_combine (the splits' LSE merge)

The CUDA C++ sources (``kernels/flash_fwd.cu``, ``kernels/flash_fwd_sm90.cu``) ship inside the package: no build
step (the ``cuda12`` / ``cuda13`` extras bring NVRTC and the runtime libraries from PyPI).
Tile sizes come from ``_specs`` (the user's block_size_q / block_size_kv are ignored on this backend);
``BackendStats`` reports the tiles actually used and the shared memory per block.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from ..._validate import AttentionSpec, is_gpu_array
from .. import BackendStats, BackwardOutput, ForwardOutput, refuse_features
from . import _specs

NAME = "cuda"

_MMA_MIN_CC = (8, 0)  # mma.sync m16n8k16 with f16/bf16 operands, ldmatrix, cp.async


@functools.lru_cache(maxsize=1)
def _availability() -> str | None:
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed (from a clone: pip install '.[cuda12]'; see docs/cuda.md): {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken CuPy install is "not available", never a crash
        return f"CuPy failed to import: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA device (CuPy could not query devices: {exc})"
    if count < 1:
        return "no CUDA device visible to CuPy"
    return None


def availability() -> str | None:
    """None when CuPy and a CUDA device are present; otherwise what is missing."""
    return _availability()


def _cupy():
    reason = availability()
    if reason is not None:
        raise RuntimeError(f"backend 'cuda' is not available: {reason}")
    import cupy

    return cupy


def prepare(x: Any) -> Any:
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        return x
    if is_gpu_array(x):
        if hasattr(x, "__dlpack__"):
            return cp.from_dlpack(x)
        return cp.asarray(x)  # __cuda_array_interface__, zero-copy
    return cp.asarray(np.asarray(x))


def restore(y: Any, like: Any) -> Any:
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(like, cp.ndarray):
        return y
    if type(like).__module__.split(".")[0] == "torch":
        import torch

        return torch.from_dlpack(y)
    if is_gpu_array(like):
        return y
    return y.get()


#: the variant features this backend computes (tests/test_cuda_variants.py checks each one on a GPU)
SUPPORTED = (
    "grouped-query attention (fewer k/v heads than q heads)",
    "a v head_dim different from q/k's",
    "causal='bottom_right'",
    "window",
    "seqlens_q / seqlens_kv",
    "packed sequences (flash_attention_varlen)",
    "softcap",
    "alibi_slopes",
    "attn_mask",
)


def check_spec(spec: AttentionSpec) -> None:
    refuse_features(NAME, spec, SUPPORTED)
    for name, dim in (("q/k", spec.head_dim), ("v", spec.head_dim_v)):
        if dim > _specs.MAX_HEAD_DIM:
            raise ValueError(f"{name} head_dim {dim} is larger than the cuda backend supports "
                             f"({_specs.MAX_HEAD_DIM}); use the cpu backend")


def describe() -> dict:
    cp = _cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "device_id": dev.id,
        "compute_capability": dev.compute_capability,
        "multiprocessors": int(props["multiProcessorCount"]),
        "shared_memory_per_block_optin": int(props.get("sharedMemPerBlockOptin", 0)),
        "cupy": cp.__version__,
        "kernels": ("float16/bfloat16: wgmma on compute capability 9.0 (head_dim % 8 == 0, no dropout), "
                    "else mma.sync m16n8k16 (fp32 accumulate); float32/float64: SIMT FMA"),
        "head_dims": list(_specs.MMA_HEAD_DIMS),
    }


def _check_device(dtype: str) -> None:
    from ._launch import device_capability

    if _specs.is_mma_dtype(dtype):
        cc = device_capability()
        if cc < _MMA_MIN_CC:
            raise TypeError(
                f"{dtype} on the cuda backend needs a GPU of compute capability 8.0 or newer "
                f"(mma.sync m16n8k16); this device has {cc[0]}.{cc[1]}; use float32 or the cpu backend"
            )


def forward(q: Any, k: Any, v: Any, spec: AttentionSpec) -> ForwardOutput:
    cp = _cupy()
    from ._launch import launch

    dtype = spec.dtype.name
    if max(spec.head_dim, spec.head_dim_v) > _specs.MAX_HEAD_DIM:
        raise ValueError(_specs.MAX_HEAD_DIM_ERROR.format(d=max(spec.head_dim, spec.head_dim_v),
                                                          max=_specs.MAX_HEAD_DIM))
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must live on one GPU; got devices {q.device.id}, {k.device.id}, {v.device.id}")
    with q.device:
        _check_device(dtype)
        vb, _, vs, _ = (int(s) for s in q.shape)  # the views' batch and rows (a packed call: 1, total)
        # out in the caller's memory order: (batch, seq, heads, dv) for "bshd" and packed calls,
        # handed back as its (batch, heads, seq, dv) view
        if spec.layout == "bshd" or spec.ragged == "packed":
            out = cp.empty((vb, vs, spec.heads, spec.head_dim_v), dtype=q.dtype).swapaxes(1, 2)
        else:
            out = cp.empty((vb, spec.heads, vs, spec.head_dim_v), dtype=q.dtype)
        lse = cp.empty((vb, spec.heads, vs), dtype=np.float64 if dtype == "float64" else np.float32)
        if int(k.shape[2]) == 0 or vs == 0:
            out.fill(0)
            lse.fill(-np.inf)
            block_q, block_kv, threads, smem = 0, 0, 0, 0
            kernel = "none"
        else:
            block_q, block_kv, threads, smem, kernel = launch(q, k, v, out, lse, spec, dtype)
    stats = BackendStats(block_q=block_q, block_kv=block_kv, peak_sram_bytes=smem, num_threads=threads,
                         simd=kernel)
    return ForwardOutput(out, lse, stats)


def backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, spec: AttentionSpec, *,
             want_dbias: bool = False, deterministic: bool = False) -> BackwardOutput:
    """The gradients of ``forward`` (``_backward``): dq, dk, dv in the input dtype and the caller's memory
    order, dbias (float32; float64 for float64) on request.  ``deterministic=False`` adds dQ with atomics
    on the tensor-core path (the fastest); ``True`` computes dQ in its own pass, bit-identical run to run
    (the float32 / float64 kernels always are)."""
    _cupy()
    from ._backward import backward as run

    dtype = spec.dtype.name
    if max(spec.head_dim, spec.head_dim_v) > _specs.MAX_HEAD_DIM:
        raise ValueError(_specs.MAX_HEAD_DIM_ERROR.format(d=max(spec.head_dim, spec.head_dim_v),
                                                          max=_specs.MAX_HEAD_DIM))
    arrays = (dout, q, k, v, out, lse)
    if len({x.device.id for x in arrays}) != 1:
        raise ValueError(f"dout, q, k, v, out and lse must live on one GPU; got devices "
                         f"{[x.device.id for x in arrays]}")
    with q.device:
        _check_device(dtype)
        dq, dk, dv, dbias, plan = run(dout, q, k, v, out, lse, spec, want_dbias=want_dbias,
                                      deterministic=deterministic)
    if plan is None:
        stats = BackendStats(block_q=0, block_kv=0, peak_sram_bytes=0, num_threads=0, simd="none")
    else:
        stats = BackendStats(block_q=plan.block_q, block_kv=plan.block_kv, peak_sram_bytes=plan.smem,
                             num_threads=plan.threads, simd=plan.kernel)
    return BackwardOutput(dq, dk, dv, dbias, stats)


def kvcache(call: Any) -> tuple[Any, Any]:
    """``flash_attention_with_kvcache`` on the GPU: append in place, attend to the cache where it lies
    (contiguous or paged), capturable in a CUDA graph (``_decode``)."""
    _cupy()
    from ._decode import kvcache as run

    return run(call)


def kvcache_repeat(call: Any) -> Any:
    """The repeat state of a call ``kvcache`` just ran (``_decode.Repeat``: its repeats read only the data
    pointers, the lengths and the stream), or None."""
    from ._decode import repeat_entry

    return repeat_entry(call)
