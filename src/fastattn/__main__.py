"""The command line: ``python -m fastattn {info,memory,bench}``.

    python -m fastattn info                      what this installation can do here
    python -m fastattn memory --seq-lens 1024 4096 --plot mem.png
    python -m fastattn bench                     a few seconds: fastattn vs NumPy materialized
    python -m fastattn bench --compare torch     the full grid against PyTorch's CPU SDPA
    python -m fastattn bench --device cuda       the CUDA backend against torch flash / cuDNN
    python -m fastattn bench --decode            KV-cache decode beside torch SDPA and a memory copy
    python -m fastattn bench --backward          the backward beside torch SDPA's (--memory: peak at N=32k)

Whatever can be checked before a run (arguments, matplotlib and the output folder for
``--plot``, PyTorch for ``--compare torch``) is checked first, so a long run never fails at
its end.  Progress goes to stderr (``--no-progress`` turns it off); tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._bench_variants import VARIANTS

_PEER_NAMES = ("torch", "onnxruntime", "openvino")

#: ``bench --simd``: the environment that holds each library to one instruction set (read when each loads,
#: so the command re-runs itself with it); None: leave that library's own choice
_SIMD_CAPS: dict[str, dict[str, str | None]] = {
    "generic": {"FASTATTN_SIMD": "generic", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41", "OPENBLAS_CORETYPE": "Prescott"},
    "avx2": {"FASTATTN_SIMD": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
    "avx512": {"FASTATTN_SIMD": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": None,
               "ONEDNN_MAX_CPU_ISA": None, "DNNL_MAX_CPU_ISA": None, "OPENBLAS_CORETYPE": None},
}
_SIMD_MARK = "FASTATTN_BENCH_SIMD"   # set in the re-run: the caps are in place


def _rerun_with_simd_caps(simd: str, argv: Sequence[str]) -> int | None:
    """``bench --simd``: re-runs this command with the instruction-set caps in its environment (they must be
    there before NumPy, PyTorch or OpenVINO load); None when this is that re-run."""
    if os.environ.get(_SIMD_MARK) == simd:
        return None
    from .backends import cpu

    if simd not in cpu.simd_paths():
        print(f"fastattn: --simd {simd}: this CPU runs {', '.join(cpu.simd_paths())}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    for name, value in _SIMD_CAPS[simd].items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env.pop("OPENBLAS_L2_SIZE", None)
    env[_SIMD_MARK] = simd
    import subprocess

    return subprocess.call([sys.executable, "-m", "fastattn", *argv], env=env)


def _peer_list(text: str) -> tuple[str, ...]:
    """``--compare torch,onnxruntime,openvino``: the peers, each once, in the order given."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in _PEER_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(_PEER_NAMES)} (comma-separated)")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _plot_problem(dest: str | None) -> str | None:
    """Why ``--plot dest`` could not be written (checked before any work), or None."""
    if not dest:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from ._memory import PLOT_HINT

        return f"--plot needs matplotlib: {PLOT_HINT}"
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):
        return f"--plot {dest}: the folder {folder} does not exist"
    return None


def _check_plot_first(args: argparse.Namespace) -> bool:
    """Prints the problem and returns True when ``--plot`` cannot work."""
    problem = _plot_problem(getattr(args, "plot", None))
    if problem:
        print(f"fastattn: {problem}", file=sys.stderr)
    return problem is not None


def _write_json(data: Any, dest: str) -> None:
    text = json.dumps(data, indent=2, default=str)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")
        print(f"wrote {dest}", file=sys.stderr)


