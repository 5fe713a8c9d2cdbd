"""Attention as models call it: GQA/MQA, head_dim_v != head_dim, the (batch, seq, heads, dim) layout,
causal alignment, sliding windows, softcap, ALiBi, boolean masks and additive biases, padded ragged
batches and packed (varlen) sequences, alone and combined, on every backend against the float64
reference.  The reference itself is checked against an explicit element-by-element statement of the
rules below (no shared code with fastattn._masks) and against PyTorch SDPA where it is installed.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from conftest import dtype_of, random_array, rel_error, require_backend

BACKENDS = ["cpu", "reference"]
RTOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require_backend(request.param)


# ---------------------------------------------------------------------------------------------
# an explicit statement of the rules, element by element (independent of fastattn._masks)


def explicit_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, slopes=None, mask=None,
                       lens_q=None, lens_kv=None, scale=None):
    """q (B, Hq, Sq, D), k (B, Hkv, Skv, D), v (B, Hkv, Skv, Dv) in float64; loops over every element."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    bsz, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((bsz, hq, sq, v.shape[3]))
    lse = np.full((bsz, hq, sq), -np.inf)
    for b in range(bsz):
        lq = sq if lens_q is None else int(lens_q[b])
        lk = skv if lens_kv is None else int(lens_kv[b])
        off = lk - lq if causal == "bottom_right" else 0
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(lq):
                logits, values = [], []
                for j in range(lk):
                    if causal and j > i + off:
                        continue
                    if window[0] >= 0 and j < i + off - window[0]:
                        continue
                    if window[1] >= 0 and j > i + off + window[1]:
                        continue
                    m = None if mask is None else mask[b, h, i, j]
                    if m is not None and m.dtype == bool and not m:
                        continue
                    s = scale * float(q[b, h, i] @ k[b, hk, j])
                    if softcap > 0:
                        s = softcap * np.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[b, h] * abs(i + lk - lq - j)
                    if m is not None and m.dtype != bool:
                        s += float(m)
                    logits.append(s)
                    values.append(v[b, hk, j])
                if not logits:
                    continue
                logits = np.array(logits)
                mx = logits.max()
                w = np.exp(logits - mx)
                out[b, h, i] = (w[:, None] * np.array(values)).sum(0) / w.sum()
                lse[b, h, i] = mx + np.log(w.sum())
    return out, lse


def _mask4(mask, shape4):
    return None if mask is None else np.broadcast_to(np.asarray(mask), shape4)


@pytest.mark.parametrize("case", range(8))
def test_reference_matches_the_explicit_rules(case):
    rng = np.random.default_rng(100 + case)
    bsz, hq, hkv, sq, skv, d, dv = 2, 4, 2, int(rng.integers(1, 9)), int(rng.integers(1, 11)), 5, 3
    q, k, v = rng.standard_normal((bsz, hq, sq, d)), rng.standard_normal((bsz, hkv, skv, d)), \
        rng.standard_normal((bsz, hkv, skv, dv))
    causal = [False, True, "bottom_right"][case % 3]
    window = [(-1, -1), (2, 1), (0, 3), (3, -1)][case % 4]
    softcap = [0.0, 1.5][case % 2]
    slopes = rng.uniform(0.1, 1.0, (bsz, hq)).astype(np.float32) if case % 3 == 1 else None
    mask = None
    if case % 4 == 2:
        mask = rng.random((1, hq, sq, skv)) < 0.7
    elif case % 4 == 3:
        mask = rng.standard_normal((bsz, 1, 1, skv))
    lens_q = rng.integers(0, sq + 1, bsz) if case >= 4 else None
    lens_kv = rng.integers(0, skv + 1, bsz) if case >= 4 else None
    out, lse = fastattn.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes,
                                        attn_mask=mask, seqlens_q=lens_q, seqlens_kv=lens_kv, backend="reference",
                                        return_lse=True)
    want_out, want_lse = explicit_attention(q, k, v, causal=causal, window=window, softcap=softcap,
                                            slopes=None if slopes is None else slopes.astype(np.float64),
                                            mask=_mask4(mask, (bsz, hq, sq, skv)), lens_q=lens_q, lens_kv=lens_kv)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# every backend against the reference


