#!/usr/bin/env python3
"""Random feature combinations against an independent float64 implementation.

    python tools/fuzz_attention.py [--device cpu|cuda] [--seed S] [--forward N] [--backward N] [--kvcache N]

Each case draws a shape (odd sizes, GQA, v head dim unlike q/k's), a dtype, a layout (a strided view
now and then), and any mix of causal alignment, window, softcap, ALiBi, a boolean or float mask with
broadcast axes, padded lengths, scale, threads and (cpu) SIMD path; the KV-cache cases add paged
blocks of 1-32 tokens, appended tokens, cache lengths of 0 and explicit splits.  The reference is a
dense attention written here from docs/api.md's definitions in float64 torch (autograd for the
gradients); it shares no code with fastattn.

Errors are taken against float64 (relative to the reference's norm; gradients with a floor of 1e-3 of
dout's norm, as tests/test_backward.py does) beside the error of the same dense implementation run in
the input's precision (float16 / bfloat16 / float32: "plain").  The rule is the project's, "at most
twice plain's error", read statistically, since at small sizes both errors are sums of a few roundings
and their ratio has long tails: over every case of a kind (out, dq, dk, dv, KV-cache out) the median
ratio must be at most 1.25 and the 90th percentile at most 2, and no single case may pass 4x plain
plus a small absolute term.  float64: within 1e-10 every time.  The KV-cache cases also check the
appended tokens bit for bit.  Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import numpy as np

import fastattn

try:
    import torch
except ImportError:  # pragma: no cover
    sys.exit("tools/fuzz_attention.py needs torch (pip install '.[torch]')")

DTYPES = ["float32", "float64", "float16", "bfloat16"]
TORCH = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense(q, k, v, *, causal, window, softcap, slopes, mask, scale, lens_q=None, lens_kv=None, bottom_right=False):
    """(out, lse) of (batch, heads, seq, dim) tensors in their own dtype, per docs/api.md."""
    dt, dev = q.dtype, q.device
    b_, hq, sq, _ = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hk
    outs, lses = [], []
    for b in range(b_):
        lq = sq if lens_q is None else int(lens_q[b])
        lk = sk if lens_kv is None else int(lens_kv[b])
        ob, lb = [], []
        for h in range(hq):
            o = torch.zeros(sq, dv, dtype=dt, device=dev)
            lse = torch.full((sq,), float("-inf"), dtype=torch.float64, device=dev)
            if lq > 0 and lk > 0:
                s = (q[b, h, :lq] @ k[b, h // group, :lk].T) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                i = torch.arange(lq, device=dev)[:, None]
                j = torch.arange(lk, device=dev)[None, :]
                pos = i + (lk - lq if (causal == "bottom_right" or bottom_right) else 0)
                if slopes is not None:
                    slope = float(slopes[b, h] if slopes.ndim == 2 else slopes[h])
                    s = s - slope * (i + lk - lq - j).abs().to(dt)
                vis = torch.ones(lq, lk, dtype=torch.bool, device=dev)
                if causal:
                    vis &= j <= pos
                if window is not None:
                    if window[0] >= 0:
                        vis &= j >= pos - window[0]
                    if window[1] >= 0:
                        vis &= j <= pos + window[1]
                if mask is not None:
                    m = mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]
                    m = m.expand(sq, sk)[:lq, :lk]
                    if m.dtype == torch.bool:
                        vis &= m
                    else:
                        s = s + m.to(dt)
                seen = vis.any(1, keepdim=True)
                s = torch.where(vis, s, torch.full_like(s, float("-inf")))
                s = torch.where(seen, s, torch.zeros_like(s))
                p = torch.softmax(s.float() if dt in (torch.float16, torch.bfloat16) else s, 1).to(dt) * seen
                o = torch.cat([p @ v[b, h // group, :lk], torch.zeros(sq - lq, dv, dtype=dt, device=dev)])
                none = torch.full_like(lse[:lq], float("-inf"))
                lse[:lq] = torch.where(seen[:, 0], torch.logsumexp(s.double(), 1), none)
            ob.append(o)
            lb.append(lse)
        outs.append(torch.stack(ob))
        lses.append(torch.stack(lb))
    return torch.stack(outs), torch.stack(lses)


def _call_array(t: torch.Tensor, device: str):
    """A tensor as fastattn is given it: NumPy on the cpu (torch for bfloat16, which NumPy lacks), else on the GPU."""
    if device == "cpu":
        return t if t.dtype == torch.bfloat16 else t.numpy()
    return t.to(device)


def _aux(x: np.ndarray | None, device: str):
    """A mask, slopes, lengths or block table where q lives (NumPy for cpu, a torch tensor on the GPU)."""
    if x is None or device == "cpu":
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


class Case:
    """One random draw; ``arrays`` go to fastattn, the float64 tensors to the reference."""

    def __init__(self, rng: np.random.Generator, device: str, *, grad: bool):
        self.device = device
        self.B = int(rng.integers(1, 4))
        self.hk = int(rng.choice([1, 2, 3]))
        self.hq = self.hk * int(rng.choice([1, 2, 4]))
        self.sq = int(rng.choice([1, 2, 5, 17, 33, 64, 100, 191] + ([] if grad else [257])))
        self.sk = int(rng.choice([1, 3, 16, 47, 129, 300])) if rng.random() < 0.4 else self.sq
        self.d = int(rng.choice([8, 16, 31, 64, 80, 128] if device == "cpu" else [16, 32, 64, 96, 128]))
        self.dv = self.d if rng.random() < 0.8 else int(rng.choice([16, 64]))
        self.dtype = str(rng.choice(DTYPES))
        self.causal = [False, "top_left", "bottom_right"][int(rng.integers(3))]
        self.window = None
        if rng.random() < 0.3:
            self.window = (int(rng.choice([-1, 0, 3, 20, 100])), int(rng.choice([-1, 0, 5, 50])))
        self.softcap = float(rng.choice([0.0, 0.0, 5.0, 30.0]))
        self.slopes = None
        if rng.random() < 0.2:
            shape = (self.B, self.hq) if rng.random() < 0.5 else (self.hq,)
            self.slopes = rng.uniform(0.01, 0.5, shape).astype(np.float32)
        self.mask = None
        if rng.random() < 0.25:
            shape = (1 if rng.random() < 0.5 else self.B, 1 if rng.random() < 0.5 else self.hq,
                     1 if rng.random() < 0.3 else self.sq, self.sk)
            boolean = rng.random() < 0.5
            self.mask = (rng.random(shape) < 0.8) if boolean else rng.standard_normal(shape).astype(np.float32)
        self.lens = None
        if self.mask is None and rng.random() < 0.2:
            self.lens = (rng.integers(0, self.sq + 1, self.B).astype(np.int32),
                         rng.integers(0, self.sk + 1, self.B).astype(np.int32))
        self.scale = None if rng.random() < 0.7 else float(rng.uniform(0.05, 1.5))
        self.layout = "bshd" if rng.random() < 0.3 else "bhsd"
        self.strided = rng.random() < 0.25
        self.threads = int(rng.choice([1, 2]))
        self.simd = str(rng.choice(_cpu_paths())) if device == "cpu" else None
        self.q64 = rng.standard_normal((self.B, self.hq, self.sq, self.d))
        self.k64 = rng.standard_normal((self.B, self.hk, self.sk, self.d))
        self.v64 = rng.standard_normal((self.B, self.hk, self.sk, self.dv))
        self.do64 = rng.standard_normal((self.B, self.hq, self.sq, self.dv))

    def describe(self) -> dict:
        keys = ("B", "hq", "hk", "sq", "sk", "d", "dv", "dtype", "causal", "window", "softcap", "scale", "layout",
                "strided", "threads", "simd")
        out = {key: getattr(self, key) for key in keys}
        out.update(alibi=None if self.slopes is None else self.slopes.shape,
                   mask=None if self.mask is None else (self.mask.shape, self.mask.dtype.name),
                   lens=None if self.lens is None else [x.tolist() for x in self.lens])
        return out

    def tensor(self, x: np.ndarray, dtype: str) -> torch.Tensor:
        """x (b, h, s, d) float64 as the call's tensor: rounded to dtype, in the layout, maybe a strided view."""
        t = torch.from_numpy(x).to(TORCH[dtype])
        if self.layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        if self.strided:
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            wide[..., ::2] = t
            t = wide[..., ::2]
        return _call_array(t, self.device)

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2) if self.layout == "bshd" else t

    def options(self) -> dict:
        kw = dict(causal=self.causal, window=self.window, softcap=self.softcap,
                  alibi_slopes=_aux(self.slopes, self.device), attn_mask=_aux(self.mask, self.device),
                  layout=self.layout, scale=self.scale)
        if self.lens is not None:
            kw.update(seqlens_q=_aux(self.lens[0], self.device), seqlens_kv=_aux(self.lens[1], self.device))
        if self.device == "cpu":
            kw.update(num_threads=self.threads)
        return kw

    def reference(self, dtype: torch.dtype, *, grad: bool):
        dev = "cuda" if self.device == "cuda" and dtype != torch.float64 else "cpu"
        ts = [torch.tensor(x, dtype=dtype, device=dev, requires_grad=grad) for x in
              (self._rounded(self.q64), self._rounded(self.k64), self._rounded(self.v64))]
        mask = None if self.mask is None else torch.from_numpy(self.mask).to(dev)
        scale = self.scale if self.scale is not None else 1.0 / np.sqrt(self.d)
        out, lse = dense(*ts, causal=self.causal, window=self.window, softcap=self.softcap, slopes=self.slopes,
                         mask=mask, scale=scale, lens_q=None if self.lens is None else self.lens[0],
                         lens_kv=None if self.lens is None else self.lens[1])
        if grad:
            if out.requires_grad:
                out.backward(torch.tensor(self._rounded(self.do64), dtype=dtype, device=dev))
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ts]
            return out, lse, grads
        return out, lse, None

    def _rounded(self, x: np.ndarray) -> np.ndarray:
        return torch.from_numpy(x).to(TORCH[self.dtype]).double().numpy()

    def valid_rows(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """Zero the padding rows of a padded batch (their values are the caller's business)."""
        if self.lens is None:
            return t
        t = t.clone()
        lens = self.lens[0] if which == "q" else self.lens[1]
        for b in range(self.B):
            t[b, :, int(lens[b]):] = 0
        return t


def _cpu_paths() -> list[str]:
    from fastattn.backends import cpu
    return list(cpu.simd_paths())


def _simd(case: Case):
    from contextlib import nullcontext
    if case.device != "cpu":
        return nullcontext()
    from fastattn.backends import cpu
    return cpu.set_simd(case.simd)


def _rel(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float(torch.linalg.norm(got - want) / max(float(torch.linalg.norm(want)), floor, 1e-300))


RATIOS: dict[str, list[float]] = {}


def _judge(kind: str, dtype: str, err: float, plain: float) -> bool:
    """One case's error against float64 beside plain's; records the ratio for the statistical rule."""
    if dtype == "float64":
        return err <= 1e-10
    absolute = {"float32": 2e-7, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    if plain > 0 and err == err:
        RATIOS.setdefault(kind, []).append(err / plain)
    return err <= 4 * plain + absolute


def forward_case(case: Case) -> list[str]:
    q, k, v = (case.tensor(x, case.dtype) for x in (case.q64, case.k64, case.v64))
    with _simd(case):
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **case.options())
    out = case.valid_rows(case.canonical(torch.as_tensor(out) if not isinstance(out, torch.Tensor) else out), "q")
    ref, ref_lse, _ = case.reference(torch.float64, grad=False)
    plain, plain_lse, _ = case.reference(TORCH[case.dtype], grad=False)
    err, plain_err = _rel(out, ref), _rel(case.valid_rows(plain, "q"), ref)
    problems = []
    if not _judge("out", case.dtype, err, plain_err):
        problems.append(f"out error {err:.3g} (plain {case.dtype}: {plain_err:.3g})")
    lse = torch.as_tensor(lse).double().cpu()
    ref_lse, plain_lse = ref_lse.cpu(), plain_lse.double().cpu()
    finite = torch.isfinite(ref_lse)
    if not bool(torch.isneginf(lse[~finite]).all()):
        problems.append("lse is not -inf where no key is seen")
    if finite.any():  # lse: absolute errors (plain's: logsumexp of its own-precision scores)
        lse_err = float((lse[finite] - ref_lse[finite]).abs().max())
        plain_lse_err = float((plain_lse[finite] - ref_lse[finite]).abs().max())
        size = max(1.0, float(ref_lse[finite].abs().max()))
        slack = {"float64": 1e-12, "float32": 1e-6}.get(case.dtype, 1e-2) * size
        if not lse_err <= 4 * plain_lse_err + slack:
            problems.append(f"lse error {lse_err:.3g} (plain {case.dtype}: {plain_lse_err:.3g})")
    return problems


def backward_case(case: Case) -> list[str]:
    q, k, v, do = (case.tensor(x, case.dtype) for x in (case.q64, case.k64, case.v64, case.do64))
    opts = case.options()
    with _simd(case):
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **opts)
        grads = fastattn.flash_attention_backward(do, q, k, v, out, lse, **opts)[:3]
    _, _, ref = case.reference(torch.float64, grad=True)
    _, _, plain = case.reference(TORCH[case.dtype], grad=True)
    floor = 1e-3 * float(np.linalg.norm(case._rounded(case.do64)))
    problems = []
    for name, got, want, base, which in zip(("dq", "dk", "dv"), grads, ref, plain, ("q", "k", "k"), strict=True):
        got = case.valid_rows(case.canonical(torch.as_tensor(got) if not isinstance(got, torch.Tensor) else got), which)
        want, base = case.valid_rows(want, which), case.valid_rows(base, which)
        err, plain_err = _rel(got, want, floor), _rel(base, want, floor)
        if not _judge(name, case.dtype, err, plain_err):
            problems.append(f"{name} error {err:.3g} (plain {case.dtype}: {plain_err:.3g})")
    return problems


def kvcache_case(rng: np.random.Generator, device: str) -> tuple[dict, list[str]]:
    B = int(rng.integers(1, 4))
    hk = int(rng.choice([1, 2]))
    hq = hk * int(rng.choice([1, 4, 8]))
    d = int(rng.choice([8, 31, 64, 128] if device == "cpu" else [64, 128]))
    sq = int(rng.choice([1, 1, 2, 5, 16, 40]))
    new = int(rng.choice([0, 1, sq])) if rng.random() < 0.5 else 0
    cap = int(rng.choice([16, 50, 200, 1000])) + new
    dtype = str(rng.choice(DTYPES))
    lens = rng.integers(0, cap - new + 1, B).astype(np.int32)
    causal = bool(rng.random() < 0.8)
    window = (int(rng.choice([-1, 3, 64])), int(rng.choice([-1, 0, 2]))) if rng.random() < 0.3 else None
    softcap = float(rng.choice([0.0, 0.0, 10.0]))
    slopes = rng.uniform(0.01, 0.3, (hq,)).astype(np.float32) if rng.random() < 0.2 else None
    block = int(rng.choice([1, 3, 16, 32] if device == "cpu" else [16, 32, 64])) if rng.random() < 0.4 else 0
    splits = [None, 1, 2, 7][int(rng.integers(4))]
    threads = int(rng.choice([1, 2]))
    desc = dict(B=B, hq=hq, hk=hk, d=d, sq=sq, new=new, cap=cap, dtype=dtype, lens=lens.tolist(), causal=causal,
                window=window, softcap=softcap, alibi=slopes is not None, block=block, splits=splits)
    as_t = lambda x: torch.from_numpy(x).to(TORCH[dtype])  # noqa: E731
    kc, vc = as_t(rng.standard_normal((B, cap, hk, d))), as_t(rng.standard_normal((B, cap, hk, d)))
    q = as_t(rng.standard_normal((B, sq, hq, d)))
    kn = as_t(rng.standard_normal((B, new, hk, d))) if new else None
    vn = as_t(rng.standard_normal((B, new, hk, d))) if new else None
    table = None
    if block:
        nb = -(-cap // block)
        table = rng.permutation(B * nb + 3)[:B * nb].reshape(B, nb).astype(np.int32)
        kp = torch.zeros(B * nb + 3, block, hk, d, dtype=kc.dtype)
        vp = torch.zeros_like(kp)
        for b in range(B):
            for t in range(nb):
                n = min(cap, (t + 1) * block) - t * block
                kp[table[b, t], :n] = kc[b, t * block:t * block + n]
                vp[table[b, t], :n] = vc[b, t * block:t * block + n]
        k_cache, v_cache = kp, vp
    else:
        k_cache, v_cache = kc.clone(), vc.clone()

    def place(x):
        return None if x is None else _call_array(x, device)

    kwargs = dict(cache_seqlens=_aux(lens, device), block_table=_aux(table, device), causal=causal, window=window,
                  softcap=softcap, num_splits=splits, return_lse=True, alibi_slopes=_aux(slopes, device))
    if device == "cpu":
        kwargs.update(num_threads=threads)
    k_arg, v_arg = place(k_cache), place(v_cache)
    out, _ = fastattn.flash_attention_with_kvcache(place(q), k_arg, v_arg, place(kn), place(vn), **kwargs)
    out = torch.as_tensor(out).double().cpu()
    k_after = torch.as_tensor(k_arg).cpu()
    problems = []
    for b in range(B):
        total = int(lens[b]) + new
        keys = torch.cat([kc[b, :lens[b]], kn[b]]) if new else kc[b, :lens[b]]
        vals = torch.cat([vc[b, :lens[b]], vn[b]]) if new else vc[b, :lens[b]]
        if new:
            got = torch.cat([k_after[table[b, t]] for t in range(table.shape[1])]) if block else k_after[b]
            if not torch.equal(got[lens[b]:total], kn[b]):
                problems.append(f"sequence {b}: the appended keys differ from k")
        args = [x.double().transpose(0, 1)[None] for x in (q[b], keys, vals)]
        ref, _ = dense(*args, causal="bottom_right" if causal else False, window=window, softcap=softcap,
                       slopes=slopes, mask=None, scale=1.0 / np.sqrt(d), bottom_right=True)
        plain_args = [x.to(TORCH[dtype]) for x in args]
        if device == "cuda" and dtype != "float64":
            plain_args = [x.cuda() for x in plain_args]
        plain, _ = dense(*plain_args, causal="bottom_right" if causal else False, window=window, softcap=softcap,
                         slopes=slopes, mask=None, scale=1.0 / np.sqrt(d), bottom_right=True)
        err, plain_err = _rel(out[b].transpose(0, 1)[None], ref), _rel(plain, ref)
        if not _judge("kvcache out", dtype, err, plain_err):
            problems.append(f"sequence {b}: error {err:.3g} (plain {dtype}: {plain_err:.3g})")
    return desc, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forward", type=int, default=200, help="forward cases")
    parser.add_argument("--backward", type=int, default=80, help="backward cases")
    parser.add_argument("--kvcache", type=int, default=150, help="KV-cache cases")
    args = parser.parse_args()
    failures = 0
    for what, count in (("forward", args.forward), ("backward", args.backward), ("kvcache", args.kvcache)):
        for index in range(count):
            rng = np.random.default_rng([args.seed, ("forward", "backward", "kvcache").index(what), index])
            desc: dict = {}
            try:
                if what == "kvcache":
                    desc, problems = kvcache_case(rng, args.device)
                else:
                    case = Case(rng, args.device, grad=what == "backward")
                    desc = case.describe()
                    problems = (forward_case if what == "forward" else backward_case)(case)
            except Exception:  # every refusal of a valid draw is a failure too
                problems = ["raised: " + traceback.format_exc(limit=3).strip().replace("\n", " | ")]
            if problems:
                failures += 1
                print(f"FAIL {what} #{index}: {'; '.join(problems)}\n    {desc}")
        print(f"{what}: {count} cases on {args.device}, seed {args.seed}", flush=True)
    for kind, ratios in RATIOS.items():
        median, p90 = float(np.median(ratios)), float(np.percentile(ratios, 90))
        ok = median <= 1.25 and p90 <= 2.0
        failures += not ok
        print(f"{kind}: error / plain's over {len(ratios)} non-float64 cases: median {median:.2f}, "
              f"90th percentile {p90:.2f}, max {max(ratios):.2f}{'' if ok else '  FAIL (median <= 1.25, p90 <= 2)'}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
