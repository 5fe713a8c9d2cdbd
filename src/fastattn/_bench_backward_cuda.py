"""GPU benchmark of the backward pass: fastattn forward + backward beside PyTorch SDPA's flash
(FlashAttention-2) and cuDNN backends.

FlashAttention's grid (``_bench_cuda.workload_grid``): batch * seq = 16384 tokens, hidden 2048, seq
512 .. 16k, head_dim 64 / 128, float16 / bfloat16, causal and not.  FLOPs are FlashAttention's convention:
forward F = 4 * batch * heads * seq^2 * head_dim (halved for causal), backward 2.5 F, forward + backward
3.5 F.  Every implementation runs in the same process on the same buffers (CuPy arrays shared zero-copy
with torch); times are ``triton.testing.do_bench`` medians (CUDA events on the current stream).

    python -m fastattn._bench_backward_cuda [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ._bench_cuda import _device_name, _to_bf16, workload_grid

SEQS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQS = (1024, 4096, 16384)
IMPLS = ("fastattn", "torch-flash", "torch-cudnn")


def _forward_flops(w: dict) -> float:
    return 4.0 * w["batch"] * w["heads"] * w["seq"] ** 2 * w["head_dim"] / (2.0 if w["causal"] else 1.0)


def _bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _fastattn_fns(q: Any, k: Any, v: Any, do: Any, causal: bool, deterministic: bool) -> tuple:
    import fastattn

    def fwd() -> Any:
        return fastattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="cuda")

    out, lse = fwd()

    def bwd() -> Any:
        return fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal, backend="cuda",
                                                 deterministic=deterministic)

    def both() -> Any:
        o, lse_ = fwd()
        return fastattn.flash_attention_backward(do, q, k, v, o, lse_, causal=causal, backend="cuda",
                                                 deterministic=deterministic)

    return fwd, bwd, both


def _torch_fns(torch: Any, backend: Any, q: Any, k: Any, v: Any, do: Any, causal: bool) -> tuple:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
    tdo = torch.from_dlpack(do)

    def fwd() -> Any:
        with torch.nn.attention.sdpa_kernel([backend]):
            return sdpa(tq, tk, tv, is_causal=causal)

    out = fwd()

    def bwd() -> Any:
        return torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True)

    def both() -> Any:
        return torch.autograd.grad(fwd(), (tq, tk, tv), tdo)

    return fwd, bwd, both


def run_backward_bench(quick: bool = False, *, deterministic: bool = False,
                       progress: Callable[[dict], Any] | None = None) -> list[dict]:
    """One dict per (workload, implementation): device, batch, heads, seq, head_dim, causal, dtype, impl,
    fwd_ms, bwd_ms, fwd_bwd_ms and TFLOP/s of each (backward 2.5x, forward + backward 3.5x the forward's
    FLOPs).  ``quick``: float16, seq 1k / 4k / 16k.  A torch backend that cannot run a shape is left out."""
    from .backends import require

    require("cuda")
    import cupy

    torch = None
    try:
        import torch as _torch

        if _torch.cuda.is_available():
            torch = _torch
    except ImportError:
        pass
    backends: dict[str, Any] = {}
    if torch is not None:
        from torch.nn.attention import SDPBackend

        backends = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION}

    device = _device_name()
    dtypes = ("float16",) if quick else ("float16", "bfloat16")
    rows: list[dict] = []
    rng = cupy.random.default_rng(0)
    for w in workload_grid(QUICK_SEQS if quick else SEQS, (64, 128), dtypes, (False, True)):
        shape = (w["batch"], w["heads"], w["seq"], w["head_dim"])
        arrays = []
        for _ in range(4):
            x = rng.standard_normal(shape, dtype=cupy.float32)
            arrays.append(_to_bf16(x, torch) if w["dtype"] == "bfloat16" else x.astype(w["dtype"]))
        q, k, v, do = arrays
        flops = _forward_flops(w)
        args = (q, k, v, do, w["causal"])
        impls = {"fastattn": lambda args=args: _fastattn_fns(*args, deterministic)}
        for name, backend in backends.items():
            impls[name] = lambda backend=backend, args=args: _torch_fns(torch, backend, *args)
        for name, make in impls.items():
            try:
                fwd, bwd, both = make()
                fwd_ms, bwd_ms, both_ms = _bench(fwd), _bench(bwd), _bench(both)
            except Exception as exc:  # noqa: BLE001 - a competitor that cannot run this shape is left out
                if name == "fastattn":
                    raise
                if progress is not None:
                    progress({**w, "device": device, "impl": name, "error": str(exc).splitlines()[0]})
                continue
            row = {"device": device, **w, "impl": name, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": both_ms,
                   "fwd_tflops": flops / fwd_ms / 1e9, "bwd_tflops": 2.5 * flops / bwd_ms / 1e9,
                   "fwd_bwd_tflops": 3.5 * flops / both_ms / 1e9}
            rows.append(row)
            if progress is not None:
                progress(row)
        del q, k, v, do, arrays, args, impls
        if torch is not None:
            torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def format_backward_table(rows: list[dict]) -> str:
    """One line per workload: TFLOP/s of the backward and of forward + backward for each implementation,
    and fastattn's forward + backward ratio to each torch backend."""
    keys = sorted({(r["dtype"], r["head_dim"], r["causal"], r["seq"]) for r in rows})
    by = {(r["dtype"], r["head_dim"], r["causal"], r["seq"], r["impl"]): r for r in rows}

    def val(row: dict | None, field: str) -> str:
        return f"{row[field]:.0f}" if row else "-"

    def ratio(a: dict | None, b: dict | None) -> str:
        return f"{a['fwd_bwd_tflops'] / b['fwd_bwd_tflops']:.2f}x" if (a and b) else "-"

    lines = ["TFLOP/s: backward counted as 2.5x, forward + backward as 3.5x the forward's FLOPs",
             f"{'dtype':9} {'D':>4} {'causal':>6} {'N':>6} | {'bwd: ours':>9} {'flash':>6} {'cudnn':>6} | "
             f"{'fwd+bwd: ours':>13} {'flash':>6} {'cudnn':>6} | {'vs flash':>8} {'vs cudnn':>8}"]
    for key in keys:
        ours, fl, cd = (by.get((*key, impl)) for impl in IMPLS)
        lines.append(f"{key[0]:9} {key[1]:>4} {str(key[2]):>6} {key[3]:>6} | {val(ours, 'bwd_tflops'):>9} "
                     f"{val(fl, 'bwd_tflops'):>6} {val(cd, 'bwd_tflops'):>6} | {val(ours, 'fwd_bwd_tflops'):>13} "
                     f"{val(fl, 'fwd_bwd_tflops'):>6} {val(cd, 'fwd_bwd_tflops'):>6} | {ratio(ours, fl):>8} "
                     f"{ratio(ours, cd):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="float16, seq 1k / 4k / 16k")
    parser.add_argument("--deterministic", action="store_true", help="fastattn with deterministic=True")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    def show(row: dict) -> None:
        if "error" in row:
            print(f"  {row['impl']} skipped N={row['seq']} D={row['head_dim']}: {row['error']}", file=sys.stderr)
        else:
            print(f"  {row['dtype']} D={row['head_dim']} causal={row['causal']} N={row['seq']} {row['impl']}: "
                  f"fwd {row['fwd_tflops']:.0f}, bwd {row['bwd_tflops']:.0f}, fwd+bwd {row['fwd_bwd_tflops']:.0f} "
                  "TFLOP/s", file=sys.stderr, flush=True)

    rows = run_backward_bench(args.quick, deterministic=args.deterministic, progress=show)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(format_backward_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
