"""The materialized NumPy backend: the oracle for tests, never fast.

It builds the full (seq_q, seq_kv) score matrix of each head in float64, with every variant written
out explicitly (the visibility matrix and the additive terms of ``fastattn._masks``, tanh for the
softcap, the ALiBi distances), so its memory is O(seq_q·seq_kv) per head; use it to check, not to run.

The backward (``materialized_backward``) is the analytic gradient of that same computation, written
out once, per head, from q, k, v and dout alone (it recomputes the softmax; it does not trust a
given out or lse)::

    z    = scale q kᵀ                       t = tanh(z / c)  (softcap c > 0; else s0 = z)
    s    = c t  (or z)  + alibi + bias      -inf where a key is not visible
    P    = softmax(s)                       Pd = P ∘ keep / (1 - p)     (dropout; else Pd = P)
    out  = Pd v
    dv   = Pdᵀ dout                         dPd = dout vᵀ;  dP = dPd ∘ keep / (1 - p)
    dS   = P ∘ (dP - rowsum(P ∘ dP))        (= dbias: the gradient of the logits; 0 where not visible)
    dz   = dS ∘ (1 - t²)  (softcap; else dS)
    dq   = scale dz k,   dk = scale dzᵀ q   (dk, dv summed over the query heads of a k/v group)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import like_input
from .._dropout import keep_mask
from .._masks import MaskRule, allowed_and_bias
from .._validate import AttentionSpec, MaskArrays, to_host
from . import BackendStats, BackwardOutput, ForwardOutput

NAME = "reference"


def availability() -> str | None:
    return None


def prepare(x: Any) -> np.ndarray:
    return np.asarray(x)


def restore(y: Any, like: Any) -> Any:
    return like_input(y, like)


def check_spec(spec: AttentionSpec) -> None:
    """The reference computes every variant."""


def describe() -> dict:
    return {"compute": "float64, materialized"}


def _softmax_times_values(s: np.ndarray, allowed: np.ndarray, v: np.ndarray, *, dropout_p: float,
                          keep: np.ndarray | None, compute_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(out, lse) of one head: masked scores ``s`` (-inf where not allowed) against values ``v``."""
    seq_q = s.shape[0]
    m = np.max(s, axis=1, keepdims=True) if s.shape[1] else np.full((seq_q, 1), -np.inf)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = np.exp(s - m_safe)
        row_sum = p.sum(axis=1, keepdims=True)
        lse = (m_safe + np.log(row_sum))[:, 0]
        p = np.divide(p, row_sum, out=np.zeros_like(p), where=row_sum > 0)
        if keep is not None:
            p = np.where(keep, p / compute_dtype(1.0 - dropout_p), 0.0)
        out = _weights_times_values(p, v, allowed)
    lse = np.where(row_sum[:, 0] > 0, lse, -np.inf).astype(compute_dtype)
    # NaN inputs: a row whose visible scores hold NaN gives NaN, as the formula says
    nan_rows = np.isnan(s).any(axis=1) | np.isnan(row_sum[:, 0])
    out[nan_rows] = np.nan
    lse[nan_rows] = np.nan
    return out, lse


