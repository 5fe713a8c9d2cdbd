"""The CUDA backend against the float64 reference (backends.reference).

GPU tests carry the ``cuda`` marker and skip with the reason when CuPy or a device is missing;
the tests at the top need neither (the kernel source and its specialization list).

Half precision is judged fairly (FlashAttention's rule): the kernel's error against float64 must be
at most twice that of a naive materialized implementation in the same precision (fp32 scores and
softmax, P rounded to the input dtype, output rounded), plus a small floor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fastattn
from fastattn import FlashAttention, FlashAttentionConfig, flash_attention
from fastattn._validate import numpy_dtype
from fastattn.backends import get_backend
from fastattn.backends.cuda import _specs
from fastattn.backends.reference import materialized

_REASON = get_backend("cuda").availability()
gpu = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")
pytestmark = pytest.mark.cuda

DTYPES = ["float16", "bfloat16", "float32", "float64"]


# ---------------------------------------------------------------------------------------------
# no GPU needed
# ---------------------------------------------------------------------------------------------

def test_kernel_source_ships():
    src = _specs.kernel_source()
    assert "fa_fwd_mma" in src and "fa_fwd_simt" in src
    assert "philox4x32_10" in src  # header inlined
    assert '#include "' not in src
    for header in _specs.KERNEL_HEADERS:
        assert (_specs.KERNEL_DIR / header).is_file()
    # the Hopper kernel is compiled by NVRTC without include paths: it must need no header at all
    sm90 = _specs.kernel_source(_specs.KERNEL_SOURCE_SM90)
    assert "fa_fwd_sm90" in sm90 and "wgmma.mma_async" in sm90
    assert "#include" not in sm90
    # one mask and one masked-V slow path serve both tensor-core kernels
    for text in (_specs.kernel_source(_specs.KERNEL_SOURCE), sm90):
        assert "fa_mask<INTERVAL, MODS> mask" in text and "pv_tile_nonfinite_v<" in text


def test_specialization_list_covers_every_case():
    names = _specs.all_name_expressions()
    assert len(names) == len(set(names))
    for dtype in DTYPES:
        for d in range(1, _specs.MAX_HEAD_DIM + 1):
            d_pad = _specs.padded_head_dim(d, dtype)
            assert d <= d_pad
            for causal in (False, True):
                for dropout in (False, True):
                    if _specs.is_mma_dtype(dtype):
                        for vec in (False, True):
                            assert _specs.mma_name(dtype, d_pad, _specs.MMA_CONFIGS[(d_pad, causal)], causal,
                                                   dropout, vec) in names
                    else:
                        cfg = _specs.SIMT_CONFIGS[(dtype, d_pad)]
                        assert _specs.simt_name(dtype, d_pad, cfg, causal, dropout) in names
    with pytest.raises(ValueError, match="head_dim 257"):
        _specs.padded_head_dim(257, "float16")


def test_shared_memory_fits_a_hopper_or_ampere_block():
    for (d, _), cfg in _specs.MMA_CONFIGS.items():
        assert _specs.mma_smem_bytes(d, cfg) <= 163 * 1024  # A100 opt-in limit (H100: 227 KB)
    for (dtype, d), cfg in _specs.SIMT_CONFIGS.items():
        assert _specs.simt_smem_bytes(d, cfg, 8 if dtype == "float64" else 4) <= 163 * 1024
    for d, dv in _specs.sm90_dim_pairs():
        rules = [c for (dd, _), r in _specs.SM90_RULES.items() if dd == d for _, c in r]
        for cfg in (*rules, *_specs.SM90_SWEEP.get(d, ()), _specs.SM90_MODS_CONFIGS[d]):
            assert _specs.sm90_smem_bytes(d, cfg, head_dim_v=dv) * cfg.min_blocks <= 227 * 1024  # H100 / H200


@pytest.mark.skipif(_REASON is None, reason="a GPU is present")
def test_unavailable_backend_names_what_is_missing():
    q = np.zeros((4, 8), np.float32)
    with pytest.raises(RuntimeError, match="cuda"):
        flash_attention(q, q, q, backend="cuda")
    assert "cuda" not in fastattn.available_backends()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _inputs(rng, b, h, sq, skv, d, dtype):
    dt = numpy_dtype(dtype)
    q = rng.standard_normal((b, h, sq, d)).astype(dt)
    k = rng.standard_normal((b, h, skv, d)).astype(dt)
    v = rng.standard_normal((b, h, skv, d)).astype(dt)
    return q, k, v


def _to_gpu(x):
    import cupy

    try:
        return cupy.asarray(x)
    except Exception:  # noqa: BLE001 - older CuPy without bfloat16 from NumPy: move the bits
        return cupy.asarray(x.view(np.uint16)).view(x.dtype)


def _to_host(x) -> np.ndarray:
    import cupy

    if isinstance(x, cupy.ndarray):
        x = cupy.asnumpy(x)
    return np.asarray(x).astype(np.float64)


def _naive(q, k, v, *, causal, scale, dtype):
    """Materialized attention in the input's own precision (the fair yardstick)."""
    dt = numpy_dtype(dtype)
    compute = np.float64 if dtype == "float64" else np.float32
    s = np.einsum("bhid,bhjd->bhij", q.astype(compute), k.astype(compute)) * compute(scale)
    if causal:
        sq, skv = s.shape[-2:]
        s = np.where(np.arange(skv)[None, :] <= np.arange(sq)[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isneginf(m), 0, m))
    p = p / p.sum(-1, keepdims=True)
    p = p.astype(dt).astype(compute)
    return np.einsum("bhij,bhjd->bhid", p, v.astype(compute)).astype(dt).astype(np.float64)


