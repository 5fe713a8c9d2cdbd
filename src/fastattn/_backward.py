"""The backward facade: validate once, pick the backend, call its ``backward``, shape the gradients.

    flash_attention_backward(dout, q, k, v, out, lse, *, <the forward's options>)
        -> (dq, dk, dv)            each in its input's shape, dtype, layout and kind
        -> (dq, dk, dv, dbias)     with return_dbias=True and a float attn_mask: dbias in the mask's shape

The gradients are those of ``out = flash_attention(q, k, v, ...)`` against ``dout``; ``out`` and ``lse``
are what that forward returned (``return_lse=True``): the backends recompute the attention weights
tile by tile from lse (P = exp(logit - lse)) and never store them.  The call's options must be the
forward's (the same mask, scale, dropout seed); nothing can check that they are.
"""

from __future__ import annotations

from typing import Any

from . import backends
from ._api import _to_caller
from ._arrays import input_array
from ._checks import check_bool
from ._validate import AttentionSpec, as_4d, dtype_name, is_gpu_array, make_spec_memo, packed_4d


def _check_grad_inputs(spec: AttentionSpec, q: Any, dout: Any, out: Any, lse: Any) -> None:
    """dout and out in the forward output's shape and dtype, lse in the forward lse's; all on q's device."""
    want = dtype_name(q)
    lse_dtypes = (spec.lse_dtype.name, "float64")   # a float64 lse (more precise) is taken for any input
    for name, arr, shape, dtype in (("dout", dout, spec.out_shape, (want,)), ("out", out, spec.out_shape, (want,)),
                                    ("lse", lse, spec.lse_shape, lse_dtypes)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        if is_gpu_array(arr) != is_gpu_array(q):
            raise ValueError(f"{name} must live on the same device as q")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{name} must have the forward's {'lse' if name == 'lse' else 'output'} shape "
                             f"{tuple(shape)}; got {name} with shape {tuple(arr.shape)}")
        if dtype_name(arr) not in dtype:
            raise TypeError(f"{name} must have dtype {' or '.join(dtype)} (the forward's "
                            f"{'lse' if name == 'lse' else 'output'} dtype for {want} inputs); got {dtype_name(arr)}")


def _reduce_dbias(dbias: Any, mask: Any) -> Any:
    """The full (batch, heads, seq_q, seq_kv) gradient of the logits summed over the axes the caller's mask
    broadcasts along, in the mask's shape and dtype."""
    shape = tuple(mask.shape)
    padded = (1,) * (4 - len(shape)) + shape
    axes = tuple(a for a in range(4) if padded[a] == 1 and dbias.shape[a] != 1)
    if axes:
        dbias = dbias.sum(axis=axes, keepdims=True)
    dbias = dbias.reshape(shape)
    return dbias.astype(mask.dtype) if dtype_name(dbias) != dtype_name(mask) else dbias


