"""What the facade accepts and gives back: PyTorch CPU tensors in and out (zero-copy), NumPy
subclasses, masked arrays (refused), duck arrays, and the fallback when the cpu kernel is missing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastattn
from conftest import assert_close_to_reference, random_array
from fastattn import _arrays, backends

DTYPES = ["float16", "bfloat16", "float32", "float64"]


# ---------------------------------------------------------------------------------------------
# PyTorch CPU tensors

def _torch():
    """PyTorch, or a skip: imported per test, so the rest of the file runs without it."""
    return pytest.importorskip("torch")


def _torch_dtype(name):
    t = _torch()
    return {"float16": t.float16, "bfloat16": t.bfloat16, "float32": t.float32, "float64": t.float64}[name]


def _as_numpy(t) -> np.ndarray:
    tt = _torch()
    if t.dtype == tt.bfloat16:
        import ml_dtypes

        return t.detach().view(tt.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_torch_cpu_tensors_in_and_out(dtype, backend):
    t = _torch()
    if backend == "cpu":
        from conftest import require_backend

        require_backend("cpu")
    gen = t.Generator().manual_seed(0)
    q, k, v = (t.randn(2, 3, n, 16, generator=gen).to(_torch_dtype(dtype)) for n in (17, 29, 29))
    out, lse = fastattn.flash_attention(q, k, v, causal=True, backend=backend, return_lse=True)
    assert isinstance(out, t.Tensor) and isinstance(lse, t.Tensor)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device.type == "cpu"
    assert lse.dtype == (t.float64 if dtype == "float64" else t.float32) and lse.shape == q.shape[:-1]
    rtol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    qn, kn, vn = (_as_numpy(x) for x in (q, k, v))
    assert_close_to_reference(_as_numpy(out), qn, kn, vn, causal=True, lse=_as_numpy(lse), rtol=rtol,
                              lse_atol=1e-5 if dtype != "float64" else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_inputs_are_read_without_a_copy(dtype):
    t = _torch()
    x = t.randn(2, 5, 7, 8).to(_torch_dtype(dtype)).transpose(1, 2)  # a strided (b, s, h, d) view
    arr = _arrays.input_array("q", x)
    assert isinstance(arr, np.ndarray) and arr.shape == tuple(x.shape)
    assert arr.ctypes.data == x.data_ptr()
    assert arr.strides == tuple(s * x.element_size() for s in x.stride())
    np.testing.assert_array_equal(arr.astype(np.float64), x.double().numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_outputs_share_memory_with_the_result(dtype):
    t = _torch()
    y = np.arange(12, dtype=np.float32).astype(_as_numpy(t.zeros(1, dtype=_torch_dtype(dtype))).dtype)
    out = _arrays.like_input(y, t.zeros(1))
    assert isinstance(out, t.Tensor) and out.dtype == _torch_dtype(dtype)
    assert out.data_ptr() == y.ctypes.data
    np.testing.assert_array_equal(out.double().numpy(), y.astype(np.float64))


def test_torch_strided_views_match_contiguous():
    t = _torch()
    gen = t.Generator().manual_seed(1)
    x = t.randn(2, 40, 3, 32, generator=gen)  # (b, s, h, d)
    view = x.transpose(1, 2)
    a = fastattn.flash_attention(view, view, view, causal=True)
    b = fastattn.flash_attention(view.contiguous(), view.contiguous(), view.contiguous(), causal=True)
    assert t.equal(a, b)


def test_torch_tensor_requiring_grad_is_refused_clearly():
    t = _torch()
    q = t.randn(1, 2, 8, 8, requires_grad=True)
    k = t.randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match=r"q requires grad.*fastattn.torch.flash_attention"):
        fastattn.flash_attention(q, k, k)
    with pytest.raises(TypeError, match=r"v requires grad"):
        fastattn.flash_attention(k, k, q)
    with t.no_grad():  # inference on a leaf that requires grad: no gradient is asked for
        out = fastattn.flash_attention(q, k, k)
    assert not out.requires_grad
    out = fastattn.flash_attention(q.detach(), k, k)
    assert isinstance(out, t.Tensor)


def test_torch_grad_check_comes_before_any_work(monkeypatch):
    t = _torch()
    from fastattn.backends import reference

    calls = []
    monkeypatch.setattr(reference, "forward", lambda *a, **kw: calls.append(a))
    with pytest.raises(TypeError, match="grad"):
        fastattn.flash_attention(t.randn(4, 8, requires_grad=True), t.randn(4, 8), t.randn(4, 8),
                                 backend="reference")
    assert calls == []


def test_torch_works_through_the_object_api_and_standard_attention():
    t = _torch()
    q = t.randn(1, 2, 9, 8)
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8, num_heads=2)).forward_multi_head(q, q, q)
    assert isinstance(res.output, t.Tensor) and isinstance(res.logsumexp, t.Tensor)
    std = fastattn.standard_attention(q, q, q)
    assert isinstance(std, t.Tensor)
    np.testing.assert_allclose(std.numpy(), res.output.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# NumPy subclasses, masked arrays, duck arrays


def test_masked_arrays_are_refused(rng):
    q = random_array(rng, (4, 8))
    masked = np.ma.masked_array(q, mask=np.zeros_like(q, dtype=bool))
    for pos in range(3):
        args = [q, q, q]
        args[pos] = masked
        with pytest.raises(TypeError, match=f"{'qkv'[pos]} is a numpy.ma masked array"):
            fastattn.flash_attention(*args)


class _Duck:
    """An array-like that is only ``__array__`` plus shape and dtype (no indexing)."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype

    def __array__(self, dtype=None, copy=None):
        return self._arr if dtype is None else self._arr.astype(dtype)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_duck_arrays_are_read_through_numpy(rng, rank):
    shape = {2: (11, 8), 3: (2, 11, 8), 4: (1, 2, 11, 8)}[rank]
    q, k, v = (random_array(rng, shape) for _ in range(3))
    out = fastattn.flash_attention(_Duck(q), _Duck(k), _Duck(v), causal=True)
    np.testing.assert_array_equal(out, fastattn.flash_attention(q, k, v, causal=True))