def _rel(a, b):
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def assert_close_to_reference(out, lse, q, k, v, *, causal, scale=None, dtype, dropout_p=0.0, seed=None):
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, ref_lse = materialized(q64, k64, v64, causal=causal, scale=scale, compute_dtype=np.float64,
                                dropout_p=dropout_p, seed=seed)
    out = _to_host(out)
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    err = _rel(out, ref)
    if dtype in ("float16", "bfloat16"):
        if dropout_p == 0.0:
            bound = 2.0 * _rel(_naive(q, k, v, causal=causal, scale=scale, dtype=dtype), ref) + 1e-4
        else:
            bound = 1e-2 if dtype == "bfloat16" else 2e-3
    else:
        bound = 1e-5 if dtype == "float32" else 1e-12
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g}"
    if lse is not None:
        lse = _to_host(lse)
        finite = np.isfinite(ref_lse)
        assert (np.isfinite(lse) == finite).all()
        tol = 1e-10 if dtype == "float64" else 1e-5 if dtype == "float32" else 1e-3
        np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
    return err


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (batch, heads, seq_q, seq_kv, head_dim)
    (1, 1, 1, 1, 1),
    (2, 3, 7, 7, 3),
    (1, 2, 63, 65, 59),
    (1, 2, 65, 63, 64),
    (2, 2, 113, 203, 80),
    (1, 3, 128, 128, 96),
    (1, 2, 200, 129, 128),
    (1, 1, 1000, 1000, 64),
    (1, 1, 65, 130, 256),
]


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, shape, causal):
    b, h, sq, skv, d = shape
    q, k, v = _inputs(_rng(hash((dtype, shape, causal)) % 2**32), b, h, sq, skv, d, dtype)
    out, lse = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=causal, return_lse=True)
    assert str(out.dtype) == str(q.dtype)
    assert lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close_to_reference(out, lse, q, k, v, causal=causal, dtype=dtype)


@gpu
@pytest.mark.parametrize("d", [1, 3, 8, 16, 33, 59, 64, 72, 80, 96, 100, 128, 130, 160, 192, 200, 224, 255, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_head_dim(dtype, d):
    q, k, v = _inputs(_rng(d), 1, 2, 70, 90, d, dtype)
    out, lse = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=d % 2 == 0, return_lse=True)
    assert_close_to_reference(out, lse, q, k, v, causal=d % 2 == 0, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_many_tiles(dtype, causal):
    q, k, v = _inputs(_rng(7), 1, 2, 1024 + 17, 1024 + 17, 128, dtype)
    out = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=causal, scale=0.3)
    assert_close_to_reference(out, None, q, k, v, causal=causal, scale=0.3, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_strided_views(dtype):
    rng = _rng(3)
    b, s, h, d = 2, 77, 3, 64
    dt = numpy_dtype(dtype)
    bshd = [rng.standard_normal((b, s, h, d)).astype(dt) for _ in range(3)]
    # (B, S, H, D) -> (B, H, S, D) views: 16-byte aligned rows (vector loads)
    views = [_to_gpu(x).transpose(0, 2, 1, 3) for x in bshd]
    assert not views[0].flags.c_contiguous
    out, lse = flash_attention(*views, causal=True, return_lse=True)
    host = [x.transpose(0, 2, 1, 3) for x in bshd]
    assert_close_to_reference(out, lse, *host, causal=True, dtype=dtype)
    # every other feature: non-unit stride along head_dim (element loads)
    wide = [_to_gpu(np.stack([x, -x], axis=-1).reshape(*x.shape[:-1], 2 * d)) for x in host]
    odd = [x[..., ::2] for x in wide]  # the x entries, interleaved with -x
    assert odd[0].strides[-1] == 2 * odd[0].itemsize
    out = flash_attention(*odd)
    assert_close_to_reference(out, None, *host, causal=False, dtype=dtype)
    # a misaligned base pointer (offset by one element) also takes the element path
    flat = [_to_gpu(np.concatenate([np.zeros(1, dt), x.ravel()])) for x in host]
    shifted = [f[1:].reshape(x.shape) for f, x in zip(flat, host, strict=True)]
    assert shifted[0].data.ptr % 16 != 0
    out = flash_attention(*shifted, causal=True)
    assert_close_to_reference(out, None, *host, causal=True, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_inputs_come_back_as_numpy(dtype):
    q, k, v = _inputs(_rng(4), 1, 2, 33, 40, 64, dtype)
    out, lse = flash_attention(q, k, v, backend="cuda", return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == q.dtype
    assert_close_to_reference(out, lse, q, k, v, causal=False, dtype=dtype)


@gpu
def test_auto_picks_cuda_for_gpu_arrays():
    q, k, v = _inputs(_rng(5), 1, 1, 16, 16, 32, "float32")
    fa = FlashAttention(FlashAttentionConfig(num_heads=1, head_dim=32))
    res = fa.forward_multi_head(_to_gpu(q[None, 0]), _to_gpu(k[None, 0]), _to_gpu(v[None, 0]))
    assert res.backend == "cuda"
    assert res.peak_sram_bytes > 0
    assert res.block_size_q > 0 and res.block_size_kv > 0
    assert res.flops == 4 * 32 * 16 * 16


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_tensors_zero_copy(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    tdt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 64, device="cuda", dtype=tdt, generator=g).transpose(1, 2) for _ in range(3))
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == tdt
    assert out.shape == q.shape
    host = [x.float().cpu().numpy().astype(numpy_dtype(dtype)) for x in (q, k, v)]
    assert_close_to_reference(out.float().cpu().numpy(), lse.cpu().numpy(), *host, causal=True, dtype=dtype)
    # the same computation through torch itself
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.allclose(out.float(), ref, atol=2e-2 if dtype == "bfloat16" else 5e-3)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_matches_reference(dtype, causal):
    q, k, v = _inputs(_rng(6), 2, 3, 67, 129, 64, dtype)
    seed = 0x1234_5678_9ABC_DEF0
    out = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=causal, dropout_p=0.3, seed=seed)
    assert_close_to_reference(out, None, q, k, v, causal=causal, dtype=dtype, dropout_p=0.3, seed=seed)
    # a different seed gives a clearly different result (the mask is really applied)
    other = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=causal, dropout_p=0.3, seed=seed + 1)
    assert _rel(_to_host(other), _to_host(out)) > 0.05


@gpu
def test_dropout_agrees_with_cpu_backend():
    cpu = get_backend("cpu")
    if cpu.availability() is not None:
        pytest.skip(f"cpu backend unavailable: {cpu.availability()}")
    q, k, v = _inputs(_rng(8), 1, 2, 100, 90, 32, "float32")
    seed = 987654321
    gpu_out = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), dropout_p=0.5, seed=seed)
    cpu_out = flash_attention(q, k, v, dropout_p=0.5, seed=seed, backend="cpu")
    assert _rel(_to_host(gpu_out), cpu_out.astype(np.float64)) < 1e-5


