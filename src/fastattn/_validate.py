"""One place that turns user arrays into plain facts (an :class:`AttentionSpec`) or a clear error.

The facade validates once; backends trust the spec and never re-check.  Every check runs before any
work: shapes, dtypes, values (of masks, slopes, sequence lengths), then the spec is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
from typing import Any

import numpy as np

from ._checks import check_dropout, check_positive_int, check_scale, check_seed
from ._masks import CAUSAL_SPELLINGS, MaskRule
from ._masks import attended_pairs as _rule_pairs

#: dtype name -> computed in
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: q/k/v layouts: (batch, heads, seq, head_dim) or FlashAttention's (batch, seq, heads, head_dim)
LAYOUTS = ("bhsd", "bshd")
_FLOAT_MASK_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class MaskArrays:
    """The arrays of a call's mask, validated, in the namespace of q (NumPy or CuPy).

    ``alibi_slopes``: (batch or 1, heads) float32.  ``attn_mask``: a (batch, heads, seq_q, seq_kv)
    view (zero strides where the caller's mask broadcasts; never expanded).  ``seqlens_q`` /
    ``seqlens_kv``: (batch,) int32 (padded batches).  ``cu_seqlens_q`` / ``cu_seqlens_kv``:
    (batch + 1,) int32 (packed batches).  ``lens_q`` / ``lens_kv``: host copies of every entry's
    lengths (int64), whatever the form.
    """

    alibi_slopes: Any = None
    attn_mask: Any = None
    seqlens_q: Any = None
    seqlens_kv: Any = None
    cu_seqlens_q: Any = None
    cu_seqlens_kv: Any = None
    lens_q: np.ndarray | None = None
    lens_kv: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Validated facts about one attention call; every backend's ``forward`` takes one.

    Shapes are those of the (batch, heads, seq, head_dim) views the backends get: q
    (batch, heads, seq_q, head_dim), k (batch, heads_kv, seq_kv, head_dim), v
    (batch, heads_kv, seq_kv, head_dim_v).  A packed (varlen) call has ``ragged == "packed"``:
    then the views hold one batch entry of ``total`` rows, ``batch`` is the number of sequences,
    ``seq_q`` / ``seq_kv`` their longest lengths, and the cu_seqlens arrays say where each starts.
    """

    batch: int
    heads: int  # query heads
    seq_q: int
    seq_kv: int
    head_dim: int  # of q and k
    dtype: np.dtype  # the common input dtype (output dtype too)
    causal: bool
    scale: float
    dropout_p: float
    seed: int | None  # set whenever dropout_p > 0
    block_q: int | None
    block_kv: int | None
    num_threads: int | None
    q_shape: tuple[int, ...]  # the caller's q shape
    heads_kv: int = 0  # 0: as heads
    head_dim_v: int = 0  # 0: as head_dim
    layout: str = "bhsd"
    rule: MaskRule = MaskRule()
    ragged: str = "none"  # "none", "padded" (seqlens) or "packed" (cu_seqlens)
    out_shape: tuple[int, ...] = ()  # the caller's output shape
    lse_shape: tuple[int, ...] = ()
    arrays: MaskArrays = dataclasses.field(default_factory=MaskArrays, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not self.heads_kv:
            set_(self, "heads_kv", self.heads)
        if not self.head_dim_v:
            set_(self, "head_dim_v", self.head_dim)
        if self.causal and not self.rule.causal:
            set_(self, "rule", dataclasses.replace(self.rule, causal=True))
        if not self.out_shape:
            set_(self, "out_shape", (*self.q_shape[:-1], self.head_dim_v))
        if not self.lse_shape:
            set_(self, "lse_shape", tuple(self.q_shape[:-1]))

    @property
    def group(self) -> int:
        """Query heads per k/v head (GQA / MQA: query head h reads k/v head h // group)."""
        return self.heads // self.heads_kv if self.heads_kv else 1

    @property
    def lse_dtype(self) -> np.dtype:
        return np.dtype(np.float64) if self.dtype == np.float64 else np.dtype(np.float32)

    @property
    def is_plain(self) -> bool:
        """No feature beyond the textbook call (one k/v head per q head, top-left causal or none)."""
        return (self.heads_kv == self.heads and self.head_dim_v == self.head_dim and self.ragged == "none"
                and self.rule == MaskRule(causal=self.causal))

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs inside the mask, summed over batch entries, per query head (the interval
        part; a boolean mask is counted by :func:`mask_pairs`)."""
        if self.arrays.lens_q is None:   # every entry seq_q x seq_kv
            return self.batch * _rule_pairs(self.rule, self.seq_q, self.seq_kv)
        lens_q, lens_kv = self.lengths()
        # once per distinct (lq, lk): a batch of equal lengths costs one count
        pairs, counts = np.unique(np.stack([lens_q, lens_kv], axis=1), axis=0, return_counts=True)
        return int(sum(int(n) * _rule_pairs(self.rule, int(a), int(b))
                       for (a, b), n in zip(pairs, counts, strict=True)))

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(lens_q, lens_kv): every batch entry's query and key lengths (host int64)."""
        if self.arrays.lens_q is not None:
            return self.arrays.lens_q, self.arrays.lens_kv
        return np.full(self.batch, self.seq_q, np.int64), np.full(self.batch, self.seq_kv, np.int64)

    @functools.cached_property
    def flops(self) -> int:
        """2·(head_dim + head_dim_v) per attended pair: Q·Kᵀ and P·V (counted once per spec)."""
        pairs = mask_pairs(self) if self.rule.mask == "bool" else self.attended_pairs * self.heads
        return 2 * (self.head_dim + self.head_dim_v) * pairs


def attended_pairs(seq_q: int, seq_kv: int, causal: bool) -> int:
    """Pairs (i, j) with j < seq_kv and, if causal (top-left aligned), j <= i."""
    return _rule_pairs(MaskRule(causal=causal), seq_q, seq_kv)


def mask_pairs(spec: AttentionSpec) -> int:
    """Visible pairs over every (batch, query head) with a boolean mask: counted on the mask itself,
    once per distinct slice (a broadcast axis of the mask is counted once).  A mask that does not
    vary along the queries is counted row by row through its prefix sums (O(seq_kv) a slice)."""
    from ._masks import allowed_and_bias

    mask = spec.arrays.attn_mask
    xp = np
    if is_gpu_array(mask):
        import cupy as xp  # type: ignore[no-redef]
    lens_q, lens_kv = spec.lengths()
    counts: dict[tuple[int, int, int, int], int] = {}
    total = 0
    for b in range(spec.batch):
        lq, lk = int(lens_q[b]), int(lens_kv[b])
        if lq == 0 or lk == 0:
            continue
        for h in range(spec.heads):
            key = (b if mask.strides[0] else 0, h if mask.strides[1] else 0, lq, lk)
            if key not in counts:
                if mask.strides[2] == 0:
                    row = xp.asarray(mask[b, h, 0, :lk])
                    prefix = np.concatenate([[0], np.cumsum(to_host(row).astype(np.int64))])
                    lo, hi = spec.rule.key_range(np.arange(lq), lq, lk)
                    counts[key] = int((prefix[hi] - prefix[lo]).sum())
                elif not spec.rule.has_interval:
                    counts[key] = int(xp.count_nonzero(mask[b, h, :lq, :lk]))
                else:
                    interval, _ = allowed_and_bias(spec.rule, lq, lk)
                    counts[key] = int(xp.count_nonzero(mask[b, h, :lq, :lk] & xp.asarray(interval)))
            total += counts[key]
    return total


def is_gpu_array(x: Any) -> bool:
    """True for CuPy arrays and any object that says it lives in CUDA memory.

    Never imports CuPy: a CuPy array can only exist if CuPy was already imported.
    """
    if type(x) is np.ndarray:  # the common case, answered without the protocol calls below
        return False
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):  # without building __cuda_array_interface__
        return bool(x.is_cuda)
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:  # noqa: BLE001 - a broken protocol means "not a GPU array"
            return False
    return False


def dtype_name(arr: Any) -> str:
    """The dtype's name, also for arrays whose dtype is not NumPy's (e.g. ``torch.float16``)."""
    dtype = getattr(arr, "dtype", None)
    name = _DTYPE_NAMES.get(dtype) if isinstance(dtype, np.dtype) else None
    if name is not None:
        return name
    try:
        name = np.dtype(dtype).name
    except TypeError:
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, np.dtype) and len(_DTYPE_NAMES) < 256:
        _DTYPE_NAMES[dtype] = name
    return name


