"""Numerics at the edges, on every backend and every SIMD path of the cpu backend.

- float32 accuracy against a plain float32 implementation (materialized NumPy in float32, whose
  BLAS sums long products in blocks) up to 100k keys: at most twice its error (FlashAttention's rule);
  and, where PyTorch is installed, at or below its CPU SDPA's error on the same inputs.
- Large finite values: whenever the scores scale·q·k fit in float32 the output is finite, and
  equal to the float64 reference's.
- Extreme scales and magnitudes: the float64 reference's answer wherever it is representable.
- float64 uses float64's whole range (weights down to the smallest subnormal).
- Masked keys never contribute: NaN or inf behind the causal mask never reaches a row, whatever
  the tile sizes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fastattn
from conftest import assert_close_to_reference, dtype_of, reference, rel_error, require_backend

BACKENDS = ["cpu", "reference"]


def _simd_paths() -> list[str]:
    try:
        from fastattn.backends import cpu

        return cpu.simd_paths() if cpu.availability() is None else ["generic"]
    except Exception:  # noqa: BLE001
        return ["generic"]


@pytest.fixture(params=[(b, s) for b in BACKENDS for s in (_simd_paths() if b == "cpu" else [None])],
                ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def engine(request):
    """(backend, SIMD path): the cpu backend once per SIMD path this CPU runs, and the reference."""
    name, simd = request.param
    require_backend(name)
    return name, simd


@contextlib.contextmanager
def _on(engine):
    name, simd = engine
    if simd is None:
        yield
        return
    from fastattn.backends.cpu import set_simd

    with set_simd(simd):
        yield


def call(engine, q, k, v, **kw):
    with _on(engine):
        return fastattn.flash_attention(q, k, v, backend=engine[0], return_lse=True, **kw)


def plain_float32(q, k, v, *, causal=False, scale=None):
    """Materialized attention in float32 (the yardstick of float32 accuracy): (out, lse)."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    s = np.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        sq, skv = s.shape[-2:]
        s = np.where(np.arange(skv)[None, :] <= np.arange(sq)[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    return (p @ v) / den, (m + np.log(den))[..., 0]


# ---------------------------------------------------------------------------------------------
# float32 accuracy


@pytest.mark.parametrize("heads,seq_q,seq_kv,d,causal", [
    (2, 256, 768, 32, False),
    (1, 64, 4096, 32, False),
    (1, 16, 100_000, 32, False),
    (1, 16, 100_000, 128, False),
    (2, 300, 300, 224, True),
    (1, 1000, 1000, 64, True),
    (1, 3, 20_000, 80, False),
])
def test_float32_within_twice_a_plain_float32_implementation(engine, rng, heads, seq_q, seq_kv, d, causal):
    q, k, v = (rng.standard_normal((1, heads, n, d)).astype(np.float32) for n in (seq_q, seq_kv, seq_kv))
    out, lse = call(engine, q, k, v, causal=causal)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    plain_out, plain_lse = plain_float32(q, k, v, causal=causal)
    err, plain_err = rel_error(out, ref_out), rel_error(plain_out, ref_out)
    assert err <= 2 * plain_err + 1e-8, f"error {err:.3g} > 2 x plain float32's {plain_err:.3g}"
    lse_err = np.abs(lse.astype(np.float64) - ref_lse).max()
    plain_lse_err = np.abs(plain_lse.astype(np.float64) - ref_lse).max()
    assert lse_err <= 2 * plain_lse_err + 1e-6, f"lse error {lse_err:.3g} vs plain float32's {plain_lse_err:.3g}"


@pytest.mark.parametrize("heads,heads_kv,seq_q,seq_kv,d,causal", [
    (4, 4, 1024, 1024, 64, False),
    (2, 2, 2048, 2048, 64, True),
    (2, 2, 1000, 1000, 128, False),
    (4, 1, 333, 777, 80, False),
    (4, 2, 1, 4097, 128, False),
    (3, 3, 513, 2000, 96, True),
])
def test_float32_error_at_or_below_pytorch(engine, rng, heads, heads_kv, seq_q, seq_kv, d, causal):
    """float32 against float64, bounded by PyTorch's CPU SDPA error on the same inputs."""
    torch = pytest.importorskip("torch")
    q = rng.standard_normal((1, heads, seq_q, d)).astype(np.float32)
    k, v = (rng.standard_normal((1, heads_kv, seq_kv, d)).astype(np.float32) for _ in range(2))
    out, _ = call(engine, q, k, v, causal=causal)
    group = heads // heads_kv
    ref_out, _ = reference(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), causal=causal)
    with torch.no_grad():
        peer = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in (q, k, v)), is_causal=causal, enable_gqa=group > 1).numpy()
    err, peer_err = rel_error(out, ref_out), rel_error(peer, ref_out)
    assert err <= peer_err, f"error {err:.3g} above PyTorch SDPA's {peer_err:.3g}"


