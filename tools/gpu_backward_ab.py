#!/usr/bin/env python3
"""The float16 / bfloat16 backward kernels side by side (on a GPU machine): fa_bwd_mma (each warp owns 16 keys),
fa_bwd_split_mma (FlashAttention-2's warp layouts) and, on Hopper, fa_bwd_sm90 (wgmma), beside PyTorch SDPA's
flash backend.

    python tools/gpu_backward_ab.py [--seqs 1024 4096 16384] [--dims 64 128] [--dtypes float16]
                                    [--tiles 64:8,64,128,2,4,2 ...] [--options -DNAME=VALUE ...]

``--tiles D:warps,block_q,block_kv,wq_s,wk_dkv,wq_dq`` replaces fa_bwd_split_mma's tiles of head dim D
(``_specs.BWD_SPLIT_CONFIGS``) for this run: a tile sweep.  ``--options`` compiles fa_bwd_split_mma with
these extra NVRTC options (its experiment switches, e.g. ``-DFA_BWD_SPLIT_DQ_LAST=1``).

FlashAttention's grid (16k tokens, hidden 2048); backward TFLOP/s with the backward counted as 2.5x the
forward's FLOPs; ``triton.testing.do_bench`` medians, same process and buffers.  Each row also gives the
largest relative difference (norm) of dq / dk / dv of fa_bwd_split_mma and of fa_bwd_sm90 against fa_bwd_mma's.
``--fwd-bwd`` also times the forward alone and forward + backward together (the benchmark's third figure), for
each kernel, and FA2's forward + backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


FWD_BWD = False
#: extra options of every fastattn call (--softcap, --window): FA2's column is then its plain call, for reference
OPTS: dict = {}


def _one(dtype: str, d: int, causal: bool, n: int) -> None:
    import cupy
    import torch

    import fastattn
    from fastattn._bench_backward_cuda import _bench, _torch_fns
    from fastattn._bench_cuda import _to_bf16
    from fastattn.backends.cuda import _backward

    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng(0)
    arrays = []
    for _ in range(4):
        x = rng.standard_normal((b, h, n, d), dtype=cupy.float32)
        arrays.append(_to_bf16(x, torch) if dtype == "bfloat16" else x.astype(dtype))
    q, k, v, do = arrays
    out, lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cuda", **OPTS)
    flops = 2.5 * 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)

    def bwd():
        return fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal, backend="cuda", **OPTS)

    def both():
        o, lse_ = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cuda", **OPTS)
        return fastattn.flash_attention_backward(do, q, k, v, o, lse_, causal=causal, backend="cuda", **OPTS)

    times, grads, fwd_bwd = {}, {}, {}
    for which, split, sm90 in (("mma", False, False), ("split", True, False), ("wgmma", True, True)):
        _backward.SPLIT_KERNEL, _backward.SM90_KERNEL = split, sm90
        times[which] = _bench(bwd)
        grads[which] = [g.astype(cupy.float32) for g in bwd()[:3]]
        if FWD_BWD:
            t_fwd = _bench(lambda: fastattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cuda",
                                                            **OPTS))
            fwd_bwd[which] = t_both = _bench(both)
            print(f"    {which}: fwd {t_fwd:.3f} ms + bwd {times[which]:.3f} ms = "
                  f"{t_fwd + times[which]:.3f} ms; fwd+bwd timed together {t_both:.3f} ms", flush=True)
    _backward.SPLIT_KERNEL = _backward.SM90_KERNEL = True

    def diff(which):
        return max(float(cupy.linalg.norm(a - c) / cupy.linalg.norm(c))
                   for a, c in zip(grads[which], grads["mma"], strict=True))

    _, tbwd, _ = _torch_fns(torch, torch.nn.attention.SDPBackend.FLASH_ATTENTION, q, k, v, do, causal)
    t_fa2 = _bench(tbwd)
    old, new, wg = times["mma"], times["split"], times["wgmma"]
    line = (f"{dtype:9} {d:>4} {str(causal):>6} {n:>6} | {old:7.3f} {new:7.3f} {wg:7.3f} {t_fa2:7.3f} | "
            f"{flops / old / 1e9:5.0f} {flops / new / 1e9:5.0f} {flops / wg / 1e9:5.0f} {flops / t_fa2 / 1e9:5.0f} | "
            f"{new / wg:5.2f}x {t_fa2 / wg:5.2f}x | {diff('split'):.1e} {diff('wgmma'):.1e}")
    if FWD_BWD:
        ftorch, _, fboth = _torch_fns(torch, torch.nn.attention.SDPBackend.FLASH_ATTENTION, q, k, v, do, causal)
        t_fa2_both = _bench(fboth)
        line += (f" | fwd+bwd split {fwd_bwd['split']:.3f} wgmma {fwd_bwd['wgmma']:.3f} FA2 {t_fa2_both:.3f} ms: "
                 f"{t_fa2_both / fwd_bwd['wgmma']:.2f}x")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float16"])
    parser.add_argument("--tiles", nargs="*", default=[], help="D:warps,block_q,block_kv,wq_s,wk_dkv,wq_dq")
    parser.add_argument("--options", nargs="*", default=[], help="extra NVRTC options of fa_bwd_split_mma")
    parser.add_argument("--fwd-bwd", action="store_true", help="also time the forward, and forward + backward")
    parser.add_argument("--softcap", type=float, default=0.0, help="a softcap on every fastattn call")
    parser.add_argument("--window", type=int, nargs=2, default=None, help="a window (left, right) likewise")
    parser.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    args = parser.parse_args(argv)
    global FWD_BWD
    FWD_BWD = args.fwd_bwd
    if args.softcap:
        OPTS["softcap"] = args.softcap
    if args.window:
        OPTS["window"] = tuple(args.window)
    if OPTS:
        print("fastattn options:", OPTS, "(FA2: its plain call)")
    from fastattn.backends.cuda import _backward, _launch, _specs

    if args.options:
        options = tuple(args.options)
        print("fa_bwd_split_mma options:", *options)

        def get_kernel(name, smem, extra=()):
            return _launch.get_kernel(name, smem, extra + options if name.startswith("fa_bwd_split_mma<") else extra)

        _backward.get_kernel = get_kernel

    for text in args.tiles:
        dim, fields = text.split(":")
        _specs.BWD_SPLIT_CONFIGS[int(dim)] = _specs.BwdSplitConfig(*(int(x) for x in fields.split(",")))
        print(f"D={dim}: {_specs.BWD_SPLIT_CONFIGS[int(dim)]}")
    print(f"{'dtype':9} {'D':>4} {'causal':>6} {'N':>6} | {'mma ms':>7} {'split':>7} {'wgmma':>7} {'FA2':>7} | "
          f"{'mma':>5} {'split':>5} {'wgmma':>5} {'FA2':>5} TF | {'vs split':>6} {'vs FA2':>6} | "
          "rel diff to mma: split wgmma")
    for dtype in args.dtypes:
        for d in args.dims:
            for causal in {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]:
                for n in args.seqs:
                    _one(dtype, d, causal, n)
                    import cupy

                    cupy.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
