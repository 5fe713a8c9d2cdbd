"""The facade: validate once, pick the backend, call it, shape the result."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import backends
from ._arrays import input_array, like_input
from ._checks import check_bool
from ._config import FlashAttentionConfig
from ._validate import AttentionSpec, as_4d, check_arrays, make_spec, make_spec_memo, packed_4d


@dataclasses.dataclass(frozen=True)
class AttentionResult:
    """What :meth:`FlashAttention.forward` returns.

    ``flops`` counts 2·(head_dim + head_dim_v) per (query, key) pair the mask lets through (so
    causal is about half; a boolean mask is counted on the mask).  ``peak_sram_bytes`` is the
    on-chip working set of the tiles actually used: per thread on the CPU, shared memory per block
    on CUDA.  ``seed`` is the dropout seed
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


def _to_caller(out4: Any, spec: AttentionSpec, shape: tuple[int, ...] | None = None) -> Any:
    """A backend's (batch, heads, seq, dim) array as the caller's ``shape`` (the output's by default) and
    layout (a view: the backend allocated it in that layout's memory order)."""
    if spec.layout == "bshd" or spec.ragged == "packed":
        out4 = out4.swapaxes(1, 2)
    return out4.reshape(spec.out_shape if shape is None else shape)


def _attend(q: Any, k: Any, v: Any, spec_kwargs: dict, backend: str) -> tuple[Any, Any, Any, AttentionSpec, str]:
    """(out, lse, backend stats, spec, backend name) of one call: the work of every entry point below."""
    like = q  # outputs go back as the caller's kind (a torch tensor for torch input)
    q, k, v = _inputs(q, k, v)
    engine = backends.resolve(backend, q, k, v)
    spec: AttentionSpec = make_spec_memo(q, k, v, **spec_kwargs)  # every check before any work
    engine.check_spec(spec)  # what this backend cannot do, also before any work
    q, k, v = engine.prepare(q), engine.prepare(k), engine.prepare(v)
    if spec.ragged == "packed":
        q4, k4, v4 = packed_4d(q), packed_4d(k), packed_4d(v)
    else:
        layout = spec.layout
        q4, k4, v4 = as_4d(q, layout), as_4d(k, layout), as_4d(v, layout)
    res = engine.forward(q4, k4, v4, spec)
    out = engine.restore(_to_caller(res.out, spec), like)
    lse = engine.restore(res.lse.reshape(spec.lse_shape), like)
    return out, lse, res.stats, spec, engine.NAME


def _run(q: Any, k: Any, v: Any, spec_kwargs: dict, backend: str, *, count_flops: bool = True) -> AttentionResult:
    out, lse, stats, spec, name = _attend(q, k, v, spec_kwargs, backend)
    return AttentionResult(
        output=out, logsumexp=lse, flops=spec.flops if count_flops else 0,
        peak_sram_bytes=stats.peak_sram_bytes,
        backend=name, seed=spec.seed, block_size_q=stats.block_q,
        block_size_kv=stats.block_kv, num_threads=stats.num_threads, kernel=stats.simd,
    )


