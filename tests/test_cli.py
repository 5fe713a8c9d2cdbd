"""The command line (python -m fastattn info / memory / bench) and the shared benchmark grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fastattn
from fastattn import _bench
from fastattn.__main__ import main
from fastattn._validate import attended_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: a grid that runs in well under a second
TINY_BENCH = ["bench", "--quick", "--seqs", "64", "128", "--head-dims", "32", "--heads", "2",
              "--repeat", "1", "--no-progress"]


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    package_root = str(Path(fastattn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


# --------------------------------------------------------------------------- info


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"version: {fastattn.__version__}" in out
    assert "reference" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backends"] == fastattn.available_backends()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastattn {fastattn.__version__}"


def test_every_option_has_help():
    import argparse

    from fastattn.__main__ import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"fastattn": parser, **subparsers.choices}
    missing = [f"{name} {'/'.join(action.option_strings)}"
               for name, p in parsers.items() for action in p._actions
               if action.option_strings and not (action.help and action.help != argparse.SUPPRESS)]
    assert missing == []
    for name in subparsers.choices:
        assert any(c.dest == name and c.help for c in subparsers._choices_actions), name


# --------------------------------------------------------------------------- memory


def test_memory_estimates_only(capsys):
    assert main(["memory", "--seq-lens", "256", "4096", "--head-dim", "32", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "4096" in out and "materialized est." in out and "not measured" in out


def test_memory_measured_json(capsys):
    assert main(["memory", "--seq-lens", "256", "512", "--heads", "2", "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [r["seq_len"] for r in report["rows"]] == [256, 512]
    assert all(r["materialized_peak_bytes"] > 0 for r in report["rows"])
    if report["backend"] == "cpu":
        assert report["num_threads"] == 1 and all(r["flash_threads"] == 1 for r in report["rows"])
    # progress on stderr by default: one step per measured call
    assert "memory:" in captured.err and "4/4" in captured.err


def test_memory_no_progress(capsys):
    assert main(["memory", "--seq-lens", "128", "--heads", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "memory:" not in captured.err
    assert "flash peak" in captured.out


def test_memory_plot_and_json_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "mem.png", tmp_path / "mem.json"
    args = ["memory", "--seq-lens", "128", "256", "--no-measure", "--plot", str(png), "--json", str(js)]
    assert main(args) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(js.read_text())["rows"][0]["seq_len"] == 128
    assert "seq_len" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench


def test_bench_quick(tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main([*TINY_BENCH, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "numpy-materialized" in out and "vs numpy-materialized" in out
    assert "N128 D32" in out and "causal" in out
    assert any(impl in out for impl in (_bench.FASTATTN_CPU, _bench.FASTATTN_REFERENCE))
    assert "of matmul" not in out  # only with --compare torch
    # the header names the SIMD path, the threads each implementation ran on, and the labels
    data = json.loads(js.read_text())
    assert "threads=default" not in out
    assert f"SIMD path {data['machine']['simd']}" in out
    if _bench.unavailable(_bench.FASTATTN_CPU) is None:
        assert data["machine"]["simd"] in fastattn.backends.cpu.simd_paths()
    # the header gives the threads each implementation really ran on, as recorded in the JSON
    used = {r["impl"]: r["threads"] for r in data["results"] if r["ms"] is not None}
    assert all(isinstance(n, int) and n >= 1 for n in used.values())
    assert "threads used (each library's default): " + ", ".join(f"{i} {n}" for i, n in used.items()) in out
    # the workload labels are explained once, above the table
    assert out.count("B<batch> H<heads> N<sequence length, queries = keys> D<head dim>") == 1


def test_bench_compare_torch_json_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "bench.png", tmp_path / "bench.json"
    args = ["bench", "--compare", "torch", "--seqs", "64", "--head-dims", "16", "--heads", "1",
            "--threads", "1", "--repeat", "1", "--no-progress", "--json", str(js), "--plot", str(png)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "of matmul" in captured.out
    data = json.loads(js.read_text())
    assert data["matmul_gflops"] > 0
    impls = {r["impl"] for r in data["results"]}
    assert _bench.NUMPY in impls
    assert (_bench.TORCH in impls) == (_bench.torch_unavailable() is None)
    if _bench.torch_unavailable():
        assert "PyTorch is not installed" in captured.err
    assert all(r["gflops"] > 0 and r["threads"] == 1 and r["threads_requested"] == 1
               for r in data["results"] if r["ms"] is not None)
    assert data["threads_requested"] == 1
    assert "torch_threads" not in data["machine"]  # the default of a pool the run did not use
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("peer", ["onnxruntime", "openvino"])
def test_bench_compare_peers(peer, tmp_path, capsys):
    """``--compare torch,onnxruntime,openvino``: each installed peer timed on the same workloads (its
    first result checked against fastattn's inside the run), with the best-peer column."""
    from fastattn import _bench_peers

    impl = _bench_peers.PEERS[peer]
    if _bench_peers.unavailable(impl):
        pytest.skip(_bench_peers.unavailable(impl))
    js = tmp_path / "b.json"
    assert main(["bench", "--compare", f"torch,{peer}", "--seqs", "64", "--head-dims", "16", "--heads", "2",
                 "--threads", "1", "--repeat", "1", "--no-progress", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    rows = [r for r in json.loads(js.read_text())["results"] if r["impl"] == impl]
    assert {r["causal"] for r in rows} == {False, True} and all(r["gflops"] > 0 for r in rows)
    assert f"vs {impl}" in out and ("vs best peer" in out) == (_bench.torch_unavailable() is None)


def test_bench_simd_holds_fastattn_and_the_peers_to_one_instruction_set(tmp_path):
    """``bench --simd generic``: the command re-runs itself with each library's switch set; fastattn
    runs that path, and the table and the JSON say what was held."""
    js = tmp_path / "b.json"
    proc = run_module("bench", "--simd", "generic", "--compare", "torch", "--seqs", "64", "--head-dims", "16",
                      "--heads", "1", "--repeat", "1", "--no-progress", "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(js.read_text())
    assert data["simd_held"] == "generic" and data["machine"]["simd"] == "generic"
    assert "--simd generic: fastattn" in proc.stdout and "held to that instruction set" in proc.stdout
    assert ("torch-sdpa" in proc.stdout.split("--simd generic:")[1].splitlines()[0]) == \
        (_bench.torch_unavailable() is None)


def test_bench_simd_a_path_this_cpu_lacks_is_refused(monkeypatch, capsys):
    from fastattn.backends import cpu

    monkeypatch.setattr(cpu, "simd_paths", lambda: ["generic"])
    assert main(["bench", "--simd", "avx2", "--no-progress"]) == 2
    assert "--simd avx2: this CPU runs generic" in capsys.readouterr().err


def test_bench_compare_a_missing_peer_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    js = tmp_path / "b.json"
    assert main(["bench", "--compare", "onnxruntime", "--seqs", "64", "--head-dims", "16", "--heads", "1",
                 "--repeat", "1", "--no-progress", "--json", str(js)]) == 0
    assert "onnxruntime-mha is not installed" in capsys.readouterr().err
    assert "onnxruntime-mha" not in {r["impl"] for r in json.loads(js.read_text())["results"]}


def test_threads_in_use_is_measured_inside_the_limit():
    before = _bench.threads_in_use(_bench.NUMPY)
    with _bench.thread_limit(_bench.NUMPY, 1):
        assert _bench.threads_in_use(_bench.NUMPY) in (1, None)  # None: no BLAS pool threadpoolctl sees
    assert _bench.threads_in_use(_bench.NUMPY) == before
    if _bench.torch_unavailable() is None:
        import torch

        default = torch.get_num_threads()
        with _bench.thread_limit(_bench.TORCH, 1):
            assert _bench.threads_in_use(_bench.TORCH) == 1
        assert torch.get_num_threads() == default
    w = _bench.Workload(1, 2, 64, 16, False)
    call = _bench.make_call(_bench.FASTATTN_REFERENCE, w, *w.inputs(), threads=None)
    assert _bench.threads_in_use(_bench.FASTATTN_REFERENCE, call) is None  # not run yet
    call()
    assert _bench.threads_in_use(_bench.FASTATTN_REFERENCE, call) == 1


def test_compare_torch_without_torch_runs_the_short_grid(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(_bench, "DEFAULT_SEQS", (64,))  # the short grid, shrunk for the test
    monkeypatch.setattr(_bench, "DEFAULT_HEAD_DIMS", (16,))
    js = tmp_path / "b.json"
    assert main(["bench", "--compare", "torch", "--heads", "1", "--repeat", "1", "--no-progress",
                 "--json", str(js)]) == 0
    err = capsys.readouterr().err
    assert "PyTorch is not installed" in err and "running the short grid against NumPy only" in err
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in err
    results = json.loads(js.read_text())["results"]
    assert {(r["seq"], r["head_dim"]) for r in results} == {(64, 16)}
    assert _bench.TORCH not in {r["impl"] for r in results}


def _fail(*args, **kwargs):
    raise AssertionError("ran before checking --plot")


@pytest.mark.parametrize("argv", [["bench"], ["memory", "--seq-lens", "64"], ["bench", "--compare", "torch"]])
def test_plot_without_matplotlib_checked_before_running(argv, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(_bench, "run_cpu_bench", _fail)
    monkeypatch.setattr(fastattn, "memory_report", _fail)
    assert main([*argv, "--plot", str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and 'pip install ".[plot]"' in err


def test_plot_into_a_missing_folder_checked_before_running(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(fastattn, "memory_report", _fail)
    assert main(["memory", "--plot", str(tmp_path / "nowhere" / "m.png")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bench_cuda_without_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastattn._bench_cuda", None)
    assert main(["bench", "--device", "cuda"]) != 0
    assert "CUDA benchmark is not available" in capsys.readouterr().err


def _fake_cuda_module(rows=None, error=None):
    module = types.ModuleType("fastattn._bench_cuda")

    def run_cuda_bench(*, compare_torch=True, progress=None, **grid):
        module.calls.append(dict(compare_torch=compare_torch, **grid))
        if error is not None:
            raise error
        for row in rows:
            progress(row)  # the CLI always passes a callback (its progress bar)
        return [row for row in rows if "error" not in row]

    module.calls = []  # type: ignore[attr-defined]

    module.run_cuda_bench = run_cuda_bench  # type: ignore[attr-defined]
    return module


@pytest.fixture
def cuda_available(monkeypatch):
    """The CUDA backend reports itself usable (the fake _bench_cuda modules do the rest)."""
    from fastattn import backends

    monkeypatch.setattr(backends.get_backend("cuda"), "availability", lambda: None)


def test_bench_cuda_backend_unavailable(monkeypatch, capsys):
    from fastattn import backends

    monkeypatch.setattr(backends.get_backend("cuda"), "availability", lambda: "no CUDA device found")
    monkeypatch.setitem(sys.modules, "fastattn._bench_cuda", _fake_cuda_module(rows=[]))
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device found" in capsys.readouterr().err


def test_bench_cuda_without_gpu(monkeypatch, capsys, cuda_available):
    monkeypatch.setitem(sys.modules, "fastattn._bench_cuda", _fake_cuda_module(error=RuntimeError("no GPU")))
    assert main(["bench", "--device", "cuda"]) != 0
    assert "no GPU" in capsys.readouterr().err


def test_bench_cuda_table(monkeypatch, capsys, cuda_available):
    base = dict(device="NVIDIA H100", batch=1, heads=8, seq=4096, head_dim=128, causal=False, dtype="float16")
    rows = [dict(base, impl="fastattn-cuda", ms=1.0, tflops=200.0),
            dict(base, impl="torch-flash", ms=1.25, tflops=160.0),
            dict(base, impl="torch-cudnn", ms=0.8, tflops=250.0),
            dict(base, seq=512, impl="fastattn-cuda", ms=0.1, tflops=100.0),
            dict(base, seq=512, impl="torch-cudnn", error="no kernel for this shape\nmore")]
    fake = _fake_cuda_module(rows=rows)
    monkeypatch.setitem(sys.modules, "fastattn._bench_cuda", fake)
    assert main(["bench", "--device", "cuda", "--compare", "torch", "--seqs", "512", "4096", "--no-progress"]) == 0
    assert fake.calls == [dict(compare_torch=True, seqs=(512, 4096))]
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "fastattn-cuda" in ln)
    assert "TFLOP/s" in out and "vs torch-flash" in out and "vs torch-cudnn" in out
    assert "200.00" in line and "1.25x" in line and "0.80x" in line
    assert "not run: no kernel for this shape" in out


@pytest.mark.parametrize("argv", [
    [],
    ["nope"],
    ["bench", "--seqs", "0"],
    ["bench", "--seqs", "abc"],
    ["bench", "--threads", "-1"],
    ["bench", "--compare", "jax"],
    ["bench", "--compare", "torch,jax"],
    ["bench", "--compare", ","],
    ["bench", "--device", "tpu"],
    ["bench", "--simd", "neon"],
    ["memory", "--head-dim", "x"],
    ["memory", "--dtype", "int8"],
    ["memory", "--backend", "cuda"],
    ["memory", "--threads", "0"],
    ["info", "--bogus"],
])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert "usage" in capsys.readouterr().err


# --------------------------------------------------------------------------- python -m fastattn


def test_module_info():
    proc = run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert "version" in proc.stdout


def test_module_bench_quick():
    proc = run_module(*TINY_BENCH)
    assert proc.returncode == 0, proc.stderr
    assert "numpy-materialized" in proc.stdout


def test_module_memory():
    proc = run_module("memory", "--seq-lens", "128", "--no-measure")
    assert proc.returncode == 0, proc.stderr
    assert "128" in proc.stdout


def test_module_bad_arguments():
    proc = run_module("bench", "--seqs", "-5")
    assert proc.returncode != 0
    assert "positive integer" in proc.stderr


# --------------------------------------------------------------------------- the shared grid


def test_grid_definitions():
    full = _bench.full_grid()
    assert len(full) == 5 * 2 * 2
    assert {w.seq for w in full} == {512, 1024, 2048, 4096, 8192}
    assert {w.head_dim for w in full} == {64, 128}
    assert all(w.batch == 1 and w.heads == 8 and w.dtype == "float32" for w in full)
    assert {(w.seq, w.head_dim) for w in _bench.default_grid()} == {(1024, 64)}


@pytest.mark.parametrize("causal", [False, True])
def test_workload_flops_use_attended_pairs(causal):
    w = _bench.Workload(2, 3, 100, 16, causal)
    assert w.flops == 4 * 2 * 3 * 16 * attended_pairs(100, 100, causal)
    q, k, v = w.inputs()
    assert q.shape == (2, 3, 100, 16) and q.dtype == "float32"
    assert q.std() > 0.5 and not (q == k).all()


def test_materialized_skipped_when_too_big():
    w = _bench.Workload(1, 8, 8192, 64, False)
    assert _bench.skip_reason(_bench.NUMPY, w).startswith("skipped: would need")
    assert _bench.skip_reason(_bench.NUMPY, _bench.Workload(1, 8, 1024, 64, False)) is None


def test_skipped_lines_in_table():
    w = _bench.Workload(1, 8, 8192, 64, False)
    results = _bench.run_cpu_bench([w], [_bench.NUMPY], repeat=1, progress=False)["results"]
    assert results[0]["ms"] is None
    table = _bench.format_table(results, [_bench.NUMPY])
    assert "skipped: would need" in table


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["memory", "--seq-lens", "64", "--no-measure", "--plot", str(tmp_path / "m.png")]
    assert main(argv) == 1
    assert 'pip install ".[plot]"' in capsys.readouterr().err


def test_bench_plot_helper_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plotting needs matplotlib"):
        _bench.plot([], tmp_path / "b.png")


def test_bench_variant_prints_plain_and_competitor_beside(cpu_backend, capsys, tmp_path):
    out_json = tmp_path / "v.json"
    assert main(["bench", "--variant", "softcap", "--repeat", "1", "--threads", "1", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| softcap |" in text and "vs plain" in text and "vs torch" in text
    rows = json.loads(out_json.read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"fastattn", "fastattn plain", "torch-sdpa"} <= impls or {"fastattn", "fastattn plain"} == impls
    fa = next(r for r in rows if r["impl"] == "fastattn")
    assert fa["gflops"] > 0 and fa["threads"] == 1


def test_bench_variant_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--variant", "nope"])
    assert "invalid choice" in capsys.readouterr().err