_DTYPE_NAMES: dict[np.dtype, str] = {}  # numpy computes dtype.name in Python: remembered per dtype


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str ('bhsd' or 'bshd'), got {layout!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhsd' (batch, heads, seq, head_dim) or 'bshd' "
                         f"(batch, seq, heads, head_dim); got {layout!r}")
    return layout


def _axes(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, int, int]:
    """(batch, heads, seq, head_dim) of an input shape of rank 2, 3 or 4 in ``layout``."""
    if len(shape) == 2:
        return 1, 1, shape[0], shape[1], 2
    if len(shape) == 3:
        h, s = (shape[0], shape[1]) if layout == "bhsd" else (shape[1], shape[0])
        return 1, h, s, shape[2], 3
    b, h, s = (shape[0], shape[1], shape[2]) if layout == "bhsd" else (shape[0], shape[2], shape[1])
    return b, h, s, shape[3], 4


def check_arrays(q: Any, k: Any, v: Any, layout: str = "bhsd", *, packed: bool = False) -> np.dtype:
    """Checks ranks, dtypes and shapes of q, k, v; returns the common dtype.

    k and v may have fewer heads than q (a divisor of q's: GQA / MQA); v's head_dim may differ.
    """
    names = {}
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        names[name] = dtype_name(arr)  # once per array: numpy's dtype.name is not free
        if packed and len(arr.shape) != 3:
            raise ValueError(f"packed (varlen) {name} must be 3-D (total_tokens, heads, head_dim); got {name} "
                             f"with shape {tuple(arr.shape)}")
        if len(arr.shape) not in (2, 3, 4):
            want = ("(batch, heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, heads, head_dim)")
            raise ValueError(
                f"{name} must be 2-D (seq, head_dim), 3-D or 4-D {want}; got {name} with shape "
                f"{tuple(arr.shape)} dtype {names[name]}"
            )
        if names[name] not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {names[name]}; supported: {', '.join(SUPPORTED_DTYPES)}")
    if len(set(names.values())) != 1:
        raise TypeError(
            f"q, k and v must share one dtype; got q {names['q']}, k {names['k']}, v {names['v']}"
        )
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (len(q.shape) == len(k.shape) == len(v.shape)):
        raise ValueError(f"q, k and v must have the same number of dimensions; got {shapes}")
    lay = "bshd" if packed else layout
    qb, qh, _, qd, _ = _axes(tuple(q.shape), lay)
    kb, kh, ks, kd, _ = _axes(tuple(k.shape), lay)
    vb, vh, vs, vd, _ = _axes(tuple(v.shape), lay)
    if qd != kd:
        raise ValueError(f"q and k must share head_dim (last axis); got {shapes}")
    if qd < 1 or vd < 1:
        raise ValueError(f"head_dim must be at least 1; got {shapes}")
    if not (qb == kb == vb):
        raise ValueError(f"q, k and v must share the batch axis; got {shapes}")
    if kh != vh:
        raise ValueError(f"k and v must have the same number of heads; got {shapes}")
    if (kh == 0 and qh != 0) or (kh > 0 and qh % kh != 0):
        raise ValueError(
            f"q's heads ({qh}) must be a multiple of k/v's heads ({kh}) (grouped-query attention); got {shapes}"
        )
    if ks != vs:
        raise ValueError(f"k and v must have the same sequence length; got {shapes}")
    return numpy_dtype(names["q"])


