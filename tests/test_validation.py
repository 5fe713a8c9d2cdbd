"""Bad input, one test per class: the exception type and a message naming the offending shape/dtype/value.

Validation happens once in the facade, before any backend work, so these run for every backend.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import fastattn
from conftest import random_array
from fastattn import backends


def fa(q, k, v, **kw):
    kw.setdefault("backend", "reference")
    return fastattn.flash_attention(q, k, v, **kw)


@pytest.fixture
def qkv(rng):
    return tuple(random_array(rng, (2, 3, 10, 8)) for _ in range(3))


@pytest.fixture(params=["auto", "cpu", "reference"])
def any_backend(request):
    """Validation must not depend on the backend (cpu only where it is built)."""
    from conftest import require_backend

    if request.param != "auto":
        require_backend(request.param)
    return request.param


def test_wrong_ndim(any_backend, rng):
    good = random_array(rng, (2, 3, 10, 8))
    for bad_shape in [(8,), (1, 2, 3, 10, 8), ()]:
        bad = random_array(rng, bad_shape)
        with pytest.raises(ValueError, match=re.escape(str(bad_shape))):
            fa(bad, good, good, backend=any_backend)
        with pytest.raises(ValueError, match=r"\bk\b.*" + re.escape(str(bad_shape))):
            fa(good, bad, good, backend=any_backend)


def test_rank_mismatch_between_q_k_v(any_backend, rng):
    q = random_array(rng, (3, 10, 8))
    k = random_array(rng, (1, 3, 10, 8))
    with pytest.raises(ValueError, match=re.escape("(3, 10, 8)")) as exc:
        fa(q, k, k, backend=any_backend)
    assert "(1, 3, 10, 8)" in str(exc.value)


def test_head_dim_mismatch(any_backend, rng):
    """q and k must share head_dim (v's may differ: see the variant tests)."""
    q = random_array(rng, (2, 3, 10, 8))
    k = random_array(rng, (2, 3, 10, 8))
    v7 = random_array(rng, (2, 3, 10, 7))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 10, 7)")):
        fa(q, v7, k, backend=any_backend)
    with pytest.raises(ValueError, match=re.escape("(2, 3, 10, 7)")):
        fa(v7, k, k, backend=any_backend)


def test_zero_head_dim(any_backend):
    z = np.zeros((2, 5, 0), np.float32)
    with pytest.raises(ValueError, match=re.escape("(2, 5, 0)")):
        fa(z, z, z, backend=any_backend)


def test_head_dim_mismatch_with_config(rng):
    q = random_array(rng, (2, 3, 10, 8))
    att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=16, num_heads=3), backend="reference")
    with pytest.raises(ValueError, match=r"head_dim=16") as exc:
        att.forward_multi_head(q, q, q)
    assert "(2, 3, 10, 8)" in str(exc.value) and "8" in str(exc.value)
    with pytest.raises(ValueError, match=r"head_dim=16"):
        att.forward(q[0, 0], q[0, 0], q[0, 0])


def test_num_heads_mismatch_with_config(rng):
    q = random_array(rng, (2, 3, 10, 8))
    att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=4), backend="reference")
    with pytest.raises(ValueError, match=r"num_heads=4") as exc:
        att.forward_multi_head(q, q, q)
    assert "(2, 3, 10, 8)" in str(exc.value)


def test_object_api_rank_checks(rng):
    q = random_array(rng, (2, 3, 10, 8))
    att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=3), backend="reference")
    with pytest.raises(ValueError, match=re.escape("(2, 3, 10, 8)")):
        att.forward(q, q, q)  # one head only
    with pytest.raises(ValueError, match=re.escape("(10, 8)")):
        att.forward_multi_head(q[0, 0], q[0, 0], q[0, 0])


@pytest.mark.parametrize("which", ["batch", "heads"])
def test_batch_or_heads_mismatch(any_backend, rng, which):
    q = random_array(rng, (2, 3, 10, 8))
    other = random_array(rng, (1, 3, 10, 8) if which == "batch" else (2, 4, 10, 8))
    for args in [(q, other, other), (q, q, other), (other, q, q)]:
        with pytest.raises(ValueError, match=re.escape(str(other.shape))):
            fa(*args, backend=any_backend)