def test_duck_arrays_through_the_object_api(rng):
    q, k, v = (random_array(rng, (11, 8)) for _ in range(3))
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8)).forward(_Duck(q), _Duck(k), _Duck(v))
    np.testing.assert_array_equal(res.output, fastattn.flash_attention(q, k, v))


def test_duck_array_of_objects_is_refused():
    class Objects:
        shape = (2, 2)
        dtype = np.dtype(object)

        def __array__(self, dtype=None, copy=None):
            return np.array([[object(), 1], [2, 3]], dtype=object)

    with pytest.raises(TypeError, match="q"):
        fastattn.flash_attention(Objects(), np.zeros((2, 2)), np.zeros((2, 2)))


def test_matrix_subclass_is_read_as_an_array(rng):
    q = random_array(rng, (6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        m = np.asmatrix(q)
    out = fastattn.flash_attention(m, m, m)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, fastattn.flash_attention(q, q, q))


# ---------------------------------------------------------------------------------------------
# backend="auto" without the compiled kernel


def test_auto_fallback_to_the_reference_warns_once(rng, monkeypatch):
    cpu = backends.get_backend("cpu")
    monkeypatch.setattr(cpu, "availability", lambda: "the compiled extension is missing (test)")
    monkeypatch.setattr(backends, "_warned_fallback", False)
    monkeypatch.setattr(backends, "_AUTO_HOST", [])  # what "auto" found for host arrays before (the cpu backend)
    q = random_array(rng, (5, 8))
    with pytest.warns(RuntimeWarning, match=r"(?s)compiled extension is missing \(test\).*reference.*O\(N\^2\)"):
        res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=8)).forward(q, q, q)
    assert res.backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        fastattn.flash_attention(q, q, q)
    with pytest.raises(RuntimeError, match="missing"):
        fastattn.flash_attention(q, q, q, backend="cpu")
