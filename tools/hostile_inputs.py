#!/usr/bin/env python3
"""Hostile inputs for the CPU backend, each in its own child interpreter.

    python tools/hostile_inputs.py [--list] [--only NAME ...] [--timeout SECONDS]

Every case is a call that once crashed the interpreter, overflowed a heap buffer or was found by
a fuzzer: K/V as zero-stride views whose packed size overflows 64 bits, thousands of threads on a
machine that cannot start them, scales and magnitudes at the edge of float32, NaN behind the
causal mask, masked and duck arrays, bad ``memory_report`` timeouts.

What is checked here is memory safety only: the child must finish on its own (return or raise a
Python exception) within the timeout, with no signal and no sanitizer exit.  Whether the answer is
right is the test suite's business; the outcome of each call (returned: finite or not; raised:
the exception) is printed for the reader.  Run it under tools/sanitize.sh to have
AddressSanitizer and UBSan watch each call; plain, it catches crashes and hangs.

Exit status: 0 if every case finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time

PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import fastattn

    def asan_loaded():
        try:
            with open("/proc/self/maps") as f:
                return "libasan" in f.read()
        except OSError:
            return False

    def describe(value):
        if isinstance(value, tuple):
            return [describe(v) for v in value]
        a = np.asarray(value)
        if a.dtype.kind in "fc" or a.dtype.name == "bfloat16":
            f = a.astype(np.float64)
            return {"shape": list(a.shape), "dtype": str(a.dtype), "nan": int(np.isnan(f).sum()),
                    "inf": int(np.isinf(f).sum())}
        return {"type": type(value).__name__}

    def report(**facts):
        print("OUTCOME " + json.dumps(facts), flush=True)

    def attempt(fn):
        try:
            value = fn()
        except Exception as exc:  # a clear Python exception is a safe outcome
            report(outcome="raised", error=type(exc).__name__, message=str(exc)[:300])
        else:
            report(outcome="returned", result=describe(value))
    """
)

F16_ZERO_STRIDE = """
k = np.broadcast_to(np.zeros((1, 8), np.float16), (2**58, 8))
q = np.zeros((1, 8), np.float16)
attempt(lambda: fastattn.flash_attention(q, k, k, backend="cpu", num_threads={threads}))
"""

TWO_HEADS_ZERO_STRIDE = """
k = np.broadcast_to(np.zeros((1, 1, 8), np.float16), (2, 2**56, 8))
q = np.zeros((2, 1, 8), np.float16)
attempt(lambda: fastattn.flash_attention(q, k, k, backend="cpu", num_threads={threads}))
"""

# the per-thread scratch grows with the requested tile sizes: huge tiles against a zero-stride K/V
HUGE_TILES_ZERO_STRIDE = """
k = np.broadcast_to(np.zeros((1, 8), np.float32), (2**40, 8))
q = np.zeros((3, 8), np.float32)
attempt(lambda: fastattn.flash_attention(q, k, k, backend="cpu", num_threads=1,
                                         block_size_q={bq}, block_size_kv={bkv}))
"""

MANY_THREADS = """
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2000, 16, 8)).astype(np.float32)   # 2000 work items (heads x query tiles)
attempt(lambda: fastattn.flash_attention(q, q, q, backend="cpu", num_threads=2000, block_size_q=16))
"""

# the same with the address space capped so that 2000 thread stacks cannot be had; AddressSanitizer
# reserves terabytes of shadow memory, so under it this case cannot run
MANY_THREADS_NO_ROOM = """
import resource
if asan_loaded():
    report(outcome="skipped", reason="an address-space limit cannot be combined with AddressSanitizer")
    sys.exit(0)
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2000, 16, 8)).astype(np.float32)
fastattn.flash_attention(q[:, :4], q[:, :4], q[:, :4], backend="cpu")   # extension and thread pool up
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
attempt(lambda: fastattn.flash_attention(q, q, q, backend="cpu", num_threads=2000, block_size_q=16))
"""

F32_EDGE = """
q = np.full((1, 1, 4, 16), {q}, np.float32)
k = np.full((1, 1, 5, 16), {k}, np.float32)
v = np.random.default_rng(1).standard_normal((1, 1, 5, 16)).astype(np.float32)
{extra}
attempt(lambda: fastattn.flash_attention(q, k, v, backend="cpu", scale={scale}, return_lse=True))
"""

F64_TINY_WEIGHT_INF_VALUE = """
# row max at key 0; key 1's weight is exp(-800) (below 2**-126, far above float64's least normal)
q = np.ones((1, 1, 1, 1), np.float64)
k = np.array([0.0, -800.0], np.float64).reshape(1, 1, 2, 1)
v = np.array([1.0, np.inf], np.float64).reshape(1, 1, 2, 1)
attempt(lambda: fastattn.flash_attention(q, k, v, backend="cpu", scale=1.0))
"""