@gpu
def test_dropout_draws_a_seed_and_reports_it():
    q, k, v = _inputs(_rng(9), 1, 1, 20, 20, 16, "float32")
    fa = FlashAttention(FlashAttentionConfig(num_heads=1, head_dim=16, dropout_p=0.2))
    res = fa.forward(_to_gpu(q[0, 0]), _to_gpu(k[0, 0]), _to_gpu(v[0, 0]))
    assert res.seed is not None
    assert_close_to_reference(res.output[None, None], None, q, k, v, causal=False, dtype="float32",
                              dropout_p=0.2, seed=res.seed)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_no_keys_gives_zero_and_minus_inf(dtype):
    q, k, v = _inputs(_rng(10), 1, 2, 5, 0, 8, dtype)
    out, lse = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), return_lse=True)
    assert (_to_host(out) == 0).all()
    assert np.isneginf(_to_host(lse)).all()


@gpu
def test_result_does_not_depend_on_block_size_request():
    q, k, v = _inputs(_rng(11), 1, 2, 90, 90, 64, "float16")
    a = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=True)
    b = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), causal=True, block_size_q=16, block_size_kv=16)
    assert (_to_host(a) == _to_host(b)).all()


@gpu
def test_errors_name_the_problem():
    q = _to_gpu(np.zeros((1, 4, 300), np.float16))
    with pytest.raises(ValueError, match="head_dim 300"):
        flash_attention(q, q, q)
    with pytest.raises(ValueError, match="same device"):
        flash_attention(q, np.zeros((1, 4, 300), np.float16), q)


@gpu
def test_describe_names_the_device():
    facts = get_backend("cuda").describe()
    assert facts["device"] and facts["compute_capability"]
    assert fastattn.info()["details"]["cuda"]["available"]


@gpu
def test_sanity_large_scores_are_stable():
    q, k, v = _inputs(_rng(12), 1, 1, 64, 300, 64, "float16")
    q = (q.astype(np.float32) * 8).astype(np.float16)  # scores of tens: the running max must rescale
    out, lse = flash_attention(_to_gpu(q), _to_gpu(k), _to_gpu(v), return_lse=True)
    assert_close_to_reference(out, lse, q, k, v, causal=False, dtype="float16")


# ---------------------------------------------------------------------------------------------
# the Hopper kernel (compute capability 9.0)
# ---------------------------------------------------------------------------------------------

def _is_hopper() -> bool:
    if _REASON is not None:
        return False
    from fastattn.backends.cuda import _launch

    return _launch.device_capability() == (9, 0)


hopper = pytest.mark.skipif(not _is_hopper(), reason="needs a GPU of compute capability 9.0")

HOPPER_SHAPES = [  # (batch, heads, seq_q, seq_kv, head_dim): odd lengths, every tile rule's edges
    (1, 1, 1, 1, 64),
    (2, 3, 200, 333, 64),
    (1, 2, 77, 513, 128),
    (1, 2, 130, 65, 120),
    (1, 1, 64, 64, 40),
    (1, 2, 1025, 1025, 128),
    (1, 1, 300, 2049, 64),
    (1, 1, 129, 8193, 64),
]


@hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hopper_kernel_matches_reference(dtype, shape, causal):
    b, h, sq, skv, d = shape
    q, k, v = _inputs(_rng(hash((dtype, shape, causal, 90)) % 2**32), b, h, sq, skv, d, dtype)
    res = FlashAttention(FlashAttentionConfig(num_heads=h, head_dim=d, causal=causal)).forward_multi_head(
        _to_gpu(q), _to_gpu(k), _to_gpu(v))
    assert res.kernel == "wgmma"
    assert res.block_size_q % 64 == 0 and res.peak_sram_bytes > 48 * 1024
    assert_close_to_reference(res.output, res.logsumexp, q, k, v, causal=causal, dtype=dtype)


@hopper
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128])
def test_every_hopper_tile_configuration(dtype, d):
    """The sweep's configurations too (forced through the launcher), on a shape with ragged tiles."""
    import cupy

    from fastattn._validate import make_spec
    from fastattn.backends.cuda import _launch

    q, k, v = _inputs(_rng(d), 2, 2, 333, 517, d, dtype)
    gq, gk, gv = (_to_gpu(x) for x in (q, k, v))
    for causal in (False, True):
        spec = make_spec(gq, gk, gv, causal=causal, scale=None, dropout_p=0.0, seed=None, block_q=None,
                         block_kv=None, num_threads=None)
        for cfg in _specs.SM90_SWEEP[d]:
            out = cupy.full(gq.shape, np.nan, dtype=gq.dtype)  # poisoned: every element must be written
            lse = cupy.full(gq.shape[:3], np.nan, dtype=cupy.float32)
            used = _launch.launch(gq, gk, gv, out, lse, spec, dtype, config=cfg)
            assert used.kernel == "wgmma" and used.block_kv == cfg.block_kv
            assert_close_to_reference(out, lse, q, k, v, causal=causal, dtype=dtype)


@hopper
def test_hopper_kernel_can_be_turned_off(monkeypatch):
    q, k, v = _inputs(_rng(21), 1, 2, 100, 100, 64, "float16")
    fa = FlashAttention(FlashAttentionConfig(num_heads=2, head_dim=64, causal=True))
    gpu_in = [_to_gpu(x) for x in (q, k, v)]
    a = fa.forward_multi_head(*gpu_in)
    monkeypatch.setenv("FASTATTN_CUDA_KERNEL", "mma")
    b = fa.forward_multi_head(*gpu_in)
    assert (a.kernel, b.kernel) == ("wgmma", "mma.sync")
    np.testing.assert_allclose(_to_host(a.output), _to_host(b.output), atol=2e-3)
    monkeypatch.setenv("FASTATTN_CUDA_KERNEL", "bogus")
    with pytest.raises(ValueError, match="FASTATTN_CUDA_KERNEL"):
        fa.forward_multi_head(*gpu_in)


@hopper
def test_hopper_kernel_serves_strided_views_and_falls_back_where_it_cannot():
    rng = _rng(22)
    b, s, h, d = 2, 150, 3, 128
    host = [rng.standard_normal((b, s, h, d)).astype(np.float16) for _ in range(3)]
    views = [_to_gpu(x).transpose(0, 2, 1, 3) for x in host]  # (B, S, H, D) memory, 16-byte rows
    fa = FlashAttention(FlashAttentionConfig(num_heads=h, head_dim=d, causal=True))
    res = fa.forward_multi_head(*views)
    assert res.kernel == "wgmma"
    ref_in = [x.transpose(0, 2, 1, 3) for x in host]
    assert_close_to_reference(res.output, res.logsumexp, *ref_in, causal=True, dtype="float16")
    # dropout and an odd head_dim take the mma.sync kernel; head_dim 96 is padded to 128 on the Hopper kernel
    assert FlashAttention(FlashAttentionConfig(num_heads=h, head_dim=d, dropout_p=0.1)).forward_multi_head(
        *views).kernel == "mma.sync"
    for dd, kernel in ((96, "wgmma"), (59, "mma.sync")):
        x = _to_gpu(rng.standard_normal((1, 1, 40, dd)).astype(np.float16))
        assert FlashAttention(FlashAttentionConfig(head_dim=dd)).forward_multi_head(x, x, x).kernel == kernel


@hopper
def test_hopper_cubin_disk_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    from fastattn.backends.cuda import _launch

    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))
    name = _specs.sm90_name("float16", 64, _specs.sm90_config(64, True, 100), True)
    cubin, lowered = _launch._nvrtc_cubin(_launch._source(name), name, _launch._SM90_OPTIONS)
    files = list(tmp_path.glob("*.cubin"))
    assert len(files) == 1 and lowered.startswith("_Z") and len(cubin) > 1000
    assert _launch._nvrtc_cubin(_launch._source(name), name, _launch._SM90_OPTIONS) == (cubin, lowered)
    files[0].write_bytes(files[0].read_bytes()[:-100])  # torn write: the hash no longer matches
    assert _launch._nvrtc_cubin(_launch._source(name), name, _launch._SM90_OPTIONS) == (cubin, lowered)
    monkeypatch.setattr(_launch, "_KERNELS", {})  # a fresh process: the kernel comes from the cache
    monkeypatch.setattr(_launch, "_PLANS", {})
    q, k, v = _inputs(_rng(23), 1, 2, 100, 100, 64, "float16")
    res = FlashAttention(FlashAttentionConfig(num_heads=2, head_dim=64, causal=True)).forward_multi_head(
        *(_to_gpu(x) for x in (q, k, v)))
    assert res.kernel == "wgmma"
    assert_close_to_reference(res.output, res.logsumexp, q, k, v, causal=True, dtype="float16")


