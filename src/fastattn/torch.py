"""fastattn as a differentiable PyTorch operator (``pip install "fastattn[torch]"``).

    fastattn.torch.flash_attention(q, k, v, *, causal, window, softcap, alibi_slopes, attn_mask,
                                   seqlens_q, seqlens_kv, layout, scale, dropout_p, seed, ...)
        -> out                                  (q's shape with v's head_dim; q's dtype)
        -> (out, lse)                           with return_lse=True (lse is not differentiable)
    fastattn.torch.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv, ...)   a packed batch

Two ``torch.library.custom_op`` operators carry it (PyTorch is imported by this module only):

    fastattn::flash_attention           (q, k, v, the mask tensors, the seed, the options) -> (out, lse)
    fastattn::flash_attention_backward  (dout, q, k, v, out, lse, the same)                -> (dq, dk, dv, dbias)

Each has a fake (meta) implementation that gives exact shapes and dtypes, and the forward's autograd
formula is the backward operator, so ``loss.backward()``, ``torch.autograd.gradcheck`` and
``torch.compile(fullgraph=True)`` all see through it.  The real implementations call the facade
(:func:`fastattn.flash_attention` / :func:`fastattn.flash_attention_backward`): CPU tensors are read as
zero-copy NumPy views; CUDA tensors go to the cuda backend through DLPack, launched on the caller's
current torch stream.  Every validation error is the facade's, raised before any work.

Dropout: the seed is drawn once per forward from torch's default generator (so ``torch.manual_seed``
makes a run repeat) unless ``seed`` is given; it travels as a 0-d int64 CPU tensor saved for the
backward, which regenerates the same keep mask (a pure function of seed and position; never stored).
Gradients: q, k, v always; a float ``attn_mask`` (additive bias) when it requires grad, summed over
the axes it broadcasts along; a boolean mask, ``alibi_slopes`` and the sequence lengths have none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

import fastattn

__all__ = ["flash_attention", "flash_attention_varlen"]

_SEED_HIGH = 2**62  # drawn seeds: non-negative int64 (any seed in [0, 2**64) may be given)


# ---------------------------------------------------------------------------------------------------------------
# options: Python values <-> operator arguments (schema types: str, int, float, float?, int?)
# ---------------------------------------------------------------------------------------------------------------

def _causal_arg(causal: Any) -> str:
    """The facade's ``causal`` (False, True, "top_left", "bottom_right") as one string argument."""
    if causal is False:
        return "none"
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal not in ("none",):
        return causal  # a bad string reaches the facade, which names it
    raise TypeError(f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}")


def _causal_value(arg: str) -> bool | str:
    return False if arg == "none" else arg


def _window_args(window: Any) -> tuple[int, int, bool]:
    """(left, right, given): the facade checks the values; a malformed window is passed on as given."""
    if window is None:
        return -1, -1, False
    if isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in window):
        return int(window[0]), int(window[1]), True
    from ._validate import check_window

    check_window(window)  # raises the facade's error
    raise TypeError(f"window must be a pair (left, right) of ints (-1: unbounded), got {window!r}")


def _seed_tensor(seed: Any, dropout_p: Any) -> torch.Tensor | None:
    """The dropout seed as a 0-d int64 CPU tensor (two's complement of a seed >= 2**63), or None."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or dropout_p == 0.0:
        return None  # no dropout (or a bad value: the facade says so)
    if seed is None:
        return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)
    from ._checks import check_seed

    value = check_seed(seed)
    return torch.tensor(value - 2**64 if value >= 2**63 else value, dtype=torch.int64)


def _seed_value(seed: torch.Tensor | None) -> int | None:
    return None if seed is None else int(seed.item()) % 2**64


@contextlib.contextmanager
def _launch_stream(x: torch.Tensor) -> Iterator[None]:
    """CUDA tensors: CuPy's current stream becomes torch's current stream on x's device for the call, so
    the kernels are ordered after the caller's work and before what follows, with no synchronization."""
    if x.device.type != "cuda":
        yield
        return
    import cupy

    from .backends.cuda._decode import _external_stream

    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(device), _external_stream(torch.cuda.current_stream(device), device):
        yield


def _detached(*xs: torch.Tensor | None) -> list[Any]:
    # the operator's inputs may require grad; inside it nothing is recorded (the facade refuses such tensors)
    return [None if x is None else x.detach() for x in xs]


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _out_shapes(q: torch.Tensor, v: torch.Tensor, layout: str, packed: bool) -> tuple[tuple, tuple]:
    """(out shape, lse shape) of a call, from q's and v's shapes alone (the fake implementation)."""
    qs = tuple(q.shape)
    out = (*qs[:-1], v.shape[-1])
    if packed:  # (total_q, heads, d) -> lse (heads, total_q)
        return out, (qs[1], qs[0])
    if len(qs) == 4:
        return out, ((qs[0], qs[1], qs[2]) if layout == "bhsd" else (qs[0], qs[2], qs[1]))
    if len(qs) == 3:
        return out, ((qs[0], qs[1]) if layout == "bhsd" else (qs[1], qs[0]))
    return out, qs[:-1]