MASKED_NAN = """
rng = np.random.default_rng(2)
q, k, v = (rng.standard_normal((1, 1, 20, 8)).astype(np.float32) for _ in range(3))
v[0, 0, 12] = np.nan   # hidden by the causal mask from rows 0..11
def both():
    outs = [fastattn.flash_attention(q, k, v, causal=True, backend="cpu", block_size_q=bq, block_size_kv=4)
            for bq in (8, 10)]
    nan_rows = [sorted(set(np.nonzero(np.isnan(o[0, 0]))[0].tolist())) for o in outs]
    return outs[0] if nan_rows[0] == nan_rows[1] else (outs[0], outs[1])
attempt(both)
"""

MASKED_ARRAY = """
q = np.ma.masked_array(np.ones((4, 8), np.float32), mask=np.zeros((4, 8), bool))
q.mask[0, 0] = True
attempt(lambda: fastattn.flash_attention(q, q, q, backend="cpu"))
"""

DUCK_ARRAY = """
class Duck:
    def __init__(self, a):
        self.a = a
    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)
d = Duck(np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32))
attempt(lambda: fastattn.flash_attention(d, d, d, backend="cpu"))
"""

REPORT_TIMEOUT = """
attempt(lambda: fastattn.memory_report(seq_lens=(64,), num_heads=1, head_dim=8, timeout={timeout!r}))
"""

# KV cache: a zero-stride cache of 2**40 tokens (read in place, never packed), lengths near int32's end,
# block ids beyond the pool or negative where no token needs them, reversed and odd strides
KV_ZERO_STRIDE = """
kc = np.broadcast_to(np.zeros((1, 1, 1, 8), np.float32), (1, 2**40, 2, 8))
q = np.ones((1, 1, 4, 8), np.float32)
attempt(lambda: fastattn.flash_attention_with_kvcache(q, kc, kc, cache_seqlens={lens}, num_splits={splits},
                                                      backend="cpu"))
"""

KV_TABLE = """
kp = np.ones((4, 16, 1, 8), np.float32)
q = np.ones((2, 1, 2, 8), np.float32)
table = np.array([[0, 1, {bad}, {bad}], [3, {bad}, {bad}, 2]], np.int32)
attempt(lambda: fastattn.flash_attention_with_kvcache(q, kp, kp, cache_seqlens=np.array({lens}, np.int32),
                                                      block_table=table, backend="cpu"))
"""

KV_REVERSED = """
rng = np.random.default_rng(4)
base = rng.standard_normal((2, 300, 3, 16)).astype(np.float32)
kc = base[::-1, ::-2, ::-1, ::-1]   # negative strides on every axis
q = rng.standard_normal((2, 3, 6, 16)).astype(np.float32)[:, :, :, ::-1]
attempt(lambda: fastattn.flash_attention_with_kvcache(q, kc, kc, cache_seqlens=np.array([150, 1], np.int64),
                                                      num_splits=7, backend="cpu"))
"""

# the backward: the same zero-stride K/V (its gradients cannot be allocated: a clear MemoryError), huge tiles,
# thousands of threads, and an lse / dout that no forward produced (+-inf, NaN, huge)
BWD_ZERO_STRIDE = """
k = np.broadcast_to(np.zeros((1, 1, 1, 8), np.float32), (1, 2, {keys}, 8))
q = np.zeros((1, 2, 3, 8), np.float32)
out, lse = np.zeros_like(q), np.zeros((1, 2, 3), np.float32)
attempt(lambda: fastattn.flash_attention_backward(q, q, k, k, out, lse, backend="cpu", num_threads={threads},
                                                  block_size_q={bq}, block_size_kv={bkv}))
"""

BWD_MANY_THREADS = """
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 2000, 16, 8)).astype(np.float32)
out, lse = fastattn.flash_attention(q, q, q, return_lse=True, backend="cpu")
attempt(lambda: fastattn.flash_attention_backward(q, q, q, q, out, lse, backend="cpu", num_threads=2000,
                                                  block_size_q=16))
"""

BWD_GARBAGE_LSE = """
rng = np.random.default_rng(5)
q, k, v, do = (rng.standard_normal((1, 2, 33, 16)).astype(np.float32) for _ in range(4))
out = rng.standard_normal((1, 2, 33, 16)).astype(np.float32) * 1e30
lse = np.array([{value}] * 66, np.float32).reshape(1, 2, 33)
do[0, 0, 5] = np.nan
attempt(lambda: fastattn.flash_attention_backward(do, q, k, v, out, lse, causal=True, softcap=2.0, backend="cpu"))
"""