@hopper
def test_hopper_kernel_build_failure_falls_back_with_a_warning(monkeypatch):
    from fastattn.backends.cuda import _launch

    def broken(*args, **kwargs):
        raise RuntimeError("NVRTC could not compile (simulated)")

    monkeypatch.setattr(_launch, "_nvrtc_cubin", broken)
    monkeypatch.setattr(_launch, "_KERNELS", {})
    monkeypatch.setattr(_launch, "_PLANS", {})
    monkeypatch.setattr(_launch, "_SM90_FAILED", {})
    q, k, v = _inputs(_rng(24), 1, 1, 80, 80, 128, "bfloat16")
    fa = FlashAttention(FlashAttentionConfig(head_dim=128))
    with pytest.warns(RuntimeWarning, match="Hopper kernel"):
        res = fa.forward_multi_head(*(_to_gpu(x) for x in (q, k, v)))
    assert res.kernel == "mma.sync"
    assert_close_to_reference(res.output, res.logsumexp, q, k, v, causal=False, dtype="bfloat16")


# ---------------------------------------------------------------------------------------------
# numerics: large magnitudes and scales, long key sequences, masked keys (every kernel family)
# ---------------------------------------------------------------------------------------------

def test_tensor_core_scale_arguments_stay_in_float32_range():
    """No GPU: the float32 scale arguments of fa_fwd_mma / fa_fwd_sm90 (exponent and lse)."""
    from fastattn.backends.cuda import _launch

    f32 = np.finfo(np.float32)
    scale_log2, scale = _launch._mma_scales(0.125)
    assert scale_log2 == np.float32(0.125 * np.log2(np.e)) and scale == np.float32(0.125)
    scale_log2, scale = _launch._mma_scales(1e39)  # beyond float32: the largest float, never inf
    assert scale_log2 == f32.max and scale == f32.max
    scale_log2, scale = _launch._mma_scales(1e-50)  # below float32: never 0 in the exponent (-inf * 0),
    assert scale_log2 == f32.tiny and scale == 0.0     # nor a subnormal that flush-to-zero makes 0
    for x in (1e-50, 1e-3, 1.0, 1e38, 1e39, 1e300):
        assert all(np.isfinite(v) and v.dtype == np.float32 for v in _launch._mma_scales(x))


