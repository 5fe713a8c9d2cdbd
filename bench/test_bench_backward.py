"""The backward: fastattn's cpu ``flash_attention_backward`` beside PyTorch's CPU SDPA backward, one
``benchmark.group`` per shape of ``fastattn._bench_backward.backward_grid`` (the grid of ``bench --backward``).
The forward is not timed: both sides start from the forward's output (fastattn: out and lse; PyTorch: the
autograd graph of one SDPA call, replayed with ``retain_graph=True``)."""

from __future__ import annotations

import numpy as np
import pytest

import fastattn
from fastattn import _bench_backward


def _shapes(config: pytest.Config) -> list:
    return _bench_backward.backward_grid(quick=config.getoption("--bench-grid") == "quick")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[s.label.replace(" ", "-") for s in shapes])


@pytest.mark.parametrize("impl", ["fastattn", "torch"])
def test_backward(benchmark, shape, impl, bench_threads, bench_rounds):
    rng = np.random.default_rng(0)
    dims = (shape.batch, shape.heads, shape.seq, shape.head_dim)
    q, k, v, dout = (rng.standard_normal(dims, dtype=np.float32) for _ in range(4))
    if impl == "torch":
        torch = pytest.importorskip("torch")
        if bench_threads:
            torch.set_num_threads(bench_threads)
        call, _ = _bench_backward._torch_backward(q, k, v, dout, shape.causal)
    else:
        out, lse = fastattn.flash_attention(q, k, v, causal=shape.causal, return_lse=True, num_threads=bench_threads)

        def call():
            return fastattn.flash_attention_backward(dout, q, k, v, out, lse, causal=shape.causal,
                                                     num_threads=bench_threads)

    benchmark.group = f"backward {shape.label}"
    benchmark.extra_info.update(impl=impl, flops=shape.backward_flops, threads=bench_threads)
    benchmark.pedantic(call, rounds=bench_rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gflops"] = round(shape.backward_flops / stats.stats.median / 1e9, 2)