def as_4d(arr: Any, layout: str = "bhsd") -> Any:
    """A (batch, heads, seq, head_dim) view of a 2-D, 3-D or 4-D array in ``layout`` (never a copy)."""
    if layout == "bshd" and len(arr.shape) >= 3:
        arr = arr.swapaxes(-2, -3)
    while len(arr.shape) < 4:
        arr = arr[None]
    return arr


def packed_4d(arr: Any) -> Any:
    """The (1, heads, total, head_dim) view of a packed (total, heads, head_dim) array."""
    return arr.swapaxes(0, 1)[None]


def check_causal(causal: object) -> tuple[bool, bool]:
    """(causal, bottom_right) from False / True / "top_left" / "bottom_right"."""
    if isinstance(causal, np.bool_):
        causal = bool(causal)
    if isinstance(causal, (bool, str)) and causal in CAUSAL_SPELLINGS:
        kind = CAUSAL_SPELLINGS[causal]
        return kind != "none", kind == "bottom_right"
    if isinstance(causal, (bool, str)):
        raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}")
    raise TypeError(f"causal must be a bool or 'top_left' / 'bottom_right', got {causal!r}")


def check_window(window: object) -> tuple[int, int]:
    """(left, right): non-negative sizes, or -1 for unbounded (FlashAttention-2's window_size)."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of ints (-1: unbounded), got {window!r}")
    out = []
    for side, value in zip(("left", "right"), window, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window {side} must be an int (-1: unbounded), got {value!r}")
        if value < -1:
            raise ValueError(f"window {side} must be >= 0, or -1 for unbounded; got {value!r}")
        out.append(int(value))
    return out[0], out[1]


def check_softcap(softcap: object) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0: off), got {softcap!r}")
    value = float(softcap)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"softcap must be 0 (off) or a finite positive number, got {softcap!r}")
    return value


_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _host_ints(name: str, arr: Any) -> np.ndarray:
    """A 1-D integer array's values on the host as int64 (a device array is copied: a small sync)."""
    from ._arrays import input_array

    arr = input_array(name, arr)
    if dtype_name(arr) not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integers, got dtype {dtype_name(arr)}")
    if len(arr.shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    values = to_host(arr)
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds a value beyond int64: {values.max()}")
    return values.astype(np.int64)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a GPU array (CuPy, torch CUDA), or the host array itself."""
    if is_gpu_array(x):
        import cupy

        return cupy.asnumpy(cupy.asarray(x))
    return np.asarray(x)


def _gpu_device_id(x: Any) -> int:
    dev = getattr(x, "device", None)
    if hasattr(dev, "id"):  # CuPy
        return int(dev.id)
    if getattr(dev, "index", None) is not None:  # torch
        return int(dev.index)
    import cupy

    return int(cupy.cuda.runtime.getDevice())


def _like(values: np.ndarray, q: Any, dtype: Any) -> Any:
    """``values`` as a contiguous array of ``dtype`` in q's namespace (CuPy on q's device for GPU q)."""
    if is_gpu_array(q):
        import cupy

        with cupy.cuda.Device(_gpu_device_id(q)):
            return cupy.ascontiguousarray(cupy.asarray(values, dtype=dtype))
    return np.ascontiguousarray(values, dtype=dtype)


def check_seqlens(name: str, arr: Any, batch: int, padded: int) -> np.ndarray:
    values = _host_ints(name, arr)
    if values.shape != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(values.shape)}")
    if (values < 0).any():
        raise ValueError(f"{name} must be >= 0; got {values.min()} at index {int(values.argmin())}")
    if (values > padded).any():
        raise ValueError(f"{name} must be <= the padded length {padded}; got {values.max()} at index "
                         f"{int(values.argmax())}")
    return values


def check_cu_seqlens(name: str, arr: Any, total: int) -> np.ndarray:
    values = _host_ints(name, arr)
    if values.size < 2:
        raise ValueError(f"{name} must hold batch + 1 >= 2 offsets, got shape {tuple(values.shape)}")
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    steps = np.diff(values)
    if (steps < 0).any():
        at = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{at + 1}] = {values[at + 1]} < "
                         f"{name}[{at}] = {values[at]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {values[-1]}")
    return values


def check_alibi(slopes: Any, batch: int, heads: int, q: Any) -> Any:
    """(batch or 1, heads) float32 slopes, in q's namespace."""
    from ._arrays import input_array

    if slopes is None:
        return None
    slopes = input_array("alibi_slopes", slopes)
    if is_gpu_array(slopes) != is_gpu_array(q):
        raise ValueError("alibi_slopes must live on the same device as q")
    name = dtype_name(slopes)
    if name != "float32":
        raise TypeError(f"alibi_slopes must be float32, got dtype {name}")
    shape = tuple(slopes.shape)
    if shape not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (heads,) = ({heads},) or (batch, heads) = "
                         f"({batch}, {heads}); got {shape}")
    if is_gpu_array(slopes) and gpu_stream_capturing(q):
        # a CUDA graph is being captured: no host read (it would end the capture), the device array as is
        return slopes.reshape(-1, heads)
    host = to_host(slopes)
    if not np.isfinite(host).all():
        raise ValueError("alibi_slopes must be finite")
    return _like(host.reshape(-1, heads), q, np.float32)


