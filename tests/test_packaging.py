"""The installed distribution: what the package reads at run time is installed beside it, and it
carries its license.  (The sdist's and the wheel's file lists are checked by tools/check_dist.py
in CI, which builds both.)

These tests look at the installed fastattn; imported from a source tree with no matching
installed distribution, they skip and say so.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

import fastattn


@pytest.fixture(scope="module")
def dist() -> metadata.Distribution:
    try:
        found = metadata.distribution("fastattn")
    except metadata.PackageNotFoundError:
        pytest.skip("fastattn is imported from a source tree, not an installed distribution")
    if found.read_text("RECORD") is None:  # a build's egg-info in src/, not an installation
        pytest.skip("fastattn is imported from a source tree (its metadata is a build's egg-info)")
    direct_url = json.loads(found.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        return found  # `pip install -e`: installed metadata, modules from the source tree
    init = Path(found.locate_file("fastattn/__init__.py"))
    if not init.exists() or init.resolve() != Path(fastattn.__file__).resolve():
        pytest.skip(f"the installed fastattn distribution ({init}) is not the imported one ({fastattn.__file__})")
    return found


def test_license_metadata(dist):
    meta = dist.metadata
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    assert meta["License"] is None, "the deprecated free-text License field is set"
    text = dist.read_text("licenses/LICENSE")
    assert text is not None, "the distribution carries no licenses/LICENSE"
    assert "BSD 3-Clause License" in text and "the fastattn developers" in text


def test_version_matches_metadata(dist):
    assert dist.version == fastattn.__version__


def test_cuda_kernel_sources_installed():
    """The CUDA backend compiles its kernels from source at run time: every file the sources
    include must be installed next to them."""
    from fastattn.backends.cuda import _specs

    for source in (_specs.KERNEL_SOURCE, _specs.KERNEL_SOURCE_SM90):
        text = (_specs.KERNEL_DIR / source).read_text()
        local = re.findall(r'#include\s+"([^"]+)"', text)
        assert local, f"{source} includes no local header"
        for header in local:
            assert (_specs.KERNEL_DIR / header).is_file(), f"{source} includes {header}, which is not installed"
        # every local header inlined: what NVRTC gets names no missing file
        assert '#include "' not in _specs.kernel_source(source)


def test_type_information_installed():
    package = Path(fastattn.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "backends" / "cpu" / "_flash_cpu.pyi").is_file()
