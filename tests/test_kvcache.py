"""flash_attention_with_kvcache (decode and chunked prefill against a cache, contiguous or paged, with
the new tokens appended in place) and merge_attention, against the float64 reference on the
concatenated cache."""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from conftest import random_array, rel_error, require_backend

RTOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(params=["cpu", "reference"])
def backend(request) -> str:
    return require_backend(request.param)


def _cache(rng, batch, capacity, heads_kv, d, dtype, lens):
    """A (batch, capacity, heads_kv, d) cache whose rows past each length hold garbage (NaN)."""
    kc = random_array(rng, (batch, capacity, heads_kv, d), dtype)
    vc = random_array(rng, (batch, capacity, heads_kv, d), dtype)
    for b, n in enumerate(lens):
        kc[b, n:] = np.nan
        vc[b, n:] = np.nan
    return kc, vc


def _expected(q, kc, vc, total, *, causal=True, **kw):
    """Each sequence against its first total[b] keys, bottom-right causal, in float64."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(total[b])
        o, s = fastattn.flash_attention(q[b:b + 1].astype(np.float64), kc[b:b + 1, :n].astype(np.float64),
                                        vc[b:b + 1, :n].astype(np.float64), layout="bshd",
                                        causal="bottom_right" if causal else False, backend="reference",
                                        return_lse=True, **kw)
        outs.append(o)
        lses.append(s)
    return np.concatenate(outs), np.concatenate(lses)


def _close(out, want, dtype):
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(np.asarray(out, np.float64)), fin)
    assert rel_error(np.asarray(out, np.float64)[fin], want[fin]) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("seq_q", [1, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
def test_contiguous_cache_with_append(backend, rng, dtype, seq_q, heads):
    hq, hkv = heads
    lens = np.array([0, 15, 17, 100], np.int32)
    kc, vc = _cache(rng, 4, 140, hkv, 32, dtype, lens)
    q = random_array(rng, (4, seq_q, hq, 32), dtype)
    k, v = random_array(rng, (4, seq_q, hkv, 32), dtype), random_array(rng, (4, seq_q, hkv, 32), dtype)
    before = kc.copy()
    out, lse = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend=backend,
                                                     return_lse=True)
    # the cache holds the new tokens, in place, and nothing else changed
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(kc[b, n:n + seq_q], k[b])
        np.testing.assert_array_equal(vc[b, n:n + seq_q], v[b])
        np.testing.assert_array_equal(kc[b, :n], before[b, :n])
        assert np.isnan(kc[b, n + seq_q:].astype(np.float64)).all()
    want, want_lse = _expected(q, kc, vc, lens + seq_q)
    _close(out, want, dtype)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5 if dtype != "float64" else 1e-12, atol=2e-5)


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("seq_q", [1, 7])
def test_paged_equals_contiguous(backend, rng, block_size, seq_q):
    lens = np.array([1, 0, 1000, 33], np.int32)
    hkv, d = 2, 16
    capacity = 1040
    kc, vc = _cache(rng, 4, capacity, hkv, d, "float32", lens)
    blocks_per_seq = -(-capacity // block_size)
    num_blocks = 4 * blocks_per_seq + 5
    table = rng.permutation(num_blocks)[:4 * blocks_per_seq].reshape(4, blocks_per_seq).astype(np.int32)
    kp = np.full((num_blocks, block_size, hkv, d), np.nan, np.float32)
    vp = np.full((num_blocks, block_size, hkv, d), np.nan, np.float32)
    for b in range(4):
        for j in range(capacity):
            kp[table[b, j // block_size], j % block_size] = kc[b, j]
            vp[table[b, j // block_size], j % block_size] = vc[b, j]
    q = random_array(rng, (4, seq_q, 4, d))
    k, v = random_array(rng, (4, seq_q, hkv, d)), random_array(rng, (4, seq_q, hkv, d))
    out_c = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend=backend)
    out_p = fastattn.flash_attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table,
                                                  backend=backend)
    np.testing.assert_allclose(out_p, out_c, rtol=1e-6, atol=1e-6)
    for b in range(4):
        for t in range(seq_q):
            j = lens[b] + t
            np.testing.assert_array_equal(kp[table[b, j // block_size], j % block_size], k[b, t])


@pytest.mark.parametrize("kw", [dict(window=(8, 0)), dict(softcap=5.0), dict(causal=False),
                                dict(alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05], np.float32))])
def test_variants_against_a_cache(backend, rng, kw):
    lens = np.array([40, 7], np.int32)
    kc, vc = _cache(rng, 2, 64, 2, 16, "float64", lens)
    q = random_array(rng, (2, 5, 4, 16), "float64")
    k, v = random_array(rng, (2, 5, 2, 16), "float64"), random_array(rng, (2, 5, 2, 16), "float64")
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend=backend, **kw)
    causal = kw.pop("causal", True)
    want, _ = _expected(q, kc, vc, lens + 5, causal=causal, **kw)
    _close(out, want, "float64")


def test_bhsd_layout_and_int_lengths(backend, rng):
    kc = random_array(rng, (2, 4, 50, 8))
    vc = random_array(rng, (2, 4, 50, 8))
    q = random_array(rng, (2, 4, 1, 8))
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=30, layout="bhsd", backend=backend)
    want = fastattn.flash_attention(q, kc[:, :, :30], vc[:, :, :30], causal="bottom_right", backend="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 2, 7, None])
def test_num_splits_agree(backend, rng, splits):
    kc, vc = _cache(rng, 1, 3000, 2, 64, "float32", [2999])
    q = random_array(rng, (1, 1, 8, 64))
    one = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=2999, num_splits=1, backend=backend)
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=2999, num_splits=splits, backend=backend)
    np.testing.assert_allclose(out, one, rtol=2e-5, atol=1e-6)


def _untouched(call, *caches):
    copies = [c.copy() for c in caches]
    call()
    for c, before in zip(caches, copies, strict=True):
        np.testing.assert_array_equal(c, before)


@pytest.mark.parametrize("case", ["overflow", "negative", "heads", "dtype", "head_dim", "table", "table_shape",
                                  "k_without_v", "new_shape", "read_only"])
def test_bad_input_leaves_the_cache_untouched(backend, rng, case):
    kc, vc = random_array(rng, (2, 20, 2, 8)), random_array(rng, (2, 20, 2, 8))
    q = random_array(rng, (2, 3, 4, 8))
    k, v = random_array(rng, (2, 3, 2, 8)), random_array(rng, (2, 3, 2, 8))
    kw = dict(cache_seqlens=np.array([5, 17], np.int32), backend=backend)
    args = [q, kc, vc, k, v]
    error, match = ValueError, None
    if case == "overflow":
        match = "sequence 1 would hold 21 tokens"
        kw["cache_seqlens"] = np.array([5, 18], np.int32)
    elif case == "negative":
        match = "cache_seqlens must be >= 0"
        kw["cache_seqlens"] = np.array([5, -1], np.int32)
    elif case == "heads":
        match = "multiple"
        args[0] = random_array(rng, (2, 3, 3, 8))
    elif case == "dtype":
        error, match = TypeError, "one dtype"
        args[3] = k.astype(np.float64)
    elif case == "head_dim":
        match = "head_dim"
        args[0] = random_array(rng, (2, 3, 4, 6))
    elif case in ("table", "table_shape"):
        kp, vp = random_array(rng, (6, 8, 2, 8)), random_array(rng, (6, 8, 2, 8))
        args[1], args[2] = kp, vp
        kc, vc = kp, vp
        bad = np.array([[0, 1, 2], [3, 4, 9]], np.int32)
        kw["block_table"] = bad if case == "table" else np.zeros((3, 3), np.int32)
        match = "block_table\\[1, 2\\] = 9" if case == "table" else "block_table must be"
    elif case == "k_without_v":
        args[4] = None
        match = "both k and v"
    elif case == "new_shape":
        args[4] = random_array(rng, (2, 2, 2, 8))
        match = "v must be"
    elif case == "read_only":   # after a good call of the same shapes (the checked-call memo is warm)
        fastattn.flash_attention_with_kvcache(q, kc.copy(), vc.copy(), k, v, **kw)
        vc.flags.writeable = False
        match = "v_cache is read-only"
    with pytest.raises(error, match=match):
        _untouched(lambda: fastattn.flash_attention_with_kvcache(*args, **kw), kc, vc)
    # and nothing was written
    _untouched(lambda: None, kc, vc)


def test_lengths_past_int32_are_refused_before_any_write(rng):
    """A zero-stride cache of 2**40 tokens: 2**31 of them cached is beyond the kernels' 32-bit lengths."""
    kc = np.broadcast_to(np.zeros((1, 1, 1, 8), np.float32), (1, 2**40, 1, 8))
    q = random_array(rng, (1, 1, 2, 8))
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 tokens"):
        fastattn.flash_attention_with_kvcache(q, kc, kc, cache_seqlens=2**31)
    out = fastattn.flash_attention_with_kvcache(q, kc, kc, cache_seqlens=5000)
    assert np.all(out == 0)