def _run_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, spec_kwargs: dict, backend: str, *,
                  return_dbias: bool, deterministic: bool) -> tuple:
    like_q, like_k, like_v = q, k, v
    mask_in = spec_kwargs.get("attn_mask")
    q, k, v = input_array("q", q), input_array("k", k), input_array("v", v)
    dout, out, lse = input_array("dout", dout), input_array("out", out), input_array("lse", lse)
    engine = backends.resolve(backend, q, k, v)
    spec: AttentionSpec = make_spec_memo(q, k, v, **spec_kwargs)  # every check before any work
    _check_grad_inputs(spec, q, dout, out, lse)
    if spec.dropout_p > 0.0 and spec_kwargs.get("seed") is None:
        raise ValueError("the backward of a call with dropout needs the forward's seed (pass seed=...; "
                         "FlashAttention.forward reports the seed it used)")
    if return_dbias and spec.rule.mask != "bias":
        raise ValueError("return_dbias=True needs a float attn_mask (an additive bias); a boolean mask or no "
                         "mask has no gradient")
    if getattr(engine, "backward", None) is None:
        raise ValueError(f"the {engine.NAME!r} backend has no backward pass yet; use backend='cpu' or "
                         f"backend='reference'")
    engine.check_spec(spec)
    q, k, v, dout, out, lse = (engine.prepare(x) for x in (q, k, v, dout, out, lse))
    if spec.ragged == "packed":
        q4, k4, v4, do4, o4 = (packed_4d(x) for x in (q, k, v, dout, out))
    else:
        q4, k4, v4, do4, o4 = (as_4d(x, spec.layout) for x in (q, k, v, dout, out))
    lse3 = lse.reshape(q4.shape[:3])
    res = engine.backward(do4, q4, k4, v4, o4, lse3, spec, want_dbias=return_dbias, deterministic=deterministic)

    grads = tuple(engine.restore(_to_caller(g4, spec, tuple(like.shape)), like)
                  for g4, like in ((res.dq, like_q), (res.dk, like_k), (res.dv, like_v)))
    if return_dbias:
        mask = input_array("attn_mask", mask_in)
        grads = (*grads, engine.restore(_reduce_dbias(res.dbias, mask), mask_in))
    return grads


def flash_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
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
    return_dbias: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
) -> tuple:
    """Gradients of :func:`flash_attention` with respect to q, k and v (and a float mask).

    ``out, lse = flash_attention(q, k, v, return_lse=True, **options)``, then
    ``dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, **options)`` with the same options
    (causal, window, softcap, alibi_slopes, attn_mask, seqlens_q / seqlens_kv, layout, scale, and
    dropout_p with the forward's ``seed``: the dropout mask is regenerated, never stored).

    Shapes: dout and out as the forward's output, lse as its lse (float32; float64 for float64 input);
    dq, dk, dv come back in q's, k's and v's shapes, dtypes and layout.  With grouped-query attention
    dk and dv are summed over the query heads that share a k/v head.  ``return_dbias=True`` (a float
    ``attn_mask`` only) also returns the gradient of the bias, summed over the axes the mask broadcasts
    along, in the mask's shape and dtype (it costs a batch x heads x seq_q x seq_kv buffer).
    A boolean mask has no gradient.  Rows that see no key (lse -inf) get zero gradients.

    Extra memory is O(sequence): the attention weights are recomputed per tile from lse.  Half
    precision accumulates in float32.  The CPU backend is deterministic (each thread owns the rows it
    writes; partial sums are added in a fixed order); on CUDA ``deterministic=True`` asks for the same
    at some cost in speed.
    """
    return_dbias = check_bool("return_dbias", return_dbias)
    deterministic = check_bool("deterministic", deterministic)
    return _run_backward(
        dout, q, k, v, out, lse,
        dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, attn_mask=attn_mask,
             seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, layout=layout, scale=scale, dropout_p=dropout_p,
             seed=seed, block_q=block_size_q, block_kv=block_size_kv, num_threads=num_threads),
        backend, return_dbias=return_dbias, deterministic=deterministic,
    )


def flash_attention_varlen_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
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
    deterministic: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
    block_size_q: int | None = None,
    block_size_kv: int | None = None,
) -> tuple:
    """Gradients of :func:`flash_attention_varlen` (a packed batch): dout and out (total_q, heads,
    head_dim_v), lse (heads, total_q) as that forward returned them; dq, dk, dv in q's, k's, v's shapes."""
    deterministic = check_bool("deterministic", deterministic)
    return _run_backward(
        dout, q, k, v, out, lse,
        dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
             cu_seqlens_kv=cu_seqlens_kv, max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, layout="bshd",
             scale=scale, dropout_p=dropout_p, seed=seed, block_q=block_size_q, block_kv=block_size_kv,
             num_threads=num_threads),
        backend, return_dbias=False, deterministic=deterministic,
    )

