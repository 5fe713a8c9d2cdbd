"""Inputs built to break the kernel: sizes that overflow 64 bits through zero-stride views, absurd
thread counts, odd strides.  Nothing may crash the interpreter: a clear error or the right answer.
(CI also runs this file under AddressSanitizer + UndefinedBehaviorSanitizer.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from conftest import assert_close_to_reference, random_array
from fastattn.backends.cpu._threads import cpu_limit


@pytest.mark.parametrize("dtype,lead,seq_kv", [
    ("float16", (), 2**58), ("float16", (2,), 2**56), ("float16", (1, 2), 2**57), ("float32", (), 2**57),
    ("float64", (2,), 2**54), ("float32", (2,), 2**55),
])
def test_zero_stride_keys_whose_panels_overflow_64_bits(cpu_backend, dtype, lead, seq_kv):
    """K/V as zero-stride views of 2**54..2**58 keys: the packed panels' size does not fit in 64
    bits (or in memory): a MemoryError naming seq_kv, before any write."""
    k = np.broadcast_to(np.zeros((*lead, 1, 8), dtype), (*lead, seq_kv, 8))
    q = np.zeros((*lead, 1, 8), dtype)
    with pytest.raises(MemoryError, match=rf"seq_kv={seq_kv}"):
        fastattn.flash_attention(q, k, k, backend=cpu_backend, num_threads=1)


@pytest.mark.parametrize("seq_kv", [2**40, 2**45])
def test_zero_stride_keys_too_large_to_allocate(cpu_backend, seq_kv):
    """Sizes that fit in 64 bits but not in memory: a MemoryError naming the sizes, no write."""
    k = np.broadcast_to(np.zeros((1, 8), np.float32), (seq_kv, 8))
    with pytest.raises(MemoryError, match=rf"seq_kv={seq_kv}"):
        fastattn.flash_attention(np.zeros((1, 8), np.float32), k, k, backend=cpu_backend)


def test_zero_stride_queries_and_keys_of_a_sane_size(cpu_backend, rng):
    """Broadcast (zero-stride) q, k, v along every axis still give the reference's answer."""
    row = random_array(rng, (1, 1, 1, 16))
    q = np.broadcast_to(row, (2, 3, 50, 16))
    k = np.broadcast_to(random_array(rng, (1, 3, 1, 16)), (2, 3, 70, 16))
    v = np.broadcast_to(random_array(rng, (2, 1, 70, 1)), (2, 3, 70, 16))
    out, lse = fastattn.flash_attention(q, k, v, causal=True, backend=cpu_backend, return_lse=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)


@pytest.mark.parametrize("n", [3, 64, 2000, 2**31 - 1])
def test_absurd_thread_counts_are_capped(cpu_backend, rng, n):
    q, k, v = (random_array(rng, (2, 8, 600, 32)) for _ in range(3))
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=32, num_heads=8),
                                  cpu_backend).forward_multi_head(q, k, v, num_threads=n)
    assert 1 <= res.num_threads <= min(n, cpu_limit())
    np.testing.assert_array_equal(res.output, fastattn.flash_attention(q, k, v, num_threads=1))


def _python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ, **env_overrides)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_huge_omp_num_threads_does_not_abort(cpu_backend):
    """OMP_NUM_THREADS=2000 is OpenMP's default then; the call must run on what the machine has
    (libgomp exits the process when it cannot create the threads asked for)."""
    code = (
        "import numpy as np, fastattn\n"
        "q = np.random.default_rng(0).standard_normal((2, 8, 700, 32)).astype(np.float32)\n"
        "att = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=32, num_heads=8), 'cpu')\n"
        "print(att.forward_multi_head(q, q, q).num_threads)\n"
    )
    proc = _python(code, OMP_NUM_THREADS="2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 1 <= int(proc.stdout.split()[-1]) <= cpu_limit()


def test_short_spin_set_for_the_kernel_only(cpu_backend):
    """The libgomp spin count is set for the runtime the kernel loads, then the environment is
    restored (child processes see the caller's); a caller's own choice is kept."""
    code = (
        "import os, fastattn\n"
        "from fastattn.backends import cpu\n"
        "print(os.environ.get('GOMP_SPINCOUNT', '-'), cpu.describe()['openmp_spin_count'])\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env_after, policy = proc.stdout.split()
    assert env_after == "-"
    assert policy in ("3000", "libgomp's")  # the latter when libgomp was loaded earlier
    proc = _python(code, GOMP_SPINCOUNT="12345")
    assert proc.stdout.split() == ["12345", "12345"]


@pytest.mark.parametrize("block_q,block_kv", [(2**40, None), (None, 2**40), (2**62, 2**62)])
def test_huge_block_sizes_are_clipped_or_refused(cpu_backend, rng, block_q, block_kv):
    q, k, v = (random_array(rng, (1, 2, 33, 8)) for _ in range(3))
    out = fastattn.flash_attention(q, k, v, block_size_q=block_q, block_size_kv=block_kv, backend=cpu_backend)
    assert_close_to_reference(out, q, k, v, rtol=1e-5)


def test_negative_and_unaligned_strides(cpu_backend, rng):
    base = random_array(rng, (2, 3, 41, 20))
    q = base[:, :, ::-1, ::-1]
    raw = np.zeros(base.nbytes + 1, np.uint8)[1:].view(np.float32).reshape(base.shape)  # misaligned
    raw[...] = base
    k = raw[:, ::-1]
    v = np.asfortranarray(base)[:, :, ::2]
    k = k[:, :, ::2]
    out, lse = fastattn.flash_attention(q, k, v, causal=True, backend=cpu_backend, return_lse=True)
    assert_close_to_reference(out, q, k, v, causal=True, lse=lse, rtol=1e-5)


def test_byte_swapped_inputs(cpu_backend, rng):
    q, k, v = (random_array(rng, (1, 2, 17, 8)) for _ in range(3))
    swapped = [x.astype(x.dtype.newbyteorder(">")) for x in (q, k, v)]
    out = fastattn.flash_attention(*swapped, backend=cpu_backend)
    np.testing.assert_array_equal(out, fastattn.flash_attention(q, k, v, backend=cpu_backend))