def test_kernels_compile_with_nvcc(tmp_path):
    """No GPU: the masking slow paths (causal) and the plain paths of every family build with nvcc."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found (tools/compile_cuda_kernels.py compiles every specialization in CI)")
    names = _specs.all_name_expressions()
    picks = [n for n in names if n.startswith("fa_fwd_mma<__half, 64,") and n.endswith("true, false, false, true>")][:1]
    picks += [n for n in names
              if n.startswith("fa_fwd_mma<__nv_bfloat16, 64,") and n.endswith("true, true, true, false>")][:1]
    picks += [n for n in names if n.startswith("fa_fwd_simt<float, float, 128,") and "true" in n][:2]
    sm90 = [n for n in _specs.all_sm90_name_expressions()
            if n.startswith("fa_fwd_sm90<true, 64,") and n.endswith("true, true>")]
    assert len(picks) == 4 and sm90
    for source, chunk, arch in ((_specs.KERNEL_SOURCE, picks, ["-arch=sm_80"]),
                                (_specs.KERNEL_SOURCE_SM90, sm90[:1], ["-gencode=arch=compute_90a,code=sm_90a"])):
        refs = ", ".join(f"reinterpret_cast<const void*>(&{n})" for n in chunk)
        unit = tmp_path / f"unit_{source}"
        unit.write_text(f'#include "{source}"\nconst void* const kernels[] = {{{refs}}};\n')
        # nvcc must not inherit a sanitizer runtime preloaded into this interpreter (tools/sanitize.sh)
        env = {key: val for key, val in os.environ.items() if key not in ("LD_PRELOAD", "ASAN_OPTIONS")}
        proc = subprocess.run([nvcc, "-std=c++17", "-cubin", *arch, "-I", str(_specs.KERNEL_DIR), "-o",
                               str(tmp_path / "out.cubin"), str(unit)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]


def _run(q, k, v, *, causal, scale=None, family="auto", monkeypatch=None):
    """(out, lse, kernel) of one call on the GPU, as float64 host arrays."""
    if monkeypatch is not None:
        monkeypatch.setenv("FASTATTN_CUDA_KERNEL", family)
    b, h, _, d = q.shape
    res = FlashAttention(FlashAttentionConfig(num_heads=h, head_dim=d, causal=causal, scale=scale)).forward_multi_head(
        _to_gpu(q), _to_gpu(k), _to_gpu(v))
    return _to_host(res.output), _to_host(res.logsumexp), res.kernel


FAMILIES = [("float16", "auto"), ("float16", "mma"), ("bfloat16", "auto"), ("bfloat16", "mma"),
            ("float32", "auto"), ("float64", "auto")]

#: large magnitudes whose scores (scale q.k) still fit in float32 (float64 for float64)
LARGE = {"float16": 30000.0, "bfloat16": 133120.0, "float32": 1e17, "float64": 1e150}


@gpu
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=lambda x: str(x))
def test_large_finite_values_give_finite_output(dtype, family, d, monkeypatch):
    """PyTorch's large-bf16 case (q = k = v = 133120, one key) and its kind on every kernel family:
    the exponent (s - max) * scale is 0 at the max whatever the magnitude, so no inf / inf."""
    dt = numpy_dtype(dtype)
    x = np.full((1, 1, 1, d), LARGE[dtype], dt)
    out, lse, kernel = _run(x, x, x, causal=False, family=family, monkeypatch=monkeypatch)
    assert np.isfinite(out).all() and np.isfinite(lse).all(), kernel
    assert (out == float(x[0, 0, 0, 0])).all(), (kernel, out[0, 0, 0, :4])
    expect_lse = d * float(x[0, 0, 0, 0]) ** 2 / np.sqrt(d)  # float32 q.k rounds d times: 1e-5
    np.testing.assert_allclose(lse, expect_lse, rtol=1e-5 if dtype != "float64" else 1e-13)
    # many keys of large, distinct magnitudes (some causal-masked): finite and as the reference says
    rng = _rng(d)
    mag = LARGE[dtype]
    q, k, v = (((rng.uniform(0.5, 1.0, (1, 2, s, d)) * rng.choice([-1.0, 1.0], (1, 2, s, d))) * mag).astype(dt)
               for s in (37, 70, 70))
    for causal in (False, True):
        out, lse, kernel = _run(q, k, v, causal=causal, family=family, monkeypatch=monkeypatch)
        assert np.isfinite(out).all() and np.isfinite(lse).all(), kernel
        assert_close_to_reference(out, lse, q, k, v, causal=causal, dtype=dtype)


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=lambda x: str(x))
def test_small_and_large_scales(dtype, family, monkeypatch):
    """Scales far from 1/sqrt(d): the reference's answer wherever float32 (float64) holds it."""
    rng = _rng(31)
    d = 64
    dt = numpy_dtype(dtype)
    q, k, v = _inputs(rng, 1, 2, 40, 90, d, dtype)
    # tiny scale: every weight ~1, the output is the mean of v
    for scale in (1e-30, 1e-46):
        out, lse, kernel = _run(q, k, v, causal=True, scale=scale, family=family, monkeypatch=monkeypatch)
        assert_close_to_reference(out, None, q, k, v, causal=True, scale=scale, dtype=dtype)
    # huge scale: one key (the arg max) per row; lse ~ max * scale, inf where float32 cannot hold it
    scale = 1e38 if dtype in ("float16", "bfloat16") else 1e39
    out, lse, kernel = _run(q, k, v, causal=True, scale=scale, family=family, monkeypatch=monkeypatch)
    ref, ref_lse = materialized(*(x.astype(np.float64) for x in (q, k, v)), causal=True, scale=scale,
                                compute_dtype=np.float64)
    assert np.isfinite(out).all(), kernel
    np.testing.assert_allclose(out, ref, rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=1e-3)
    with np.errstate(over="ignore"):  # float32 cannot hold every lse here: inf, as the kernel's
        ref_lse = ref_lse.astype(np.float64 if dtype == "float64" else np.float32).astype(np.float64)
    finite = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == finite).all() and (lse[~finite] == ref_lse[~finite]).all(), kernel
    # lse = max * scale: the raw max's float32 rounding (about 1e-6 of the raw scores), times scale
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-6, atol=1e-5 * scale)
    if dtype == "float64":
        # q.k tiny, scale far beyond float32 (1.25e299): logits of a few units that only the exact
        # scale gets right.  (In float32 such logits need subnormal products, which a GPU may flush.)
        tiny = 1e-150
        big = 1 / (tiny * tiny * np.sqrt(d))
        qs, ks = ((x.astype(np.float64) * tiny).astype(dt) for x in (q, k))
        out, lse, kernel = _run(qs, ks, v, causal=False, scale=big, family=family, monkeypatch=monkeypatch)
        ref, ref_lse = materialized(*(x.astype(np.float64) for x in (qs, ks, v)), causal=False, scale=big,
                                    compute_dtype=np.float64)
        assert _rel(out, ref) < 1e-12, kernel
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    if dtype in ("float32", "float64"):
        # the CPU backend's old failure: q = 3e38 against k ~ 1e-38 (logits of a few units); k kept
        # normal (>= 2^-126): subnormal inputs are a separate matter on a GPU (flush-to-zero)
        kb = (np.sign(k) * (1.0 + np.abs(k.astype(np.float64))) * 1.2e-38).astype(dt)
        qb = np.full_like(q, 3e38)
        out, lse, kernel = _run(qb, kb, v, causal=False, family=family, monkeypatch=monkeypatch)
        assert_close_to_reference(out, lse, qb, kb, v, causal=False, dtype=dtype)