def test_merge_attention_is_exact(rng):
    q = random_array(rng, (2, 3, 5, 16), "float64")
    k = random_array(rng, (2, 3, 70, 16), "float64")
    v = random_array(rng, (2, 3, 70, 16), "float64")
    full, full_lse = fastattn.flash_attention(q, k, v, return_lse=True)
    cuts = [0, 10, 11, 45, 70]
    outs, lses = zip(*(fastattn.flash_attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True)
                       for a, b in zip(cuts[:-1], cuts[1:], strict=True)), strict=True)
    out, lse = fastattn.merge_attention(list(outs), list(lses))
    np.testing.assert_allclose(out, full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, full_lse, rtol=1e-12)
    out2, lse2 = fastattn.merge_attention(np.stack(outs), np.stack(lses))
    np.testing.assert_array_equal(out2, out)
    # a part with no keys (lse -inf) changes nothing; all parts empty gives 0 and -inf
    empty_out, empty_lse = np.zeros_like(full), np.full_like(full_lse, -np.inf)
    out3, _ = fastattn.merge_attention([*outs, empty_out], [*lses, empty_lse])
    np.testing.assert_allclose(out3, full, rtol=1e-12, atol=1e-14)
    out4, lse4 = fastattn.merge_attention([empty_out, empty_out], [empty_lse, empty_lse])
    assert np.all(out4 == 0) and np.all(np.isneginf(lse4))
    with pytest.raises(ValueError, match="same length"):
        fastattn.merge_attention([full], [])


