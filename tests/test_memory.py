"""memory_savings (estimates against hand-computed layouts) and memory_report (measured peaks)."""

from __future__ import annotations

import json
import math

import pytest

import fastattn
from conftest import skip_rss_under_sanitizer
from fastattn._memory import ESTIMATE_MIN_BYTES, ESTIMATE_TOLERANCE, format_bytes
from fastattn.backends.cpu._threads import cpu_limit
from fastattn.backends.cpu._tiles import (
    choose_tiles,
    num_tiles,
    panel_bytes,
    panel_group,
    plan_call,
    scratch_bytes,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the kernel's sizes, by hand


def test_panel_bytes_by_hand():
    # 2048 keys in 16 tiles of 128; Kᵀ (64 x 128) + V (128 x 64) per tile, then a flag and a max |k| per
    # tile, float32
    assert panel_bytes(2048, 64, 128, 4, "avx512") == (16 * 128 * (64 + 64) + 2 * 16) * 4 == 2**20 + 128
    # d = 72, block_kv = 100: bkvp and dp rounded up to 16 floats (AVX-512), 8 (AVX2), 4 (SSE2)
    assert panel_bytes(1000, 72, 100, 4, "avx512") == (10 * 112 * (72 + 80) + 20) * 4
    assert panel_bytes(1000, 72, 100, 4, "avx2") == (10 * 104 * (72 + 72) + 20) * 4
    assert panel_bytes(1000, 72, 100, 4, "generic") == (10 * 100 * (72 + 72) + 20) * 4
    assert panel_bytes(1000, 72, 100, 8, "avx512") == (10 * 104 * (72 + 72) + 20) * 8  # 8 doubles a vector


def test_scratch_bytes_by_hand():
    # slots q (64x64), s (64x128), o (64x64), m, alpha (64), l, lo, hi, row_i, row_h (64 doubles or
    # int64 = 128 floats each): each rounded up to 16 floats + 16
    floats = (4096 + 16) + (8192 + 16) + (4096 + 16) + 2 * (64 + 16) + 5 * (128 + 16)
    assert scratch_bytes(64, 128, 64, 4, "avx512") == floats * 4 == 69248
    # block_q = 5, d = 3, block_kv = 7, AVX2: q 15 floats, s and o 5 x 8 = 40 (padded to 8), m and
    # alpha 5, the five 8-byte slots 10; each rounded up to a line of 16 floats, plus a line
    assert scratch_bytes(5, 7, 3, 4, "avx2") == ((16 + 16) + 2 * (48 + 16) + 7 * (16 + 16)) * 4 == 1536


@pytest.mark.parametrize(("n_heads", "n_q", "threads", "group"), [
    (8, 25, 2, 2),   # one head has 25 items: two heads make a multiple of two threads
    (8, 1, 2, 8),    # one item per head: eight heads for ~4 items per thread
    (3, 3, 2, 3),    # 9 items never divide evenly: all three heads
    (1, 7, 2, 1),
    (16, 2, 4, 8),
])
def test_panel_group(n_heads, n_q, threads, group):
    assert panel_group(n_heads, n_q, threads) == group


def test_plan_threads_capped_at_work_items_cpus_and_work():
    def plan(n_heads, seq_q, seq_kv, threads, d=64):
        return plan_call(n_heads=n_heads, seq_q=seq_q, seq_kv=seq_kv, head_dim=d, compute_itemsize=4,
                         flops=4 * d * seq_q * seq_kv * n_heads, threads=threads)

    # one head, one query tile: one work item, so one thread whatever was asked
    assert plan(1, 64, 4096, 8).threads == 1
    # never more than the CPUs this process may use
    assert plan(8, 4096, 4096, 10_000).threads == cpu_limit()
    assert plan(8, 4096, 4096, 1).threads == 1
    # a decode-sized call (8 heads x 1 query x 512 keys) is too little work for a thread team
    assert plan(8, 1, 512, 64).threads == 1
    # grouped-query attention packs a group's query heads as rows of one panel's row tiles
    gqa = plan_call(n_heads=2, seq_q=100, seq_kv=100, head_dim=64, compute_itemsize=4, flops=0, threads=1,
                    block_q=64, group=4)
    assert gqa.n_q_tiles == 7  # 400 rows in tiles of 64
    assert num_tiles(2048, 168) == 13


# --------------------------------------------------------------------------- memory_savings


def test_explicit_tiles_by_hand():
    s = fastattn.memory_savings(2048, head_dim=64, block_size_q=64, block_size_kv=128, num_threads=1,
                                simd="avx512")
    tiles = 69248                        # one thread's scratch (test_scratch_bytes_by_hand)
    panels = 2**20 + 128                 # one head's packed K/V (test_panel_bytes_by_hand)
    stats = 2048 * 4                     # lse
    out = 2048 * 64 * 4                  # the float32 output
    squares = 4 * 2048 * 2048 * 4        # the materialized path's score-sized arrays
    head_copies = 3 * 2048 * 64 * 4
    assert s.flash_bytes == stats + out + tiles + panels == 1650432
    assert s.naive_bytes == out + stats + squares + head_copies == 69214208
    assert (s.tiles_bytes, s.panel_bytes, s.stats_bytes, s.output_bytes) == (tiles, panels, stats, out)
    assert s.scores_bytes == 2048 * 2048 * 4
    assert s.reduction_factor == pytest.approx(s.naive_bytes / s.flash_bytes)
    assert (s.block_size_q, s.block_size_kv, s.num_threads, s.panel_heads, s.simd) == (64, 128, 1, 1, "avx512")
    assert str(s) == ("seq_len=2048: materialized ~66.0 MiB, flash ~1.6 MiB, 42x reduction "
                      "(estimated peaks of one call: B=1 H=1 D=64 float32, 1 thread)")


def test_every_thread_and_panel_counted():
    one = fastattn.memory_savings(4096, num_heads=8, num_threads=1, simd="avx512")
    two = fastattn.memory_savings(4096, num_heads=8, num_threads=2, simd="avx512")
    per_thread = scratch_bytes(one.block_size_q, one.block_size_kv, 64, 4, "avx512")
    per_head = panel_bytes(4096, 64, one.block_size_kv, 4, "avx512")
    used = min(2, cpu_limit())
    assert two.num_threads == used and one.num_threads == 1
    assert two.tiles_bytes == used * one.tiles_bytes == used * per_thread
    n_q = num_tiles(4096, one.block_size_q)
    assert two.panel_heads == panel_group(8, n_q, used) and two.panel_bytes == two.panel_heads * per_head
    assert two.stats_bytes == 8 * 4096 * 4 and two.output_bytes == 8 * 4096 * 64 * 4
    assert two.flash_bytes == two.tiles_bytes + two.panel_bytes + two.stats_bytes + two.output_bytes


def test_threads_capped_at_work_items():
    # one head, one query tile: one work item, so one thread whatever was asked
    s = fastattn.memory_savings(64, block_size_q=64, num_threads=8)
    assert s.num_threads == 1


def test_default_tiles_come_from_the_tile_chooser():
    n, d = 4096, 128
    s = fastattn.memory_savings(n, head_dim=d)
    assert (s.block_size_q, s.block_size_kv) == choose_tiles(d, 4, None, None, n, n)


@pytest.mark.parametrize(("dtype", "itemsize", "compute"), [("float64", 8, 8), ("float16", 2, 4),
                                                           ("bfloat16", 2, 4), ("float32", 4, 4)])
def test_dtype_itemsizes(dtype, itemsize, compute):
    n, d, heads = 1000, 32, 4
    s = fastattn.memory_savings(n, head_dim=d, num_heads=heads, block_size_q=16, block_size_kv=32, dtype=dtype,
                                num_threads=2, simd="avx2")
    assert s.compute_dtype == ("float64" if dtype == "float64" else "float32")
    # a materialized path computes its scores in float32 even for half-precision inputs
    assert s.scores_bytes == n * n * compute
    assert s.num_threads == min(2, cpu_limit())
    tiles = s.num_threads * scratch_bytes(16, 32, d, compute, "avx2")
    panels = s.panel_heads * panel_bytes(n, d, 32, compute, "avx2")
    out, cast = heads * n * d * compute, heads * n * d * itemsize if itemsize != compute else 0
    assert (s.tiles_bytes, s.panel_bytes, s.output_bytes) == (tiles, panels, out + cast)
    # tiles and panels are freed before the output is cast to the input dtype
    assert s.flash_bytes == heads * n * compute + out + max(tiles + panels, cast)
    squares = 4 * n * n * compute + 3 * n * d * compute
    assert s.naive_bytes == heads * n * (d + 1) * compute + max(squares, heads * n * d * itemsize)
    assert s.dtype == dtype


def test_half_precision_reduction_not_understated():
    f32 = fastattn.memory_savings(4096, num_heads=8, dtype="float32", num_threads=2)
    f16 = fastattn.memory_savings(4096, num_heads=8, dtype="float16", num_threads=2)
    # same float32 scores and float32 kernel buffers: the same memory, the same reduction
    assert f16.naive_bytes == f32.naive_bytes and f16.flash_bytes == f32.flash_bytes
    assert f16.reduction_factor == f32.reduction_factor


def test_causal_mask_counted_for_the_materialized_path():
    plain = fastattn.memory_savings(1024, causal=False, num_threads=1)
    causal = fastattn.memory_savings(1024, causal=True, num_threads=1)
    assert causal.naive_bytes - plain.naive_bytes == 1024 * 1024  # the boolean mask
    assert causal.flash_bytes == plain.flash_bytes


def test_numpy_dtype_accepted():
    import numpy as np

    assert fastattn.memory_savings(128, dtype=np.float64) == fastattn.memory_savings(128, dtype="float64")


def test_tiles_never_exceed_the_sequence():
    s = fastattn.memory_savings(32, head_dim=16, block_size_q=64, block_size_kv=128)
    assert (s.block_size_q, s.block_size_kv) == (32, 32)


def test_reduction_grows_with_seq_len():
    factors = [fastattn.memory_savings(n, num_heads=8, num_threads=2).reduction_factor
               for n in (512, 1024, 2048, 4096, 8192)]
    assert factors == sorted(factors)
    assert 10 < factors[-2] < 40  # N=4096: the measured peaks differ about 24x on this machine


def test_frozen():
    s = fastattn.memory_savings(256)
    with pytest.raises(AttributeError):
        s.seq_len = 3  # type: ignore[misc]


@pytest.mark.parametrize(("n", "text"), [(512, "512 B"), (1024, "1.0 KiB"), (50176, "49.0 KiB"),
                                         (16 * 2**20, "16.0 MiB"), (3 * 2**30, "3.0 GiB")])
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
    (dict(seq_len=64, num_heads=0), ValueError, "num_heads must be positive"),
    (dict(seq_len=64, batch="2"), TypeError, "batch"),
    (dict(seq_len=64, num_threads=0), ValueError, "num_threads must be positive"),
    (dict(seq_len=64, causal=1), TypeError, "causal must be a bool"),
    (dict(seq_len=64, simd="sse9"), ValueError, "simd must be one of avx512, avx2, generic"),
])
def test_memory_savings_rejects(kwargs, exc, match):
    seq_len = kwargs.pop("seq_len")
    with pytest.raises(exc, match=match):
        fastattn.memory_savings(seq_len, **kwargs)


