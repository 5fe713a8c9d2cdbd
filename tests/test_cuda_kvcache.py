"""flash_attention_with_kvcache on the CUDA backend (fa_decode_mma / fa_decode_simt / fa_decode_combine).

Against the float64 reference (the same call with backend="reference" on float64 copies, which appends to
its own copy of the cache): contiguous and paged caches (block_size 16 / 64 / 256, shuffled blocks, NaN in
every slot no sequence owns), num_splits 1 / 2 / 7 / None, float16 / bfloat16 / float32 / float64, cache
lengths 0 / 1 / 15 / 17 / 1000, GQA 32/8 and MQA, window, softcap, ALiBi, decode and chunks; the in-place
append element by element; bad input leaving the cache untouched; torch tensors in and out; CUDA graphs
(torch.cuda.graph and CuPy stream capture: capture one step, change q / k / v / lengths in place, replay);
PyTorch SDPA with the explicit bottom-right mask.  Half precision is judged as FlashAttention judges it:
the error against float64 within twice that of a plain implementation in the same precision.
GPU tests skip with the reason without CuPy or a device.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from conftest import dtype_of, random_array, rel_error
from fastattn._masks import MaskRule, allowed_and_bias
from fastattn.backends import get_backend

_REASON = get_backend("cuda").availability()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]

#: relative error of out against float64 for the exact kernels; half precision: see _check_out
RTOL = {"float32": 2e-5, "float64": 1e-11}


def _cp():
    import cupy

    return cupy


def _gpu(x: np.ndarray):
    cp = _cp()
    if x.dtype == dtype_of("bfloat16"):
        return cp.asarray(x.view(np.uint16)).view(cp.dtype("bfloat16") if hasattr(cp, "dtype") else x.dtype)
    return cp.asarray(x)


def _host(x) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).cpu().numpy().view(dtype_of("bfloat16"))
        return x.cpu().numpy()
    cp = _cp()
    if x.dtype.name == "bfloat16":
        return cp.asnumpy(x.view(cp.uint16)).view(dtype_of("bfloat16"))
    return cp.asnumpy(x)


def _bits(x: np.ndarray) -> np.ndarray:
    """The raw bits (NaN == NaN, -0 != 0): element-by-element cache comparisons."""
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


def _cache(rng, batch, capacity, heads_kv, d, dtype, lens):
    """(batch, capacity, heads_kv, d) caches; every row past a sequence's length holds NaN."""
    kc = random_array(rng, (batch, capacity, heads_kv, d), dtype)
    vc = random_array(rng, (batch, capacity, heads_kv, d), dtype)
    for b, n in enumerate(lens):
        kc[b, n:] = np.nan
        vc[b, n:] = np.nan
    return kc, vc


def _paged(rng, kc, vc, block_size):
    """The same caches as a shuffled block pool (NaN in the spare blocks) and its block_table."""
    batch, capacity = kc.shape[:2]
    per = -(-capacity // block_size)
    num_blocks = batch * per + 3
    table = rng.permutation(num_blocks)[:batch * per].reshape(batch, per).astype(np.int32)
    pools = []
    for c in (kc, vc):
        pool = np.full((num_blocks, block_size, *c.shape[2:]), np.nan, c.dtype)
        for b in range(batch):
            for j in range(0, capacity, block_size):
                n = min(block_size, capacity - j)
                pool[table[b, j // block_size], :n] = c[b, j:j + n]
        pools.append(pool)
    return pools[0], pools[1], table


def _unpage(pool, table, capacity):
    batch, bs = table.shape[0], pool.shape[1]
    out = np.empty((batch, table.shape[1] * bs, *pool.shape[2:]), pool.dtype)
    for b in range(batch):
        out[b] = pool[table[b]].reshape(-1, *pool.shape[2:])
    return out[:, :capacity]


def _reference(q, kc, vc, k, v, lens, **kw):
    """(out, lse, k_cache, v_cache) of the float64 reference on copies (the caches after its append)."""
    kc64, vc64 = kc.astype(np.float64), vc.astype(np.float64)
    new = (k.astype(np.float64), v.astype(np.float64)) if k is not None else (None, None)
    out, lse = fastattn.flash_attention_with_kvcache(q.astype(np.float64), kc64, vc64, *new, cache_seqlens=lens,
                                                     backend="reference", return_lse=True, **kw)
    return out, lse, kc64, vc64


def _plain(q, kc, vc, total, dtype, scale=None):
    """A plain bottom-right causal attention in the input precision: scores, P and out rounded to dtype
    (float32 arithmetic in between), on the caches after the append (bshd, GQA)."""
    dt = dtype_of(dtype)
    batch, sq, hq, d = q.shape
    g = hq // kc.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros(q.shape[:3] + (vc.shape[3],), np.float32)
    for b in range(batch):
        n = int(total[b])
        allowed, _ = allowed_and_bias(MaskRule(causal=True, bottom_right=True), sq, n)
        for h in range(hq):
            kk = kc[b, :n, h // g].astype(np.float32)
            vv = vc[b, :n, h // g].astype(np.float32)
            s = (q[b, :, h].astype(np.float32) @ kk.T * np.float32(scale)).astype(dt).astype(np.float32)
            s = np.where(allowed, s, -np.inf)
            m = np.max(s, axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0)
            p = np.exp(s - m)
            den = p.sum(axis=1, keepdims=True)
            p = (p / np.where(den > 0, den, 1)).astype(dt).astype(np.float32)
            out[b, :, h] = (p @ vv).astype(dt).astype(np.float32)
    return out


def _check_out(out, want, dtype, plain=None):
    out = np.asarray(out, np.float64)
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(out), fin), "non-finite pattern differs from the reference"
    err = rel_error(out[fin], want[fin])
    if dtype in RTOL:
        assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]}"
    else:
        base = rel_error(np.asarray(plain, np.float64)[fin], want[fin])
        assert err <= 2 * base + 1e-5, f"relative error {err:.3g} > 2 x plain {dtype} {base:.3g}"
    return err


def _check_lse(lse, want, dtype):
    lse = np.asarray(lse, np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want)), "rows without keys must have lse -inf"
    fin = np.isfinite(want)
    tol = 1e-10 if dtype == "float64" else (2e-5 if dtype == "float32" else 2e-3)
    assert np.abs(lse[fin] - want[fin]).max(initial=0) <= tol * max(1.0, np.abs(want[fin]).max(initial=0))


LENS = np.array([0, 1, 15, 17, 1000], np.int32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("cache", ["contiguous", "paged16", "paged64", "paged256"])
def test_decode_against_reference(rng, dtype, cache):
    """GQA 32/8, head_dim 128, one new token per sequence, lengths 0..1000: out, lse, the cache."""
    hq, hkv, d, cap = 32, 8, 128, 1024
    kc, vc = _cache(rng, 5, cap, hkv, d, dtype, LENS)
    q = random_array(rng, (5, 1, hq, d), dtype)
    k, v = random_array(rng, (5, 1, hkv, d), dtype), random_array(rng, (5, 1, hkv, d), dtype)
    want, want_lse, kc_want, vc_want = _reference(q, kc, vc, k, v, LENS)
    if cache == "contiguous":
        kg, vg, table = _gpu(kc), _gpu(vc), None
    else:
        kp, vp, table_h = _paged(rng, kc, vc, int(cache[5:]))
        kg, vg, table = _gpu(kp), _gpu(vp), _gpu(table_h)
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v),
                                                     cache_seqlens=_gpu(LENS), block_table=table, return_lse=True)
    plain = _plain(q, kc_want.astype(dtype_of(dtype)), vc_want.astype(dtype_of(dtype)), LENS + 1, dtype)
    _check_out(_host(out), want, dtype, plain)
    _check_lse(_host(lse), want_lse, dtype)
    kh, vh = _host(kg), _host(vg)
    if table is not None:
        spare = sorted(set(range(kh.shape[0])) - set(table_h.ravel().tolist()))
        assert len(spare) == 3 and np.isnan(kh[spare].astype(np.float32)).all(), "a block outside the table was written"
        kh, vh = _unpage(kh, table_h, cap), _unpage(vh, table_h, cap)
    np.testing.assert_array_equal(_bits(kh), _bits(kc_want.astype(dtype_of(dtype))))
    np.testing.assert_array_equal(_bits(vh), _bits(vc_want.astype(dtype_of(dtype))))


