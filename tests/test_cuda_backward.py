"""The CUDA backward pass against the float64 reference's analytic gradients (backends.reference).

Every forward feature on every kernel family (float16 / bfloat16 on ``fa_bwd_split_mma`` at padded head dims
64 / 128 and ``fa_bwd_mma`` elsewhere, and on ``fa_bwd_mma`` at 64 / 128 too; dQ through atomics and,
``deterministic=True``, through ``fa_bwd_dq_mma``; float32 / float64 on the SIMT kernels), over odd shapes
and head dims.  Half precision is judged by FlashAttention's rule where a naive same-precision implementation
(torch autograd through a materialized attention in float16 / bfloat16 on the GPU) can express the call: each
of dq, dk, dv within twice its error against float64, plus a small term; ragged calls by a fixed bound.
Gradient buffers are poisoned (NaN) in CuPy's memory pool before each call, so an element the kernels do not
write fails.  GPU tests carry the ``cuda`` marker and skip with the reason without CuPy or a device.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn._dropout import keep_mask
from fastattn._masks import MaskRule, allowed_and_bias
from fastattn._validate import numpy_dtype
from fastattn.backends import get_backend
from fastattn.backends.cuda import _specs

_REASON = get_backend("cuda").availability()
gpu = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")
pytestmark = pytest.mark.cuda

DTYPES = ["float16", "bfloat16", "float32", "float64"]
#: relative error (norm) bound against float64 where no naive same-precision twin is computed
FIXED_TOL = {"float16": 1e-2, "bfloat16": 6e-2, "float32": 2e-5, "float64": 1e-10}


# ---------------------------------------------------------------------------------------------
# no GPU needed
# ---------------------------------------------------------------------------------------------

def test_backward_kernels_are_listed_and_fit_a_block():
    names = _specs.all_bwd_name_expressions()
    assert len(names) == len(set(names))
    src = _specs.kernel_source(_specs.KERNEL_SOURCE_BWD)
    assert '#include "' not in src
    for kernel in ("fa_bwd_prep", "fa_bwd_mma", "fa_bwd_dq_mma", "fa_bwd_dq_convert", "fa_bwd_simt_kv",
                   "fa_bwd_simt_q"):
        assert kernel in src and any(n.startswith(kernel + "<") for n in names)
    # the forward's mask and tile-skipping rule, not a copy
    assert "fa_mask<INTERVAL, MODS> mask" in src and "query_range" in src
    for dtype in ("float16", "bfloat16"):
        for d, dv in _specs.mma_dim_pairs():
            for interval, mods in _specs.MASK_FLAGS:
                for dropout in (False, True):
                    for vec in (False, True):
                        assert _specs.bwd_mma_name(dtype, d, dv, _specs.BWD_MMA_CONFIGS[d], interval, mods, dropout,
                                                   vec) in names
        for d in _specs.MMA_HEAD_DIMS:
            assert _specs.bwd_mma_smem_bytes(d, d, _specs.BWD_MMA_CONFIGS[d]) <= 227 * 1024  # H100
            a100 = _specs.bwd_mma_config(d, d, 163 * 1024)  # A100 opt-in limit
            assert _specs.bwd_mma_smem_bytes(d, d, a100) <= 163 * 1024
            assert _specs.bwd_mma_name(dtype, d, d, a100, True, False, False, True) in names
            assert _specs.bwd_dq_smem_bytes(d, d, _specs.BWD_DQ_CONFIGS[d]) <= 163 * 1024
        for d, cfg in _specs.BWD_SPLIT_CONFIGS.items():  # FlashAttention-2's layouts where a block has room
            assert _specs.bwd_split_config(d, d, 227 * 1024) == cfg
            assert _specs.bwd_split_name(dtype, d, d, cfg, True, True, True, False) in names
            assert _specs.bwd_split_config(d, d, 163 * 1024) is None  # A100: fa_bwd_mma's smaller tiles
    assert _specs.bwd_split_config(64, 32, 227 * 1024) is None
    # the Hopper backward: its own source (NVRTC without include paths, sm_90a), every mask flag listed
    sm90 = _specs.all_sm90_bwd_name_expressions()
    assert len(sm90) == len(set(sm90)) and not set(sm90) & set(names)
    src90 = _specs.kernel_source(_specs.KERNEL_SOURCE_SM90_BWD)
    assert "#include" not in src90 and "wgmma.mma_async" in src90 and "cp.reduce.async.bulk" in src90
    assert "fa_mask<INTERVAL, MODS> mask" in src90 and "bwd_element(" in src90
    for dtype in ("float16", "bfloat16"):
        for d in _specs.BWD_SM90_BLOCK_Q:
            assert _specs.bwd_sm90_smem_bytes(d) <= 227 * 1024
            for interval, mods in _specs.MASK_FLAGS:
                name = _specs.bwd_sm90_name(dtype, d, interval, mods)
                assert name in sm90 and _specs.source_of(name) == _specs.KERNEL_SOURCE_SM90_BWD
                assert _specs.is_sm90_name(name)
    assert not _specs.bwd_sm90_serves(64, 32, False, False) and not _specs.bwd_sm90_serves(96, 96, False, False)
    for key in _specs.BWD_SIMT_CONFIGS:
        assert max(_specs.bwd_simt_smem_bytes(*key)) <= 163 * 1024


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _cp():
    import cupy

    return cupy


def _gpu(x):
    if not isinstance(x, np.ndarray):
        return x
    cp = _cp()
    try:
        return cp.asarray(x)
    except Exception:  # noqa: BLE001 - a CuPy without bfloat16 from NumPy: move the bits
        return cp.asarray(x.view(np.uint16)).view(x.dtype)


def _host(x) -> np.ndarray:
    cp = _cp()
    if isinstance(x, cp.ndarray):
        if x.dtype.name == "bfloat16":
            x = x.view(cp.uint16).get().view(numpy_dtype("bfloat16"))
        else:
            x = x.get()
    return np.asarray(x).astype(np.float64)


def _rel(a, b) -> float:
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def _poison_pool(nbytes: list[int]) -> None:
    """Fill blocks of CuPy's pool of these sizes with NaN and hand them back: the next allocations of those
    sizes reuse them, so an output element the kernels never write stays NaN."""
    cp = _cp()
    blocks = [cp.full((max(n, 8) // 8,), np.nan, dtype=np.float64) for n in nbytes]
    cp.cuda.Device().synchronize()
    del blocks


def _arrays(rng, b, h, hk, sq, sk, d, dv, dtype, layout="bhsd"):
    def arr(heads, s, dim):
        shape = (b, heads, s, dim) if layout == "bhsd" else (b, s, heads, dim)
        return rng.standard_normal(shape).astype(numpy_dtype(dtype))

    return arr(h, sq, d), arr(hk, sk, d), arr(hk, sk, dv), arr(h, sq, dv)


def _grads(backend, q, k, v, do, opts, *, dbias=False, deterministic=False, varlen=None):
    """(out, dq, dk, dv[, dbias]) of one call on ``backend`` (arrays as given: NumPy or CuPy)."""
    if varlen is not None:
        cu = varlen
        out, lse = fastattn.flash_attention_varlen(q, k, v, cu, cu, return_lse=True, backend=backend, **opts)
        grads = fastattn.flash_attention_varlen_backward(do, q, k, v, out, lse, cu, cu, backend=backend,
                                                         deterministic=deterministic, **opts)
    else:
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend=backend, **opts)
        grads = fastattn.flash_attention_backward(do, q, k, v, out, lse, backend=backend, return_dbias=dbias,
                                                  deterministic=deterministic, **opts)
    return (out, *grads)


def _naive_half_grads(q, k, v, do, opts, dtype):
    """dq, dk, dv (and dbias) of a materialized attention in the input's own precision, by torch autograd on
    the GPU (FlashAttention's yardstick: scores, softmax output and every product rounded to the dtype).
    None when torch is missing or the call is one it does not express (ragged batches, bshd)."""
    try:
        import torch
    except ImportError:
        return None
    if opts.get("seqlens_q") is not None or opts.get("layout", "bhsd") != "bhsd":
        return None
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    dev = "cuda"
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float32), device=dev).to(tdt).requires_grad_() for x in (q, k, v))
    mask = opts.get("attn_mask")
    tbias = None
    if mask is not None and mask.dtype != bool:
        tbias = torch.tensor(np.asarray(mask, np.float32), device=dev).to(tdt).requires_grad_()
    kk, vv = tk.repeat_interleave(h // hk, 1), tv.repeat_interleave(h // hk, 1)
    scale = opts.get("scale", 1 / np.sqrt(d))
    s = (tq @ kk.transpose(-1, -2)) * scale
    if opts.get("softcap"):
        s = opts["softcap"] * torch.tanh(s / opts["softcap"])
    causal = opts.get("causal", False)
    left, right = opts.get("window") or (-1, -1)
    rule = MaskRule(causal=bool(causal), bottom_right=causal == "bottom_right", window_left=left, window_right=right)
    allowed = torch.tensor(allowed_and_bias(rule, sq, sk)[0], device=dev)[None, None].expand(b, h, sq, sk).clone()
    if opts.get("alibi_slopes") is not None:
        rel = (torch.arange(sq)[:, None] + (sk - sq) - torch.arange(sk)[None, :]).abs().float().to(dev)
        slopes = torch.tensor(np.asarray(opts["alibi_slopes"], np.float32), device=dev).reshape(-1, h)
        s = s - (slopes[:, :, None, None] * rel).to(tdt)
    if mask is not None and mask.dtype == bool:
        allowed &= torch.tensor(np.broadcast_to(mask, (b, h, sq, sk)).copy(), device=dev)
    elif tbias is not None:
        s = s + tbias
    s = s.masked_fill(~allowed, -float("inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if opts.get("dropout_p"):
        keep = np.stack([np.stack([keep_mask(opts["seed"], opts["dropout_p"], bi, hi, sq, sk) for hi in range(h)])
                         for bi in range(b)])
        p = p * torch.tensor(keep, device=dev).to(tdt) / (1 - opts["dropout_p"])
    out = p @ vv
    out.backward(torch.tensor(np.asarray(do, np.float32), device=dev).to(tdt))
    grads = [tq.grad, tk.grad, tv.grad] + ([tbias.grad] if tbias is not None else [])
    return [g.float().cpu().numpy().astype(np.float64) for g in grads]


#: name -> (b, h, hk, sq, sk, d, dv, options)
CASES = {
    "one_row": (1, 2, 2, 1, 17, 64, 64, {}),
    "odd_59": (2, 3, 3, 17, 113, 59, 59, {}),
    "causal_128": (1, 2, 2, 113, 203, 128, 128, {"causal": True}),
    "causal_1000": (1, 1, 1, 1000, 1000, 64, 64, {"causal": True}),
    "bottom_right": (1, 2, 2, 203, 113, 64, 64, {"causal": "bottom_right"}),
    "window": (2, 2, 2, 113, 113, 64, 64, {"window": (20, 5)}),
    "window_br": (1, 2, 2, 100, 150, 32, 32, {"causal": "bottom_right", "window": (30, 0)}),
    "softcap": (1, 2, 2, 77, 99, 64, 64, {"softcap": 5.0, "causal": True}),
    "alibi": (2, 2, 2, 65, 130, 64, 64, {"alibi": True}),
    "bias": (2, 2, 2, 65, 130, 64, 64, {"bias": True}),
    "bool_mask": (2, 2, 2, 65, 130, 64, 64, {"bool_mask": True}),
    "gqa": (2, 6, 2, 77, 130, 64, 64, {"causal": True}),
    "mqa": (1, 4, 1, 50, 60, 128, 128, {}),
    "dv_32": (1, 2, 2, 70, 90, 64, 32, {"causal": True}),
    "dv_80": (1, 2, 2, 70, 90, 59, 80, {}),
    "d192_dv128": (1, 2, 2, 65, 90, 192, 128, {"causal": True}),
    "d256": (1, 2, 2, 40, 70, 256, 256, {}),
    "dropout": (1, 2, 2, 113, 113, 64, 64, {"dropout_p": 0.2, "seed": 7, "causal": True}),
    "seqlens": (3, 2, 2, 100, 120, 64, 64, {"seqlens": True, "causal": True}),
    "bshd": (2, 3, 3, 70, 80, 64, 64, {"layout": "bshd", "causal": True}),
    "everything": (2, 4, 2, 64, 96, 64, 64, {"softcap": 3.0, "alibi": True, "bias": True, "window": (40, 10),
                                             "dropout_p": 0.1, "seed": 3}),
}


def _options(rng, b, h, sq, sk, spec):
    opts = {key: val for key, val in spec.items() if key not in ("alibi", "bias", "bool_mask", "seqlens", "no_dbias")}
    if spec.get("alibi"):
        opts["alibi_slopes"] = rng.uniform(0.05, 0.5, (b, h)).astype(np.float32)
    if spec.get("bias"):
        opts["attn_mask"] = rng.standard_normal((1, h, sq, sk)).astype(np.float32)
    if spec.get("bool_mask"):
        mask = rng.random((b, 1, sq, sk)) > 0.4
        mask[0, 0, 3] = False  # a row that sees no key
        opts["attn_mask"] = mask
    if spec.get("seqlens"):
        opts["seqlens_q"] = np.array([sq, 37, 0][:b], np.int32)
        opts["seqlens_kv"] = np.array([sk, 50, 7][:b], np.int32)
    return opts


#: shapes for the Hopper backward (fa_bwd_sm90, padded head dims 64 / 128): odd row counts on both sides of
#: its 64 / 128-row query tiles and 128-key blocks, GQA, both causal alignments, windows
SM90_CASES = {
    "h_rows_17": (2, 2, 2, 17, 300, 128, 128, {}),
    "h_rows_100_window": (1, 4, 2, 100, 260, 128, 128, {"window": (30, 7)}),
    "h_gqa_1500": (1, 4, 2, 1500, 1300, 128, 128, {"causal": True}),
    "h_br_1100": (1, 2, 2, 1100, 1700, 64, 64, {"causal": "bottom_right"}),
    "h_tl_1037": (1, 3, 1, 1037, 777, 64, 64, {"causal": True}),
    "h_d40_1000": (1, 2, 2, 1000, 1000, 40, 40, {"window": (200, 200)}),
    "h_softcap_alibi": (2, 2, 2, 130, 257, 128, 128, {"softcap": 4.0, "alibi": True, "causal": True}),
    "h_bool_mask": (2, 2, 2, 129, 200, 64, 64, {"bool_mask": True}),
    "h_bias_no_dbias": (2, 2, 2, 100, 140, 128, 128, {"bias": True, "no_dbias": True, "causal": True}),
}


def _check(name, dtype, deterministic=False, seed=0):
    b, h, hk, sq, sk, d, dv, spec = CASES[name] if name in CASES else SM90_CASES[name]
    rng = np.random.default_rng(seed)
    layout = spec.get("layout", "bhsd")
    q, k, v, do = _arrays(rng, b, h, hk, sq, sk, d, dv, dtype, layout)
    opts = _options(rng, b, h, sq, sk, spec)
    want_dbias = "attn_mask" in opts and opts["attn_mask"].dtype != bool and not spec.get("no_dbias")
    ref = _grads("reference", *(x.astype(np.float64) for x in (q, k, v, do)), opts, dbias=want_dbias)[1:]
    gopts = {key: _gpu(val) for key, val in opts.items()}
    sizes = [x.nbytes for x in (q, k, v)] + ([b * h * sq * sk * 4] if want_dbias else [])
    _poison_pool(sizes)
    got = [_host(g) for g in _grads("cuda", *(_gpu(x) for x in (q, k, v, do)), gopts, dbias=want_dbias,
                                    deterministic=deterministic)[1:]]
    naive = None
    if dtype in ("float16", "bfloat16"):
        naive = _naive_half_grads(q, k, v, do, opts, dtype)
    for which, g, r in zip(("dq", "dk", "dv", "dbias"), got, ref, strict=False):
        assert g.shape == r.shape, (which, g.shape, r.shape)
        assert np.isfinite(g).all(), f"{which}: non-finite (unwritten?) elements"
        err = _rel(g, r)
        if naive is not None:
            i = ("dq", "dk", "dv", "dbias").index(which)
            bound = 2.0 * _rel(naive[i], r) + 1e-3
        else:
            bound = FIXED_TOL[dtype]
        assert err <= bound, f"{which}: relative error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# on the GPU
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_reference(name, dtype):
    _check(name, dtype)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["odd_59", "causal_1000", "gqa", "bias", "dropout", "seqlens", "everything",
                                  "d256"])
def test_deterministic_gradients_match_reference(name, dtype):
    _check(name, dtype, deterministic=True)


@gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["causal_128", "causal_1000", "gqa", "mqa", "bias", "seqlens", "everything"])
def test_one_warp_per_16_keys_kernel(name, dtype, deterministic, monkeypatch):
    """fa_bwd_mma at the head dims fa_bwd_split_mma serves on an H100 (what a device with less shared
    memory a block runs)."""
    from fastattn.backends.cuda import _backward

    monkeypatch.setattr(_backward, "SPLIT_KERNEL", False)
    _check(name, dtype, deterministic=deterministic)


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(SM90_CASES) + ["one_row", "causal_1000", "gqa", "mqa", "bshd", "seqlens",
                                                     "window", "bottom_right"])
def test_hopper_backward_kernel(name, dtype):
    """fa_bwd_sm90 where it serves the call (compute capability 9.0), else the kernels that do: the same
    bounds; on Hopper the plan must say wgmma."""
    from fastattn.backends.cuda import _backward
    from fastattn.backends.cuda._launch import device_capability

    _backward._PLANS.clear()
    _check(name, dtype)
    if device_capability() == (9, 0):
        assert {p.kernel for p in _backward._PLANS.values()} == {"wgmma"}


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["causal_128", "causal_1000", "gqa", "bshd", "softcap", "seqlens", "h_br_1100"])
def test_split_kernel_without_wgmma(name, dtype, monkeypatch):
    """fa_bwd_split_mma at the head dims fa_bwd_sm90 serves on Hopper (what other GPUs run)."""
    from fastattn.backends.cuda import _backward

    monkeypatch.setattr(_backward, "SM90_KERNEL", False)
    _backward._PLANS.clear()
    _check(name, dtype)
    assert "wgmma" not in {p.kernel for p in _backward._PLANS.values()}


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_packed_sequences(dtype):
    rng = np.random.default_rng(1)
    cu = np.array([0, 5, 5, 140, 203], np.int32)
    q = rng.standard_normal((203, 4, 128)).astype(numpy_dtype(dtype))
    k = rng.standard_normal((203, 2, 128)).astype(numpy_dtype(dtype))
    v = rng.standard_normal((203, 2, 128)).astype(numpy_dtype(dtype))
    do = rng.standard_normal((203, 4, 128)).astype(numpy_dtype(dtype))
    opts = {"causal": True, "window": (50, 0)}
    ref = _grads("reference", *(x.astype(np.float64) for x in (q, k, v, do)), opts, varlen=cu)[1:]
    for deterministic in (False, True):
        _poison_pool([x.nbytes for x in (q, k, v)])
        got = _grads("cuda", *(_gpu(x) for x in (q, k, v, do)), opts, varlen=_gpu(cu), deterministic=deterministic)
        for which, g, r in zip(("dq", "dk", "dv"), got[1:], ref, strict=True):
            g = _host(g)
            assert g.shape == r.shape and np.isfinite(g).all()
            assert _rel(g, r) <= FIXED_TOL[dtype], which


@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_deterministic_mode_is_bit_identical(dtype):
    rng = np.random.default_rng(2)
    q, k, v, do = (_gpu(x) for x in _arrays(rng, 2, 4, 2, 300, 300, 64, 64, dtype))
    runs = [_grads("cuda", q, k, v, do, {"causal": True}, deterministic=True)[1:] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert bool((a.view(_cp().uint8) == b.view(_cp().uint8)).all())
    fast = _grads("cuda", q, k, v, do, {"causal": True})[1:]
    for a, b in zip(runs[0], fast, strict=True):
        assert _rel(_host(a), _host(b)) <= FIXED_TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gqa_equals_repeated_heads_summed(dtype):
    rng = np.random.default_rng(3)
    q, k, v, do = _arrays(rng, 2, 6, 2, 90, 110, 64, 64, dtype)
    gqa = [_host(g) for g in _grads("cuda", *(_gpu(x) for x in (q, k, v, do)), {"causal": True})[1:]]
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    mha = [_host(g) for g in _grads("cuda", *(_gpu(x) for x in (q, kr, vr, do)), {"causal": True})[1:]]
    tol = 1e-6 if dtype == "float32" else 2e-3
    assert _rel(gqa[0], mha[0]) <= tol
    for g, m in zip(gqa[1:], mha[1:], strict=True):
        assert _rel(g, m.reshape(2, 2, 3, *m.shape[2:]).sum(axis=2)) <= tol


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("d", [1, 3, 17, 33, 96])
def test_odd_head_dims(dtype, d):
    rng = np.random.default_rng(d)
    q, k, v, do = _arrays(rng, 1, 2, 2, 45, 67, d, d, dtype)
    ref = _grads("reference", *(x.astype(np.float64) for x in (q, k, v, do)), {"causal": True})[1:]
    got = _grads("cuda", *(_gpu(x) for x in (q, k, v, do)), {"causal": True})[1:]
    for g, r in zip(got, ref, strict=True):
        assert _rel(_host(g), r) <= FIXED_TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_strided_views(dtype):
    """q / k / v / dout as views into larger arrays (misaligned rows: the element-load path)."""
    rng = np.random.default_rng(5)
    dt = numpy_dtype(dtype)
    big = [rng.standard_normal((2, 3, 70, 70)).astype(dt) for _ in range(4)]
    q, k, v, do = (x[:, :, 1:61:1, 3:67] for x in big)
    ref = _grads("reference", *(np.ascontiguousarray(x).astype(np.float64) for x in (q, k, v, do)), {})[1:]
    gbig = [_gpu(x) for x in big]
    got = _grads("cuda", *(x[:, :, 1:61, 3:67] for x in gbig), {})[1:]
    for g, r in zip(got, ref, strict=True):
        assert _rel(_host(g), r) <= FIXED_TOL[dtype]


@gpu
@pytest.mark.parametrize("sq, sk", [(0, 5), (5, 0), (0, 0)])
def test_zero_sizes(sq, sk):
    cp = _cp()
    q, k, v, do = (cp.ones(s, dtype=cp.float16) for s in ((1, 2, sq, 64), (1, 2, sk, 64), (1, 2, sk, 64),
                                                          (1, 2, sq, 64)))
    dq, dk, dv = _grads("cuda", q, k, v, do, {})[1:]
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for g in (dq, dk, dv):
        assert not bool(g.any())


# ---------------------------------------------------------------------------------------------
# rows that see one or two keys (issue 12): the exact dS is 0 (or nearly); a plain implementation,
# normalizing its own P, gets it, and so must the kernels (bwd.cuh "Local rows")
# ---------------------------------------------------------------------------------------------

def _plain_float32(q, k, v, do, opts):
    """dq, dk, dv of a materialized attention in float32 (NumPy, bhsd; causal / window / softcap / boolean
    mask / padded lengths): softmax normalizing its own P, D = rowsum(P dP)."""
    f = np.float32
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    scale = f(opts.get("scale", 1 / np.sqrt(d)))
    causal = opts.get("causal", False)
    left, right = opts.get("window") or (-1, -1)
    rule = MaskRule(causal=bool(causal), bottom_right=causal == "bottom_right", window_left=left, window_right=right)
    lens_q = opts.get("seqlens_q", [sq] * b)
    lens_k = opts.get("seqlens_kv", [sk] * b)
    mask = opts.get("attn_mask")
    dq, dk, dv = (np.zeros(x.shape, f) for x in (q, k, v))
    for bi in range(b):
        lq, lk = int(lens_q[bi]), int(lens_k[bi])
        if lq == 0 or lk == 0:
            continue
        for hi in range(h):
            hh = hi // (h // hk)
            qh, kh, vh, doh = q[bi, hi, :lq].astype(f), k[bi, hh, :lk].astype(f), v[bi, hh, :lk].astype(f), \
                do[bi, hi, :lq].astype(f)
            allowed = allowed_and_bias(rule, lq, lk)[0].copy()
            if mask is not None:
                allowed &= np.broadcast_to(mask, (b, h, sq, sk))[bi, hi, :lq, :lk]
            z = (qh @ kh.T) * scale
            cap = f(opts.get("softcap", 0.0))
            t = np.tanh(z / cap) if cap else None
            s = np.where(allowed, z if t is None else cap * t, -np.inf).astype(f)
            m = s.max(axis=1, keepdims=True)
            m = np.where(np.isneginf(m), f(0), m)
            p = np.exp(s - m)
            rs = p.sum(axis=1, keepdims=True)
            p = np.where(rs > 0, p / np.where(rs > 0, rs, f(1)), f(0)).astype(f)
            dp = doh @ vh.T
            ds = np.where(allowed, p * (dp - (p * dp).sum(axis=1, keepdims=True)), f(0)).astype(f)
            if t is not None:
                ds = (ds * (f(1) - t * t)).astype(f)
            dq[bi, hi, :lq] = (ds @ kh) * scale
            dk[bi, hh, :lk] += (ds.T @ qh) * scale
            dv[bi, hh, :lk] += p.T @ doh
    return [x.astype(np.float64) for x in (dq, dk, dv)]


def _one_key_mask(rng, b, sq, sk):
    """A boolean mask (b, 1, sq, sk) leaving one random key per row, and no key to row 1."""
    mask = np.zeros((b, 1, sq, sk), bool)
    mask[np.arange(b)[:, None], 0, np.arange(sq)[None, :], rng.integers(0, sk, (b, sq))] = True
    mask[:, :, 1] = False
    return mask


#: name -> (b, h, hk, sq, sk, d, options): every row sees one key, or two
FEW_KEY_CASES = {
    "one_key_causal_window_0": (2, 2, 1, 77, 77, 64, {"causal": True, "window": (0, 0)}),
    "two_keys_window_1": (1, 3, 3, 70, 70, 64, {"causal": True, "window": (1, 0)}),
    "one_key_bool_mask": (2, 2, 2, 40, 29, 64, {"bool_one_key": True}),
    "two_keys_softcap": (2, 2, 2, 2, 2, 32, {"causal": True, "softcap": 5.0}),
    "ragged_length_1": (3, 2, 2, 20, 30, 64, {"seqlens_q": [1, 20, 3], "seqlens_kv": [1, 2, 30]}),
}


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(FEW_KEY_CASES))
def test_rows_that_see_one_or_two_keys(name, dtype):
    b, h, hk, sq, sk, d, spec = FEW_KEY_CASES[name]
    rng = np.random.default_rng(12)
    q, k, v, do = _arrays(rng, b, h, hk, sq, sk, d, d, dtype)
    opts = {key: val for key, val in spec.items() if key != "bool_one_key"}
    if spec.get("bool_one_key"):
        opts["attn_mask"] = _one_key_mask(rng, b, sq, sk)
    for key in ("seqlens_q", "seqlens_kv"):
        if key in opts:
            opts[key] = np.array(opts[key], np.int32)
    ref = _grads("reference", *(x.astype(np.float64) for x in (q, k, v, do)), opts)[1:]
    _poison_pool([x.nbytes for x in (q, k, v)])
    got = [_host(g) for g in _grads("cuda", *(_gpu(x) for x in (q, k, v, do)), {key: _gpu(val) for key, val in
                                                                                  opts.items()})[1:]]
    # errors in units of the call's largest reference gradient (dq and dk of one-key rows are exactly 0)
    unit = max(float(np.linalg.norm(r)) for r in ref)
    if dtype in ("float32", "float64"):
        plain = _plain_float32(q, k, v, do, opts) if dtype == "float32" else ref
        slack = 1e-7 if dtype == "float32" else 1e-15
    else:
        plain = _naive_half_grads(q, k, v, do, opts, dtype)
        slack = 2e-4
    for i, (which, g, r) in enumerate(zip(("dq", "dk", "dv"), got, ref, strict=True)):
        assert np.isfinite(g).all(), f"{which}: non-finite (unwritten?) elements"
        err = float(np.linalg.norm(g - r)) / unit
        if plain is None:
            assert err <= FIXED_TOL[dtype], f"{which}: error {err:.3g}"
            continue
        plain_err = float(np.linalg.norm(plain[i] - r)) / unit
        assert err <= 2 * plain_err + slack, f"{which}: error {err:.3g}, plain {dtype}'s {plain_err:.3g}"
        if dtype in ("float32", "float64") and name.startswith("one_key") and which != "dv":
            assert not g.any(), f"{which}: a row that sees one key has dS = 0 exactly"


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("sk", [3, 6, 40])
def test_key_shards_with_the_whole_rows_lse_are_not_renormalized(dtype, sk):
    """Ring attention: each shard of the keys gets the whole row's out and lse; a shard's P sums to less
    than 1 and must stay as given even where the shard's keys fit one tile, so the shards' dq add up to the
    whole gradient and their dk / dv are the whole gradient's rows."""
    rng = np.random.default_rng(sk)
    q, k, v, do = _arrays(rng, 2, 2, 2, 37, sk, 64, 64, dtype)
    ref = _grads("reference", *(x.astype(np.float64) for x in (q, k, v, do)), {})[1:]
    gq, gk, gv, gdo = (_gpu(x) for x in (q, k, v, do))
    out, lse = fastattn.flash_attention(gq, gk, gv, return_lse=True, backend="cuda")
    cuts = (0, sk // 3, sk)
    parts = [[_host(g) for g in fastattn.flash_attention_backward(gdo, gq, gk[:, :, a:c], gv[:, :, a:c], out, lse,
                                                                  backend="cuda")[:3]]
             for a, c in zip(cuts[:-1], cuts[1:], strict=True)]
    tol = FIXED_TOL[dtype]
    assert _rel(sum(p[0] for p in parts), ref[0]) <= tol
    assert _rel(np.concatenate([p[1] for p in parts], axis=2), ref[1]) <= tol
    assert _rel(np.concatenate([p[2] for p in parts], axis=2), ref[2]) <= tol

