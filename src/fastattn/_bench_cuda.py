"""GPU benchmark: fastattn's CUDA backend beside PyTorch's SDPA (flash and cuDNN backends).

FlashAttention's benchmark grid: batch * seq = 16384 tokens, hidden 2048 (heads = 2048 / head_dim),
seq in {512 .. 16k}, head_dim in {64, 128}, float16 / bfloat16, causal and not.
TFLOP/s = 4 * batch * heads * seq^2 * head_dim / time, halved for causal.

Every implementation runs on the same GPU, in the same process, on the same input buffers
(CuPy arrays shared zero-copy with torch).  Times are CUDA-event medians after a warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

TOKENS = 16384
HIDDEN = 2048


def workload_grid(seqs: Iterable[int], head_dims: Iterable[int], dtypes: Iterable[str],
                  causal: Iterable[bool]) -> list[dict]:
    grid = []
    for dtype in dtypes:
        for d in head_dims:
            for c in causal:
                for n in seqs:
                    grid.append(dict(batch=max(1, TOKENS // n), heads=HIDDEN // d, seq=n, head_dim=d, causal=c,
                                     dtype=dtype))
    return grid


def tflops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, ms: float) -> float:
    flops = 4.0 * batch * heads * seq * seq * head_dim / (2.0 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def time_ms(fn: Callable[[], Any], *, warmup_ms: float = 50.0, rep_ms: float = 200.0, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn`` on the current CuPy stream, timed with CUDA events."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    fn()
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    once = max(cupy.cuda.get_elapsed_time(start, end), 1e-3)
    for _ in range(max(1, int(warmup_ms / once))):
        fn()
    reps = max(5, min(max_reps, int(rep_ms / once)))
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for a, b in events:
        a.record(stream)
        fn()
        b.record(stream)
    events[-1][1].synchronize()
    times = sorted(cupy.cuda.get_elapsed_time(a, b) for a, b in events)
    return float(times[len(times) // 2])


def _device_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _torch_impls(torch: Any) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION}


def run_cuda_bench(*, compare_torch: bool = True, dtypes: Iterable[str] = ("float16", "bfloat16"),
                   seqs: Iterable[int] = (512, 1024, 2048, 4096, 8192, 16384), head_dims: Iterable[int] = (64, 128),
                   causal: Iterable[bool] = (False, True),
                   progress: Callable[[dict], Any] | None = None) -> list[dict]:
    """One dict per (workload, implementation): device, batch, heads, seq, head_dim, causal, dtype,
    impl ("fastattn-cuda", "torch-flash", "torch-cudnn"), ms, tflops.

    ``progress`` (if given) is called with each dict as it is measured.  torch implementations that
    cannot run a workload (or a missing torch) are left out rather than failing the run.
    """
    from .backends import require

    require("cuda")
    import cupy

    import fastattn

    torch = None
    if compare_torch:
        try:
            import torch as _torch

            if _torch.cuda.is_available():
                torch = _torch
        except ImportError:
            torch = None

    device = _device_name()
    rows: list[dict] = []
    rng = cupy.random.default_rng(0)
    for w in workload_grid(seqs, head_dims, dtypes, causal):
        shape = (w["batch"], w["heads"], w["seq"], w["head_dim"])
        dtype = cupy.dtype(w["dtype"]) if w["dtype"] != "bfloat16" else None
        qkv = []
        for _ in range(3):
            x = rng.standard_normal(shape, dtype=cupy.float32)
            if dtype is None:  # bfloat16: let torch (or CuPy 14) convert
                x = _to_bf16(x, torch)
            else:
                x = x.astype(dtype)
            qkv.append(x)
        q, k, v = qkv

        impls: dict[str, Callable[[], Any]] = {
            "fastattn-cuda": lambda q=q, k=k, v=v, c=w["causal"]: fastattn.flash_attention(
                q, k, v, causal=c, backend="cuda"),
        }
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            for name, backend in _torch_impls(torch).items():
                def run(tq=tq, tk=tk, tv=tv, c=w["causal"], backend=backend):
                    with torch.nn.attention.sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=c)
                impls[name] = run
        for name, fn in impls.items():
            try:
                ms = time_ms(fn)
            except Exception as exc:  # noqa: BLE001 - a competitor that cannot run this shape is skipped
                if name == "fastattn-cuda":
                    raise
                if progress is not None:
                    progress({**w, "device": device, "impl": name, "error": str(exc).splitlines()[0]})
                continue
            row = {"device": device, **w, "impl": name, "ms": ms,
                   "tflops": tflops(w["batch"], w["heads"], w["seq"], w["head_dim"], w["causal"], ms)}
            rows.append(row)
            if progress is not None:
                progress(row)
        del q, k, v, qkv, impls
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _to_bf16(x: Any, torch: Any) -> Any:
    import cupy

    try:
        return x.astype("bfloat16")
    except Exception:  # noqa: BLE001 - CuPy without bfloat16 casts: go through torch
        if torch is None:
            raise
        return cupy.from_dlpack(torch.from_dlpack(x).to(torch.bfloat16))


def format_table(rows: list[dict]) -> str:
    """Side-by-side table: one line per workload, TFLOP/s of each impl and fastattn's ratios."""
    keys = sorted({(r["dtype"], r["head_dim"], r["causal"], r["seq"]) for r in rows})
    by = {(r["dtype"], r["head_dim"], r["causal"], r["seq"], r["impl"]): r for r in rows}
    lines = [f"{'dtype':9} {'D':>4} {'causal':>6} {'N':>6} {'fastattn':>9} {'flash':>7} {'cudnn':>7} "
             f"{'vs flash':>8} {'vs cudnn':>8}"]
    for key in keys:
        ours = by.get((*key, "fastattn-cuda"))
        fl = by.get((*key, "torch-flash"))
        cd = by.get((*key, "torch-cudnn"))
        lines.append(f"{key[0]:9} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} {_fmt(ours):>9} {_fmt(fl):>7} "
                     f"{_fmt(cd):>7} {_ratio(ours, fl):>8} {_ratio(ours, cd):>8}")
    return "\n".join(lines)


def _fmt(row: dict | None) -> str:
    return f"{row['tflops']:.1f}" if row else "-"


def _ratio(ours: dict | None, other: dict | None) -> str:
    return f"{ours['tflops'] / other['tflops']:.2f}x" if (ours and other) else "-"