def gpu_stream_capturing(x: Any) -> bool:
    """Is the current stream of x's framework (torch for torch tensors, else CuPy) capturing a CUDA graph?
    Imports nothing that is not loaded yet and synchronizes nothing."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    cupy = sys.modules.get("cupy")
    if cupy is None or not is_gpu_array(x):
        return False
    try:
        return bool(cupy.cuda.get_current_stream().is_capturing())
    except Exception:  # noqa: BLE001 - the legacy null stream never captures
        return False


def check_attn_mask(mask: Any, full: tuple[int, int, int, int], q: Any) -> tuple[Any, str]:
    """The mask as a (batch, heads, seq_q, seq_kv) view (broadcast, never expanded) and its kind."""
    from ._arrays import input_array

    mask = input_array("attn_mask", mask)
    if is_gpu_array(mask) != is_gpu_array(q):
        raise ValueError("attn_mask must live on the same device as q")
    name = dtype_name(mask)
    if name == "bool":
        kind = "bool"
    elif name in _FLOAT_MASK_DTYPES:
        kind = "bias"
    else:
        raise TypeError(f"attn_mask must be bool (True = may attend) or a float additive bias; got dtype {name}")
    shape = tuple(mask.shape)
    if len(shape) > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {shape}")
    padded = (1,) * (4 - len(shape)) + shape
    if any(m not in (1, f) for m, f in zip(padded, full, strict=True)):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (batch, heads, seq_q, seq_kv) = {full}")
    mask = mask.reshape(padded)
    if not is_gpu_array(mask) and mask.dtype.byteorder not in ("=", "|"):
        mask = mask.astype(mask.dtype.newbyteorder("="))  # the caller's (small) mask, before broadcasting
    if is_gpu_array(mask):
        import cupy

        return cupy.broadcast_to(cupy.asarray(mask), full), kind
    return np.broadcast_to(mask, full), kind


#: option types whose values the spec memo below compares by value (and tuples of them: a window)
_MEMO_TYPES = frozenset((type(None), bool, int, float, str))
_MEMO_TYPES_OR_TUPLE = _MEMO_TYPES | {tuple}
_MEMO_SIZE = 256
_spec_memo: dict[tuple, AttentionSpec] = {}


def make_spec_memo(q: Any, k: Any, v: Any, **kwargs: Any) -> AttentionSpec:
    """:func:`make_spec`, remembered for calls that repeat one another: the spec depends on q, k and v
    only through their types, shapes and dtypes, and on the options by value.  Calls with an array
    option (a mask, slopes, lengths) or dropout without a seed (each call draws its own) are never
    remembered; nor is a call that fails its checks (it raises again, the same way, every time)."""
    values = tuple(kwargs.values())
    types = tuple(map(type, values))  # part of the key: True, 1 and 1.0 are different arguments here
    if not _MEMO_TYPES.issuperset(types):
        if not _MEMO_TYPES_OR_TUPLE.issuperset(types):
            return make_spec(q, k, v, **kwargs)
        inner = tuple(tuple(map(type, x)) if t is tuple else None for t, x in zip(types, values, strict=True))
        if not all(_MEMO_TYPES.issuperset(t) for t in inner if t is not None):
            return make_spec(q, k, v, **kwargs)
        types = (types, inner)
    if kwargs.get("dropout_p") not in (None, 0, 0.0) and kwargs.get("seed") is None:
        return make_spec(q, k, v, **kwargs)
    key = (type(q), q.shape, q.dtype, type(k), k.shape, k.dtype, type(v), v.shape, v.dtype,
           tuple(kwargs), values, types)
    spec = _spec_memo.get(key)
    if spec is None:
        spec = make_spec(q, k, v, **kwargs)
        if len(_spec_memo) >= _MEMO_SIZE:
            _spec_memo.clear()
        _spec_memo[key] = spec
    return spec


def make_spec(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: object,
    scale: object,
    dropout_p: object,
    seed: object,
    block_q: object,
    block_kv: object,
    num_threads: object,
    layout: object = "bhsd",
    window: object = None,
    softcap: object = 0.0,
    alibi_slopes: Any = None,
    attn_mask: Any = None,
    seqlens_q: Any = None,
    seqlens_kv: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_kv: Any = None,
    max_seqlen_q: object = None,
    max_seqlen_kv: object = None,
    align_bottom_right: bool = False,
) -> AttentionSpec:
    """Validates everything about one call and returns the spec (q, k, v themselves not kept).

    A packed call passes ``cu_seqlens_q`` / ``cu_seqlens_kv`` (both) with 3-D (total, heads, d) q/k/v.
    ``align_bottom_right`` aligns the mask bottom-right even without a causal mask (KV-cache calls).
    """
    causal_, bottom_right = check_causal(causal)
    bottom_right = bottom_right or bool(align_bottom_right)  # a KV cache aligns windows bottom-right too
    scale_ = check_scale(scale)
    dropout_ = check_dropout(dropout_p)
    seed_ = check_seed(seed)
    block_q_ = check_positive_int("block_size_q", block_q)
    block_kv_ = check_positive_int("block_size_kv", block_kv)
    threads_ = check_positive_int("num_threads", num_threads)
    layout_ = check_layout(layout)
    left, right = check_window(window)
    softcap_ = check_softcap(softcap)
    packed = cu_seqlens_q is not None or cu_seqlens_kv is not None
    if packed and (cu_seqlens_q is None or cu_seqlens_kv is None):
        raise ValueError("a packed call needs both cu_seqlens_q and cu_seqlens_kv")
    dtype = check_arrays(q, k, v, layout_, packed=packed)
    if packed:
        qh, kh = int(q.shape[1]), int(k.shape[1])
        cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, int(q.shape[0]))
        cu_kv = check_cu_seqlens("cu_seqlens_kv", cu_seqlens_kv, int(k.shape[0]))
        if cu_q.size != cu_kv.size:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_kv must have the same length (batch + 1); got "
                             f"{cu_q.size} and {cu_kv.size}")
        batch = cu_q.size - 1
        lens_q, lens_kv = np.diff(cu_q), np.diff(cu_kv)
        seq_q, seq_kv = int(lens_q.max(initial=0)), int(lens_kv.max(initial=0))
        for name, given, actual in (("max_seqlen_q", max_seqlen_q, seq_q), ("max_seqlen_kv", max_seqlen_kv, seq_kv)):
            if given is not None:
                value = check_positive_int(name, given)
                if value is not None and value < actual:
                    raise ValueError(f"{name}={value} is shorter than the longest sequence ({actual})")
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported with packed sequences (use seqlens on a padded batch)")
        if seqlens_q is not None or seqlens_kv is not None:
            raise ValueError("pass either cu_seqlens (packed) or seqlens (padded), not both")
        head_dim, head_dim_v = int(q.shape[2]), int(v.shape[2])
        arrays_kw: dict[str, Any] = dict(cu_seqlens_q=_like(cu_q, q, np.int32),
                                         cu_seqlens_kv=_like(cu_kv, q, np.int32),
                                         lens_q=lens_q, lens_kv=lens_kv)
        ragged = "packed"
        lse_shape: tuple[int, ...] = (qh, int(q.shape[0]))
    else:
        batch, qh, seq_q, head_dim, rank = _axes(tuple(q.shape), layout_)
        _, kh, seq_kv, _, _ = _axes(tuple(k.shape), layout_)
        head_dim_v = int(v.shape[-1])
        arrays_kw = {}
        ragged = "none"
        if seqlens_q is not None or seqlens_kv is not None:
            lens_q = (check_seqlens("seqlens_q", seqlens_q, batch, seq_q) if seqlens_q is not None
                      else np.full(batch, seq_q, np.int64))
            lens_kv = (check_seqlens("seqlens_kv", seqlens_kv, batch, seq_kv) if seqlens_kv is not None
                       else np.full(batch, seq_kv, np.int64))
            arrays_kw.update(seqlens_q=_like(lens_q, q, np.int32), seqlens_kv=_like(lens_kv, q, np.int32),
                             lens_q=lens_q, lens_kv=lens_kv)
            ragged = "padded"
        lse_shape = {2: (seq_q,), 3: (qh, seq_q), 4: (batch, qh, seq_q)}[rank]
        if max_seqlen_q is not None or max_seqlen_kv is not None:
            raise ValueError("max_seqlen_q / max_seqlen_kv belong to packed calls (flash_attention_varlen)")
    mask_kind = "none"
    if attn_mask is not None:
        view, mask_kind = check_attn_mask(attn_mask, (batch, qh, seq_q, seq_kv), q)
        arrays_kw["attn_mask"] = view
    slopes = check_alibi(alibi_slopes, batch, qh, q)
    if slopes is not None:
        arrays_kw["alibi_slopes"] = slopes
    if dropout_ == 0.0:
        seed_ = None  # no dropout ran: no seed to report
    elif seed_ is None:
        from ._dropout import draw_seed

        seed_ = draw_seed()
    rule = MaskRule(causal=causal_, bottom_right=bottom_right, window_left=left, window_right=right,
                    softcap=softcap_, alibi=slopes is not None, mask=mask_kind)
    q_shape = tuple(int(s) for s in q.shape)
    return AttentionSpec(
        batch=batch, heads=qh, seq_q=seq_q, seq_kv=seq_kv, head_dim=head_dim, dtype=dtype, causal=causal_,
        scale=scale_ if scale_ is not None else 1.0 / float(np.sqrt(head_dim)),
        dropout_p=dropout_, seed=seed_, block_q=block_q_, block_kv=block_kv_, num_threads=threads_,
        q_shape=q_shape, heads_kv=kh, head_dim_v=head_dim_v, layout=layout_, rule=rule, ragged=ragged,
        out_shape=(*q_shape[:-1], head_dim_v), lse_shape=lse_shape, arrays=MaskArrays(**arrays_kw),
    )
