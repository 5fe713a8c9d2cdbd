"""Every attention variant on the CUDA backend against the float64 reference (backends.reference).

GQA / MQA, v head_dim != q/k's, layout "bshd", causal alignment, sliding windows, softcap, ALiBi,
attn_mask (bool and bias, broadcast views), padded ragged batches and packed sequences, alone and
combined, with dropout and lse; on each kernel family: the Hopper kernel (``wgmma``, asserted to be
the one that ran on compute capability 9.0), ``mma.sync`` (``FASTATTN_CUDA_KERNEL=mma``) and the
SIMT kernel (float32 / float64).  Outputs are poisoned (NaN) before each call, so an element the
kernel does not write fails the check.  GPU tests skip with the reason without CuPy or a device.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastattn import flash_attention, flash_attention_varlen
from fastattn._api import _run
from fastattn._validate import numpy_dtype
from fastattn.backends import get_backend
from fastattn.backends.cuda import _specs

_REASON = get_backend("cuda").availability()
gpu = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")
pytestmark = pytest.mark.cuda

#: (dtype, FASTATTN_CUDA_KERNEL): every kernel family
FAMILIES = [("float16", "auto"), ("float16", "mma"), ("bfloat16", "auto"), ("bfloat16", "mma"),
            ("float32", "auto"), ("float64", "auto")]
FAMILY_IDS = [f"{d}-{f}" for d, f in FAMILIES]

#: relative error of out against float64 (half precision: P and out rounded to 16 bits)
OUT_TOL = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 2e-5, "float64": 1e-11}
LSE_TOL = {"float16": 2e-3, "bfloat16": 2e-3, "float32": 2e-5, "float64": 1e-10}


def _is_hopper() -> bool:
    if _REASON is not None:
        return False
    from fastattn.backends.cuda import _launch

    return _launch.device_capability() == (9, 0)


def _expected_kernel(dtype: str, family: str, dims: tuple[int, ...], dropout: bool) -> str | None:
    if dtype in ("float32", "float64"):
        return "simt"
    if family == "mma" or dropout or any(x % 8 for x in dims):
        return "mma.sync"
    return "wgmma" if _is_hopper() else "mma.sync"


def _cp():
    import cupy

    return cupy


def _gpu(x):
    if x is None or not isinstance(x, np.ndarray):
        return x
    cp = _cp()
    try:
        return cp.asarray(x)
    except Exception:  # noqa: BLE001 - a CuPy without bfloat16 from NumPy: move the bits
        return cp.asarray(x.view(np.uint16)).view(x.dtype)


def _host(x) -> np.ndarray:
    cp = _cp()
    if isinstance(x, cp.ndarray):
        x = cp.asnumpy(x)
    return np.asarray(x).astype(np.float64)


def _poison(*shapes_dtypes) -> None:
    """Leaves NaN-filled blocks of these sizes in CuPy's pool: the outputs' cp.empty reuses them."""
    cp = _cp()
    blocks = [cp.full(shape, np.nan, dtype=dt) for shape, dt in shapes_dtypes]
    cp.cuda.Device().synchronize()
    del blocks


_DEFAULTS = dict(causal=False, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=None,
                 layout="bhsd", window=None, softcap=0.0, alibi_slopes=None, attn_mask=None, seqlens_q=None,
                 seqlens_kv=None, cu_seqlens_q=None, cu_seqlens_kv=None)


def _call(q, k, v, backend, **kw):
    return _run(q, k, v, {**_DEFAULTS, **kw}, backend)


def check(dtype, family, monkeypatch, q, k, v, *, out_tol=None, gpu_kw=None, **kw):
    """Runs the call on the reference (host arrays) and on the GPU; compares out and lse; returns
    (gpu result, reference out, reference lse) with outputs as float64 host arrays.  ``gpu_kw``:
    arguments given to the GPU call as they are (e.g. CuPy views with chosen strides) instead of
    copies of the host ones."""
    monkeypatch.setenv("FASTATTN_CUDA_KERNEL", family)
    ref = _call(q, k, v, "reference", **kw)
    gkw = {name: (_gpu(val) if name in ("alibi_slopes", "attn_mask", "seqlens_q", "seqlens_kv", "cu_seqlens_q",
                                        "cu_seqlens_kv") else val) for name, val in kw.items()}
    gkw.update(gpu_kw or {})
    out_dt = numpy_dtype(dtype)
    _poison((ref.output.shape, out_dt), (ref.logsumexp.shape, np.float64 if dtype == "float64" else np.float32))
    res = _call(_gpu(q), _gpu(k), _gpu(v), "cuda", **gkw)
    out, lse = _host(res.output), _host(res.logsumexp)
    ref_out, ref_lse = _host(ref.output), _host(ref.logsumexp)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert np.isfinite(out).all(), "an output element is not finite (unwritten or leaked from a masked key)"
    den = np.linalg.norm(ref_out)
    err = float(np.linalg.norm(out - ref_out) / (den if den > 0 else 1.0))
    tol = out_tol if out_tol is not None else OUT_TOL[dtype]
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g} ({res.kernel})"
    finite = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == finite).all(), "lse is -inf exactly where a row sees no key"
    assert (lse[~finite] == -np.inf).all()
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=LSE_TOL[dtype], atol=LSE_TOL[dtype])
    return res, ref_out, ref_lse


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(numpy_dtype(dtype))


def _qkv(rng, dtype, b, hq, hkv, sq, skv, d, dv=None):
    dv = d if dv is None else dv
    return (_rand(rng, (b, hq, sq, d), dtype), _rand(rng, (b, hkv, skv, d), dtype),
            _rand(rng, (b, hkv, skv, dv), dtype))


def _assert_kernel(res, dtype, family, dims, dropout=False):
    want = _expected_kernel(dtype, family, dims, dropout)
    assert res.kernel == want, f"{res.kernel} ran, {want} expected"


# ---------------------------------------------------------------------------------------------
# no GPU needed
# ---------------------------------------------------------------------------------------------

def test_every_variant_has_its_specializations():
    names = set(_specs.all_name_expressions())
    sm90 = set(_specs.all_sm90_name_expressions())
    for dtype in ("float16", "bfloat16"):
        for d, dv in _specs.mma_dim_pairs():
            for interval, mods in _specs.MASK_FLAGS:
                for dropout in (False, True):
                    for vec in (False, True):
                        cfg = _specs.MMA_CONFIGS[(d, interval or mods)]
                        assert _specs.mma_name(dtype, d, cfg, interval, dropout, vec, dv, mods) in names
        for d, dv in _specs.sm90_dim_pairs():
            for interval, mods in _specs.MASK_FLAGS:
                for seq in (1, 1000, 5000, 20000):
                    cfg = _specs.sm90_config(d, interval or mods, seq, mods)
                    assert _specs.sm90_name(dtype, d, cfg, interval, dv, mods) in sm90
                    if mods:  # attn_mask tiles in shared memory (MODS_FORM 3)
                        tcfg = _specs.sm90_config(d, True, seq, mods, mask_tiles=True)
                        name = _specs.sm90_name(dtype, d, tcfg, interval, dv, mods, mask_tiles=True)
                        assert name in sm90 and name.endswith("true, 3>")
                        assert _specs.sm90_smem_bytes(d, tcfg, head_dim_v=dv, mask_tiles=True) <= 227 * 1024
                    assert _specs.sm90_smem_bytes(d, cfg, head_dim_v=dv) * cfg.min_blocks <= 227 * 1024
                    # softcap / ALiBi without attn_mask: their own specialization (MODS_FORM 2), the
                    # call's own interval flag
                    cfg = _specs.sm90_config(d, interval, seq, True, attn_mask=False)
                    name = _specs.sm90_name(dtype, d, cfg, interval, dv, True, attn_mask=False)
                    assert name in sm90 and name.endswith(f"{str(interval).lower()}, 2>")
                    assert _specs.sm90_smem_bytes(d, cfg, head_dim_v=dv) * cfg.min_blocks <= 227 * 1024
    for d in range(1, 257):
        for dv in (1, 64, 100, 128, 256):
            dp, dvp = _specs.sm90_padded_dims(d, dv)
            assert dp >= d and dvp >= dv and (dp, dvp) in _specs.sm90_dim_pairs()
            dp, dvp = _specs.padded_dims(d, dv, "float16")
            assert dp >= d and dvp >= dv and (dp, dvp) in _specs.mma_dim_pairs()
            dp, dvp = _specs.padded_dims(d, dv, "float32")
            assert dp == dvp >= max(d, dv) and dp in _specs.SIMT_HEAD_DIMS
    with pytest.raises(ValueError, match="head_dim 300"):
        _specs.sm90_padded_dims(64, 300)


# ---------------------------------------------------------------------------------------------
# each variant alone, every kernel family
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize(("hq", "hkv", "causal"), [(6, 2, True), (4, 1, False), (8, 8, False)],
                         ids=["gqa", "mqa", "mha"])
def test_gqa(dtype, family, hq, hkv, causal, monkeypatch):
    rng = np.random.default_rng(hq * 10 + hkv)
    q, k, v = _qkv(rng, dtype, 2, hq, hkv, 70, 133, 64)
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, causal=causal)
    _assert_kernel(res, dtype, family, (64,))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize(("d", "dv"), [(192, 128), (128, 64), (64, 128), (59, 80), (256, 256), (96, 96), (3, 1),
                                       (111, 256), (200, 48)])
def test_head_dim_v(dtype, family, d, dv, monkeypatch):
    rng = np.random.default_rng(d * 1000 + dv)
    q, k, v = _qkv(rng, dtype, 1, 2, 2, 67, 150, d, dv)
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, causal=d % 2 == 0)
    _assert_kernel(res, dtype, family, (d, dv))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize(("sq", "skv"), [(70, 200), (200, 70), (1, 333), (129, 129)])
def test_bottom_right(dtype, family, sq, skv, monkeypatch):
    rng = np.random.default_rng(sq + skv)
    q, k, v = _qkv(rng, dtype, 2, 2, 2, sq, skv, 64)
    res, _, ref_lse = check(dtype, family, monkeypatch, q, k, v, causal="bottom_right")
    if sq > skv:  # the first sq - skv rows see no key: 0 and -inf
        assert np.isneginf(ref_lse[:, :, : sq - skv]).all()
        assert (_host(res.output)[:, :, : sq - skv] == 0).all()
    _assert_kernel(res, dtype, family, (64,))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize(("window", "causal"), [((16, 0), True), ((32, 8), False), ((0, 0), False), ((-1, 5), False),
                                                ((40, -1), False), ((7, 3), "bottom_right"), ((100, 0), True)])
def test_window(dtype, family, window, causal, monkeypatch):
    rng = np.random.default_rng(abs(hash(window)) % 2**32)
    q, k, v = _qkv(rng, dtype, 1, 3, 3, 300, 517, 128 if dtype != "float64" else 64)
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, causal=causal, window=window)
    _assert_kernel(res, dtype, family, (q.shape[-1],))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_softcap(dtype, family, monkeypatch):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, dtype, 1, 2, 2, 130, 260, 64)
    for softcap, scale in ((5.0, 1.0), (50.0, None), (0.5, 0.3)):
        res, _, _ = check(dtype, family, monkeypatch, q, k, v, softcap=softcap, scale=scale, causal=True)
        _assert_kernel(res, dtype, family, (64,))


def _softcap_plain(q, k, v, scale, c, causal, low):
    """Materialized softcap attention; low: float32 arithmetic with P and out rounded to the inputs'
    16-bit type (a plain implementation in that precision), else float64."""
    comp = np.float32 if low else np.float64
    s = np.einsum("bhid,bhjd->bhij", q.astype(comp), k.astype(comp)) * comp(scale)
    s = comp(c) * np.tanh(s / comp(c))
    if causal:
        s = np.where(np.arange(s.shape[-1])[None, :] <= np.arange(s.shape[-2])[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    if low:
        p = p.astype(q.dtype).astype(comp)
    o = np.einsum("bhij,bhjd->bhid", p, v.astype(comp))
    return (o.astype(q.dtype) if low else o).astype(np.float64)


@gpu
@pytest.mark.parametrize(("dtype", "family"), [f for f in FAMILIES if f[0] in ("float16", "bfloat16")],
                         ids=[i for i, f in zip(FAMILY_IDS, FAMILIES, strict=True) if f[0] in ("float16", "bfloat16")])
def test_softcap_within_2x_of_plain_same_precision(dtype, family, monkeypatch):
    """The softcap in half precision (the Hopper kernel through tanh.approx) keeps the FlashAttention
    bound: within 2x the error of a plain implementation in the same precision, against float64."""
    monkeypatch.setenv("FASTATTN_CUDA_KERNEL", family)
    rng = np.random.default_rng(15)
    for (b, h, n, m, d), c, scale, causal in (((1, 2, 130, 260, 64), 5.0, 1.0, True),
                                              ((1, 2, 77, 300, 128), 30.0, None, False),
                                              ((2, 2, 200, 333, 128), 0.5, 0.3, True)):
        q, k, v = _qkv(rng, dtype, b, h, h, n, m, d)
        sc = d ** -0.5 if scale is None else scale
        ref = _softcap_plain(q, k, v, sc, c, causal, low=False)
        bound = 2.0 * float(np.linalg.norm(_softcap_plain(q, k, v, sc, c, causal, low=True) - ref)
                            / np.linalg.norm(ref))
        res = _call(_gpu(q), _gpu(k), _gpu(v), "cuda", causal=causal, scale=scale, softcap=c)
        _assert_kernel(res, dtype, family, (d,))
        out = _host(res.output)
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        assert err <= bound, f"softcap {c}: error {err:.3g} > 2x plain {bound / 2:.3g}"


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_alibi(dtype, family, monkeypatch):
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, dtype, 2, 4, 4, 90, 171, 64)
    slopes = (2.0 ** -np.arange(1, 5)).astype(np.float32)
    for sl, causal in ((slopes, True), (np.stack([slopes, slopes[::-1] * 0.5]), False)):
        res, _, _ = check(dtype, family, monkeypatch, q, k, v, alibi_slopes=sl, causal=causal)
        _assert_kernel(res, dtype, family, (64,))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_bool_mask_broadcast_and_empty_rows(dtype, family, monkeypatch):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, dtype, 2, 3, 3, 77, 140, 64)
    for shape in ((2, 1, 77, 140), (77, 140), (2, 3, 1, 140)):
        mask = rng.random(shape) < 0.7
        if len(shape) == 4 and shape[2] > 1:
            mask[0, 0, 5] = False  # a row that sees no key
        res, _, ref_lse = check(dtype, family, monkeypatch, q, k, v, attn_mask=mask)
        _assert_kernel(res, dtype, family, (64,))
        if len(shape) == 4 and shape[2] > 1:
            assert np.isneginf(ref_lse[0, :, 5]).all() and (_host(res.output)[0, :, 5] == 0).all()


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("mask_dtype", ["float32", "float16", "float64", "bfloat16"])
def test_bias_mask(dtype, family, mask_dtype, monkeypatch):
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, dtype, 2, 2, 2, 65, 129, 64)
    bias = (rng.standard_normal((1, 2, 65, 129)) * 2).astype(numpy_dtype(mask_dtype))
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, attn_mask=bias, causal=True)
    _assert_kernel(res, dtype, family, (64,))
    # a transposed (non-contiguous) bias view is read through its strides
    biasT = np.ascontiguousarray(bias[0, 0].T).T
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, attn_mask=biasT)
    # a ragged batch with a window: rows and keys past the entry are never read (nor the bias there)
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, attn_mask=bias, window=(20, 3),
                      seqlens_q=np.array([65, 30]), seqlens_kv=np.array([100, 129]))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("mask_dtype", ["bool", "float16", "bfloat16", "float32"])
def test_mask_tiles_every_layout(dtype, family, mask_dtype, monkeypatch):
    """attn_mask tiles through shared memory (the Hopper kernel copies rows of 16-byte aligned, unit
    key stride masks with cp.async) and the guarded path (any other layout): odd sizes, rows that
    end mid-chunk, broadcast axes (zero strides), a view with an unaligned start or row pitch, a
    ragged batch whose keys end mid-tile, a window, and every logit form beside it."""
    rng = np.random.default_rng(18)
    b, h, sq, skv = 2, 3, 70, 136  # 136 keys: rows of 136 / 272 / 544 bytes (16-byte multiples)
    q, k, v = _qkv(rng, dtype, b, h, h, sq, skv, 64)

    def draw(shape):
        if mask_dtype == "bool":
            m = rng.random(shape) < 0.75
            return m
        return (rng.standard_normal(shape) * 2).astype(numpy_dtype(mask_dtype))

    for shape, kw in (((b, h, sq, skv), {}),                       # aligned rows: shared memory
                      ((b, 1, 1, skv), dict(causal=True)),        # rows broadcast (row stride 0)
                      ((sq, skv), dict(window=(40, 7))),          # batch and heads broadcast
                      ((b, h, sq, skv), dict(softcap=4.0, alibi_slopes=np.array([0.3, 0.1, 0.05], np.float32),
                                             causal="bottom_right")),
                      ((b, h, sq, skv), dict(seqlens_q=np.array([70, 33]), seqlens_kv=np.array([129, 7])))):
        m = draw(shape)
        res, _, _ = check(dtype, family, monkeypatch, q, k, v, attn_mask=m, **kw)
        _assert_kernel(res, dtype, family, (64,))
    # odd key counts: rows of 77 elements (not 16-byte multiples): the guarded path; and the same
    # 77 keys as an aligned view of wider rows (row pitch 80 elements: shared memory again)
    q2, k2, v2 = _qkv(rng, dtype, b, h, h, 45, 77, 64)
    m = draw((b, h, 45, 77))
    check(dtype, family, monkeypatch, q2, k2, v2, attn_mask=m, causal=True)
    wide = draw((b, h, 45, 80))
    check(dtype, family, monkeypatch, q2, k2, v2, attn_mask=wide[..., :77], gpu_kw=dict(attn_mask=_gpu(wide)[..., :77]))
    # a view starting one element in (unaligned rows) and a transposed one (key stride != 1)
    check(dtype, family, monkeypatch, q2, k2, v2, attn_mask=wide[..., 1:78],
          gpu_kw=dict(attn_mask=_gpu(wide)[..., 1:78]))
    mt = draw((b, h, 77, 45))
    check(dtype, family, monkeypatch, q2, k2, v2, attn_mask=mt.transpose(0, 1, 3, 2),
          gpu_kw=dict(attn_mask=_gpu(mt).transpose(0, 1, 3, 2)))
    # long rows over many key tiles (the ring of two), keys ending mid-tile
    q3, k3, v3 = _qkv(rng, dtype, 1, 2, 2, 130, 1008, 128)
    check(dtype, family, monkeypatch, q3, k3, v3, attn_mask=draw((1, 2, 130, 1008)), window=(300, 300))


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_padded_ragged_batch(dtype, family, monkeypatch):
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, dtype, 4, 2, 2, 150, 300, 64)
    lq = np.array([150, 1, 0, 77], np.int32)
    lkv = np.array([300, 200, 5, 0], np.int32)
    for b in range(4):  # padding holds NaN / inf: never read into a result
        q[b, :, lq[b]:] = np.nan
        k[b, :, lkv[b]:] = np.inf
        v[b, :, lkv[b]:] = np.nan
    for causal in (False, "bottom_right", True):
        res, _, ref_lse = check(dtype, family, monkeypatch, q, k, v, causal=causal, seqlens_q=lq, seqlens_kv=lkv)
        _assert_kernel(res, dtype, family, (64,))
        out = _host(res.output)
        for b in range(4):
            assert (out[b, :, lq[b]:] == 0).all() and np.isneginf(_host(res.logsumexp)[b, :, lq[b]:]).all()


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_packed_varlen(dtype, family, monkeypatch):
    rng = np.random.default_rng(10)
    lens_q = np.array([5, 0, 130, 64, 1])
    lens_kv = np.array([7, 3, 129, 200, 0])
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_kv = np.concatenate([[0], np.cumsum(lens_kv)]).astype(np.int32)
    q = _rand(rng, (int(cu_q[-1]), 6, 64), dtype)
    k = _rand(rng, (int(cu_kv[-1]), 2, 64), dtype)
    v = _rand(rng, (int(cu_kv[-1]), 2, 64), dtype)
    for causal, window in ((False, None), (True, None), ("bottom_right", (20, 0))):
        res, _, _ = check(dtype, family, monkeypatch, q, k, v, causal=causal, window=window, cu_seqlens_q=cu_q,
                          cu_seqlens_kv=cu_kv, layout="bshd")
        _assert_kernel(res, dtype, family, (64,))
    # the public entry point
    out = flash_attention_varlen(_gpu(q), _gpu(k), _gpu(v), _gpu(cu_q), cu_kv, causal=True)
    assert out.shape == q.shape


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_bshd_layout_and_strided_views(dtype, family, monkeypatch):
    rng = np.random.default_rng(11)
    q = _rand(rng, (2, 100, 6, 64), dtype)
    k = _rand(rng, (2, 130, 2, 64), dtype)
    v = _rand(rng, (2, 130, 2, 64), dtype)
    res, _, _ = check(dtype, family, monkeypatch, q, k, v, layout="bshd", causal=True)
    _assert_kernel(res, dtype, family, (64,))
    assert res.output.flags.c_contiguous and res.output.shape == (2, 100, 6, 64)
    # (B, S, H, D) memory passed as (B, H, S, D) views, and a view with a gap between heads
    res, _, _ = check(dtype, family, monkeypatch, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                      v.transpose(0, 2, 1, 3), causal=True)
    wide = _rand(rng, (2, 6, 100, 80), dtype)[..., 4:68]  # rows not 16-byte aligned: element loads
    res, _, _ = check(dtype, family, monkeypatch, wide, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


# ---------------------------------------------------------------------------------------------
# masked keys never contribute; dropout and combinations
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_masked_keys_never_contribute(dtype, family, monkeypatch):
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, dtype, 1, 2, 2, 200, 333, 64)
    v[:, :, 150:160, 3] = np.nan  # keys 150..159: NaN reaches exactly the rows that see one of them
    k[:, :, 300:] = np.inf        # keys 300..: hidden from every row below
    mask = np.ones((200, 333), bool)
    mask[:, 150:160] = False
    mask[:, 300:] = False
    for kw in (dict(window=(20, 20)), dict(attn_mask=mask), dict(window=(30, 0), causal=True, attn_mask=mask)):
        kw_rows = dict(kw)
        ref = _call(q, k, v, "reference", **kw_rows)
        monkeypatch.setenv("FASTATTN_CUDA_KERNEL", family)
        gkw = {n: _gpu(x) for n, x in kw.items()}
        res = _call(_gpu(q), _gpu(k), _gpu(v), "cuda", **gkw)
        out, ref_out = _host(res.output), _host(ref.output)
        assert (np.isnan(out) == np.isnan(ref_out)).all(), f"{kw}: NaN pattern differs ({res.kernel})"
        ok = np.isfinite(ref_out)
        den = np.linalg.norm(ref_out[ok])
        assert np.linalg.norm(out[ok] - ref_out[ok]) / den <= OUT_TOL[dtype]


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_dropout_with_variants(dtype, family, monkeypatch):
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, dtype, 2, 4, 2, 80, 150, 64)
    tol = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 2e-5, "float64": 1e-11}[dtype]
    for kw in (dict(causal="bottom_right", window=(30, 0)), dict(seqlens_q=np.array([80, 31]),
                                                                 seqlens_kv=np.array([17, 150])),
               dict(softcap=3.0, alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05], np.float32))):
        res, _, _ = check(dtype, family, monkeypatch, q, k, v, dropout_p=0.25, seed=77, out_tol=tol, **kw)
        _assert_kernel(res, dtype, family, (64,), dropout=True)


def _random_combo(rng, dtype):
    b, hkv = int(rng.integers(1, 3)), int(rng.choice([1, 2]))
    hq = hkv * int(rng.choice([1, 3]))
    sq, skv = int(rng.integers(1, 200)), int(rng.integers(1, 260))
    d = int(rng.choice([32, 64, 80, 128, 59]))
    dv = int(rng.choice([d, 64, 128]))
    q, k, v = _qkv(rng, dtype, b, hq, hkv, sq, skv, d, dv)
    kw = dict(causal=[False, True, "bottom_right"][int(rng.integers(0, 3))])
    if rng.random() < 0.5:
        kw["window"] = (int(rng.integers(-1, 50)), int(rng.integers(-1, 50)))
    if rng.random() < 0.3:
        kw["softcap"] = float(rng.uniform(1, 20))
    if rng.random() < 0.3:
        kw["alibi_slopes"] = rng.uniform(0, 0.5, hq).astype(np.float32)
    r = rng.random()
    if r < 0.2:
        kw["attn_mask"] = rng.random((b, 1, sq, skv)) < 0.8
    elif r < 0.4:
        kw["attn_mask"] = rng.standard_normal((sq, skv)).astype(np.float32)
    elif r < 0.6:
        kw["seqlens_q"] = rng.integers(0, sq + 1, b)
        kw["seqlens_kv"] = rng.integers(0, skv + 1, b)
    if rng.random() < 0.3:
        kw["layout"] = "bshd"
        q, k, v = (x.transpose(0, 2, 1, 3).copy() for x in (q, k, v))
    return q, k, v, kw


@gpu
@pytest.mark.parametrize(("dtype", "family"), FAMILIES, ids=FAMILY_IDS)
def test_random_combinations(dtype, family, monkeypatch):
    """Random draws of every feature at once (seeded; each draw is reported on failure)."""
    rng = np.random.default_rng(2024 + len(dtype) + len(family))
    for draw in range(12):
        q, k, v, kw = _random_combo(rng, dtype)
        try:
            check(dtype, family, monkeypatch, q, k, v, **kw)
        except AssertionError as exc:
            shapes = [x.shape for x in (q, k, v)]
            raise AssertionError(f"draw {draw}: {shapes} {sorted(kw)} {kw.get('causal')} {kw.get('window')}: "
                                 f"{exc}") from exc


@gpu
def test_head_dim_beyond_256_is_a_clear_error():
    x = _gpu(np.zeros((1, 1, 4, 300), np.float16))
    y = _gpu(np.zeros((1, 1, 4, 64), np.float16))
    with pytest.raises(ValueError, match="head_dim 300"):
        flash_attention(x, x, x, backend="cuda")
    with pytest.raises(ValueError, match="head_dim 300"):
        flash_attention(y, y, _gpu(np.zeros((1, 1, 4, 300), np.float16)), backend="cuda")