# ---------------------------------------------------------------------------------------------
# large finite values


@pytest.mark.parametrize("dtype,value", [("bfloat16", 133120.0), ("float16", 60000.0), ("float32", 1e18),
                                         ("float64", 1e150)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 2, 37, 64), (2, 1, 300, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_constant_large_inputs_give_their_value(engine, dtype, value, shape, causal):
    """q = k = v = value (PyTorch's large-bfloat16 regression case): every weight is equal, so the
    output is exactly value; the scores (~value² · d · scale) fit in float32."""
    q = np.full(shape, value, dtype=dtype_of(dtype))
    out, lse = call(engine, q, q, q, causal=causal)
    assert np.isfinite(out.astype(np.float64)).all() and np.isfinite(lse).all()
    # the half types round back to the value exactly; float32 keeps the rounding of a long sum of
    # equal terms (judged against a plain float32 implementation's), float64 nearly none
    want = np.full(shape, float(q.flat[0]))
    rtol = {"bfloat16": 0.0, "float16": 0.0, "float64": 1e-13}.get(dtype)
    if rtol is None:
        rtol = max(1e-6, 2 * rel_error(plain_float32(q, q, q, causal=causal)[0], want))
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=rtol, atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype,magnitude", [("bfloat16", 3e4), ("float16", 200.0), ("float32", 1e15),
                                             ("float64", 1e100)])