def _weights_times_values(p: np.ndarray, v: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """``p @ v`` where a masked weight (``allowed`` False) never multiplies its value: 0 * NaN would
    otherwise leak a non-finite value from behind the mask."""
    out = p @ v
    if allowed is None:
        return out
    bad = ~np.isfinite(v)
    if bad.any():
        with np.errstate(invalid="ignore", over="ignore"):
            for c in np.flatnonzero(bad.any(axis=0)):
                out[:, c] = np.where(allowed, p * v[:, c][None, :], 0.0).sum(axis=1)
    return out


def _entries(q: np.ndarray, k: np.ndarray, arrays: MaskArrays, ragged: str) -> list[tuple[int, int, int, int, int]]:
    """Each batch entry as (view entry, first query row, queries, first key row, keys)."""
    if ragged == "packed":
        cu_q, cu_kv = to_host(arrays.cu_seqlens_q).astype(np.int64), to_host(arrays.cu_seqlens_kv).astype(np.int64)
        return [(0, int(cu_q[b]), int(cu_q[b + 1] - cu_q[b]), int(cu_kv[b]), int(cu_kv[b + 1] - cu_kv[b]))
                for b in range(cu_q.size - 1)]
    lens_q = arrays.lens_q if arrays.lens_q is not None else np.full(q.shape[0], q.shape[2])
    lens_kv = arrays.lens_kv if arrays.lens_kv is not None else np.full(q.shape[0], k.shape[2])
    return [(b, 0, int(lens_q[b]), 0, int(lens_kv[b])) for b in range(q.shape[0])]


def _head_logits(qh: np.ndarray, kh: np.ndarray, b: int, h: int, *, scale: float, rule: MaskRule,
                 arrays: MaskArrays, slopes: np.ndarray | None,
                 compute_dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(logits, allowed, tanh) of query head h of entry b: scale q.kᵀ, the softcap, ALiBi (``slopes``: the host
    copy of arrays.alibi_slopes) and the bias added, -inf where a key is not visible; tanh(scale q.kᵀ /
    softcap) for the softcap's derivative (None without)."""
    lq, lk = qh.shape[0], kh.shape[0]
    s = (qh @ kh.T) * compute_dtype(scale)
    tanh_z = None
    if rule.softcap > 0.0:
        tanh_z = np.tanh(s / compute_dtype(rule.softcap))
        s = compute_dtype(rule.softcap) * tanh_z
    mask = arrays.attn_mask
    mask_bh = to_host(mask[b, h, :lq, :lk]) if mask is not None else None
    allowed, add = allowed_and_bias(
        rule, lq, lk, bool_mask=mask_bh if rule.mask == "bool" else None,
        bias=mask_bh if rule.mask == "bias" else None,
        slope=None if slopes is None else slopes[b if slopes.shape[0] > 1 else 0, h], dtype=compute_dtype,
    )
    if add is not None:
        with np.errstate(invalid="ignore"):
            s = s + add
    return np.where(allowed, s, -np.inf), allowed, tanh_z


def materialized(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    scale: float,
    compute_dtype: Any,
    dropout_p: float = 0.0,
    seed: int | None = None,
    rule: MaskRule | None = None,
    arrays: MaskArrays | None = None,
    ragged: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Standard attention on (batch, heads, seq, head_dim) views, one score matrix at a time.

    Returns (out, lse) in ``compute_dtype``: out (batch, heads_q, seq_q, head_dim_v), lse
    (batch, heads_q, seq_q).  k and v may have fewer heads (query head h reads k/v head
    h // (heads_q // heads_kv)).  ``rule`` and ``arrays`` give the mask (``fastattn._masks``); without
    them ``causal`` is the top-left causal mask.  ``ragged="padded"``: rows past ``lens_q[b]`` and keys
    past ``lens_kv[b]`` do not exist; ``"packed"``: q/k/v hold one entry of all sequences end to end,
    ``cu_seqlens`` say where each starts.  Rows that see no key give output 0 and lse -inf.
    Masked keys never contribute: a NaN or inf in the V row of a key that query i does not see
    leaves row i untouched (visible keys follow the formula).
    """
    rule = rule if rule is not None else MaskRule(causal=causal)
    arrays = arrays if arrays is not None else MaskArrays()
    heads_q, heads_kv = q.shape[1], k.shape[1]
    group = heads_q // heads_kv if heads_kv else 1
    head_dim_v = v.shape[3]
    out = np.zeros((*q.shape[:3], head_dim_v), dtype=compute_dtype)
    lse = np.full(q.shape[:3], -np.inf, dtype=compute_dtype)
    entries = _entries(q, k, arrays, ragged)
    slopes = to_host(arrays.alibi_slopes).astype(np.float64) if arrays.alibi_slopes is not None else None
    for b, (src, q0, lq, k0, lk) in enumerate(entries):
        if lq == 0:
            continue
        for h in range(heads_q):
            qh = q[src, h, q0:q0 + lq].astype(compute_dtype)
            kh = k[src, h // group, k0:k0 + lk].astype(compute_dtype)
            vh = v[src, h // group, k0:k0 + lk].astype(compute_dtype)
            s, allowed, _ = _head_logits(qh, kh, b, h, scale=scale, rule=rule, arrays=arrays,
                                         slopes=slopes, compute_dtype=compute_dtype)
            keep = keep_mask(seed, dropout_p, b, h, lq, lk) if dropout_p > 0.0 else None
            o, l_ = _softmax_times_values(s, allowed if (rule.has_interval or rule.mask == "bool") else None, vh,
                                          dropout_p=dropout_p, keep=keep, compute_dtype=compute_dtype)
            out[src, h, q0:q0 + lq] = o
            lse[src, h, q0:q0 + lq] = l_
    return out, lse


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: AttentionSpec) -> ForwardOutput:
    out, lse = materialized(
        q, k, v, scale=spec.scale, compute_dtype=np.float64, dropout_p=spec.dropout_p, seed=spec.seed,
        rule=spec.rule, arrays=spec.arrays, ragged=spec.ragged,
    )
    stats = BackendStats(
        block_q=spec.seq_q, block_kv=spec.seq_kv,
        peak_sram_bytes=spec.seq_q * spec.seq_kv * 8, num_threads=1, simd="numpy",
    )
    with np.errstate(over="ignore"):  # a float64 result beyond the output dtype's range is +-inf there
        return ForwardOutput(out.astype(spec.dtype), lse.astype(spec.lse_dtype), stats)


def materialized_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    compute_dtype: Any,
    dropout_p: float = 0.0,
    seed: int | None = None,
    rule: MaskRule | None = None,
    arrays: MaskArrays | None = None,
    ragged: str = "none",
    want_dbias: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The gradients (dq, dk, dv, dbias) of :func:`materialized`'s output against ``dout``, in
    ``compute_dtype``, from the same (batch, heads, seq, head_dim) views (see the module docstring).

    dbias (only with ``want_dbias``) is the full (batch, heads_q, seq_q, seq_kv) gradient of the
    logits; rows and keys that do not exist (ragged batches) and hidden keys get 0.
    """
    rule = rule if rule is not None else MaskRule()
    arrays = arrays if arrays is not None else MaskArrays()
    heads_q, heads_kv = q.shape[1], k.shape[1]
    group = heads_q // heads_kv if heads_kv else 1
    dq = np.zeros(q.shape, dtype=compute_dtype)
    dk = np.zeros(k.shape, dtype=compute_dtype)
    dv = np.zeros(v.shape, dtype=compute_dtype)
    dbias = np.zeros((*q.shape[:3], k.shape[2]), dtype=compute_dtype) if want_dbias else None
    entries = _entries(q, k, arrays, ragged)
    slopes = to_host(arrays.alibi_slopes).astype(np.float64) if arrays.alibi_slopes is not None else None
    one = compute_dtype(1.0)
    for b, (src, q0, lq, k0, lk) in enumerate(entries):
        if lq == 0 or lk == 0:
            continue
        for h in range(heads_q):
            hk = h // group
            qh = q[src, h, q0:q0 + lq].astype(compute_dtype)
            kh = k[src, hk, k0:k0 + lk].astype(compute_dtype)
            vh = v[src, hk, k0:k0 + lk].astype(compute_dtype)
            doh = dout[src, h, q0:q0 + lq].astype(compute_dtype)
            s, allowed, tanh_z = _head_logits(qh, kh, b, h, scale=scale, rule=rule, arrays=arrays,
                                              slopes=slopes, compute_dtype=compute_dtype)
            m = np.max(s, axis=1, keepdims=True)
            m = np.where(np.isneginf(m), 0.0, m)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                p = np.exp(s - m)
                row_sum = p.sum(axis=1, keepdims=True)
                # a row that sees no key has P = 0; a NaN row (NaN or inf - inf scores) stays NaN, as forward
                p = np.divide(p, row_sum, out=np.where(np.isnan(row_sum), np.nan, np.zeros_like(p)), where=row_sum > 0)
                if dropout_p > 0.0:
                    keep = keep_mask(seed, dropout_p, b, h, lq, lk)
                    drop_scale = np.where(keep, one / compute_dtype(1.0 - dropout_p), 0.0).astype(compute_dtype)
                else:
                    drop_scale = None
                pd = p if drop_scale is None else p * drop_scale
                dd = doh @ vh.T
                dp = dd if drop_scale is None else dd * drop_scale
                dp = np.where(allowed, dp, 0.0)  # a hidden key's V never reaches the gradient
                ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))
                ds = np.where(allowed, ds, 0.0)
                dz = ds if tanh_z is None else np.where(allowed, ds * (one - tanh_z * tanh_z), 0.0)
                # a hidden (query, key) pair never multiplies its k or q row: 0 * inf would leak a NaN
                dq[src, h, q0:q0 + lq] = _weights_times_values(dz, kh, allowed) * compute_dtype(scale)
                dk[src, hk, k0:k0 + lk] += _weights_times_values(dz.T, qh, allowed.T) * compute_dtype(scale)
                dv[src, hk, k0:k0 + lk] += _weights_times_values(pd.T, doh, allowed.T)
            if dbias is not None:
                dbias[src, h, q0:q0 + lq, k0:k0 + lk] = ds
    return dq, dk, dv, dbias


def backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, lse: np.ndarray,
             spec: AttentionSpec, *, want_dbias: bool = False, deterministic: bool = False) -> BackwardOutput:
    """float64 analytic gradients, recomputed from q, k, v and dout (out and lse are not read)."""
    dq, dk, dv, dbias = materialized_backward(
        dout, q, k, v, scale=spec.scale, compute_dtype=np.float64, dropout_p=spec.dropout_p, seed=spec.seed,
        rule=spec.rule, arrays=spec.arrays, ragged=spec.ragged, want_dbias=want_dbias,
    )
    stats = BackendStats(block_q=spec.seq_q, block_kv=spec.seq_kv, peak_sram_bytes=spec.seq_q * spec.seq_kv * 8,
                         num_threads=1, simd="numpy")
    with np.errstate(over="ignore"):
        return BackwardOutput(dq.astype(spec.dtype), dk.astype(spec.dtype), dv.astype(spec.dtype),
                              None if dbias is None else dbias.astype(spec.lse_dtype), stats)
