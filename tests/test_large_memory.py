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
