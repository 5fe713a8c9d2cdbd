#!/usr/bin/env bash
# One GPU session for the CUDA backward pass (logs under $OUT):
#   compile   NVRTC compile of every backward specialization, the Hopper backward's included (16 processes;
#             CuPy's disk cache is kept in .cache/ beside this tree, so a later session that carries it skips
#             the work)
#   smoke     fa_bwd_sm90 (wgmma) against fa_bwd_split_mma on a few shapes (exit 1 if they disagree)
#   tests     pytest tests/test_cuda_backward.py (16 workers)
#   sanitize  compute-sanitizer memcheck over a call of each variant, every kernel family and dQ mode
#   racecheck compute-sanitizer racecheck over causal / GQA / packed calls of the three tensor-core kernels
#   ab        tools/gpu_backward_ab.py (AB_ARGS): each tensor-core backward beside FA2's, same process
#   warm90    the calls of tools/gpu_backward_sm90_calls.py, one process each (16 at a time), and the kernels
#             of the benchmark: compiled into the disk caches before the sanitizers load them
#   sanitize90 / racecheck90   compute-sanitizer memcheck / racecheck over those calls (fa_bwd_sm90)
#   bench     python -m fastattn._bench_backward_cuda (BENCH_ARGS, e.g. --quick)
#   STEPS="compile tests sanitize bench" bash tools/gpu_backward_session.sh
set -u
OUT=${OUT:-/tmp/fastattn-gpu}; mkdir -p "$OUT"
STEPS=${STEPS:-"compile tests sanitize bench"}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=$PWD/.cache/cupy FASTATTN_CACHE_DIR=$PWD/.cache/fastattn
mkdir -p "$CUPY_CACHE_DIR" "$FASTATTN_CACHE_DIR"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"

for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
  compile)
    timeout ${COMPILE_TIMEOUT:-300} python3 - <<'PY' 2>&1 | tee "$OUT/compile.log"
import concurrent.futures as cf, os, time
from fastattn.backends.cuda import _specs
names = _specs.all_bwd_name_expressions() + _specs.all_sm90_bwd_name_expressions()
extra = os.environ.get("COMPILE_FILTER", "")
names = [n for n in names if extra in n]
def one(n):
    from fastattn.backends.cuda import _launch
    t = time.time()
    try:
        _launch.get_kernel(n, 0); return None, time.time() - t
    except Exception as e:
        return f"{n}: {e}", time.time() - t
t0 = time.time()
with cf.ProcessPoolExecutor(16) as pool:
    res = list(pool.map(one, names))
errs = [e for e, _ in res if e]
print(f"NVRTC compiled {len(names) - len(errs)}/{len(names)} backward specializations in {time.time() - t0:.0f}s "
      f"(longest {max(s for _, s in res):.1f}s)")
for e in errs: print("FAILED", e[:3000])
PY
    ;;
  smoke)
    timeout ${SMOKE_TIMEOUT:-200} python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import sys, cupy, fastattn
from fastattn.backends.cuda import _backward
from fastattn._bench_cuda import _to_bf16
import torch
rng = cupy.random.default_rng(0)
worst = 0.0
for dt in ("float16", "bfloat16"):
    for d, hk, n, nk, causal in ((128, 2, 300, 300, True), (64, 2, 1000, 777, "bottom_right"), (128, 1, 4096, 4096, False),
                                 (64, 4, 2048, 2048, True), (128, 2, 77, 1300, False)):
        def arr(*s):
            x = rng.standard_normal(s, dtype=cupy.float32)
            return _to_bf16(x, torch) if dt == "bfloat16" else x.astype(dt)
        q, k, v, do = arr(2, 4, n, d), arr(2, hk, nk, d), arr(2, hk, nk, d), arr(2, 4, n, d)
        out, lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True)
        res = {}
        for sm90 in (False, True):
            _backward.SM90_KERNEL = sm90
            res[sm90] = [g.astype(cupy.float32) for g in fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal)[:3]]
        kinds = {p.kernel for p in _backward._PLANS.values()}
        diffs = [float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b)) for a, b in zip(res[True], res[False])]
        fin = all(bool(cupy.isfinite(a).all()) for a in res[True])
        worst = max(worst, *diffs) if fin else 1.0
        print(dt, d, hk, n, nk, causal, "finite" if fin else "NONFINITE", " ".join(f"{x:.1e}" for x in diffs), kinds, flush=True)
        _backward._PLANS.clear()
print("smoke worst rel diff", worst)
sys.exit(0 if worst < 2e-2 else 1)
PY
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "smoke FAILED: stopping"; exit 1; }
    ;;
  warm90)
    timeout ${WARM_TIMEOUT:-300} python3 - <<'PY' 2>&1 | tee "$OUT/warm90.log"
