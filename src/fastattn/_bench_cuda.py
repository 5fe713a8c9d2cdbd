"""GPU benchmark: fastattn's CUDA backend beside PyTorch's SDPA (flash and cuDNN backends).

FlashAttention's benchmark grid: batch * seq = 16384 tokens, hidden 2048 (heads = 2048 / head_dim),
seq in {512 .. 16k}, head_dim in {64, 128}, float16 / bfloat16, causal and not.
TFLOP/s = 4 * batch * heads * seq^2 * head_dim / time, halved for causal.

Every implementation runs on the same GPU, in the same process, on the same input buffers
(CuPy arrays shared zero-copy with torch).  Times are CUDA-event medians after a warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

TOKENS = 16384
HIDDEN = 2048


def workload_grid(seqs: Iterable[int], head_dims: Iterable[int], dtypes: Iterable[str],
                  causal: Iterable[bool]) -> list[dict]:
    grid = []
    for dtype in dtypes:
        for d in head_dims:
            for c in causal:
                for n in seqs:
                    grid.append(dict(batch=max(1, TOKENS // n), heads=HIDDEN // d, seq=n, head_dim=d, causal=c,
                                     dtype=dtype))
    return grid


def tflops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, ms: float) -> float:
    flops = 4.0 * batch * heads * seq * seq * head_dim / (2.0 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def time_ms(fn: Callable[[], Any], *, warmup_ms: float = 50.0, rep_ms: float = 200.0, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn`` on the current CuPy stream, timed with CUDA events."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    fn()
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    once = max(cupy.cuda.get_elapsed_time(start, end), 1e-3)
    for _ in range(max(1, int(warmup_ms / once))):
        fn()
    reps = max(5, min(max_reps, int(rep_ms / once)))
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for a, b in events:
        a.record(stream)
        fn()
        b.record(stream)
    events[-1][1].synchronize()
    times = sorted(cupy.cuda.get_elapsed_time(a, b) for a, b in events)
    return float(times[len(times) // 2])


def _device_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _torch_impls(torch: Any) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION}


def run_cuda_bench(*, compare_torch: bool = True, dtypes: Iterable[str] = ("float16", "bfloat16"),
                   seqs: Iterable[int] = (512, 1024, 2048, 4096, 8192, 16384), head_dims: Iterable[int] = (64, 128),
                   causal: Iterable[bool] = (False, True),
                   progress: Callable[[dict], Any] | None = None) -> list[dict]:
    """One dict per (workload, implementation): device, batch, heads, seq, head_dim, causal, dtype,
    impl ("fastattn-cuda", "torch-flash", "torch-cudnn"), ms, tflops.

    ``progress`` (if given) is called with each dict as it is measured.  torch implementations that
    cannot run a workload (or a missing torch) are left out rather than failing the run.
    """
    from .backends import require

    require("cuda")
    import cupy

    import fastattn

    torch = None
    if compare_torch:
        try:
            import torch as _torch

            if _torch.cuda.is_available():
                torch = _torch
        except ImportError:
            torch = None

    device = _device_name()
    rows: list[dict] = []
    rng = cupy.random.default_rng(0)
    for w in workload_grid(seqs, head_dims, dtypes, causal):
        shape = (w["batch"], w["heads"], w["seq"], w["head_dim"])
        dtype = cupy.dtype(w["dtype"]) if w["dtype"] != "bfloat16" else None
        qkv = []
        for _ in range(3):
            x = rng.standard_normal(shape, dtype=cupy.float32)
            if dtype is None:  # bfloat16: let torch (or CuPy 14) convert
                x = _to_bf16(x, torch)
            else:
                x = x.astype(dtype)
            qkv.append(x)
        q, k, v = qkv

        impls: dict[str, Callable[[], Any]] = {
            "fastattn-cuda": lambda q=q, k=k, v=v, c=w["causal"]: fastattn.flash_attention(
                q, k, v, causal=c, backend="cuda"),
        }
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            for name, backend in _torch_impls(torch).items():
                def run(tq=tq, tk=tk, tv=tv, c=w["causal"], backend=backend):
                    with torch.nn.attention.sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=c)
                impls[name] = run
        for name, fn in impls.items():
            try:
                ms = time_ms(fn)
            except Exception as exc:  # noqa: BLE001 - a competitor that cannot run this shape is skipped
                if name == "fastattn-cuda":
                    raise
                if progress is not None:
                    progress({**w, "device": device, "impl": name, "error": str(exc).splitlines()[0]})
                continue
            row = {"device": device, **w, "impl": name, "ms": ms,
                   "tflops": tflops(w["batch"], w["heads"], w["seq"], w["head_dim"], w["causal"], ms)}
            rows.append(row)
            if progress is not None:
                progress(row)
        del q, k, v, qkv, impls
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _to_bf16(x: Any, torch: Any) -> Any:
    import cupy

    try:
        return x.astype("bfloat16")
    except Exception:  # noqa: BLE001 - CuPy without bfloat16 casts: go through torch
        if torch is None:
            raise
        return cupy.from_dlpack(torch.from_dlpack(x).to(torch.bfloat16))


def format_table(rows: list[dict]) -> str:
    """Side-by-side table: one line per workload, TFLOP/s of each impl and fastattn's ratios."""
    keys = sorted({(r["dtype"], r["head_dim"], r["causal"], r["seq"]) for r in rows})
    by = {(r["dtype"], r["head_dim"], r["causal"], r["seq"], r["impl"]): r for r in rows}
    lines = [f"{'dtype':9} {'D':>4} {'causal':>6} {'N':>6} {'fastattn':>9} {'flash':>7} {'cudnn':>7} "
             f"{'vs flash':>8} {'vs cudnn':>8}"]
    for key in keys:
        ours = by.get((*key, "fastattn-cuda"))
        fl = by.get((*key, "torch-flash"))
        cd = by.get((*key, "torch-cudnn"))
        lines.append(f"{key[0]:9} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} {_fmt(ours):>9} {_fmt(fl):>7} "
                     f"{_fmt(cd):>7} {_ratio(ours, fl):>8} {_ratio(ours, cd):>8}")
    return "\n".join(lines)


