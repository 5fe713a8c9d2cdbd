"""Attention against a KV cache (decode and chunked prefill), and the log-sum-exp merge of partial results.

    flash_attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, ...)

Semantics (FlashAttention-2's ``flash_attn_with_kvcache``):

- q: (batch, seq_q, heads_q, d) (``layout="bshd"``, the default) or (batch, heads_q, seq_q, d).
- A contiguous cache: k_cache / v_cache (batch, seq_cache, heads_kv, d) (or (batch, heads_kv, seq_cache, d)
  with ``layout="bhsd"``).  A paged cache: k_cache / v_cache (num_blocks, block_size, heads_kv, d), whatever the
  layout, with ``block_table`` (batch, max_blocks) ints: token j of sequence b lives in block
  ``block_table[b, j // block_size]`` at row ``j % block_size``.
- ``cache_seqlens``: an int or (batch,) ints, the tokens already cached per sequence.
- ``k`` / ``v`` (batch, seq_new, heads_kv, d): written into the cache, in place, at ``cache_seqlens[b]`` before
  attending; the caller's cache arrays hold them afterwards.
- q attends to the ``cache_seqlens[b] + seq_new`` first keys of its sequence, with ``causal=True`` aligned
  bottom-right (query t of the chunk sees keys < cache_seqlens[b] + seq_new - seq_q + t + 1: with the chunk's own
  tokens appended, query t sees the cache and the chunk up to itself).  Windows, softcap, ALiBi and GQA as in
  ``flash_attention`` (windows aligned bottom-right too).
- Every check runs before any write: an append past the cache's capacity (or past the blocks of block_table),
  block numbers out of range, negative lengths, head or dtype mismatches raise and leave the cache untouched.

A decode loop repeats one geometry: a call whose arrays have the shapes, strides (byte strides for NumPy),
dtypes and devices of a call already checked, with the same options, skips ``check_call`` (NumPy arrays and
CPU torch tensors, which are read as zero-copy NumPy views: the CPU backend's ``CacheRepeat``; torch CUDA
tensors: the CUDA backend's ``Repeat``).  Only the values are checked again (lengths, the block table),
before any write, with the full path's messages.

``merge_attention(outs, lses)``: exact attention over the union of key sets from the results over each part
(``out = Σ_i e^(lse_i − lse) out_i``, ``lse = log Σ_i e^(lse_i)``); split-KV decoding and ring attention
combine their partial results with it.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from typing import Any

import numpy as np

from ._arrays import input_array, like_input, torch_cpu_to_numpy
from ._checks import check_bool, check_positive_int
from ._validate import dtype_name, is_gpu_array, to_host


def _xp(x: Any) -> Any:
    if is_gpu_array(x):
        import cupy

        return cupy
    return np


def merge_attention(outs: Any, lses: Any) -> tuple[Any, Any]:
    """Merges partial attention results over disjoint key sets into the result over their union.

    ``outs``: a sequence of arrays of one shape (..., d), or one array (parts, ..., d); ``lses``: the
    matching (...) log-sum-exps (parts first).  Returns ``(out, lse)`` with ``out`` in the outputs' dtype
    and ``lse`` float32 (float64 for float64 outputs).  A row whose every part has lse -inf (no key
    anywhere) gives 0 and -inf; a NaN in a part's lse makes the row NaN.
    """
    like = outs[0] if isinstance(outs, (list, tuple)) and outs else outs  # results go back as the caller's kind
    if isinstance(outs, (list, tuple)):
        if not outs:
            raise ValueError("merge_attention needs at least one part (outs is empty)")
        if not isinstance(lses, (list, tuple)) or len(lses) != len(outs):
            raise ValueError(f"outs and lses must be sequences of the same length; got {len(outs)} outs and "
                             f"{len(lses) if isinstance(lses, (list, tuple)) else type(lses).__name__} lses")
        outs = [input_array(f"outs[{i}]", o) for i, o in enumerate(outs)]
        lses = [input_array(f"lses[{i}]", s) for i, s in enumerate(lses)]
        xp = _xp(outs[0])
        for name, parts in (("outs", outs), ("lses", lses)):
            if len({tuple(p.shape) for p in parts}) != 1:
                raise ValueError(f"every part of {name} must have one shape; got {[tuple(p.shape) for p in parts]}")
        out_stack = xp.stack([xp.asarray(o) for o in outs])
        lse_stack = xp.stack([xp.asarray(s) for s in lses])
    else:
        out_stack, lse_stack = input_array("outs", outs), input_array("lses", lses)
        xp = _xp(out_stack)
        out_stack, lse_stack = xp.asarray(out_stack), xp.asarray(lse_stack)
    if tuple(lse_stack.shape) != tuple(out_stack.shape[:-1]):
        raise ValueError(f"lses must have the outs' shape without its last axis: outs {tuple(out_stack.shape)}, "
                         f"lses {tuple(lse_stack.shape)}")
    name = dtype_name(out_stack)
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"outs must be floating point, got dtype {name}")
    compute = xp.float64 if name == "float64" else xp.float32
    lse64 = lse_stack.astype(compute)
    m = lse64.max(axis=0)
    m_safe = xp.where(xp.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w = xp.exp(lse64 - m_safe)
        total = w.sum(axis=0)
        out = (w[..., None] * out_stack.astype(compute)).sum(axis=0)
        out = xp.where(total[..., None] > 0, out / xp.where(total > 0, total, 1.0)[..., None], 0.0)
        lse = xp.where(total > 0, m_safe + xp.log(xp.where(total > 0, total, 1.0)), -xp.inf)
    nan_rows = xp.isnan(lse64).any(axis=0)
    out = xp.where(nan_rows[..., None], xp.nan, out)
    lse = xp.where(nan_rows, xp.nan, lse)
    return like_input(out.astype(out_stack.dtype), like), like_input(lse.astype(compute), like)


@dataclasses.dataclass
class CacheCall:
    """One validated ``flash_attention_with_kvcache`` call (shapes, dtypes and options; no device values read).

    The arrays are the caller's (host arrays as NumPy views, GPU arrays as given), in the call's layout;
    ``cache_seqlens`` and ``block_table`` are as given too (an int, or an integer array on the host or
    the device): their values are checked by :func:`check_values` once a backend has them on the host.
    """

    q: Any
    k_cache: Any
    v_cache: Any
    k: Any  # None: nothing to append
    v: Any
    layout: str  # of q, k, v and a contiguous cache ("bshd" or "bhsd"); a paged cache is always bshd-blocked
    dtype: str
    on_gpu: bool
    batch: int
    seq_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    seq_new: int  # tokens appended per sequence (0 without k / v)
    paged: bool
    capacity: int  # tokens one sequence may hold: seq_cache, or max_blocks * block_size
    num_blocks: int  # paged only (0 otherwise)
    block_size: int  # paged only (0 otherwise)
    cache_seqlens: Any
    block_table: Any
    causal: bool
    window: tuple[int, int]
    softcap: float
    alibi_slopes: Any  # validated (batch or 1, heads_q) float32, or None
    scale: float
    num_splits: int | None
    return_lse: bool
    num_threads: int | None
    like: Any  # the caller's q: results go back as its kind

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    def bshd(self, x: Any) -> Any:
        """A q / new k / v / contiguous-cache array as its (batch, seq, heads, d) view."""
        return x if self.layout == "bshd" else x.swapaxes(1, 2)


def check_call(q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, *, cache_seqlens: Any, block_table: Any,
               causal: object, window: object, softcap: object, alibi_slopes: Any, scale: object,
               num_splits: object, return_lse: object, layout: object, num_threads: object) -> CacheCall:
    """Every check of a call that needs no device value (see :func:`check_values` for the rest)."""
    from ._checks import check_scale
    from ._validate import check_alibi, check_causal, check_layout, check_softcap, check_window

    return_lse = check_bool("return_lse", return_lse)
    layout = check_layout(layout)
    causal_, _ = check_causal(causal)
    splits = check_positive_int("num_splits", num_splits)
    threads = check_positive_int("num_threads", num_threads)
    window_ = check_window(window)
    softcap_ = check_softcap(softcap)
    scale_ = check_scale(scale)
    like = q
    q, k_cache, v_cache = input_array("q", q), input_array("k_cache", k_cache), input_array("v_cache", v_cache)
    new = k is not None or v is not None
    if new and (k is None or v is None):
        raise ValueError("pass both k and v to append, or neither")
    if new:
        k, v = input_array("k", k), input_array("v", v)
    for name, arr in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), *((("k", k), ("v", v)) if new else ())):
        if not hasattr(arr, "shape") or len(arr.shape) != 4:
            raise ValueError(f"{name} must be 4-D; got shape {tuple(getattr(arr, 'shape', ()))}")
    names = {dtype_name(x) for x in (q, k_cache, v_cache, *((k, v) if new else ()))}
    if len(names) != 1:
        raise TypeError(f"q, the caches and the new k / v must share one dtype; got {sorted(names)}")
    dtype = names.pop()
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"q and the caches must be float16, bfloat16, float32 or float64; got {dtype}")
    on_gpu = [is_gpu_array(x) for x in (q, k_cache, v_cache, *((k, v) if new else ()))]
    if any(on_gpu) and not all(on_gpu):
        raise ValueError("q, the caches and the new k / v must all live on the same device")
    q_bshd = q if layout == "bshd" else q.swapaxes(1, 2)
    batch, seq_q, heads_q, d = (int(s) for s in q_bshd.shape)
    paged = block_table is not None
    if tuple(k_cache.shape[:-1]) != tuple(v_cache.shape[:-1]):
        raise ValueError(f"k_cache and v_cache must agree but for head_dim; got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    num_blocks = block_size = 0
    if paged:
        num_blocks, block_size, heads_kv = (int(s) for s in k_cache.shape[:3])
        table_shape = _check_table(block_table, batch, all(on_gpu))
        capacity = table_shape[1] * block_size
        if block_size < 1:
            raise ValueError(f"the paged cache's block_size must be >= 1, got {block_size}")
    else:
        kc_bshd = k_cache if layout == "bshd" else k_cache.swapaxes(1, 2)
        if int(kc_bshd.shape[0]) != batch:
            raise ValueError(f"k_cache's batch ({kc_bshd.shape[0]}) differs from q's ({batch}); shapes q "
                             f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
        capacity, heads_kv = int(kc_bshd.shape[1]), int(kc_bshd.shape[2])
    if int(k_cache.shape[-1]) != d:
        raise ValueError(f"q and k_cache must share head_dim; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if d < 1 or int(v_cache.shape[-1]) < 1:
        raise ValueError(f"head_dim must be >= 1; got q {tuple(q.shape)}, v_cache {tuple(v_cache.shape)}")
    if heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(f"q's heads ({heads_q}) must be a multiple of the cache's heads ({heads_kv})")
    seq_new = 0
    if new:
        for name, arr, dd in (("k", k, d), ("v", v, int(v_cache.shape[-1]))):
            arr_bshd = arr if layout == "bshd" else arr.swapaxes(1, 2)
            want = (batch, arr_bshd.shape[1], heads_kv, dd)
            if tuple(int(s) for s in arr_bshd.shape) != want or (name == "v" and arr_bshd.shape[1] != seq_new):
                raise ValueError(f"{name} must be (batch, seq_new, heads_kv, head_dim) = {want} in the cache's "
                                 f"layout (v as k); got {tuple(arr.shape)}")
            seq_new = int(arr_bshd.shape[1])
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0; got {cache_seqlens}")
        cache_seqlens = int(cache_seqlens)
    else:
        cache_seqlens = input_array("cache_seqlens", cache_seqlens)
        from ._validate import _INT_DTYPES

        if dtype_name(cache_seqlens) not in _INT_DTYPES:
            raise TypeError(f"cache_seqlens must be an int or hold integers, got dtype {dtype_name(cache_seqlens)}")
        if tuple(cache_seqlens.shape) != (batch,):
            raise ValueError(f"cache_seqlens must be an int or have shape (batch,) = ({batch},); got "
                             f"{tuple(cache_seqlens.shape)}")
        if is_gpu_array(cache_seqlens) != all(on_gpu) and is_gpu_array(cache_seqlens):
            raise ValueError("cache_seqlens is a GPU array but q and the caches are on the host")
    slopes = check_alibi(alibi_slopes, batch, heads_q, q)
    return CacheCall(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k if new else None, v=v if new else None, layout=layout,
        dtype=dtype, on_gpu=all(on_gpu), batch=batch, seq_q=seq_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=d,
        head_dim_v=int(v_cache.shape[-1]), seq_new=seq_new, paged=paged, capacity=capacity, num_blocks=num_blocks,
        block_size=block_size, cache_seqlens=cache_seqlens, block_table=block_table if paged else None,
        causal=causal_, window=window_, softcap=softcap_, alibi_slopes=slopes,
        scale=scale_ if scale_ is not None else 1.0 / float(np.sqrt(d)), num_splits=splits, return_lse=return_lse,
        num_threads=threads, like=like,
    )


def host_values(call: CacheCall) -> tuple[np.ndarray, np.ndarray | None]:
    """cache_seqlens as (batch,) int64 and block_table as int64 on the host (a device array is copied: a sync)."""
    if isinstance(call.cache_seqlens, int):
        lens = np.full(call.batch, call.cache_seqlens, np.int64)
    else:
        lens = to_host(call.cache_seqlens)
        if lens.dtype == np.uint64 and lens.size and lens.max() > np.iinfo(np.int64).max:
            raise ValueError(f"cache_seqlens holds a value beyond int64: {lens.max()}")
        lens = lens.astype(np.int64)
    table = None
    if call.paged:
        table = to_host(input_array("block_table", call.block_table))
        if table.dtype == np.uint64 and table.size and table.max() > np.iinfo(np.int64).max:
            raise ValueError(f"block_table holds a value beyond int64: {table.max()}")
        table = table.astype(np.int64)
    return lens, table


#: tokens one sequence may hold: the kernels count them in 32-bit integers
_MAX_TOKENS = 2**31 - 1


def check_values(call: CacheCall, lens: np.ndarray, table: np.ndarray | None) -> None:
    """The checks on cache_seqlens' and block_table's values (run before any write to the cache)."""
    if call.k is not None:
        for name in ("k_cache", "v_cache"):
            arr = getattr(call, name)
            if isinstance(arr, np.ndarray) and not arr.flags.writeable:
                raise ValueError(f"{name} is read-only; appending k / v writes the new tokens into it")
    if (lens < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0; got {lens.min()} at index {int(lens.argmin())}")
    total = lens + call.seq_new
    if (total > call.capacity).any():
        b = int(np.argmax(total > call.capacity))
        raise ValueError(f"sequence {b} would hold {int(total[b])} tokens (cache_seqlens {int(lens[b])} + "
                         f"{call.seq_new} new) but the cache holds {call.capacity}"
                         + (" (blocks of block_table x block_size)" if call.paged else ""))
    if (total > _MAX_TOKENS).any():
        b = int(np.argmax(total > _MAX_TOKENS))
        raise ValueError(f"sequence {b} would hold {int(total[b])} tokens (cache_seqlens {int(lens[b])} + "
                         f"{call.seq_new} new); the kernels take at most 2**31 - 1 tokens per sequence")
    if table is not None:
        needed = -(-total // call.block_size)
        used = np.arange(table.shape[1])[None, :] < needed[:, None]
        bad = used & ((table < 0) | (table >= call.num_blocks))
        if bad.any():
            b, j = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a block of the cache "
                             f"(0 .. {call.num_blocks - 1})")


#: calls already checked, by _repeat_key: (the checked CacheCall, its backend).  A decode loop calls with
#: the same shapes over and over; its later calls skip check_call (their arrays are swapped in).
_SEEN: dict[tuple, tuple[CacheCall, Any]] = {}


def _meta(x: Any, torch_tensor: type | None, cupy_array: type | None) -> tuple | None:
    """(shape, dtype, device) of a NumPy array, a GPU torch tensor or a CuPy array (each needs no conversion),
    else None."""
    t = type(x)
    if t is np.ndarray:
        return (x.shape, x.dtype, "host")
    if t is torch_tensor:
        if x.requires_grad or not x.is_cuda:
            return None
        return (x.shape, x.dtype, x.device)
    if t is cupy_array:
        return (x.shape, x.dtype, x.data.device_id)
    return None


def _repeat_key(q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: Any, table: Any, slopes: Any,
                options: tuple) -> tuple | None:
    """What check_call's verdict depends on, for NumPy, GPU torch and CuPy arrays (None: not such a call;
    checked in full).  An int cache_seqlens enters by its sign only (its value changes every step)."""
    if slopes is not None:
        return None
    torch = sys.modules.get("torch")
    cupy = sys.modules.get("cupy")
    tt = torch.Tensor if torch is not None else None
    ct = cupy.ndarray if cupy is not None else None
    metas = []
    for x in (q, k_cache, v_cache):
        m = _meta(x, tt, ct)
        if m is None:
            return None
        metas.append(m)
    for x in (k, v, table):
        if x is None:
            metas.append(None)
            continue
        m = _meta(x, tt, ct)
        if m is None:
            return None
        metas.append(m)
    if type(lens) is int:
        if lens < 0:
            return None
        metas.append(int)
    else:
        m = _meta(lens, tt, ct)
        if m is None:
            return None
        metas.append(m)
    key = (type(q), *metas, *((type(o), o) for o in options))  # typed: True and 1 are checked apart
    try:
        hash(key)
    except TypeError:  # e.g. window as a list
        return None
    return key


#: the repeat path: torch calls by _fast_key -> the backend's repeat state (``run``), or None where the
#: backend has none (such calls take the memo path above)
_FAST: dict[tuple, Any] = {}


def _fast_key(q: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: Any, table: Any, options: tuple,
              tensor: type) -> tuple | None:
    """Everything check_call and the launch plan read of a call of plain torch CUDA tensors that need no
    grad: each array's shape, strides, dtype and device, and the options; None for any other call.  An int
    cache_seqlens enters as ``int`` (its value is checked on every call)."""
    if q.requires_grad or type(k_cache) is not tensor or type(v_cache) is not tensor or \
            k_cache.requires_grad or v_cache.requires_grad:
        return None
    dev = q.get_device()
    if dev < 0:
        return None
    key = [q.shape, q.stride(), q.dtype, dev, k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.get_device(),
           v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.get_device()]
    for x in (k, v, table) if k is not None or table is not None else ():
        if x is None:
            key.append(None)
            continue
        if type(x) is not tensor or x.requires_grad:
            return None
        key += (x.shape, x.stride(), x.dtype, x.get_device())
    if type(lens) is int:
        key.append(int)
    else:
        if type(lens) is not tensor or lens.requires_grad:
            return None
        key += (lens.shape, lens.stride(), lens.dtype, lens.get_device())
    key += (options, tuple(map(type, options)))  # typed: True and 1 are checked apart
    return tuple(key)


def _torch_cpu_views(tensor: type, arrays: tuple) -> tuple | None:
    """q, the caches, k, v, cache_seqlens and block_table with every CPU torch tensor as its zero-copy NumPy
    view (``input_array``'s), or None where one is anything else (a tensor that requires grad, on another
    device, of another type): such calls take the full path, which names what it refuses."""
    out = []
    for x in arrays:
        if x is None or type(x) is int or type(x) is np.ndarray:
            out.append(x)
        elif type(x) is tensor and x.is_cpu and not x.requires_grad:
            out.append(torch_cpu_to_numpy(x))
        else:
            return None
    return tuple(out)


def _host_key(q: np.ndarray, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: Any, table: Any,
              options: tuple) -> tuple | None:
    """``_fast_key`` for NumPy arrays: every array's shape, byte strides and dtype, the caches' writeability
    when appending, and the options; None for any other call."""
    nd = np.ndarray
    if type(k_cache) is not nd or type(v_cache) is not nd:
        return None
    key = ["host", q.shape, q.strides, q.dtype, k_cache.shape, k_cache.strides, k_cache.dtype,
           v_cache.shape, v_cache.strides, v_cache.dtype]
    if k is not None or table is not None:
        for x in (k, v, table):
            if x is None:
                key.append(None)
                continue
            if type(x) is not nd:
                return None
            key += (x.shape, x.strides, x.dtype)
        if k is not None:
            key += (k_cache.flags.writeable, v_cache.flags.writeable)
    if type(lens) is int:
        key.append(int)
    elif type(lens) is nd:
        key += (lens.shape, lens.strides, lens.dtype)
    else:
        return None
    key += (options, tuple(map(type, options)))  # typed: True and 1 are checked apart
    return tuple(key)


def flash_attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    *,
    cache_seqlens: Any,
    block_table: Any = None,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    layout: str = "bshd",
    backend: str = "auto",
    num_threads: int | None = None,
) -> Any:
    """Attention of q against a KV cache, appending the new k / v first (see the module docstring).

    Returns the output in q's shape and layout (v's head_dim), and with ``return_lse`` its lse
    (batch, heads_q, seq_q).  ``num_splits``: how many parts the key range is cut into and computed in
    parallel (merged by their log-sum-exps); None picks it from the shape and the machine; the result
    equals num_splits=1's to rounding.
    """
    options = (causal, window, softcap, scale, num_splits, return_lse, layout, backend, num_threads)
    torch = sys.modules.get("torch")
    fast = None
    if type(q) is np.ndarray:
        if alibi_slopes is None:
            fast = _host_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, options)
    elif torch is not None and type(q) is torch.Tensor and alibi_slopes is None:
        if q.is_cpu:  # the NumPy call on zero-copy views (its repeats take the short way too)
            host = _torch_cpu_views(torch.Tensor, (q, k_cache, v_cache, k, v, cache_seqlens, block_table))
            if host is not None:
                res = flash_attention_with_kvcache(
                    *host[:5], cache_seqlens=host[5], block_table=host[6], causal=causal, window=window,
                    softcap=softcap, scale=scale, num_splits=num_splits, return_lse=return_lse, layout=layout,
                    backend=backend, num_threads=num_threads)
                if return_lse:
                    return like_input(res[0], q), like_input(res[1], q)
                return like_input(res, q)
        else:
            fast = _fast_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, options, torch.Tensor)
    if fast is not None:
        try:
            repeat = _FAST.get(fast)
        except TypeError:  # an unhashable option (a window given as a list)
            repeat = fast = None
        if repeat is not None:
            res = repeat.run(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
            if res is not None:
                return res if return_lse else res[0]
    from . import backends

    key = _repeat_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, options)
    seen = _SEEN.get(key) if key is not None else None
    if seen is not None:  # the same shapes, dtypes, devices and options as a call already checked
        call = object.__new__(CacheCall)
        call.__dict__.update(seen[0].__dict__)
        call.q, call.k_cache, call.v_cache, call.k, call.v, call.like = q, k_cache, v_cache, k, v, q
        call.cache_seqlens, call.block_table = cache_seqlens, block_table
        engine = seen[1]
    else:
        call = check_call(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                          causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, scale=scale,
                          num_splits=num_splits, return_lse=return_lse, layout=layout, num_threads=num_threads)
        engine = backends.resolve(backend, call.q, call.k_cache, call.v_cache)
        if key is not None:  # remembered without the arrays (the cache must not outlive its caller's use)
            if len(_SEEN) >= 64:
                _SEEN.clear()
            kept = object.__new__(CacheCall)
            kept.__dict__.update(call.__dict__)
            kept.q = kept.k_cache = kept.v_cache = kept.k = kept.v = kept.like = None
            kept.cache_seqlens = kept.block_table = None
            _SEEN[key] = (kept, engine)
    runner = getattr(engine, "kvcache", None)
    if runner is not None:
        out, lse = runner(call)  # the backend reads (and checks) the values, appends, attends
        if fast is not None and fast not in _FAST:  # the call passed every check: its repeats go the short way
            entry = getattr(engine, "kvcache_repeat", None)
            if len(_FAST) >= 64:
                _FAST.clear()
            _FAST[fast] = entry(call) if entry is not None else None
    else:
        out, lse = _gathered(call, engine.NAME)
    return (out, lse) if call.return_lse else out


def _gathered(call: CacheCall, backend: str) -> tuple[Any, Any]:
    """Any backend through ``flash_attention``: append, gather a paged cache into a contiguous one, attend
    to each sequence's ``cache_seqlens + seq_new`` keys with bottom-right alignment."""
    from ._api import _run

    lens, table = host_values(call)
    check_values(call, lens, table)
    # every check passed: append, then attend
    if call.k is not None:
        append(call, lens, table)
    total = lens + call.seq_new
    xp = _xp(call.q)
    if call.paged:
        kc, vc = _gather(xp, call.k_cache, table, total), _gather(xp, call.v_cache, table, total)
        if call.layout != "bshd":  # the gathered cache is (batch, seq, heads, d): match q's layout
            kc, vc = kc.swapaxes(1, 2), vc.swapaxes(1, 2)
    else:
        kc, vc = call.k_cache, call.v_cache
    lens_kv = xp.asarray(total.astype(np.int32)) if xp is not np else total.astype(np.int32)
    slopes = call.alibi_slopes
    if slopes is not None and slopes.shape[0] == 1:  # validated as (1, heads): flash_attention takes (heads,)
        slopes = slopes[0]
    res = _run(
        call.like, kc, vc,
        dict(causal="bottom_right" if call.causal else False, window=call.window, softcap=call.softcap,
             alibi_slopes=slopes, seqlens_kv=lens_kv, layout=call.layout, scale=call.scale,
             dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=call.num_threads,
             align_bottom_right=True),
        backend, count_flops=False,
    )
    return res.output, res.logsumexp


