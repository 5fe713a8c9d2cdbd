"""One place that turns user arrays into plain facts (an :class:`AttentionSpec`) or a clear error.

The facade validates once; backends trust the spec and never re-check.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from ._checks import check_bool, check_dropout, check_positive_int, check_scale, check_seed

#: dtype name -> computed in
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Validated facts about one attention call; every backend's ``forward`` takes one."""

    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: np.dtype  # the common input dtype (output dtype too)
    causal: bool
    scale: float
    dropout_p: float
    seed: int | None  # set whenever dropout_p > 0
    block_q: int | None
    block_kv: int | None
    num_threads: int | None
    q_shape: tuple[int, ...]  # the caller's q shape; the output gets it back

    @property
    def lse_dtype(self) -> np.dtype:
        return np.dtype(np.float64) if self.dtype == np.float64 else np.dtype(np.float32)

    @property
    def attended_pairs(self) -> int:
        """Number of (query, key) pairs inside the mask, per head."""
        return attended_pairs(self.seq_q, self.seq_kv, self.causal)

    @property
    def flops(self) -> int:
        """4·head_dim per attended pair: 2·d for Q·Kᵀ and 2·d for P·V."""
        return 4 * self.head_dim * self.attended_pairs * self.batch * self.heads


def attended_pairs(seq_q: int, seq_kv: int, causal: bool) -> int:
    """Pairs (i, j) with j < seq_kv and, if causal (top-left aligned), j <= i."""
    if not causal:
        return seq_q * seq_kv
    # query i sees min(i + 1, seq_kv) keys
    full = max(seq_q - seq_kv, 0)  # rows i >= seq_kv that see every key
    tri_rows = seq_q - full  # rows 0 .. tri_rows-1 see i+1 keys
    return tri_rows * (tri_rows + 1) // 2 + full * seq_kv


def is_gpu_array(x: Any) -> bool:
    """True for CuPy arrays and any object that says it lives in CUDA memory.

    Never imports CuPy: a CuPy array can only exist if CuPy was already imported.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
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
    try:
        return np.dtype(arr.dtype).name
    except TypeError:
        return str(arr.dtype).removeprefix("torch.")


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_arrays(q: Any, k: Any, v: Any) -> np.dtype:
    """Checks ranks, dtypes and shapes of q, k, v; returns the common dtype."""
    names = {}
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        names[name] = dtype_name(arr)  # once per array: numpy's dtype.name is not free
        if len(arr.shape) not in (2, 3, 4):
            raise ValueError(
                f"{name} must be 2-D (seq, head_dim), 3-D (heads, seq, head_dim) or "
                f"4-D (batch, heads, seq, head_dim); got {name} with shape {tuple(arr.shape)} dtype {names[name]}"
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
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"q, k and v must share head_dim (last axis); got {shapes}")
    if q.shape[-1] < 1:
        raise ValueError(f"head_dim must be at least 1; got {shapes}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"q, k and v must share the leading (batch, heads) axes; got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same sequence length; got {shapes}")
    return numpy_dtype(names["q"])


def as_4d(arr: Any) -> Any:
    """A (batch, heads, seq, head_dim) view of a 2-D, 3-D or 4-D array (never a copy)."""
    while len(arr.shape) < 4:
        arr = arr[None]
    return arr


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
) -> AttentionSpec:
    """Validates everything about one call and returns the spec (arrays themselves not kept)."""
    causal_ = check_bool("causal", causal)
    scale_ = check_scale(scale)
    dropout_ = check_dropout(dropout_p)
    seed_ = check_seed(seed)
    block_q_ = check_positive_int("block_size_q", block_q)
    block_kv_ = check_positive_int("block_size_kv", block_kv)
    threads_ = check_positive_int("num_threads", num_threads)
    dtype = check_arrays(q, k, v)
    q4, k4 = as_4d(q), as_4d(k)
    head_dim = int(q.shape[-1])
    if dropout_ == 0.0:
        seed_ = None  # no dropout ran: no seed to report
    elif seed_ is None:
        from ._dropout import draw_seed

        seed_ = draw_seed()
    return AttentionSpec(
        batch=int(q4.shape[0]),
        heads=int(q4.shape[1]),
        seq_q=int(q4.shape[2]),
        seq_kv=int(k4.shape[2]),
        head_dim=head_dim,
        dtype=dtype,
        causal=causal_,
        scale=scale_ if scale_ is not None else 1.0 / float(np.sqrt(head_dim)),
        dropout_p=dropout_,
        seed=seed_,
        block_q=block_q_,
        block_kv=block_kv_,
        num_threads=threads_,
        q_shape=tuple(int(s) for s in q.shape),
    )
