#!/usr/bin/env python3
"""Hopper-kernel probe for one device call: correctness of fa_fwd_sm90 against a float64 reference
(on the GPU), its SASS (HGMMA present, no local memory), and its speed per tile configuration beside
torch's flash and cuDNN backends.

    python tools/gpu_probe.py [--quick]                      (on a machine with an H100/H200)
    python tools/gpu_probe.py --variants base,FA_X,FA_X+FA_Y  (compare kernels built with macros)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import cupy
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from fastattn import _bench_cuda as bc  # noqa: E402
from fastattn._validate import make_spec  # noqa: E402
from fastattn.backends.cuda import _launch, _specs  # noqa: E402


def reference(q, k, v, causal, scale):
    s = cupy.einsum("bhid,bhjd->bhij", q.astype(cupy.float64), k.astype(cupy.float64)) * scale
    if causal:
        sq, skv = s.shape[-2:]
        s = cupy.where(cupy.arange(skv)[None, :] <= cupy.arange(sq)[:, None], s, -cupy.inf)
    m = s.max(-1, keepdims=True)
    p = cupy.exp(s - m)
    den = p.sum(-1, keepdims=True)
    return cupy.einsum("bhij,bhjd->bhid", p / den, v.astype(cupy.float64)), (m + cupy.log(den))[..., 0]


def run(q, k, v, causal, cfg, opts, dtype):
    spec = make_spec(q, k, v, causal=causal, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None,
                     num_threads=None)
    out = cupy.full(q.shape, np.nan, dtype=q.dtype)  # poisoned: every element must be written
    lse = cupy.full(q.shape[:3], np.nan, dtype=cupy.float32)
    used = _launch.launch(q, k, v, out, lse, spec, dtype, config=cfg, extra_options=opts)
    return out, lse, spec, used


def check(opts, quick):
    rng = cupy.random.default_rng(1)
    shapes = [(1, 2, 128, 128, 64), (1, 2, 128, 128, 128), (2, 3, 200, 333, 64), (1, 2, 77, 513, 128),
              (1, 1, 1000, 1000, 128), (2, 2, 257, 129, 64), (1, 1, 1, 5, 128), (1, 2, 130, 65, 120),
              (1, 1, 64, 64, 40), (1, 2, 4096, 4096, 128)]
    worst = 0.0
    for dtype in ("float16", "bfloat16"):
        for b, h, sq, skv, d in shapes[: 4 if quick else None]:
            d_pad = _specs.padded_head_dim(d, dtype)
            for causal in (False, True):
                cfgs = list(dict.fromkeys((_specs.sm90_config(d_pad, causal, skv), *_specs.SM90_SWEEP[d_pad])))
                q, k, v = (rng.standard_normal((b, h, s, d), dtype=cupy.float32).astype(dtype)
                           for s in (sq, skv, skv))
                ref, ref_lse = reference(q, k, v, causal, 1.0 / np.sqrt(d))
                for cfg in cfgs:
                    out, lse, spec, used = run(q, k, v, causal, cfg, opts, dtype)
                    o = out.astype(cupy.float64)
                    err = float(cupy.linalg.norm(o - ref) / cupy.linalg.norm(ref))
                    lerr = float(cupy.abs(lse - ref_lse).max())
                    nan = int(cupy.isnan(o).sum())
                    worst = max(worst, err if nan == 0 else 1.0)
                    good = err < (1e-2 if dtype == "bfloat16" else 2e-3) and nan == 0 and lerr < 1e-3
                    flag = "" if good else "  <-- BAD"
                    print(f"{dtype:8} {b}x{h}x{sq}x{skv}x{d:<3} causal={causal!s:5} {used.kernel} "
                          f"{cfg.warpgroups}wg/{cfg.block_kv}/{cfg.min_blocks}: err {err:.2e} lse {lerr:.1e} "
                          f"nan {nan}{flag}", flush=True)
    print(f"worst relative error {worst:.3g}")
    return worst


def sass(opts):
    name = _specs.sm90_name("float16", 128, _specs.sm90_config(128, False, 4096), False)
    cubin, _ = _launch._nvrtc_cubin(_launch._source(name), name, _launch._SM90_OPTIONS + tuple(opts))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    for tool in ("cuobjdump", "/usr/local/cuda/bin/cuobjdump"):
        try:
            text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
            break
        except FileNotFoundError:
            text = ""
    counts = {k: text.count(k) for k in ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "LDL", "STL", "MUFU.EX2",
                                          "LDGSTS", "BAR.SYNC")}
    print(f"SASS of {name}: {counts}")
    out = os.environ.get("OUT")
    if out and text:
        with open(os.path.join(out, "sm90_d128.sass"), "w") as f:
            f.write(text)


def _workloads(seqs, dims):
    """FlashAttention's grid in fp16: (d, causal, n, q, k, v, spec, out, lse) per shape."""
    for d in dims:
        for causal in (False, True):
            for n in seqs:
                b, h = max(1, 16384 // n), 2048 // d
                q, k, v = (cupy.random.standard_normal((b, h, n, d), dtype=cupy.float32).astype("float16")
                           for _ in range(3))
                spec = make_spec(q, k, v, causal=causal, scale=None, dropout_p=0.0, seed=None, block_q=None,
                                 block_kv=None, num_threads=None)
                yield d, causal, n, q, k, v, spec, cupy.empty_like(q), cupy.empty((b, h, n), cupy.float32)


def _torch_tflops(q, k, v, causal, labels):
    """TFLOP/s of torch's SDPA backends ("FA2", "cuDNN") on the same buffers."""
    import torch
    from torch.nn.attention import sdpa_kernel

    impls = bc._torch_impls(torch)
    backends = {"FA2": impls["torch-flash"], "cuDNN": impls["torch-cudnn"]}
    b, h, n, d = q.shape
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    res = []
    for label in labels:
        def fn(be=backends[label]):
            with sdpa_kernel([be]):
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        res.append(f"{label}: {bc.tflops(b, h, n, d, causal, bc.time_ms(fn)):4.0f}")
    return res


def _ours(q, k, v, out, lse, spec, cfg, opts, causal):
    b, h, n, d = q.shape
    ms = bc.time_ms(lambda: _launch.launch(q, k, v, out, lse, spec, "float16", config=cfg, extra_options=opts))
    return bc.tflops(b, h, n, d, causal, ms)


def timing_variants(variants, seqs, dims):
    """Default tiles per shape, each variant's options, beside FA2 (fp16)."""
    for d, causal, n, q, k, v, spec, out, lse in _workloads(seqs, dims):
        cfg = _specs.sm90_config(d, causal, n)
        res = [f"{' '.join(opts) or 'base'}: {_ours(q, k, v, out, lse, spec, cfg, opts, causal):4.0f}"
               for opts in variants]
        res += _torch_tflops(q, k, v, causal, ("FA2",))
        print(f"D={d:3} causal={causal!s:5} N={n:5}  " + "  ".join(res), flush=True)


def timing(opts, seqs, dims):
    """Every Hopper tile configuration and the mma.sync kernel per shape, beside FA2 and cuDNN (fp16)."""
    for d, causal, n, q, k, v, spec, out, lse in _workloads(seqs, dims):
        res = [f"{cfg.warpgroups}wg/{cfg.block_kv}{'x2' if cfg.min_blocks == 2 else ''}: "
               f"{_ours(q, k, v, out, lse, spec, cfg, opts, causal):4.0f}"
               for cfg in dict.fromkeys((_specs.sm90_config(d, causal, n), *_specs.SM90_SWEEP[d]))]
        res.append(f"mma: {_ours(q, k, v, out, lse, spec, _specs.MMA_CONFIGS[(d, causal)], (), causal):4.0f}")
        res += _torch_tflops(q, k, v, causal, ("FA2", "cuDNN"))
        print(f"D={d:3} causal={causal!s:5} N={n:5}  " + "  ".join(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--opts", nargs="*", default=[])
    ap.add_argument("--seqs", default="1024,2048,4096,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--variants", help="macros to compare, comma separated ('base' = none), e.g. base,FA_X")
    args = ap.parse_args()
    opts = tuple(args.opts)
    t0 = time.time()
    if args.variants is not None:
        variants = [() if v == "base" else tuple(f"-D{m}" for m in v.split("+")) for v in args.variants.split(",")]
        for v in variants:
            print("--- check", v or "base", flush=True)
            if check(v, True) > 0.05:
                print("FAILED", v)
                return
        timing_variants(variants, [int(x) for x in args.seqs.split(",")], [int(x) for x in args.dims.split(",")])
        print(f"probe done in {time.time() - t0:.0f}s")
        return
    sass(opts)
    worst = check(opts, args.quick)
    if worst > 0.05:
        print("FAILED: no timing")
        return
    if not args.no_timing:
        timing(opts, [int(x) for x in args.seqs.split(",")], [int(x) for x in args.dims.split(",")])
    print(f"probe done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
