#!/usr/bin/env bash
# The variant benchmark of two checkouts in one GPU session, before / after a change (logs and JSON
# under $OUT): compiles the Hopper kernels the benchmark launches (float16, head_dim 128; NVRTC,
# 16 processes) in each tree, then runs `python -m fastattn._bench_cuda --variant V --json` for each
# variant, the other tree ("before") first.
#   VARIANTS="window softcap alibi mask varlen gqa" bash tools/gpu_variants_ab.sh ../other-checkout
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

# MASK_PROBE="0 1 2 3": where the attn_mask kernel's time goes (this tree, float16, D = 128, full
# attention): the kernel with its shared-memory mask tiles compiled with each -DFA_PROBE_MASK value
# (bit 0: no mask copies, bit 1: no mask in the hook; results wrong, timings only) beside the plain
# kernel at its own tiles and at the mask kernel's tiles (2 x 64), per attended pair
[ -n "${MASK_PROBE:-}" ] && PYTHONPATH=$NEW/src timeout 400 python3 - $MASK_PROBE <<'PY' 2>&1 | tee "$OUT/mask_probe.log"
import concurrent.futures as cf, sys, time
import numpy as np
probes = [int(x) for x in sys.argv[1:]]
from fastattn.backends.cuda import _specs
cfg = _specs.SM90_TILES_CONFIGS[128]
name = _specs.sm90_name("float16", 128, cfg, True, 128, True, mask_tiles=True)
def one(a):
    from fastattn.backends.cuda import _launch
    _launch.get_kernel(a[0], 0, a[1])
t0 = time.time()
with cf.ProcessPoolExecutor(8) as pool:
    list(pool.map(one, [(name, (f"-DFA_PROBE_MASK={p}",)) for p in probes]))
print(f"compiled {len(probes)} kernels in {time.time() - t0:.0f}s", flush=True)
import cupy
from fastattn._validate import make_spec
from fastattn._bench_cuda import time_ms
from fastattn.backends.cuda import _launch
def spec(q, k, v, **kw):
    base = dict(causal=False, scale=None, dropout_p=0.0, seed=None, block_q=None, block_kv=None, num_threads=None)
    base.update(kw)
    return make_spec(q, k, v, **base)
rng = cupy.random.default_rng(0)
d = 128
for n in (1024, 4096):
    b, h = max(1, 16384 // n // 4), 16
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    out, lse = cupy.empty_like(q), cupy.empty((b, h, n), cupy.float32)
    run = lambda sp, config=None, extra=(): _launch.launch(q, k, v, out, lse, sp, "float16", config=config, extra_options=extra)
    tf = lambda ms: 4 * d * b * h * n * n / ms / 1e9
    pl = spec(q, k, v)
    t_plain = time_ms(lambda: run(pl)); t_plain64 = time_ms(lambda: run(pl, cfg))
    print(f"N={n} B={b} H={h}: plain {tf(t_plain):.0f} TFLOP/s; plain at {cfg.warpgroups}x{cfg.block_kv} {tf(t_plain64):.0f} ({t_plain / t_plain64:.3f})", flush=True)
    for label, m in (("bool", rng.random((b, h, n, n)) < 0.9),
                     ("bias f32", rng.standard_normal((b, h, n, n), dtype=cupy.float32)),
                     ("bias f16", rng.standard_normal((b, h, n, n), dtype=cupy.float32).astype(cupy.float16))):
        sp = spec(q, k, v, attn_mask=m)
        cells = []
        for rep in range(2):
            for p in probes:
                t = time_ms(lambda: run(sp, None, (f"-DFA_PROBE_MASK={p}",)))
                cells.append(f"P{p} {tf(t):4.0f} {t_plain / t:.3f}")
        print(f"  {label:9} kernel / plain: " + "  ".join(cells), flush=True)
        del m, sp
        cupy.get_default_memory_pool().free_all_blocks()
PY
