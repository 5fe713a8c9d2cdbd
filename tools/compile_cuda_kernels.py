#!/usr/bin/env python3
"""Compile every CUDA kernel specialization of fastattn with the local ``nvcc`` (CI; no GPU needed).

    python tools/compile_cuda_kernels.py [--arch sm_80 --arch sm_90] [--jobs N] [--resource-usage]

Writes one translation unit per chunk of specializations that takes the address of each template
instance (``all_name_expressions()``, the same list the backend launches from), compiles it to a
cubin for every architecture, and exits non-zero if any compilation fails; the KV-cache kernels of
``decode.cu`` (``all_decode_name_expressions()``) and the backward pass of ``flash_bwd.cu``
(``all_bwd_name_expressions()``) likewise, for every architecture.  The Hopper kernel
(``all_sm90_name_expressions()``, ``wgmma``) and the Hopper backward (``all_sm90_bwd_name_expressions()``,
``flash_bwd_sm90.cu``) are compiled for their own target, sm_90a, whenever the
architectures asked for include sm_90.  Without ``nvcc`` on the
PATH (or under $CUDA_HOME/bin, /usr/local/cuda/bin) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fastattn.backends.cuda import _specs  # noqa: E402  (pure Python, no CuPy)


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


SM90A = "sm_90a"


def translation_unit(names: list[str], source: str = _specs.KERNEL_SOURCE) -> str:
    refs = ",\n    ".join(f"reinterpret_cast<const void*>(&{name})" for name in names)
    return f'#include "{source}"\n\nconst void* const fastattn_kernels[] = {{\n    {refs}\n}};\n'


def compile_one(nvcc: str, arch: str, src: Path, out: Path, resource_usage: bool,
                defines: tuple[str, ...] = ()) -> tuple[bool, str]:
    # sm_90a through -gencode: the -arch shorthand also runs a plain sm_90 pass, which rejects wgmma
    target = ["-gencode=arch=compute_90a,code=sm_90a"] if arch == SM90A else [f"-arch={arch}"]
    cmd = [nvcc, "-std=c++17", "-cubin", *target, *defines, "-I", str(_specs.KERNEL_DIR), "-o", str(out), str(src)]
    if resource_usage:
        cmd.insert(1, "--resource-usage")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="GPU architecture (default: sm_80 and sm_90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=8, help="specializations per translation unit")
    parser.add_argument("--resource-usage", action="store_true", help="print registers/shared memory per kernel")
    parser.add_argument("--filter", default="", help="only names containing this text")
    args = parser.parse_args(argv)
    archs = args.arch or ["sm_80", "sm_90"]

    nvcc = find_nvcc()
    names = [n for n in _specs.all_name_expressions() if args.filter in n]
    decode_names = [n for n in _specs.all_decode_name_expressions() if args.filter in n]
    bwd_names = [n for n in _specs.all_bwd_name_expressions() if args.filter in n]
    sm90_names = [n for n in _specs.all_sm90_name_expressions() if args.filter in n] if "sm_90" in archs else []
    paged_names = ([n for n in _specs.all_sm90_paged_name_expressions() if args.filter in n]
                   if "sm_90" in archs else [])
    sm90_bwd_names = ([n for n in _specs.all_sm90_bwd_name_expressions() if args.filter in n]
                      if "sm_90" in archs else [])
    if nvcc is None:
        count = (len(names) + len(decode_names) + len(bwd_names) + len(sm90_names) + len(paged_names)
                 + len(sm90_bwd_names))
        print(f"nvcc not found: skipping the compilation of {count} CUDA kernel specializations")
        return 0
    print(f"compiling {len(names)} + {len(decode_names)} (decode) + {len(bwd_names)} (backward) specializations for "
          f"{', '.join(archs)} and "
          f"{len(sm90_names)} + {len(sm90_bwd_names)} (backward) for {SM90A} with {nvcc}", flush=True)

    failures = 0
    with tempfile.TemporaryDirectory(prefix="fastattn-cuda-") as tmp:
        jobs = []
        for c, start in enumerate(range(0, len(names), args.chunk)):
            src = Path(tmp) / f"chunk{c}.cu"
            src.write_text(translation_unit(names[start:start + args.chunk]))
            for arch in archs:
                jobs.append((arch, src, Path(tmp) / f"chunk{c}_{arch}.cubin", names[start:start + args.chunk], ()))
        for prefix, source, chunk_names in (("decode_", _specs.KERNEL_SOURCE_DECODE, decode_names),
                                            ("bwd_", _specs.KERNEL_SOURCE_BWD, bwd_names)):
            for c, start in enumerate(range(0, len(chunk_names), args.chunk)):
                chunk = chunk_names[start:start + args.chunk]
                src = Path(tmp) / f"{prefix}chunk{c}.cu"
                src.write_text(translation_unit(chunk, source))
                for arch in archs:
                    jobs.append((arch, src, Path(tmp) / f"{prefix}chunk{c}_{arch}.cubin", chunk, ()))
        for c, start in enumerate(range(0, len(sm90_names), args.chunk)):
            chunk = sm90_names[start:start + args.chunk]
            src = Path(tmp) / f"sm90_chunk{c}.cu"
            src.write_text(translation_unit(chunk, _specs.KERNEL_SOURCE_SM90))
            jobs.append((SM90A, src, Path(tmp) / f"sm90_chunk{c}.cubin", chunk, ()))
        for c, start in enumerate(range(0, len(paged_names), args.chunk)):  # the KV cache's paged reads
            chunk = paged_names[start:start + args.chunk]
            src = Path(tmp) / f"sm90_paged_chunk{c}.cu"
            src.write_text(translation_unit(chunk, _specs.KERNEL_SOURCE_SM90))
            jobs.append((SM90A, src, Path(tmp) / f"sm90_paged_chunk{c}.cubin", chunk, _specs.SM90_PAGED_OPTIONS))
        for c, start in enumerate(range(0, len(sm90_bwd_names), args.chunk)):  # the Hopper backward
            chunk = sm90_bwd_names[start:start + args.chunk]
            src = Path(tmp) / f"sm90_bwd_chunk{c}.cu"
            src.write_text(translation_unit(chunk, _specs.KERNEL_SOURCE_SM90_BWD))
            jobs.append((SM90A, src, Path(tmp) / f"sm90_bwd_chunk{c}.cubin", chunk, ()))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(compile_one, nvcc, arch, src, out, args.resource_usage, defines): (arch, chunk)
                       for arch, src, out, chunk, defines in jobs}
            for fut in concurrent.futures.as_completed(futures):
                arch, chunk = futures[fut]
                ok, log = fut.result()
                if not ok:
                    failures += 1
                    print(f"FAILED [{arch}]: {chunk}\n{log}", flush=True)
                elif args.resource_usage:
                    print(log, flush=True)
    total = len(jobs)
    print(f"{total - failures}/{total} translation units compiled ({len(names)} + {len(decode_names)} (decode) + "
          f"{len(bwd_names)} (backward) specializations x {len(archs)} archs, {len(sm90_names)} + {len(paged_names)} "
          f"(paged K/V) + {len(sm90_bwd_names)} (backward) for {SM90A})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