import concurrent.futures as cf, subprocess, sys, time
from fastattn.backends.cuda import _specs
n = int(subprocess.check_output([sys.executable, "tools/gpu_backward_sm90_calls.py", "--count"]))
names = [_specs.sm90_name(dt, d, cfg, iv) for dt in ("float16", "bfloat16") for d in (64, 128) for iv in (False, True)
         for _, cfg in _specs.SM90_RULES[(d, iv)]]
names += [_specs.bwd_sm90_name(dt, d, iv, False) for dt in ("float16", "bfloat16") for d in (64, 128) for iv in (False, True)]
names += [_specs.bwd_split_name(dt, d, d, _specs.BWD_SPLIT_CONFIGS[d], iv, False, False, True)
          for dt in ("float16", "bfloat16") for d in (64, 128) for iv in (False, True)]
names += [_specs.bwd_mma_name(dt, d, d, _specs.BWD_MMA_CONFIGS[d], iv, False, False, True)
          for dt in ("float16", "bfloat16") for d in (64, 128) for iv in (False, True)]
names += [f(dt) for dt in ("float16", "bfloat16") for f in (_specs.bwd_prep_name, _specs.bwd_convert_name)]
def one(job):
    t = time.time()
    if isinstance(job, int):
        r = subprocess.run([sys.executable, "tools/gpu_backward_sm90_calls.py", str(job)], capture_output=True, text=True)
        return (r.stdout + r.stderr[-2000:] if r.returncode else r.stdout).strip(), time.time() - t
    from fastattn.backends.cuda import _launch
    _launch.get_kernel(job, 0)
    return None, time.time() - t
t0 = time.time()
with cf.ProcessPoolExecutor(16) as pool:
    res = list(pool.map(one, list(range(n)) + names))
for r, s in res:
    if r: print(f"{s:6.1f}s", r)
print(f"warm: {n} calls and {len(names)} kernels in {time.time() - t0:.0f}s")
PY
    ;;
  sanitize90|racecheck90)
    tool=$([ $step = sanitize90 ] && echo memcheck || echo racecheck)
    timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/gpu_backward_sm90_calls.py \
      2>&1 | tee "$OUT/$step.log" | tail -8
    echo "$tool exit: ${PIPESTATUS[0]}"
    ;;
  ab)
    timeout ${AB_TIMEOUT:-300} python3 tools/gpu_backward_ab.py ${AB_ARGS:-} 2>&1 | tee "$OUT/${AB_LOG:-ab}.log"
    ;;
  tests)
    timeout ${TEST_TIMEOUT:-400} python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs -n 16 --maxfail=80 \
      tests/test_cuda_backward.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -60
    ;;
  sanitize)
    cat > /tmp/bsan.py <<'PY'
import numpy as np, cupy, fastattn
rng = np.random.default_rng(0)
def g(*s, dt="float16"): return cupy.asarray(rng.standard_normal(s).astype(dt))
cu = cupy.asarray(np.array([0, 5, 5, 140, 203], np.int32))
for dt in ("float16", "bfloat16", "float32", "float64"):
    q, k, v, do = g(2, 6, 77, 64, dt=dt), g(2, 2, 130, 64, dt=dt), g(2, 2, 130, 64, dt=dt), g(2, 6, 77, 64, dt=dt)
    calls = dict(gqa=dict(causal=True), br=dict(causal="bottom_right", window=(20, 3)),
                 softcap=dict(softcap=5.0, alibi_slopes=cupy.full((6,), 0.1, cupy.float32)),
                 bias=dict(attn_mask=g(1, 6, 77, 130, dt="float32")),
                 bool=dict(attn_mask=cupy.asarray(rng.random((2, 1, 77, 130)) < 0.5)),
                 ragged=dict(seqlens_q=np.array([77, 3]), seqlens_kv=np.array([0, 100]), causal=True),
                 drop=dict(dropout_p=0.2, window=(10, 10), seed=5))
    for name, kw in calls.items():
        out, lse = fastattn.flash_attention(q, k, v, return_lse=True, **kw)
        for det in (False, True):
            grads = fastattn.flash_attention_backward(do, q, k, v, out, lse, deterministic=det,
                                                      return_dbias=name == "bias", **kw)
        print(dt, name, float(abs(grads[0].astype(cupy.float32)).sum()))
    qp, kp, vp, dop = g(203, 4, 128, dt=dt), g(203, 2, 128, dt=dt), g(203, 2, 128, dt=dt), g(203, 4, 128, dt=dt)
    out, lse = fastattn.flash_attention_varlen(qp, kp, vp, cu, cu, causal=True, return_lse=True)
    fastattn.flash_attention_varlen_backward(dop, qp, kp, vp, out, lse, cu, cu, causal=True)
    q, k, v, do = g(1, 2, 65, 192, dt=dt), g(1, 2, 90, 192, dt=dt), g(1, 2, 90, 128, dt=dt), g(1, 2, 65, 128, dt=dt)
    out, lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
    fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=True)
    q, k, v, do = (g(1, s, 4, 256, dt=dt) for s in (70, 90, 90, 70))
    out, lse = fastattn.flash_attention(q, k, v, layout="bshd", window=(30, 30), return_lse=True)
    fastattn.flash_attention_backward(do, q, k, v, out, lse, layout="bshd", window=(30, 30), deterministic=True)
    cupy.cuda.Device().synchronize()
    print(dt, "varlen / dims / bshd ok")