def _fmt(row: dict | None) -> str:
    return f"{row['tflops']:.1f}" if row else "-"


def _ratio(ours: dict | None, other: dict | None) -> str:
    return f"{ours['tflops'] / other['tflops']:.2f}x" if (ours and other) else "-"


# ---------------------------------------------------------------------------------------------
# variants: fastattn with the variant, fastattn's plain kernel on the same shape (the >= 90 %-per-
# attended-pair yardstick) and PyTorch's SDPA given the equivalent call, side by side
# ---------------------------------------------------------------------------------------------

VARIANTS = ("gqa", "window", "softcap", "alibi", "mask", "varlen", "bshd")
VARIANT_SEQS = (1024, 4096)


def _pairs_tflops(pairs: int, d: int, dv: int, ms: float) -> float:
    """TFLOP/s counting 2 (d + dv) flops per attended (query, key) pair and head."""
    return 2.0 * (d + dv) * pairs / (ms * 1e-3) / 1e12


def _variant_cases(variant: str, seqs: Iterable[int], dtype: str) -> list[dict]:
    """One dict per workload: shapes, the fastattn keyword arguments, the plain baseline's."""
    cases = []
    for n in seqs:
        b = max(1, TOKENS // n)
        if variant == "gqa":
            for causal in (False, True):
                cases.append(dict(batch=b, heads=32, heads_kv=8, seq=n, head_dim=128, causal=causal, kw={}))
        elif variant == "window":
            for w in (256, 1024):
                if w < n:
                    cases.append(dict(batch=b, heads=16, heads_kv=16, seq=n, head_dim=128, causal=True,
                                      kw={"window": (w, 0)}, label=f"window ({w}, 0)"))
        elif variant == "softcap":
            cases.append(dict(batch=b, heads=16, heads_kv=16, seq=n, head_dim=128, causal=True,
                              kw={"softcap": 30.0}, label="softcap 30"))
        elif variant == "alibi":
            cases.append(dict(batch=b, heads=16, heads_kv=16, seq=n, head_dim=128, causal=True, kw={"alibi": True}))
        elif variant == "mask":
            bb = max(1, b // 4)  # a (batch, heads, N, N) bias is large
            for kind in ("bias", "bool"):
                cases.append(dict(batch=bb, heads=16, heads_kv=16, seq=n, head_dim=128, causal=False,
                                  kw={"mask": kind}, label=f"{kind} (B, H, N, N)"))
        elif variant == "varlen":
            for causal in (False, True):
                cases.append(dict(batch=b, heads=16, heads_kv=16, seq=n, head_dim=128, causal=causal,
                                  kw={"varlen": True}, label="packed, lengths N/4 .. N"))
        elif variant == "bshd":
            for d in (64, 128):
                for causal in (False, True):
                    cases.append(dict(batch=b, heads=HIDDEN // d, heads_kv=HIDDEN // d, seq=n, head_dim=d,
                                      causal=causal, kw={"bshd": True}))
        else:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    for c in cases:
        c["dtype"] = dtype
        c.setdefault("label", variant)
    return cases


def run_variant_bench(variant: str, *, compare_torch: bool = True, dtype: str = "float16",
                      seqs: Iterable[int] | None = None,
                      progress: Callable[[dict], Any] | None = None) -> list[dict]:
    """Rows of one variant: impl "fastattn-cuda" (the variant), "fastattn-plain" (the same shape with
    no variant: MHA, contiguous, no mask; causal as the variant), and torch SDPA backends given the
    equivalent call; ``tflops`` counts attended (query, key) pairs only."""
    from .backends import require

    require("cuda")
    import cupy
    import numpy as np

    import fastattn

    from ._masks import MaskRule, attended_pairs

    torch = None
    if compare_torch:
        try:
            import torch as _torch

            if _torch.cuda.is_available():
                torch = _torch
        except ImportError:
            torch = None
    device = _device_name()
    rows: list[dict] = []
    rng = cupy.random.default_rng(0)
    if seqs is None:  # the layout on FlashAttention's whole grid; the others at two lengths
        seqs = (512, 1024, 2048, 4096, 8192, 16384) if variant == "bshd" else VARIANT_SEQS

    def rand(shape):
        x = rng.standard_normal(shape, dtype=cupy.float32)
        return _to_bf16(x, torch) if dtype == "bfloat16" else x.astype(dtype)

    for c in _variant_cases(variant, seqs, dtype):
        b, h, hk, n, d = c["batch"], c["heads"], c["heads_kv"], c["seq"], c["head_dim"]
        causal, kw = c["causal"], c["kw"]
        q, k, v = rand((b, h, n, d)), rand((b, hk, n, d)), rand((b, hk, n, d))
        call: dict[str, Any] = {"causal": causal}
        torch_kw: dict[str, Any] = {"is_causal": causal}
        torch_backends = ("torch-flash", "torch-cudnn")
        rule = MaskRule(causal=causal)
        pairs = b * h * attended_pairs(rule, n, n)
        tq = tk = tv = None
        args = (q, k, v)
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        if "window" in kw:
            call["window"] = kw["window"]
            rule = MaskRule(causal=causal, window_left=kw["window"][0], window_right=kw["window"][1])
            pairs = b * h * attended_pairs(rule, n, n)
            if torch is not None:  # the band as an explicit boolean mask (no window in SDPA)
                i = torch.arange(n, device="cuda")
                band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - kw["window"][0])
                torch_kw = {"attn_mask": band}
                torch_backends = ("torch-efficient", "torch-cudnn")
        if "softcap" in kw:
            call["softcap"] = kw["softcap"]  # no softcap in SDPA: its plain causal kernels stand beside
        if "alibi" in kw:
            slopes = cupy.asarray((2.0 ** -np.arange(1, h + 1) * (8.0 / h)).astype(np.float32))
            call["alibi_slopes"] = slopes
            if torch is not None:
                i = torch.arange(n, device="cuda", dtype=torch.float32)
                dist = (i[None, :] - i[:, None]).abs()
                bias = (-torch.from_dlpack(slopes)[:, None, None] * dist[None]).to(tq.dtype)
                bias = bias.masked_fill(i[None, None, :] > i[None, :, None], float("-inf"))
                torch_kw = {"attn_mask": bias[None]}
                torch_backends = ("torch-efficient", "torch-cudnn")
        if "mask" in kw:
            if kw["mask"] == "bias":
                m = rand((b, h, n, n))
            else:
                m = rng.random((b, h, n, n)) < 0.9
            call["attn_mask"] = m
            if torch is not None:
                torch_kw = {"attn_mask": torch.from_dlpack(m)}
                torch_backends = ("torch-efficient", "torch-cudnn")
        if "varlen" in kw:
            lens = np.random.default_rng(n).integers(n // 4, n + 1, b)
            cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            total = int(cu[-1])
            qp, kp, vp = rand((total, h, d)), rand((total, hk, d)), rand((total, hk, d))
            cu_gpu = cupy.asarray(cu)
            pairs = h * sum(attended_pairs(rule, int(x), int(x)) for x in lens)
            torch_backends = ()
        if "bshd" in kw:
            qs, ks, vs = rand((b, n, h, d)), rand((b, n, hk, d)), rand((b, n, hk, d))
            args = (qs, ks, vs)
            call["layout"] = "bshd"
            if torch is not None:
                tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (qs, ks, vs))
        if hk != h and torch is not None:
            torch_kw["enable_gqa"] = True

        impls: dict[str, Callable[[], Any]] = {}
        if "varlen" in kw:
            impls["fastattn-cuda"] = lambda a=(qp, kp, vp, cu_gpu, cu_gpu), c=causal: fastattn.flash_attention_varlen(
                *a, causal=c, backend="cuda")
            impls["fastattn-kernel"] = _kernel_only((qp, kp, vp), dict(causal=causal, cu_seqlens_q=cu_gpu,
                                                                       cu_seqlens_kv=cu_gpu))
        else:
            impls["fastattn-cuda"] = lambda a=args, ck=call: fastattn.flash_attention(*a, backend="cuda", **ck)
            impls["fastattn-kernel"] = _kernel_only(args, call)
        # the plain kernel on the same shape (MHA heads, contiguous, no mask): pairs counted alike
        qm, km, vm = (q, rand((b, h, n, d)), rand((b, h, n, d))) if hk != h else (q, k, v)
        plain_pairs = b * h * attended_pairs(MaskRule(causal=causal), n, n)
        impls["fastattn-plain"] = _kernel_only((qm, km, vm), {"causal": causal})
        if torch is not None:
            names = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                     "torch-efficient": "EFFICIENT_ATTENTION"}
            from torch.nn.attention import SDPBackend

            for name in torch_backends:
                be = getattr(SDPBackend, names[name])

                def run(be=be, tq=tq, tk=tk, tv=tv, tkw=torch_kw):
                    with torch.nn.attention.sdpa_kernel([be]):
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **tkw)
                impls[name] = run
        for name, fn in impls.items():
            base = {"device": device, "variant": variant, "label": c["label"], "dtype": dtype, "batch": b,
                    "heads": h, "heads_kv": hk, "seq": n, "head_dim": d, "causal": causal, "impl": name}
            try:
                ms = time_ms(fn)
            except Exception as exc:  # noqa: BLE001 - a competitor that cannot run this call is skipped
                if name.startswith("fastattn"):
                    raise
                if progress is not None:
                    progress({**base, "error": str(exc).splitlines()[0][:200]})
                continue
            # torch's plain causal kernels beside a softcap / window call count their own pairs
            p = plain_pairs if name == "fastattn-plain" or ("softcap" in kw and name.startswith("torch")) else pairs
            row = {**base, "ms": ms, "pairs": p, "tflops": _pairs_tflops(p, d, d, ms)}
            rows.append(row)
            if progress is not None:
                progress(row)
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _kernel_only(args: tuple, call: dict) -> Callable[[], Any]:
    """The CUDA backend's forward alone on a call validated once (no facade: no validation, no
    FLOP count, no result wrapping): the kernel's own time, launch included."""
    from ._validate import as_4d, make_spec, packed_4d
    from .backends import get_backend

    engine = get_backend("cuda")
    kw = dict(causal=False, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=None)
    kw.update(call)
    spec = make_spec(*args, **kw)
    engine.check_spec(spec)
    views = ([packed_4d(x) for x in args] if spec.ragged == "packed" else [as_4d(x, spec.layout) for x in args])
    return lambda: engine.forward(*views, spec)


