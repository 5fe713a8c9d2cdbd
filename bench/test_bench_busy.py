"""Small calls on an idle and on a busy machine (every core kept busy by other processes).

A tiny call (one query, one key: the per-call cost alone), a short one (16 x 16), a decode-sized call
(q 1x8x1x64 against 512 or 4096 keys) and a large one (B1 H8 N2048 D64), each
with the default thread count, with one thread, and PyTorch's SDPA beside (when installed), with
and without a background load that this file starts and stops itself: one spinning process per
CPU this process may use.  ``benchmark.group`` puts the variants of one case side by side::

    pytest bench/test_bench_busy.py --benchmark-enable --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import fastattn
from fastattn.backends.cpu._threads import cpu_limit

CASES = {  # name -> (batch, heads, seq_q, seq_kv, head_dim)
    "tiny": (1, 1, 1, 1, 8),  # nothing but the per-call cost
    "short-16": (1, 8, 16, 16, 64),
    "decode-512": (1, 8, 1, 512, 64),
    "decode-4096": (1, 8, 1, 4096, 64),
    "prefill-2048": (1, 8, 2048, 2048, 64),
}


@pytest.fixture(params=["idle", "busy"])
def load(request):
    """Nothing, or one busy-looping process per usable CPU (killed after the test)."""
    if request.param == "idle":
        yield "idle"
        return
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpu_limit())]
    time.sleep(0.3)  # let them start spinning
    try:
        yield "busy"
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@pytest.mark.parametrize("impl", ["fastattn-default-threads", "fastattn-1-thread", "torch-sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_call_under_load(benchmark, load, case, impl):
    b, h, sq, skv, d = CASES[case]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, sq, d), dtype=np.float32)
    k = rng.standard_normal((b, h, skv, d), dtype=np.float32)
    v = rng.standard_normal((b, h, skv, d), dtype=np.float32)
    if impl == "torch-sdpa":
        torch = pytest.importorskip("torch")
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def call():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    else:
        threads = 1 if impl == "fastattn-1-thread" else None

        def call():
            return fastattn.flash_attention(q, k, v, num_threads=threads)

    benchmark.group = f"{case} {load}"
    benchmark.extra_info.update(case=case, load=load, impl=impl)
    rounds = 20 if sq == 1 else 5
    # the tiny and short calls as a loop of them runs (a round of one call would time the timer's own
    # bookkeeping around it and a cold instruction cache)
    iterations = 200 if skv <= 16 else 1
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=2)