@pytest.mark.parametrize("causal", [False, True])
def test_random_large_inputs_match_the_reference(engine, rng, dtype, magnitude, causal):
    q, k, v = (rng.standard_normal((1, 2, n, 16)) * magnitude for n in (33, 70, 70))
    q, k, v = (x.astype(dtype_of(dtype)) for x in (q, k, v))
    out, lse = call(engine, q, k, v, causal=causal)
    assert np.isfinite(out.astype(np.float64)).all() and np.isfinite(lse).all()
    # scores this large make every row one-hot on its largest score: the exact value of that key
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, rtol=1e-2, atol=0)
    np.testing.assert_allclose(lse.astype(np.float64), ref_lse, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# extreme scales and magnitudes


def test_huge_scale_float32_picks_the_maximum(engine, rng):
    """scale = 1e39 (not a float32 number): each row is the value of its largest raw score."""
    q, k, v = (rng.standard_normal((1, 1, n, 8)).astype(np.float32) for n in (9, 13, 13))
    out, lse = call(engine, q, k, v, scale=1e39)
    assert np.isfinite(out).all()
    best = (q[0, 0].astype(np.float64) @ k[0, 0].astype(np.float64).T).argmax(axis=1)
    np.testing.assert_array_equal(out[0, 0], v[0, 0][best])


def test_tiny_scale_float32_is_the_mean(engine, rng):
    q, k, v = (rng.standard_normal((1, 1, n, 8)).astype(np.float32) for n in (5, 11, 11))
    out, lse = call(engine, q, k, v, scale=1e-42)
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(v[0, 0].mean(axis=0), (5, 8)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, np.log(11.0), rtol=1e-6)


def test_huge_q_against_tiny_k(engine):
    """float32 q = 3e38 against k = 1e-38 (true scores about 3): exact, no overflow."""
    q = np.array([[3e38, -3e38]], np.float32)
    k = np.array([[1e-38, 2e-38], [2e-38, 1e-38], [3e-38, -1e-38]], np.float32)
    v = np.arange(6, dtype=np.float32).reshape(3, 2)
    out, lse = call(engine, q, k, v, scale=1.0)
    assert_close_to_reference(out, q, k, v, scale=1.0, lse=lse, rtol=1e-6, lse_atol=1e-5)


def test_raw_products_overflow_but_scores_fit(engine):
    """|q.k| > FLT_MAX while scale.q.k fits in float32: the reference's answer, finite."""
    q = np.full((2, 4), 1e20, np.float32)
    q[1] *= -1
    k = np.full((3, 4), 1e20, np.float32)
    k[1] *= 0.5
    k[2] *= 0.25
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    out, lse = call(engine, q, k, v, scale=1e-30)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert_close_to_reference(out, q, k, v, scale=1e-30, lse=lse, rtol=1e-6, lse_atol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_tiny_q_times_scale_against_an_infinite_key(engine):
    """q·scale underflows in float32 but q·k = -inf for the infinite key: weight 0, finite rows."""
    q = np.array([[-1e-30, 0.0]], np.float32)
    k = np.array([[np.inf, 0.0], [1.0, 1.0], [2.0, 0.5]], np.float32)
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    out, lse = call(engine, q, k, v, scale=1e-20)
    ref_out, _ = reference(q, k, v, scale=1e-20)
    assert np.isfinite(ref_out).all()
    np.testing.assert_allclose(out, ref_out, rtol=1e-6)


def test_float64_weights_use_the_whole_float64_range(engine):
    """Score gaps of 740 and 1000: weights e^-740 (a float64 subnormal) and e^-1000 (below it)."""
    q = np.array([[1.0]])
    k = np.array([[0.0], [-740.0], [-1000.0]])
    v = np.array([[0.0], [1e300], [1e300]])
    out, lse = call(engine, q, k, v, scale=1.0)
    want = np.exp(-740.0) * 1e300  # 4.2e-22: lost if the weight is flushed to zero
    assert want > 0
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_float64_infinite_value_behind_a_subnormal_weight(engine):
    """A visible key with v = inf and weight e^-740 (> 0 in float64): the output is inf, not NaN."""
    q = np.array([[1.0]])
    k = np.array([[0.0], [-740.0]])
    v = np.array([[1.0], [np.inf]])
    out, _ = call(engine, q, k, v, scale=1.0)
    assert out[0, 0] == np.inf


# ---------------------------------------------------------------------------------------------
# masked keys never contribute


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("blocks", [(None, None), (1, 1), (3, 5), (16, 17), (64, 64), (7, 100)])
def test_non_finite_behind_the_causal_mask_never_reaches_a_row(engine, rng, where, value, dtype, blocks):
    seq_q, seq_kv, d = 40, 52, 8
    q, k, v = (rng.standard_normal((1, 2, n, d)).astype(dtype_of(dtype)) for n in (seq_q, seq_kv, seq_kv))
    poisoned = {"k": k, "v": v}[where]
    for key in (10, 19, 20, 33, 45):  # keys 40.. are seen by no query (top-left causal, seq_q = 40)
        poisoned[0, 1, key, key % d] = value
    bq, bkv = blocks
    out, lse = call(engine, q, k, v, causal=True, block_size_q=bq, block_size_kv=bkv)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    out64 = out.astype(np.float64)
    # rows 0..9 see none of the poisoned keys: exact, and equal to the reference with finite inputs
    clean = (slice(None), slice(None), slice(0, 10))
    np.testing.assert_allclose(out64[clean], ref_out[clean], rtol=2e-2 if dtype == "bfloat16" else 1e-5,
                               atol=1e-6)
    assert np.isfinite(out64[:, :, :10]).all() and np.isfinite(lse[:, :, :10]).all()
    # head 0 has no poison at all
    assert np.isfinite(out64[:, 0]).all()
    # every row has the reference's finiteness pattern (non-finite exactly where a visible key is)
    np.testing.assert_array_equal(np.isfinite(out64), np.isfinite(ref_out))
    np.testing.assert_array_equal(np.isfinite(lse.astype(np.float64)), np.isfinite(ref_lse))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("blocks", [(None, None), (8, 16), (10, 16), (5, 3), (1, 64)])
def test_nan_value_result_does_not_depend_on_tiles(engine, rng, blocks):
    """A NaN in v at key 20 under the causal mask: rows 0..19 exact, rows 20.. NaN, for every tiling."""
    q, k, v = (rng.standard_normal((1, 1, 40, 16)) for _ in range(3))
    v[0, 0, 20, 3] = np.nan
    out, _ = call(engine, q, k, v, causal=True, block_size_q=blocks[0], block_size_kv=blocks[1])
    nan_rows = np.flatnonzero(np.isnan(out[0, 0]).any(axis=1))
    np.testing.assert_array_equal(nan_rows, np.arange(20, 40))
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(out[0, 0, :, 3])), np.arange(20, 40))
    assert_close_to_reference(out[..., :20, :], q[..., :20, :], k[..., :20, :], v[..., :20, :], causal=True,
                              rtol=1e-12)
