"""The compiled CPU kernel: vectorized on every ISA path, and built for baseline x86-64.

Reads the extension's disassembly (binutils' objdump), so a compiler or flag change that
silently drops the FMA micro-kernels, or a build that enables AVX-512 for the whole module
(as -march=native would), fails here rather than only in a benchmark.
"""

from __future__ import annotations

import functools
import platform
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 kernels only")


@functools.lru_cache(maxsize=1)
def _disassemble(path: str, objdump: str) -> dict[str, list[str]]:
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", path],
                         capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    return functions


@pytest.fixture
def disassembly(cpu_backend):
    from fastattn.backends.cpu import _flash_cpu

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    return _disassemble(_flash_cpu.__file__, objdump)


def _body(functions: dict, pattern: str) -> str:
    return "\n".join("\n".join(lines) for name, lines in functions.items() if re.search(pattern, name))


@pytest.mark.parametrize(("isa", "register"), [("isa_avx512", "zmm"), ("isa_avx2", "ymm")])
def test_micro_kernels_use_packed_fma(disassembly, isa, register):
    # the micro-kernels (s_block, o_block) may be inlined into s_rows / o_rows / item_pass
    for kernel, hosts in (("S", "s_block|s_rows|item_pass"), ("O", "o_block|o_rows|item_pass")):
        body = _body(disassembly, rf"{isa}::kern<float>::(?:{hosts})<")
        assert body, f"no {isa} {kernel} micro-kernel in the extension"
        assert re.search(rf"vfmadd\d+ps\s+.*%{register}", body), f"{isa} {kernel} has no packed {register} FMA"


def test_generic_path_and_driver_use_no_avx(disassembly):
    """Code outside the AVX2/AVX-512 namespaces must run on any x86-64 CPU."""
    for name, lines in disassembly.items():
        if "isa_avx512" in name or "isa_avx2" in name:
            continue
        for line in lines:
            fields = line.split("\t")
            if len(fields) < 2 or not fields[1].strip():
                continue
            mnemonic = fields[1].split()[0]
            # VEX/EVEX-encoded instructions (AVX and later) all start with "v"; plain SSE2 does not
            assert not mnemonic.startswith("v") and not re.search(r"%[yz]mm", fields[1]), (
                f"{name} uses AVX outside the dispatched paths: {line.strip()}")