@pytest.mark.parametrize("block_size", [16, 64, 256, 48])
def test_paged_equals_contiguous(rng, block_size, monkeypatch):
    """The same data paged or contiguous gives the same bits under the same tiles (the same splits and
    order): the paged row addressing reads exactly the contiguous rows.  (By default the two take different
    tiles, each its fastest: test_decode_against_reference holds both to the reference.)"""
    from fastattn.backends.cuda import _decode, _specs

    monkeypatch.setattr(_specs, "DECODE_PAGED_RULES", _specs.DECODE_RULES)
    monkeypatch.setattr(_decode, "_PLANS", {})
    lens = np.array([999, 3, 400], np.int32)
    kc, vc = _cache(rng, 3, 1000, 8, 128, "float16", lens)
    kp, vp, table = _paged(rng, kc, vc, block_size)
    q = random_array(rng, (3, 1, 32, 128), "float16")
    k, v = random_array(rng, (3, 1, 8, 128), "float16"), random_array(rng, (3, 1, 8, 128), "float16")
    a = fastattn.flash_attention_with_kvcache(_gpu(q), _gpu(kc), _gpu(vc), _gpu(k), _gpu(v), cache_seqlens=lens)
    b = fastattn.flash_attention_with_kvcache(_gpu(q), _gpu(kp), _gpu(vp), _gpu(k), _gpu(v), cache_seqlens=lens,
                                              block_table=_gpu(table))
    np.testing.assert_array_equal(_bits(_host(a)), _bits(_host(b)))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("splits", [1, 2, 7, None])
def test_num_splits(rng, dtype, splits):
    lens = np.array([2999, 17], np.int32)
    kc, vc = _cache(rng, 2, 3000, 2, 128, dtype, lens)
    q = random_array(rng, (2, 1, 8, 128), dtype)
    want, _, _, _ = _reference(q, kc, vc, None, None, lens)
    args = (_gpu(q), _gpu(kc), _gpu(vc))
    one = _host(fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), num_splits=1))
    out, lse = fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), num_splits=splits,
                                                     return_lse=True)
    out = _host(out)
    if dtype == "float32":
        _check_out(out, want, dtype)
        np.testing.assert_allclose(out, one, rtol=1e-5, atol=1e-6)
    else:  # splits change only the order of float32 sums and one 16-bit rounding of each partial
        assert rel_error(out, one) <= 2e-3
        assert rel_error(out, want) <= 2 * rel_error(one, want) + 1e-4
    _check_lse(_host(lse), _reference(q, kc, vc, None, None, lens)[1], dtype)


@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (4, 4)])
@pytest.mark.parametrize("seq_q", [1, 7, 16])
def test_gqa_mqa_and_chunks(rng, heads, seq_q):
    hq, hkv = heads
    lens = np.array([0, 33, 300], np.int32)
    kc, vc = _cache(rng, 3, 320, hkv, 64, "float16", lens)
    q = random_array(rng, (3, seq_q, hq, 64), "float16")
    k, v = random_array(rng, (3, seq_q, hkv, 64), "float16"), random_array(rng, (3, seq_q, hkv, 64), "float16")
    want, want_lse, kw, vw = _reference(q, kc, vc, k, v, lens)
    kg, vg = _gpu(kc), _gpu(vc)
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens),
                                                     return_lse=True)
    _check_out(_host(out), want, "float16", _plain(q, kw.astype(np.float16), vw.astype(np.float16), lens + seq_q,
                                                   "float16"))
    _check_lse(_host(lse), want_lse, "float16")
    np.testing.assert_array_equal(_bits(_host(kg)), _bits(kw.astype(np.float16)))


VARIANTS = [dict(window=(40, 0)), dict(window=(8, 2)), dict(softcap=3.0), dict(causal=False),
            dict(alibi_slopes=np.linspace(0.05, 0.5, 8).astype(np.float32)), dict(causal=False, window=(20, 20))]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("kw", VARIANTS, ids=["window", "window-right", "softcap", "noncausal", "alibi", "band"])
