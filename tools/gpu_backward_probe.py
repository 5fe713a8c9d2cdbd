#!/usr/bin/env python3
"""Where the CUDA backward's time goes (on a GPU machine): each kernel of a call timed alone.

    python tools/gpu_backward_probe.py [--seqs 4096 16384] [--dims 64 128]

For FlashAttention's grid shapes (16k tokens, hidden 2048, float16): the whole backward, fa_bwd_prep,
fa_bwd_mma with dQ by atomics and without dQ, fa_bwd_dq_mma, fa_bwd_dq_convert; TFLOP/s with the backward
counted as 2.5x the forward's FLOPs (per kernel: of the whole backward's FLOPs, so the parts' shares show).
It times fa_bwd_mma at every head dim (``_backward.SPLIT_KERNEL`` off: its ``-DFA_BWD_NO_RED`` experiment
is that kernel's); tools/gpu_backward_ab.py compares fa_bwd_split_mma with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _probe_one(d: int, causal: bool, n: int) -> None:
    import cupy
    import numpy as np

    import fastattn
    from fastattn._bench_cuda import time_ms
    from fastattn._validate import make_spec
    from fastattn.backends import cuda
    from fastattn.backends.cuda import _backward

    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(cupy.float16)
                   for _ in range(4))
    out, lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    spec = make_spec(q, k, v, causal=causal, scale=None, dropout_p=0.0, seed=None, block_q=None,
                     block_kv=None, num_threads=None)
    flops = 2.5 * 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)
    whole = time_ms(lambda: cuda.backward(do, q, k, v, out, lse, spec))
    det = time_ms(lambda: cuda.backward(do, q, k, v, out, lse, spec, deterministic=True))
    dq, dk, dv, _, plan = _backward.backward(do, q, k, v, out, lse, spec)
    _, _, _, _, dplan = _backward.backward(do, q, k, v, out, lse, spec, deterministic=True)
    dsum = cupy.empty(lse.shape, np.float32)
    acc = cupy.zeros((b, h, n, plan.d_pad), np.float32)
    null = np.uint64(0)
    dyn = _backward._dynamic(spec)

    def launch(entry, dq_acc):
        kernel, grid, threads, smem, sargs = entry
        return lambda: kernel(grid, threads, (q, k, v, do, lse, dsum, dq, dk, dv, dq_acc, null, *dyn,
                                              *sargs), shared_mem=smem)

    pk, pgrid, pargs = plan.prep
    t_prep = time_ms(lambda: pk(pgrid, (256,), (do, out, dsum, *pargs)))
    t_atomic = time_ms(launch(plan.main, acc))
    t_main = time_ms(launch(dplan.main, null))
    t_dq = time_ms(launch(dplan.dq, null))
    # the same main kernel with its dQ reductions compiled out (the dQ products kept): what the atomics cost
    from fastattn.backends.cuda import _specs
    from fastattn.backends.cuda._launch import get_kernel

    cfg = _specs.BWD_MMA_CONFIGS[plan.d_pad]
    name = _specs.bwd_mma_name("float16", plan.d_pad, plan.d_pad, cfg, causal, False, False, True)
    no_red = (get_kernel(name, plan.main[3], ("-DFA_BWD_NO_RED",)), *plan.main[1:])
    t_nored = time_ms(launch(no_red, acc))
    ck, cgrid, cargs = plan.convert
    t_conv = time_ms(lambda: ck(cgrid, (256,), (acc, dq, *cargs)))
    print(f"{d:>4} {str(causal):>6} {n:>6} | {whole:7.3f} {flops / whole / 1e9:5.0f} | {t_prep:6.3f} "
          f"{t_atomic:10.3f} {t_nored:8.3f} {t_main:9.3f} {t_dq:7.3f} {t_conv:7.3f} | {det:6.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args(argv)
    from fastattn.backends.cuda import _backward

    _backward.SPLIT_KERNEL = False

    print(f"{'D':>4} {'causal':>6} {'N':>6} | {'bwd ms':>7} {'TF':>5} | {'prep':>6} {'mma+atomic':>10} {'no red':>8} "
          f"{'mma no dQ':>9} {'dq_mma':>7} {'convert':>7} | det ms")
    for d in args.dims:
        for causal in (False, True):
            for n in args.seqs:
                _probe_one(d, causal, n)
                import cupy

                cupy.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
