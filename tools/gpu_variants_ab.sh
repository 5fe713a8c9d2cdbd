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
