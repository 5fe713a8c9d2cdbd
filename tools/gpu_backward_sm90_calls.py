#!/usr/bin/env python3
"""Calls of the Hopper backward (fa_bwd_sm90) for the sanitizers (on a GPU machine; tools/gpu_backward_session.sh).

    python tools/gpu_backward_sm90_calls.py [INDEX]     # every call, or the one numbered INDEX
    python tools/gpu_backward_sm90_calls.py --count     # how many calls there are

Each call runs the forward and the backward of one float16 / bfloat16 shape that fa_bwd_sm90 serves on compute
capability 9.0 (GQA, both causal alignments, windows, softcap / ALiBi, a boolean mask, padded and packed batches,
bshd, a padded head dim, rows on both sides of the tiles) and checks that the plan says wgmma.  Run once without a
sanitizer per INDEX in parallel first: the kernels compile into the disk caches, so the sanitized run only loads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def calls() -> list[tuple[str, str]]:
    cases = ["gqa", "br_window", "softcap_alibi", "bool_mask", "seqlens", "packed", "bshd", "rows_1000", "d40"]
    return [(dt, c) for dt in ("float16", "bfloat16") for c in cases]


def run(dt: str, case: str) -> None:
    import cupy
    import numpy as np

    import fastattn
    from fastattn.backends.cuda import _backward

    rng = np.random.default_rng(0)

    def g(*s):
        x = rng.standard_normal(s).astype(np.float32)
        x = cupy.asarray(x)
        if dt == "bfloat16":
            import torch

            from fastattn._bench_cuda import _to_bf16

            return _to_bf16(x, torch)
        return x.astype(dt)

    _backward._PLANS.clear()
    if case == "packed":
        cu = cupy.asarray(np.array([0, 5, 5, 140, 203], np.int32))
        q, k, v, do = g(203, 4, 128), g(203, 2, 128), g(203, 2, 128), g(203, 4, 128)
        out, lse = fastattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, window=(50, 0), return_lse=True)
        grads = fastattn.flash_attention_varlen_backward(do, q, k, v, out, lse, cu, cu, causal=True, window=(50, 0))
    else:
        d = {"br_window": 128, "bool_mask": 128, "rows_1000": 128, "d40": 40}.get(case, 64)
        b, h, hk, sq, sk = {"rows_1000": (1, 2, 2, 1000, 777), "d40": (1, 2, 2, 300, 300)}.get(case, (2, 6, 2, 77, 130))
        layout = "bshd" if case == "bshd" else "bhsd"
        shape = (lambda s, n: (b, n, s, d)) if layout == "bhsd" else (lambda s, n: (b, s, n, d))
        q, k, v, do = g(*shape(sq, h)), g(*shape(sk, hk)), g(*shape(sk, hk)), g(*shape(sq, h))
        kw = {
            "gqa": dict(causal=True),
            "br_window": dict(causal="bottom_right", window=(20, 3)),
            "softcap_alibi": dict(softcap=5.0, alibi_slopes=cupy.full((h,), 0.1, cupy.float32), causal=True),
            "bool_mask": dict(attn_mask=cupy.asarray(rng.random((b, 1, sq, sk)) < 0.5)),
            "seqlens": dict(seqlens_q=np.array([77, 3]), seqlens_kv=np.array([0, 100]), causal=True),
            "bshd": dict(layout="bshd", window=(30, 30)),
            "rows_1000": dict(causal=True),
            "d40": dict(),
        }[case]
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **kw)
        grads = fastattn.flash_attention_backward(do, q, k, v, out, lse, **kw)
    cupy.cuda.Device().synchronize()
    kinds = {p.kernel for p in _backward._PLANS.values()}
    finite = all(bool(cupy.isfinite(x.astype(cupy.float32)).all()) for x in grads[:3])
    print(dt, case, kinds, "finite" if finite else "NON-FINITE", flush=True)
    if kinds != {"wgmma"} or not finite:
        raise SystemExit(f"{dt} {case}: plan {kinds}, finite {finite}")


def main(argv: list[str]) -> int:
    todo = calls()
    if argv and argv[0] == "--count":
        print(len(todo))
        return 0
    for dt, case in ([todo[int(argv[0])]] if argv else todo):
        run(dt, case)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