# --------------------------------------------------------------------------- memory_report

MEASURED = dict(seq_lens=(1024, 2048), head_dim=64, num_heads=8)


@pytest.fixture(scope="module")
def measured_report():
    return fastattn.memory_report(**MEASURED)


def _assert_estimates_match_peaks(report):
    """Each estimate of at least ESTIMATE_MIN_BYTES within ESTIMATE_TOLERANCE of its measured peak."""
    checked = 0
    for row in report.rows:
        for est, peak in ((row.flash_bytes, row.flash_peak_bytes), (row.naive_bytes, row.materialized_peak_bytes)):
            assert peak is not None and peak > 0
            if est >= ESTIMATE_MIN_BYTES:
                assert 1 / ESTIMATE_TOLERANCE <= est / peak <= ESTIMATE_TOLERANCE, (row, est / peak)
                checked += 1
    assert checked >= 2


@skip_rss_under_sanitizer
def test_report_estimates_match_measured_peaks(measured_report):
    r = measured_report
    assert r.measured and r.backend in fastattn.available_backends()
    assert [row.seq_len for row in r.rows] == [1024, 2048]
    if r.backend == "cpu":
        for row in r.rows:
            est = fastattn.memory_savings(row.seq_len, head_dim=64, num_heads=8)
            assert (row.naive_bytes, row.flash_bytes) == (est.naive_bytes, est.flash_bytes)
            assert row.flash_threads == est.num_threads  # the estimate counts the threads that ran
    _assert_estimates_match_peaks(r)
    small, large = r.rows
    assert large.materialized_peak_bytes > 3 * small.materialized_peak_bytes  # quadratic
    assert large.flash_peak_bytes < 3 * small.flash_peak_bytes                # linear
    for row in r.rows:
        assert row.inputs_bytes == 3 * 8 * row.seq_len * 64 * 4
        assert row.measured_reduction == pytest.approx(row.materialized_peak_bytes / row.flash_peak_bytes)


