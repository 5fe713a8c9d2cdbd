"""Threads: results do not depend on the thread count, OpenMP limits are honoured, calls from
several Python threads are safe, and the cpu kernel releases the GIL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastattn
from conftest import random_array
from fastattn import FlashAttention, FlashAttentionConfig


def run(q, k, v, backend, **kw):
    d = q.shape[-1]
    cfg = FlashAttentionConfig(head_dim=d, num_heads=q.shape[1], causal=kw.pop("causal", False),
                               dropout_p=kw.pop("dropout_p", 0.0), block_size_q=kw.pop("block_size_q", None),
                               block_size_kv=kw.pop("block_size_kv", None))
    return FlashAttention(cfg, backend).forward_multi_head(q, k, v, **kw)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8), (1, 1, 300, 200, 64), (2, 3, 65, 1000, 32), (4, 2, 17, 3, 80)])
def test_thread_count_does_not_change_results(backend, make_qkv, shape, causal, dropout_p):
    b, h, sq, skv, d = shape
    q, k, v = make_qkv(b, h, sq, skv, d)
    kw = dict(causal=causal, dropout_p=dropout_p, seed=11 if dropout_p else None)
    one = run(q, k, v, backend, num_threads=1, **kw)
    assert one.num_threads == 1
    for n in (2, 3, 8):
        many = run(q, k, v, backend, num_threads=n, **kw)
        np.testing.assert_array_equal(many.output, one.output, err_msg=f"num_threads={n}")
        np.testing.assert_array_equal(many.logsumexp, one.logsumexp, err_msg=f"num_threads={n}")
        assert 1 <= many.num_threads <= n


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_thread_count_other_dtypes(backend, make_qkv, dtype):
    q, k, v = make_qkv(2, 2, 90, 70, 24, dtype)
    one = run(q, k, v, backend, num_threads=1, causal=True, block_size_q=8, block_size_kv=16)
    two = run(q, k, v, backend, num_threads=2, causal=True, block_size_q=8, block_size_kv=16)
    np.testing.assert_array_equal(one.output, two.output)
    np.testing.assert_array_equal(one.logsumexp, two.logsumexp)


def test_explicit_threads_reported(cpu_backend, make_qkv):
    q, k, v = make_qkv(2, 4, 256, 256, 32)
    assert run(q, k, v, cpu_backend, num_threads=2).num_threads == 2
    assert run(q, k, v, cpu_backend, num_threads=1).num_threads == 1


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_threadpool_limits_honoured(backend, make_qkv, dropout_p):
    q, k, v = make_qkv(2, 4, 200, 150, 32)
    kw = dict(causal=True, dropout_p=dropout_p, seed=3 if dropout_p else None)
    single = run(q, k, v, backend, num_threads=1, **kw)
    with threadpool_limits(limits=1, user_api="openmp"):
        limited = run(q, k, v, backend, **kw)
    assert limited.num_threads == 1, "threadpool_limits(1, 'openmp') not honoured by the default thread count"
    np.testing.assert_array_equal(limited.output, single.output)
    np.testing.assert_array_equal(limited.logsumexp, single.logsumexp)
    with threadpool_limits(limits=2, user_api="openmp"):
        two = run(q, k, v, backend, **kw)
    assert two.num_threads <= 2
    np.testing.assert_array_equal(two.output, single.output)


def test_threadpool_limits_sees_the_kernels_openmp(cpu_backend, make_qkv):
    """threadpoolctl can only limit an OpenMP runtime it finds loaded: the cpu kernel's must be one."""
    from threadpoolctl import threadpool_info

    import fastattn.backends.cpu as cpu

    q, k, v = make_qkv(1, 1, 8, 8, 8)
    fastattn.flash_attention(q, k, v, backend=cpu_backend)
    info = cpu.describe()
    if not info.get("openmp", True):
        pytest.skip("the cpu extension was built without OpenMP")
    assert any(lib["user_api"] == "openmp" for lib in threadpool_info()), threadpool_info()


def _job(seed: int, backend: str):
    """One call's inputs and settings, a function of ``seed`` alone."""
    rng = np.random.default_rng(seed)
    b, h = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    sq, skv, d = int(rng.integers(1, 200)), int(rng.integers(1, 200)), int(rng.choice([8, 17, 64]))
    q = random_array(rng, (b, h, sq, d))
    k = random_array(rng, (b, h, skv, d))
    v = random_array(rng, (b, h, skv, d))
    kw = dict(causal=bool(seed % 2), dropout_p=0.25 if seed % 3 == 0 else 0.0, seed=seed,
              num_threads=1 + seed % 2, block_size_q=[None, 16, 7][seed % 3], block_size_kv=[None, 32, 5][seed % 3])
    return (q, k, v), kw


def _call(seed: int, backend: str):
    (q, k, v), kw = _job(seed, backend)
    return fastattn.flash_attention(q, k, v, backend=backend, return_lse=True, **kw)


