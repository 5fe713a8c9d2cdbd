#!/usr/bin/env bash
# One GPU session for the CUDA backend: compile every specialization (NVRTC, parallel), tests,
# compute-sanitizer memcheck on a representative small run (and the numerical edge cases: large
# values, inf / NaN at masked keys, 100k keys), racecheck / synccheck, numbers for the docs
# (numerics), tile sweep, benchmark beside torch.
#   STEPS="build compile tests variants vsanitize vbench modsprobe maskprobe sanitize racecheck numerics sweep bench cli" \
#     bash tools/gpu_session.sh  (logs under $OUT)
set -u
OUT=${OUT:-/tmp/fastattn-gpu}; mkdir -p "$OUT"
STEPS=${STEPS:-"compile tests sanitize sweep bench"}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site; fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"

for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
  build)  # the CPU extension too, so the CPU-vs-GPU tests (dropout mask) run here
    timeout 200 python3 setup.py build_ext --inplace -q 2>&1 | tail -3
    ;;
  compile)  # every specialization, NVRTC in 16 processes (CuPy's and fastattn's disk caches are shared)
    timeout 400 python3 - <<'PY' 2>&1 | tee "$OUT/compile.log"
import concurrent.futures as cf, os, time
from fastattn.backends.cuda import _specs
names = _specs.all_name_expressions() + _specs.all_sm90_name_expressions()
def one(n):
    from fastattn.backends.cuda import _launch
    t = time.time()
    try:
        _launch.get_kernel(n, 0); return None, time.time() - t
    except Exception as e:
        return f"{n}: {e}", time.time() - t
t0 = time.time()
with cf.ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    res = list(pool.map(one, sorted(names, key=lambda n: not n.startswith("fa_fwd_sm90"))))
errs = [e for e, _ in res if e]
print(f"NVRTC compiled {len(names) - len(errs)}/{len(names)} specializations in {time.time() - t0:.0f}s "
      f"(longest {max(s for _, s in res):.1f}s, sum {sum(s for _, s in res):.0f}s)")
for e in errs: print("FAILED", e[:3000])
PY
    ;;
  variants)  # every variant on every kernel family against the float64 reference
    timeout 400 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs --maxfail=60 tests/test_cuda_variants.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/variants.log" | tail -40
    ;;
  vsanitize)  # compute-sanitizer memcheck on a representative call of each variant, each family
    cat > /tmp/vsan.py <<'PY'
import os, numpy as np, cupy, fastattn
rng = np.random.default_rng(0)
def g(*s, dt="float16"): return cupy.asarray(rng.standard_normal(s).astype(dt))
cu = cupy.asarray(np.array([0, 5, 5, 140, 203], np.int32))
for fam in ("auto", "mma"):
    os.environ["FASTATTN_CUDA_KERNEL"] = fam
    for dt in (("float16", "bfloat16") if fam == "auto" else ("float16",)) + (("float32",) if fam == "auto" else ()):
        q, k, v = g(2, 6, 77, 64, dt=dt), g(2, 2, 130, 64, dt=dt), g(2, 2, 130, 64, dt=dt)
        calls = dict(gqa=dict(causal=True), br=dict(causal="bottom_right", window=(20, 3)),
                     softcap=dict(softcap=5.0, alibi_slopes=cupy.full((6,), 0.1, cupy.float32)),
                     softcap_only=dict(softcap=5.0, causal=True), alibi_only=dict(alibi_slopes=cupy.full((6,), 0.1, cupy.float32)),
                     bias=dict(attn_mask=g(1, 6, 77, 130, dt="float32")),
                     bool=dict(attn_mask=cupy.asarray(rng.random((2, 1, 77, 130)) < 0.5)),
                     # 16-byte aligned rows (views of wider ones): the Hopper kernel's shared-memory mask tiles
                     bias_tiles=dict(attn_mask=g(2, 6, 77, 136, dt="float32")[..., :130], causal=True),
                     bias16_tiles=dict(attn_mask=g(1, 1, 77, 136, dt=dt if dt != "float32" else "float16")[..., :130]),
                     bool_tiles=dict(attn_mask=cupy.asarray(rng.random((2, 6, 77, 144)) < 0.5)[..., :130],
                                     window=(40, 40)),
                     ragged=dict(seqlens_q=np.array([77, 3]), seqlens_kv=np.array([0, 100]), causal=True),
                     drop=dict(dropout_p=0.2, window=(10, 10)))
        for name, kw in calls.items():
            out = fastattn.flash_attention(q, k, v, **kw)
            print(fam, dt, name, float(abs(out.astype(cupy.float32)).sum()))
        out = fastattn.flash_attention_varlen(g(203, 4, 128, dt=dt), g(203, 2, 128, dt=dt), g(203, 2, 128, dt=dt),
                                              cu, cu, causal=True)
        out = fastattn.flash_attention(g(1, 2, 65, 192, dt=dt), g(1, 2, 90, 192, dt=dt), g(1, 2, 90, 128, dt=dt),
                                       causal=True)
        out = fastattn.flash_attention(g(1, 70, 4, 256, dt=dt), g(1, 90, 4, 256, dt=dt), g(1, 90, 4, 256, dt=dt),
                                       layout="bshd", window=(30, 30))
        cupy.cuda.Device().synchronize()
        print(fam, dt, "varlen / dims / bshd ok")