# ---------------------------------------------------------------------------------------------------------------
# the operators
# ---------------------------------------------------------------------------------------------------------------

def _facade_kwargs(attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv, seed, causal,
                   window_left, window_right, softcap, layout, scale, dropout_p, max_seqlen_q, max_seqlen_kv,
                   backend, num_threads) -> tuple[dict, tuple | None]:
    window = None if (window_left, window_right) == (-1, -1) else (window_left, window_right)
    kwargs = dict(causal=_causal_value(causal), window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                  scale=scale, dropout_p=dropout_p, seed=_seed_value(seed), backend=backend,
                  num_threads=num_threads)
    if cu_seqlens_q is not None or cu_seqlens_kv is not None:
        kwargs.update(max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv)
        return kwargs, (cu_seqlens_q, cu_seqlens_kv)
    kwargs.update(attn_mask=attn_mask, seqlens_q=seqlens_q, seqlens_kv=seqlens_kv, layout=layout)
    return kwargs, None


@torch.library.custom_op("fastattn::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    attn_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    seqlens_q: torch.Tensor | None, seqlens_kv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_kv: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: str, window_left: int, window_right: int, softcap: float, layout: str, scale: float | None,
    dropout_p: float, max_seqlen_q: int | None, max_seqlen_kv: int | None, backend: str,
    num_threads: int | None, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, attn_mask, alibi_slopes = _detached(q, k, v, attn_mask, alibi_slopes)
    kwargs, packed = _facade_kwargs(attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv,
                                    seed, causal, window_left, window_right, softcap, layout, scale, dropout_p,
                                    max_seqlen_q, max_seqlen_kv, backend, num_threads)
    del deterministic  # the backward's option, carried here so that setup_context saves it
    with _launch_stream(q):
        if packed is not None:
            out, lse = fastattn.flash_attention_varlen(q, k, v, *packed, return_lse=True, **kwargs)
        else:
            out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **kwargs)
    return out.contiguous(), lse.contiguous()


@_flash_attention_op.register_fake
def _(q, k, v, attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv, seed, causal,
      window_left, window_right, softcap, layout, scale, dropout_p, max_seqlen_q, max_seqlen_kv, backend,
      num_threads, deterministic):
    out_shape, lse_shape = _out_shapes(q, v, layout, cu_seqlens_q is not None)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=_lse_dtype(q))


