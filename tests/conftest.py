"""Shared test machinery: the backend fixture, the random-input factory and the one oracle check.

Backends under test are ``BACKENDS``.  The "cpu" backend is a compiled extension that may not
be built in a development checkout: its tests then skip with a reason, unless the environment
sets ``FASTATTN_REQUIRE_CPU`` (CI does), in which case a missing cpu backend is a failure.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import fastattn
from fastattn.backends.reference import materialized

#: every backend the correctness suite runs on (cuda has its own file)
BACKENDS = ["cpu", "reference"]


#: under the AddressSanitizer build (tools/sanitize.sh) resident memory is the sanitizer's, not ours
UNDER_SANITIZER = os.environ.get("FASTATTN_SANITIZER", "").strip() not in ("", "0")
skip_rss_under_sanitizer = pytest.mark.skipif(
    UNDER_SANITIZER, reason="peak resident memory is not measured under the sanitizer build (FASTATTN_SANITIZER): "
                            "its shadow memory and quarantine change every figure")


def cpu_required() -> bool:
    return os.environ.get("FASTATTN_REQUIRE_CPU", "").strip() not in ("", "0")


def require_backend(name: str) -> str:
    """Returns ``name`` if usable here; otherwise skips, or fails when the backend is required."""
    if name in fastattn.available_backends():
        return name
    from fastattn import backends

    reason = backends.get_backend(name).availability()
    msg = f"backend {name!r} is not available: {reason}"
    if name == "cpu" and cpu_required():
        pytest.fail(f"FASTATTN_REQUIRE_CPU is set but {msg}")
    pytest.skip(msg)


def require_cpu_feature(module, attr: str):
    """A cpu-backend module attribute, skipping (or failing under FASTATTN_REQUIRE_CPU) if absent."""
    found = getattr(module, attr, None)
    if found is None:
        msg = f"{module.__name__}.{attr} is not there yet"
        if cpu_required():
            pytest.fail(f"FASTATTN_REQUIRE_CPU is set but {msg}")
        pytest.skip(msg)
    return found


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend under test, by name ("cpu" skips/fails per the FASTATTN_REQUIRE_CPU rule)."""
    return require_backend(request.param)


@pytest.fixture
def cpu_backend() -> str:
    """The compiled cpu backend only."""
    return require_backend("cpu")


def _seed_for(nodeid: str) -> int:
    # fixed across runs, distinct between tests (and between parametrizations)
    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(_seed_for(request.node.nodeid))


def dtype_of(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def random_array(rng: np.random.Generator, shape, dtype="float32", scale: float = 1.0) -> np.ndarray:
    """Standard-normal entries (never zeros or constants), rounded to ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(dtype_of(dtype) if isinstance(dtype, str) else dtype)


@pytest.fixture
def make_qkv(rng):
    """``make_qkv(batch, heads, seq_q, seq_kv, head_dim, dtype)`` -> (q, k, v), or with ``lead=()``
    for 2-D / ``lead=(heads,)`` for 3-D inputs: ``make_qkv(seq_q=.., seq_kv=.., head_dim=.., lead=())``."""

    def make(batch=1, heads=1, seq_q=16, seq_kv=None, head_dim=16, dtype="float32", *, lead=None, scale=1.0):
        seq_kv = seq_q if seq_kv is None else seq_kv
        lead = (batch, heads) if lead is None else tuple(lead)
        q = random_array(rng, (*lead, seq_q, head_dim), dtype, scale)
        k = random_array(rng, (*lead, seq_kv, head_dim), dtype, scale)
        v = random_array(rng, (*lead, seq_kv, head_dim), dtype, scale)
        return q, k, v

    return make


def to4(x: np.ndarray) -> np.ndarray:
    while x.ndim < 4:
        x = x[None]
    return x


def reference(q, k, v, *, causal=False, scale=None, dropout_p=0.0, seed=None):
    """float64 (out, lse) of the materialized oracle on float64 upcasts, in q's own rank."""
    q, k, v = (np.asarray(x) for x in (q, k, v))
    shape = q.shape
    if scale is None:
        scale = 1.0 / np.sqrt(shape[-1])
    q64, k64, v64 = (to4(x.astype(np.float64)) for x in (q, k, v))
    out, lse = materialized(q64, k64, v64, causal=causal, scale=float(scale), compute_dtype=np.float64,
                            dropout_p=dropout_p, seed=seed)
    return out.reshape(shape), lse.reshape(shape[:-1])


def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is all zeros)."""
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / denom) if denom > 0 else float(num)


def assert_close_to_reference(out, q, k, v, *, causal=False, scale=None, lse=None, dropout_p=0.0,
                              seed=None, rtol=1e-5, lse_atol=None):
    """Checks ``out`` (and ``lse``) against the float64 materialized reference on the same inputs.

    ``out`` must have q's shape and dtype; ‖out−ref‖/‖ref‖ ≤ rtol.  ``lse`` (if given) must be
    float32 (float64 for float64 input) of shape q.shape[:-1], within ``lse_atol`` absolutely
    plus ``rtol`` relatively (lse is O(log seq) so a plain absolute bound is natural too).
    Non-finite reference entries (-inf lse of empty rows, NaN rows) must be matched exactly.
    """
    q = np.asarray(q)
    ref_out, ref_lse = reference(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    assert out.shape == q.shape, f"output shape {out.shape} != q shape {q.shape}"
    assert out.dtype == q.dtype, f"output dtype {out.dtype} != input dtype {q.dtype}"
    out64 = np.asarray(out).astype(np.float64)
    ref_nan = np.isnan(ref_out)
    assert np.array_equal(np.isnan(out64), ref_nan), "NaN pattern differs from the reference"
    finite = ~ref_nan
    err = rel_error(out64[finite], ref_out[finite])
    assert err <= rtol, f"relative error {err:.3e} > rtol {rtol:.1e}"
    if lse is not None:
        want_dtype = np.float64 if q.dtype == np.float64 else np.float32
        assert lse.shape == q.shape[:-1], f"lse shape {lse.shape} != {q.shape[:-1]}"
        assert lse.dtype == want_dtype, f"lse dtype {lse.dtype} != {np.dtype(want_dtype)}"
        lse64 = np.asarray(lse).astype(np.float64)
        nonfinite = ~np.isfinite(ref_lse)
        assert np.array_equal(np.isnan(lse64), np.isnan(ref_lse)), "lse NaN pattern differs"
        assert np.array_equal(lse64[nonfinite & ~np.isnan(ref_lse)], ref_lse[nonfinite & ~np.isnan(ref_lse)]), (
            "lse of rows that see no key must be -inf"
        )
        ok = np.isfinite(ref_lse)
        if lse_atol is None:
            lse_atol = 1e-12 if q.dtype == np.float64 else 2e-5
        diff = np.abs(lse64[ok] - ref_lse[ok])
        bound = lse_atol + rtol * np.abs(ref_lse[ok])
        assert np.all(diff <= bound), f"lse max abs error {diff.max() if diff.size else 0:.3e} too large"
    return err


#: rtol per input dtype (fp32: computed in fp32; fp64: in fp64)
RTOL = {"float32": 1e-5, "float64": 1e-12}
