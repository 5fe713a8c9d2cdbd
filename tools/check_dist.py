#!/usr/bin/env python3
"""Checks the sdist and the wheel that ``python -m build`` wrote, against this git checkout.

    python tools/check_dist.py [DIST_DIR]        (default: dist/)

sdist: every tracked file of the package sources, tests, benchmarks, docs and tools, the LICENSE,
README and build files is in it, and nothing else but the metadata setuptools writes (PKG-INFO,
setup.cfg, *.egg-info): no generated C++, no compiled module, no cache.
wheel: every tracked module of the package, the data it reads at run time (CUDA kernel sources,
type stubs, py.typed), the compiled CPU extension, the LICENSE under the dist-info, and the
license metadata of PEP 639 (License-Expression, License-File).
Exits 1 listing every problem found.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_DIRS = ("src/", "tests/", "bench/", "docs/", "tools/")
SDIST_FILES = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in"}
SDIST_METADATA = ("PKG-INFO", "setup.cfg", "src/fastattn.egg-info/*")
GENERATED = ("src/fastattn/backends/cpu/_flash_cpu.cpp", "*.so", "*.pyd", "*.o", "*.pyc", "*/__pycache__/*")
# package data the installed package reads (pyproject.toml's [tool.setuptools.package-data])
WHEEL_DATA = ("fastattn/py.typed", "fastattn/backends/cpu/*.pyi", "fastattn/backends/cpu/*.pxd",
              "fastattn/backends/cpu/kernels/*.h", "fastattn/backends/cuda/kernels/*.cu",
              "fastattn/backends/cuda/kernels/*.cuh")
LICENSE_EXPRESSION = "BSD-3-Clause"


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def check_sdist(path: Path, tracked: set[str]) -> list[str]:
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    if len(top) != 1:
        return [f"{path.name}: expected one top-level folder, found {sorted(top)}"]
    files = {n.split("/", 1)[1] for n in names}
    expected = {f for f in tracked if f.startswith(SDIST_DIRS) or f in SDIST_FILES}
    problems = [f"{path.name}: missing {f}" for f in sorted(expected - files)]
    for f in sorted(files - expected):
        if matches(f, GENERATED):
            problems.append(f"{path.name}: holds the generated file {f}")
        elif not matches(f, SDIST_METADATA):
            problems.append(f"{path.name}: holds {f}, which is not a tracked source file")
    if not problems:
        print(f"sdist {path.name}: {len(files)} files: all {len(expected)} tracked sources, tests, docs, "
              f"tools and the LICENSE; nothing generated")
    return problems


def check_wheel(path: Path, tracked: set[str]) -> list[str]:
    with zipfile.ZipFile(path) as whl:
        files = set(whl.namelist())
        dist_info = {f.split("/", 1)[0] for f in files if f.split("/", 1)[0].endswith(".dist-info")}
        if len(dist_info) != 1:
            return [f"{path.name}: expected one .dist-info folder, found {sorted(dist_info)}"]
        (info,) = dist_info
        meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        license_text = whl.read(f"{info}/licenses/LICENSE").decode() if f"{info}/licenses/LICENSE" in files else None
    problems = []
    wanted = {f[len("src/"):] for f in tracked
              if f.startswith("src/fastattn/") and (f.endswith(".py") or matches(f[len("src/"):], WHEEL_DATA))}
    problems += [f"{path.name}: missing {f}" for f in sorted(wanted - files)]
    if not any(fnmatch.fnmatchcase(f, "fastattn/backends/cpu/_flash_cpu.*.so") for f in files):
        problems.append(f"{path.name}: no compiled CPU extension fastattn/backends/cpu/_flash_cpu.*.so")
    problems += [f"{path.name}: holds the generated file {f}" for f in sorted(files)
                 if matches(f, ("*/_flash_cpu.cpp", "*.o", "*.pyc"))]
    if license_text is None:
        problems.append(f"{path.name}: no {info}/licenses/LICENSE")
    elif license_text != (ROOT / "LICENSE").read_text():
        problems.append(f"{path.name}: {info}/licenses/LICENSE differs from the repository's LICENSE")
    if meta.get("License-Expression") != LICENSE_EXPRESSION:
        problems.append(f"{path.name}: License-Expression is {meta.get('License-Expression')!r}, "
                        f"not {LICENSE_EXPRESSION!r}")
    if "LICENSE" not in (meta.get_all("License-File") or []):
        problems.append(f"{path.name}: METADATA names no License-File: LICENSE")
    if meta.get("License") is not None:
        problems.append(f"{path.name}: METADATA still has the deprecated License field")
    if not problems:
        kernels = sorted(f.rsplit("/", 1)[1] for f in files if f.startswith("fastattn/backends/cuda/kernels/"))
        print(f"wheel {path.name}: {len(files)} files: every module, the compiled CPU extension, "
              f"CUDA kernels {', '.join(kernels)}, {info}/licenses/LICENSE, "
              f"License-Expression {meta['License-Expression']}")
    return problems


def main(argv: list[str]) -> int:
    dist = Path(argv[1]) if len(argv) > 1 else ROOT / "dist"
    tracked = tracked_files()
    problems = check_sdist(one(dist, "fastattn-*.tar.gz"), tracked) + check_wheel(one(dist, "fastattn-*.whl"), tracked)
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