@torch.library.custom_op("fastattn::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    attn_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    seqlens_q: torch.Tensor | None, seqlens_kv: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_kv: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: str, window_left: int, window_right: int, softcap: float, layout: str, scale: float | None,
    dropout_p: float, max_seqlen_q: int | None, max_seqlen_kv: int | None, backend: str,
    num_threads: int | None, deterministic: bool, want_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is an empty tensor unless ``want_dbias`` (a float mask that requires grad)."""
    dout, q, k, v, out, lse, attn_mask, alibi_slopes = _detached(dout, q, k, v, out, lse, attn_mask, alibi_slopes)
    kwargs, packed = _facade_kwargs(attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv,
                                    seed, causal, window_left, window_right, softcap, layout, scale, dropout_p,
                                    max_seqlen_q, max_seqlen_kv, backend, num_threads)
    with _launch_stream(q):
        if packed is not None:
            grads = fastattn.flash_attention_varlen_backward(dout, q, k, v, out, lse, *packed,
                                                             deterministic=deterministic, **kwargs)
        else:
            grads = fastattn.flash_attention_backward(dout, q, k, v, out, lse, return_dbias=want_dbias,
                                                      deterministic=deterministic, **kwargs)
    dq, dk, dv = (g.contiguous() for g in grads[:3])
    dbias = grads[3].contiguous() if want_dbias else q.new_empty((0,))
    return dq, dk, dv, dbias


@_flash_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv, seed,
      causal, window_left, window_right, softcap, layout, scale, dropout_p, max_seqlen_q, max_seqlen_kv, backend,
      num_threads, deterministic, want_dbias):
    dbias = attn_mask.new_empty(attn_mask.shape) if want_dbias else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# the forward's arguments after (q, k, v): tensors first, then the options (the order of the schema)
_TENSOR_ARGS = ("attn_mask", "alibi_slopes", "seqlens_q", "seqlens_kv", "cu_seqlens_q", "cu_seqlens_kv", "seed")
_OPTION_ARGS = ("causal", "window_left", "window_right", "softcap", "layout", "scale", "dropout_p", "max_seqlen_q",
                "max_seqlen_kv", "backend", "num_threads", "deterministic")
_MASK_INDEX = 3  # attn_mask's position among the forward's inputs


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, *rest = inputs
    tensors = rest[:len(_TENSOR_ARGS)]
    ctx.options = tuple(rest[len(_TENSOR_ARGS):])
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, *tensors)


def _backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor) -> tuple:
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    attn_mask = tensors[0]
    want_dbias = bool(attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[_MASK_INDEX])
    dq, dk, dv, dbias = _flash_attention_backward_op(dout, q, k, v, out, lse, *tensors, *ctx.options, want_dbias)
    grads: list[Any] = [dq, dk, dv, dbias if want_dbias else None]
    grads += [None] * (len(_TENSOR_ARGS) - 1 + len(_OPTION_ARGS))
    return tuple(grads)


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------------------------------

def _check_tensor(name: str, x: Any, *, optional: bool = True) -> None:
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''} (fastattn.torch takes "
                        f"torch tensors; fastattn.flash_attention takes NumPy / CuPy arrays), got {type(x).__name__}")


def _call(q, k, v, *, attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv, causal, window,
          softcap, layout, scale, dropout_p, seed, max_seqlen_q, max_seqlen_kv, return_lse, backend, num_threads,
          deterministic):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, optional=False)
    for name, x in (("attn_mask", attn_mask), ("alibi_slopes", alibi_slopes), ("seqlens_q", seqlens_q),
                    ("seqlens_kv", seqlens_kv), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_kv", cu_seqlens_kv)):
        _check_tensor(name, x)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    # the options' own checks (the facade's, so its errors): before any work, and at trace time under compile
    from ._checks import check_dropout, check_positive_int, check_scale
    from ._validate import check_layout, check_softcap

    softcap, scale, dropout_p = check_softcap(softcap), check_scale(scale), check_dropout(dropout_p)
    layout, num_threads = check_layout(layout), check_positive_int("num_threads", num_threads)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    left, right, _ = _window_args(window)
    out, lse = _flash_attention_op(
        q, k, v, attn_mask, alibi_slopes, seqlens_q, seqlens_kv, cu_seqlens_q, cu_seqlens_kv,
        _seed_tensor(seed, dropout_p), _causal_arg(causal), left, right, softcap, layout, scale, dropout_p,
        max_seqlen_q, max_seqlen_kv, backend, num_threads, deterministic,
    )
    return (out, lse) if return_lse else out


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    seqlens_q: torch.Tensor | None = None,
    seqlens_kv: torch.Tensor | None = None,
    layout: str = "bhsd",
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
) -> Any:
    """Differentiable :func:`fastattn.flash_attention` on torch tensors (CPU or CUDA).

    Shapes, masks and variants as :func:`fastattn.flash_attention` (``layout="bhsd"``)::

        q:   (batch, heads,    seq_q,  head_dim)      or 3-D / 2-D; "bshd" swaps seq and heads
        k:   (batch, heads_kv, seq_kv, head_dim)      heads % heads_kv == 0 (GQA / MQA)
        v:   (batch, heads_kv, seq_kv, head_dim_v)
        out: q's shape with head_dim_v, q's dtype;  lse: (batch, heads, seq_q), float32 (float64 for float64)

    Differentiable in q, k, v and a float ``attn_mask`` (its gradient summed over the axes it broadcasts
    along); not in a boolean mask, ``alibi_slopes``, the lengths or lse.  With ``dropout_p > 0`` the seed
    is drawn from torch's default generator unless given, saved, and the backward regenerates the same
    mask; the result is a pure function of the inputs and the seed.  ``deterministic`` is handed to
    the backward (the CPU backward is deterministic anyway; on CUDA it asks for a fixed reduction order).
    Works under ``torch.compile(fullgraph=True)`` (the options must then be Python constants).
    """
    return _call(q, k, v, attn_mask=attn_mask, alibi_slopes=alibi_slopes, seqlens_q=seqlens_q,
                 seqlens_kv=seqlens_kv, cu_seqlens_q=None, cu_seqlens_kv=None, causal=causal, window=window,
                 softcap=softcap, layout=layout, scale=scale, dropout_p=dropout_p, seed=seed, max_seqlen_q=None,
                 max_seqlen_kv=None, return_lse=return_lse, backend=backend, num_threads=num_threads,
                 deterministic=deterministic)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_kv: int | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
    num_threads: int | None = None,
) -> Any:
    """Differentiable :func:`fastattn.flash_attention_varlen` (a packed batch) on torch tensors:
    q (total_q, heads, head_dim), k / v (total_kv, heads_kv, head_dim[_v]), cu_seqlens (batch + 1,) ints;
    out (total_q, heads, head_dim_v), lse (heads, total_q).  Gradients as :func:`flash_attention`."""
    _check_tensor("cu_seqlens_q", cu_seqlens_q, optional=False)
    _check_tensor("cu_seqlens_kv", cu_seqlens_kv, optional=False)
    return _call(q, k, v, attn_mask=None, alibi_slopes=alibi_slopes, seqlens_q=None, seqlens_kv=None,
                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, causal=causal, window=window,
                 softcap=softcap, layout="bshd", scale=scale, dropout_p=dropout_p, seed=seed,
                 max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv, return_lse=return_lse, backend=backend,
                 num_threads=num_threads, deterministic=deterministic)