def test_generation_loop_matches_full_attention(rng):
    """A tiny transformer (random weights, 2 layers, GQA 4/2, greedy, 64 steps): the logits of each step
    with the KV cache equal those of the same model recomputed with full attention over the sequence."""
    vocab, dm, hq, hkv, hd, layers = 50, 32, 4, 2, 8, 2
    wq = [rng.standard_normal((dm, hq * hd)) / np.sqrt(dm) for _ in range(layers)]
    wk = [rng.standard_normal((dm, hkv * hd)) / np.sqrt(dm) for _ in range(layers)]
    wv = [rng.standard_normal((dm, hkv * hd)) / np.sqrt(dm) for _ in range(layers)]
    wo = [rng.standard_normal((hq * hd, dm)) / np.sqrt(hq * hd) for _ in range(layers)]
    emb = rng.standard_normal((vocab, dm))

    def forward_full(tokens):
        x = emb[tokens][None]  # (1, n, dm)
        for i in range(layers):
            q = (x @ wq[i]).reshape(1, -1, hq, hd)
            k = (x @ wk[i]).reshape(1, -1, hkv, hd)
            v = (x @ wv[i]).reshape(1, -1, hkv, hd)
            a = fastattn.flash_attention(q, k, v, causal=True, layout="bshd")
            x = x + a.reshape(1, -1, hq * hd) @ wo[i]
        return x[0, -1] @ emb.T

    caches = [(np.zeros((1, 80, hkv, hd)), np.zeros((1, 80, hkv, hd))) for _ in range(layers)]
    tokens = [3]
    for step in range(64):
        x = emb[tokens[-1:]][None]
        for i in range(layers):
            q = (x @ wq[i]).reshape(1, 1, hq, hd)
            k = (x @ wk[i]).reshape(1, 1, hkv, hd)
            v = (x @ wv[i]).reshape(1, 1, hkv, hd)
            a = fastattn.flash_attention_with_kvcache(q, *caches[i], k, v, cache_seqlens=step)
            x = x + a.reshape(1, 1, hq * hd) @ wo[i]
        logits = x[0, -1] @ emb.T
        np.testing.assert_allclose(logits, forward_full(np.array(tokens)), rtol=1e-10, atol=1e-10)
        tokens.append(int(np.argmax(logits)))