def flash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    attn_mask: Any = None,
    seqlens_q: Any = None,
    seqlens_kv: Any = None,
    layout: str = "bhsd",
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

    Shapes (``layout="bhsd"``, the default; ``"bshd"`` swaps the seq and heads axes of q, k, v and
    out, as FlashAttention and Hugging Face lay them out)::

        q:   (batch, heads,    seq_q,  head_dim)    or (heads, seq_q, head_dim) or (seq_q, head_dim)
        k:   (batch, heads_kv, seq_kv, head_dim)    same rank as q; heads % heads_kv == 0 (GQA/MQA:
        v:   (batch, heads_kv, seq_kv, head_dim_v)  query head h reads k/v head h // (heads // heads_kv))
        out: q's shape with head_dim_v; q's dtype and layout
        lse: (batch, heads, seq_q) (leading axes as q's rank); float32 (float64 for float64 input)

    ``out = softmax(scale · q·kᵀ + mask) · v`` with ``scale = 1/sqrt(head_dim)`` by default.

    Masks and variants (each combines with every other one, with dropout and with ``return_lse``;
    the exact rules are in ``fastattn._masks`` and docs/api.md):

    - ``causal``: False; True or "top_left" (query i sees keys 0..i, PyTorch's ``is_causal``);
      "bottom_right" (query i sees keys <= i + seq_kv - seq_q: a KV cache's alignment).  For
      seq_q = 3, seq_kv = 5 (1 = attended)::

          top_left     bottom_right
          1 0 0 0 0    1 1 1 0 0
          1 1 0 0 0    1 1 1 1 0
          1 1 1 0 0    1 1 1 1 1

    - ``window=(left, right)``: query i sees keys in [i + off - left, i + off + right] (off =
      seq_kv - seq_q under "bottom_right", else 0); -1 = unbounded.  Key tiles outside the band
      are skipped, so time falls with the band.
    - ``softcap=c > 0``: logits s = scale·q·k become c·tanh(s / c).
    - ``alibi_slopes``: (heads,) or (batch, heads) float32: the bias -slope·|i + seq_kv - seq_q - j|.
    - ``attn_mask``: broadcastable to (batch, heads, seq_q, seq_kv): bool (True = may attend) or a
      float additive bias; read through its own strides, never expanded.
    - ``seqlens_q`` / ``seqlens_kv`` (batch,) ints make a padded batch ragged: keys at or past
      ``seqlens_kv[b]`` are never attended, rows at or past ``seqlens_q[b]`` give 0 and lse -inf,
      and no work is spent on the padding (the rules above then use those lengths).
    - Rows with no visible key give output 0 and lse -inf; masked keys never contribute.

    ``dropout_p > 0`` drops each weight with probability p, decided by a pure function of
    (seed, b, h, i, j) (Philox4x32-10, see ``fastattn._dropout``), and scales kept weights
    by 1/(1-p); lse is that of the undropped softmax.  Without a seed one is drawn; use
    :class:`FlashAttention` to read it back.

    float16 and bfloat16 inputs are computed in float32 and returned in their own dtype.
    ``backend``: "auto" (GPU arrays -> "cuda", else "cpu"), "cpu", "cuda" or "reference".
    """
    return_lse = check_bool("return_lse", return_lse)
    out, lse, _, _, _ = _attend(
        q, k, v,
        dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
             seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, layout=layout, scale=scale, dropout_p=dropout_p,
             seed=seed, block_q=block_size_q, block_kv=block_size_kv, num_threads=num_threads),
        backend,
    )
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_kv: Any,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_kv: int | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: Any = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
) -> Any:
    """Attention over a packed batch of sequences of different lengths (no padding anywhere).

    Shapes (as FlashAttention-2's ``flash_attn_varlen_func``)::

        q:    (total_q,  heads,    head_dim)     the sequences' queries end to end
        k:    (total_kv, heads_kv, head_dim)
        v:    (total_kv, heads_kv, head_dim_v)
        cu_seqlens_q, cu_seqlens_kv: (batch + 1,) ints: sequence b is rows cu[b] .. cu[b+1] - 1
        out:  (total_q, heads, head_dim_v);  lse: (heads, total_q)

    Each sequence attends only to its own keys; ``causal``, ``window``, ``softcap`` and
    ``alibi_slopes`` apply per sequence, with that sequence's lengths (see :func:`flash_attention`).
    ``max_seqlen_q`` / ``max_seqlen_kv`` are optional (checked when given: at least the longest).
    """
    return_lse = check_bool("return_lse", return_lse)
    out, lse, _, _, _ = _attend(
        q, k, v,
        dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
             cu_seqlens_kv=cu_seqlens_kv, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, layout="bshd",
             scale=scale, dropout_p=dropout_p, seed=seed, block_q=block_size_q, block_kv=block_size_kv,
             num_threads=num_threads),
        backend,
    )
    return (out, lse) if return_lse else out


def standard_attention(q: Any, k: Any, v: Any, *, causal: bool | str = False, scale: float | None = None,
                       window: tuple[int, int] | None = None, softcap: float = 0.0, alibi_slopes: Any = None,
                       attn_mask: Any = None, layout: str = "bhsd") -> np.ndarray:
    """The materialized path: builds each head's full score matrix in NumPy.

    Computes in float32 (float64 for float64 input); same shapes, masks and variants as
    :func:`flash_attention`.  Memory is O(seq_q·seq_kv) per head.
    """
    from .backends.reference import materialized

    like = q
    q, k, v = _inputs(q, k, v)
    if any(not isinstance(x, np.ndarray) for x in (q, k, v)):
        raise TypeError("standard_attention runs in NumPy: pass host arrays (NumPy, or torch CPU tensors)")
    spec = make_spec(q, k, v, causal=causal, scale=scale, dropout_p=0.0, seed=None, block_q=None, block_kv=None,
                     num_threads=None, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                     attn_mask=attn_mask, layout=layout)
    compute = np.float64 if spec.dtype == np.float64 else np.float32
    out, _ = materialized(*(as_4d(x, spec.layout) for x in (q, k, v)), scale=spec.scale, compute_dtype=compute,
                          rule=spec.rule, arrays=spec.arrays, ragged=spec.ragged)
    return like_input(_to_caller(out, spec).astype(spec.dtype), like)


class FlashAttention:
    """The object API: a config plus a backend.

    The config fixes the layer (head dims, heads, causal alignment, window, softcap, layout, tiles,
    dropout); each call passes the arrays that vary per batch (``attn_mask``, ``alibi_slopes``,
    ``seqlens_q`` / ``seqlens_kv``, or the cu_seqlens of a packed batch).
    """

    def __init__(self, config: FlashAttentionConfig, backend: str = "auto") -> None:
        if not isinstance(config, FlashAttentionConfig):
            raise TypeError(f"config must be a FlashAttentionConfig, got {type(config).__name__}")
        if backend != "auto":
            backends.get_backend(backend)  # unknown names fail here, not at the first call
        self.config = config
        self.backend = backend

    def __repr__(self) -> str:
        return f"FlashAttention({self.config!r}, backend={self.backend!r})"

    def _call(self, q: Any, k: Any, v: Any, seed: int | None, num_threads: int | None,
              **arrays: Any) -> AttentionResult:
        cfg = self.config
        kwargs = dict(causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, scale=cfg.scale,
                      dropout_p=cfg.dropout_p, seed=seed, block_q=cfg.block_size_q, block_kv=cfg.block_size_kv,
                      num_threads=num_threads, **arrays)
        kwargs.setdefault("layout", cfg.layout)
        return _run(q, k, v, kwargs, self.backend)

    def _check_shapes(self, q: Any, k: Any, v: Any, *, layout: str, packed: bool = False) -> None:
        """The config's own checks (the call's arguments are validated again, once, by the facade)."""
        q, k, v = _inputs(q, k, v)
        check_arrays(q, k, v, layout, packed=packed)
        cfg = self.config
        if q.shape[-1] != cfg.head_dim:
            raise ValueError(
                f"head_dim of the inputs ({q.shape[-1]}, from q shape {tuple(q.shape)}) does not match "
                f"config.head_dim={cfg.head_dim}"
            )
        if cfg.head_dim_v is not None and v.shape[-1] != cfg.head_dim_v:
            raise ValueError(f"v's head_dim ({v.shape[-1]}, from v shape {tuple(v.shape)}) does not match "
                             f"config.head_dim_v={cfg.head_dim_v}")

    def _check_heads(self, q_heads: int, kv_heads: int, q: Any, k: Any) -> None:
        cfg = self.config
        if q_heads != cfg.num_heads:
            raise ValueError(f"q has {q_heads} heads (shape {tuple(q.shape)}) but config.num_heads={cfg.num_heads}")
        want_kv = cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_heads
        if kv_heads != want_kv:
            raise ValueError(f"k has {kv_heads} heads (shape {tuple(k.shape)}) but the config expects {want_kv} "
                             f"(num_kv_heads)")

    def forward(self, q: Any, k: Any, v: Any, *, seed: int | None = None, num_threads: int | None = None,
                attn_mask: Any = None, alibi_slopes: Any = None) -> AttentionResult:
        """One head: q (seq_q, head_dim), k and v (seq_kv, head_dim)."""
        self._check_shapes(q, k, v, layout="bhsd")
        if len(q.shape) != 2:
            raise ValueError(
                f"forward takes one head: q (seq_q, head_dim), k/v (seq_kv, head_dim); got q shape "
                f"{tuple(q.shape)} (use forward_multi_head for batches of heads)"
            )
        return self._call(q, k, v, seed, num_threads, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                          layout="bhsd")

    def forward_multi_head(self, q: Any, k: Any, v: Any, *, seed: int | None = None, num_threads: int | None = None,
                           attn_mask: Any = None, alibi_slopes: Any = None, seqlens_q: Any = None,
                           seqlens_kv: Any = None) -> AttentionResult:
        """4-D inputs in the config's layout: (batch, heads, seq, head_dim) or (batch, seq, heads, head_dim)."""
        layout = self.config.layout
        self._check_shapes(q, k, v, layout=layout)
        if len(q.shape) != 4:
            want = "(batch, num_heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, num_heads, head_dim)"
            raise ValueError(f"forward_multi_head takes 4-D {want} inputs; got q shape {tuple(q.shape)}")
        axis = 1 if layout == "bhsd" else 2
        self._check_heads(q.shape[axis], k.shape[axis], q, k)
        return self._call(q, k, v, seed, num_threads, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                          seqlens_q=seqlens_q, seqlens_kv=seqlens_kv)

    def forward_varlen(self, q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any, *,
                       max_seqlen_q: int | None = None, max_seqlen_kv: int | None = None, seed: int | None = None,
                       num_threads: int | None = None, alibi_slopes: Any = None) -> AttentionResult:
        """A packed batch: q (total_q, heads, head_dim), k/v (total_kv, heads_kv, head_dim) and the
        cumulative sequence offsets (see :func:`flash_attention_varlen`)."""
        self._check_shapes(q, k, v, layout="bshd", packed=True)
        self._check_heads(q.shape[1], k.shape[1], q, k)
        return self._call(q, k, v, seed, num_threads, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
                          cu_seqlens_kv=cu_seqlens_kv, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv,
                          layout="bshd")

    def backward(self, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, seed: int | None = None,
                 num_threads: int | None = None, attn_mask: Any = None, alibi_slopes: Any = None,
                 seqlens_q: Any = None, seqlens_kv: Any = None, return_dbias: bool = False,
                 deterministic: bool = False) -> tuple:
        """Gradients (dq, dk, dv) of :meth:`forward` or :meth:`forward_multi_head` (q of rank 2 or 4 in the
        config's layout) against ``dout``; ``out`` and ``lse`` are that call's ``output`` and ``logsumexp``,
        ``seed`` its ``seed`` (with dropout).  See :func:`fastattn.flash_attention_backward`."""
        from ._backward import _run_backward

        layout = "bhsd" if len(getattr(q, "shape", ())) == 2 else self.config.layout
        self._check_shapes(q, k, v, layout=layout)
        if len(q.shape) == 4:
            axis = 1 if layout == "bhsd" else 2
            self._check_heads(q.shape[axis], k.shape[axis], q, k)
        elif len(q.shape) != 2:
            raise ValueError(f"backward takes the arrays of forward (2-D) or forward_multi_head (4-D); got q shape "
                             f"{tuple(q.shape)}")
        cfg = self.config
        kwargs = dict(causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, scale=cfg.scale,
                      dropout_p=cfg.dropout_p, seed=seed, block_q=cfg.block_size_q, block_kv=cfg.block_size_kv,
                      num_threads=num_threads, attn_mask=attn_mask, alibi_slopes=alibi_slopes, seqlens_q=seqlens_q,
                      seqlens_kv=seqlens_kv, layout=layout)
        return _run_backward(dout, q, k, v, out, lse, kwargs, self.backend,
                             return_dbias=check_bool("return_dbias", return_dbias),
                             deterministic=check_bool("deterministic", deterministic))

    def memory_savings(self, seq_len: int):  # -> MemorySavings
        from ._memory import memory_savings

        return memory_savings(seq_len, head_dim=self.config.head_dim,
                              block_size_q=self.config.block_size_q, block_size_kv=self.config.block_size_kv)
