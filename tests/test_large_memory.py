"""Memory: a long causal sequence must not cost anything like its N×N score matrix.

Marked ``slow`` (it is *not* skipped: CI runs it).  The call runs in a fresh interpreter so the
peak-RSS counter (VmHWM, reset through /proc/self/clear_refs) starts clean; B=1, H=2, N=16384, D=64 float32 would need
1 GiB for one N×N float32 score matrix, and we require the call's peak growth to stay under
256 MiB (inputs are allocated before the first measurement; the output, 8 MiB, counts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastattn

N, HEADS, HEAD_DIM = 16384, 2, 64
LIMIT_MIB = 256

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import fastattn

    N, H, D = {n}, {heads}, {head_dim}

    def vm_rss_kib():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    rng = np.random.default_rng(16384)
    # float32 drawn directly: no float64 temporaries that would raise the peak before we measure
    q, k, v = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(3))
    # warm-up on a slice: loads the extension, starts the OpenMP pool, sizes per-thread scratch
    fastattn.flash_attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], causal=True, backend="cpu",
                             num_threads=2)

    # A child started by fork+exec inherits its parent's ru_maxrss, so the peak counter is reset
    # instead: writing 5 to clear_refs sets VmHWM to the current VmRSS (Linux >= 4.0).
    def vm_hwm_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = vm_rss_kib()
    peak_before = rss_before = base
    out, lse = fastattn.flash_attention(q, k, v, causal=True, backend="cpu", return_lse=True, num_threads=2)
    peak_after = vm_hwm_kib()

    # correctness spot checks (after the measurement): top-left causal, so row i sees keys 0..i
    from fastattn.backends.reference import materialized
    n0 = 64
    ref, ref_lse = materialized(q[:, :, :n0].astype(np.float64), k[:, :, :n0].astype(np.float64),
                                v[:, :, :n0].astype(np.float64), causal=True, scale=D ** -0.5,
                                compute_dtype=np.float64)
    err_head = float(np.linalg.norm(out[:, :, :n0] - ref) / np.linalg.norm(ref))
    rows = np.arange(N - 3, N)
    s = (q[0][:, rows].astype(np.float64) @ k[0].astype(np.float64).transpose(0, 2, 1)) * D ** -0.5
    s = np.where(np.arange(N)[None, None, :] <= rows[None, :, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    w = np.exp(s - m)
    tail = (w / w.sum(axis=-1, keepdims=True)) @ v[0].astype(np.float64)
    err_tail = float(np.linalg.norm(out[0][:, rows] - tail) / np.linalg.norm(tail))
    lse_tail = (m[..., 0] + np.log(w.sum(axis=-1)))
    err_lse = float(np.abs(lse[0][:, rows] - lse_tail).max())
    print(json.dumps(dict(peak_before=peak_before, rss_before=rss_before, base=base, peak_after=peak_after,
                          err_head=err_head, err_tail=err_tail, err_lse=err_lse,
                          finite=bool(np.isfinite(out).all()), shape=list(out.shape))))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.skipif(os.environ.get("FASTATTN_SANITIZER", "").strip() not in ("", "0"),
                    reason="peak RSS is not measured under the sanitizer build (FASTATTN_SANITIZER): "
                           "AddressSanitizer's shadow memory and quarantine inflate it")
def test_long_causal_sequence_peak_memory(cpu_backend):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    code = CHILD.format(n=N, heads=HEADS, head_dim=HEAD_DIM)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib = (facts["peak_after"] - facts["base"]) / 1024
    one_matrix_mib = N * N * 4 / 2**20
    assert facts["shape"] == [1, HEADS, N, HEAD_DIM] and facts["finite"]
    assert growth_mib < LIMIT_MIB, (
        f"peak RSS grew by {growth_mib:.0f} MiB during the call; one N×N float32 matrix is {one_matrix_mib:.0f} MiB "
        f"({facts})"
    )
    assert facts["err_head"] <= 1e-5 and facts["err_tail"] <= 1e-5, facts
    assert facts["err_lse"] <= 1e-4, facts


# The backward (issue target): forward + backward at N = 32768, B=1, H=4, D=64 float32 may grow the peak by
# the outputs (out, lse), the gradients (dq, dk, dv) and at most 64 MiB more.
BWD_N, BWD_HEADS, BWD_EXTRA_MIB = 32768, 4, 64

BWD_CHILD = textwrap.dedent(
    """
    import json
    import numpy as np
    import fastattn

    N, H, D = {n}, {heads}, 64

    def status_kib(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])

    rng = np.random.default_rng(32768)
    q, k, v, dout = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(4))
    small = [x[:, :, :512] for x in (q, k, v, dout)]
    o, l = fastattn.flash_attention(*small[:3], return_lse=True, backend="cpu", num_threads=2)
    fastattn.flash_attention_backward(small[3], *small[:3], o, l, backend="cpu", num_threads=2)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS:")
    out, lse = fastattn.flash_attention(q, k, v, return_lse=True, backend="cpu", num_threads=2)
    dq, dk, dv = fastattn.flash_attention_backward(dout, q, k, v, out, lse, backend="cpu", num_threads=2)
    peak = status_kib("VmHWM:")
    kept = sum(x.nbytes for x in (out, lse, dq, dk, dv)) // 1024

    # spot checks against float64 on a few rows and keys of head 0 (the full reference would be N x N)
    scale = D ** -0.5
    q0, k0, v0, do0 = (x[0, 0].astype(np.float64) for x in (q, k, v, dout))
    rows, keys = np.array([0, 12345, N - 1]), np.array([1, 20000, N - 2])
    s = (q0[rows] @ k0.T) * scale
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dp = do0[rows] @ v0.T
    dq_ref = scale * (p * (dp - (p * dp).sum(1, keepdims=True))) @ k0
    o64 = out[0, 0].astype(np.float64)
    pk = np.exp((q0 @ k0[keys].T) * scale - lse[0, 0].astype(np.float64)[:, None])   # P[:, keys]
    dv_ref = pk.T @ do0
    dpk = do0 @ v0[keys].T
    dk_ref = scale * (pk * (dpk - (do0 * o64).sum(1, keepdims=True))).T @ q0
    err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(json.dumps(dict(base=base, peak=peak, kept=kept, err_dq=err(dq[0, 0, rows], dq_ref),
                          err_dk=err(dk[0, 0, keys], dk_ref), err_dv=err(dv[0, 0, keys], dv_ref),
                          finite=bool(np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()))))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.skipif(os.environ.get("FASTATTN_SANITIZER", "").strip() not in ("", "0"),
                    reason="peak RSS is not measured under the sanitizer build (FASTATTN_SANITIZER): "
                           "AddressSanitizer's shadow memory and quarantine inflate it")
def test_forward_and_backward_peak_memory(cpu_backend):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    code = BWD_CHILD.format(n=BWD_N, heads=BWD_HEADS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    extra_mib = (facts["peak"] - facts["base"] - facts["kept"]) / 1024
    assert facts["finite"], facts
    assert extra_mib <= BWD_EXTRA_MIB, (
        f"forward + backward took {extra_mib:.1f} MiB beyond outputs and gradients ({facts})")
    assert max(facts["err_dq"], facts["err_dk"], facts["err_dv"]) <= 1e-4, facts
