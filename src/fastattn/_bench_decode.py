"""The decode benchmark on the CPU (``python -m fastattn bench --decode``): one query per sequence against a
KV cache, the speed limit being how fast K and V can be read.

Each shape times, in this process, in interleaved rounds (every implementation once per round, the median
over rounds kept, so a slow spell of a busy machine falls on all of them alike):

- ``fastattn``: ``flash_attention_with_kvcache`` on a contiguous (batch, seq, heads_kv, d) cache;
- ``paged``: the same tokens in a paged cache (block_size 16, blocks shuffled);
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same cache viewed as
  (batch, heads_kv, seq, d) (``enable_gqa=True`` for grouped heads), where PyTorch is installed;
- ``copy``: ``numpy.copyto`` of K and V into a preallocated array: the memory bandwidth reference.

Rates are K+V bytes read per second (GB/s = 1e9 B/s), the same count for every column (the copy's
writes are not counted: its rate is what reading the cache while writing a copy of it achieves).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    batch: int
    heads: int
    heads_kv: int
    cache: int  # cached tokens per sequence
    head_dim: int = 128
    dtype: str = "float32"  # q and cache

    @property
    def label(self) -> str:
        return (f"B{self.batch} H{self.heads}/{self.heads_kv} {self.cache // 1024}k D{self.head_dim} "
                f"{'bf16' if self.dtype == 'bfloat16' else 'fp32'}")

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.cache * self.heads_kv * self.head_dim * np.dtype(_np_dtype(self.dtype)).itemsize


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def decode_grid(quick: bool = False) -> list[DecodeShape]:
    """batch {1, 4} x heads 32/32 and 32/8 x cache 4k..32k, D=128, fp32 and a bf16 cache (quick: a few)."""
    if quick:
        return [DecodeShape(1, 32, 8, 4096), DecodeShape(1, 32, 32, 4096),
                DecodeShape(1, 32, 8, 4096, dtype="bfloat16")]
    shapes = []
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 4):
            for heads_kv in (32, 8):
                for cache in (4096, 16384, 32768):
                    shapes.append(DecodeShape(batch, 32, heads_kv, cache, dtype=dtype))
    return shapes


def _median_rounds(calls: dict[str, Callable[[], Any]], rounds: int, min_seconds: float = 0.02) -> dict[str, float]:
    """Seconds per call of each implementation: interleaved rounds, each timing enough calls to last
    ``min_seconds``, the median over rounds."""
    inner = {}
    for name, fn in calls.items():
        fn()  # warm up (and size the inner loop)
        start = time.perf_counter()
        fn()
        one = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, int(min_seconds / one))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _torch_call(shape: DecodeShape, q: np.ndarray, kc: np.ndarray, vc: np.ndarray) -> Callable[[], Any] | None:
    from ._bench import torch_unavailable

    if torch_unavailable():
        return None
    import torch

    def tensor(a: np.ndarray) -> Any:
        if shape.dtype == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    qt = tensor(q).transpose(1, 2)  # (b, h, 1, d) views of the caller's (b, 1, h, d) arrays: no copies
    kt, vt = tensor(kc).transpose(1, 2), tensor(vc).transpose(1, 2)
    gqa = shape.heads != shape.heads_kv
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run() -> Any:
        with torch.no_grad():
            return sdpa(qt, kt, vt, enable_gqa=gqa) if gqa else sdpa(qt, kt, vt)

    return run


def _paged(rng: np.random.Generator, kc: np.ndarray, vc: np.ndarray, block_size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch, seq = kc.shape[:2]
    per = -(-seq // block_size)
    table = rng.permutation(batch * per).reshape(batch, per).astype(np.int32)
    kp = np.empty((batch * per, block_size, *kc.shape[2:]), kc.dtype)
    vp = np.empty_like(kp)
    for b in range(batch):
        for j in range(per):
            n = min(block_size, seq - j * block_size)
            kp[table[b, j], :n] = kc[b, j * block_size:j * block_size + n]
            vp[table[b, j], :n] = vc[b, j * block_size:j * block_size + n]
    return kp, vp, table


def _time_shape(shape: DecodeShape, rng: np.random.Generator, threads: int | None, rounds: int,
                compare_torch: bool, block_size: int) -> dict[str, float]:
    import fastattn

    from ._bench import thread_limit

    dt = _np_dtype(shape.dtype)
    cache_shape = (shape.batch, shape.cache, shape.heads_kv, shape.head_dim)
    kc = rng.standard_normal(cache_shape, dtype=np.float32).astype(dt)
    vc = rng.standard_normal(cache_shape, dtype=np.float32).astype(dt)
    q = rng.standard_normal((shape.batch, 1, shape.heads, shape.head_dim), dtype=np.float32).astype(dt)
    kp, vp, table = _paged(rng, kc, vc, block_size)
    target = np.empty_like(kc)

    def contiguous() -> Any:
        return fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=shape.cache, num_threads=threads)

    def paged() -> Any:
        return fastattn.flash_attention_with_kvcache(q, kp, vp, cache_seqlens=shape.cache, block_table=table,
                                                     num_threads=threads)

    def copy() -> None:
        np.copyto(target, kc)
        np.copyto(target, vc)

    calls: dict[str, Callable[[], Any]] = {"fastattn": contiguous, "paged": paged, "copy": copy}
    torch_call = _torch_call(shape, q, kc, vc) if compare_torch else None
    if torch_call is not None:
        calls["torch"] = torch_call
    np.testing.assert_allclose(np.asarray(paged(), np.float32), np.asarray(contiguous(), np.float32),
                               rtol=1e-3, atol=1e-3)  # the two cache forms agree
    with thread_limit("fastattn-cpu", threads), thread_limit("torch-sdpa", threads):
        return _median_rounds(calls, rounds)


def run_decode_bench(*, quick: bool = False, threads: int | None = None, rounds: int = 7,
                     compare_torch: bool = True, limit_mib: int = 4096, block_size: int = 16) -> list[dict]:
    """One row per shape: the four rates (see the module docstring); shapes whose cache (times three:
    contiguous, paged and the copy's target) passes ``limit_mib`` are skipped with a note."""
    rng = np.random.default_rng(0)
    rows = []
    for shape in decode_grid(quick):
        base = dict(case=shape.label, kv_bytes=shape.kv_bytes, batch=shape.batch, heads=shape.heads,
                    heads_kv=shape.heads_kv, cache=shape.cache, head_dim=shape.head_dim, dtype=shape.dtype)
        if 3 * shape.kv_bytes > limit_mib * 2**20:
            rows.append({**base, "note": f"skipped: needs {3 * shape.kv_bytes / 2**20:.0f} MiB (--limit-mib)"})
            continue
        seconds = _time_shape(shape, rng, threads, rounds, compare_torch, block_size)
        rows.append({**base, **{f"{name}_gbs": shape.kv_bytes / s / 1e9 for name, s in seconds.items()},
                     **{f"{name}_us": s * 1e6 for name, s in seconds.items()}})
    return rows


def format_decode_table(rows: list[dict]) -> str:
    lines = ["| shape | fastattn GB/s | paged GB/s | torch SDPA GB/s | NumPy copy GB/s | vs torch | vs copy | "
             "paged / contiguous |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['case']} | {r['note']} |||||||")
            continue
        t = r.get("torch_gbs")
        lines.append(f"| {r['case']} | {r['fastattn_gbs']:.1f} | {r['paged_gbs']:.1f} | "
                     + (f"{t:.1f}" if t else "-") + f" | {r['copy_gbs']:.1f} | "
                     + (f"{r['fastattn_gbs'] / t:.2f}x" if t else "-")
                     + f" | {r['fastattn_gbs'] / r['copy_gbs']:.2f} | {r['paged_gbs'] / r['fastattn_gbs']:.2f} |")
    return "\n".join(lines)