def check(backend, q, k, v, *, dtype, call=fastattn.flash_attention, **kw):
    """``call`` on ``backend`` and on the float64 reference with the same arguments: out and lse close."""
    out, lse = call(q, k, v, backend=backend, return_lse=True, **kw)
    up = [np.asarray(x).astype(np.float64) for x in (q, k, v)]
    ref_out, ref_lse = call(*up, backend="reference", return_lse=True, **kw)
    assert out.shape == ref_out.shape and out.dtype == np.dtype(dtype_of(dtype))
    assert lse.shape == ref_lse.shape and lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    out64, lse64 = np.asarray(out).astype(np.float64), np.asarray(lse).astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(out64), np.isfinite(ref_out))
    np.testing.assert_array_equal(np.isneginf(lse64), np.isneginf(ref_lse))
    fin = np.isfinite(ref_out)
    err = rel_error(out64[fin], ref_out[fin])
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]:.1e}"
    ok = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse64[ok], ref_lse[ok], rtol=1e-6 if dtype != "float64" else 1e-12,
                               atol=2e-5 if dtype != "float64" else 1e-12)
    return out, lse


DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _qkv(rng, b, hq, hkv, sq, skv, d, dv, dtype, layout="bhsd"):
    shapes = [(b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, dv)]
    if layout == "bshd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    return tuple(random_array(rng, s, dtype) for s in shapes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1), (8, 2)])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_gqa(backend, rng, dtype, hq, hkv, causal):
    q, k, v = _qkv(rng, 2, hq, hkv, 37, 53, 16, 16, dtype)
    check(backend, q, k, v, dtype=dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("sq,skv,hq,hkv", [(1, 300, 4, 4), (2, 77, 6, 2), (4, 513, 8, 1), (3, 6, 2, 2)])
@pytest.mark.parametrize("extra", [
    {}, {"causal": True}, {"causal": "bottom_right"}, {"causal": "bottom_right", "window": (20, 0)},
    {"window": (5, 3)}, {"softcap": 2.0, "causal": True}, {"alibi": True}, {"alibi": True, "causal": "bottom_right"},
], ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()) or "plain")
def test_short_rows_take_the_decode_kernel(backend, rng, dtype, layout, sq, skv, hq, hkv, extra):
    """A few query rows per k/v head against more keys (a decode step through flash_attention) run the
    decode kernel on the CPU (it reports its 32-key tiles) wherever its bottom-right rule can state the
    call's mask, and the forward kernel where it cannot (a top-left window with seq_q < seq_kv); the
    same answers either way, every alignment, window, softcap and ALiBi, GQA and both layouts."""
    q, k, v = _qkv(rng, 2, hq, hkv, sq, skv, 24, 24, dtype, layout)
    kw = dict(extra)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = rng.uniform(0.05, 0.5, (2, hq)).astype(np.float32)
    check(backend, q, k, v, dtype=dtype, layout=layout, **kw)
    if backend == "cpu":
        cfg = fastattn.FlashAttentionConfig(head_dim=24, num_heads=hq, num_kv_heads=hkv, layout=layout,
                                            **{n: x for n, x in kw.items() if n != "alibi_slopes"})
        res = fastattn.FlashAttention(cfg, backend="cpu").forward_multi_head(q, k, v,
                                                                            alibi_slopes=kw.get("alibi_slopes"))
        top_left_window = "window" in kw and kw.get("causal") != "bottom_right"
        decode = sq * hq // hkv <= 16 and skv >= 2 * sq and not top_left_window
        assert (res.block_size_kv == 32 and res.block_size_q == sq * hq // hkv) == decode, res


@pytest.mark.parametrize("d,dv", [(16, 8), (8, 24), (192, 128), (64, 1), (3, 80)])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_value_head_dim_differs(backend, rng, d, dv, dtype):
    q, k, v = _qkv(rng, 1, 2, 2, 29, 41, d, dv, dtype)
    out, _ = check(backend, q, k, v, dtype=dtype, causal=True)
    assert out.shape == (1, 2, 29, dv)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bshd_layout(backend, rng, rank, causal, dtype):
    q, k, v = _qkv(rng, 2, 4, 2, 33, 47, 16, 16, dtype, layout="bshd")
    if rank == 3:
        q, k, v = q[0], k[0], v[0]
    out, lse = check(backend, q, k, v, dtype=dtype, causal=causal, layout="bshd")
    assert out.shape == q.shape
    if isinstance(out, np.ndarray) and backend != "reference":
        assert out.flags.c_contiguous, "output in the caller's layout, contiguous"
    # the same as the (batch, heads, seq, head_dim) call on transposed arrays
    def t(x):
        return x.swapaxes(-2, -3)

    out2, lse2 = fastattn.flash_attention(t(q), t(k), t(v), causal=causal, backend=backend, return_lse=True)
    np.testing.assert_array_equal(t(out2), out)
    np.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("sq,skv", [(3, 5), (5, 3), (1, 64), (64, 1), (17, 17), (40, 100), (100, 40)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bottom_right_alignment(backend, rng, sq, skv, dtype):
    q, k, v = _qkv(rng, 1, 2, 2, sq, skv, 8, 8, dtype)
    out, lse = check(backend, q, k, v, dtype=dtype, causal="bottom_right")
    # rows that see no key (seq_q > seq_kv: the first seq_q - seq_kv rows) give 0 and -inf
    empty = max(sq - skv, 0)
    assert np.all(out[..., :empty, :] == 0) and np.all(np.isneginf(lse[..., :empty]))


@pytest.mark.parametrize("window", [(0, 0), (3, 0), (0, 5), (7, 7), (16, -1), (-1, 4), (100, 100)])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("sq,skv", [(65, 65), (30, 90), (90, 30)])
def test_sliding_window(backend, rng, window, causal, sq, skv):
    q, k, v = _qkv(rng, 1, 2, 1, sq, skv, 16, 16, "float32")
    check(backend, q, k, v, dtype="float32", causal=causal, window=window, block_size_q=16, block_size_kv=16)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0, 1e6])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_softcap(backend, rng, softcap, dtype):
    q, k, v = _qkv(rng, 1, 2, 2, 31, 45, 16, 16, dtype)
    q = (q.astype(np.float64) * 4).astype(q.dtype)  # logits of several units: the cap matters
    check(backend, q, k, v, dtype=dtype, causal=True, softcap=softcap)


@pytest.mark.parametrize("shape", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
def test_alibi(backend, rng, shape, causal):
    q, k, v = _qkv(rng, 2, 4, 2, 23, 37, 8, 8, "float32")
    slopes = (2.0 ** -np.arange(1, 5)).astype(np.float32)
    if shape == "batch_heads":
        slopes = np.stack([slopes, slopes[::-1]])
    check(backend, q, k, v, dtype="float32", causal=causal, alibi_slopes=slopes)


MASK_SHAPES = [(19, 29), (1, 29), (2, 1, 19, 29), (1, 4, 1, 29), (2, 4, 19, 29), (4, 19, 1)]


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask(backend, rng, mask_shape, kind, causal):
    q, k, v = _qkv(rng, 2, 4, 2, 19, 29, 8, 8, "float32")
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.6
    else:
        mask = (rng.standard_normal(mask_shape) * 2).astype(dtype_of(kind))
    check(backend, q, k, v, dtype="float32", causal=causal, attn_mask=mask)


@pytest.mark.parametrize("spans", [
    [(0, 29), (0, 29)],          # all True
    [(0, 20), (0, 7)],           # padding at the end (what tokenizers give)
    [(9, 29), (3, 29)],          # padding at the start
    [(4, 17), (0, 0)],           # an inner interval; a sequence with no key
], ids=["full", "end", "start", "inner-empty"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"causal": "bottom_right"}, {"window": (5, 3)},
                                   {"softcap": 3.0}, {"alibi": True}, {"scale": 1e-3}],
                         ids=["plain", "causal", "bottom_right", "window", "softcap", "alibi", "scale"])
def test_key_padding_mask_intervals(backend, rng, spans, per_head, extra):
    """Key-padding masks whose True entries form one interval (the bounds carry them, no per-score
    hook) and masks where the heads of a k/v group differ; NaN in the padded keys never leaks."""
    q, k, v = _qkv(rng, 2, 4, 2, 19, 29, 8, 8, "float32")
    heads = 4 if per_head else 1
    mask = np.zeros((2, heads, 1, 29), bool)
    for b, (lo, hi) in enumerate(spans):
        mask[b, :, :, lo:hi] = True
    if per_head:
        mask[1, 3, :, :] = False   # one head of the second k/v group sees nothing
        mask[0, 1, :, 2] = True    # heads 0/1 of a group differ: not one interval for both
    v[~mask.any(axis=(1, 2))[:, None, :, None].repeat(2, axis=1).repeat(8, axis=3)] = np.nan
    kw = dict(extra)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = (2.0 ** -np.arange(1, 5)).astype(np.float32)
    out, _ = check(backend, q, k, v, dtype="float32", attn_mask=mask, **kw)
    assert np.all(np.isfinite(np.asarray(out, np.float64)))


def test_bool_mask_that_hides_everything_gives_zero_rows(backend, rng):
    q, k, v = _qkv(rng, 1, 1, 1, 5, 7, 4, 4, "float32")
    mask = np.ones((5, 7), bool)
    mask[2] = False
    out, lse = check(backend, q, k, v, dtype="float32", attn_mask=mask)
    assert np.all(out[0, 0, 2] == 0) and np.isneginf(lse[0, 0, 2])


def test_float_mask_minus_inf_is_a_mask(backend, rng):
    q, k, v = _qkv(rng, 1, 2, 2, 9, 11, 4, 4, "float64")
    bias = np.zeros((9, 11))
    bias[:, 5:] = -np.inf
    out = fastattn.flash_attention(q, k, v, attn_mask=bias, backend=backend)
    want = fastattn.flash_attention(q, k[..., :5, :], v[..., :5, :], backend="reference")
    np.testing.assert_allclose(out, want, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_padded_ragged_batch(backend, rng, causal, dtype):
    q, k, v = _qkv(rng, 4, 4, 2, 40, 50, 16, 16, dtype)
    lens_q = np.array([40, 0, 17, 1], np.int32)
    lens_kv = np.array([50, 9, 0, 33], np.int64)
    out, lse = check(backend, q, k, v, dtype=dtype, causal=causal, seqlens_q=lens_q, seqlens_kv=lens_kv)
    # padding rows give 0 and -inf; each entry equals its own unpadded call
    for b in range(4):
        assert np.all(np.asarray(out[b, :, lens_q[b]:], np.float64) == 0)
        assert np.all(np.isneginf(lse[b, :, lens_q[b]:]))
        if lens_q[b] and lens_kv[b]:
            own = fastattn.flash_attention(q[b, :, :lens_q[b]], k[b, :, :lens_kv[b]], v[b, :, :lens_kv[b]],
                                           causal=causal, backend=backend)
            np.testing.assert_allclose(np.asarray(out[b, :, :lens_q[b]], np.float64), np.asarray(own, np.float64),
                                       rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_varlen_packed(backend, rng, causal, hq, hkv, dtype):
    lens_q, lens_kv = [5, 0, 33, 1, 64], [7, 3, 33, 0, 100]
    cu_q, cu_kv = np.cumsum([0, *lens_q]).astype(np.int32), np.cumsum([0, *lens_kv]).astype(np.int32)
    q = random_array(rng, (cu_q[-1], hq, 16), dtype)
    k = random_array(rng, (cu_kv[-1], hkv, 16), dtype)
    v = random_array(rng, (cu_kv[-1], hkv, 8), dtype)

    def call(q, k, v, **kw):
        return fastattn.flash_attention_varlen(q, k, v, cu_q, cu_kv, causal=causal, **kw)

    out, lse = check(backend, q, k, v, dtype=dtype, call=call)
    assert out.shape == (cu_q[-1], hq, 8) and lse.shape == (hq, cu_q[-1])
    for b in range(5):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_kv[b], cu_kv[b + 1])
        own = fastattn.flash_attention(q[rq], k[rk], v[rk], causal=causal, layout="bshd", backend="reference")
        np.testing.assert_allclose(np.asarray(out[rq], np.float64), np.asarray(own, np.float64),
                                   rtol=RTOL[dtype], atol=RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# combinations


FEATURES = {
    "gqa": dict(),
    "bottom_right": dict(causal="bottom_right"),
    "window": dict(window=(5, 2)),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32)),
    "bool_mask": dict(attn_mask=np.tri(23, 31, 10, dtype=bool)),
    "bias": dict(attn_mask=np.linspace(-2, 2, 23 * 31).reshape(23, 31)),
    "ragged": dict(seqlens_q=np.array([23, 11]), seqlens_kv=np.array([9, 31])),
    "dropout": dict(dropout_p=0.3, seed=7),
}


@pytest.mark.parametrize("pair", list(itertools.combinations(FEATURES, 2)), ids="+".join)
def test_pairs_of_variants(backend, rng, pair):
    kw = {}
    for name in pair:
        kw.update(FEATURES[name])
    hkv = 1 if "gqa" in pair else 4
    q, k, v = _qkv(rng, 2, 4, hkv, 23, 31, 8, 8, "float32")
    if kw.get("causal") is None and "window" not in pair:
        kw["causal"] = True
    check(backend, q, k, v, dtype="float32", **kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_combinations(backend, data):
    draw = data.draw
    bsz, hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sq, skv = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    d, dv = draw(st.sampled_from([1, 3, 8, 19, 64])), draw(st.sampled_from([1, 5, 8, 33]))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    q, k, v = _qkv(rng, bsz, hkv * group, hkv, sq, skv, d, dv, "float64", layout=layout)
    kw = dict(causal=draw(st.sampled_from([False, True, "bottom_right"])), layout=layout,
              window=draw(st.sampled_from([(-1, -1), (0, 0), (4, 1), (-1, 9), (20, -1)])),
              softcap=draw(st.sampled_from([0.0, 0.7, 10.0])),
              block_size_q=draw(st.sampled_from([None, 1, 7, 32])), block_size_kv=draw(st.sampled_from([None, 5, 16])))
    if draw(st.booleans()):
        kw["alibi_slopes"] = rng.uniform(0, 1, (bsz, hkv * group)).astype(np.float32)
    mask_kind = draw(st.sampled_from(["none", "bool", "bias"]))
    if mask_kind == "bool":
        kw["attn_mask"] = rng.random((1, hkv * group, sq, skv)) < 0.5
    elif mask_kind == "bias":
        kw["attn_mask"] = rng.standard_normal((bsz, 1, 1, skv))
    if draw(st.booleans()):
        kw["seqlens_q"] = rng.integers(0, sq + 1, bsz)
        kw["seqlens_kv"] = rng.integers(0, skv + 1, bsz)
    if draw(st.booleans()):
        kw.update(dropout_p=0.25, seed=int(rng.integers(0, 2**32)))
    check(backend, q, k, v, dtype="float64", **kw)


# ---------------------------------------------------------------------------------------------
# FLOPs count what the mask lets through


def test_flops_count_the_attended_pairs(backend, rng):
    q, k, v = _qkv(rng, 2, 4, 2, 30, 40, 16, 8, "float32")
    cfg = fastattn.FlashAttentionConfig(head_dim=16, num_heads=4, num_kv_heads=2, head_dim_v=8, window=(3, 2))
    res = fastattn.FlashAttention(cfg, backend).forward_multi_head(q, k, v)
    lo = np.maximum(np.arange(30) - 3, 0)
    hi = np.minimum(np.arange(30) + 3, 40)
    assert res.flops == 2 * (16 + 8) * int((hi - lo).sum()) * 2 * 4
    mask = rng.random((30, 40)) < 0.5
    res = fastattn.FlashAttention(cfg.with_causal(False), backend).forward_multi_head(q, k, v, attn_mask=mask)
    band = (np.arange(40)[None] >= lo[:, None]) & (np.arange(40)[None] < hi[:, None])
    assert res.flops == 2 * (16 + 8) * int((mask & band).sum()) * 2 * 4


@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, False), (True, True), (False, True)])
def test_attended_pairs_closed_form_counts_every_row(causal, bottom_right):
    """The O(1) pair count (pieces of an arithmetic series) against the rows' intervals, counted one by one."""
    from fastattn._masks import MaskRule, attended_pairs

    def counted(rule, lq, lk):
        lo, hi = rule.key_range(np.arange(max(lq, 0)), lq, lk)
        return int((hi - lo).sum()) if lq > 0 and lk > 0 else 0

    for left, right in itertools.product(range(-1, 5), range(-1, 5)):
        rule = MaskRule(causal=causal, bottom_right=bottom_right, window_left=left, window_right=right)
        for lq, lk in itertools.product(range(0, 10), range(0, 10)):
            assert attended_pairs(rule, lq, lk) == counted(rule, lq, lk), (rule, lq, lk)
    draw = np.random.default_rng(7)
    for _ in range(200):
        left, right = (int(x) if x >= 0 else -1 for x in draw.integers(-300, 3000, 2))
        lq, lk = (int(x) for x in draw.integers(1, 5000, 2))
        rule = MaskRule(causal=causal, bottom_right=bottom_right, window_left=left, window_right=right)
        assert attended_pairs(rule, lq, lk) == counted(rule, lq, lk), (rule, lq, lk)