PY
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/vsan.py 2>&1 | tee "$OUT/vsanitize.log" | tail -12
    echo "sanitizer exit: ${PIPESTATUS[0]}"
    ;;
  vbench)  # every variant beside torch, and the (batch, seq, heads, dim) layout on the full grid
    timeout 400 python3 -m fastattn._bench_cuda --variant ${VARIANT:-all} --json "$OUT/vbench.json" 2>&1 | tee "$OUT/vbench.log" | tail -80
    ;;
  tests)
    timeout 540 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
    ;;
  sanitize)
    cat > /tmp/sanitize_run.py <<'PY'
import numpy as np, cupy, ml_dtypes
import fastattn
rng = np.random.default_rng(0)
for dt, d, causal, p, sq, skv in [("float16", 64, False, 0.0, 130, 77), ("bfloat16", 128, True, 0.0, 65, 200),
                                  ("float16", 59, True, 0.2, 33, 47), ("float16", 256, False, 0.0, 70, 90),
                                  ("float32", 80, True, 0.1, 40, 41), ("float64", 200, False, 0.0, 20, 33),
                                  ("float16", 128, False, 0.0, 1100, 1030), ("bfloat16", 64, True, 0.0, 300, 2100),
                                  ("bfloat16", 120, True, 0.0, 333, 517)]:
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    q, k, v = (cupy.asarray(rng.standard_normal((2, 2, s, d)).astype(npdt)) for s in (sq, skv, skv))
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(num_heads=2, head_dim=d, causal=causal,
                                  dropout_p=p)).forward_multi_head(q, k, v, seed=1)
    cupy.cuda.Device().synchronize()
    print(dt, d, causal, p, res.kernel, "ok", float(abs(res.output.astype(cupy.float32)).sum()))
PY
    cat >> /tmp/sanitize_run.py <<'PY'
# numerical edge cases: every kernel family (FASTATTN_CUDA_KERNEL=mma for mma.sync on Hopper)
import os
def run(q, k, v, causal, family="auto"):
    os.environ["FASTATTN_CUDA_KERNEL"] = family
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(num_heads=q.shape[1], head_dim=q.shape[3],
                                  causal=causal)).forward_multi_head(q, k, v)
    cupy.cuda.Device().synchronize()
    os.environ["FASTATTN_CUDA_KERNEL"] = "auto"
    return res
for dt, val in (("bfloat16", 133120.0), ("float16", 30000.0), ("float32", 1e17)):  # large finite values
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    for family in ("auto", "mma"):
        x = cupy.asarray(np.full((1, 1, 1, 64), val, npdt))
        res = run(x, x, x, False, family)
        print("large", dt, val, res.kernel, float(res.output.astype(cupy.float32)[0, 0, 0, 0]))
for dt, d, family in (("float16", 64, "auto"), ("bfloat16", 128, "auto"), ("float16", 64, "mma"),
                      ("bfloat16", 59, "auto"), ("float32", 80, "auto"), ("float64", 64, "auto")):
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    q, k, v = (rng.standard_normal((1, 2, s, d)).astype(npdt) for s in (200, 333, 333))
    v[:, :, 100:, 3] = np.nan  # keys 100.. are hidden from rows 0..99: the masking slow paths
    k[:, :, 200:] = np.inf     # keys no row sees
    v[:, :, 250:] = -np.inf
    res = run(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), True, family)
    out = cupy.asnumpy(res.output.astype(cupy.float32))
    print("masked NaN", dt, d, res.kernel, "NaN rows", sorted(set(np.nonzero(np.isnan(out))[2].tolist()))[:1],
          "..", int(np.isnan(out).sum()), "NaN entries (expect", 2 * 100, ")")