@pytest.mark.parametrize("seq_q", [1, 5])
def test_variants(rng, dtype, kw, seq_q):
    lens = np.array([70, 1, 200], np.int32)
    kc, vc = _cache(rng, 3, 256, 2, 64, dtype, lens)
    q = random_array(rng, (3, seq_q, 8, 64), dtype)
    k, v = random_array(rng, (3, seq_q, 2, 64), dtype), random_array(rng, (3, seq_q, 2, 64), dtype)
    want, want_lse, _, _ = _reference(q, kc, vc, k, v, lens, **kw)
    gkw = {n: (_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), _gpu(kc), _gpu(vc), _gpu(k), _gpu(v),
                                                     cache_seqlens=_gpu(lens), return_lse=True, **gkw)
    out = np.asarray(_host(out), np.float64)
    if dtype in RTOL:
        _check_out(out, want, dtype)
        _check_lse(_host(lse), want_lse, dtype)
    else:  # masks and logit hooks have no plain twin here: the mma kernels' usual error bound
        fin = np.isfinite(want)
        assert np.array_equal(np.isfinite(out), fin)
        assert rel_error(out[fin], want[fin]) <= (4e-3 if dtype == "float16" else 3e-2)


def test_odd_head_dim_and_strided_views(rng):
    """head_dim 59 (element loads, padded to 64) and (batch, heads, seq, d) views of bshd buffers."""
    lens = np.array([5, 130], np.int32)
    kc, vc = _cache(rng, 2, 160, 2, 59, "float16", lens)
    q = random_array(rng, (2, 3, 4, 59), "float16")
    k, v = random_array(rng, (2, 3, 2, 59), "float16"), random_array(rng, (2, 3, 2, 59), "float16")
    want, _, kw, _ = _reference(q, kc, vc, k, v, lens)
    kg = _gpu(kc)
    views = [x.swapaxes(1, 2) for x in (_gpu(q), kg, _gpu(vc), _gpu(k), _gpu(v))]
    out = fastattn.flash_attention_with_kvcache(*views, cache_seqlens=lens, layout="bhsd")
    assert out.shape == (2, 4, 3, 59)
    assert rel_error(_host(out).swapaxes(1, 2), want) <= 4e-3
    np.testing.assert_array_equal(_bits(_host(kg)), _bits(kw.astype(np.float16)))


@pytest.mark.parametrize("case", ["overflow", "negative", "table", "paged_overflow"])
def test_bad_values_leave_the_cache_untouched(rng, case):
    kc, vc = _cache(rng, 2, 64, 2, 64, "float16", [5, 60])
    q = random_array(rng, (2, 3, 4, 64), "float16")
    k, v = random_array(rng, (2, 3, 2, 64), "float16"), random_array(rng, (2, 3, 2, 64), "float16")
    lens, table = np.array([5, 62], np.int32), None
    kg, vg = _gpu(kc), _gpu(vc)
    match = "sequence 1 would hold 65"
    if case == "negative":
        lens[0], match = -1, "cache_seqlens must be >= 0"
    if case in ("table", "paged_overflow"):
        kp, vp, table_h = _paged(rng, kc, vc, 16)
        kg, vg = _gpu(kp), _gpu(vp)
        if case == "table":
            lens = np.array([5, 20], np.int32)
            table_h[1, 1] = 999
            match = r"block_table\[1, 1\] = 999"
        table = _gpu(table_h)
    before = [_host(kg), _host(vg)]
    with pytest.raises(ValueError, match=match):
        fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens),
                                              block_table=table)
    for got, was in zip((_host(kg), _host(vg)), before, strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(was))


def _torch():
    return pytest.importorskip("torch")


def test_torch_tensors_in_and_out(rng):
    torch = _torch()
    lens = np.array([10, 200], np.int32)
    kc, vc = _cache(rng, 2, 256, 8, 128, "bfloat16", lens)
    q = random_array(rng, (2, 1, 32, 128), "bfloat16")
    k, v = random_array(rng, (2, 1, 8, 128), "bfloat16"), random_array(rng, (2, 1, 8, 128), "bfloat16")
    want, _, kw, _ = _reference(q, kc, vc, k, v, lens)

    def t(x):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()

    kt = t(kc)
    out = fastattn.flash_attention_with_kvcache(t(q), kt, t(vc), t(k), t(v),
                                                cache_seqlens=torch.from_numpy(lens).cuda())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.is_cuda
    plain = _plain(q, kw.astype(dtype_of("bfloat16")), _reference(q, kc, vc, k, v, lens)[3].astype(
        dtype_of("bfloat16")), lens + 1, "bfloat16")
    _check_out(_host(out), want, "bfloat16", plain)
    np.testing.assert_array_equal(_bits(_host(kt)), _bits(kw.astype(dtype_of("bfloat16"))))


def _graph_case(rng, paged):
    lens = np.array([100, 7, 250], np.int32)
    kc, vc = _cache(rng, 3, 272, 8, 128, "float16", lens)
    table = None
    if paged:
        kc, vc, table = _paged(rng, kc, vc, 16)
    return lens, kc, vc, table


def _steps(rng, n):
    return [tuple(random_array(rng, s, "float16") for s in ((3, 1, 32, 128), (3, 1, 8, 128), (3, 1, 8, 128)))
            for _ in range(n)]


def _expected_steps(lens, kc, vc, table, steps):
    """The reference loop on the host: each step appends and attends, lengths + 1."""
    cap = 272
    kh = _unpage(kc, table, cap) if table is not None else kc
    vh = _unpage(vc, table, cap) if table is not None else vc
    kh, vh = kh.astype(np.float64), vh.astype(np.float64)
    outs = []
    for i, (q, k, v) in enumerate(steps):
        out = fastattn.flash_attention_with_kvcache(q.astype(np.float64), kh, vh, k.astype(np.float64),
                                                    v.astype(np.float64), cache_seqlens=lens + i, backend="reference")
        outs.append(out)
    return outs, kh, vh