def test_concurrent_calls_equal_sequential(backend):
    seeds = list(range(100, 124))  # 4 threads × 6 calls
    sequential = [_call(s, backend) for s in seeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda s: _call(s, backend), seeds))
    for s, a, b in zip(seeds, sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a[0], b[0], err_msg=f"output of job {s}")
        np.testing.assert_array_equal(a[1], b[1], err_msg=f"lse of job {s}")


def test_concurrent_calls_with_forced_simd(cpu_backend):
    """set_simd is per thread: threads forcing different paths do not disturb each other."""
    import fastattn.backends.cpu as cpu
    from conftest import require_cpu_feature

    paths = list(require_cpu_feature(cpu, "simd_paths")())
    set_simd = require_cpu_feature(cpu, "set_simd")

    def forced(args):
        path, seed = args
        with set_simd(path):
            return _call(seed, cpu_backend)

    jobs = [(paths[i % len(paths)], 200 + i) for i in range(16)]
    expected = [forced(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(forced, jobs))
    for job, a, b in zip(jobs, expected, got, strict=True):
        np.testing.assert_array_equal(a[0], b[0], err_msg=str(job))


def test_gil_released_during_a_long_call(cpu_backend):
    """Another Python thread keeps running while one large call is inside the kernel.

    A counter thread records a tick every 1000 increments.  If the kernel held the GIL, the counter
    could only run before the call enters the kernel and after it returns, so no ticks could fall
    in the middle of the call.  We require many ticks in the middle 60% of the call.
    """
    rng = np.random.default_rng(7)
    n, d = 4096, 128
    while True:
        q, k, v = (rng.standard_normal((1, 1, n, d), dtype=np.float32) for _ in range(3))
        t0 = time.perf_counter()
        fastattn.flash_attention(q, k, v, backend=cpu_backend, num_threads=1)
        if time.perf_counter() - t0 >= 0.25 or n >= 32768:
            break
        n *= 2

    ticks: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def counter():
        count = 0
        started.set()
        while not stop.is_set():
            count += 1
            if count % 1000 == 0:
                ticks.append(time.perf_counter())

    thread = threading.Thread(target=counter, daemon=True)
    thread.start()
    started.wait()
    try:
        t0 = time.perf_counter()
        out = fastattn.flash_attention(q, k, v, backend=cpu_backend, num_threads=1)
        t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    assert out.shape == q.shape
    lo, hi = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
    middle = sum(lo <= t <= hi for t in ticks)
    assert middle >= 20, f"the counter thread ticked {middle} times during the middle of a {t1 - t0:.2f} s call"


@pytest.mark.parametrize("n", [2**31, 2**63, 10**30])
def test_huge_thread_counts(backend, make_qkv, n):
    """Validation accepts any positive num_threads; more threads than work must simply be capped
    (or refused by a ValueError naming num_threads), not leak a C-level OverflowError."""
    q, k, v = make_qkv(2, 2, 40, 40, 16)
    one = run(q, k, v, backend, num_threads=1, causal=True)
    try:
        many = run(q, k, v, backend, num_threads=n, causal=True)
    except ValueError as exc:
        assert "num_threads" in str(exc)
        return
    np.testing.assert_array_equal(many.output, one.output)
    assert 1 <= many.num_threads <= n


_FORK_CHILD = """
import multiprocessing as mp, sys
import numpy as np
import fastattn

def work(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 4, 300, 32)).astype(np.float32) for _ in range(3))
    return fastattn.flash_attention(q, k, v, backend="cpu", causal=True, num_threads=2).tobytes()

if __name__ == "__main__":
    expected = [work(s) for s in range(4)]           # the parent runs parallel regions first
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(work, range(4))               # then forked workers call the kernel
    print("same" if got == expected else "different", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_workers_after_parallel_use(cpu_backend, tmp_path):
    """multiprocessing's "fork" start method (Linux's default before 3.14, and what DataLoader-style
    worker pools use): a child forked after the parent ran the kernel with several threads must not
    hang in the OpenMP runtime, and must give the parent's results."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the pool workers it forked
        proc.communicate()
        pytest.fail("a worker forked after the parent used the kernel with 2 threads hung (20 s) in its first call")
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "same"


def test_omp_num_threads_environment_honoured(cpu_backend):
    """OMP_NUM_THREADS sets the default thread count (read by the OpenMP runtime at start-up)."""
    code = (
        "import numpy as np, fastattn\n"
        "q = np.random.default_rng(0).standard_normal((2, 4, 300, 32)).astype(np.float32)\n"
        "att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=32, num_heads=4), 'cpu')\n"
        "print(att.forward_multi_head(q, q, q).num_threads,\n"
        "      att.forward_multi_head(q, q, q, num_threads=2).num_threads)\n"
    )
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, explicit = proc.stdout.split()
    assert default == "1", f"OMP_NUM_THREADS=1 gave {default} threads by default"
    assert explicit == "2", "an explicit num_threads overrides OMP_NUM_THREADS"