q, k, v = (cupy.asarray(rng.standard_normal((1, 2, s, 128)).astype(np.float32)) for s in (16, 100_000, 100_000))
res = run(q, k, v, False)
print("100k keys", res.kernel, float(abs(res.output).sum()))
PY
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/sanitize_run.py 2>&1 | tee "$OUT/sanitize.log" | tail -30
    echo "sanitizer exit: ${PIPESTATUS[0]}"
    ;;
  racecheck)  # shared-memory hazards and barrier misuse: every Hopper tile configuration, and the
              # masking slow paths (V with NaN on causal diagonal tiles) of wgmma and mma.sync
    cat > /tmp/race_run.py <<'PY'
import cupy, numpy as np
from fastattn._validate import make_spec
from fastattn.backends.cuda import _launch, _specs
rng = cupy.random.default_rng(0)
for dt in ("float16", "bfloat16"):
    for d, dd in ((64, 64), (128, 120)):
        q, k, v = (rng.standard_normal((1, 1, s, dd), dtype=cupy.float32).astype(dt) for s in (200, 333, 333))
        vn = v.copy(); vn[:, :, 70:, 5] = cupy.nan  # hidden from rows 0..69: slow paths
        for causal in (False, True):
            spec = make_spec(q, k, v, causal=causal, scale=None, dropout_p=0.0, seed=None, block_q=None,
                             block_kv=None, num_threads=None)
            configs = list(_specs.SM90_SWEEP[d]) + [_specs.MMA_CONFIGS[(d, causal)], _specs.MMA_SWEEP[d][-1]]
            for cfg in configs:
                for vv in ((v, vn) if causal else (v,)):
                    out = cupy.empty_like(q); lse = cupy.empty((1, 1, 200), cupy.float32)
                    _launch.launch(q, k, vv, out, lse, spec, dt, config=cfg)
cupy.cuda.Device().synchronize()
print("ran every Hopper tile configuration and the mma.sync tiles, clean and with NaN at masked keys")
PY
    for tool in racecheck synccheck; do
      timeout 280 compute-sanitizer --tool $tool --error-exitcode 9 python3 /tmp/race_run.py 2>&1 | tee "$OUT/$tool.log" | tail -4
      echo "$tool exit: ${PIPESTATUS[0]}"
    done
    ;;
  numerics)  # the numbers docs/cuda.md quotes: errors at 100k keys beside a plain float32 implementation
    timeout 400 python3 - <<'PY' 2>&1 | tee "$OUT/numerics.log"
import os, numpy as np, cupy, ml_dtypes, fastattn
from fastattn.backends.reference import materialized
rng = np.random.default_rng(0)
def run(q, k, v, family="auto", **kw):
    os.environ["FASTATTN_CUDA_KERNEL"] = family
    res = fastattn.FlashAttention(fastattn.FlashAttentionConfig(num_heads=q.shape[1], head_dim=q.shape[3],
                                  **kw)).forward_multi_head(*(cupy.asarray(x) for x in (q, k, v)))
    return (cupy.asnumpy(res.output.astype(cupy.float64)), cupy.asnumpy(res.logsumexp).astype(np.float64),
            res.kernel)
def plain32(q, k, v, scale):
    s = np.matmul(q.astype(np.float32), np.swapaxes(k.astype(np.float32), -1, -2)) * np.float32(scale)
    m = s.max(-1, keepdims=True); p = np.exp(s - m); r = p.sum(-1, keepdims=True)
    return (np.matmul(p, v.astype(np.float32)) / r).astype(np.float64), (m + np.log(r))[..., 0].astype(np.float64)
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
print("float32: error against float64, kernel / plain float32 (materialized, BLAS)")
for h, sq, skv, d in ((12, 16, 100_000, 128), (2, 16, 100_000, 32), (2, 16, 10_000, 128), (2, 64, 1000, 64)):
    q, k, v = (rng.standard_normal((1, h, s, d)).astype(np.float32) for s in (sq, skv, skv))
    out, lse, kern = run(q, k, v)
    ref, rl = materialized(*(x.astype(np.float64) for x in (q, k, v)), causal=False, scale=d ** -0.5,
                           compute_dtype=np.float64)
    po, pl = plain32(q, k, v, d ** -0.5)
    print(f"  H{h} q{sq} kv{skv} d{d} {kern}: out {rel(out, ref):.3g} / {rel(po, ref):.3g} = "
          f"{rel(out, ref) / rel(po, ref):.2f}x; lse max err {abs(lse - rl).max():.3g} / {abs(pl - rl).max():.3g}")
