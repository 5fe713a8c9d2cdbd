"""fastattn cuda against PyTorch SDPA (flash and cuDNN backends), one ``benchmark.group`` per
workload so pytest-benchmark prints the competitors side by side.  Skips without CuPy or a GPU.

    pytest bench/test_bench_cuda.py --benchmark-enable

Timing goes through pytest-benchmark's host clock around a synchronized call (warm-up first);
``python -m fastattn bench --device cuda --compare torch`` times with CUDA events instead.
"""

from __future__ import annotations

import pytest

from fastattn.backends import get_backend

_REASON = get_backend("cuda").availability()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]

#: a slice of the FlashAttention grid (batch * seq = 16k tokens, hidden 2048)
CASES = [(seq, d, causal, dtype) for dtype in ("float16", "bfloat16") for d in (64, 128) for causal in (False, True)
         for seq in (1024, 4096)]
IMPLS = ["fastattn-cuda", "torch-flash", "torch-cudnn"]


def _inputs(seq: int, d: int, dtype: str):
    import cupy

    from fastattn._bench_cuda import HIDDEN, TOKENS, _to_bf16

    shape = (max(1, TOKENS // seq), HIDDEN // d, seq, d)
    rng = cupy.random.default_rng(0)
    out = []
    for _ in range(3):
        x = rng.standard_normal(shape, dtype=cupy.float32)
        out.append(_to_bf16(x, None) if dtype == "bfloat16" else x.astype(dtype))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gpu_case", CASES, ids=lambda c: f"N{c[0]}-D{c[1]}-{'causal' if c[2] else 'full'}-{c[3]}")
def test_cuda_attention(benchmark, gpu_case, impl):
    import cupy

    import fastattn
    from fastattn._bench_cuda import tflops

    seq, d, causal, dtype = gpu_case
    q, k, v = _inputs(seq, d, dtype)
    if impl == "fastattn-cuda":
        def fn():
            return fastattn.flash_attention(q, k, v, causal=causal, backend="cuda")
    else:
        torch = pytest.importorskip("torch")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if impl == "torch-flash" else SDPBackend.CUDNN_ATTENTION
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))

        def fn():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        try:
            fn()
        except RuntimeError as exc:
            pytest.skip(f"{impl} cannot run this shape: {exc}")

    def synced():
        fn()
        cupy.cuda.get_current_stream().synchronize()

    synced()  # compile / warm up outside the timing
    benchmark.group = f"N={seq} D={d} causal={causal} {dtype}"
    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        b, h = q.shape[:2]
        benchmark.extra_info["tflops"] = round(tflops(b, h, seq, d, causal, stats.stats.median * 1e3), 1)
