"""The README's Python examples run as written (the memory report without its measurements)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(cpu_backend):
    if not README.exists():
        pytest.skip("README.md is not beside the tests (an installed test tree)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has Python examples"
    code = "\n".join(blocks).replace("seq_lens=(512, 1024, 2048))", "seq_lens=(512,), measure=False)")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].shape == (1724, 32, 128)