print("float16 / bfloat16, 100k keys: lse max error, kernel / plain float32 logsumexp; out error")
for dt in ("float16", "bfloat16"):
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    for d in (32, 64, 128, 256):
        q, k, v = (rng.standard_normal((1, 2, s, d)).astype(npdt) for s in (16, 100_000, 100_000))
        out, lse, kern = run(q, k, v)
        ref, rl = materialized(*(x.astype(np.float64) for x in (q, k, v)), causal=False, scale=d ** -0.5,
                               compute_dtype=np.float64)
        _, pl = plain32(q, k, v, d ** -0.5)
        print(f"  {dt} d{d} {kern}: lse {abs(lse - rl).max():.3g} / {abs(pl - rl).max():.3g}; out {rel(out, ref):.3g}")
print("large values (q = k = v, one key): output, lse")
for dt, val in (("bfloat16", 133120.0), ("float16", 30000.0), ("float32", 1e17), ("float64", 1e150)):
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
    for family in (("auto", "mma") if dt in ("float16", "bfloat16") else ("auto",)):
        x = np.full((1, 1, 1, 64), val, npdt)
        out, lse, kern = run(x, x, x, family)
        print(f"  {dt} {val:g} {kern}: out {out[0, 0, 0, 0]:.6g} lse {lse[0, 0, 0]:.6g}")
os.environ["FASTATTN_CUDA_KERNEL"] = "auto"
PY
    ;;
  modsprobe)  # softcap error (ex2 + rcp against tanh.approx), softcap / ALiBi kernels at several tiles
    timeout 200 python3 tools/gpu_mods_probe.py tanh 2>&1 | tee "$OUT/tanh.log"
    timeout 300 python3 tools/gpu_mods_probe.py mods 2>&1 | tee "$OUT/modsweep.log"
    ;;
  maskprobe)  # attn_mask kernels (bias, boolean) at several tiles beside the plain kernel
    timeout 300 python3 tools/gpu_mods_probe.py mask 2>&1 | tee "$OUT/masksweep.log"
    ;;
  sweep)
    timeout 300 python3 tools/gpu_probe.py --quick 2>&1 | tee "$OUT/sweep.log" | grep -v " nan 0$"
    ;;
  bench)
    timeout 480 python3 - <<'PY' 2>&1 | tee "$OUT/bench.log"
import json, os
from fastattn._bench_cuda import run_cuda_bench, format_table
rows = run_cuda_bench(progress=lambda r: print(r, flush=True))
json.dump(rows, open(os.path.join(os.environ["OUT"], "bench.json"), "w"), indent=1)
print(format_table(rows))
PY
    ;;
  overhead)
    timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/overhead.log"
import cProfile, pstats, time, cupy
import fastattn
q = cupy.random.standard_normal((1, 1, 16, 64), dtype=cupy.float32).astype(cupy.float16)
for _ in range(20): fastattn.flash_attention(q, q, q)
cupy.cuda.Device().synchronize()
t = time.perf_counter(); n = 2000
for _ in range(n): fastattn.flash_attention(q, q, q)
cupy.cuda.Device().synchronize()
print(f"host time per call (tiny problem): {(time.perf_counter() - t) / n * 1e6:.1f} us")
cProfile.run("for _ in range(500): fastattn.flash_attention(q, q, q)", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(18)
PY
    ;;
  cli)
    timeout 300 python3 -m fastattn bench --device cuda --compare torch --quick --no-progress 2>&1 | tee "$OUT/cli.log" | tail -30
    timeout 200 python3 -m pytest bench/test_bench_cuda.py -o addopts="" -p no:cacheprovider --benchmark-enable -q \
      -k "N1024-D64-full-float16 or N4096-D128-causal-bfloat16" 2>&1 | tee "$OUT/bench_pytest.log" | tail -25
    ;;
  esac
done
echo "=== done $(date +%T)"
