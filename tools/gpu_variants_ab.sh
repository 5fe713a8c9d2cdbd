#!/usr/bin/env bash
# The variant benchmark of two checkouts in one GPU session, before / after a change (logs and JSON
# under $OUT): compiles the Hopper kernels the benchmark launches (float16, head_dim 128; NVRTC,
# 16 processes) in each tree, then runs `python -m fastattn._bench_cuda --variant V --json` for each
# variant, the other tree ("before") first.
#   VARIANTS="window softcap alibi mask varlen gqa" bash tools/gpu_variants_ab.sh ../other-checkout
# POLY_SWEEP="0 2 4" also times this tree's softcap kernels (forward alone, float16 / bfloat16, D = 128)
# compiled with each -DFA_EXP2_POLY value beside the plain kernel, and their error against float64
# beside a plain implementation in the same precision (the tests' 2x bound).
set -u
OUT=${OUT:-/tmp/fastattn-gpu}; mkdir -p "$OUT"
BASE=$(cd "$1" && pwd); NEW=$PWD
VARIANTS=${VARIANTS:-"window softcap alibi mask varlen gqa"}
export PYTHONUNBUFFERED=1
for tree in "$BASE" "$NEW"; do
  (cd "$tree" && PYTHONPATH=$tree/src timeout 300 python3 - <<'PY') &
import concurrent.futures as cf, time
from fastattn.backends.cuda import _specs
names = [n for n in _specs.all_sm90_name_expressions() if n.startswith(("fa_fwd_sm90<false, 128, 128,", "fa_v_nonfinite<false"))]
def one(n):
    from fastattn.backends.cuda import _launch
    try:
        _launch.get_kernel(n, 0); return None
    except Exception as e:
        return f"{n}: {e}"
t0 = time.time()
with cf.ProcessPoolExecutor(8) as pool:
    errs = [e for e in pool.map(one, names) if e]
print(f"{len(names) - len(errs)}/{len(names)} compiled in {time.time() - t0:.0f}s", *errs, sep="\n")
PY
done
wait
for tag in base new; do
  tree=$BASE; [ $tag = new ] && tree=$NEW
  for v in $VARIANTS; do
    (cd "$tree" && PYTHONPATH=$tree/src timeout 200 python3 -m fastattn._bench_cuda --variant $v --json "$OUT/vb_${tag}_$v.json") \
      >> "$OUT/vb_$tag.log" 2>&1
  done
  python3 - "$OUT" $tag <<'PY'
import glob, json, os, sys
out, tag = sys.argv[1:]
rows, not_run = [], []
for f in sorted(glob.glob(f"{out}/vb_{tag}_*.json")):
    d = json.load(open(f)); rows += d["results"]; not_run += d["not_run"]; os.remove(f)
json.dump({"results": rows, "not_run": not_run}, open(f"{out}/vb_{tag}.json", "w"), indent=1)
PY
  echo "== $tag"; grep -v "^variant" "$OUT/vb_$tag.log" | grep -v "^not run"
done

[ -n "${POLY_SWEEP:-}" ] && PYTHONPATH=$NEW/src timeout 400 python3 - $POLY_SWEEP <<'PY' 2>&1 | tee "$OUT/poly_sweep.log"
import concurrent.futures as cf, sys, time
import numpy as np
polys = [int(x) for x in sys.argv[1:]]
from fastattn.backends.cuda import _specs
names = [_specs.sm90_name(dt, 128, cfg, causal, 128, True, attn_mask=False)
         for dt in ("float16", "bfloat16") for causal in (False, True) for _, cfg in _specs.SM90_RULES[(128, causal)]]
names += [_specs.sm90_name(dt, 64, cfg, True, 64, True, attn_mask=False)
          for dt in ("float16", "bfloat16") for _, cfg in _specs.SM90_RULES[(64, True)]]
def one(a):
    from fastattn.backends.cuda import _launch
    _launch.get_kernel(a[0], 0, a[1])
t0 = time.time()
with cf.ProcessPoolExecutor(16) as pool:
    list(pool.map(one, [(n, (f"-DFA_EXP2_POLY={p}",)) for n in names for p in polys]))
