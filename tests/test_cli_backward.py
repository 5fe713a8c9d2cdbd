"""``python -m fastattn bench --backward`` (and ``--memory``): tiny grids, the table's columns, JSON."""

from __future__ import annotations

import json
import sys

import pytest

from fastattn import _bench_backward
from fastattn.__main__ import main

#: one sequence length, both masks: a second or two
TINY = ["bench", "--backward", "--quick", "--seqs", "64", "--heads", "2", "--repeat", "1", "--no-progress"]


def _torch_or_skip():
    return pytest.importorskip("torch")


def test_backward_table_has_both_columns(capsys):
    _torch_or_skip()
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "fastattn ms" in out and "torch SDPA ms" in out and "vs torch" in out
    assert "2.5x the forward" in out  # the FLOP convention is stated
    assert "ScaledDotProduct" in out  # the torch kernel that ran is named
    rows = [line for line in out.splitlines() if line.startswith("| B1 H2 N64")]
    assert len(rows) == 2 and any("causal" in r for r in rows)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5].endswith("x") and float(cells[5][:-1]) > 0  # the ratio
        assert float(cells[6]) < 1e-4  # both gradients agree


def test_backward_json(capsys):
    _torch_or_skip()
    assert main([*TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["backward"]
    assert [(r["seq"], r["causal"]) for r in rows] == [(64, False), (64, True)]
    for r in rows:
        assert r["fastattn_ms"] > 0 and r["torch_ms"] > 0
        assert r["fastattn_gflops"] == pytest.approx(r["backward_flops"] / r["fastattn_ms"] / 1e6)
        assert r["backward_flops"] == 2.5 * 4 * 64 * (64 * 65 // 2 if r["causal"] else 64 * 64) * 2


def test_backward_without_torch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    assert main(TINY) == 0
    captured = capsys.readouterr()
    assert "PyTorch is not installed" in captured.err
    assert "| B1 H2 N64 D64" in captured.out and "| - | - |" in captured.out


def test_grid():
    full = _bench_backward.backward_grid()
    assert {(s.seq, s.head_dim, s.causal) for s in full} == {
        (n, d, c) for n in (1024, 2048, 4096) for d in (64, 128) for c in (False, True)}
    assert all(s.batch == 1 and s.heads == 8 for s in full)
    causal = _bench_backward.BackwardShape(1, 8, 1024, 64, True)
    assert causal.backward_flops == 2.5 * 4 * 64 * 8 * (1024 * 1025 // 2)


def test_memory_table(capsys):
    _torch_or_skip()
    assert main(["bench", "--backward", "--memory", "--seqs", "512", "--heads", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["memory"]
    assert [r["impl"] for r in rows] == ["fastattn", "torch"]
    for r in rows:
        assert r["seq"] == 512 and r["heads"] == 2 and r["head_dim"] == 64
        # outputs (out, lse) and gradients the call returns: 4 arrays of 512 x 2 x 64 fp32 + lse
        assert r["kept_mib"] == pytest.approx((4 * 512 * 2 * 64 * 4 + 2 * 512 * 4) / 2**20)
        assert r["growth_mib"] >= r["kept_mib"] * 0.5  # the child saw the call's own allocations
    text = _bench_backward.format_memory_table(rows)
    assert "fastattn" in text and "torch SDPA" in text and "target <= 64" in text


def test_memory_needs_backward(capsys):
    assert main(["bench", "--memory"]) == 2
    assert "--memory goes with --backward" in capsys.readouterr().err


def test_cuda_backward_bench_missing_is_explained(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastattn._bench_backward_cuda", None)
    assert main(["bench", "--backward", "--device", "cuda", "--quick"]) == 2
    assert "CUDA backward benchmark is not available" in capsys.readouterr().err