def _check_table(block_table: Any, batch: int, on_gpu: bool) -> tuple[int, int]:
    from ._validate import _INT_DTYPES

    table = input_array("block_table", block_table)
    if dtype_name(table) not in _INT_DTYPES:
        raise TypeError(f"block_table must hold integers, got dtype {dtype_name(table)}")
    if len(table.shape) != 2 or int(table.shape[0]) != batch:
        raise ValueError(f"block_table must be (batch, max_blocks) with batch = {batch}; got {tuple(table.shape)}")
    if is_gpu_array(table) and not on_gpu:
        raise ValueError("block_table is a GPU array but q and the caches are on the host")
    return int(table.shape[0]), int(table.shape[1])


def append(call: CacheCall, lens: np.ndarray, table: np.ndarray | None) -> None:
    """Writes the new tokens into the cache at each sequence's length (in place; values checked)."""
    append_arrays(call, call.k_cache, call.v_cache, call.k, call.v, lens, table)


def append_arrays(call: CacheCall, k_cache: Any, v_cache: Any, k: Any, v: Any, lens: np.ndarray | int,
                  table: np.ndarray | None) -> None:
    """``append`` on the arrays given (a repeat of a checked call); an int ``lens``: every sequence's."""
    for cache, new in ((k_cache, k), (v_cache, v)):
        new_bshd = call.bshd(new)
        if table is None:
            cache_bshd = call.bshd(cache)
            if type(lens) is int:
                cache_bshd[:, lens:lens + call.seq_new] = new_bshd
                continue
            for b in range(call.batch):
                cache_bshd[b, lens[b]:lens[b] + call.seq_new] = new_bshd[b]
            continue
        bs = call.block_size
        for b in range(call.batch):
            j0 = lens if type(lens) is int else int(lens[b])
            j1 = j0 + call.seq_new
            start = j0
            while start < j1:
                stop = min(j1, (start // bs + 1) * bs)  # the run of new tokens inside one block
                cache[table[b, start // bs], start % bs:start % bs + stop - start] = new_bshd[b, start - j0:stop - j0]
                start = stop


def _gather(xp: Any, cache: Any, table: np.ndarray, total: np.ndarray) -> Any:
    """The paged cache's tokens as a (batch, max_len, heads_kv, d) array (rows past a length are zeros)."""
    batch, block_size = table.shape[0], cache.shape[1]
    longest = int(total.max(initial=0))
    out = xp.zeros((batch, max(longest, 1), *cache.shape[2:]), dtype=cache.dtype)
    for b in range(batch):
        n = int(total[b])
        blocks = -(-n // block_size)
        if blocks:
            rows = cache[xp.asarray(table[b, :blocks])].reshape(blocks * block_size, *cache.shape[2:])
            out[b, :n] = rows[:n]
    return out[:, :longest] if longest else out[:, :0]
