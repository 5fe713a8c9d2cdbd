"""Correctness of flash_attention against the float64 materialized reference.

Backend × dtype × shape, awkward sizes on purpose (1, 7, 63, 65, 1000; head_dim 1, 3, 80, 96...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from conftest import RTOL, assert_close_to_reference, cpu_required, dtype_of, random_array, reference, rel_error
from fastattn._validate import attended_pairs

SEQS = [1, 7, 63, 64, 65, 1000]
HEAD_DIMS = [1, 3, 8, 80, 96, 128, 256]
BLOCKS = [1, 3, 16, 17, 64, 1000]


def call(q, k, v, backend, **kw):
    return fastattn.flash_attention(q, k, v, backend=backend, return_lse=True, **kw)


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", SEQS)
def test_square_sequences(backend, make_qkv, seq, causal, dtype):
    q, k, v = make_qkv(1, 2, seq, seq, 64, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(backend, make_qkv, head_dim, causal, dtype):
    q, k, v = make_qkv(1, 1, 65, 63, head_dim, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_kv", [(1, 1000), (1000, 7), (7, 65), (65, 7), (63, 64), (64, 1), (1, 63),
                                          (17, 1000)])
def test_seq_q_differs_from_seq_kv(backend, make_qkv, seq_q, seq_kv, causal, dtype):
    q, k, v = make_qkv(2, 1, seq_q, seq_kv, 40, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=RTOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_batch_and_heads_are_independent(backend, make_qkv, causal):
    q, k, v = make_qkv(3, 4, 33, 47, 16, "float64")
    out, lse = call(q, k, v, backend, causal=causal)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=1e-12)
    for b in range(3):
        for h in range(4):
            o2, l2 = call(q[b, h], k[b, h], v[b, h], backend, causal=causal)
            np.testing.assert_allclose(out[b, h], o2, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(lse[b, h], l2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_ranks_give_shapes_and_dtypes_back(backend, make_qkv, rank):
    lead = {2: (), 3: (3,), 4: (2, 3)}[rank]
    q, k, v = make_qkv(seq_q=19, seq_kv=23, head_dim=8, lead=lead)
    out, lse = call(q, k, v, backend)
    assert out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == q.shape[:-1] and lse.dtype == np.float32
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert_close_to_reference(out, q, k, v, lse=lse, rtol=1e-5)
    plain = fastattn.flash_attention(q, k, v, backend=backend)
    np.testing.assert_array_equal(plain, out)


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 4.0])
def test_explicit_scale(backend, make_qkv, scale):
    q, k, v = make_qkv(1, 2, 31, 29, 12, "float64")
    out, lse = call(q, k, v, backend, scale=scale, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, scale=scale, lse=lse, rtol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim(backend, make_qkv):
    q, k, v = make_qkv(1, 1, 20, 20, 25, "float64")
    default = fastattn.flash_attention(q, k, v, backend=backend)
    explicit = fastattn.flash_attention(q, k, v, backend=backend, scale=0.2)
    np.testing.assert_allclose(default, explicit, rtol=1e-13, atol=1e-15)


def test_inputs_not_modified(backend, make_qkv):
    q, k, v = make_qkv(2, 2, 30, 30, 16)
    copies = [x.copy() for x in (q, k, v)]
    call(q, k, v, backend, causal=True, dropout_p=0.3, seed=1)
    for x, c in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(x, c)


def test_auto_picks_cpu_when_built(make_qkv):
    q, k, v = make_qkv(1, 1, 8, 8, 8)
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8)).forward_multi_head(q, k, v)
    want = "cpu" if "cpu" in fastattn.available_backends() else "reference"
    if want == "reference" and cpu_required():
        pytest.fail("FASTATTN_REQUIRE_CPU is set but the cpu backend is not available")
    assert res.backend == want


def test_standard_attention_matches_reference(make_qkv):
    q, k, v = make_qkv(2, 2, 21, 34, 16, "float32")
    out = fastattn.standard_attention(q, k, v, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the causal mask, built by hand


def _hand_masked_attention(q, k, v, mask, scale):
    """Independent float64 oracle: masked softmax from an explicit 0/1 matrix."""
    s = (q.astype(np.float64) @ k.astype(np.float64).T) * scale
    s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v.astype(np.float64)


@pytest.mark.parametrize("seq_q,seq_kv", [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)])
def test_causal_mask_is_top_left_aligned(backend, make_qkv, seq_q, seq_kv):
    q, k, v = make_qkv(seq_q=seq_q, seq_kv=seq_kv, head_dim=4, dtype="float64", lead=())
    # query i sees keys 0..i, whatever seq_kv is: e.g. (3, 5) is
    #   1 0 0 0 0
    #   1 1 0 0 0
    #   1 1 1 0 0
    mask = np.zeros((seq_q, seq_kv), dtype=bool)
    for i in range(seq_q):
        for j in range(seq_kv):
            mask[i, j] = j <= i
    if (seq_q, seq_kv) == (3, 5):
        assert mask.astype(int).tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    want = _hand_masked_attention(q, k, v, mask, 0.5)
    out = fastattn.flash_attention(q, k, v, causal=True, backend=backend)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)


def test_causal_row_equals_noncausal_on_its_prefix(backend, make_qkv):
    q, k, v = make_qkv(seq_q=40, seq_kv=25, head_dim=8, dtype="float64", lead=())
    out = fastattn.flash_attention(q, k, v, causal=True, backend=backend)
    for i in (0, 1, 12, 24, 25, 39):
        n = min(i + 1, 25)
        row = fastattn.flash_attention(q[i:i + 1], k[:n], v[:n], backend=backend)
        np.testing.assert_allclose(out[i], row[0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# strided, transposed, reversed inputs


def _views(rng):
    base = random_array(rng, (2, 37, 3, 32), "float32")  # (batch, seq, heads, dim)
    wide = random_array(rng, (2, 3, 74, 64), "float32")
    return {
        "transposed": base.transpose(0, 2, 1, 3),
        "every_other_seq": wide[:, :, ::2, :32],
        "reversed_seq": wide[:, :, ::-2, 16:48],
        "every_other_dim": wide[:, :, :37, ::2],
        "reversed_dim": wide[:, :, 5:42, ::-2],
        "fortran": np.asfortranarray(base.transpose(0, 2, 1, 3)),
        "reversed_batch_heads": wide[::-1, ::-1, 3:40, 32:],
        "packed_struct_field": _struct_field(rng, (2, 3, 37, 32)),
    }


def _struct_field(rng, shape):
    """A float32 field of a packed record array: byte strides (5 per element) not a multiple of 4."""
    rec = np.zeros(shape, dtype=np.dtype([("x", "<f4"), ("tag", "u1")]))
    rec["x"] = random_array(rng, shape)
    view = rec["x"]
    assert view.strides[-1] == 5
    return view


@pytest.mark.parametrize("kind", ["transposed", "every_other_seq", "reversed_seq", "every_other_dim",
                                  "reversed_dim", "fortran", "reversed_batch_heads", "packed_struct_field"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(backend, rng, kind, causal):
    views = [_views(rng)[kind] for _ in range(3)]
    q, k, v = views
    assert q.shape == (2, 3, 37, 32)
    if kind != "fortran":
        assert not q.flags.c_contiguous
    out, lse = call(q, k, v, backend, causal=causal)
    assert out.flags.c_contiguous or out.flags.f_contiguous or True  # layout of the result is free
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=1e-5)
    contiguous = call(*(np.ascontiguousarray(x) for x in views), backend, causal=causal)
    np.testing.assert_allclose(out, contiguous[0], rtol=1e-5, atol=1e-6)


def test_q_reversed_in_seq(backend, make_qkv):
    q, k, v = make_qkv(1, 2, 30, 30, 16)
    out, lse = call(q[:, :, ::-1], k, v, backend)
    assert_close_to_reference(out, q[:, :, ::-1], k, v, lse=lse, rtol=1e-5)


def test_zero_stride_along_seq_and_dim(backend, rng):
    q = random_array(rng, (1, 2, 15, 8))
    k = np.broadcast_to(random_array(rng, (1, 2, 1, 8)), (1, 2, 21, 8))  # one key repeated
    v = np.broadcast_to(random_array(rng, (1, 2, 21, 1)), (1, 2, 21, 8))  # constant along head_dim
    out, lse = call(q, k, v, backend, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)


def test_broadcast_zero_stride_inputs(backend, rng):
    # a (1, 1, seq, d) array broadcast over heads has stride 0 on the head axis
    k0 = random_array(rng, (1, 1, 21, 8))
    v0 = random_array(rng, (1, 1, 21, 8))
    q = random_array(rng, (2, 3, 13, 8))
    k, v = np.broadcast_to(k0, (2, 3, 21, 8)), np.broadcast_to(v0, (2, 3, 21, 8))
    out, lse = call(q, k, v, backend, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# block sizes


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_kv", BLOCKS)
@pytest.mark.parametrize("block_q", BLOCKS)
def test_block_sizes_agree(backend, make_qkv, block_q, block_kv, causal):
    q, k, v = make_qkv(1, 2, 65, 70, 24)
    out, lse = call(q, k, v, backend, causal=causal, block_size_q=block_q, block_size_kv=block_kv)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=1e-5)
    default, _ = call(q, k, v, backend, causal=causal)
    assert rel_error(out, default) <= 2e-5
    if backend == "cpu":  # explicit tile sizes are honoured (a tile longer than the sequence may be clamped to it)
        cfg = fastattn.FlashAttentionConfig(head_dim=24, num_heads=2, block_size_q=block_q, block_size_kv=block_kv)
        res = fastattn.FlashAttention(cfg, backend).forward_multi_head(q, k, v)
        assert res.block_size_q in (block_q, min(block_q, 65))
        assert res.block_size_kv in (block_kv, min(block_kv, 70))


@pytest.mark.parametrize("block_q,block_kv", [(1, 1), (3, 17), (16, 64), (17, 3)])
def test_explicit_block_sizes_reported(cpu_backend, make_qkv, block_q, block_kv):
    q, k, v = make_qkv(1, 1, 100, 100, 16)
    cfg = fastattn.FlashAttentionConfig(head_dim=16, block_size_q=block_q, block_size_kv=block_kv)
    res = fastattn.FlashAttention(cfg, backend=cpu_backend).forward(q[0, 0], k[0, 0], v[0, 0])
    assert (res.block_size_q, res.block_size_kv) == (block_q, block_kv)


# ---------------------------------------------------------------------------------------------
# flops and the tile working set


@pytest.mark.parametrize("seq_q,seq_kv", [(1, 1), (7, 65), (65, 7), (64, 64), (100, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_flops(backend, make_qkv, seq_q, seq_kv, causal):
    q, k, v = make_qkv(2, 3, seq_q, seq_kv, 12)
    cfg = fastattn.FlashAttentionConfig(head_dim=12, num_heads=3, causal=causal)
    res = fastattn.FlashAttention(cfg, backend=backend).forward_multi_head(q, k, v)
    mask = np.arange(seq_kv)[None, :] <= np.arange(seq_q)[:, None] if causal else np.ones((seq_q, seq_kv), bool)
    pairs = int(mask.sum())
    assert attended_pairs(seq_q, seq_kv, causal) == pairs
    assert res.flops == 4 * 12 * pairs * 2 * 3
    assert isinstance(res.flops, int)
    if causal and seq_q == seq_kv == 64:
        full = 4 * 12 * 64 * 64 * 6
        assert res.flops == (full + 4 * 12 * 64 * 6) // 2  # about half: n(n+1)/2 pairs


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("blocks", [(None, None), (16, 32), (17, 3), (64, 64)])
def test_peak_sram_is_the_tile_working_set(cpu_backend, make_qkv, dtype, blocks):
    from fastattn.backends.cpu import _tiles

    q, k, v = make_qkv(1, 2, 200, 150, 48, dtype)
    cfg = fastattn.FlashAttentionConfig(head_dim=48, num_heads=2, block_size_q=blocks[0], block_size_kv=blocks[1])
    res = fastattn.FlashAttention(cfg, backend=cpu_backend).forward_multi_head(q, k, v)
    itemsize = 8 if dtype == "float64" else 4
    assert res.peak_sram_bytes > 0
    assert res.peak_sram_bytes == _tiles.working_set_bytes(res.block_size_q, res.block_size_kv, 48, itemsize)
    if blocks[0] is not None:
        assert (res.block_size_q, res.block_size_kv) == blocks
    else:  # one place picks tile sizes; a tile is never longer than its sequence nor the cache-sized one
        assert (res.block_size_q, res.block_size_kv) == _tiles.choose_tiles(48, itemsize, seq_q=200, seq_kv=150)
        cache_q, cache_kv = _tiles.choose_tiles(48, itemsize)
        assert res.block_size_q <= min(cache_q, 200) and res.block_size_kv <= min(cache_kv, 150)
        assert -(-200 // res.block_size_q) == -(-200 // min(cache_q, 200))  # evened out, not more tiles


def test_peak_sram_positive(backend, make_qkv):
    q, k, v = make_qkv(1, 1, 10, 10, 8)
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8), backend=backend).forward(
        q[0, 0], k[0, 0], v[0, 0])
    assert res.peak_sram_bytes > 0
    assert res.backend == backend
    assert res.num_threads >= 1 and res.block_size_q >= 1 and res.block_size_kv >= 1


# ---------------------------------------------------------------------------------------------
# empty sequences, rows without keys, non-finite inputs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empty_query_sequence(backend, make_qkv, causal, dtype):
    q, k, v = make_qkv(2, 3, 0, 9, 8, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert out.shape == (2, 3, 0, 8) and out.dtype == np.dtype(dtype)
    assert lse.shape == (2, 3, 0) and lse.dtype == np.dtype(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_empty_key_sequence(backend, make_qkv, causal, dtype):
    q, k, v = make_qkv(2, 3, 5, 0, 8, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.array_equal(out, np.zeros_like(out)) and not np.isnan(out.astype(np.float64)).any()
    assert lse.shape == (2, 3, 5)
    assert np.all(np.isneginf(lse))


def test_empty_both(backend):
    z = np.zeros((0, 4), np.float32)
    out, lse = call(z, z, z, backend)
    assert out.shape == (0, 4) and lse.shape == (0,)


def _run_with_deadline(fn, seconds=60.0):
    """Runs fn in a daemon thread; fails (instead of hanging the suite) if it does not return."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"call did not return within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_in_a_q_row(backend, make_qkv, value, causal, dtype):
    q, k, v = make_qkv(1, 2, 40, 40, 16, dtype)
    q[0, 1, 17, 3] = value
    out, lse = _run_with_deadline(lambda: call(q, k, v, backend, causal=causal))
    # the poisoned row is NaN (as the reference: inf·k gives ±inf scores, inf − inf = NaN); others untouched
    assert np.isnan(out[0, 1, 17]).all() and np.isnan(lse[0, 1, 17])
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=RTOL[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_in_a_k_row(backend, make_qkv, value, causal):
    q, k, v = make_qkv(1, 1, 40, 40, 16, "float64")
    k[0, 0, 20, 5] = value
    out, lse = _run_with_deadline(lambda: call(q, k, v, backend, causal=causal))
    # rows that see key 20 are NaN; with causal, rows 0..19 never see it and stay exact
    # (an inf entry gives +inf or -inf scores by the sign of q: rows with +inf are NaN, as in the reference)
    if np.isnan(value):
        seen = slice(20, None) if causal else slice(None)
        assert np.isnan(out[0, 0, seen]).all() and np.isnan(lse[0, 0, seen]).all()
    if causal:
        assert np.isfinite(out[0, 0, :20]).all() and np.isfinite(lse[0, 0, :20]).all()
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, rtol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_a_v_row(backend, make_qkv, causal):
    q, k, v = make_qkv(1, 1, 40, 40, 16, "float64")
    v[0, 0, 20] = np.nan
    out, lse = _run_with_deadline(lambda: call(q, k, v, backend, causal=causal))
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    # every row that attends to key 20 gives a NaN output row; lse does not involve v
    assert np.isnan(out[0, 0, 20:]).all()
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12)
    if not causal:
        assert np.isnan(out).all()
    else:
        # rows 0..19 do not see key 20: masked keys never contribute, so they are exact
        clean_out, _ = reference(q[..., :20, :], k[..., :20, :], v[..., :20, :], causal=True)
        np.testing.assert_allclose(out[0, 0, :20], clean_out[0, 0], rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_finite_scores_do_not_overflow(backend, make_qkv):
    q, k, v = make_qkv(1, 1, 50, 50, 8, "float32")
    q *= 300.0  # scores in the hundreds: exp overflows float32 unless the running max is subtracted
    out, lse = call(q, k, v, backend, causal=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-4, lse_atol=1e-2)


# ---------------------------------------------------------------------------------------------
# half precision, judged fairly


_UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def _naive_same_precision(q, k, v, causal, scale, dtype):
    """Materialized attention rounding every intermediate (S, P, row sums, P/l, O) to ``dtype``,
    with float32 products and sums (the usual mixed-precision matmul)."""
    dt = dtype_of(dtype)

    def rnd(x):
        return np.asarray(x, np.float32).astype(dt).astype(np.float32)

    q4, k4, v4 = (x.astype(np.float32) for x in (q, k, v))
    s = rnd((q4 @ np.swapaxes(k4, -1, -2)) * np.float32(scale))
    if causal:
        allowed = np.arange(s.shape[-1])[None, :] <= np.arange(s.shape[-2])[:, None]
        s = np.where(allowed, s, -np.inf)
    p = rnd(np.exp(rnd(s - s.max(axis=-1, keepdims=True))))
    p = rnd(p / rnd(p.sum(axis=-1, keepdims=True)))
    return rnd(p @ v4).astype(dt)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_kv,head_dim", [(113, 203, 59), (64, 64, 64), (1000, 63, 128), (7, 1000, 8)])
def test_half_precision(backend, make_qkv, dtype, causal, seq_q, seq_kv, head_dim):
    q, k, v = make_qkv(1, 2, seq_q, seq_kv, head_dim, dtype)
    out, lse = call(q, k, v, backend, causal=causal)
    assert out.dtype == dtype_of(dtype) and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == q.shape[:-1]
    scale = 1.0 / np.sqrt(head_dim)
    ref_out, ref_lse = reference(q, k, v, causal=causal)  # float64 on the same (rounded) inputs
    err = rel_error(out, ref_out)
    naive_err = rel_error(_naive_same_precision(q, k, v, causal, scale, dtype), ref_out)
    u = _UNIT_ROUNDOFF[dtype]
    # The kernel computes in float32 (y = ref + e, ‖e‖/‖ref‖ = ε32 ~ 1e-6) and rounds once to
    # ``dtype`` (|round(y) − y| ≤ u|y| elementwise, round to nearest), so
    #   ‖out − ref‖ ≤ u‖y‖ + ‖e‖ ≤ (u + (1 + u)·ε32)·‖ref‖.
    # With ε32 ≤ 2e-5 (generous for float32 sums of ≤ 1000 terms) the bound is u + 2e-5.
    assert err <= u + 2e-5, f"{dtype}: rel error {err:.2e} > u + 2e-5 = {u + 2e-5:.2e}"
    # FlashAttention's own criterion: at most twice a naive same-precision computation's error,
    # plus the output rounding.
    assert err <= 2 * naive_err + u, f"{dtype}: rel error {err:.2e} vs naive {naive_err:.2e}"
    # lse is float32 from float32 arithmetic on the rounded inputs
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# SIMD paths of the cpu backend


def test_every_simd_path(cpu_backend, make_qkv, monkeypatch):
    import fastattn.backends.cpu as cpu
    from conftest import require_cpu_feature

    simd_paths = require_cpu_feature(cpu, "simd_paths")
    set_simd = require_cpu_feature(cpu, "set_simd")
    paths = list(simd_paths())
    assert "generic" in paths, f"simd_paths() = {paths} lacks the portable path"
    assert set(paths) <= {"avx512", "avx2", "generic"}
    q, k, v = make_qkv(2, 2, 67, 131, 80, "float32")
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    results = {}
    for path in paths:
        with set_simd(path):
            for qq, kk, vv, rtol in ((q, k, v, 1e-5), (q64, k64, v64, 1e-12)):
                for causal in (False, True):
                    out, lse = call(qq, kk, vv, cpu_backend, causal=causal, block_size_q=16, block_size_kv=17)
                    assert_close_to_reference(out, qq, kk, vv, causal=causal, lse=lse, rtol=rtol)
            for half in ("float16", "bfloat16"):  # converted on load by every path
                qh, kh, vh = (x.astype(dtype_of(half)) for x in (q, k, v))
                out = call(qh, kh, vh, cpu_backend, causal=True)[0]
                ref, _ = reference(qh, kh, vh, causal=True)
                assert rel_error(out, ref) <= _UNIT_ROUNDOFF[half] + 2e-5, (path, half)
            results[path] = call(q, k, v, cpu_backend, causal=True)[0]
        monkeypatch.setenv("FASTATTN_SIMD", path)  # read at call time
        out, lse = call(q, k, v, cpu_backend, causal=True, dropout_p=0.2, seed=5)
        assert_close_to_reference(out, q, k, v, causal=True, lse=lse, dropout_p=0.2, seed=5, rtol=1e-5)
        monkeypatch.delenv("FASTATTN_SIMD")
    for path, out in results.items():
        assert rel_error(out, results["generic"]) <= 2e-5, path


# ---------------------------------------------------------------------------------------------
# random shapes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), seq_q=st.integers(0, 40), seq_kv=st.integers(0, 40),
    head_dim=st.integers(1, 40), causal=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
    block_q=st.one_of(st.none(), st.integers(1, 50)), block_kv=st.one_of(st.none(), st.integers(1, 50)),
    seed=st.integers(0, 2**64 - 1), dropout_p=st.sampled_from([0.0, 0.0, 0.2, 0.7]),
    num_threads=st.sampled_from([None, 1, 2]),
)
def test_random_shapes(backend, batch, heads, seq_q, seq_kv, head_dim, causal, dtype, block_q, block_kv, seed,
                       dropout_p, num_threads):
    rng = np.random.default_rng(seed)
    q = random_array(rng, (batch, heads, seq_q, head_dim), dtype)
    k = random_array(rng, (batch, heads, seq_kv, head_dim), dtype)
    v = random_array(rng, (batch, heads, seq_kv, head_dim), dtype)
    out, lse = call(q, k, v, backend, causal=causal, block_size_q=block_q, block_size_kv=block_kv,
                    dropout_p=dropout_p, seed=seed, num_threads=num_threads)
    assert_close_to_reference(out, q, k, v, causal=causal, lse=lse, dropout_p=dropout_p, seed=seed,
                              rtol=RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# unusual memory and sizes


@pytest.mark.parametrize("head_dim", [257, 512, 1024])
def test_head_dims_beyond_256(backend, make_qkv, head_dim):
    # nothing in the contract caps head_dim; a kernel with a fixed-size buffer must still be right
    q, k, v = make_qkv(1, 1, 33, 45, head_dim)
    out, lse = call(q, k, v, backend, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)


@pytest.mark.parametrize("lead", [(0, 2), (2, 0), (0, 0)])
def test_empty_batch_or_heads(backend, rng, lead):
    q = random_array(rng, (*lead, 9, 8))
    k = random_array(rng, (*lead, 11, 8))
    out, lse = call(q, k, k, backend, causal=True, dropout_p=0.1, seed=1)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unaligned_inputs(backend, rng, dtype):
    """Arrays whose data pointer is not aligned to the item size (views into a byte buffer)."""
    itemsize = np.dtype(dtype).itemsize
    arrays = []
    for _ in range(3):
        x = random_array(rng, (2, 37, 24), dtype)
        buf = np.zeros(x.nbytes + 1, dtype=np.uint8)
        view = np.frombuffer(buf.data, dtype=np.uint8)[1:].view(dtype).reshape(x.shape)
        view[...] = x
        assert view.ctypes.data % itemsize != 0 and not view.flags.aligned
        arrays.append(view)
    q, k, v = arrays
    out, lse = call(q, k, v, backend, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [">f4", ">f8", "<f4", ">f2"])
def test_byte_order(backend, rng, dtype):
    q, k, v = (random_array(rng, (2, 19, 8), np.dtype(dtype)) for _ in range(3))
    out, lse = call(q, k, v, backend)
    assert out.shape == q.shape
    ref_out, ref_lse = reference(q, k, v)
    rtol = {8: 1e-12, 4: 1e-5, 2: 2 * 2.0**-11}[np.dtype(dtype).itemsize]  # float16: one output rounding
    assert rel_error(out, ref_out) <= rtol
    np.testing.assert_allclose(lse, ref_lse, rtol=min(rtol, 1e-5), atol=min(rtol, 2e-5))


def test_read_only_inputs(backend, make_qkv):
    q, k, v = make_qkv(1, 2, 20, 20, 8)
    for x in (q, k, v):
        x.flags.writeable = False
    out, lse = call(q, k, v, backend, causal=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)
    assert out.flags.writeable


def test_simd_selection_errors(cpu_backend, make_qkv, monkeypatch):
    import fastattn.backends.cpu as cpu
    from conftest import require_cpu_feature

    set_simd = require_cpu_feature(cpu, "set_simd")
    with pytest.raises(ValueError, match="sse9"):
        with set_simd("sse9"):
            pass
    with pytest.raises(TypeError, match="str"):
        with set_simd(None):
            pass
    q, k, v = make_qkv(1, 1, 8, 8, 8)
    # a str subclass (what indexing a NumPy array of names gives) is a name like any other
    with set_simd(np.array(["generic"])[0]):
        out = fastattn.flash_attention(q, k, v, backend=cpu_backend)
    assert_close_to_reference(out, q, k, v, rtol=1e-5)
    monkeypatch.setenv("FASTATTN_SIMD", "sse9")
    with pytest.raises(ValueError, match="sse9"):
        fastattn.flash_attention(q, k, v, backend=cpu_backend)


_HUGE_BLOCKS_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import fastattn
    from fastattn.backends.reference import materialized

    backend, block_q, block_kv = sys.argv[1], eval(sys.argv[2]), eval(sys.argv[3])
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 65, 24)).astype(np.float32) for _ in range(3))
    try:
        out = fastattn.flash_attention(q, k, v, causal=True, backend=backend, block_size_q=block_q,
                                       block_size_kv=block_kv)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(0)
    ref, _ = materialized(*(x.astype(np.float64) for x in (q, k, v)), causal=True, scale=24 ** -0.5,
                          compute_dtype=np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    try:  # VmHWM belongs to this address space; ru_maxrss may carry the parent's from before exec
        with open("/proc/self/status") as f:
            peak_mib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:
        import resource
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"err": err if np.isfinite(err) else str(err), "peak_mib": peak_mib}))
    """
)


@pytest.mark.parametrize("block_q,block_kv", [("2**20", "2**20"), ("10**6", "64"), ("64", "10**6"),
                                              ("2**62", "1"), ("1", "2**62"), ("2**63 - 1", "None"),
                                              ("None", "2**63 - 1")])
def test_block_sizes_far_beyond_the_sequence(backend, block_q, block_kv):
    """Any positive block size is accepted by validation, so a tile longer than the sequence must act
    like the whole sequence (or be refused with a ValueError naming it): never a crash, a
    MemoryError for a 65-token input, or silently wrong output.  Run in a child interpreter so
    a crash fails this test instead of the whole session.  Memory must stay that of a 65-token call
    (the interpreter with NumPy and fastattn loaded is ~40 MiB): scratch sized by the requested tile
    instead of the sequence would need ~0.2 GiB per thread here."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _HUGE_BLOCKS_CHILD, backend, block_q, block_kv],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"child died with status {proc.returncode}:\n{proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in result:
        assert result["error"] == "ValueError" and "block_size" in result["message"], result
    else:
        assert isinstance(result["err"], float) and result["err"] <= 1e-5, result
        if os.environ.get("FASTATTN_SANITIZER", "").strip() not in ("", "0"):
            pytest.skip("result checked; peak RSS not checked under the sanitizer build (FASTATTN_SANITIZER): "
                        "AddressSanitizer's shadow memory and quarantine inflate it")
        assert result["peak_mib"] < 150, f"a 65-token call peaked at {result['peak_mib']:.0f} MiB RSS"


def test_set_simd_nests_and_restores(cpu_backend):
    import fastattn.backends.cpu as cpu
    from conftest import require_cpu_feature

    set_simd = require_cpu_feature(cpu, "set_simd")
    simd_in_use = require_cpu_feature(cpu, "simd_in_use")
    paths = list(cpu.simd_paths())
    outer = simd_in_use()
    with set_simd("generic"):
        assert simd_in_use() == "generic"
        with set_simd(paths[-1]):
            assert simd_in_use() == paths[-1]
        assert simd_in_use() == "generic"
        with pytest.raises(ZeroDivisionError):
            with set_simd(paths[-1]):
                raise ZeroDivisionError
        assert simd_in_use() == "generic"
    assert simd_in_use() == outer


def _special_values(dtype: str) -> np.ndarray:
    import ml_dtypes

    dt = dtype_of(dtype)
    info = ml_dtypes.finfo(dt)  # also knows bfloat16
    tiny = float(info.smallest_subnormal)
    vals = [0.0, -0.0, tiny, -tiny, 3 * tiny, float(info.tiny), float(info.tiny) - tiny, 1.0, -1.0, 0.1, 1 / 3,
            float(info.max), -float(info.max), np.inf, -np.inf, np.nan]
    return np.array(vals, dtype=np.float64).astype(dt)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_single_key_returns_its_value_exactly(backend, rng, dtype):
    """With one key every weight is exactly 1, so each output row is v[0] itself: checks the loads
    and stores of every dtype on subnormals, extremes, signed zeros, infinities and NaN."""
    v = _special_values(dtype)[None, :]
    q = random_array(rng, (5, v.shape[1]), dtype)
    k = random_array(rng, (1, v.shape[1]), dtype)
    for causal in (False, True):
        out, lse = call(q, k, v, backend, causal=causal)
        assert out.dtype == np.dtype(dtype_of(dtype))
        want = np.broadcast_to(v, out.shape).astype(np.float64)
        np.testing.assert_array_equal(out.astype(np.float64), want)
        ref_lse = reference(q, k, v)[1]
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)
