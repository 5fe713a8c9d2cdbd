"""The README's Python examples run as written (the memory report without its measurements)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
KVCACHE_DOC = README.parent / "docs" / "kvcache.md"


def test_readme_examples_run(cpu_backend):
    if not README.exists():
        pytest.skip("README.md is not beside the tests (an installed test tree)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has Python examples"
    code = "\n".join(blocks).replace("seq_lens=(512, 1024, 2048))", "seq_lens=(512,), measure=False)")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].shape == (2, 1, 32, 128)  # the last example: a decode step against a cache
    assert (namespace["k_cache"][0, 1000] == namespace["k1"][0, 0]).all()
    assert (namespace["k_cache"][1, 37] == namespace["k1"][1, 0]).all()


def test_kvcache_generation_loop_runs(cpu_backend):
    """docs/kvcache.md's generation loop (its own assertions compare every step with full attention)."""
    if not KVCACHE_DOC.exists():
        pytest.skip("docs/kvcache.md is not beside the tests (an installed test tree)")
    blocks = re.findall(r"```python\n(.*?)```", KVCACHE_DOC.read_text(), re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(KVCACHE_DOC), "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["cached"] == 37 + 40 and len(namespace["tokens"]) == 37 + 41
