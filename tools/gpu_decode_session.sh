#!/bin/bash
# One GPU session for the KV-cache kernels (decode.cu): compile the head-dim 64 / 128 specializations
# (NVRTC, 16 processes), tests/test_cuda_kvcache.py, a forward smoke test, compute-sanitizer memcheck on
# split-KV and paged calls and torch repeat calls, the decode benchmark (logs and JSON under $OUT).
#   STEPS="compile tests fwd sanitize bench" bash tools/gpu_decode_session.sh
# Long chunks (append + forward kernel): "smoke" (one call against the decode kernel), "longsan" (memcheck,
# contiguous and paged), "prefill" (the chunked-prefill rows alone; BENCH_ARGS=--crossover adds more shapes)
# "pagedcompile": NVRTC of every paged Hopper specialization alone.
# "pagedprobe": the forward kernel alone (LONG_ROUTE forced) on long chunks, contiguous beside paged caches of
# block sizes 16 / 32 / 48 / 64 / 256 (shuffled blocks), TFLOP/s; SDPA beside it unless PROBE_SDPA=0.
# PAGED_OPTS (pagedprobe, longsan): extra defines for the paged kernel (experiments: "-DNAME=VALUE ...")
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kvout}; mkdir -p $OUT
STEPS=${STEPS:-"compile tests fwd sanitize bench"}
for step in $STEPS; do
echo "=== $step $(date +%T)"
case $step in
compile|pagedcompile)  # NVRTC, 16 processes: "compile" the decode kernels and the long chunks' forward kernels
  # (head dims 64 / 128, plain and with the paged loads), "pagedcompile" every paged Hopper specialization alone
  STEP=$step timeout ${COMPILE_TIMEOUT:-200} python3 - <<'PY' 2>&1 | tee $OUT/$step.log | tail -8
import concurrent.futures as cf, os, time
from fastattn.backends.cuda import _specs
paged_only = os.environ["STEP"] == "pagedcompile"
if paged_only:
    names = [(n, _specs.SM90_PAGED_OPTIONS) for n in _specs.all_sm90_paged_name_expressions()]
    what, shown = "paged Hopper", ("<false, 128, 128, 2, 128",)
else:
    names = [(n, ()) for n in _specs.all_decode_name_expressions()
             if any(f"{t}, {d}," in n for d in (64, 128) for t in ("__half", "__nv_bfloat16", "float", "double"))
             or "combine" in n or "fa_kv_append" in n]
    sm90 = [n for n in _specs.all_sm90_paged_name_expressions() if any(f", {d}, {d}," in n for d in (64, 128))]
    names = [(n, _specs.SM90_PAGED_OPTIONS) for n in sm90] + [(n, ()) for n in sm90] + names
    what, shown = "decode", ("__half, 128", "<false, 128")
def one(item):
    from fastattn.backends.cuda import _launch
    n, opts = item
    t = time.time()
    try:
        k = _launch.get_kernel(n, 0, opts); return None, time.time() - t, n + " " + " ".join(opts), getattr(k, "num_regs", -1)
    except Exception as e:
        return f"{n} {opts}: {e}", time.time() - t, n, -1
t0 = time.time()
with cf.ProcessPoolExecutor(16) as pool:
    res = list(pool.map(one, names))
errs = [e for e, *_ in res if e]
print(f"NVRTC compiled {len(names) - len(errs)}/{len(names)} {what} specializations in {time.time() - t0:.0f}s")
for e in errs[:3]: print("FAILED", e[:4000])
for _, s, n, r in res:
    if any(x in n for x in shown): print(n, f"{s:.1f}s regs {r}")
PY
  ;;
tests)
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs --maxfail=40 tests/test_cuda_kvcache.py ${PYTEST_ARGS:-} 2>&1 | tee $OUT/tests.log | tail -60
  ;;
fwd)  # the forward kernels still compile and compute after elem.cuh moved out of flash_fwd.cu
  timeout 200 python3 -m pytest -o addopts="" -p no:cacheprovider -q tests/test_cuda_variants.py -k "float16-mma and (gqa or window)" 2>&1 | tail -3
  ;;
sanitize)
  cat > /tmp/kvsan.py <<'PY'
import numpy as np, cupy, fastattn
rng = np.random.default_rng(0)
def g(*s, dt="float16"): return cupy.asarray(rng.standard_normal(s).astype(dt))
lens = cupy.asarray(np.array([0, 17, 1000, 333], np.int32))
for dt in ("float16", "bfloat16", "float32"):
    kc, vc = g(4, 1040, 2, 128, dt=dt), g(4, 1040, 2, 128, dt=dt)
    q, k, v = g(4, 1, 8, 128, dt=dt), g(4, 1, 2, 128, dt=dt), g(4, 1, 2, 128, dt=dt)
    for splits in (1, 7):  # split-KV run and the single-split one
        out = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, num_splits=splits)
    # paged: 16-token blocks, shuffled
    table = cupy.asarray(rng.permutation(4 * 66).reshape(4, 66).astype(np.int32))
    kp, vp = g(4 * 66, 16, 2, 128, dt=dt), g(4 * 66, 16, 2, 128, dt=dt)
    out = fastattn.flash_attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table, num_splits=3)
    qc, kn, vn = g(4, 40, 8, 128, dt=dt), g(4, 40, 2, 128, dt=dt), g(4, 40, 2, 128, dt=dt)
    out = fastattn.flash_attention_with_kvcache(qc, kp, vp, kn, vn, cache_seqlens=lens, block_table=table,
                                                window=(50, 0), softcap=5.0)
    cupy.cuda.Device().synchronize()
    print(dt, "ok", float(abs(out.astype(cupy.float32)).sum()))