# ---- the CPU kernels: decode (cache read in place, split across threads) and the forward path for long chunks

@pytest.fixture(params=["avx512", "avx2", "generic"])
def simd(request):
    cpu = pytest.importorskip("fastattn.backends.cpu")
    if cpu.availability() is not None:
        pytest.skip(cpu.availability())
    if request.param not in cpu.simd_paths():
        pytest.skip(f"this CPU cannot run {request.param}")
    with cpu.set_simd(request.param):
        yield request.param


def _paged(rng, kc, vc, block_size, extra_blocks=3):
    """The same tokens in a shuffled paged cache; the blocks no table entry names hold NaN."""
    batch, capacity = kc.shape[:2]
    per = -(-capacity // block_size)
    num_blocks = batch * per + extra_blocks
    table = rng.permutation(num_blocks)[:batch * per].reshape(batch, per).astype(np.int32)
    kp = np.full((num_blocks, block_size, *kc.shape[2:]), np.nan, kc.dtype)
    vp = np.full((num_blocks, block_size, *vc.shape[2:]), np.nan, vc.dtype)
    for b in range(batch):
        for blk in range(per):
            rows = slice(blk * block_size, min(capacity, (blk + 1) * block_size))
            n = rows.stop - rows.start
            kp[table[b, blk], :n] = kc[b, rows]
            vp[table[b, blk], :n] = vc[b, rows]
    return kp, vp, table


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("heads,seq_q", [((8, 8), 1), ((32, 8), 1), ((8, 1), 2), ((4, 2), 8), ((4, 2), 9),
                                         ((8, 2), 16), ((16, 1), 8), ((16, 1), 9)])
@pytest.mark.parametrize("d", [128, 40, 3])
def test_cpu_decode_paths(simd, rng, dtype, heads, seq_q, d):
    """Every SIMD path, rows per k/v head on either side of the decode kernel's limits (16: several heads per
    item; 128: the forward kernel past it), head dims that are and are not a multiple of the vector width
    (read in place, or converted), contiguous and paged."""
    hq, hkv = heads
    lens = np.array([1, 15, 17, 300], np.int32)
    kc, vc = _cache(rng, 4, 320, hkv, d, dtype, lens)
    q = random_array(rng, (4, seq_q, hq, d), dtype)
    want, want_lse = _expected(q, kc, vc, lens)
    for paged in (False, True):
        args = (q, *_paged(rng, kc, vc, 16)[:2]) if paged else (q, kc, vc)
        table = _paged(rng, kc, vc, 16)[2] if paged else None
        if paged:
            kp, vp, table = _paged(rng, kc, vc, 16)
            args = (q, kp, vp)
        out, lse = fastattn.flash_attention_with_kvcache(*args, cache_seqlens=lens, block_table=table,
                                                         backend="cpu", return_lse=True)
        _close(out, want, dtype)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5 if dtype != "float64" else 1e-12, atol=2e-5)


