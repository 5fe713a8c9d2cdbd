"""fastattn.torch: the differentiable PyTorch operator.

- ``torch.autograd.gradcheck`` in float64 on the CPU for every feature (odd shapes);
- forward and backward against ``torch.nn.functional.scaled_dot_product_attention`` (float32 and
  float64 to rounding; float16 / bfloat16 by FlashAttention's rule: at most 2x the error of a naive
  same-precision implementation against float64, plus a small absolute term);
- the operators' registration (``torch.library.opcheck``), ``torch.compile(fullgraph=True)`` forward +
  backward, dropout's seed, validation errors;
- training: a 2-layer transformer on random tokens, 50 Adam steps, the loss falls; at the same init its
  gradients equal those of the same model on PyTorch's SDPA.  On the GPU again behind the ``cuda`` marker.

The operator runs the default backend ("auto") once the compiled CPU backend has a backward; until then
the float64 reference backend (which tests the operator's plumbing, not the kernel).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastattn  # noqa: E402
import fastattn.torch as ft  # noqa: E402
from fastattn import backends  # noqa: E402

#: the backend the CPU tests run: the default once the cpu backend has its backward
HAS_CPU_BACKWARD = (backends.get_backend("cpu").availability() is None
                    and getattr(backends.get_backend("cpu"), "backward", None) is not None)
BACKEND = "auto" if HAS_CPU_BACKWARD else "reference"


def _rand(*shape, dtype=torch.float64, device="cpu", grad=True, gen=None):
    return torch.randn(*shape, dtype=dtype, device=device, generator=gen).requires_grad_(grad)


@pytest.fixture
def gen(request):
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------------------------
# gradcheck, float64, every feature
# ---------------------------------------------------------------------------------------------------------------

#: name -> (b, h, hk, sq, sk, d, dv, options); arrays (masks, slopes, lengths) are built in _feature_case
GRADCHECK = {
    "plain": (1, 2, 2, 5, 7, 3, 3, {}),
    "gqa_dv": (2, 4, 2, 5, 7, 3, 4, {}),
    "mqa": (1, 3, 1, 7, 5, 4, 4, {}),
    "causal_top_left": (1, 2, 2, 7, 5, 3, 3, {"causal": True}),
    "causal_bottom_right": (1, 2, 1, 5, 9, 3, 3, {"causal": "bottom_right"}),
    "window": (1, 2, 2, 9, 9, 3, 3, {"window": (2, 1)}),
    "window_causal": (1, 2, 2, 7, 9, 4, 4, {"window": (3, 0), "causal": "bottom_right"}),
    "softcap": (1, 2, 2, 5, 7, 3, 3, {"softcap": 0.7}),
    "scale": (1, 2, 2, 5, 7, 3, 3, {"scale": 0.9}),
    "alibi": (2, 2, 2, 5, 7, 3, 3, {"alibi": True}),
    "bias_grad": (2, 2, 1, 5, 7, 3, 3, {"bias": (1, 2, 5, 7)}),
    "bias_grad_broadcast": (2, 2, 2, 5, 7, 3, 3, {"bias": (5, 7)}),
    "bool_mask": (2, 2, 2, 7, 5, 3, 3, {"bool_mask": True}),
    "dropout": (1, 2, 2, 7, 9, 3, 3, {"dropout_p": 0.3, "seed": 1234}),
    "bshd": (2, 4, 2, 5, 7, 3, 4, {"layout": "bshd", "causal": True}),
    "seqlens": (2, 2, 2, 7, 9, 3, 3, {"seqlens": ([5, 7], [9, 4])}),
    "all": (2, 4, 2, 7, 9, 3, 4, {"causal": "bottom_right", "window": (4, 1), "softcap": 2.0, "alibi": True,
                                  "bias": (2, 1, 7, 9), "dropout_p": 0.2, "seed": 99, "layout": "bshd"}),
}


def _feature_case(name, gen):
    b, h, hk, sq, sk, d, dv, opts = GRADCHECK[name]
    opts = dict(opts)
    layout = opts.get("layout", "bhsd")

    def shape(heads, s, dim):
        return (b, heads, s, dim) if layout == "bhsd" else (b, s, heads, dim)

    tensors = [_rand(*shape(h, sq, d), gen=gen), _rand(*shape(hk, sk, d), gen=gen), _rand(*shape(hk, sk, dv), gen=gen)]
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(b, h, dtype=torch.float32, generator=gen)
    if "bias" in opts:
        bias = _rand(*opts.pop("bias"), gen=gen)
        tensors.append(bias)
    if opts.pop("bool_mask", False):
        mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
        mask[..., 0] = True  # every row sees a key
        opts["attn_mask"] = mask
    if "seqlens" in opts:
        lq, lk = opts.pop("seqlens")
        opts["seqlens_q"], opts["seqlens_kv"] = torch.tensor(lq), torch.tensor(lk)
    return tensors, opts


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name, gen):
    tensors, opts = _feature_case(name, gen)

    def f(q, k, v, *bias):
        return ft.flash_attention(q, k, v, attn_mask=bias[0] if bias else opts.get("attn_mask"), backend=BACKEND,
                                  **{key: val for key, val in opts.items() if key != "attn_mask"})

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_varlen(gen):
    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 7, 9], dtype=torch.int32)
    q, k, v = _rand(12, 4, 3, gen=gen), _rand(9, 2, 3, gen=gen), _rand(9, 2, 4, gen=gen)

    def f(q, k, v):
        return ft.flash_attention_varlen(q, k, v, cu_q, cu_k, causal="bottom_right", softcap=3.0, backend=BACKEND)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_three_d(gen):
    q, k, v = _rand(3, 5, 4, gen=gen), _rand(3, 7, 4, gen=gen), _rand(3, 7, 3, gen=gen)
    assert torch.autograd.gradcheck(lambda q, k, v: ft.flash_attention(q, k, v, causal=True, backend=BACKEND),
                                    (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradients_equal_the_facade(gen):
    """The operator's gradients are the facade's (same seed, same bias reduction)."""
    (q, k, v, bias), opts = _feature_case("all", gen)
    out = ft.flash_attention(q, k, v, attn_mask=bias, backend=BACKEND, **opts)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    out.backward(dout)
    with torch.no_grad():
        f_out, lse = fastattn.flash_attention(q, k, v, attn_mask=bias, return_lse=True, backend=BACKEND, **opts)
        dq, dk, dv, dbias = fastattn.flash_attention_backward(dout, q, k, v, f_out, lse, attn_mask=bias,
                                                              return_dbias=True, backend=BACKEND, **opts)
    assert torch.equal(out.detach(), f_out)
    for got, want in ((q.grad, dq), (k.grad, dk), (v.grad, dv), (bias.grad, dbias)):
        assert got.shape == want.shape and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# against PyTorch's SDPA
# ---------------------------------------------------------------------------------------------------------------

SDPA_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "gqa": {"gqa": True, "causal": True},
    "bias": {"bias": True},
    "bool_mask": {"bool_mask": True},
    "scale": {"scale": 0.3},
}


def _sdpa_case(name, dtype, gen, device="cpu", b=2, h=4, sq=33, sk=47, d=16):
    opts = dict(SDPA_CASES[name])
    hk = h // 2 if opts.pop("gqa", False) else h
    q = torch.randn(b, h, sq, d, dtype=torch.float64, generator=gen)
    k = torch.randn(b, hk, sk, d, dtype=torch.float64, generator=gen)
    v = torch.randn(b, hk, sk, d, dtype=torch.float64, generator=gen)
    dout = torch.randn(b, h, sq, d, dtype=torch.float64, generator=gen)
    extra = {}
    if opts.pop("bias", False):
        extra["attn_mask"] = torch.randn(1, h, sq, sk, dtype=torch.float64, generator=gen)
    if opts.pop("bool_mask", False):
        mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.4
        mask[..., 0] = True
        extra["attn_mask"] = mask
    tens = [x.to(device) for x in (q, k, v, dout)]
    mask = extra.get("attn_mask")
    if mask is not None:
        mask = mask.to(device)
    return tens, mask, opts, hk


def _grads(fn, q, k, v, mask, dout, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    leaves = [q, k, v]
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().to(dtype).requires_grad_(True)
        leaves.append(mask)
    out = fn(q, k, v, mask)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach(), *grads]


def _sdpa_fn(opts, h, hk):
    def fn(q, k, v, mask):
        if hk != h:
            k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(opts.get("causal")),
                                              scale=opts.get("scale"))
    return fn


def _ours_fn(opts):
    def fn(q, k, v, mask):
        return ft.flash_attention(q, k, v, attn_mask=mask, backend=BACKEND, **opts)
    return fn


NAMES = ("out", "dq", "dk", "dv", "dbias")


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_against_sdpa(name, dtype, gen):
    (q, k, v, dout), mask, opts, hk = _sdpa_case(name, dtype, gen)
    dt = getattr(torch, dtype)
    ours = _grads(_ours_fn(opts), q, k, v, mask, dout, dt)
    theirs = _grads(_sdpa_fn(opts, q.shape[1], hk), q, k, v, mask, dout, dt)
    tol = 1e-12 if dtype == "float64" else 2e-5
    for what, a, b in zip(NAMES[:len(ours)], ours, theirs, strict=True):
        assert a.dtype == dt and a.shape == b.shape, what
        assert _rel(a, b) <= tol, f"{what}: {_rel(a, b):.2e}"


def _naive(q, k, v, mask, causal):
    """Attention in the inputs' precision (scores and softmax in float32, P rounded to the dtype)."""
    s = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
    if mask is not None:
        s = s + mask.float() if mask.is_floating_point() else s.masked_fill(~mask, float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1).to(q.dtype) @ v


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["plain", "causal", "bias"])
def test_half_precision_rule(name, dtype, gen):
    (q, k, v, dout), mask, opts, hk = _sdpa_case(name, dtype, gen)
    dt = getattr(torch, dtype)
    # rounded once to the dtype, then held as float64 for the exact result
    q, k, v, dout = (x.to(dt).double() for x in (q, k, v, dout))
    mask = mask.to(dt).double() if mask is not None and mask.is_floating_point() else mask
    exact = _grads(_sdpa_fn(opts, q.shape[1], hk), q, k, v, mask, dout, torch.float64)
    ours = _grads(_ours_fn(opts), q, k, v, mask, dout, dt)
    naive = _grads(lambda q, k, v, m: _naive(q, k, v, m, bool(opts.get("causal"))), q, k, v, mask, dout, dt)
    for what, a, n, e in zip(NAMES[:len(ours)], ours, naive, exact, strict=True):
        assert a.dtype == dt, what
        err, err_naive = (a.double() - e).abs().max().item(), (n.double() - e).abs().max().item()
        assert err <= 2 * err_naive + 1e-3 * e.abs().max().item(), f"{what}: {err:.3e} vs naive {err_naive:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# the operator itself: registration, compile, lse, dropout's seed, errors
