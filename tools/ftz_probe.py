"""Does the float32 SIMT kernel flush subnormal inputs to zero on this GPU?  (q = 3e38 against a key holding 1e-39)"""
import cupy as cp
import numpy as np

import fastattn

k = np.array([[1e-39, 0.0], [0.0, 0.0]], np.float32)   # key 0 has a subnormal entry
q = np.array([[3e38, 0.0]], np.float32)
v = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
out = fastattn.flash_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), scale=1.0).get()
ref = fastattn.flash_attention(q, k, v, scale=1.0, backend="reference")
print("ftz probe: gpu", out, "reference", ref, "-> flushed" if abs(out[0, 0] - ref[0, 0]) > 1e-3 else "-> kept")