@pytest.mark.parametrize("splits", [1, 2, 7, None])
@pytest.mark.parametrize("kw", [{}, dict(window=(100, 0)), dict(softcap=3.0),
                                dict(alibi_slopes=np.array([0.3, 0.1, 0.05, 0.01], np.float32))])
def test_cpu_splits_agree_with_the_reference(simd, rng, splits, kw):
    lens = np.array([0, 1, 999, 2000], np.int32)
    kc, vc = _cache(rng, 4, 2003, 2, 64, "float32", lens)
    q = random_array(rng, (4, 3, 4, 64))
    k, v = random_array(rng, (4, 3, 2, 64)), random_array(rng, (4, 3, 2, 64))
    out, lse = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, num_splits=splits,
                                                     backend="cpu", return_lse=True, **kw)
    want, want_lse = _expected(q, kc, vc, lens + 3, **kw)
    _close(out, want, "float32")
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=2e-5)
    for threads in (1, 2):
        again = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=lens + 3, num_splits=splits,
                                                      backend="cpu", num_threads=threads, **kw)
        np.testing.assert_array_equal(again, out)  # same splits: the thread count changes nothing


def test_cpu_masked_non_finite_values_never_reach_a_row(simd, rng):
    """A chunk of 5 queries (bottom-right causal) whose later keys hold inf in K and NaN in V: the queries
    that cannot see them stay finite, the others are NaN, as in the reference; 10 and 20 rows per k/v head
    (the decode kernel) and 160 (the forward kernel)."""
    for hq in (2, 4, 32):
        lens = np.array([37], np.int32)
        kc, vc = _cache(rng, 1, 48, 1, 16, "float32", lens + 5)
        kc[0, 40], vc[0, 39] = np.inf, np.nan  # seen by queries 2.. and 3.. of the chunk
        q = random_array(rng, (1, 5, hq, 16))
        out = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=lens + 5, backend="cpu")
        want, _ = _expected(q, kc, vc, lens + 5)
        assert np.isfinite(out[0, :2]).all() and np.isnan(out[0, 3:]).all()
        _close(out, want, "float32")


def test_cpu_decode_strided_views_and_huge_scores(simd, rng):
    """q and the cache as strided views of larger arrays (every axis), scores whose raw products overflow
    float32 (the kernel's rescaled retry), and a scale that makes them finite."""
    base_k = random_array(rng, (3, 70, 5, 2, 48))
    base_v = random_array(rng, (3, 70, 5, 2, 48))
    kc, vc = base_k[:, :, 1:4:2, 0, ::2], base_v[:, :, ::3, 1, 1::2]  # (3, 70, 2, 24), odd strides
    base_q = random_array(rng, (3, 2, 8, 50))
    q = base_q[:, :, ::2, 1::2][..., :24]  # (3, 2, 4, 24)
    lens = np.array([10, 69, 33], np.int32)
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="cpu")
    want, _ = _expected(np.ascontiguousarray(q), np.ascontiguousarray(kc), np.ascontiguousarray(vc), lens)
    _close(out, want, "float32")
    big_q = (q * 3e19).astype(np.float32)
    big_k = (np.ascontiguousarray(kc) * 3e19).astype(np.float32)
    out = fastattn.flash_attention_with_kvcache(big_q, big_k, vc, cache_seqlens=lens, scale=1e-38, backend="cpu")
    want, _ = _expected(big_q.astype(np.float64), big_k.astype(np.float64), vc, lens, scale=1e-38)
    _close(out, want, "float32")


