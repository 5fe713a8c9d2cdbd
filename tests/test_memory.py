"""memory_savings (estimates against hand-computed formulas) and memory_report (measured peaks)."""

from __future__ import annotations

import json

import pytest

import fastattn
from fastattn._memory import format_bytes
from fastattn.backends.cpu._tiles import choose_tiles, working_set_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- memory_savings


def test_explicit_tiles_by_hand():
    s = fastattn.memory_savings(2048, head_dim=64, block_size_q=64, block_size_kv=128)
    # Q + O tiles 2·64·64, K + V tiles 2·128·64, S tile 64·128, m_i and l_i 2·64; float32
    tiles = 4 * (2 * 64 * 64 + 2 * 128 * 64 + 64 * 128 + 2 * 64)
    stats = 3 * 2048 * 4  # m_i, l_i, lse per row
    assert s.seq_len == 2048
    assert s.naive_bytes == 2048 * 2048 * 4 == 16 * 2**20
    assert s.flash_bytes == tiles + stats == 156160
    assert s.reduction_factor == pytest.approx(s.naive_bytes / s.flash_bytes)
    assert (s.block_size_q, s.block_size_kv) == (64, 128)
    assert str(s) == "seq_len=2048: naive=16.0MB, flash=152.5KB, 107x reduction"


def test_default_tiles_come_from_the_tile_chooser():
    n, d = 4096, 128
    block_q, block_kv = choose_tiles(d, 4)
    s = fastattn.memory_savings(n, head_dim=d)
    assert (s.block_size_q, s.block_size_kv) == (min(block_q, n), min(block_kv, n))
    assert s.flash_bytes == working_set_bytes(s.block_size_q, s.block_size_kv, d, 4) + 3 * n * 4
    assert s.naive_bytes == n * n * 4


@pytest.mark.parametrize(("dtype", "itemsize", "compute"), [("float64", 8, 8), ("float16", 2, 4),
                                                           ("bfloat16", 2, 4), ("float32", 4, 4)])
def test_dtype_itemsizes(dtype, itemsize, compute):
    n = 1000
    s = fastattn.memory_savings(n, head_dim=32, block_size_q=16, block_size_kv=32, dtype=dtype)
    assert s.naive_bytes == n * n * itemsize
    assert s.flash_bytes == compute * (2 * 16 * 32 + 2 * 32 * 32 + 16 * 32 + 2 * 16) + 3 * n * compute
    assert s.dtype == dtype


def test_numpy_dtype_accepted():
    import numpy as np

    assert fastattn.memory_savings(128, dtype=np.float64) == fastattn.memory_savings(128, dtype="float64")


def test_tiles_never_exceed_the_sequence():
    s = fastattn.memory_savings(32, head_dim=16, block_size_q=64, block_size_kv=128)
    assert (s.block_size_q, s.block_size_kv) == (32, 32)
    assert s.flash_bytes == 4 * (2 * 32 * 16 + 2 * 32 * 16 + 32 * 32 + 2 * 32) + 3 * 32 * 4


def test_reduction_grows_with_seq_len():
    factors = [fastattn.memory_savings(n).reduction_factor for n in (512, 1024, 2048, 4096, 8192)]
    assert factors == sorted(factors)
    assert factors[-1] > 100


def test_str_format_of_the_issue_example():
    s = fastattn.MemorySavings(seq_len=2048, naive_bytes=16 * 2**20, flash_bytes=49 * 2**10,
                               reduction_factor=16 * 2**20 / (49 * 2**10))
    assert str(s) == "seq_len=2048: naive=16.0MB, flash=49.0KB, 334x reduction"


def test_frozen():
    s = fastattn.memory_savings(256)
    with pytest.raises(AttributeError):
        s.seq_len = 3  # type: ignore[misc]