# torch repeats (the short path: per-stream scratch and counters, the fused merge), a second stream too
import torch
kt = torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.float16); vt = torch.randn_like(kt)
side = torch.cuda.Stream()
for i in range(4):
    q = torch.randn(2, 1, 32, 128, device="cuda", dtype=torch.float16)
    kn = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.float16)
    with torch.cuda.stream(side if i == 3 else torch.cuda.current_stream()):
        out = fastattn.flash_attention_with_kvcache(q, kt, vt, kn, kn.clone(), cache_seqlens=4000 + i)
torch.cuda.synchronize()
print("torch repeats ok", float(out.float().abs().sum()))
PY
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/kvsan.py 2>&1 | tee $OUT/sanitize.log | tail -8
  echo "sanitizer exit: ${PIPESTATUS[0]}"
  ;;
smoke)  # one long chunk, contiguous and paged, against the decode kernel (num_splits=1)
  timeout 120 python3 - <<'PY' 2>&1 | tee $OUT/smoke.log | tail -12
import numpy as np, cupy, fastattn
from fastattn.backends.cuda import _decode
rng = np.random.default_rng(0)
def g(*s): return cupy.asarray(rng.standard_normal(s).astype(np.float16))
lens = cupy.asarray(np.array([0, 17, 1000], np.int32))
q, k, v = g(3, 300, 32, 128), g(3, 300, 8, 128), g(3, 300, 8, 128)
kc, vc = g(3, 1400, 8, 128), g(3, 1400, 8, 128)
table = cupy.asarray(rng.permutation(3 * 22).reshape(3, 22).astype(np.int32))
kp, vp = g(3 * 22, 64, 8, 128), g(3 * 22, 64, 8, 128)
for name, caches, tb in (("contiguous", (kc, vc), None), ("paged", (kp, vp), table)):
    res = []
    for splits in (None, 1):
        c = [x.copy() for x in caches]
        out, lse = fastattn.flash_attention_with_kvcache(q, *c, k, v, cache_seqlens=lens, block_table=tb,
                                                         num_splits=splits, return_lse=True)
        res.append((out.astype(cupy.float32), lse, c))
    (a, la, ca), (b, lb, cb) = res
    err = float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b))
    plan = [p for p in _decode._PLANS.values() if p.long is not None]
    print(name, "rel diff vs decode kernel", err, "lse max diff", float(cupy.nanmax(cupy.abs(la - lb))),
          "caches equal", all(bool((x == y).all()) for x, y in zip(ca, cb)), [p.long.kernel for p in plan])
PY
  ;;
longsan)  # compute-sanitizer memcheck on a long chunk, contiguous and paged (append + forward)
  cat > /tmp/kvlongsan.py <<'PY'
import os
from fastattn.backends.cuda import _specs as _sp
if os.environ.get("PAGED_OPTS"):  # experiments: extra defines for the paged kernel
    _sp.SM90_PAGED_OPTIONS = ("-DFA_PAGED_KV",) + tuple(os.environ["PAGED_OPTS"].split())
import numpy as np, cupy, fastattn
from fastattn.backends.cuda import _decode
rng = np.random.default_rng(1)
def g(*s, dt="float16"): return cupy.asarray(rng.standard_normal(s).astype(dt))
lens = cupy.asarray(np.array([0, 17, 333], np.int32))
for dt in ("float16", "bfloat16"):
    q, k, v = g(3, 130, 32, 128, dt=dt), g(3, 130, 8, 128, dt=dt), g(3, 130, 8, 128, dt=dt)
    kc, vc = g(3, 470, 8, 128, dt=dt), g(3, 470, 8, 128, dt=dt)
    out = fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, softcap=5.0)
    sums = []
    for bs, itype in ((16, np.int32), (48, np.int64), (64, np.int32), (256, np.int32)):  # paged block sizes
        per = -(-470 // bs)
        table = cupy.asarray(rng.permutation(3 * per + 2)[:3 * per].reshape(3, per).astype(itype))
        kp, vp = g(3 * per + 2, bs, 8, 128, dt=dt), g(3 * per + 2, bs, 8, 128, dt=dt)
        out2 = fastattn.flash_attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table,
                                                     window=(100, 0) if bs == 16 else (-1, -1))
        sums.append(float(abs(out2.astype(cupy.float32)).sum()))
    cupy.cuda.Device().synchronize()
    print(dt, "ok", float(abs(out.astype(cupy.float32)).sum()), sums,
          [p.long.kernel for p in _decode._PLANS.values() if p.long is not None])
