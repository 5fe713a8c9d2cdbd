"""The materialized NumPy backend: the oracle for tests, never fast.

It builds the full (seq_q, seq_kv) score matrix of each head in float64, so its memory is
O(seq_q·seq_kv) per head; use it to check, not to run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import like_input
from .._dropout import keep_mask
from .._validate import AttentionSpec
from . import BackendStats, ForwardOutput

NAME = "reference"


def availability() -> str | None:
    return None


def prepare(x: Any) -> np.ndarray:
    return np.asarray(x)


def restore(y: Any, like: Any) -> Any:
    return like_input(y, like)


def describe() -> dict:
    return {"compute": "float64, materialized"}


def materialized(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool,
    scale: float,
    compute_dtype: Any,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Standard attention on 4-D arrays, one (b, h) score matrix at a time.

    Returns (out, lse) in ``compute_dtype``.  Top-left causal mask: query i sees keys
    0..i.  Rows that see no key give output 0 and lse -inf.  Masked keys never contribute: a NaN
    or inf in the V row of a key that query i does not see leaves row i untouched (visible keys
    follow the formula, so a non-finite visible value makes its output column non-finite).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    out = np.zeros((batch, heads, seq_q, head_dim), dtype=compute_dtype)
    lse = np.full((batch, heads, seq_q), -np.inf, dtype=compute_dtype)
    if seq_q == 0 or seq_kv == 0:
        return out, lse
    allowed = None
    if causal:
        allowed = np.arange(seq_kv)[None, :] <= np.arange(seq_q)[:, None]
    for b in range(batch):
        for h in range(heads):
            qh = q[b, h].astype(compute_dtype)
            kh = k[b, h].astype(compute_dtype)
            vh = v[b, h].astype(compute_dtype)
            s = (qh @ kh.T) * compute_dtype(scale)
            if allowed is not None:
                s = np.where(allowed, s, -np.inf)
            m = np.max(s, axis=1, keepdims=True)
            m_safe = np.where(np.isneginf(m), 0.0, m)
            with np.errstate(invalid="ignore", over="ignore"):
                p = np.exp(s - m_safe)
                row_sum = p.sum(axis=1, keepdims=True)
                with np.errstate(divide="ignore"):
                    lse[b, h] = (m_safe + np.log(row_sum))[:, 0]
                p = np.divide(p, row_sum, out=np.zeros_like(p), where=row_sum > 0)
                if dropout_p > 0.0:
                    keep = keep_mask(seed, dropout_p, b, h, seq_q, seq_kv)
                    p = np.where(keep, p / compute_dtype(1.0 - dropout_p), 0.0)
                out[b, h] = _weights_times_values(p, vh, allowed)
            # NaN inputs: a row whose scores hold NaN gives NaN, as the formula says
            nan_rows = np.isnan(s).any(axis=1) | np.isnan(row_sum[:, 0])
            if nan_rows.any():
                out[b, h][nan_rows] = np.nan
                lse[b, h][nan_rows] = np.nan
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


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: AttentionSpec) -> ForwardOutput:
    out, lse = materialized(
        q, k, v, causal=spec.causal, scale=spec.scale, compute_dtype=np.float64,
        dropout_p=spec.dropout_p, seed=spec.seed,
    )
    stats = BackendStats(
        block_q=spec.seq_q, block_kv=spec.seq_kv,
        peak_sram_bytes=spec.seq_q * spec.seq_kv * 8, num_threads=1, simd="numpy",
    )
    with np.errstate(over="ignore"):  # a float64 result beyond the output dtype's range is +-inf there
        return ForwardOutput(out.astype(spec.dtype), lse.astype(spec.lse_dtype), stats)