@pytest.mark.parametrize(("n", "text"), [(512, "512B"), (1024, "1.0KB"), (50176, "49.0KB"),
                                         (16 * 2**20, "16.0MB"), (3 * 2**30, "3.0GB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_flash_attention_object_memory_savings():
    cfg = fastattn.FlashAttentionConfig(head_dim=128, num_heads=4, block_size_q=32, block_size_kv=64)
    got = fastattn.FlashAttention(cfg, backend="reference").memory_savings(1024)
    assert got == fastattn.memory_savings(1024, head_dim=128, block_size_q=32, block_size_kv=64)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(seq_len=0), ValueError, "seq_len must be positive"),
    (dict(seq_len=-5), ValueError, "seq_len must be positive"),
    (dict(seq_len=1.5), TypeError, "seq_len must be a positive int"),
    (dict(seq_len=True), TypeError, "seq_len must be a positive int"),
    (dict(seq_len=None), TypeError, "seq_len must be a positive int"),
    (dict(seq_len=64, head_dim=0), ValueError, "head_dim must be positive"),
    (dict(seq_len=64, head_dim="64"), TypeError, "head_dim"),
    (dict(seq_len=64, block_size_q=0), ValueError, "block_size_q must be positive"),
    (dict(seq_len=64, block_size_kv=2.0), TypeError, "block_size_kv"),
    (dict(seq_len=64, dtype="int8"), ValueError, "dtype must be one of"),
])
def test_memory_savings_rejects(kwargs, exc, match):
    seq_len = kwargs.pop("seq_len")
    with pytest.raises(exc, match=match):
        fastattn.memory_savings(seq_len, **kwargs)


# --------------------------------------------------------------------------- memory_report

SMALL = dict(seq_lens=(512, 1024), head_dim=64, num_heads=4)


@pytest.fixture(scope="module")
def measured_report():
    return fastattn.memory_report(**SMALL)


def test_report_measures_both_paths(measured_report):
    r = measured_report
    assert r.measured and r.backend in fastattn.available_backends()
    assert [row.seq_len for row in r.rows] == [512, 1024]
    for row in r.rows:
        assert row.flash_peak_bytes is not None and row.flash_peak_bytes > 0
        assert row.materialized_peak_bytes is not None and row.materialized_peak_bytes > 0
        est = fastattn.memory_savings(row.seq_len, head_dim=64)
        assert (row.naive_bytes, row.flash_bytes) == (est.naive_bytes, est.flash_bytes)
        assert row.inputs_bytes == 4 * 4 * row.seq_len * 64 * 4
    small, large = r.rows
    assert large.materialized_peak_bytes > small.materialized_peak_bytes
    # one head's fp32 score matrix is the least the materialized path must hold
    assert large.materialized_peak_bytes >= large.naive_bytes


def test_report_str_and_dict(measured_report):
    text = str(measured_report)
    assert "materialized peak" in text and "flash peak" in text and "1024" in text
    d = measured_report.to_dict()
    json.dumps(d)
    assert d["head_dim"] == 64 and d["num_heads"] == 4 and d["batch"] == 1 and d["dtype"] == "float32"
    assert [row["seq_len"] for row in d["rows"]] == [512, 1024]
    assert all(row["materialized_peak_bytes"] > 0 for row in d["rows"])


def test_report_plot_writes_png(measured_report, tmp_path):
    pytest.importorskip("matplotlib")
    out = measured_report.plot(tmp_path / "mem.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_report_plot_without_matplotlib(measured_report, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install fastattn\[plot\]"):
        measured_report.plot(tmp_path / "mem.png")


def test_report_skips_what_would_not_fit():
    r = fastattn.memory_report(seq_lens=(256,), num_heads=2, materialized_limit_bytes=1)
    (row,) = r.rows
    assert row.flash_peak_bytes is None and row.materialized_peak_bytes is None
    assert row.materialized_note.startswith("skipped: would need ~")
    assert "skipped: would need" in str(r)


def test_report_without_measurement():
    r = fastattn.memory_report(seq_lens=(2048, 128), measure=False, causal=True, dtype="float64")
    assert not r.measured
    assert [row.seq_len for row in r.rows] == [128, 2048]
    assert all(row.flash_peak_bytes is None and row.materialized_peak_bytes is None for row in r.rows)
    assert r.rows[1].naive_bytes == 2048 * 2048 * 8


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(seq_lens=()), ValueError, "at least one"),
    (dict(seq_lens=(0,)), ValueError, "positive"),
    (dict(seq_lens="512"), TypeError, "seq_lens"),
    (dict(seq_lens=512), TypeError, "seq_lens"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(batch=1.0), TypeError, "batch"),
    (dict(dtype="int32"), ValueError, "dtype"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(backend="cuda"), ValueError, "host memory"),
    (dict(backend="nope"), ValueError, "unknown backend"),
    (dict(materialized_limit_bytes=0), ValueError, "materialized_limit_bytes"),
])
def test_memory_report_rejects(kwargs, exc, match):
    kwargs = {"seq_lens": (64,), "measure": False, **kwargs}
    with pytest.raises(exc, match=match):
        fastattn.memory_report(**kwargs)