def _plain_float32(q, k, v, scale):
    """The plain float32 implementation (materialized, BLAS products): out and lse."""
    f32 = np.float32
    s = np.matmul(q.astype(f32), np.swapaxes(k.astype(f32), -1, -2)) * f32(scale)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    rowsum = p.sum(-1, keepdims=True)
    out = np.matmul(p, v.astype(f32)) / rowsum
    return out.astype(np.float64), (m + np.log(rowsum))[..., 0].astype(np.float64)


def _reference(q, k, v, scale, causal=False):
    return materialized(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, scale=scale,
                        compute_dtype=np.float64)


def _lse_bound(err_plain, ref_lse):
    """Two plain float32 logsumexp errors, plus two float32 ulps of the largest |lse|."""
    return 2.0 * err_plain + 2.0 * float(np.spacing(np.float32(np.abs(ref_lse).max())))


@gpu
@pytest.mark.parametrize(("heads", "seq_q", "seq_kv", "d"), [(12, 16, 100_000, 128), (2, 16, 100_000, 32),
                                                             (2, 33, 3000, 64)])
def test_float32_long_keys_within_2x_of_plain_float32(heads, seq_q, seq_kv, d):
    """float32 over many tiles: two-level P V and row sums keep the error within 2x that of a plain
    float32 implementation (whose BLAS sums long products in blocks); lse as a float32 logsumexp."""
    q, k, v = _inputs(_rng(seq_kv + d), 1, heads, seq_q, seq_kv, d, "float32")
    scale = 1.0 / np.sqrt(d)
    out, lse, kernel = _run(q, k, v, causal=False)
    assert kernel == "simt"
    ref, ref_lse = _reference(q, k, v, scale)
    plain, plain_lse = _plain_float32(q, k, v, scale)
    err, err_plain = _rel(out, ref), _rel(plain, ref)
    assert err <= 2.0 * err_plain, f"error {err:.3g} vs plain float32 {err_plain:.3g} ({err / err_plain:.2f}x)"
    err_lse, err_plain_lse = np.abs(lse - ref_lse).max(), np.abs(plain_lse - ref_lse).max()
    assert err_lse <= _lse_bound(err_plain_lse, ref_lse), f"lse error {err_lse:.3g}, plain {err_plain_lse:.3g}"


@gpu
@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_lse_long_keys_as_float32_logsumexp(dtype, d):
    """lse over 100k keys: within 2x the error of a plain float32 logsumexp (+2 float32 ulps); a rescale
    factor that was not exactly 1 once the max settled made it drift by up to 2e-4."""
    q, k, v = _inputs(_rng(d), 1, 2, 16, 100_000, d, dtype)
    scale = 1.0 / np.sqrt(d)
    out, lse, kernel = _run(q, k, v, causal=False)
    ref, ref_lse = _reference(q, k, v, scale)
    _, plain_lse = _plain_float32(q, k, v, scale)
    err_lse, err_plain = np.abs(lse - ref_lse).max(), np.abs(plain_lse - ref_lse).max()
    assert err_lse <= _lse_bound(err_plain, ref_lse), f"{kernel}: lse error {err_lse:.3g}, plain {err_plain:.3g}"
    assert_close_to_reference(out, None, q, k, v, causal=False, dtype=dtype)


def _poison(dtype):
    """NaN, +inf, -inf in the input dtype."""
    dt = numpy_dtype(dtype)
    return [dt.type(np.nan), dt.type(np.inf), dt.type(-np.inf)]


def _close_where(out, ref, naive, keep, dtype, what):
    """‖out − ref‖/‖ref‖ over the entries `keep`, with assert_close_to_reference's bounds."""
    err = _rel(out[keep], ref[keep])
    if dtype in ("float16", "bfloat16"):
        bound = 2.0 * _rel(naive[keep], ref[keep]) + 1e-4
    else:
        bound = 1e-5 if dtype == "float32" else 1e-12
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"


MASK_SHAPES = [  # (batch, heads, seq_q, seq_kv, head_dim): tile edges of every family
    (1, 2, 200, 333, 64),
    (1, 1, 65, 130, 128),
    (2, 1, 129, 260, 40),
    (1, 1, 300, 200, 64),
    (1, 1, 70, 90, 59),
    (1, 1, 1, 40, 64),
]


