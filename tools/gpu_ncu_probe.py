#!/usr/bin/env python3
"""One launch of a Hopper kernel variant for a profiler (ncu) to look at (run on the GPU):

    ncu -k regex:fa_fwd_sm90 --section WarpStateStats python tools/gpu_ncu_probe.py bias|bool|softcap|plain|window
"""

from __future__ import annotations

import sys

import cupy

from fastattn._validate import make_spec
from fastattn.backends.cuda import _launch

what = sys.argv[1]
n, b, h, d = 4096, 1, 16, 128
rng = cupy.random.default_rng(0)
q, k, v = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
kw = dict(causal=False, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=None)
if what == "bias":
    kw["attn_mask"] = rng.standard_normal((b, h, n, n), dtype=cupy.float32)
elif what == "bool":
    kw["attn_mask"] = rng.random((b, h, n, n)) < 0.9
elif what == "softcap":
    kw.update(softcap=30.0, causal=True)
elif what == "window":
    kw.update(window=(256, 0), causal=True)
elif what == "plain_causal":
    kw.update(causal=True)
spec = make_spec(q, k, v, **kw)
out = cupy.empty_like(q)
lse = cupy.empty((b, h, n), cupy.float32)
for _ in range(2):
    plan = _launch.launch(q, k, v, out, lse, spec, "float16")
cupy.cuda.Device().synchronize()
print(what, plan)