def _captured_call(torch, kc, vc, table, lens, shapes):
    """A call captured with torch.cuda.graph on device copies of the caches, the table and the lengths, with
    zero q / k / v of these shapes to write in place: (graph, out, (k_cache, v_cache, lengths, q, k, v))."""
    dev = torch.device("cuda")
    kt, vt = torch.from_numpy(kc).to(dev), torch.from_numpy(vc).to(dev)
    tt = torch.from_numpy(table).to(dev) if table is not None else None
    lt = torch.from_numpy(lens.copy()).to(dev)
    qs, ks, vs = (torch.zeros(s, dtype=torch.float16, device=dev) for s in shapes)
    kc0, vc0 = kt.clone(), vt.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, checks) outside the capture, then restore the cache
        fastattn.flash_attention_with_kvcache(qs, kt, vt, ks, vs, cache_seqlens=lt, block_table=tt)
    torch.cuda.current_stream().wait_stream(side)
    kt.copy_(kc0)
    vt.copy_(vc0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastattn.flash_attention_with_kvcache(qs, kt, vt, ks, vs, cache_seqlens=lt, block_table=tt)
    return graph, out, (kt, vt, lt, qs, ks, vs)


@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_torch(rng, paged):
    """Capture one decode step with torch.cuda.graph; write new q / k / v and lengths in place; replay."""
    torch = _torch()
    lens, kc, vc, table = _graph_case(rng, paged)
    steps = _steps(rng, 3)
    graph, out, (kt, vt, lt, qs, ks, vs) = _captured_call(torch, kc, vc, table, lens, [s.shape for s in steps[0]])
    want, kw, _ = _expected_steps(lens, kc, vc, table, steps)
    for i, (q, k, v) in enumerate(steps):
        qs.copy_(torch.from_numpy(q))
        ks.copy_(torch.from_numpy(k))
        vs.copy_(torch.from_numpy(v))
        lt.copy_(torch.from_numpy(lens + i))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out.cpu().numpy(), want[i]) <= 4e-3, f"step {i}"
    kh = kt.cpu().numpy()
    if paged:
        kh = _unpage(kh, table, 272)
    np.testing.assert_array_equal(_bits(kh), _bits(kw.astype(np.float16)))


def test_cuda_graph_cupy(rng):
    """The same with CuPy's stream capture (device lengths, contiguous cache)."""
    cp = _cp()
    lens, kc, vc, _ = _graph_case(rng, False)
    steps = _steps(rng, 3)
    kg, vg, lg = _gpu(kc), _gpu(vc), _gpu(lens.copy())
    qs, ks, vs = (cp.zeros(s.shape, dtype=cp.float16) for s in steps[0])
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fastattn.flash_attention_with_kvcache(qs, kg, vg, ks, vs, cache_seqlens=lg)  # warm-up
        kg.set(kc)
        vg.set(vc)
        stream.synchronize()
        stream.begin_capture()
        out = fastattn.flash_attention_with_kvcache(qs, kg, vg, ks, vs, cache_seqlens=lg)
        graph = stream.end_capture()
    want, kw, _ = _expected_steps(lens, kc, vc, None, steps)
    for i, (q, k, v) in enumerate(steps):
        qs.set(q)
        ks.set(k)
        vs.set(v)
        lg.set(lens + i)
        cp.cuda.Device().synchronize()
        graph.launch(stream)
        stream.synchronize()
        assert rel_error(cp.asnumpy(out), want[i]) <= 4e-3, f"step {i}"
    np.testing.assert_array_equal(_bits(cp.asnumpy(kg)), _bits(kw.astype(np.float16)))


@pytest.mark.parametrize("seq_q", [1, 16, 128])
def test_against_torch_sdpa_with_an_explicit_mask(rng, seq_q):
    """PyTorch SDPA on the concatenated cache with the bottom-right causal mask spelled out."""
    torch = _torch()
    lens = np.array([300, 1000], np.int32)
    kc, vc = _cache(rng, 2, 1200, 8, 128, "float16", lens)
    q = random_array(rng, (2, seq_q, 32, 128), "float16")
    k, v = random_array(rng, (2, seq_q, 8, 128), "float16"), random_array(rng, (2, seq_q, 8, 128), "float16")
    want, _, kw, vw = _reference(q, kc, vc, k, v, lens)
    out = _host(fastattn.flash_attention_with_kvcache(_gpu(q), _gpu(kc), _gpu(vc), _gpu(k), _gpu(v),
                                                      cache_seqlens=_gpu(lens)))
    for b in range(2):
        n = int(lens[b]) + seq_q
        allowed, _ = allowed_and_bias(MaskRule(causal=True, bottom_right=True), seq_q, n)
        qt = torch.from_numpy(q[b:b + 1]).cuda().transpose(1, 2)
        kt = torch.from_numpy(kw[b:b + 1, :n].astype(np.float16)).cuda().transpose(1, 2)
        vt = torch.from_numpy(vw[b:b + 1, :n].astype(np.float16)).cuda().transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(
            qt, kt.repeat_interleave(4, dim=1), vt.repeat_interleave(4, dim=1),
            attn_mask=torch.from_numpy(allowed).cuda())
        sdpa = ref.transpose(1, 2).float().cpu().numpy()
        # both within twice the other's error against float64 (neither is the oracle)
        e_ours, e_sdpa = rel_error(out[b:b + 1], want[b:b + 1]), rel_error(sdpa, want[b:b + 1])
        assert e_ours <= 2 * e_sdpa + 1e-5, (e_ours, e_sdpa)


def test_many_splits_merge(rng):
    """More splits than a warp has lanes (the combine kernel's split loop runs twice) and splits that see
    no key at all (a short sequence beside a long one)."""
    lens = np.array([4095, 3], np.int32)
    kc, vc = _cache(rng, 2, 4096, 1, 128, "float16", lens)
    q = random_array(rng, (2, 1, 4, 128), "float16")
    want, want_lse, _, _ = _reference(q, kc, vc, None, None, lens)
    args = (_gpu(q), _gpu(kc), _gpu(vc))
    one = _host(fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), num_splits=1))
    out, lse = fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), num_splits=45,
                                                     return_lse=True)
    assert rel_error(_host(out), one) <= 2e-3
    assert rel_error(_host(out), want) <= 2 * rel_error(one, want) + 1e-4
    _check_lse(_host(lse), want_lse, "float16")