CASES: dict[str, str] = {
    "kvcache: zero-stride cache of 2**40 tokens, 100000 cached": KV_ZERO_STRIDE.format(lens=100000, splits=None),
    "kvcache: zero-stride cache, 2**40 cached, 64 splits": KV_ZERO_STRIDE.format(lens=2**40, splits=64),
    "kvcache: 2**31 cached (past int32)": KV_ZERO_STRIDE.format(lens=2**31, splits=1),
    "kvcache: cache_seqlens past the cache": KV_ZERO_STRIDE.format(lens=2**40 + 1, splits=1),
    "kvcache: block ids 2**31 - 1 where no token needs them": KV_TABLE.format(bad=2**31 - 1, lens=[20, 16]),
    "kvcache: block id -1 where a token needs it": KV_TABLE.format(bad=-1, lens=[40, 16]),
    "kvcache: negative strides on q and every cache axis": KV_REVERSED,
    "zero-stride K/V 2**58 keys, fp16, 1 thread": F16_ZERO_STRIDE.format(threads=1),
    "zero-stride K/V 2**58 keys, fp16, default threads": F16_ZERO_STRIDE.format(threads=None),
    "zero-stride K/V 2 heads x 2**56 keys, 1 thread": TWO_HEADS_ZERO_STRIDE.format(threads=1),
    "zero-stride K/V 2 heads x 2**56 keys, 2 threads": TWO_HEADS_ZERO_STRIDE.format(threads=2),
    "zero-stride K/V 2**40 keys, block_size 2**62 x 2**62": HUGE_TILES_ZERO_STRIDE.format(bq="2**62", bkv="2**62"),
    "zero-stride K/V 2**40 keys, block_size_kv 2**40": HUGE_TILES_ZERO_STRIDE.format(bq="None", bkv="2**40"),
    "num_threads=2000 over 2000 work items": MANY_THREADS,
    "num_threads=2000 with no room for the threads": MANY_THREADS_NO_ROOM,
    "fp32 scale=1e39": F32_EDGE.format(q=1.0, k=1.0, scale=1e39, extra=""),
    "fp32 q=3e38 against k=1e-38": F32_EDGE.format(q=3e38, k=1e-38, scale=1.0, extra=""),
    "fp32 q*scale underflows against an infinite key": F32_EDGE.format(q=1e-30, k=1.0, scale=1e-30,
                                                                       extra="k[0, 0, 2, :] = np.inf"),
    "fp64 weight below 2**-126 with an infinite value": F64_TINY_WEIGHT_INF_VALUE,
    "NaN in v behind the causal mask, two block_size_q": MASKED_NAN,
    "numpy.ma masked array": MASKED_ARRAY,
    "backward: zero-stride K/V 2**40 keys": BWD_ZERO_STRIDE.format(keys="2**40", threads=1, bq=None, bkv=None),
    "backward: zero-stride K/V 2**20 keys, block_size 2**62 x 2**62, 2 threads":
        BWD_ZERO_STRIDE.format(keys="2**20", threads=2, bq="2**62", bkv="2**62"),
    "backward: num_threads=2000 over 2000 heads": BWD_MANY_THREADS,
    "backward: lse +inf, NaN dout row, huge out": BWD_GARBAGE_LSE.format(value="np.inf"),
    "backward: lse NaN": BWD_GARBAGE_LSE.format(value="np.nan"),
    "backward: lse -3e38": BWD_GARBAGE_LSE.format(value="-3e38"),
    "2-D duck array with __array__": DUCK_ARRAY,
    "memory_report(timeout='1')": REPORT_TIMEOUT.format(timeout="1"),
    "memory_report(timeout=-1)": REPORT_TIMEOUT.format(timeout=-1),
}


#: exit statuses tools/sanitize.sh gives the sanitizers' halts
EXIT_MEANING = {86: ": AddressSanitizer report", 87: ": UndefinedBehaviorSanitizer report"}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "AddressSanitizer:DEADLYSIGNAL")


def run_case(name: str, body: str, timeout: float) -> tuple[bool, str]:
    code = PRELUDE + textwrap.dedent(body)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"HANG: no result after {timeout:.0f} s"
    took = time.perf_counter() - start
    outcome = next((line[len("OUTCOME "):] for line in proc.stdout.splitlines() if line.startswith("OUTCOME ")),
                   None)
    if proc.returncode != 0 or outcome is None:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        how += EXIT_MEANING.get(proc.returncode, "")
        lines = proc.stderr.strip().splitlines()
        first = next((i for i, line in enumerate(lines) if any(m in line for m in SANITIZER_MARKS)), None)
        tail = "\n".join(lines[first:first + 14] if first is not None else lines[-25:])
        return False, f"CRASH ({how}, {took:.1f} s)\n{textwrap.indent(tail, '    ')}"
    facts = json.loads(outcome)
    return True, f"ok ({took:.1f} s): " + ", ".join(f"{key}={value}" for key, value in facts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--only", action="append", default=[], help="run the cases whose name contains this text")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a case may take (default 300)")
    args = parser.parse_args(argv)
    names = [n for n in CASES if not args.only or any(s in n for s in args.only)]
    if args.list:
        print("\n".join(names))
        return 0
    failed = []
    for name in names:
        ok, text = run_case(name, CASES[name], args.timeout)
        print(f"{name}: {text}", flush=True)
        if not ok:
            failed.append(name)
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
