"""The mask, written once: which keys a query sees, and what is added to its logits.

For batch entry b with ``Lq`` query rows and ``Lk`` keys (the padded lengths, or ``seqlens_q[b]`` /
``seqlens_kv[b]``, or the packed sequence's lengths), query row ``i`` (``0 <= i < Lq``) and key ``j``
(``0 <= j < Lk``), with ``off = Lk - Lq`` when the alignment is bottom-right and 0 otherwise::

    visible(i, j) = (not causal           or  j <= i + off)
                and (window_left  < 0     or  j >= i + off - window_left)
                and (window_right < 0     or  j <= i + off + window_right)
                and (no boolean mask      or  attn_mask[b, h, i, j])

    logit(i, j)   = scale * q_i . k_j
                    -> softcap * tanh(logit / softcap)             (softcap > 0)
                    -  alibi_slope[b, h] * |i + Lk - Lq - j|       (alibi_slopes given)
                    +  attn_mask[b, h, i, j]                        (a float mask: an additive bias)

The first three conditions make the visible keys of a row one interval ``[lo(i), hi(i))`` whose ends
never decrease with ``i``: kernels skip every key tile outside the union of a query tile's
intervals, and the boolean mask only thins an interval.  A row with no visible key (``i >= Lq``
included) gives output 0 and lse -inf.  Masked keys never contribute, whatever their values.

This module is the NumPy statement of those rules (the reference backend and the tests use it, and
``attended_pairs`` counts FLOPs with it); the kernels implement the same rules tile by tile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CAUSAL_SPELLINGS = {False: "none", True: "top_left", "top_left": "top_left", "bottom_right": "bottom_right"}


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """The interval part of the mask plus the logit modifiers' switches (arrays live elsewhere)."""

    causal: bool = False
    bottom_right: bool = False  # alignment of the causal mask and the window: off = Lk - Lq
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi: bool = False
    mask: str = "none"  # "none", "bool" (True = may attend) or "bias" (added to the logits)

    @property
    def has_interval(self) -> bool:
        return self.causal or self.window_left >= 0 or self.window_right >= 0

    @property
    def modifies_logits(self) -> bool:
        return self.softcap > 0.0 or self.alibi or self.mask == "bias"

    def offset(self, len_q: int, len_k: int) -> int:
        return len_k - len_q if self.bottom_right else 0

    def key_range(self, rows: np.ndarray, len_q: int, len_k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi)`` of the keys each query row in ``rows`` may see (before a boolean mask)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.bounds(rows + self.offset(len_q, len_k), np.zeros_like(rows), np.full_like(rows, len_k),
                           len_k, np.minimum, np.maximum)

    def bounds(self, pos: Any, lo: Any, hi: Any, len_k: int, lower: Any = min, upper: Any = max) -> tuple[Any, Any]:
        """The rule itself: ``[lo, hi)`` narrowed for query position(s) ``pos`` (bottom-right offset included),
        clipped to the keys.  ``lower`` / ``upper``: the elementwise min / max of the operands' kind (builtins
        for Python ints, NumPy's for arrays)."""
        if self.causal:
            hi = lower(hi, pos + 1)
        if self.window_right >= 0:
            hi = lower(hi, pos + self.window_right + 1)
        if self.window_left >= 0:
            lo = upper(lo, pos - self.window_left)
        lo, hi = lower(upper(lo, 0), len_k), lower(upper(hi, 0), len_k)
        return lo, upper(hi, lo)


def allowed_and_bias(rule: MaskRule, len_q: int, len_k: int, *, bool_mask: np.ndarray | None = None,
                     bias: np.ndarray | None = None, slope: float | None = None,
                     dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray | None]:
    """The explicit (len_q, len_k) visibility matrix and additive term (ALiBi + bias; softcap apart)."""
    lo, hi = rule.key_range(np.arange(len_q), len_q, len_k)
    cols = np.arange(len_k)[None, :]
    allowed = (cols >= lo[:, None]) & (cols < hi[:, None])
    if bool_mask is not None:
        allowed &= np.asarray(bool_mask, dtype=bool)
    add = None
    if slope is not None:
        rel = np.arange(len_q)[:, None] + (len_k - len_q) - cols
        add = (-float(slope) * np.abs(rel)).astype(dtype)
    if bias is not None:
        add = np.asarray(bias, dtype=dtype) if add is None else add + np.asarray(bias, dtype=dtype)
    return allowed, add


def attended_pairs(rule: MaskRule, len_q: int, len_k: int) -> int:
    """Visible (query, key) pairs of one head under the interval part of the mask, in O(1).

    A row's count is built from 0, len_k and bounds pos + c (pos = row + offset; c one of 1,
    right + 1 and -left) by min, max and clipping, all of slope 0 or 1 in the row: it is linear
    between the rows where some pos + c meets 0 or len_k (two such bounds are parallel and never
    meet), so the sum is an arithmetic series on each piece between those rows."""
    if len_q <= 0 or len_k <= 0:
        return 0
    if not rule.has_interval:
        return len_q * len_k
    off = rule.offset(len_q, len_k)
    slopes = [1] if rule.causal else []
    if rule.window_right >= 0:
        slopes.append(rule.window_right + 1)
    if rule.window_left >= 0:
        slopes.append(-rule.window_left)
    cuts = {0, len_q}
    for c in slopes:
        for edge in (0, len_k):
            row = edge - c - off
            if 0 < row < len_q:
                cuts.add(row)
    cuts_sorted = sorted(cuts)
    total = 0
    for a, b in zip(cuts_sorted, cuts_sorted[1:], strict=False):  # rows a .. b - 1: one linear piece
        (lo_a, hi_a), (lo_b, hi_b) = rule.bounds(a + off, 0, len_k, len_k), rule.bounds(b - 1 + off, 0, len_k, len_k)
        total += (hi_a - lo_a + hi_b - lo_b) * (b - a) // 2
    return total
