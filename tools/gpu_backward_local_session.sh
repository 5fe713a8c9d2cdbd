#!/usr/bin/env bash
# One GPU session for the backward's local rows (issue 12; logs under $OUT):
#   tests   pytest tests/test_cuda_backward.py (PYTEST_K, default the float32 / float64 and few-key tests) while
#           tools/fuzz_attention.py --device cuda runs its backward cases of seeds FUZZ_SEEDS (one process each)
#   fuzzab  the fuzz tool's backward cases of FUZZ_SEEDS on this tree and on BASE_SRC at once, each timed
#   pytest  pytest tests/test_cuda_backward.py -k PYTEST_K
#   memcheck / racecheck   compute-sanitizer over tools/gpu_backward_local.py calls
#   time    tools/gpu_backward_local.py time, alternating this tree and BASE_SRC (a copy of the base's src/)
#   kernels the same, each kernel's own time (CUDA events)
#   STEPS="tests memcheck" BASE_SRC=../base/src bash tools/gpu_backward_local_session.sh
set -u
OUT=${OUT:-/tmp/fastattn-gpu}; mkdir -p "$OUT"
STEPS=${STEPS:-"tests memcheck"}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=/tmp/fa-cache/cupy FASTATTN_CACHE_DIR=/tmp/fa-cache/fastattn
mkdir -p "$CUPY_CACHE_DIR" "$FASTATTN_CACHE_DIR"
nvidia-smi -L | tee "$OUT/device.txt"
for step in $STEPS; do
  echo "=== $step $(date +%T)"
  case $step in
  tests)
    for s in ${FUZZ_SEEDS:-1 2 3 4 5 6}; do
      (echo "=== seed $s"; timeout ${FUZZ_TIMEOUT:-420} python3 tools/fuzz_attention.py --device cuda --seed $s \
        --forward 0 --kvcache 0 --backward ${FUZZ_CASES:-20}) > "/tmp/fuzz_$s.log" 2>&1 &
    done
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest -o addopts="" -p no:cacheprovider -q -rs -n 10 --maxfail=80 \
      tests/test_cuda_backward.py -k "${PYTEST_K:-float32 or float64 or one_or_two or shards}" 2>&1 \
      | tee "$OUT/tests.log" | tail -40
    wait
    cat /tmp/fuzz_*.log > "$OUT/fuzz.log"; grep -E "FAIL|failed|Traceback|Error" "$OUT/fuzz.log" | head -40
    ;;
  fuzzab)  # the backward cases of FUZZ_SEEDS on this tree and on BASE_SRC side by side, each process timed
    for s in ${FUZZ_SEEDS:-3}; do
      for tree in new base; do
        src=$([ $tree = base ] && echo "$BASE_SRC" || echo "$PWD/src")
        (export PYTHONPATH=$src; start=$(date +%s); timeout ${FUZZ_TIMEOUT:-300} python3 tools/fuzz_attention.py \
          --device cuda --seed $s --forward 0 --kvcache 0 --backward ${FUZZ_CASES:-20}; \
          echo "$tree seed $s: exit $? after $(( $(date +%s) - start )) s") > "/tmp/fuzzab_${tree}_$s.log" 2>&1 &
      done
    done
    wait
    cat /tmp/fuzzab_*.log | grep -v -e UserWarning -e run_backward | tee "$OUT/fuzzab.log"
    ;;
  pytest)
    timeout ${TEST_TIMEOUT:-300} python3 -m pytest -o addopts="" -p no:cacheprovider -q -rsxX -n ${PYTEST_N:-4} \
      tests/test_cuda_backward.py -k "${PYTEST_K}" 2>&1 | tee "$OUT/pytest.log" | tail -15
    ;;
  memcheck|racecheck)
    timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $step --error-exitcode 9 python3 tools/gpu_backward_local.py \
      calls $([ $step = racecheck ] && echo --quick) 2>&1 | tee "$OUT/$step.log" | tail -6
    echo "$step exit: ${PIPESTATUS[0]}"
    ;;
  time|kernels)
    python3 tools/gpu_backward_local.py $step --label new > /dev/null 2>&1  # compile both trees' kernels first
    PYTHONPATH=$BASE_SRC python3 tools/gpu_backward_local.py $step --label base > /dev/null 2>&1
    for round in 1 2; do
      PYTHONPATH=$BASE_SRC python3 tools/gpu_backward_local.py $step --label base
      python3 tools/gpu_backward_local.py $step --label new
    done 2>&1 | tee "$OUT/$step.log"
    ;;
  esac
done
