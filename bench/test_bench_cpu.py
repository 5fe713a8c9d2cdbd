"""fastattn cpu against NumPy materialized and PyTorch SDPA, one ``benchmark.group`` per workload
so that pytest-benchmark prints the competitors side by side."""

from __future__ import annotations

import numpy as np
import pytest

from fastattn import _bench

IMPLS = [_bench.FASTATTN_CPU, _bench.NUMPY, _bench.TORCH]


def _record_rate(benchmark, flops: int) -> None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["gflops"] = round(flops / stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, workload, impl, bench_threads, bench_rounds):
    if impl == _bench.TORCH:
        pytest.importorskip("torch")
    reason = _bench.unavailable(impl) or _bench.skip_reason(impl, workload)
    if reason:
        pytest.skip(reason)
    q, k, v = workload.inputs()
    call = _bench.make_call(impl, workload, q, k, v, bench_threads)
    benchmark.group = workload.label
    benchmark.extra_info.update(impl=impl, flops=workload.flops, threads=bench_threads)
    with _bench.thread_limit(impl, bench_threads):
        benchmark.pedantic(call, rounds=bench_rounds, iterations=1, warmup_rounds=1)
    _record_rate(benchmark, workload.flops)


def test_matmul_fp32(benchmark, bench_threads, bench_rounds):
    """The same-run yardstick: NumPy fp32 (n, n) @ (n, n), 2·n³ flops."""
    n = _bench.MATMUL_N
    rng = np.random.default_rng()
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    benchmark.group = f"matmul fp32 {n}x{n}"
    with _bench.thread_limit(_bench.NUMPY, bench_threads):
        benchmark.pedantic(lambda: a @ b, rounds=bench_rounds, iterations=1, warmup_rounds=1)
    _record_rate(benchmark, 2 * n**3)