def format_variant_table(rows: list[dict]) -> str:
    """One line per workload: TFLOP/s per attended pair of each impl; kern/pl: the variant's kernel over
    the plain kernel on the same shape (both the backend's forward alone); /torch: the whole call
    (``flash_attention``) over the best torch backend present (its whole call)."""
    impls = [i for i in ("fastattn-cuda", "fastattn-kernel", "fastattn-plain", "torch-flash", "torch-cudnn",
                         "torch-efficient") if any(r["impl"] == i for r in rows)]
    keys = list(dict.fromkeys((r["variant"], r["label"], r["dtype"], r["head_dim"], r["causal"], r["seq"],
                               r["heads"], r["heads_kv"]) for r in rows))
    by = {(r["variant"], r["label"], r["dtype"], r["head_dim"], r["causal"], r["seq"], r["heads"], r["heads_kv"],
           r["impl"]): r for r in rows}
    short = {"fastattn-cuda": "fastattn", "fastattn-kernel": "kernel", "fastattn-plain": "plain",
             "torch-flash": "flash", "torch-cudnn": "cudnn", "torch-efficient": "mem-eff"}
    head = (f"{'variant':22} {'dtype':8} {'D':>4} {'causal':>6} {'N':>6} {'H/Hkv':>6} "
            + " ".join(f"{short[i]:>9}" for i in impls) + f" {'kern/pl':>7} {'/torch':>7}")
    lines = [head]
    for key in keys:
        cells = [by.get((*key, i)) for i in impls]
        ours, plain = by.get((*key, "fastattn-cuda")), by.get((*key, "fastattn-plain"))
        kern = by.get((*key, "fastattn-kernel"))
        torch_rows = [by.get((*key, i)) for i in ("torch-flash", "torch-cudnn", "torch-efficient")]
        best = max((r for r in torch_rows if r), key=lambda r: r["tflops"], default=None)
        lines.append(f"{key[1][:22]:22} {key[2]:8} {key[3]:>4} {str(key[4]):>6} {key[5]:>6} {key[6]:>3}/{key[7]:<2} "
                     + " ".join(f"{_fmt(r):>9}" for r in cells) + f" {_ratio(kern, plain):>7} {_ratio(ours, best):>7}")
    return "\n".join(lines)


