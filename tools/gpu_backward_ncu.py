#!/usr/bin/env python3
"""One backward of fastattn and one of PyTorch SDPA's flash backend (FlashAttention-2), for Nsight Compute:

    ncu --kernel-name regex:"fa_bwd_split_mma|fa_bwd_mma|flash_bwd_dq_dk_dv" --section SpeedOfLight ... \\
        python3 tools/gpu_backward_ncu.py [--seq 4096] [--dim 128] [--causal]

FlashAttention's grid shape (16k tokens, hidden 2048), float16; each implementation runs once after a
warm-up call that compiles it, so ``--launch-skip 2 --launch-count 2`` profiles one launch of each main
kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    import cupy
    import torch

    import fastattn
    from fastattn._bench_backward_cuda import _torch_fns

    n, d = args.seq, args.dim
    b, h = 16384 // n, 2048 // d
    rng = cupy.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(4))
    out, lse = fastattn.flash_attention(q, k, v, causal=args.causal, return_lse=True, backend="cuda")
    _, fa2_bwd, _ = _torch_fns(torch, torch.nn.attention.SDPBackend.FLASH_ATTENTION, q, k, v, do, args.causal)
    for _ in range(2):
        fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=args.causal, backend="cuda")
        cupy.cuda.Device().synchronize()
        fa2_bwd()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