@gpu
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=lambda x: str(x))
def test_masked_keys_never_contribute(dtype, family, shape, monkeypatch):
    """Causal: NaN / inf in K and V at keys a row does not see never reach that row, whatever the
    tiles; a NaN in V at a key a row sees makes that column of the row NaN (as the formula says),
    a NaN in K there makes the row NaN (out and lse)."""
    b, h, sq, skv, d = shape
    q, k, v = _inputs(_rng(sq * skv + d), b, h, sq, skv, d, dtype)
    ref, ref_lse = _reference(q, k, v, 1.0 / np.sqrt(d), causal=True)
    naive = _naive(q, k, v, causal=True, scale=1.0 / np.sqrt(d), dtype=dtype)
    clean_out, clean_lse, kernel = _run(q, k, v, causal=True, family=family, monkeypatch=monkeypatch)
    assert np.isfinite(clean_out).all()
    poison = _poison(dtype)
    # keys past the last query row: masked for every row
    kp, vp = k.copy(), v.copy()
    for j in range(sq, skv):
        kp[:, :, j, :] = poison[j % 3]
        vp[:, :, j, :] = poison[(j + 1) % 3]
    out, lse, kernel = _run(q, kp, vp, causal=True, family=family, monkeypatch=monkeypatch)
    assert np.isfinite(out).all() and np.isfinite(lse).all(), f"{kernel}: a masked key reached a row"
    _close_where(out, ref, naive, np.ones(out.shape, bool), dtype, f"{kernel}, masked keys poisoned")
    np.testing.assert_allclose(lse, clean_lse, rtol=1e-6, atol=1e-6)
    # keys some rows see and others do not, at tile edges: one poisoned V column, then one K row
    rows = np.arange(sq)[None, None, :, None]
    for j0 in sorted({j for j in (1, 15, 16, 31, 32, 63, 64, 127, 128, 191, 192) if j < min(sq, skv)}):
        c0 = j0 % d
        vj = vp.copy()
        vj[:, :, j0, c0] = poison[0]
        out, lse, kernel = _run(q, kp, vj, causal=True, family=family, monkeypatch=monkeypatch)
        expect_nan = np.zeros(out.shape, bool)
        expect_nan[:, :, j0:, c0] = True  # rows j0.. see key j0
        assert (np.isnan(out) == expect_nan).all(), (
            f"{kernel}: NaN in v at key {j0}, column {c0}: rows with NaN "
            f"{sorted(set(np.nonzero(np.isnan(out))[2].tolist()))[:12]}")
        _close_where(out, ref, naive, ~expect_nan, dtype, f"{kernel}, v[{j0}, {c0}] = NaN")
        np.testing.assert_allclose(lse, clean_lse, rtol=1e-6, atol=1e-6)
        kj = kp.copy()
        kj[:, :, j0, :] = poison[0]
        out, lse, kernel = _run(q, kj, vp, causal=True, family=family, monkeypatch=monkeypatch)
        row_nan = np.broadcast_to(rows >= j0, out.shape)
        assert (np.isnan(out) == row_nan).all(), f"{kernel}: NaN in k at key {j0}"
        assert (np.isnan(lse) == row_nan[..., 0]).all(), f"{kernel}: NaN in k at key {j0} (lse)"
        _close_where(out, ref, naive, ~row_nan, dtype, f"{kernel}, k[{j0}] = NaN")


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_keys_past_seq_kv_are_never_read(dtype):
    """Views that end inside a larger buffer of NaN: the rows past seq_kv are never loaded."""
    b, h, sq, skv, d = 1, 2, 77, 130, 64
    q, k, v = _inputs(_rng(41), b, h, sq, skv, d, dtype)
    dt = numpy_dtype(dtype)
    views = []
    for x in (k, v):
        full = np.full((b, h, skv + 61, d), np.nan, dt)
        full[:, :, :skv] = x
        views.append(_to_gpu(full)[:, :, :skv])
    for causal in (False, True):
        out, lse = flash_attention(_to_gpu(q), views[0], views[1], causal=causal, return_lse=True)
        assert_close_to_reference(out, lse, q, k, v, causal=causal, dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masked_nan_under_every_tile_configuration(dtype):
    """Every Hopper tile configuration and every mma.sync tile the sweep may force: NaN / inf at
    keys the causal mask hides leave the result as on clean inputs (forced through the launcher)."""
    import cupy

    from fastattn._validate import make_spec
    from fastattn.backends.cuda import _launch

    for d in (64, 128):
        q, k, v = _inputs(_rng(d + 3), 1, 2, 211, 333, d, dtype)
        kp, vp = k.copy(), v.copy()
        poison = _poison(dtype)
        expect_nan = np.zeros(q.shape, bool)
        for j in range(1, 211):  # key j is hidden from rows 0 .. j-1 and seen by rows j ..
            vp[:, :, j, j % d] = poison[0]
            expect_nan[:, :, j:, j % d] = True
        for j in range(211, 333):  # keys no row sees
            kp[:, :, j, :] = poison[j % 3]
            vp[:, :, j, :] = poison[(j + 1) % 3]
        gq, gk, gv = (_to_gpu(x) for x in (q, kp, vp))
        spec = make_spec(gq, gk, gv, causal=True, scale=None, dropout_p=0.0, seed=None, block_q=None,
                         block_kv=None, num_threads=None)
        configs = list(_specs.MMA_SWEEP[d]) + [_specs.MMA_CONFIGS[(d, True)]]
        if _is_hopper():
            configs += list(_specs.SM90_SWEEP[d])
        ref, _ = _reference(q, k, v, 1.0 / np.sqrt(d), causal=True)
        naive = _naive(q, k, v, causal=True, scale=1.0 / np.sqrt(d), dtype=dtype)
        for cfg in configs:
            out = cupy.full(gq.shape, np.nan, dtype=gq.dtype)
            lse = cupy.full(gq.shape[:3], np.nan, dtype=cupy.float32)
            used = _launch.launch(gq, gk, gv, out, lse, spec, dtype, config=cfg)
            got = _to_host(out)
            assert (np.isnan(got) == expect_nan).all(), (used, cfg)
            assert np.isfinite(_to_host(lse)).all(), (used, cfg)
            _close_where(got, ref, naive, ~expect_nan, dtype, f"{used.kernel} {cfg}")