# ---------------------------------------------------------------------------------------------
# PyTorch SDPA on the same call (where installed)


def test_against_pytorch_sdpa(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v = _qkv(rng, 2, 8, 2, 37, 45, 32, 32, "float32")
    bias = rng.standard_normal((2, 1, 37, 45)).astype(np.float32)
    keep = rng.random((37, 45)) < 0.7
    keep[:, 0] = True
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    for mask in (torch.from_numpy(bias), torch.from_numpy(keep)):
        want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True).numpy()
        got = fastattn.flash_attention(q, k, v, attn_mask=mask.numpy())
        assert rel_error(got, want) < 2e-5
    # bottom-right causal = a boolean tril shifted by seq_kv - seq_q
    shifted = np.tril(np.ones((37, 45), bool), k=45 - 37)
    want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(shifted), enable_gqa=True).numpy()
    assert rel_error(fastattn.flash_attention(q, k, v, causal="bottom_right"), want) < 2e-5
    # top-left causal = PyTorch's is_causal
    want = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True).numpy()
    assert rel_error(fastattn.flash_attention(q, k, v, causal=True), want) < 2e-5


@pytest.mark.parametrize("d,dv", [(576, 512), (1024, 1024), (1000, 7), (7, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_head_dims(backend, rng, d, dv, causal):
    """Latent-attention decode shapes (576 / 512) and the rest up to 1024."""
    q, k, v = _qkv(rng, 1, 4, 1, 5, 300, d, dv, "float32")
    check(backend, q, k, v, dtype="float32", causal="bottom_right" if causal else False)