def test_repeated_calls_take_new_arrays_and_values(rng):
    """A decode loop: the second call of the same shapes (checked once, then remembered) reads its own
    arrays and length, and a length past the capacity is still refused before any write."""
    kc, vc = _cache(rng, 2, 300, 2, 64, "float16", [299, 299])
    kg, vg = _gpu(kc), _gpu(vc)
    for n in (100, 101, 102):
        q = random_array(rng, (2, 1, 8, 64), "float16")
        k, v = random_array(rng, (2, 1, 2, 64), "float16"), random_array(rng, (2, 1, 2, 64), "float16")
        want, _, _, _ = _reference(q, _host(kg), _host(vg), k, v, n)
        out = _host(fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=n))
        plain = _plain(q, *(_host(c) for c in (kg, vg)), np.full(2, n + 1), "float16")
        _check_out(out, want, "float16", plain)
    before = [_host(kg), _host(vg)]
    with pytest.raises(ValueError, match="would hold 301"):
        fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=300)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=-1)
    for got, was in zip((_host(kg), _host(vg)), before, strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(was))


def test_choose_splits_fills_whole_waves():
    from fastattn.backends.cuda._decode import choose_splits

    # batch 1, 8 k/v heads, 128k keys on 132 multiprocessors x 2 blocks: enough blocks for one wave, not more
    s = choose_splits(8, 2048, 132, 2)
    assert 8 * s <= 264 and 8 * s >= 200
    assert choose_splits(8, 3, 132, 2) == 1  # too few key tiles to split
    assert choose_splits(4096, 2048, 132, 2) == 1  # many waves already
    # 256 blocks fit one wave of 264: splitting in two would make two waves of the same work
    assert choose_splits(256, 64, 132, 2) == 1


def test_remembered_calls_keep_no_arrays(rng):
    """The checked-call memo holds shapes and options only: a cache is freed once its caller drops it."""
    import weakref

    from fastattn import _kvcache

    kc, vc = _cache(rng, 1, 64, 1, 64, "float16", [10])
    kg, vg = _gpu(kc), _gpu(vc)
    q = _gpu(random_array(rng, (1, 1, 2, 64), "float16"))
    fastattn.flash_attention_with_kvcache(q, kg, vg, cache_seqlens=10)
    fastattn.flash_attention_with_kvcache(q, kg, vg, cache_seqlens=10)
    for call, _ in _kvcache._SEEN.values():
        assert all(x is None for x in (call.q, call.k_cache, call.v_cache, call.like, call.cache_seqlens))
    ref = weakref.ref(kg)
    del kg
    assert ref() is None


def _torch_case(rng, batch=2, capacity=2048, heads=(8, 2), d=128, dtype="float16"):
    torch = _torch()
    lens = np.full(batch, capacity - 64, np.int32)
    kc, vc = _cache(rng, batch, capacity, heads[1], d, dtype, lens)
    return torch, lens, kc, vc


def _step(rng, batch, heads, d, dtype="float16"):
    return (random_array(rng, (batch, 1, heads[0], d), dtype), random_array(rng, (batch, 1, heads[1], d), dtype),
            random_array(rng, (batch, 1, heads[1], d), dtype))


def test_repeat_path_reads_new_pointers_lengths_and_streams(rng, monkeypatch):
    """torch repeats of one geometry take the short path (no check_call): each reads its own q / k / v,
    its length (an int, then a device tensor) and the current stream, and equals the reference."""
    from fastattn import _kvcache

    torch, lens, kc, vc = _torch_case(rng)
    kt, vt = torch.from_numpy(kc).cuda(), torch.from_numpy(vc).cuda()
    kh, vh = kc.copy(), vc.copy()
    n = int(lens[0])
    calls = []
    for i, where in enumerate(("first", "int", "int", "stream", "device_lens")):
        q, k, v = _step(rng, 2, (8, 2), 128)
        want, _, k64, v64 = _reference(q, kh, vh, k, v, n)
        args = [torch.from_numpy(x).cuda() for x in (q, k, v)]
        lens_arg = torch.full((2,), n, dtype=torch.int32, device="cuda") if where == "device_lens" else n
        if where == "device_lens":  # a new key: its first call is checked in full, its second repeats
            fastattn.flash_attention_with_kvcache(args[0], kt.clone(), vt.clone(), args[1], args[2],
                                                  cache_seqlens=lens_arg)
        stream = torch.cuda.Stream() if where == "stream" else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with monkeypatch.context() as m, torch.cuda.stream(stream):
            if i >= 2:
                m.setattr(_kvcache, "check_call", lambda *a, **k: pytest.fail("a repeat went the long way"))
            out = fastattn.flash_attention_with_kvcache(args[0], kt, vt, args[1], args[2], cache_seqlens=lens_arg)
        torch.cuda.current_stream().wait_stream(stream)
        calls.append(where)
        plain = _plain(q, k64.astype(np.float16), v64.astype(np.float16), np.full(2, n + 1), "float16")
        _check_out(out.cpu().numpy(), want, "float16", plain)
        kh, vh = k64.astype(np.float16), v64.astype(np.float16)
        n += 1
    assert any(r is not None for r in _kvcache._FAST.values())
    np.testing.assert_array_equal(_bits(kt.cpu().numpy()), _bits(kh))


def test_repeat_path_refuses_bad_values(rng):
    """A repeat with a length past the capacity or negative raises before any write, as the first call would."""
    torch, lens, kc, vc = _torch_case(rng, capacity=300)
    kt, vt = torch.from_numpy(kc).cuda(), torch.from_numpy(vc).cuda()
    q, k, v = (torch.from_numpy(x).cuda() for x in _step(rng, 2, (8, 2), 128))
    fastattn.flash_attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=100)
    fastattn.flash_attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=101)
    before = (kt.cpu().numpy(), vt.cpu().numpy())
    with pytest.raises(ValueError, match="would hold 301"):
        fastattn.flash_attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=300)
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        fastattn.flash_attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=-1)
    lt = torch.tensor([299, 300], dtype=torch.int32, device="cuda")
    for _ in range(2):  # the device-length key: checked in full, then on the repeat path
        with pytest.raises(ValueError, match="would hold 301"):
            fastattn.flash_attention_with_kvcache(q, kt, vt, k, v, cache_seqlens=lt)
    for got, was in zip((kt.cpu().numpy(), vt.cpu().numpy()), before, strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(was))