def test_k_and_v_lengths_differ(any_backend, rng):
    q = random_array(rng, (2, 3, 10, 8))
    k = random_array(rng, (2, 3, 12, 8))
    v = random_array(rng, (2, 3, 11, 8))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 12, 8)")) as exc:
        fa(q, k, v, backend=any_backend)
    assert "(2, 3, 11, 8)" in str(exc.value)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "complex64", "complex128", "bool", "object",
                                   "float128" if hasattr(np, "float128") else "longdouble"])
def test_unsupported_dtypes(any_backend, dtype):
    bad = np.ones((3, 4), dtype=dtype)
    good = np.ones((3, 4), dtype=np.float32)
    name = np.dtype(dtype).name
    for args in [(bad, bad, bad), (good, bad, good), (good, good, bad)]:
        with pytest.raises(TypeError, match=re.escape(name)):
            fa(*args, backend=any_backend)


@pytest.mark.parametrize("pair", [("float32", "float64"), ("float16", "float32"), ("bfloat16", "float16")])
def test_mixed_dtypes(any_backend, pair):
    from conftest import dtype_of

    a = np.ones((3, 4), dtype=dtype_of(pair[0]))
    b = np.ones((3, 4), dtype=dtype_of(pair[1]))
    for args in [(a, b, b), (a, a, b), (b, a, b)]:
        with pytest.raises(TypeError) as exc:
            fa(*args, backend=any_backend)
        assert pair[0] in str(exc.value) and pair[1] in str(exc.value)


@pytest.mark.parametrize("scale", [0.0, -1.0, -0.0, float("inf"), float("-inf"), float("nan"), np.float32(0)])
def test_bad_scale_value(qkv, scale):
    with pytest.raises(ValueError, match=re.escape(repr(float(scale)))):
        fa(*qkv, scale=scale)
    with pytest.raises(ValueError, match=re.escape(repr(float(scale)))):
        fastattn.FlashAttentionConfig(head_dim=8, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, 1j, [0.5], np.array([0.5, 0.5])])
def test_bad_scale_type(qkv, scale):
    with pytest.raises(TypeError, match="scale"):
        fa(*qkv, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        fastattn.FlashAttentionConfig(head_dim=8, scale=scale)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), 1.5, float("inf"), -1e-300])
def test_dropout_out_of_range(qkv, p):
    with pytest.raises(ValueError, match=re.escape(repr(float(p)))):
        fa(*qkv, dropout_p=p)
    with pytest.raises(ValueError, match=re.escape(repr(float(p)))):
        fastattn.FlashAttentionConfig(head_dim=8, dropout_p=p)


@pytest.mark.parametrize("p", ["0.1", None, True, 0.1j])
def test_dropout_wrong_type(qkv, p):
    with pytest.raises(TypeError, match="dropout_p"):
        fa(*qkv, dropout_p=p)


@pytest.mark.parametrize("name", ["block_size_q", "block_size_kv"])
@pytest.mark.parametrize("value", [0, -1, -64])
def test_non_positive_block_sizes(qkv, name, value):
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        fa(*qkv, **{name: value})
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        fastattn.FlashAttentionConfig(head_dim=8, **{name: value})


@pytest.mark.parametrize("name", ["block_size_q", "block_size_kv", "num_threads"])
@pytest.mark.parametrize("value", [16.0, "16", True])
def test_non_integer_sizes(qkv, name, value):
    with pytest.raises(TypeError, match=rf"{name}.*{re.escape(repr(value))}"):
        fa(*qkv, **{name: value})


def test_numpy_integers_accepted(backend, qkv):
    out = fastattn.flash_attention(*qkv, backend=backend, block_size_q=np.int64(4), block_size_kv=np.int32(3),
                                   num_threads=np.int64(1), seed=np.uint64(7), dropout_p=np.float32(0.25),
                                   scale=np.float32(0.5))
    assert out.shape == qkv[0].shape


