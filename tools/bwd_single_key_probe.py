"""Probe: a query row that sees one key must get dq = 0 exactly (dS = P (dP - D) with D = dP bit for bit).
Prints, per SIMD path, whether the forward's output equals v and the largest |dq|."""
import os
import subprocess
import sys

import numpy as np

if len(sys.argv) == 1:
    for simd in ("avx512", "avx2", "generic"):
        subprocess.run([sys.executable, __file__, simd], env={**os.environ, "FASTATTN_SIMD": simd}, check=False)
    sys.exit(0)
import fastattn  # noqa: E402

rng = np.random.default_rng(0)
q, k, v, do = (rng.standard_normal(s).astype(np.float32) for s in ((1, 3, 1, 59), (1, 1, 17, 59), (1, 1, 17, 59),
                                                                    (1, 3, 1, 59)))
out, lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
dq, dk, dv = fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=True)
d_out = (do[0, :, 0].astype(np.float64) * out[0, :, 0]).sum(-1)
print(sys.argv[1], "out == v:", bool((out[0, :, 0] == v[0, 0, 0]).all()), "max|dq|:", float(np.abs(dq).max()),
      "dP - D in float64:", float(np.abs(do[0, :, 0].astype(np.float64) @ v[0, 0, 0] - d_out).max()))
