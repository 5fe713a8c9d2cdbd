"""Dropout: the Philox4x32-10 keep mask, its statistics, and every backend's agreement with it.

The keep decision for (b, h, i, j) is a pure function of (seed, b, h, i, j) (fastattn._dropout), so
a backend's dropped output must equal the reference's with the same seed, whatever the tiles or
the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from conftest import assert_close_to_reference, random_array, rel_error
from fastattn import FlashAttention, FlashAttentionConfig
from fastattn._dropout import dropout_threshold, keep_mask, philox4x32_10

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 known answers (Random123 kat_vectors: counter words, key words -> output words)

KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    seed = key[0] | (key[1] << 32)  # key = (seed mod 2**32, seed >> 32)
    words = philox4x32_10(counter, seed)
    assert tuple(int(w) for w in words) == expected
    assert all(np.asarray(w).dtype == np.uint32 for w in words)


def test_philox_vectorized_equals_scalar(rng):
    counters = rng.integers(0, 2**32, size=(4, 50), dtype=np.uint64).astype(np.uint32)
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    vec = philox4x32_10(tuple(counters), seed)
    for n in (0, 7, 49):
        one = philox4x32_10(tuple(int(c[n]) for c in counters), seed)
        assert tuple(int(w[n]) for w in vec) == tuple(int(w) for w in one)


def test_dropout_threshold():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert dropout_threshold(0.25) == 2**30
    assert dropout_threshold(1.0 - 2.0**-40) == 2**32 - 1  # clamped into uint32
    assert 0 <= dropout_threshold(np.nextafter(1.0, 0.0)) <= 2**32 - 1


@pytest.mark.parametrize("b,h", [(0, 0), (1, 0), (0, 5), (3, 2)])
def test_keep_mask_is_the_documented_function(b, h):
    seed, p = 0x0123456789ABCDEF, 0.3
    mask = keep_mask(seed, p, b, h, 9, 13)
    threshold = dropout_threshold(p)
    for i in range(9):
        for j in range(13):
            word = philox4x32_10((j >> 2, i, h, b), seed)[j & 3]
            assert mask[i, j] == (int(word) >= threshold), (i, j)


def test_keep_mask_is_pure_in_position():
    # the decision for (i, j) does not depend on the sizes asked for
    big = keep_mask(99, 0.4, 2, 1, 70, 90)
    np.testing.assert_array_equal(keep_mask(99, 0.4, 2, 1, 13, 29), big[:13, :29])
    np.testing.assert_array_equal(keep_mask(99, 0.4, 2, 1, 70, 1), big[:, :1])
    assert keep_mask(99, 0.4, 2, 1, 0, 5).shape == (0, 5)


def test_keep_mask_uses_all_seed_bits():
    low = keep_mask(7, 0.5, 0, 0, 64, 64)
    high = keep_mask(7 + 2**32, 0.5, 0, 0, 64, 64)
    top = keep_mask(7 + 2**63, 0.5, 0, 0, 64, 64)
    assert (low != high).mean() > 0.4 and (low != top).mean() > 0.4


# ---------------------------------------------------------------------------------------------
# statistics of the mask

PS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9]


def _within(rate, expected, n, sigmas):
    sd = np.sqrt(expected * (1 - expected) / n)
    return np.abs(np.asarray(rate) - expected) <= sigmas * sd


@pytest.mark.parametrize("p", PS)
def test_keep_fraction(p):
    n = 512
    mask = keep_mask(20240601 + int(p * 100), p, 1, 2, n, n)
    # one overall fraction: 5 standard deviations of a binomial(n², 1−p) proportion
    assert _within(mask.mean(), 1 - p, n * n, 5), mask.mean()
    # 512 column and 512 row rates: 6 σ each keeps the chance of a false alarm ~1e-6 overall
    assert _within(mask.mean(axis=0), 1 - p, n, 6).all(), "a column's keep rate is off"
    assert _within(mask.mean(axis=1), 1 - p, n, 6).all(), "a row's keep rate is off"
    # the four lanes of one Philox call (j & 3) and even/odd rows behave alike
    for lane in range(4):
        assert _within(mask[:, lane::4].mean(), 1 - p, n * n // 4, 5), lane
    assert _within(mask[::2].mean(), 1 - p, n * n // 2, 5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_has_no_structure(p):
    n = 256
    seed = 4242
    m = keep_mask(seed, p, 0, 0, n, n).astype(np.float64)
    q = 1 - p
    # neighbours (same Philox call, next call, next row) are uncorrelated
    for a, b in [(m[:, :-1], m[:, 1:]), (m[:, :-4], m[:, 4:]), (m[:-1], m[1:])]:
        both = (a * b).mean()
        assert _within(both, q * q, a.size, 6), both
    # different heads, batches and seeds give independent masks: agreement ≈ p² + (1−p)²
    agree = p * p + q * q
    for other in [keep_mask(seed, p, 0, 1, n, n), keep_mask(seed, p, 1, 0, n, n), keep_mask(seed + 1, p, 0, 0, n, n)]:
        assert _within((other == m.astype(bool)).mean(), agree, n * n, 6)


# ---------------------------------------------------------------------------------------------
# backends against the mask and the reference


def _kept_weights(backend, q, k, *, seed, p, causal=False, **kw):
    """The dropped-and-rescaled attention weights, read off with v = identity (seq_kv ≤ head_dim)."""
    seq_kv = k.shape[-2]
    eye = np.zeros(k.shape, dtype=k.dtype)
    eye[..., np.arange(seq_kv), np.arange(seq_kv)] = 1
    out = fastattn.flash_attention(q, k, eye, backend=backend, seed=seed, dropout_p=p, causal=causal, **kw)
    return out[..., :seq_kv]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_backend_mask_is_philox_mask(backend, rng, p, causal):
    batch, heads, seq_q, seq_kv, d = 2, 3, 70, 100, 128
    q = random_array(rng, (batch, heads, seq_q, d), "float64", 0.3)
    k = random_array(rng, (batch, heads, seq_kv, d), "float64", 0.3)
    seed = 0xDEADBEEF12345
    weights = _kept_weights(backend, q, k, seed=seed, p=p, causal=causal, block_size_q=16, block_size_kv=17)
    allowed = np.arange(seq_kv)[None, :] <= np.arange(seq_q)[:, None] if causal else np.ones((seq_q, seq_kv), bool)
    for b in range(batch):
        for h in range(heads):
            want = keep_mask(seed, p, b, h, seq_q, seq_kv) & allowed
            got = weights[b, h] != 0
            np.testing.assert_array_equal(got, want, err_msg=f"keep mask of head (b={b}, h={h})")


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_matches_reference(backend, make_qkv, p, causal, dtype, rtol):
    q, k, v = make_qkv(2, 2, 65, 63, 40, dtype)
    seed = 1000 + int(p * 1000)
    out, lse = fastattn.flash_attention(q, k, v, backend=backend, causal=causal, dropout_p=p, seed=seed,
                                        return_lse=True)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, dropout_p=p, seed=seed, rtol=rtol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dropout_half_precision(backend, make_qkv, dtype):
    q, k, v = make_qkv(1, 2, 50, 70, 32, dtype)
    out = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=0.2, seed=77, causal=True)
    from conftest import reference

    ref, _ = reference(q, k, v, causal=True, dropout_p=0.2, seed=77)
    # computed in float32, rounded once to dtype (unit roundoff u = 2^-11 / 2^-8): the error is at
    # most u + (1 + u)·ε32; see test_attention.test_half_precision for the derivation
    assert rel_error(out, ref) <= {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype] + 2e-5


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1])
def test_seed_range_matches_reference(backend, make_qkv, seed):
    q, k, v = make_qkv(1, 2, 20, 24, 8, "float64")
    out = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=0.5, seed=seed)
    assert_close_to_reference(out, q, k, v, dropout_p=0.5, seed=seed, rtol=1e-12)


def test_mask_invariant_over_blocks_and_threads(backend, rng):
    q = random_array(rng, (2, 2, 45, 64), "float32", 0.3)
    k = random_array(rng, (2, 2, 60, 64), "float32", 0.3)
    masks = []
    for bq, bkv, threads in [(None, None, 1), (1, 1, 2), (3, 17, 2), (16, 64, 1), (64, 16, 2), (1000, 1000, 1)]:
        w = _kept_weights(backend, q, k, seed=31337, p=0.4, causal=True, block_size_q=bq, block_size_kv=bkv,
                          num_threads=threads)
        masks.append(w != 0)
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_output_invariant_over_block_sizes(backend, make_qkv, causal):
    q, k, v = make_qkv(1, 3, 77, 90, 32)
    kw = dict(backend=backend, causal=causal, dropout_p=0.35, seed=2024)
    base = fastattn.flash_attention(q, k, v, **kw)
    for bq, bkv in [(1, 1), (3, 16), (17, 3), (64, 64), (1000, 1000)]:
        out = fastattn.flash_attention(q, k, v, block_size_q=bq, block_size_kv=bkv, **kw)
        assert rel_error(out, base) <= 2e-5, (bq, bkv)
        # the same tiles twice: bitwise
        np.testing.assert_array_equal(out, fastattn.flash_attention(q, k, v, block_size_q=bq, block_size_kv=bkv,
                                                                    **kw))


@pytest.mark.parametrize("blocks", [(None, None), (16, 17), (1, 64)])
def test_dropout_threads_bitwise(backend, make_qkv, blocks):
    q, k, v = make_qkv(2, 3, 100, 80, 48)
    kw = dict(backend=backend, causal=True, dropout_p=0.25, seed=99, block_size_q=blocks[0], block_size_kv=blocks[1])
    one = fastattn.flash_attention(q, k, v, num_threads=1, return_lse=True, **kw)
    for n in (2, 3, 4):
        many = fastattn.flash_attention(q, k, v, num_threads=n, return_lse=True, **kw)
        np.testing.assert_array_equal(many[0], one[0])
        np.testing.assert_array_equal(many[1], one[1])


def test_seed_none_draws_and_reports_a_seed(backend, make_qkv):
    q, k, v = make_qkv(1, 2, 40, 40, 16)
    att = FlashAttention(FlashAttentionConfig(head_dim=16, num_heads=2, dropout_p=0.5), backend)
    first, second = att.forward_multi_head(q, k, v), att.forward_multi_head(q, k, v)
    for res in (first, second):
        assert isinstance(res.seed, int) and 0 <= res.seed < 2**64
    assert first.seed != second.seed  # 64 random bits: equal with probability 2^-64
    assert not np.array_equal(first.output, second.output)
    again = att.forward_multi_head(q, k, v, seed=first.seed)
    assert again.seed == first.seed
    np.testing.assert_array_equal(again.output, first.output)
    functional = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=0.5, seed=first.seed)
    np.testing.assert_array_equal(functional, first.output)
    assert_close_to_reference(first.output, q, k, v, dropout_p=0.5, seed=first.seed, rtol=1e-5)


def test_functional_seed_none_differs_between_calls(backend, make_qkv):
    q, k, v = make_qkv(1, 1, 30, 30, 8)
    a = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=0.5)
    b = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=0.5)
    assert not np.array_equal(a, b)


def test_same_seed_reproduces(backend, make_qkv):
    q, k, v = make_qkv(2, 2, 33, 31, 16)
    kw = dict(backend=backend, dropout_p=0.3, seed=5, causal=True)
    np.testing.assert_array_equal(fastattn.flash_attention(q, k, v, **kw), fastattn.flash_attention(q, k, v, **kw))
    other = fastattn.flash_attention(q, k, v, **{**kw, "seed": 6})
    assert not np.array_equal(other, fastattn.flash_attention(q, k, v, **kw))


@pytest.mark.parametrize("causal", [False, True])
def test_lse_unchanged_by_dropout(backend, make_qkv, causal):
    q, k, v = make_qkv(1, 2, 50, 60, 16)
    _, lse0 = fastattn.flash_attention(q, k, v, backend=backend, causal=causal, return_lse=True)
    _, lse1 = fastattn.flash_attention(q, k, v, backend=backend, causal=causal, dropout_p=0.6, seed=3,
                                       return_lse=True)
    np.testing.assert_allclose(lse1, lse0, rtol=1e-6, atol=1e-6)


def test_zero_dropout_is_no_dropout(backend, make_qkv):
    q, k, v = make_qkv(1, 2, 40, 40, 16)
    plain = fastattn.flash_attention(q, k, v, backend=backend, causal=True)
    seeded = fastattn.flash_attention(q, k, v, backend=backend, causal=True, dropout_p=0.0, seed=12)
    np.testing.assert_array_equal(plain, seeded)


def test_dropout_is_unbiased(backend, make_qkv):
    """Kept weights are scaled by 1/(1−p): the mean over seeds tends to the undropped output."""
    q, k, v = make_qkv(seq_q=8, seq_kv=16, head_dim=4, dtype="float64", lead=())
    p, n = 0.5, 400
    plain = fastattn.flash_attention(q, k, v, backend=backend)
    mean = np.mean([fastattn.flash_attention(q, k, v, backend=backend, dropout_p=p, seed=s) for s in range(n)], axis=0)
    # each output entry is a sum of 16 independent terms w_j·v_j·Bernoulli/(1−p): its spread over n
    # seeds is sqrt(p/(1−p) · Σ (w_j v_j)²) / sqrt(n); allow 6 of those
    w = np.exp(q @ k.T / 2.0)
    w /= w.sum(axis=1, keepdims=True)
    sd = np.sqrt(p / (1 - p) * (w[:, :, None] ** 2 * v[None, :, :] ** 2).sum(axis=1) / n)
    assert np.all(np.abs(mean - plain) <= 6 * sd + 1e-12)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 2.0])
def test_dropout_p_validated(make_qkv, p):
    q, k, v = make_qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.flash_attention(q, k, v, dropout_p=p, seed=1, backend="reference")
    with pytest.raises(ValueError, match="dropout_p"):
        FlashAttentionConfig(head_dim=4, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        FlashAttentionConfig(head_dim=4).with_dropout(p)


def test_dropout_with_empty_sequences(backend):
    z = np.zeros((1, 1, 0, 8), np.float32)
    q = np.ones((1, 1, 3, 8), np.float32)
    out, lse = fastattn.flash_attention(q, z, z, backend=backend, dropout_p=0.5, seed=1, return_lse=True)
    assert np.array_equal(out, np.zeros_like(out)) and np.all(np.isneginf(lse))
    out = fastattn.flash_attention(z, q, q, backend=backend, dropout_p=0.5, seed=1)
    assert out.shape == (1, 1, 0, 8)


@pytest.mark.parametrize("p", [1e-10, 2.0**-33, 1e-9, 1e-6])
def test_tiny_dropout_still_rescales(backend, make_qkv, p):
    """p below 2^-32 gives a drop threshold of 0 (nothing is dropped), but kept weights are still
    scaled by 1/(1−p), as documented and as the reference does: visible at float64 precision."""
    q, k, v = make_qkv(1, 2, 30, 30, 16, "float64")
    out, lse = fastattn.flash_attention(q, k, v, backend=backend, dropout_p=p, seed=3, return_lse=True)
    assert_close_to_reference(out, q, k, v, lse=lse, dropout_p=p, seed=3, rtol=1e-12)


@pytest.mark.parametrize("block_kv", [None, 5, 17, 64, 150])
def test_mask_on_every_simd_path(cpu_backend, rng, block_kv):
    """The CPU kernel draws Philox words for many column groups at once per vector lane and reorders
    them into columns; on every SIMD path (vector widths 4, 8 and 16 lanes), for key tiles that start
    off a multiple of 4 and rows longer than one batch of generators (64 columns), the mask is
    exactly the documented function."""
    import fastattn.backends.cpu as cpu

    seq_q, seq_kv, d = 9, 150, 160
    q = random_array(rng, (1, 2, seq_q, d), "float32", 0.3)
    k = random_array(rng, (1, 2, seq_kv, d), "float32", 0.3)
    seed, p = 987654321987, 0.3
    for path in cpu.simd_paths():
        with cpu.set_simd(path):
            weights = _kept_weights(cpu_backend, q, k, seed=seed, p=p, block_size_kv=block_kv)
        for h in range(2):
            np.testing.assert_array_equal(weights[0, h] != 0, keep_mask(seed, p, 0, h, seq_q, seq_kv),
                                          err_msg=f"{path} path, head {h}, block_kv={block_kv}")