PY
    timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/bsan.py 2>&1 \
      | tee "$OUT/sanitize.log" | tail -15
    echo "sanitizer exit: ${PIPESTATUS[0]}"
    ;;
  racecheck)  # shared-memory hazards of the tensor-core backward kernels (both layouts, both dQ modes)
    cat > /tmp/brace.py <<'PY'
import numpy as np, cupy, fastattn
from fastattn.backends.cuda import _backward
rng = np.random.default_rng(0)
def g(*s): return cupy.asarray(rng.standard_normal(s).astype("float16"))
cu = cupy.asarray(np.array([0, 5, 5, 140, 203], np.int32))
for split, sm90 in ((True, True), (True, False), (False, False)):
    _backward.SPLIT_KERNEL, _backward.SM90_KERNEL = split, sm90
    _backward._PLANS.clear()
    for d in (64, 128):
        q, k, v, do = g(1, 4, 150, d), g(1, 2, 200, d), g(1, 2, 200, d), g(1, 4, 150, d)
        out, lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
        for det in (False, True):
            fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=True, deterministic=det)
    qp, kp, vp, dop = g(203, 4, 128), g(203, 2, 128), g(203, 2, 128), g(203, 4, 128)
    out, lse = fastattn.flash_attention_varlen(qp, kp, vp, cu, cu, causal=True, return_lse=True)
    fastattn.flash_attention_varlen_backward(dop, qp, kp, vp, out, lse, cu, cu, causal=True)
    cupy.cuda.Device().synchronize()
    print({p.kernel + ("" if p.kernel == "wgmma" or split else " (fa_bwd_mma)") for p in _backward._PLANS.values()}, "ok")
PY
    timeout ${RACE_TIMEOUT:-300} compute-sanitizer --tool racecheck --error-exitcode 9 python3 /tmp/brace.py 2>&1 \
      | tee "$OUT/racecheck.log" | tail -8
    echo "racecheck exit: ${PIPESTATUS[0]}"
    ;;
  bench)
    timeout ${BENCH_TIMEOUT:-400} python3 -m fastattn._bench_backward_cuda ${BENCH_ARGS:-} --json "$OUT/bench.json" \
      2>"$OUT/bench.log" | tee "$OUT/bench.txt"
    tail -5 "$OUT/bench.log"
    ;;
  probe)  # each kernel of a backward timed alone
    timeout ${PROBE_TIMEOUT:-200} python3 tools/gpu_backward_probe.py ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.log"
    ;;
  sass)  # registers, spills and the instruction mix of the main kernel (nvcc, sm_90)
    NAME=${SASS_NAME:-"fa_bwd_mma<__half, 128, 128, 8, 1, 64, false, false, false, true>"}
    printf '#include "flash_bwd.cu"\nconst void* const k_ = reinterpret_cast<const void*>(&%s);\n' "$NAME" > /tmp/one.cu
    nvcc -std=c++17 -cubin -arch=sm_90 --resource-usage -I src/fastattn/backends/cuda/kernels -o /tmp/one.cubin /tmp/one.cu 2>&1 \
      | grep -E "registers|spill" | tee "$OUT/sass.log"
    cuobjdump -sass /tmp/one.cubin > "$OUT/one.sass"
    grep -oE "^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+" "$OUT/one.sass" | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c \
      | sort -rn | head -40 | tee -a "$OUT/sass.log"
    ;;
  ncu)  # one launch of the main kernel under Nsight Compute
    cat > /tmp/ncu_one.py <<'PY'
import os, cupy, fastattn
n, d, causal = int(os.environ.get("N", 4096)), int(os.environ.get("D", 128)), os.environ.get("CAUSAL", "0") == "1"
b, h = 16384 // n, 2048 // d
rng = cupy.random.default_rng(0)
q, k, v, do = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(4))
out, lse = fastattn.flash_attention(q, k, v, causal=causal, return_lse=True)
for _ in range(3):
    fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=causal)
cupy.cuda.Device().synchronize()
PY
    timeout ${NCU_TIMEOUT:-200} ncu --kernel-name regex:fa_bwd_mma --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section InstructionStats python3 /tmp/ncu_one.py 2>&1 | tee "$OUT/ncu.log" | tail -120
    ;;
  savecache)
    tar czf "$OUT/cache.tgz" .cache && ls -la "$OUT/cache.tgz"
    ;;
  esac
done