# ---------------------------------------------------------------------------------------------------------------

def _op_args(q, k, v, mask=None, seed=None, dropout_p=0.0, causal="top_left"):
    return (q, k, v, mask, None, None, None, None, None, seed, causal, -1, -1, 0.0, "bhsd", None, dropout_p, None,
            None, BACKEND, None, False)


def test_opcheck(gen):
    q, k, v = _rand(1, 2, 5, 3, gen=gen), _rand(1, 1, 7, 3, gen=gen), _rand(1, 1, 7, 4, gen=gen)
    bias = _rand(2, 5, 7, gen=gen)
    args = _op_args(q, k, v, bias, torch.tensor(7), 0.25, "bottom_right")
    torch.library.opcheck(torch.ops.fastattn.flash_attention.default, args)
    with torch.no_grad():
        out, lse = torch.ops.fastattn.flash_attention.default(*args)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    plain = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]  # no double backward
    for want_dbias in (False, True):
        torch.library.opcheck(torch.ops.fastattn.flash_attention_backward.default,
                              (dout, *plain[:3], out, lse, *plain[3:], want_dbias))


def test_fake_shapes_match_real(gen):
    """The fake implementation's shapes and dtypes are the real ones, for every rank and layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [((2, 3, 5, 4), (2, 1, 7, 4), (2, 1, 7, 6), "bhsd"), ((2, 5, 3, 4), (2, 7, 1, 4), (2, 7, 1, 6), "bshd"),
             ((3, 5, 4), (3, 7, 4), (3, 7, 2), "bhsd"), ((5, 3, 4), (7, 3, 4), (7, 3, 2), "bshd"),
             ((5, 4), (7, 4), (7, 2), "bhsd")]
    for qs, ks, vs, layout in cases:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in (qs, ks, vs))
            out, lse = ft.flash_attention(q, k, v, layout=layout, return_lse=True, backend=BACKEND)
            with FakeTensorMode() as mode:
                fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
                fout, flse = ft.flash_attention(fq, fk, fv, layout=layout, return_lse=True, backend=BACKEND)
            for real, fake in ((out, fout), (lse, flse)):
                assert (real.shape, real.dtype, real.stride()) == (fake.shape, fake.dtype, fake.stride()), (qs, layout)


def test_compile_fullgraph_forward_backward(gen):
    torch._dynamo.reset()
    q, k, v = _rand(2, 4, 9, 8, gen=gen), _rand(2, 2, 11, 8, gen=gen), _rand(2, 2, 11, 8, gen=gen)
    bias = _rand(1, 4, 9, 11, gen=gen)

    def loss(q, k, v, bias):
        out = ft.flash_attention(q, k, v, attn_mask=bias, causal="bottom_right", softcap=5.0, dropout_p=0.1,
                                 seed=5, backend=BACKEND)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # dynamo + AOTAutograd (no C++ build)
    got = compiled(q, k, v, bias)
    grads = torch.autograd.grad(got, (q, k, v, bias))
    want = loss(q, k, v, bias)
    want_grads = torch.autograd.grad(want, (q, k, v, bias))
    assert torch.equal(got, want)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.equal(a, b)


def test_compile_inductor_draws_a_seed_per_call(gen):
    """Under inductor with no seed, each call draws a fresh seed (two calls differ) and its backward uses
    the seed of its own forward."""
    torch._dynamo.reset()
    q, k, v = _rand(1, 2, 16, 8, gen=gen), _rand(1, 2, 16, 8, gen=gen), _rand(1, 2, 16, 8, gen=gen)

    def f(q, k, v):
        return ft.flash_attention(q, k, v, dropout_p=0.5, return_lse=False, backend=BACKEND)

    compiled = torch.compile(f, fullgraph=True)
    a, b = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(a, b)
    # out = P_dropped @ v is linear in v, so <out, w> = <v, dL/dv> for L = <out, w> exactly when the
    # backward's dropout mask is the forward's
    w = torch.randn(a.shape, dtype=a.dtype, generator=gen)
    (a * w).sum().backward()
    assert torch.allclose((a * w).sum(), (v * v.grad).sum(), rtol=1e-10, atol=0)


def test_lse_is_returned_and_not_differentiable(gen):
    q, k, v = _rand(1, 2, 5, 3, gen=gen), _rand(1, 2, 7, 3, gen=gen), _rand(1, 2, 7, 3, gen=gen)
    out, lse = ft.flash_attention(q, k, v, return_lse=True, backend=BACKEND)
    assert out.requires_grad and not lse.requires_grad
    want = torch.logsumexp(q @ k.transpose(-1, -2) / 3 ** 0.5, -1)
    assert torch.allclose(lse, want, rtol=0, atol=1e-12)
    out.sum().backward()  # an expanded (stride-0) dout
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_dropout_seed(gen):
    q, k, v = _rand(1, 2, 9, 4, gen=gen), _rand(1, 2, 11, 4, gen=gen), _rand(1, 2, 11, 4, gen=gen)
    opts = dict(dropout_p=0.4, backend=BACKEND)
    with torch.no_grad():
        for seed in (0, 12345, 2**63 + 5, 2**64 - 1):  # seeds past int64 travel as two's complement
            want = fastattn.flash_attention(q, k, v, seed=seed, **opts)
            assert torch.equal(ft.flash_attention(q, k, v, seed=seed, **opts), want)
        # no seed: drawn from torch's generator, so torch.manual_seed repeats a call
        torch.manual_seed(3)
        a = ft.flash_attention(q, k, v, **opts)
        torch.manual_seed(3)
        assert torch.equal(ft.flash_attention(q, k, v, **opts), a)
        assert not torch.equal(ft.flash_attention(q, k, v, **opts), a)

    def f(q, k, v):  # a drawn seed: gradcheck passes only if the backward reuses the forward's seed
        torch.manual_seed(11)
        return ft.flash_attention(q, k, v, **opts)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bias_without_grad_and_slopes_get_none(gen):
    q, k, v = _rand(1, 2, 5, 3, gen=gen), _rand(1, 2, 7, 3, gen=gen), _rand(1, 2, 7, 3, gen=gen)
    bias = torch.randn(1, 1, 5, 7, dtype=torch.float64, generator=gen)  # no grad wanted
    slopes = torch.rand(2, dtype=torch.float32, generator=gen, requires_grad=True)
    ft.flash_attention(q, k, v, attn_mask=bias, alibi_slopes=slopes, backend=BACKEND).sum().backward()
    assert q.grad is not None and slopes.grad is None and bias.grad is None


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, k, v: ft.flash_attention(q, k[..., :2], v), ValueError, "head_dim"),
    (lambda q, k, v: ft.flash_attention(q, k, v, causal="diagonal"), ValueError, "causal"),
    (lambda q, k, v: ft.flash_attention(q, k, v, causal=1), TypeError, "causal"),
    (lambda q, k, v: ft.flash_attention(q, k, v, window=(1, -3)), ValueError, "window"),
    (lambda q, k, v: ft.flash_attention(q, k, v, window=3), TypeError, "window"),
    (lambda q, k, v: ft.flash_attention(q, k, v, softcap=-1.0), ValueError, "softcap"),
    (lambda q, k, v: ft.flash_attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: ft.flash_attention(q, k, v, dropout_p=0.1, seed=-1), ValueError, "seed"),
    (lambda q, k, v: ft.flash_attention(q, k, v, layout="sbhd"), ValueError, "layout"),
    (lambda q, k, v: ft.flash_attention(q.numpy(), k, v), TypeError, "torch.Tensor"),
    (lambda q, k, v: ft.flash_attention(q, k, v, attn_mask=torch.zeros(3, 3)), ValueError, "attn_mask"),
    (lambda q, k, v: ft.flash_attention(q, k, v, backend="fpga"), ValueError, "unknown backend"),
])
def test_errors_are_the_facades(call, exc, match, gen):
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    with pytest.raises(exc, match=match):
        call(q, k, v)


# ---------------------------------------------------------------------------------------------------------------
# training: a small transformer on random tokens, fastattn against SDPA
# ---------------------------------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, dim, heads, kv_heads, attend):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.attend = heads, kv_heads, dim // heads, attend
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.wq = torch.nn.Linear(dim, dim)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.wo = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, _ = x.shape
        h = self.ln1(x)
        q = self.wq(h).view(b, n, self.heads, self.head_dim)                     # (batch, seq, heads, dim)
        k, v = self.wkv(h).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        x = x + self.wo(self.attend(q, k, v).reshape(b, n, -1))
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, attend, vocab=40, dim=32, heads=4, kv_heads=2, layers=2, seq=24):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(vocab, dim), torch.nn.Parameter(torch.randn(seq, dim) * 0.1)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads, attend) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def attend_fastattn(q, k, v):
    return ft.flash_attention(q, k, v, causal=True, layout="bshd", backend=BACKEND)


def attend_sdpa(q, k, v):
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _train_and_compare(device, dtype, grad_tol, steps=50):
    torch.manual_seed(0)
    ours = TinyLM(attend_fastattn).to(device=device, dtype=dtype)
    theirs = copy.deepcopy(ours)
    for block in theirs.blocks:
        block.attend = attend_sdpa
    tokens = torch.randint(0, 40, (4, 24), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(model):
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # same init, same batch: the same loss and gradients as the model on SDPA
    for model in (ours, theirs):
        model.zero_grad()
        loss_of(model).backward()
    for (name, p), p_sdpa in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert _rel(p.grad, p_sdpa.grad) <= grad_tol, f"{name}: {_rel(p.grad, p_sdpa.grad):.2e}"

    if not steps:
        return
    opt = torch.optim.Adam(ours.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(ours)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_training_cpu():
    """50 Adam steps in float32 (the loss falls), after the gradients at init equal SDPA's model's."""
    _train_and_compare("cpu", torch.float32, 1e-4)


def test_gradients_equal_sdpa_model_float64():
    _train_and_compare("cpu", torch.float64, 1e-10, steps=0)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (torch CUDA tensors through the cuda backend)
# ---------------------------------------------------------------------------------------------------------------

def _cuda_reason():
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    reason = backends.get_backend("cuda").availability()
    if reason is not None:
        return f"cuda backend unavailable: {reason}"
    return None


def _require_cuda(backward=False):
    reason = _cuda_reason()
    if reason is None and backward and getattr(backends.get_backend("cuda"), "backward", None) is None:
        reason = "the cuda backend has no backward pass on this branch yet"
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
def test_cuda_forward_on_a_side_stream(gen):
    _require_cuda()
    q, k, v = (torch.randn(2, 4, 129, 64, generator=gen).cuda() for _ in range(3))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in (q, k, v):
            x.mul_(1.0)  # queued on the side stream: the kernel must be ordered after it
        out = ft.flash_attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert out.device == q.device and out.dtype == q.dtype
    assert _rel(out, want) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["causal", "gqa", "bias"])
def test_cuda_against_sdpa(name, gen):
    _require_cuda(backward=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    (q, k, v, dout), mask, opts, hk = _sdpa_case(name, "float32", gen, device="cuda")
    opts_auto = {key: val for key, val in opts.items()}

    def ours_fn(q, k, v, mask):
        return ft.flash_attention(q, k, v, attn_mask=mask, **opts_auto)

    ours = _grads(ours_fn, q, k, v, mask, dout, torch.float32)
    exact = _grads(_sdpa_fn(opts, q.shape[1], hk), q, k, v, mask, dout, torch.float64)
    for what, a, b in zip(NAMES[:len(ours)], ours, exact, strict=True):
        assert _rel(a, b) <= 1e-4, f"{what}: {_rel(a, b):.2e}"


@pytest.mark.cuda
def test_training_cuda():
    _require_cuda(backward=True)
    global BACKEND
    saved, BACKEND = BACKEND, "auto"
    try:
        _train_and_compare("cuda", torch.float64, 1e-10, steps=0)
        _train_and_compare("cuda", torch.float32, 1e-4)
    finally:
        BACKEND = saved