def test_unknown_backend(qkv):
    with pytest.raises(ValueError, match="'nope'") as exc:
        fa(*qkv, backend="nope")
    assert "reference" in str(exc.value)  # lists the choices
    with pytest.raises(ValueError, match="'nope'"):
        fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8), backend="nope")
    with pytest.raises(TypeError, match="backend"):
        fa(*qkv, backend=None)


def test_cuda_backend_missing(qkv):
    cuda = backends.get_backend("cuda")
    if cuda.availability() is None:
        pytest.skip("a CUDA device and CuPy are present; the missing-GPU error cannot be provoked")
    with pytest.raises(RuntimeError) as exc:
        fa(*qkv, backend="cuda")
    msg = str(exc.value)
    assert "cuda" in msg.lower()
    # says what is missing: CuPy, a GPU/driver, or the build itself
    assert re.search(r"cupy|gpu|device|driver|nvrtc|not built|not installed|no module", msg, re.IGNORECASE), msg


def test_cpu_backend_missing_is_a_runtime_error(qkv):
    cpu = backends.get_backend("cpu")
    reason = cpu.availability()
    if reason is None:
        pytest.skip("the cpu extension is built")
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        fa(*qkv, backend="cpu")


@pytest.mark.parametrize("n", [0, -1, -8])
def test_bad_num_threads(qkv, n):
    with pytest.raises(ValueError, match=rf"num_threads.*{n}"):
        fa(*qkv, num_threads=n)
    att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=3), backend="reference")
    with pytest.raises(ValueError, match=rf"num_threads.*{n}"):
        att.forward_multi_head(*qkv, num_threads=n)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, -(2**63)])
def test_seed_out_of_range(qkv, seed):
    with pytest.raises(ValueError, match=re.escape(str(seed))):
        fa(*qkv, dropout_p=0.1, seed=seed)
    att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=3, dropout_p=0.1),
                                  backend="reference")
    with pytest.raises(ValueError, match=re.escape(str(seed))):
        att.forward_multi_head(*qkv, seed=seed)


@pytest.mark.parametrize("seed", [1.0, "3", True])
def test_seed_wrong_type(qkv, seed):
    with pytest.raises(TypeError, match="seed"):
        fa(*qkv, dropout_p=0.1, seed=seed)


def test_seed_extremes_accepted(backend, qkv):
    for seed in (0, 2**32 - 1, 2**32, 2**64 - 1):
        out = fastattn.flash_attention(*qkv, backend=backend, dropout_p=0.1, seed=seed)
        assert np.isfinite(out).all()


@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], 3.0, None, "qkv", (1.0, 2.0)])
def test_non_array_inputs(any_backend, rng, bad):
    good = random_array(rng, (2, 2))
    for pos in range(3):
        args = [good, good, good]
        args[pos] = bad
        with pytest.raises(TypeError, match=rf"\b{'qkv'[pos]}\b.*{type(bad).__name__}"):
            fa(*args, backend=any_backend)


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_causal_must_be_bool(qkv, value):
    error = ValueError if isinstance(value, str) else TypeError  # a str that is not a known spelling
    with pytest.raises(error, match="causal"):
        fa(*qkv, causal=value)
    with pytest.raises(error, match="causal"):
        fastattn.FlashAttentionConfig(head_dim=8, causal=value)


def test_causal_bool_array_is_rejected_cleanly(qkv):
    # a numpy bool *scalar* is a fine bool; a bool array of several values is not
    fa(*qkv, causal=np.bool_(True))
    with pytest.raises(TypeError, match="causal"):
        fa(*qkv, causal=np.array([True, False]))
    with pytest.raises(TypeError, match="causal"):
        fastattn.FlashAttentionConfig(head_dim=8, causal=np.array([True, False]))


def test_return_lse_must_be_bool(qkv):
    with pytest.raises(TypeError, match="return_lse.*'yes'"):
        fa(*qkv, return_lse="yes")


def test_validation_before_backend_work(qkv, monkeypatch):
    """Every check runs before the backend is called (no half-done work on bad input)."""
    ref = backends.get_backend("reference")
    calls = []
    monkeypatch.setattr(ref, "forward", lambda *a, **kw: calls.append(a) or pytest.fail("backend was called"))
    for kw in [dict(scale=-1.0), dict(dropout_p=1.0), dict(block_size_q=0), dict(num_threads=0), dict(seed=-1,
               dropout_p=0.1), dict(causal="x"), dict(block_size_kv=-3), dict(scale="1")]:
        with pytest.raises((ValueError, TypeError)):
            fa(*qkv, **kw)
    assert calls == []