@pytest.mark.parametrize("splits", [None, 7, 45])
def test_fused_merge_equals_the_combine_launch(rng, monkeypatch, splits):
    """The merge by each unit's last block equals the combine kernel's (to rounding), rows that no split
    sees a key of included; its counters are back at zero after every launch (the next call is right)."""
    from fastattn.backends.cuda import _decode

    lens = np.array([4000, 3], np.int32)
    kc, vc = _cache(rng, 2, 4096, 2, 128, "float16", lens)
    q = random_array(rng, (2, 1, 8, 128), "float16")
    want, want_lse, _, _ = _reference(q, kc, vc, None, None, lens)
    args = (_gpu(q), _gpu(kc), _gpu(vc))
    got = {}
    for fuse in (False, True, True):
        monkeypatch.setattr(_decode, "_FUSE", fuse)
        _decode._PLANS.clear()
        out, lse = fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), num_splits=splits,
                                                         return_lse=True)
        got.setdefault(fuse, []).append((_host(out), _host(lse)))
    (o0, l0), (o1, l1), (o2, l2) = got[False][0], got[True][0], got[True][1]
    np.testing.assert_array_equal(_bits(o1), _bits(o2))  # the counters started at zero again
    np.testing.assert_array_equal(_bits(l1), _bits(l2))
    assert rel_error(o1, o0) <= 2e-3
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    _check_lse(l1, want_lse, "float16")
    assert rel_error(o1, want) <= 2 * rel_error(o0, want) + 1e-4


def test_two_threads_on_two_streams(rng):
    """Two threads, each on its own stream with its own cache, decode in a loop with the same geometry
    (one plan, one parameter buffer, split scratch and counters per stream): every output equals the
    same loop run alone."""
    import threading

    torch, lens, kc, vc = _torch_case(rng, batch=1, capacity=4096, heads=(32, 8))
    steps = [[tuple(torch.from_numpy(x).cuda() for x in _step(rng, 1, (32, 8), 128)) for _ in range(20)]
             for _ in range(2)]
    n0 = int(lens[0])

    def loop(t, caches, results):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i, (q, k, v) in enumerate(steps[t]):
                results.append(fastattn.flash_attention_with_kvcache(q, *caches, k, v, cache_seqlens=n0 + i))
        stream.synchronize()

    def fresh():
        return torch.from_numpy(kc).cuda(), torch.from_numpy(vc).cuda()

    alone = [[], []]
    for t in range(2):
        loop(t, fresh(), alone[t])
    together = [[], []]
    threads = [threading.Thread(target=loop, args=(t, fresh(), together[t])) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    for t in range(2):
        assert len(together[t]) == len(alone[t]) == 20
        for a, b in zip(alone[t], together[t], strict=True):
            assert torch.equal(a, b)


def test_cuda_graph_of_a_split_call_owns_its_counters(rng):
    """Two graphs captured on one stream, each with split-KV calls (fused merge), replayed on two
    streams at once: each equals its own eager result."""
    torch, lens, kc, vc = _torch_case(rng, batch=1, capacity=4096, heads=(32, 8))
    kt, vt = torch.from_numpy(kc).cuda(), torch.from_numpy(vc).cuda()
    qs = [torch.from_numpy(random_array(rng, (1, 1, 32, 128), "float16")).cuda() for _ in range(2)]
    n = int(lens[0])
    eager = [fastattn.flash_attention_with_kvcache(q, kt, vt, cache_seqlens=n, num_splits=16) for q in qs]
    torch.cuda.synchronize()
    graphs, outs = [], []
    for q in qs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(fastattn.flash_attention_with_kvcache(q, kt, vt, cache_seqlens=n, num_splits=16))
        graphs.append(g)
    streams = [torch.cuda.Stream() for _ in graphs]
    for _ in range(3):
        for g, s in zip(graphs, streams, strict=True):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                g.replay()
        torch.cuda.synchronize()
        for e, o in zip(eager, outs, strict=True):
            assert torch.equal(e, o)


# --- long chunks: the append alone, then the forward kernel on the cache in place ------------------------

def _count_long(monkeypatch):
    """Counts the calls that took the long-chunk path (append, then the forward kernel)."""
    from fastattn.backends.cuda import _decode

    seen = []
    run = _decode._run_long

    def counted(*args, **kw):
        seen.append(args[1].kernel)
        return run(*args, **kw)

    monkeypatch.setattr(_decode, "_run_long", counted)
    return seen


def _long_case(rng, dtype, seq_q, cache, lens, hq=16, hkv=4, d=128, new=True):
    cap = int(max(lens)) + seq_q + 5
    kc, vc = _cache(rng, len(lens), cap, hkv, d, dtype, lens)
    q = random_array(rng, (len(lens), seq_q, hq, d), dtype)
    k = random_array(rng, (len(lens), seq_q, hkv, d), dtype) if new else None
    v = random_array(rng, (len(lens), seq_q, hkv, d), dtype) if new else None
    table_h = None
    if cache == "contiguous":
        kg, vg = _gpu(kc), _gpu(vc)
    else:
        kp, vp, table_h = _paged(rng, kc, vc, int(cache[5:]))
        kg, vg = _gpu(kp), _gpu(vp)
    return cap, kc, vc, q, k, v, kg, vg, table_h


def _cache_after(kg, vg, table_h, cap):
    kh, vh = _host(kg), _host(vg)
    if table_h is not None:
        spare = sorted(set(range(kh.shape[0])) - set(table_h.ravel().tolist()))
        assert np.isnan(kh[spare].astype(np.float32)).all(), "a block outside the table was written"
        assert np.isnan(vh[spare].astype(np.float32)).all(), "a block outside the table was written"
        kh, vh = _unpage(kh, table_h, cap), _unpage(vh, table_h, cap)
    return kh, vh


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cache", ["contiguous", "paged16", "paged48", "paged64"])
@pytest.mark.parametrize("seq_q", [128, 300, 512])
def test_long_chunks_against_reference(rng, monkeypatch, dtype, cache, seq_q):
    """Chunks of 128-512 tokens (GQA 16/4: 512-2048 rows a k/v head) go through the forward kernel; lengths
    0, 1 and odd ones; out, lse, and the cache element by element after the in-place append."""
    seen = _count_long(monkeypatch)
    lens = np.array([0, 1, 333], np.int32)
    cap, kc, vc, q, k, v, kg, vg, table_h = _long_case(rng, dtype, seq_q, cache, lens)
    want, want_lse, kc_want, vc_want = _reference(q, kc, vc, k, v, lens)
    table = None if table_h is None else _gpu(table_h.astype(np.int64) if cache == "paged48" else table_h)
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens),
                                                     block_table=table, return_lse=True)
    assert len(seen) == 1, "the long-chunk path did not serve the call"
    dt = dtype_of(dtype)
    plain = _plain(q, kc_want.astype(dt), vc_want.astype(dt), lens + seq_q, dtype)
    _check_out(_host(out), want, dtype, plain)
    _check_lse(_host(lse), want_lse, dtype)
    kh, vh = _cache_after(kg, vg, table_h, cap)
    np.testing.assert_array_equal(_bits(kh), _bits(kc_want.astype(dt)))
    np.testing.assert_array_equal(_bits(vh), _bits(vc_want.astype(dt)))