def _pretty(data: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.extend(_pretty(value, indent + 1))
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: {', '.join(map(str, value)) or '(none)'}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    import fastattn

    facts = fastattn.info()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        print("\n".join(_pretty(facts)))
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    import fastattn

    if _check_plot_first(args):
        return 1
    report = fastattn.memory_report(
        seq_lens=args.seq_lens, head_dim=args.head_dim, num_heads=args.heads, batch=args.batch,
        dtype=args.dtype, causal=args.causal, backend=args.backend, num_threads=args.threads,
        measure=not args.no_measure, materialized_limit_bytes=args.limit_mib * 1024**2,
        progress=not args.no_progress,
    )
    if args.json is not None:
        _write_json(report.to_dict(), args.json)
    if args.json != "-":
        print(report)
    if args.plot:
        if _plot_or_explain(report.plot, args.plot):
            return 1
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _cmd_bench_cuda(args: argparse.Namespace) -> int:
    from . import _bench

    try:
        from . import _bench_cuda
    except ImportError as exc:
        print(f"fastattn: the CUDA benchmark is not available here ({exc})", file=sys.stderr)
        return 2
    from . import backends

    reason = backends.get_backend("cuda").availability()
    if reason is not None:
        print(f"fastattn: cannot run the CUDA benchmark: {reason}", file=sys.stderr)
        return 2
    if _check_plot_first(args):
        return 1
    # competitors beside us whenever PyTorch is there: a table of our numbers alone says little
    kwargs: dict[str, Any] = {"compare_torch": "torch" in (args.compare or ()) or _bench.torch_unavailable() is None}
    if args.quick:
        kwargs.update(seqs=_bench.CUDA_QUICK_SEQS, head_dims=_bench.CUDA_QUICK_HEAD_DIMS)
    if args.seqs:
        kwargs["seqs"] = tuple(args.seqs)
    if args.head_dims:
        kwargs["head_dims"] = tuple(args.head_dims)
    failed: list[dict] = []  # competitors that could not run a workload, shown as such

    from tqdm.auto import tqdm

    with tqdm(desc="bench cuda", unit="run", disable=args.no_progress, file=sys.stderr, leave=False) as bar:
        def progress(row: dict) -> None:
            if "error" in row:
                failed.append({**row, "ms": None, "tflops": None, "note": f"not run: {row['error']}"})
            bar.set_postfix_str(f"{row.get('impl')} N={row.get('seq')} D={row.get('head_dim')}")
            bar.update()

        try:
            rows = _bench_cuda.run_cuda_bench(progress=progress, **kwargs)
        except (ImportError, RuntimeError) as exc:
            print(f"fastattn: cannot run the CUDA benchmark: {exc}", file=sys.stderr)
            return 2
    rows = list(rows) + failed
    results = _bench.cuda_results(rows)
    present = {r["impl"] for r in results}
    competitors = [c for c in ("torch-flash", "torch-cudnn") if c in present]
    if not competitors:
        print("note: no PyTorch competitor in this run (ratios need torch-flash / torch-cudnn)", file=sys.stderr)
    if args.json != "-":
        print(_bench.format_table(results, competitors, tera=True))
    if args.json is not None:
        _write_json({"results": results}, args.json)
    if args.plot and _plot_or_explain(_bench.plot, results, args.plot, title="CUDA attention throughput"):
        return 1
    return 0


def _cmd_bench_variant(args: argparse.Namespace) -> int:
    """``bench --variant NAME``: the variant beside the plain kernel and PyTorch's SDPA."""
    from . import _bench

    if args.device == "cuda":
        try:
            from . import _bench_cuda
        except ImportError as exc:
            print(f"fastattn: the CUDA benchmark is not available here ({exc})", file=sys.stderr)
            return 2
        runner = getattr(_bench_cuda, "run_variant_bench", None)
        if runner is None:
            print(f"fastattn: no CUDA benchmark of the {args.variant!r} variant in this version", file=sys.stderr)
            return 2
        rows = runner(args.variant)
        print(_bench_cuda.format_variant_table(rows))
    else:
        from ._bench_variants import format_variant_table, run_variant_bench

        reason = _bench.unavailable(_bench.FASTATTN_CPU)
        if reason:
            print(f"fastattn: the cpu backend is not available ({reason})", file=sys.stderr)
            return 2
        torch_reason = _bench.torch_unavailable()
        if torch_reason:
            print(f"note: {torch_reason}; timing fastattn alone", file=sys.stderr)
        rows = run_variant_bench(args.variant, threads=args.threads, repeat=args.repeat or 3,
                                 compare_torch=torch_reason is None)
        facts = _bench.machine_facts()
        if args.json != "-":
            print(f"CPU attention, {args.variant}, fp32, SIMD {_bench.fastattn_simd()}; "
                  f"{facts.get('cpu', facts['machine'])}")
            print(format_variant_table(rows))
    if args.json is not None:
        _write_json({"variant": args.variant, "rows": rows}, args.json)
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    """``bench --decode``: decode against a KV cache beside PyTorch's SDPA and a memory copy."""
    from . import _bench

    if args.device == "cuda":
        try:
            from . import _bench_decode_cuda as bench_module
        except ImportError as exc:
            print(f"fastattn: the CUDA decode benchmark is not available here ({exc})", file=sys.stderr)
            return 2
        rows = bench_module.run_decode_bench(quick=args.quick)
        title = "CUDA decode against a KV cache"
    else:
        from . import _bench_decode as bench_module

        reason = _bench.unavailable(_bench.FASTATTN_CPU)
        if reason:
            print(f"fastattn: the cpu backend is not available ({reason})", file=sys.stderr)
            return 2
        torch_reason = _bench.torch_unavailable()
        if torch_reason:
            print(f"note: {torch_reason}; timing fastattn and the copy alone", file=sys.stderr)
        rows = bench_module.run_decode_bench(quick=args.quick, threads=args.threads, rounds=args.repeat or 7,
                                             compare_torch=torch_reason is None, limit_mib=args.limit_mib)
        facts = _bench.machine_facts()
        title = (f"CPU decode against a KV cache (seq_q 1, K+V read per second), SIMD {_bench.fastattn_simd()}; "
                 f"{facts.get('cpu', facts['machine'])}")
    if args.json != "-":
        print(title)
        print(bench_module.format_decode_table(rows))
    if args.json is not None:
        _write_json({"decode": rows}, args.json)
    return 0


def _cmd_bench_backward(args: argparse.Namespace) -> int:
    """``bench --backward``: the backward beside PyTorch's SDPA backward (``--memory``: peak memory at N=32k)."""
    from . import _bench

    if args.device == "cuda":
        try:
            from . import _bench_backward_cuda as cuda_bench
        except ImportError as exc:
            print(f"fastattn: the CUDA backward benchmark is not available in this version ({exc})", file=sys.stderr)
            return 2
        rows = cuda_bench.run_backward_bench(quick=args.quick)
        if args.json != "-":
            print(cuda_bench.format_backward_table(rows))
        if args.json is not None:
            _write_json({"backward": rows}, args.json)
        return 0
    from . import _bench_backward

    torch_reason = _bench.torch_unavailable()
    if torch_reason:
        print(f"note: {torch_reason}; timing fastattn alone", file=sys.stderr)
    facts = _bench.machine_facts()
    report: dict[str, Any] = {"facts": facts}
    if args.memory:
        seq = args.seqs[0] if args.seqs else 32768
        head_dim = args.head_dims[0] if args.head_dims else 64
        heads = args.heads if args.heads != 8 else 4  # the shape: H=4 unless asked
        rows = _bench_backward.run_memory_bench(compare_torch=torch_reason is None, seq=seq, heads=heads,
                                                head_dim=head_dim, threads=args.threads)
        report["memory"] = rows
        if args.json != "-":
            print(f"Peak resident memory of one forward + backward (a child process each, ru_maxrss), above the "
                  f"inputs; {facts.get('cpu', facts['machine'])}")
            print(_bench_backward.format_memory_table(rows))
    else:
        from tqdm.auto import tqdm

        rounds = args.repeat or (3 if args.quick else 5)
        with tqdm(desc="bench backward", unit="shape", disable=args.no_progress, file=sys.stderr,
                  leave=False) as bar:
            rows = _bench_backward.run_backward_bench(
                quick=args.quick, threads=args.threads, rounds=rounds, compare_torch=torch_reason is None,
                seqs=tuple(args.seqs) if args.seqs else None,
                head_dims=tuple(args.head_dims) if args.head_dims else None, heads=args.heads, batch=args.batch,
                progress=lambda row: bar.update(1))
        report["backward"] = rows
        if args.json != "-":
            print(_bench_backward.table_title(rows, facts, args.threads, rounds))
            print(_bench_backward.format_backward_table(rows))
    if args.json is not None:
        _write_json(report, args.json)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    if args.memory and not args.backward:
        print("fastattn: --memory goes with --backward (for the forward: python -m fastattn memory)", file=sys.stderr)
        return 2
    if args.simd and args.device != "cuda":  # every CPU table: re-run with the peers held to that instruction set
        status = _rerun_with_simd_caps(args.simd, args.argv)
        if status is not None:
            return status
    if args.backward:
        if args.decode or args.variant:
            print("fastattn: choose one of --backward, --decode and --variant", file=sys.stderr)
            return 2
        return _cmd_bench_backward(args)
    if args.decode:
        if args.variant:
            print("fastattn: choose one of --decode and --variant", file=sys.stderr)
            return 2
        return _cmd_bench_decode(args)
    if args.variant:
        return _cmd_bench_variant(args)
    if args.device == "cuda":
        return _cmd_bench_cuda(args)
    if _check_plot_first(args):
        return 1
    from . import _bench_peers

    compare_torch = "torch" in (args.compare or ())
    torch_reason = _bench.torch_unavailable() if compare_torch else None
    peers = []
    for name in args.compare or ():
        if name == "torch":
            continue
        impl = _bench_peers.PEERS[name]
        reason = _bench.unavailable(impl)
        if reason:
            print(f"note: {reason}; skipping it", file=sys.stderr)
        else:
            peers.append(impl)
    if args.quick:
        seqs, head_dims = _bench.QUICK_SEQS, _bench.QUICK_HEAD_DIMS
    elif (compare_torch and torch_reason is None) or peers:
        seqs, head_dims = _bench.FULL_SEQS, _bench.FULL_HEAD_DIMS
    else:
        seqs, head_dims = _bench.DEFAULT_SEQS, _bench.DEFAULT_HEAD_DIMS
    if torch_reason:
        grid_name = "the grid asked for" if args.quick or args.seqs or args.head_dims else "the short grid"
        print(f"note: {torch_reason}; running {grid_name} against NumPy only", file=sys.stderr)
    seqs = args.seqs or seqs
    head_dims = args.head_dims or head_dims
    workloads = _bench.grid(seqs, head_dims, batch=args.batch, heads=args.heads)
    impls = _bench.implementations(compare_torch and torch_reason is None, peers)
    cpu_reason = _bench.unavailable(_bench.FASTATTN_CPU)
    if cpu_reason:
        print(f"note: fastattn's cpu backend is not available ({cpu_reason}); timing the float64 reference "
              f"oracle instead, up to N={_bench.REFERENCE_MAX_SEQ}", file=sys.stderr)
    full = ((compare_torch and torch_reason is None) or bool(peers)) and not args.quick
    repeat = args.repeat if args.repeat is not None else (5 if full else 3)
    run = _bench.run_cpu_bench(workloads, impls, threads=args.threads, repeat=repeat,
                               progress=not args.no_progress, measure_matmul=bool(args.compare))
    competitors = [_bench.TORCH] if _bench.TORCH in impls else []
    competitors += peers
    best_of = list(competitors)
    competitors.append(_bench.NUMPY)
    facts = _bench.machine_facts()
    if args.json != "-":
        print(_bench.header(run["results"], requested=args.threads, repeat=repeat, facts=facts))
        if os.environ.get(_SIMD_MARK):
            held = ", ".join(["fastattn"] + [n for n in ("torch-sdpa", "openvino-sdpa") if n in impls] + ["the matmul"])
            free = " (ONNX Runtime has no switch: its row ran with every instruction set the CPU has)" \
                if _bench_peers.ONNXRT in impls else ""
            print(f"--simd {os.environ[_SIMD_MARK]}: {held} held to that instruction set{free}")
        print(_bench.format_table(run["results"], competitors, matmul_gflops=run["matmul_gflops"], best_of=best_of))
    if args.json is not None:
        _write_json({"machine": facts, "repeat": repeat, "threads_requested": args.threads,
                     "simd_held": os.environ.get(_SIMD_MARK), **run}, args.json)
    if args.plot:
        title = f"CPU attention, fp32, {facts['simd']}; threads: {_bench.threads_summary(run['results'])}"
        if _plot_or_explain(_bench.plot, run["results"], args.plot, title=title):
            return 1
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn: exact memory-efficient attention")
    parser.add_argument("--version", action="version", version=f"fastattn {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,memory,bench}")

    p = sub.add_parser("info", help="version, backends, SIMD, threads, caches",
                       description="What this installation can do here: backends (and why one is missing), "
                                   "the SIMD path, the default thread count, cache sizes.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "memory", help="estimated and measured memory of the flash and materialized paths",
        description="Peak memory of one call, estimated (fastattn.memory_savings) and measured (each call alone "
                    "in a fresh process), for the flash path and the materialized path. Units: KiB, MiB, GiB.")
    p.add_argument("--seq-lens", type=_positive_int, nargs="+", default=[512, 1024, 2048, 4096], metavar="N",
                   help="sequence lengths (queries = keys) (default: 512 1024 2048 4096)")
    p.add_argument("--head-dim", type=_positive_int, default=64, metavar="D", help="head dim (default: 64)")
    p.add_argument("--heads", type=_positive_int, default=8, metavar="H", help="heads per batch entry (default: 8)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default: 1)")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"],
                   help="input dtype; float16/bfloat16 are computed in float32 (default: float32)")
    p.add_argument("--causal", action="store_true", help="top-left causal mask")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "reference"],
                   help="backend of the flash path; auto: cpu where it is compiled (default: auto)")
    p.add_argument("--threads", type=_positive_int, metavar="T",
                   help="num_threads of the flash call (default: OpenMP's default)")
    p.add_argument("--no-measure", action="store_true", help="estimates only, run nothing")
    p.add_argument("--limit-mib", type=_positive_int, default=4096, metavar="MIB",
                   help="skip a measurement whose estimated need exceeds this many MiB (default: 4096)")
    p.add_argument("--plot", metavar="OUT.png",
                   help="also write a PNG of estimate and measured peak against N (needs matplotlib)")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT.json",
                   help="write the report as JSON to a file, or to stdout without a name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser(
        "bench", help="time fastattn against NumPy materialized and PyTorch",
        description="Times fastattn beside the materialized NumPy path (and PyTorch's SDPA with --compare torch): "
                    "fp32 self-attention, median of --repeat calls after a warm-up. Workloads are labelled "
                    "B<batch> H<heads> N<sequence length> D<head dim>.")
    p.add_argument("--compare", type=_peer_list, metavar="PEERS",
                   help="the full grid beside the peers named, comma-separated: torch (PyTorch's CPU SDPA), "
                        "onnxruntime (com.microsoft.MultiHeadAttention), openvino (opset-13 SDPA, f32); each "
                        "skipped with a note when not installed; the fp32 matmul rate as a yardstick "
                        "(--compare torch without PyTorch: the short grid, NumPy only)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu, or cuda: the CUDA backend beside PyTorch's flash and cuDNN kernels (default: cpu)")
    p.add_argument("--variant", choices=list(VARIANTS),
                   help="time one variant (GQA, sliding window, softcap, ALiBi, attn_mask, packed varlen, the "
                        "(batch, seq, heads, dim) layout) beside fastattn's plain kernel and PyTorch's SDPA given the "
                        "same call")
    p.add_argument("--decode", action="store_true",
                   help="KV-cache decode (one query per sequence against a cache, D=128): K+V bytes read per second "
                        "for a contiguous and a paged cache beside PyTorch's SDPA and a same-run memory copy")
    p.add_argument("--backward", action="store_true",
                   help="the backward pass (fp32, B=1 H=8, N 1024-4096, D 64/128, causal and not; forward not timed) "
                        "beside PyTorch's CPU SDPA backward on the same inputs; GFLOP/s count the backward as 2.5x "
                        "the forward's FLOPs; with --device cuda the GPU backward benchmark")
    p.add_argument("--memory", action="store_true",
                   help="--backward: peak resident memory of one forward + backward at N=32k (B=1 H=4 D=64 fp32; "
                        "--seqs / --head-dims / --heads change it) above inputs, outputs and gradients, in a child "
                        "process each, beside PyTorch's")
    p.add_argument("--limit-mib", type=_positive_int, default=4096, metavar="MIB",
                   help="--decode: skip shapes whose caches need more memory than this (default: 4096)")
    p.add_argument("--simd", choices=list(_SIMD_CAPS),
                   help="CPU: run fastattn on this SIMD path (FASTATTN_SIMD) and hold the peers to the same "
                        "instruction set where they have a switch: PyTorch (ATEN_CPU_CAPABILITY, MKL), OpenVINO and "
                        "PyTorch's oneDNN (ONEDNN_MAX_CPU_ISA), NumPy's OpenBLAS for the matmul yardstick "
                        "(OPENBLAS_CORETYPE); ONNX Runtime has none, so its row says it ran unrestricted. The "
                        "command re-runs itself with that environment")
    p.add_argument("--quick", action="store_true", help="a small grid (a few seconds)")
    p.add_argument("--seqs", type=_positive_int, nargs="+", metavar="N",
                   help="sequence lengths (queries = keys), replacing the grid's")
    p.add_argument("--head-dims", type=_positive_int, nargs="+", metavar="D", help="head dims, replacing the grid's")
    p.add_argument("--heads", type=_positive_int, default=8, metavar="H", help="heads (CPU grid; default: 8)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (CPU grid; default: 1)")
    p.add_argument("--threads", type=_positive_int, metavar="T",
                   help="hold every implementation to T threads (default: each library's own default)")
    p.add_argument("--repeat", type=_positive_int, metavar="R",
                   help="timed calls per measurement, the median is reported (default: 5 for the full grid, else 3)")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT.json",
                   help="write the results as JSON to a file, or to stdout without a name")
    p.add_argument("--plot", metavar="OUT.png", help="GFLOP/s against N per implementation (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (argparse errors exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `python -m fastattn bench --json | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _plot_or_explain(plot: Any, *args: Any, **kwargs: Any) -> int:
    """Runs a plot call; a missing matplotlib is a message and status 1, not a traceback."""
    try:
        plot(*args, **kwargs)
    except ImportError as exc:
        if "needs matplotlib" not in str(exc):
            raise
        print(f"fastattn: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
