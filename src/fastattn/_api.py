"""The facade: validate once, pick the backend, call it, shape the result."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import backends
from ._arrays import input_array, like_input
from ._checks import check_bool
from ._config import FlashAttentionConfig
from ._validate import AttentionSpec, as_4d, check_arrays, make_spec


@dataclasses.dataclass(frozen=True)
class AttentionResult:
    """What :meth:`FlashAttention.forward` returns.

    ``flops`` counts 4·head_dim per (query, key) pair inside the mask (so causal is about
    half).  ``peak_sram_bytes`` is the on-chip working set of the tiles actually used: per
    thread on the CPU, shared memory per block on CUDA.  ``seed`` is the dropout seed
    actually used (drawn when none was given), None without dropout.  ``kernel`` names the code
    path that ran: the SIMD path on the CPU ("avx512", "avx2", "generic"), the kernel family on
    CUDA ("wgmma", "mma.sync", "simt"), "numpy" for the reference.
    """

    output: Any
    logsumexp: Any
    flops: int
    peak_sram_bytes: int
    backend: str
    seed: int | None
    block_size_q: int
    block_size_kv: int
    num_threads: int
    kernel: str = ""


def _inputs(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
    """q, k, v as arrays the backends read (host objects as NumPy views; see ``_arrays``)."""
    return input_array("q", q), input_array("k", k), input_array("v", v)


def _run(q: Any, k: Any, v: Any, spec_kwargs: dict, backend: str) -> AttentionResult:
    like = q  # outputs go back as the caller's kind (a torch tensor for torch input)
    q, k, v = _inputs(q, k, v)
    engine = backends.resolve(backend, q, k, v)
    spec: AttentionSpec = make_spec(q, k, v, **spec_kwargs)  # every check before any work
    q, k, v = (engine.prepare(x) for x in (q, k, v))
    res = engine.forward(as_4d(q), as_4d(k), as_4d(v), spec)
    out = engine.restore(res.out.reshape(spec.q_shape), like)
    lse = engine.restore(res.lse.reshape(spec.q_shape[:-1]), like)
    return AttentionResult(
        output=out, logsumexp=lse, flops=spec.flops, peak_sram_bytes=res.stats.peak_sram_bytes,
        backend=engine.NAME, seed=spec.seed, block_size_q=res.stats.block_q,
        block_size_kv=res.stats.block_kv, num_threads=res.stats.num_threads, kernel=res.stats.simd,
    )


def flash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
) -> Any:
    """Exact scaled-dot-product attention without materializing the score matrix.

    Shapes::

        q:   (batch, heads, seq_q,  head_dim)   or (heads, seq_q, head_dim) or (seq_q, head_dim)
        k:   (batch, heads, seq_kv, head_dim)   same rank as q
        v:   (batch, heads, seq_kv, head_dim)
        out: q's shape and dtype
        lse: q's shape without head_dim; float32 (float64 for float64 input)

    ``out = softmax(scale · q·kᵀ + mask) · v`` with ``scale = 1/sqrt(head_dim)`` by default.

    ``causal=True`` uses the top-left aligned mask (as PyTorch's ``is_causal``): query i
    sees keys 0..i, whatever seq_kv is.  For seq_q = 3, seq_kv = 5 (1 = attended)::

        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0

    ``dropout_p > 0`` drops each weight with probability p, decided by a pure function of
    (seed, b, h, i, j) (Philox4x32-10, see ``fastattn._dropout``), and scales kept weights
    by 1/(1-p); lse is that of the undropped softmax.  Without a seed one is drawn; use
    :class:`FlashAttention` to read it back.

    float16 and bfloat16 inputs are computed in float32 and returned in their own dtype.
    ``backend``: "auto" (GPU arrays -> "cuda", else "cpu"), "cpu", "cuda" or "reference".
    """
    return_lse = check_bool("return_lse", return_lse)
    res = _run(
        q, k, v,
        dict(causal=causal, scale=scale, dropout_p=dropout_p, seed=seed, block_q=block_size_q,
             block_kv=block_size_kv, num_threads=num_threads),
        backend,
    )
    return (res.output, res.logsumexp) if return_lse else res.output


def standard_attention(q: Any, k: Any, v: Any, *, causal: bool = False, scale: float | None = None) -> np.ndarray:
    """The materialized path: builds each head's full score matrix in NumPy.

    Computes in float32 (float64 for float64 input); same shapes and mask as
    :func:`flash_attention`.  Memory is O(seq_q·seq_kv) per head.
    """
    from .backends.reference import materialized

    like = q
    q, k, v = _inputs(q, k, v)
    if any(not isinstance(x, np.ndarray) for x in (q, k, v)):
        raise TypeError("standard_attention runs in NumPy: pass host arrays (NumPy, or torch CPU tensors)")
    spec = make_spec(q, k, v, causal=causal, scale=scale, dropout_p=0.0, seed=None,
                     block_q=None, block_kv=None, num_threads=None)
    compute = np.float64 if spec.dtype == np.float64 else np.float32
    out, _ = materialized(as_4d(q), as_4d(k), as_4d(v), causal=spec.causal, scale=spec.scale,
                          compute_dtype=compute)
    return like_input(out.reshape(spec.q_shape).astype(spec.dtype), like)


class FlashAttention:
    """The object API: a config plus a backend."""

    def __init__(self, config: FlashAttentionConfig, backend: str = "auto") -> None:
        if not isinstance(config, FlashAttentionConfig):
            raise TypeError(f"config must be a FlashAttentionConfig, got {type(config).__name__}")
        if backend != "auto":
            backends.get_backend(backend)  # unknown names fail here, not at the first call
        self.config = config
        self.backend = backend

    def __repr__(self) -> str:
        return f"FlashAttention({self.config!r}, backend={self.backend!r})"

    def _call(self, q: Any, k: Any, v: Any, seed: int | None, num_threads: int | None) -> AttentionResult:
        cfg = self.config
        return _run(
            q, k, v,
            dict(causal=cfg.causal, scale=cfg.scale, dropout_p=cfg.dropout_p, seed=seed,
                 block_q=cfg.block_size_q, block_kv=cfg.block_size_kv, num_threads=num_threads),
            self.backend,
        )

    def _check_head_dim(self, q: Any, k: Any, v: Any) -> None:
        check_arrays(*_inputs(q, k, v))
        if q.shape[-1] != self.config.head_dim:
            raise ValueError(
                f"head_dim of the inputs ({q.shape[-1]}, from q shape {tuple(q.shape)}) does not match "
                f"config.head_dim={self.config.head_dim}"
            )

    def forward(self, q: Any, k: Any, v: Any, *, seed: int | None = None,
                num_threads: int | None = None) -> AttentionResult:
        """One head: q (seq_q, head_dim), k and v (seq_kv, head_dim)."""
        self._check_head_dim(q, k, v)
        if len(q.shape) != 2:
            raise ValueError(
                f"forward takes one head: q (seq_q, head_dim), k/v (seq_kv, head_dim); got q shape "
                f"{tuple(q.shape)} (use forward_multi_head for batches of heads)"
            )
        return self._call(q, k, v, seed, num_threads)

    def forward_multi_head(self, q: Any, k: Any, v: Any, *, seed: int | None = None,
                           num_threads: int | None = None) -> AttentionResult:
        """(batch, num_heads, seq, head_dim) inputs."""
        self._check_head_dim(q, k, v)
        if len(q.shape) != 4:
            raise ValueError(
                f"forward_multi_head takes 4-D (batch, num_heads, seq, head_dim) inputs; got q shape "
                f"{tuple(q.shape)}"
            )
        if q.shape[1] != self.config.num_heads:
            raise ValueError(
                f"q has {q.shape[1]} heads (shape {tuple(q.shape)}) but config.num_heads={self.config.num_heads}"
            )
        return self._call(q, k, v, seed, num_threads)

    def memory_savings(self, seq_len: int):  # -> MemorySavings
        from ._memory import memory_savings

        return memory_savings(seq_len, head_dim=self.config.head_dim,
                              block_size_q=self.config.block_size_q, block_size_kv=self.config.block_size_kv)