@skip_rss_under_sanitizer
@pytest.mark.parametrize(("dtype", "threads"), [("float16", 1), ("float64", 2)])
def test_report_estimates_match_measured_peaks_other_dtypes(dtype, threads):
    r = fastattn.memory_report(seq_lens=(2048,), head_dim=64, num_heads=4, dtype=dtype, num_threads=threads)
    _assert_estimates_match_peaks(r)
    if r.backend == "cpu":
        assert r.rows[0].flash_threads == r.num_threads == threads


def test_report_str_and_dict(measured_report):
    text = str(measured_report)
    for col in ("materialized est.", "materialized peak", "flash est.", "flash peak", "reduction measured"):
        assert col in text
    assert "MiB" in text and "MB" not in text.replace("MiB", "")
    assert "1024-based" in text and "2048" in text
    d = measured_report.to_dict()
    json.dumps(d)
    assert d["head_dim"] == 64 and d["num_heads"] == 8 and d["batch"] == 1 and d["dtype"] == "float32"
    assert [row["seq_len"] for row in d["rows"]] == [1024, 2048]
    assert all(row["materialized_peak_bytes"] > 0 and row["measured_reduction"] > 1 for row in d["rows"])


def test_report_plot_writes_png(measured_report, tmp_path):
    pytest.importorskip("matplotlib")
    out = measured_report.plot(tmp_path / "mem.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_report_plot_without_matplotlib(measured_report, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    hint = r'pip install matplotlib \(or, from the fastattn clone, pip install "\.\[plot\]"'
    with pytest.raises(ImportError, match=hint):
        measured_report.plot(tmp_path / "mem.png")


def test_report_skips_what_would_not_fit():
    r = fastattn.memory_report(seq_lens=(256,), num_heads=2, materialized_limit_bytes=1)
    (row,) = r.rows
    assert row.flash_peak_bytes is None and row.materialized_peak_bytes is None
    assert row.measured_reduction is None
    assert row.materialized_note.startswith("skipped: would need ~")
    assert "skipped: would need" in str(r)


def test_report_without_measurement():
    r = fastattn.memory_report(seq_lens=(2048, 128), measure=False, causal=True, dtype="float64")
    assert not r.measured
    assert [row.seq_len for row in r.rows] == [128, 2048]
    assert all(row.flash_peak_bytes is None and row.materialized_peak_bytes is None for row in r.rows)
    est = fastattn.memory_savings(2048, num_heads=8, dtype="float64", causal=True)
    assert (r.rows[1].naive_bytes, r.rows[1].flash_bytes) == (est.naive_bytes, est.flash_bytes)


def test_report_on_the_reference_backend_estimates_it_as_materialized():
    r = fastattn.memory_report(seq_lens=(512,), num_heads=2, measure=False, backend="reference")
    (row,) = r.rows
    assert r.backend == "reference"
    # float64 scores: twice the float32 materialized path's squares
    assert row.flash_bytes > 1.8 * row.naive_bytes


def test_report_timeout_expires_with_a_clear_error():
    with pytest.raises(TimeoutError, match=r"measuring the flash path at seq_len=256 took longer than timeout="):
        fastattn.memory_report(seq_lens=(256,), num_heads=1, timeout=1e-4)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(seq_lens=()), ValueError, "at least one"),
    (dict(seq_lens=(0,)), ValueError, "positive"),
    (dict(seq_lens="512"), TypeError, "seq_lens"),
    (dict(seq_lens=512), TypeError, "seq_lens"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(batch=1.0), TypeError, "batch"),
    (dict(num_threads=-1), ValueError, "num_threads"),
    (dict(dtype="int32"), ValueError, "dtype"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(progress=1), TypeError, "progress"),
    (dict(backend="cuda"), ValueError, "host memory"),
    (dict(backend="nope"), ValueError, "unknown backend"),
    (dict(materialized_limit_bytes=0), ValueError, "materialized_limit_bytes"),
    (dict(timeout="10"), TypeError, "timeout must be a positive number of seconds or None, got '10'"),
    (dict(timeout=True), TypeError, "timeout"),
    (dict(timeout=-1), ValueError, "timeout must be a positive, finite number of seconds or None, got -1"),
    (dict(timeout=0), ValueError, "timeout"),
    (dict(timeout=math.nan), ValueError, "timeout"),
    (dict(timeout=math.inf), ValueError, "timeout"),
])
def test_memory_report_rejects(kwargs, exc, match):
    kwargs = {"seq_lens": (64,), "measure": False, **kwargs}
    with pytest.raises(exc, match=match):
        fastattn.memory_report(**kwargs)


def test_memory_report_rejects_bad_timeout_before_measuring(monkeypatch):
    from fastattn import _memory

    def fail(*args, **kwargs):
        raise AssertionError("measured despite a bad timeout")

    monkeypatch.setattr(_memory, "_measure_in_subprocess", fail)
    with pytest.raises(ValueError, match="timeout"):
        fastattn.memory_report(seq_lens=(64,), timeout=-1)