@pytest.mark.parametrize("cache", ["contiguous", "paged64"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_long_chunks_equal_the_decode_path(rng, monkeypatch, cache, layout):
    """The forward kernel's result equals the decode kernel's (num_splits=1 keeps a call there) to rounding,
    both layouts; each call appends the same tokens to its own copy of the cache."""
    seen = _count_long(monkeypatch)
    lens = np.array([17, 400], np.int32)
    cap, kc, vc, q, k, v, kg, vg, table_h = _long_case(rng, "float16", 160, cache, lens, hq=32, hkv=8)
    table = None if table_h is None else _gpu(table_h)
    results = []
    for splits in (None, 1):
        kg2, vg2 = kg.copy(), vg.copy()
        args = [_gpu(q), kg2, vg2, _gpu(k), _gpu(v)]
        if layout == "bhsd":
            args = [x.swapaxes(1, 2) if (i != 1 and i != 2) or table is None else x for i, x in enumerate(args)]
        out, lse = fastattn.flash_attention_with_kvcache(*args, cache_seqlens=_gpu(lens), block_table=table,
                                                         num_splits=splits, return_lse=True, layout=layout)
        results.append((_host(out), _host(lse), _cache_after(kg2, vg2, table_h, cap)))
    assert len(seen) == 1
    (o1, l1, c1), (o2, l2, c2) = results
    assert rel_error(o1, o2) <= 2e-3, rel_error(o1, o2)
    np.testing.assert_allclose(l1, l2, rtol=1e-3, atol=1e-3)
    for a, b in zip(c1, c2, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


LONG_VARIANTS = [dict(window=(40, 0)), dict(window=(8, 2)), dict(softcap=3.0), dict(causal=False),
                 dict(alibi_slopes="heads"), dict(alibi_slopes="batch"), dict(causal=False, window=(20, 20))]


@pytest.mark.parametrize("cache", ["contiguous", "paged16"])
@pytest.mark.parametrize("kw", LONG_VARIANTS,
                         ids=["window", "window-right", "softcap", "noncausal", "alibi", "alibi-batch", "band"])
def test_long_chunk_variants(rng, monkeypatch, cache, kw):
    seen = _count_long(monkeypatch)
    lens = np.array([70, 0, 200], np.int32)
    cap, kc, vc, q, k, v, kg, vg, table_h = _long_case(rng, "float16", 130, cache, lens, hq=32, hkv=8, d=64)
    if "alibi_slopes" in kw:
        shape = (32,) if kw["alibi_slopes"] == "heads" else (3, 32)
        kw = dict(alibi_slopes=rng.uniform(0.05, 0.5, shape).astype(np.float32))
    want, want_lse, kc_want, _ = _reference(q, kc, vc, k, v, lens, **kw)
    gkw = {n: (_gpu(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    table = None if table_h is None else _gpu(table_h)
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens),
                                                     block_table=table, return_lse=True, **gkw)
    assert len(seen) == 1
    out = np.asarray(_host(out), np.float64)
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(out), fin)
    assert rel_error(out[fin], want[fin]) <= 4e-3
    _check_lse(_host(lse), want_lse, "float16")
    kh, _ = _cache_after(kg, vg, table_h, cap)
    np.testing.assert_array_equal(_bits(kh), _bits(kc_want.astype(np.float16)))


@pytest.mark.parametrize("cache", ["contiguous", "paged64"])
def test_long_chunk_without_new_tokens_and_int_lengths(rng, monkeypatch, cache):
    """No k / v (the chunk's queries against the cache alone, a length of 0 sees nothing) and an int
    cache_seqlens."""
    seen = _count_long(monkeypatch)
    lens = np.array([0, 250, 250], np.int32)
    cap, kc, vc, q, _, _, kg, vg, table_h = _long_case(rng, "float16", 100, cache, lens, hq=32, hkv=8, new=False)
    table = None if table_h is None else _gpu(table_h)
    want, want_lse, _, _ = _reference(q, kc, vc, None, None, lens)
    out, lse = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, cache_seqlens=_gpu(lens), block_table=table,
                                                     return_lse=True)
    out, lse = _host(out), _host(lse)
    assert np.isneginf(lse[0]).all() and not np.asarray(out[0], np.float32).any()  # no keys: 0 and -inf
    _check_out(out[1:], want[1:], "float16", _plain(q[1:], kc[1:], vc[1:], lens[1:], "float16"))
    _check_lse(lse, want_lse, "float16")
    out2 = fastattn.flash_attention_with_kvcache(_gpu(q[1:]), _gpu(kc[1:]), _gpu(vc[1:]), cache_seqlens=250)
    _check_out(_host(out2), want[1:], "float16", _plain(q[1:], kc[1:], vc[1:], lens[1:], "float16"))
    assert len(seen) == 2


def test_long_chunk_bad_values_leave_the_cache_untouched(rng, monkeypatch):
    lens = np.array([5, 100], np.int32)
    cap, kc, vc, q, k, v, kg, vg, _ = _long_case(rng, "float16", 128, "contiguous", lens)
    before = [_host(kg), _host(vg)]
    with pytest.raises(ValueError, match="sequence 1 would hold"):
        fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens + 10))
    for got, was in zip((_host(kg), _host(vg)), before, strict=True):
        np.testing.assert_array_equal(_bits(got), _bits(was))


