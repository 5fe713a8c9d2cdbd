#!/usr/bin/env bash
# The CPU extension under AddressSanitizer + UndefinedBehaviorSanitizer: build it (setup.py's
# FASTATTN_SANITIZE=1 switch) into its own folder, then run the test suite and the hostile
# inputs of tools/hostile_inputs.py against that build.  Any sanitizer report fails the run.
#
#   bash tools/sanitize.sh                  # build + tests + hostile inputs
#   bash tools/sanitize.sh -k "causal"      # extra arguments go to pytest
#   SANITIZE_STEPS="hostile" bash tools/sanitize.sh     # reuse the last build, one step only
#
# Run it in a virtual environment that has the test extra (pip install ".[test]").  The sanitized
# package goes to build/sanitize/site (or $FASTATTN_SANITIZE_DIR), reports to build/sanitize/logs.
set -uo pipefail
cd "$(dirname "$0")/.."

ROOT=${FASTATTN_SANITIZE_DIR:-$PWD/build/sanitize}
SITE=$ROOT/site
LOGS=$ROOT/logs
STEPS=${SANITIZE_STEPS:-"build tests hostile"}
PY=${PYTHON:-python}
CXX=${CXX:-g++}

if [[ " $STEPS " == *" build "* ]]; then
  echo "== sanitizer build (FASTATTN_SANITIZE=1) into $SITE"
  rm -rf "$SITE"
  start=$SECONDS
  # --no-cache-dir: never a cached wheel of a normal build; setup.py builds under build/sanitize/
  if ! FASTATTN_SANITIZE=1 "$PY" -m pip install -q --no-deps --no-compile --no-cache-dir --target "$SITE" . ; then
    echo "sanitizer build failed"; exit 1
  fi
  echo "built in $((SECONDS - start)) s"
fi

ls "$SITE"/fastattn/backends/cpu/_flash_cpu*.so >/dev/null 2>&1 || { echo "no sanitized build in $SITE"; exit 1; }
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBUBSAN=$("$CXX" -print-file-name=libubsan.so)
[[ -f $LIBASAN && -f $LIBUBSAN ]] || { echo "libasan/libubsan not found by $CXX"; exit 1; }

rm -rf "$LOGS"; mkdir -p "$LOGS"
# The interpreter is not instrumented, so the runtime is preloaded (ASan must come first).
# detect_leaks=0: CPython keeps its objects alive at exit by design.
# allocator_may_return_null=1: an impossible allocation returns NULL as glibc's malloc does (the
# code must then raise MemoryError) instead of ending in an allocation-size report.
# log_path: every ASan report, also from child interpreters whose stderr a test captures, lands
# in a file; the run fails if any is there.  UBSan beside ASan (GCC) ignores log_path and writes
# to stderr: pytest runs with --capture=sys so that text reaches the terminal, and a process that
# UBSan halts exits with status 87 (ASan: 86), which fails the test or the run.
run_sanitized() {
  env LD_PRELOAD="$LIBASAN $LIBUBSAN" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:allocator_may_return_null=1:log_path=$LOGS/asan${ASAN_OPTIONS_EXTRA:+:$ASAN_OPTIONS_EXTRA}" \
    UBSAN_OPTIONS="halt_on_error=1:exitcode=87:print_stacktrace=1${UBSAN_OPTIONS_EXTRA:+:$UBSAN_OPTIONS_EXTRA}" \
    FASTATTN_SANITIZER=1 FASTATTN_REQUIRE_CPU=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$@"
}

status=0
# the sanitized build is the one imported, and ASan is loaded
if ! run_sanitized "$PY" - "$SITE" <<'PY'
import os, sys
import fastattn
from fastattn.backends.cpu import _flash_cpu
assert os.path.realpath(_flash_cpu.__file__).startswith(os.path.realpath(sys.argv[1])), _flash_cpu.__file__
assert "libasan" in open("/proc/self/maps").read(), "libasan is not loaded"
with open(_flash_cpu.__file__, "rb") as f:
    module = f.read()
assert b"__asan_init" in module and b"__ubsan_handle_" in module, "the module is not instrumented"
print("sanitized build:", _flash_cpu.__file__, "| simd:", fastattn.info()["simd"])
PY
then
  echo "the sanitized build does not import"; status=1
fi

if [[ " $STEPS " == *" tests "* ]]; then
  echo "== test suite under ASan + UBSan"
  start=$SECONDS
  run_sanitized "$PY" -m pytest tests -p no:cacheprovider -q --capture=sys "$@" || status=1
  echo "tests took $((SECONDS - start)) s"
fi

if [[ " $STEPS " == *" hostile "* ]]; then
  echo "== hostile inputs under ASan + UBSan"
  run_sanitized "$PY" tools/hostile_inputs.py || status=1
fi

# a report is an ASan ERROR or a UBSan runtime error; allocator_may_return_null=1 also leaves a
# WARNING when it refuses an impossible allocation, which is the expected path to MemoryError
reports=$(grep -l -E "ERROR: AddressSanitizer|runtime error|SUMMARY: (Address|UndefinedBehavior)Sanitizer" -r "$LOGS" | sort)
notes=$(grep -L -E "ERROR: AddressSanitizer|runtime error|SUMMARY: (Address|UndefinedBehavior)Sanitizer" -r "$LOGS" | sort)
for f in $notes; do echo "note from the sanitizer runtime ($f): $(head -c 300 "$f")"; done
if [[ -n $reports ]]; then
  echo "== sanitizer reports ($(echo "$reports" | wc -l) files in $LOGS)"
  for f in $reports; do echo "--- $f"; grep -v -E "^ +0x[0-9a-f]+:|^  [A-Z][a-zA-Z ]+: +[0-9a-f ]+$" "$f" | head -c 12000; done
  status=1
else
  echo "== no sanitizer report"
fi
exit $status
