"""The dropout keep mask: one definition shared by every backend.

The keep/drop decision for score element ``(b, h, i, j)`` is a pure function of
``(seed, b, h, i, j)``, so it does not depend on tile sizes, thread counts or the
backend.  It is drawn from the counter-based generator Philox4x32-10:

    key     = (seed mod 2**32, seed >> 32)
    counter = (j >> 2, i, h, b)            (each taken mod 2**32)
    word    = Philox4x32_10(counter, key)[j & 3]
    keep    = word >= threshold,  threshold = min(floor(p * 2**32), 2**32 - 1)

so the probability of dropping an element is threshold / 2**32 (p to within 2**-32).
Kept weights are scaled by 1 / (1 - p).  The CPU kernel (``kernels/philox.h``) and the
CUDA kernel (``cuda/kernels/philox.cuh``) implement exactly this; this module is the
NumPy twin used by the reference backend and the tests.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold under which a Philox word means "drop"."""
    return min(int(np.floor(p * 2.0**32)), 2**32 - 1)


def _mulhilo(m: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prod = np.uint64(m) * x.astype(np.uint64)
    return (prod >> np.uint64(32)).astype(np.uint32), (prod & _MASK32).astype(np.uint32)


def philox4x32_10(counter: tuple[np.ndarray, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Vectorized Philox4x32-10 over broadcastable uint32 counter words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in counter)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    for rnd in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if rnd + 1 < PHILOX_ROUNDS:
            k0 = np.uint32((int(k0) + PHILOX_W0) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + PHILOX_W1) & 0xFFFFFFFF)
    return c0, c1, c2, c3


def keep_mask(seed: int, p: float, b: int, h: int, seq_q: int, seq_kv: int) -> np.ndarray:
    """Boolean (seq_q, seq_kv) keep mask of head (b, h): True where the weight is kept."""
    i = np.arange(seq_q, dtype=np.uint64)[:, None] & _MASK32
    j = np.arange(seq_kv, dtype=np.uint64)[None, :]
    words = philox4x32_10(
        ((j >> np.uint64(2)) & _MASK32, i, np.uint64(h) & _MASK32, np.uint64(b) & _MASK32), seed
    )
    lane = (j & np.uint64(3)).astype(np.intp)
    stacked = np.stack(np.broadcast_arrays(*words), axis=-1)
    chosen = np.take_along_axis(stacked, np.broadcast_to(lane, (seq_q, seq_kv))[..., None], axis=-1)[..., 0]
    return chosen >= np.uint32(dropout_threshold(p))


def draw_seed() -> int:
    """A fresh 64-bit seed from the OS entropy pool."""
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
