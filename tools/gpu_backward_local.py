#!/usr/bin/env python3
"""The CUDA backward's local rows (bwd.cuh, issue 12) on a GPU machine: the SIMT pair's calls for the
sanitizers, and its timings.

    python tools/gpu_backward_local.py calls [--quick]  # one call of each local-row shape, float32 and float64
    python tools/gpu_backward_local.py time [--label NAME]
    python tools/gpu_backward_local.py kernels [--label NAME]   # each kernel's own time (CUDA events)

``calls`` runs fa_bwd_simt_kv / fa_bwd_simt_q over shapes whose rows see one key, two, a chunk's worth, or
none (causal + window, a boolean mask, padded lengths, dropout, softcap + ALiBi + a float bias with dbias,
key shards given the whole row's lse, head dims 64 and 256), small enough for compute-sanitizer.  ``time``
prints the float32 / float64 backward's median time (``triton.testing.do_bench``) over shapes with no local
rows past the first tile (causal, non-causal) and with local rows in every tile (windows (0, 0) and (16, 0));
run it once per tree (PYTHONPATH) to compare, alternating the trees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not any(Path(p).joinpath("fastattn").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def calls(quick: bool = False) -> None:
    import cupy
    import numpy as np

    import fastattn

    rng = np.random.default_rng(0)

    def g(*shape, dt):
        return cupy.asarray(rng.standard_normal(shape).astype(dt))

    for dt in ("float32",) if quick else ("float32", "float64"):
        for d in (64,) if quick else (64, 256):
            q, k, v, do = g(2, 4, 70, d, dt=dt), g(2, 2, 70, d, dt=dt), g(2, 2, 70, d, dt=dt), g(2, 4, 70, d, dt=dt)
            one = np.zeros((2, 1, 70, 70), bool)
            one[:, :, np.arange(70), rng.integers(0, 70, 70)] = True
            shapes = dict(
                one_key=dict(causal=True, window=(0, 0)),
                two_keys=dict(causal=True, window=(1, 0)),
                window_16=dict(causal="bottom_right", window=(16, 2)),
                mods=dict(causal=True, window=(3, 0), softcap=5.0, alibi_slopes=cupy.full((4,), 0.2, cupy.float32),
                          attn_mask=g(1, 4, 70, 70, dt="float32")),
                bool_one=dict(attn_mask=cupy.asarray(one)),
                drop=dict(causal=True, window=(2, 0), dropout_p=0.3, seed=4),
                ragged=dict(seqlens_q=np.array([1, 9]), seqlens_kv=np.array([1, 2])),
            )
            for name, kw in shapes.items():
                out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="cuda", **kw)
                grads = fastattn.flash_attention_backward(do, q, k, v, out, lse, backend="cuda",
                                                          return_dbias=name == "mods", **kw)
                print(dt, d, name, [float(abs(x).sum()) for x in grads[:3]], flush=True)
            qs, ks, vs, dos = g(1, 2, 37, d, dt=dt), g(1, 2, 6, d, dt=dt), g(1, 2, 6, d, dt=dt), g(1, 2, 37, d, dt=dt)
            out, lse = fastattn.flash_attention(qs, ks, vs, return_lse=True, backend="cuda")
            for a, c in ((0, 2), (2, 6)):
                fastattn.flash_attention_backward(dos, qs, ks[:, :, a:c], vs[:, :, a:c], out, lse, backend="cuda")
    cupy.cuda.Device().synchronize()
    print("calls done")


#: (dtype, batch, heads, n, d, options)
TIMED = [
    ("float32", 4, 8, 2048, 64, {"causal": True}),
    ("float32", 4, 8, 2048, 64, {}),
    ("float32", 2, 8, 2048, 128, {"causal": True}),
    ("float32", 4, 8, 2048, 64, {"causal": True, "window": (16, 0)}),
    ("float32", 4, 8, 2048, 64, {"causal": True, "window": (0, 0)}),
    ("float64", 2, 8, 1024, 64, {"causal": True}),
    ("float64", 2, 8, 1024, 64, {"causal": True, "window": (16, 0)}),
]


def time(label: str) -> None:
    import cupy
    from triton.testing import do_bench

    import fastattn

    rng = cupy.random.default_rng(0)
    for dt, b, h, n, d, opts in TIMED:
        q, k, v, do = (rng.standard_normal((b, h, n, d), dtype=cupy.float64).astype(dt) for _ in range(4))
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="cuda", **opts)

        def bwd(q=q, k=k, v=v, do=do, out=out, lse=lse, opts=opts):
            return fastattn.flash_attention_backward(do, q, k, v, out, lse, backend="cuda", **opts)

        ms = do_bench(bwd, warmup=50, rep=300, return_mode="median")
        print(f"{label:8s} {dt} b{b} h{h} n{n} d{d} {opts}: {ms:.3f} ms", flush=True)


def kernels(label: str) -> None:
    """Median time of each launch of the backward (prep, fa_bwd_simt_kv, fa_bwd_simt_q) over the TIMED shapes,
    from CUDA events around each kernel (the plans' kernels wrapped after a first call)."""
    import statistics

    import cupy

    import fastattn
    from fastattn.backends.cuda import _backward

    class Timed:
        def __init__(self, name, kernel):
            self.name, self.kernel, self.ms = name, kernel, []

        def __call__(self, *args, **kwargs):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            self.kernel(*args, **kwargs)
            end.record()
            end.synchronize()
            self.ms.append(cupy.cuda.get_elapsed_time(start, end))

    rng = cupy.random.default_rng(0)
    for dt, b, h, n, d, opts in TIMED:
        q, k, v, do = (rng.standard_normal((b, h, n, d), dtype=cupy.float64).astype(dt) for _ in range(4))
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="cuda", **opts)
        _backward._PLANS.clear()
        fastattn.flash_attention_backward(do, q, k, v, out, lse, backend="cuda", **opts)
        (key, plan), = _backward._PLANS.items()
        timers = [Timed("kv", plan.main[0]), Timed("q", plan.dq[0])]
        _backward._PLANS[key] = plan._replace(main=(timers[0], *plan.main[1:]), dq=(timers[1], *plan.dq[1:]))
        for _ in range(60):
            fastattn.flash_attention_backward(do, q, k, v, out, lse, backend="cuda", **opts)
        cols = "  ".join(f"{t.name} {statistics.median(t.ms[10:]):.3f}" for t in timers)
        print(f"{label:8s} {dt} b{b} h{h} n{n} d{d} {opts}: {cols} ms", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("calls", "time", "kernels"))
    parser.add_argument("--label", default="")
    parser.add_argument("--quick", action="store_true", help="calls: float32 at head dim 64 only")
    args = parser.parse_args()
    {"calls": lambda: calls(args.quick), "time": lambda: time(args.label),
     "kernels": lambda: kernels(args.label)}[args.what]()