print(f"compiled {len(names) * len(polys)} kernels in {time.time() - t0:.0f}s", flush=True)
import cupy, ml_dtypes
from fastattn._validate import make_spec
from fastattn._bench_cuda import time_ms
from fastattn._masks import MaskRule, attended_pairs
from fastattn.backends.cuda import _launch
def spec(q, k, v, **kw):
    base = dict(causal=False, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=None)
    base.update(kw)
    return make_spec(q, k, v, **base)
def run(q, k, v, sp, dt, extra=(), out=None):
    out = cupy.full(q.shape, np.nan, q.dtype) if out is None else out
    lse = cupy.empty(q.shape[:3], cupy.float32)
    _launch.launch(q, k, v, out, lse, sp, dt, extra_options=extra)
    return out
print("kernel / plain per attended pair (forward alone, outputs reused), TFLOP/s of the softcap kernel", flush=True)
rng = cupy.random.default_rng(0)
for dt in ("float16", "bfloat16"):
    for d, n, causal in ((128, 1024, True), (128, 4096, True), (128, 4096, False), (64, 4096, True)):
        b, h = 16384 // n, 2048 // d
        q, k, v = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(dt) for _ in range(3))
        out = cupy.empty_like(q)
        pairs = b * h * attended_pairs(MaskRule(causal=causal), n, n)
        pl = spec(q, k, v, causal=causal); sc = spec(q, k, v, causal=causal, softcap=30.0)
        cells = []
        for rep in range(2):  # the plain kernel and every POLY twice: the spread
            t_plain = time_ms(lambda: run(q, k, v, pl, dt, out=out))
            for p in polys:
                t = time_ms(lambda: run(q, k, v, sc, dt, (f"-DFA_EXP2_POLY={p}",), out=out))
                cells.append(f"P{p} {4 * d * pairs / t / 1e9:4.0f} {t_plain / t:.3f}")
        print(f"{dt} d{d} N={n} causal={causal!s:5} plain {4 * d * pairs / t_plain / 1e9:4.0f}: " + "  ".join(cells), flush=True)
        del q, k, v, out
        cupy.get_default_memory_pool().free_all_blocks()
print("error against float64: kernel / plain same-precision implementation (the tests' bound: 2x)", flush=True)
nrng = np.random.default_rng(1)
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
def naive(q, k, v, scale, c, causal, low):
    comp = np.float32 if low else np.float64
    s = np.einsum("bhid,bhjd->bhij", q.astype(comp), k.astype(comp)) * comp(scale)
    s = comp(c) * np.tanh(s / comp(c))
    if causal:
        s = np.where(np.arange(s.shape[-1])[None, :] <= np.arange(s.shape[-2])[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True)); p = p / p.sum(-1, keepdims=True)
    if low: p = p.astype(q.dtype).astype(comp)
    o = np.einsum("bhij,bhjd->bhid", p, v.astype(comp))
    return (o.astype(q.dtype) if low else o).astype(np.float64)
for dt in ("float16", "bfloat16"):
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.float16
    for (b, h, n, m, d), c, scale, causal in (((1, 2, 130, 260, 64), 5.0, 1.0, True), ((2, 4, 512, 1024, 128), 30.0, None, True),
                                              ((2, 4, 300, 700, 128), 5.0, 0.5, False), ((1, 2, 200, 333, 128), 0.5, 0.3, True),
                                              ((1, 2, 256, 512, 128), 200.0, 1.0, True)):
        q, k, v = (nrng.standard_normal((b, h, s, d)).astype(npdt) for s in (n, m, m))
        sc = d ** -0.5 if scale is None else scale
        ref = naive(q, k, v, sc, c, causal, False)
        plain = rel(naive(q, k, v, sc, c, causal, True), ref)
        gq, gk, gv = (cupy.asarray(x.view(np.uint16)).view(dt) for x in (q, k, v))
        sp = spec(gq, gk, gv, causal=causal, scale=scale, softcap=c)
        cells = []
        for p in polys:
            o = cupy.asnumpy(run(gq, gk, gv, sp, dt, (f"-DFA_EXP2_POLY={p}",)).astype(cupy.float32)).astype(np.float64)
            cells.append(f"P{p} {rel(o, ref) / plain:.3f}x{' NaN' if np.isnan(o).any() else ''}")
        print(f"  {dt} {b}x{h}x{n}x{m} d{d} c={c} scale={scale} causal={causal}: plain {plain:.3g}; " + "  ".join(cells), flush=True)
PY