def test_return_lse_checked_before_backend_work(qkv, monkeypatch):
    """A bad return_lse is an argument error like any other: raised before the (possibly long) call."""
    ref = backends.get_backend("reference")
    calls = []
    original = ref.forward

    def recording_forward(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "forward", recording_forward)
    with pytest.raises(TypeError, match="return_lse"):
        fa(*qkv, return_lse="yes")
    assert calls == [], "flash_attention ran the backend before rejecting return_lse"


class _FakeGpuArray(np.ndarray):
    """A NumPy array that claims to live in CUDA memory (as CuPy arrays do), to exercise "auto"."""

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


def test_auto_routes_gpu_arrays_to_cuda(qkv):
    if backends.get_backend("cuda").availability() is None:
        pytest.skip("a CUDA device and CuPy are present")
    gpu = tuple(x.view(_FakeGpuArray) for x in qkv)
    with pytest.raises(RuntimeError, match="cuda") as exc:
        fa(*gpu, backend="auto")
    assert re.search(r"cupy|gpu|device|driver|not built|not installed", str(exc.value), re.IGNORECASE)


def test_auto_rejects_mixed_devices(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same device"):
        fa(q.view(_FakeGpuArray), k, v, backend="auto")
    with pytest.raises(ValueError, match="same device"):
        fa(q, k, v.view(_FakeGpuArray), backend="auto")


# ---------------------------------------------------------------------------------------------
# The spec memo: repeated calls skip the checks they already passed, never the ones they did not


def test_spec_memo_keeps_argument_types_and_shapes_apart(rng):
    from fastattn import _validate

    q, k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(3))
    fastattn.flash_attention(q, k, v, causal=True, backend="reference")
    with pytest.raises(TypeError, match="causal"):
        fastattn.flash_attention(q, k, v, causal=1, backend="reference")   # 1 == True, but not a bool
    fastattn.flash_attention(q, k, v, softcap=2.0, backend="reference")
    with pytest.raises(ValueError, match="softcap"):
        fastattn.flash_attention(q, k, v, softcap=-2.0, backend="reference")
    with pytest.raises(ValueError, match="softcap"):   # a failed check is not remembered
        fastattn.flash_attention(q, k, v, softcap=-2.0, backend="reference")
    k2 = rng.standard_normal((1, 2, 5, 9)).astype(np.float32)
    with pytest.raises(ValueError, match="head_dim"):
        fastattn.flash_attention(q, k2, v, backend="reference")
    with pytest.raises(TypeError, match="dtype"):
        fastattn.flash_attention(q, k.astype(np.float64), v, backend="reference")
    a = fastattn.flash_attention(q, k, v, window=(1, 0), backend="reference")
    b = fastattn.flash_attention(q, k, v, window=(2, 0), backend="reference")
    assert not np.allclose(a, b)   # options are part of the key
    for spec in _validate._spec_memo.values():   # the memo holds no arrays
        assert all(getattr(spec.arrays, f.name) is None for f in dataclasses.fields(spec.arrays))


def test_spec_memo_skips_array_options_and_unseeded_dropout(rng):
    from fastattn import _validate

    q, k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(3))
    _validate._spec_memo.clear()
    fastattn.flash_attention(q, k, v, attn_mask=np.ones((5, 5), bool), backend="reference")
    fastattn.flash_attention(q, k, v, alibi_slopes=np.ones(2, np.float32), backend="reference")
    assert not _validate._spec_memo
    fastattn.flash_attention(q, k, v, dropout_p=0.5, backend="reference")
    assert not _validate._spec_memo   # each unseeded call draws its own seed
    r1 = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=2, dropout_p=0.5),
                                 "reference").forward_multi_head(q, k, v)
    r2 = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=2, dropout_p=0.5),
                                 "reference").forward_multi_head(q, k, v)
    assert r1.seed != r2.seed
