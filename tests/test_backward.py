"""The backward pass: flash_attention_backward against the float64 reference's analytic gradients.

The reference (``backends.reference.materialized_backward``) is itself checked against torch autograd
through a float64 materialized attention (written here with the same mask rules), for every feature.
Each backend is then compared with the reference over dtype x feature x odd shapes; half precision by
FlashAttention's rule (at most 2x the error of a naive same-precision implementation, plus a small
absolute term).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn import backends
from fastattn._dropout import keep_mask
from fastattn._masks import MaskRule, allowed_and_bias
from fastattn._validate import numpy_dtype

from conftest import rel_error

HAS_CPU = backends.get_backend("cpu").availability() is None
BACKENDS = ["cpu"] if HAS_CPU else []


def _inputs(rng, b, h, hk, sq, sk, d, dv, dtype="float64", layout="bhsd"):
    def arr(heads, s, dim):
        shape = (b, heads, s, dim) if layout == "bhsd" else (b, s, heads, dim)
        return rng.standard_normal(shape).astype(numpy_dtype(dtype))

    return arr(h, sq, d), arr(hk, sk, d), arr(hk, sk, dv), arr(h, sq, dv)


#: feature name -> options of flash_attention (arrays built per shape by _feature_options)
FEATURES = ["plain", "causal", "bottom_right", "window", "window_causal", "softcap", "alibi", "bias", "bool_mask",
            "key_padding", "dropout", "seqlens", "scale"]


def _feature_options(name, rng, b, h, sq, sk):
    if name == "plain":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "bottom_right":
        return {"causal": "bottom_right"}
    if name == "window":
        return {"window": (3, 2)}
    if name == "window_causal":
        return {"causal": "bottom_right", "window": (5, 0)}
    if name == "softcap":
        return {"softcap": 0.8, "causal": True}
    if name == "alibi":
        return {"alibi_slopes": rng.uniform(0.05, 0.5, (b, h)).astype(np.float32)}
    if name == "bias":
        return {"attn_mask": rng.standard_normal((1, h, sq, sk)).astype(np.float32)}
    if name == "bool_mask":
        return {"attn_mask": rng.random((b, h, sq, sk)) > 0.3}
    if name == "key_padding":
        mask = np.ones((b, 1, 1, sk), dtype=bool)
        mask[0, ..., sk // 2:] = False
        return {"attn_mask": mask}
    if name == "dropout":
        return {"dropout_p": 0.25, "seed": 1234}
    if name == "seqlens":
        return {"seqlens_q": np.array([max(sq - 3, 0)] + [sq] * (b - 1), np.int32),
                "seqlens_kv": np.array([max(sk // 2, 1)] + [sk] * (b - 1), np.int32)}
    if name == "scale":
        return {"scale": 0.37}
    raise AssertionError(name)


def _torch_grads(q, k, v, dout, opts):
    """Gradients by torch autograd through a float64 materialized attention (4-D bhsd inputs)."""
    torch = pytest.importorskip("torch")
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    tq, tk, tv = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
    mask = opts.get("attn_mask")
    tbias = torch.tensor(np.asarray(mask, np.float64), requires_grad=True) if mask is not None and mask.dtype != bool \
        else None
    kk, vv = tk.repeat_interleave(h // hk, 1), tv.repeat_interleave(h // hk, 1)
    scale = opts.get("scale", 1 / np.sqrt(d))
    s = tq @ kk.transpose(-1, -2) * scale
    if opts.get("softcap"):
        s = opts["softcap"] * torch.tanh(s / opts["softcap"])
    causal = opts.get("causal", False)
    left, right = opts.get("window", (-1, -1))
    rule = MaskRule(causal=bool(causal), bottom_right=causal == "bottom_right", window_left=left, window_right=right)
    allowed = torch.tensor(allowed_and_bias(rule, sq, sk)[0])[None, None].expand(b, h, sq, sk).clone()
    if "alibi_slopes" in opts:
        rel = (torch.arange(sq)[:, None] + (sk - sq) - torch.arange(sk)[None, :]).abs().double()
        slopes = torch.tensor(np.asarray(opts["alibi_slopes"], np.float64)).reshape(-1, h)
        s = s - slopes[:, :, None, None] * rel
    if mask is not None and mask.dtype == bool:
        allowed &= torch.tensor(np.broadcast_to(mask, (b, h, sq, sk)).copy())
    elif tbias is not None:
        s = s + tbias
    s = s.masked_fill(~allowed, -float("inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if opts.get("dropout_p"):
        keep = np.stack([np.stack([keep_mask(opts["seed"], opts["dropout_p"], bi, hi, sq, sk) for hi in range(h)])
                         for bi in range(b)])
        p = p * torch.tensor(keep) / (1 - opts["dropout_p"])
    out = p @ vv
    out.backward(torch.tensor(np.asarray(dout, np.float64)))
    grads = [tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()]
    if tbias is not None:
        grads.append(tbias.grad.numpy())
    return out.detach().numpy(), grads


@pytest.mark.parametrize("feature", [f for f in FEATURES if f != "seqlens"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 9, 5, 3), (1, 3, 3, 13, 6, 8, 8), (2, 2, 1, 1, 11, 4, 6)])
def test_reference_gradients_match_torch_autograd(feature, shape):
    rng = np.random.default_rng(7)
    b, h, hk, sq, sk, d, dv = shape
    q, k, v, dout = _inputs(rng, b, h, hk, sq, sk, d, dv)
    opts = _feature_options(feature, rng, b, h, sq, sk)
    out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="reference", **opts)
    want_dbias = feature == "bias"
    grads = fastattn.flash_attention_backward(dout, q, k, v, out, lse, backend="reference",
                                              return_dbias=want_dbias, **opts)
    t_out, t_grads = _torch_grads(q, k, v, dout, opts)
    np.testing.assert_allclose(out, t_out, atol=1e-12)
    assert len(grads) == len(t_grads)
    for ours, theirs in zip(grads[:3], t_grads[:3], strict=True):
        assert ours.shape == theirs.shape and ours.dtype == np.float64
        np.testing.assert_allclose(ours, theirs, atol=1e-12, rtol=1e-10)
    if want_dbias:  # in the mask's dtype (float32)
        assert grads[3].dtype == np.float32 and grads[3].shape == t_grads[3].shape
        np.testing.assert_allclose(grads[3], t_grads[3], atol=1e-7, rtol=1e-6)


def test_gqa_gradients_are_the_repeated_heads_summed():
    rng = np.random.default_rng(3)
    q, k, v, dout = _inputs(rng, 2, 6, 2, 9, 12, 8, 8)
    out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="reference", causal=True)
    dq, dk, dv = fastattn.flash_attention_backward(dout, q, k, v, out, lse, backend="reference", causal=True)
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    out_r, lse_r = fastattn.flash_attention(q, kr, vr, return_lse=True, backend="reference", causal=True)
    dq_r, dk_r, dv_r = fastattn.flash_attention_backward(dout, q, kr, vr, out_r, lse_r, backend="reference",
                                                         causal=True)
    np.testing.assert_allclose(dq, dq_r, atol=1e-13)
    np.testing.assert_allclose(dk, dk_r.reshape(2, 2, 3, 12, 8).sum(axis=2), atol=1e-13)
    np.testing.assert_allclose(dv, dv_r.reshape(2, 2, 3, 12, 8).sum(axis=2), atol=1e-13)


# --- bad input: a clear error before any work -------------------------------------------------------


def _call(**over):
    rng = np.random.default_rng(0)
    q, k, v, dout = _inputs(rng, 1, 2, 2, 5, 6, 4, 4, dtype="float32")
    out, lse = fastattn.flash_attention(q, k, v, return_lse=True)
    args = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    opts = {key: over.pop(key) for key in list(over) if key not in args}
    args.update(over)
    return fastattn.flash_attention_backward(args["dout"], args["q"], args["k"], args["v"], args["out"],
                                             args["lse"], **opts)


@pytest.mark.parametrize("over, exc, match", [
    (dict(dout=np.zeros((1, 2, 5, 3), np.float32)), ValueError, r"dout must have the forward's output shape"),
    (dict(out=np.zeros((1, 2, 5, 4), np.float64)), TypeError, r"out must have dtype float32"),
    (dict(lse=np.zeros((1, 2, 4), np.float32)), ValueError, r"lse must have the forward's lse shape \(1, 2, 5\)"),
    (dict(lse=np.zeros((1, 2, 5), np.float64)), TypeError, r"lse must have dtype float32"),
    (dict(dout=[1, 2]), TypeError, r"dout must be an array"),
    (dict(dropout_p=0.1), ValueError, r"needs the forward's seed"),
    (dict(return_dbias=True), ValueError, r"return_dbias=True needs a float attn_mask"),
    (dict(return_dbias=1), TypeError, r"return_dbias"),
    (dict(deterministic="yes"), TypeError, r"deterministic"),
    (dict(causal="diagonal"), ValueError, r"causal must be"),
])
def test_bad_backward_input_is_refused_by_name(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_dbias_is_reduced_over_the_masks_broadcast_axes():
    rng = np.random.default_rng(5)
    q, k, v, dout = _inputs(rng, 2, 3, 3, 6, 7, 4, 4)
    full = None
    for shape in [(2, 3, 6, 7), (1, 3, 6, 7), (3, 6, 7), (2, 1, 1, 7), (7,), (6, 1)]:
        bias = rng.standard_normal(shape).astype(np.float32)
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="reference", attn_mask=bias)
        *_, dbias = fastattn.flash_attention_backward(dout, q, k, v, out, lse, backend="reference", attn_mask=bias,
                                                      return_dbias=True)
        _, t_grads = _torch_grads(q, k, v, dout, {"attn_mask": np.broadcast_to(bias, (2, 3, 6, 7))})
        full = t_grads[3]
        padded = (1,) * (4 - len(shape)) + shape
        axes = tuple(a for a in range(4) if padded[a] == 1)
        assert dbias.shape == shape and dbias.dtype == np.float32
        np.testing.assert_allclose(dbias, full.sum(axis=axes, keepdims=True).reshape(shape), atol=1e-6)
