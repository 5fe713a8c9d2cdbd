"""Per-call cost of small calls (docs/performance.md, "Per-call cost of small calls"): each call in a loop, the
mean time per call in microseconds, printed as one JSON object; PyTorch SDPA on the same data beside.

    PYTHONPATH=src python tools/small_calls.py   # run it in each tree to compare, several rounds in turn
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import torch

import fastattn


def per_call_us(f: Callable[[], object], n: int) -> float:
    for _ in range(20):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cases: dict[str, tuple[Callable[[], object], int]] = {}
    q1 = rng.standard_normal((1, 1, 1, 8), dtype=np.float32)
    cases["fa (1,1,1,8)"] = (lambda: fastattn.flash_attention(q1, q1, q1), 5000)
    q16 = rng.standard_normal((1, 8, 16, 64), dtype=np.float32)
    cases["fa B1 H8 N16 D64"] = (lambda: fastattn.flash_attention(q16, q16, q16), 3000)
    qd = rng.standard_normal((1, 8, 1, 64), dtype=np.float32)
    kd = rng.standard_normal((1, 8, 512, 64), dtype=np.float32)
    cases["fa q 1x8x1x64 vs 512 keys"] = (lambda: fastattn.flash_attention(qd, kd, kd), 2000)
    for nc in (16, 512, 4096):
        n = 3000 if nc < 4096 else 400
        kc = rng.standard_normal((1, nc + 8, 8, 64), dtype=np.float32)
        vc = rng.standard_normal((1, nc + 8, 8, 64), dtype=np.float32)
        q = rng.standard_normal((1, 1, 8, 64), dtype=np.float32)
        cases[f"kvcache {nc} keys"] = (
            lambda q=q, kc=kc, vc=vc, nc=nc: fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=nc), n)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, kc, vc))
        cases[f"kvcache {nc} keys, torch CPU tensors"] = (
            lambda tq=tq, tk=tk, tv=tv, nc=nc: fastattn.flash_attention_with_kvcache(tq, tk, tv, cache_seqlens=nc), n)
        sq, sk, sv = tq.transpose(1, 2), tk[:, :nc].transpose(1, 2), tv[:, :nc].transpose(1, 2)
        cases[f"torch sdpa {nc} keys"] = (lambda sq=sq, sk=sk, sv=sv: sdpa(sq, sk, sv), n)
    tt, t16 = torch.from_numpy(q1), torch.from_numpy(q16)
    cases["torch sdpa (1,1,1,8)"] = (lambda: sdpa(tt, tt, tt), 5000)
    cases["torch sdpa B1 H8 N16 D64"] = (lambda: sdpa(t16, t16, t16), 3000)
    print(json.dumps({name: per_call_us(f, n) for name, (f, n) in cases.items()}))


if __name__ == "__main__":
    main()