def cli_variant(variant: str, *, compare_torch: bool = True, dtype: str = "float16",
                seqs: Iterable[int] | None = None, json_path: str | None = None) -> int:
    """What ``bench --device cuda --variant V`` runs: the table of one variant (or "all")."""
    import json
    import sys

    chosen = VARIANTS if variant == "all" else (variant,)
    rows: list[dict] = []
    failed: list[dict] = []
    for name in chosen:
        if name not in VARIANTS:
            print(f"fastattn: unknown variant {name!r}; choose one of {', '.join(VARIANTS)} or all", file=sys.stderr)
            return 2
        rows += run_variant_bench(name, compare_torch=compare_torch, dtype=dtype, seqs=tuple(seqs) if seqs else None,
                                  progress=lambda r: failed.append(r) if "error" in r else None)
    print(format_variant_table(rows))
    for r in failed:
        print(f"not run: {r['impl']} {r['label']} N={r['seq']}: {r['error']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"results": rows, "not_run": failed}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastattn._bench_cuda --variant gqa`` (the CUDA half of ``bench --variant``)."""
    import argparse

    p = argparse.ArgumentParser(description="fastattn's CUDA backend on one attention variant beside PyTorch SDPA")
    p.add_argument("--variant", default="all", help=f"one of {', '.join(VARIANTS)}, or all (default)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default: 1024 4096; bshd: the full grid)")
    p.add_argument("--no-torch", action="store_true", help="fastattn alone")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)
    return cli_variant(args.variant, compare_torch=not args.no_torch, dtype=args.dtype, seqs=args.seqs,
                       json_path=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