@pytest.mark.parametrize("paged", [False, True])
def test_long_chunk_cuda_graph_torch(rng, monkeypatch, paged):
    """A long chunk captured with torch.cuda.graph (append and forward launches, device lengths), replayed
    with new q / k / v and lengths written in place."""
    torch = _torch()
    seen = _count_long(monkeypatch)
    lens = np.array([100, 7], np.int32)
    seq_q, steps = 96, 2
    kc, vc = _cache(rng, 2, 100 + steps * seq_q + 8, 8, 128, "float16", lens)
    cap = kc.shape[1]
    table = None
    if paged:
        kc, vc, table = _paged(rng, kc, vc, 16)
    shapes = ((2, seq_q, 32, 128), (2, seq_q, 8, 128), (2, seq_q, 8, 128))
    graph, out, (kt, vt, lt, qs, ks, vs) = _captured_call(torch, kc, vc, table, lens, shapes)
    assert len(seen) == 2
    kh = (_unpage(kc, table, cap) if paged else kc).astype(np.float64)
    vh = (_unpage(vc, table, cap) if paged else vc).astype(np.float64)
    for i in range(steps):
        q, k, v = (random_array(rng, s, "float16") for s in shapes)
        want = fastattn.flash_attention_with_kvcache(q.astype(np.float64), kh, vh, k.astype(np.float64),
                                                     v.astype(np.float64), cache_seqlens=lens + i * seq_q,
                                                     backend="reference")
        qs.copy_(torch.from_numpy(q))
        ks.copy_(torch.from_numpy(k))
        vs.copy_(torch.from_numpy(v))
        lt.copy_(torch.from_numpy(lens + i * seq_q))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out.cpu().numpy(), want) <= 4e-3, f"step {i}"
    got = kt.cpu().numpy()
    if paged:
        got = _unpage(got, table, cap)
    np.testing.assert_array_equal(_bits(got), _bits(kh.astype(np.float16)))


def test_long_route_rule():
    """Which calls take the long-chunk path: float16 / bfloat16, num_splits None, at least LONG_MIN_ROWS rows
    a k/v head, half of each forward tile filled, and the forward's tiles filling LONG_FILL of the machine
    (LONG_FILL_SHORT for short caches)."""
    import dataclasses

    from fastattn.backends.cuda import _decode

    @dataclasses.dataclass
    class Call:
        dtype: str = "float16"
        num_splits: int | None = None
        batch: int = 1
        capacity: int = 16384
        seq_q: int = 512
        heads_q: int = 32
        heads_kv: int = 8

        @property
        def group(self) -> int:
            return self.heads_q // self.heads_kv

    sms = 132
    assert _decode.long_fill(Call(seq_q=128), sms) == pytest.approx(32 * 128 / (132 * 128))
    assert _decode.long_fill(Call(seq_q=64), sms) == pytest.approx(32 * 64 * 0.5 / (132 * 128))
    assert _decode.long_route(Call(seq_q=512), 16384, sms)
    assert _decode.long_route(Call(seq_q=256), 16384, sms)  # fill 0.48
    assert not _decode.long_route(Call(seq_q=128), 16384, sms)  # fill 0.24, a long cache: decode
    assert _decode.long_route(Call(seq_q=128), 4096, sms)  # fill 0.24, a short cache: forward
    assert not _decode.long_route(Call(seq_q=64), 4096, sms)  # 256 rows, fill 0.12
    assert _decode.long_route(Call(seq_q=64, batch=4), 4096, sms)  # fill 0.24, half of each tile
    assert not _decode.long_route(Call(seq_q=64, batch=4), 8192, sms)
    assert _decode.long_route(Call(seq_q=128, heads_kv=32), 4096, sms)  # 128 rows a k/v head, fill 0.24
    assert not _decode.long_route(Call(seq_q=64, heads_kv=32, batch=8), 4096, sms)  # 64 rows a k/v head
    assert not _decode.long_route(Call(seq_q=32, batch=64), 4096, sms)  # a quarter of each tile
    assert not _decode.long_route(Call(num_splits=1), 16384, sms)
    assert not _decode.long_route(Call(dtype="float32"), 16384, sms)
    assert not _decode.long_route(Call(capacity=0), 0, sms)
    assert not _decode.long_route(Call(seq_q=0), 16384, sms)
    assert _decode.long_route(Call(dtype="bfloat16"), 16384, sms)


def test_long_chunks_on_the_mma_kernel(rng, monkeypatch):
    """With the Hopper kernel off (FASTATTN_CUDA_KERNEL=mma, as on other GPUs) a contiguous cache's long chunk
    runs on fa_fwd_mma; a paged one stays on the decode kernel (only fa_fwd_sm90 has the block-table loads)."""
    from fastattn.backends.cuda import _decode, _launch

    monkeypatch.setenv("FASTATTN_CUDA_KERNEL", "mma")
    monkeypatch.setattr(_decode, "_PLANS", {})
    monkeypatch.setattr(_launch, "_PLANS", {})
    seen = _count_long(monkeypatch)
    lens = np.array([0, 1, 333], np.int32)
    for cache in ("contiguous", "paged16"):
        cap, kc, vc, q, k, v, kg, vg, table_h = _long_case(rng, "float16", 200, cache, lens, hq=32, hkv=8)
        want, _, kc_want, _ = _reference(q, kc, vc, k, v, lens)
        out = fastattn.flash_attention_with_kvcache(_gpu(q), kg, vg, _gpu(k), _gpu(v), cache_seqlens=_gpu(lens),
                                                    block_table=None if table_h is None else _gpu(table_h))
        _check_out(_host(out), want, "float16", _plain(q, kc_want.astype(np.float16), _reference(
            q, kc, vc, k, v, lens)[3].astype(np.float16), lens + 200, "float16"))
        kh, _ = _cache_after(kg, vg, table_h, cap)
        np.testing.assert_array_equal(_bits(kh), _bits(kc_want.astype(np.float16)))
    assert seen == ["mma.sync"]