def test_cpu_decode_from_many_threads(rng):
    """Concurrent calls from Python threads, each on its own cache, give each its own right answer."""
    require_backend("cpu")
    import concurrent.futures

    jobs = []
    for _ in range(8):
        lens = rng.integers(0, 500, 2).astype(np.int32)
        kc, vc = _cache(rng, 2, 512, 2, 32, "float32", lens)
        q = random_array(rng, (2, 1, 8, 32))
        jobs.append((q, kc, vc, lens))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda j: fastattn.flash_attention_with_kvcache(j[0], j[1], j[2], cache_seqlens=j[3],
                                                                            backend="cpu", num_splits=3), jobs))
    for (q, kc, vc, lens), out in zip(jobs, outs, strict=True):
        _close(out, _expected(q, kc, vc, lens)[0], "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_tensors_in_place_and_sdpa_with_an_explicit_mask(backend, rng, dtype):
    """torch CPU tensors in and out (the cache tensors hold the appended tokens afterwards), and the result
    equals PyTorch's SDPA given the equivalent explicit bottom-right mask."""
    torch = pytest.importorskip("torch")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    lens = [29, 3]
    seq_new = 6
    kc = torch.randn(2, 40, 2, 16, dtype=torch.float32).to(tdt)
    vc = torch.randn(2, 40, 2, 16, dtype=torch.float32).to(tdt)
    q = torch.randn(2, seq_new, 8, 16, dtype=torch.float32).to(tdt)
    k = torch.randn(2, seq_new, 2, 16, dtype=torch.float32).to(tdt)
    v = torch.randn(2, seq_new, 2, 16, dtype=torch.float32).to(tdt)
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=np.array(lens, np.int32),
                                                backend=backend)
    assert isinstance(out, torch.Tensor) and out.dtype == tdt and out.shape == (2, seq_new, 8, 16)
    for b, n in enumerate(lens):
        assert torch.equal(kc[b, n:n + seq_new], k[b]) and torch.equal(vc[b, n:n + seq_new], v[b])
        total = n + seq_new
        mask = torch.ones(seq_new, total, dtype=torch.bool).tril(diagonal=total - seq_new)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2).float(), kc[b:b + 1, :total].transpose(1, 2).float(),
            vc[b:b + 1, :total].transpose(1, 2).float(), attn_mask=mask, enable_gqa=True).transpose(1, 2)
        err = rel_error(out[b:b + 1].float().numpy(), want.numpy())
        assert err <= (2e-6 if dtype == "float32" else 1e-2), err