PY
  timeout ${SAN_TIMEOUT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/kvlongsan.py 2>&1 | tee $OUT/longsan${PROBE_TAG:-}.log | tail -8
  echo "sanitizer exit: ${PIPESTATUS[0]}"
  ;;
pagedprobe)  # the forward kernel alone: contiguous vs paged by block size (and SDPA), TFLOP/s over attended pairs
  timeout ${PROBE_TIMEOUT:-300} python3 - <<'PY' 2>&1 | tee $OUT/pagedprobe${PROBE_TAG:-}.log | tail -40
import os
from fastattn.backends.cuda import _specs as _sp
if os.environ.get("PAGED_OPTS"):  # experiments: extra defines for the paged kernel
    _sp.SM90_PAGED_OPTIONS = ("-DFA_PAGED_KV",) + tuple(os.environ["PAGED_OPTS"].split())
import os, torch, fastattn
from fastattn import _bench_decode_cuda as bd
from fastattn.backends.cuda import _decode
D, hq, hkv, batch = 128, 32, 8, 1
sdpa = os.environ.get("PROBE_SDPA", "1") == "1"
F = torch.nn.functional
dev = "cuda"
print("cache seq_q | contiguous | paged bs16 bs32 bs48 bs64 bs256 | SDPA   (TFLOP/s; max |paged - contiguous|)")
for cache in (4096, 16384):
    for seq_q in (128, 256, 512):
        g = torch.Generator(device=dev).manual_seed(cache + seq_q)
        r = lambda *s: torch.randn(*s, device=dev, dtype=torch.float16, generator=g)
        kc, vc = r(batch, cache, hkv, D), r(batch, cache, hkv, D)
        q, k, v = r(batch, seq_q, hq, D), r(batch, seq_q, hkv, D), r(batch, seq_q, hkv, D)
        past = cache - seq_q
        pairs = batch * hq * (seq_q * past + seq_q * (seq_q + 1) // 2)
        tf = lambda ms: 4 * D * pairs / (ms * 1e-3) / 1e12
        _decode.LONG_ROUTE = "forward"
        ref = fastattn.flash_attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=past).float()
        res = [tf(bd._graph_time_ms([lambda: fastattn.flash_attention_with_kvcache(q, kc, vc, k, v,
                                                                                    cache_seqlens=past)]))]
        diffs = []
        for bs in (16, 32, 48, 64, 256):
            blocks = -(-cache // bs)
            perm = torch.randperm(batch * blocks + 3, device=dev, generator=g)[:batch * blocks]
            table = perm.to(torch.int32).reshape(batch, blocks)
            pad = blocks * bs - cache
            kpad = torch.cat([kc, kc.new_zeros(batch, pad, hkv, D)], 1) if pad else kc
            vpad = torch.cat([vc, vc.new_zeros(batch, pad, hkv, D)], 1) if pad else vc
            kp = kc.new_zeros(batch * blocks + 3, bs, hkv, D)
            vp = torch.zeros_like(kp)
            kp[perm] = kpad.reshape(batch * blocks, bs, hkv, D)
            vp[perm] = vpad.reshape(batch * blocks, bs, hkv, D)
            out = fastattn.flash_attention_with_kvcache(q, kp.clone(), vp.clone(), k, v, cache_seqlens=past,
                                                        block_table=table).float()
            diffs.append(float((out - ref).abs().max()))
            res.append(tf(bd._graph_time_ms([lambda: fastattn.flash_attention_with_kvcache(
                q, kp, vp, k, v, cache_seqlens=past, block_table=table)])))
        _decode.LONG_ROUTE = "auto"
        if sdpa:
            i = torch.arange(seq_q, device=dev)[:, None]
            j = torch.arange(cache, device=dev)[None, :]
            mask = j <= i + past
            qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
            res.append(tf(bd._graph_time_ms([lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                                     enable_gqa=True)])))
        print(f"{cache:5d} {seq_q:4d} | " + " ".join(f"{x:6.1f}" for x in res) + f"   maxdiff {max(diffs):.2e}",
              flush=True)
        del kc, vc, kp, vp
        torch.cuda.empty_cache()
PY
  ;;
prefill)
  timeout ${BENCH_TIMEOUT:-400} python3 -m fastattn._bench_decode_cuda --prefill ${BENCH_ARGS:-} --json $OUT/prefill_bench.json 2>&1 | tee $OUT/prefill.log | tail -50
  ;;
bench)
  timeout ${BENCH_TIMEOUT:-400} python3 -m fastattn._bench_decode_cuda ${BENCH_ARGS:-} --json $OUT/decode_bench.json 2>&1 | tee $OUT/bench.log | tail -70
  ;;
esac
done
echo "=== done $(date +%T)"