def test_paged_block_size_256_and_an_unused_table_tail(rng):
    """block_size 256, table entries past what a sequence needs holding garbage (never read)."""
    require_backend("cpu")
    lens = np.array([300, 1, 0], np.int32)
    kc, vc = _cache(rng, 3, 600, 2, 32, "float32", lens)
    kp, vp, table = _paged(rng, kc, vc, 256)
    for b, n in enumerate(lens):
        table[b, -(-(n + 1) // 256):] = -7  # not a block: fine where no token needs it
    q = random_array(rng, (3, 1, 4, 32))
    k, v = random_array(rng, (3, 1, 2, 32)), random_array(rng, (3, 1, 2, 32))
    out = fastattn.flash_attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table,
                                                num_splits=2)
    kc[np.arange(3), lens], vc[np.arange(3), lens] = k[:, 0], v[:, 0]
    _close(out, _expected(q, kc, vc, lens + 1)[0], "float32")


def _paged_copy(kc, vc, block_size, rng):
    """The (batch, capacity, heads, d) caches as shuffled blocks of ``block_size`` tokens, and their table."""
    batch, capacity = kc.shape[:2]
    per = -(-capacity // block_size)
    table = rng.permutation(batch * per + 3)[:batch * per].reshape(batch, per).astype(np.int32)
    kp = np.full((batch * per + 3, block_size, *kc.shape[2:]), np.nan, kc.dtype)
    vp = np.full_like(kp, np.nan)
    for b in range(batch):
        for j in range(capacity):
            kp[table[b, j // block_size], j % block_size] = kc[b, j]
            vp[table[b, j // block_size], j % block_size] = vc[b, j]
    return kp, vp, table


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("lens_kind", ["int", "array"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_cpu_repeats_read_their_own_arrays_lengths_and_tables(rng, monkeypatch, paged, lens_kind, layout):
    """A decode loop of NumPy calls of one geometry: after the first call (checked in full) every repeat
    skips check_call, and each still reads its own q / k / v, its length and its table, appends in place
    and equals the reference on the grown cache."""
    require_backend("cpu")
    from fastattn import _kvcache

    batch, capacity, heads, d = 2, 70, (4, 2), 16
    n = 40
    kc, vc = _cache(rng, batch, capacity, heads[1], d, "float32", [n, n])
    kh, vh = kc.copy(), vc.copy()  # what the cache should hold, kept here in (batch, seq, heads, d)
    block_size = 8
    if paged:
        kp, vp, table = _paged_copy(kc, vc, block_size, rng)
    for step in range(6):
        q = random_array(rng, (batch, 1, heads[0], d))
        k, v = random_array(rng, (batch, 1, heads[1], d)), random_array(rng, (batch, 1, heads[1], d))
        lens = n if lens_kind == "int" else np.full(batch, n, np.int32)
        kw = dict(cache_seqlens=lens, layout=layout, backend="cpu")
        if paged:
            if step == 3:  # the blocks move: the table of this call is read, not the first one's
                kp2, vp2, table2 = _paged_copy(kh, vh, block_size, rng)
                kp[...], vp[...], table = kp2, vp2, table2
            caches = (kp, vp)
            kw["block_table"] = table.copy()
        else:
            caches = (kc, vc) if layout == "bshd" else (kc.swapaxes(1, 2), vc.swapaxes(1, 2))
        qa, ka, va = (x if layout == "bshd" else x.swapaxes(1, 2) for x in (q, k, v))
        with monkeypatch.context() as m:
            if step >= 2:
                m.setattr(_kvcache, "check_call", lambda *a, **k: pytest.fail("a repeat went the long way"))
            out = fastattn.flash_attention_with_kvcache(qa, *caches, ka, va, **kw)
        kh[:, n], vh[:, n] = k[:, 0], v[:, 0]
        n += 1
        want, _ = _expected(q, kh, vh, np.full(batch, n))
        _close(out if layout == "bshd" else out.swapaxes(1, 2), want, "float32")
    if paged:
        for b in range(batch):
            for j in range(n):
                np.testing.assert_array_equal(kp[table[b, j // block_size], j % block_size], kh[b, j])
    else:
        np.testing.assert_array_equal(kc[:, :n], kh[:, :n])
        np.testing.assert_array_equal(vc[:, :n], vh[:, :n])
    assert any(type(r).__name__ == "CacheRepeat" for r in _kvcache._FAST.values())


@pytest.mark.parametrize("case", ["overflow_int", "negative_int", "overflow_array", "negative_array", "table",
                                  "read_only"])
def test_cpu_repeats_refuse_bad_values_before_any_write(rng, case):
    """A repeat of a checked NumPy call refuses what the first call would, with the same message, before it
    appends anything."""
    require_backend("cpu")
    kc, vc = random_array(rng, (2, 20, 2, 8)), random_array(rng, (2, 20, 2, 8))
    q = random_array(rng, (2, 3, 4, 8))
    k, v = random_array(rng, (2, 3, 2, 8)), random_array(rng, (2, 3, 2, 8))
    kw: dict = dict(backend="cpu")
    if case == "table":
        kc, vc = random_array(rng, (6, 8, 2, 8)), random_array(rng, (6, 8, 2, 8))
        kw["block_table"] = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    good = 5 if case.endswith("_int") else np.array([5, 17 if case == "table" else 12], np.int32)
    for _ in range(2):  # checked in full, then remembered
        fastattn.flash_attention_with_kvcache(q, kc.copy(), vc.copy(), k, v, cache_seqlens=good, **kw)
    bad, match = good, None
    if case == "overflow_int":
        bad, match = 18, "would hold 21 tokens"
    elif case == "negative_int":
        bad, match = -1, "cache_seqlens must be >= 0"
    elif case == "overflow_array":
        bad, match = np.array([5, 18], np.int32), "sequence 1 would hold 21 tokens"
    elif case == "negative_array":
        bad, match = np.array([-2, 5], np.int32), "cache_seqlens must be >= 0"
    elif case == "table":
        kw["block_table"] = np.array([[0, 1, 2], [3, 4, 9]], np.int32)
        match = "block_table\\[1, 2\\] = 9"
    elif case == "read_only":
        vc.flags.writeable = False
        match = "v_cache is read-only"
    with pytest.raises(ValueError, match=match):
        _untouched(lambda: fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=bad, **kw), kc, vc)
    _untouched(lambda: None, kc, vc)


def test_cpu_repeats_follow_the_simd_path_and_threads_of_each_call(rng):
    """A repeat reads FASTATTN_SIMD / set_simd and num_threads at each call, as the full path does."""
    require_backend("cpu")
    from fastattn.backends import cpu

    kc, vc = _cache(rng, 1, 600, 2, 32, "float32", [600])
    q = random_array(rng, (1, 1, 8, 32))
    want = _expected(q, kc, vc, [600])[0]
    seen = []
    real = cpu._flash_cpu.decode

    def spy(*a, **kw):
        seen.append((kw["isa"], kw["num_threads"]))
        return real(*a, **kw)

    cpu._flash_cpu.decode = spy
    try:
        for path in cpu.simd_paths() * 2:
            with cpu.set_simd(path):
                _close(fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=600, num_splits=2,
                                                             num_threads=1), want, "float32")
    finally:
        cpu._flash_cpu.decode = real
    assert [s[0] for s in seen] == cpu.simd_paths() * 2
    assert all(s[1] == 1 for s in seen)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lens_kind", ["int", "tensor", "numpy"])
def test_torch_cpu_repeats_write_into_the_tensors_and_match_numpy(rng, monkeypatch, dtype, lens_kind):
    """A decode loop on torch CPU tensors goes through zero-copy NumPy views (its repeats the short way): the
    appended tokens land in the caller's tensors, each step equals the same call on NumPy arrays bit for bit,
    and a tensor that requires grad is still refused."""
    torch = pytest.importorskip("torch")
    require_backend("cpu")
    from fastattn import _kvcache

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kc = torch.randn(2, 30, 2, 16).to(tdt)
    vc = torch.randn(2, 30, 2, 16).to(tdt)
    kn, vn = (x.clone() for x in (kc, vc))
    as_np = (lambda x: x.float().numpy()) if dtype == "float32" else (
        lambda x: x.view(torch.int16).numpy().view(__import__("ml_dtypes").bfloat16))
    n = 10
    for step in range(4):
        q, k, v = torch.randn(2, 1, 8, 16).to(tdt), torch.randn(2, 1, 2, 16).to(tdt), torch.randn(2, 1, 2, 16).to(tdt)
        lens = {"int": n, "tensor": torch.full((2,), n, dtype=torch.int32),
                "numpy": np.full(2, n, np.int32)}[lens_kind]
        with monkeypatch.context() as m:
            if step >= 2:
                m.setattr(_kvcache, "check_call", lambda *a, **k: pytest.fail("a repeat went the long way"))
            out, lse = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, return_lse=True)
        assert isinstance(out, torch.Tensor) and out.dtype == tdt and isinstance(lse, torch.Tensor)
        want, want_lse = fastattn.flash_attention_with_kvcache(as_np(q), as_np(kn), as_np(vn), as_np(k), as_np(v),
                                                               cache_seqlens=n, return_lse=True)
        kn[:, n], vn[:, n] = k[:, 0], v[:, 0]
        assert torch.equal(kc, kn) and torch.equal(vc, vn)
        np.testing.assert_array_equal(as_np(out), want)
        np.testing.assert_array_equal(lse.numpy(), want_lse)
        n += 1
    with pytest.raises(TypeError, match="requires grad"):
        fastattn.flash_attention_with_kvcache(q.float().requires_grad_(), kc.float(), vc.float(), cache_seqlens=n)
