"""GPU benchmark of attention against a KV cache: fastattn beside PyTorch SDPA, in one process.

    run_decode_bench(quick) -> rows;  format_decode_table(rows) -> str

- decode (seq_q = 1, float16, head_dim 128): K+V bytes read per second (batch x cache tokens x heads_kv x
  128 x 2 bytes x 2) for fastattn with a contiguous cache, with a paged one (block_size 64, blocks
  shuffled), PyTorch SDPA on the contiguous cache (the faster of ``enable_gqa`` and K/V expanded to
  heads_q beforehand; with seq_q = 1 the bottom-right causal mask hides nothing), and a device-to-device
  copy of the same run (bytes read + written).  fastattn appends one token per call (cache_seqlens =
  cache - 1, an int).  Grid: batch {1, 8, 64} x heads_q/heads_kv {32/32, 32/8} x cache {4k .. 128k}
  (what fits in device memory).
- chunked prefill (seq_q 16 .. 512 appended to a 4k / 16k cache): TFLOP/s over the attended pairs
  (4 x head_dim flops each) beside SDPA given the equivalent explicit bottom-right boolean mask; fastattn as
  routed (num_splits=None: ``_decode.long_route`` picks the decode kernel or the forward kernel), each
  kernel alone (``_decode.LONG_ROUTE`` forced), and a paged cache (64-token blocks, shuffled) as routed.
- host overhead: time per call of a loop of 1000 decode calls on a tiny cache (fastattn with an int
  length, with a device length (the value check reads it to the host), SDPA), the median of 5 rounds
  taken in turns: wall (to the synchronization after the loop) and host (the loop alone: where the GPU
  work per call is longer than the host's, the wall time is the GPU's), and per replay of a captured CUDA
  graph of one decode step.

Every GPU time is the median over replays of a CUDA graph that holds one call per input set, with
enough input sets (up to 16) that they do not fit in L2 together: device time, no host overhead.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

D = 128
CACHES = (4096, 16384, 32768, 65536, 131072)
QUICK_CACHES = (4096, 32768, 131072)
BATCHES = (1, 8, 64)
HEADS = ((32, 32), (32, 8))
PREFILL_SEQ_Q = (16, 32, 64, 128, 256, 512)
PREFILL_CACHES = (4096, 16384)
#: the extra shapes and caches of ``--crossover`` (where the forward kernel overtakes the decode kernel):
#: (batch, hq, hkv), and an 8k cache for every shape
CROSSOVER_SHAPES = ((1, 32, 32), (4, 32, 8))
CROSSOVER_CACHES = (8192,)
PAGE = 64


def _torch():
    import torch

    return torch


def _graph_time_ms(fns: list[Callable[[], Any]], reps: int = 20) -> float:
    """Median device milliseconds of one call: a CUDA graph holding every fn once, replayed."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    del graph
    return statistics.median(times)


def _sets(nbytes: int) -> int:
    """Input sets so that together they are 4x the L2 cache (at most 16)."""
    torch = _torch()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(4 * l2 / max(nbytes, 1))))


def _free_bytes() -> int:
    return int(_torch().cuda.mem_get_info()[0])


def copy_bandwidth() -> float:
    """TB/s of a 2 GiB device-to-device copy (bytes read + written)."""
    torch = _torch()
    n = 2**30
    src = torch.empty(n, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _graph_time_ms([lambda: dst.copy_(src)], reps=20)
    return 2 * 2 * n / (ms * 1e-3) / 1e12


def _decode_row(batch: int, hq: int, hkv: int, cache: int) -> dict | None:
    import fastattn

    torch = _torch()
    F = torch.nn.functional
    kv_bytes = batch * cache * hkv * D * 2 * 2
    if 3 * kv_bytes + (4 << 30) > _free_bytes():  # contiguous + paged + SDPA's expanded copy
        return None
    n_sets = _sets(kv_bytes)
    if n_sets * kv_bytes * 2 + (4 << 30) > _free_bytes():
        n_sets = 1
    dev = "cuda"
    row = dict(kind="decode", batch=batch, heads_q=hq, heads_kv=hkv, cache=cache, head_dim=D, dtype="float16",
               kv_bytes=kv_bytes, sets=n_sets)
    sets = []
    for _ in range(n_sets):
        kc = torch.randn(batch, cache, hkv, D, device=dev, dtype=torch.float16)
        vc = torch.randn(batch, cache, hkv, D, device=dev, dtype=torch.float16)
        q = torch.randn(batch, 1, hq, D, device=dev, dtype=torch.float16)
        k = torch.randn(batch, 1, hkv, D, device=dev, dtype=torch.float16)
        v = torch.randn(batch, 1, hkv, D, device=dev, dtype=torch.float16)
        sets.append((q, kc, vc, k, v))

    def ours(q, kc, vc, k, v, **kw):
        return lambda: fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=cache - 1, **kw)

    row["fastattn_ms"] = _graph_time_ms([ours(*s) for s in sets])
    # SDPA on the same caches, (batch, heads, seq, d) views
    best = None
    for variant in ("gqa", "expand"):
        if hkv == hq and variant == "expand":
            continue
        try:
            fns = []
            for q, kc, vc, _, _ in sets:
                qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                if variant == "expand" and hkv != hq:
                    kt = kt.repeat_interleave(hq // hkv, 1)
                    vt = vt.repeat_interleave(hq // hkv, 1)
                    fns.append(lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt))
                else:
                    fns.append(lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(
                        qt, kt, vt, enable_gqa=hkv != hq))
                if variant == "expand" and 2 * kv_bytes * hq // hkv + (4 << 30) > _free_bytes():
                    raise MemoryError
            ms = _graph_time_ms(fns)
            del fns
        except Exception:  # noqa: BLE001 - a variant this torch cannot run (or that does not fit): skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, variant)
    if best is not None:
        row["sdpa_ms"], row["sdpa_variant"] = best
    # paged: the same tokens in shuffled blocks of PAGE
    per = cache // PAGE
    paged = []
    for q, kc, vc, k, v in sets[:max(1, n_sets // 2) if n_sets > 1 else 1]:
        perm = torch.randperm(batch * per, device=dev)
        table = perm.view(batch, per).to(torch.int32)
        kp = torch.empty(batch * per, PAGE, hkv, D, device=dev, dtype=torch.float16)
        vp = torch.empty_like(kp)
        kp[perm] = kc.reshape(batch * per, PAGE, hkv, D)
        vp[perm] = vc.reshape(batch * per, PAGE, hkv, D)
        paged.append((q, kp, vp, k, v, table))
    del sets
    row["paged_ms"] = _graph_time_ms([ours(q, kp, vp, k, v, block_table=t) for q, kp, vp, k, v, t in paged])
    row["paged_sets"] = len(paged)
    del paged
    torch.cuda.empty_cache()
    for name in ("fastattn", "paged", "sdpa"):
        if f"{name}_ms" in row:
            row[f"{name}_tbps"] = kv_bytes / (row[f"{name}_ms"] * 1e-3) / 1e12
    return row


def _prefill_row(seq_q: int, cache: int, hq: int = 32, hkv: int = 8, batch: int = 1) -> dict:
    import fastattn

    torch = _torch()
    F = torch.nn.functional
    dev = "cuda"
    kc = torch.randn(batch, cache, hkv, D, device=dev, dtype=torch.float16)
    vc = torch.randn(batch, cache, hkv, D, device=dev, dtype=torch.float16)
    q = torch.randn(batch, seq_q, hq, D, device=dev, dtype=torch.float16)
    k = torch.randn(batch, seq_q, hkv, D, device=dev, dtype=torch.float16)
    v = torch.randn(batch, seq_q, hkv, D, device=dev, dtype=torch.float16)
    past = cache - seq_q
    # pairs each query row sees: past + t + 1
    pairs = batch * hq * (seq_q * past + seq_q * (seq_q + 1) // 2)
    row = dict(kind="prefill", batch=batch, heads_q=hq, heads_kv=hkv, cache=cache, seq_q=seq_q, head_dim=D,
               dtype="float16", pairs=pairs)
    row["fastattn_ms"] = _graph_time_ms(
        [lambda: fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=past)])
    for route in ("decode", "forward"):
        row[f"{route}_ms"] = _forced_ms(
            lambda: fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=past), route)
    blocks = -(-cache // PAGE)
    table = torch.randperm(batch * blocks, device=dev, dtype=torch.int32).reshape(batch, blocks)
    kp = kc.reshape(batch * blocks, PAGE, hkv, D)[table.flatten().argsort()]  # the same rows, shuffled blocks
    vp = vc.reshape(batch * blocks, PAGE, hkv, D)[table.flatten().argsort()]
    row["paged_ms"] = _graph_time_ms(
        [lambda: fastattn.flash_attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=past, block_table=table)])
    i = torch.arange(seq_q, device=dev)[:, None]
    j = torch.arange(cache, device=dev)[None, :]
    mask = j <= i + past  # bottom-right causal
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    best = None
    for variant in ("gqa", "expand"):
        try:
            if variant == "gqa":
                ms = _graph_time_ms([lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                             enable_gqa=True)])
            else:
                ke, ve = kt.repeat_interleave(hq // hkv, 1), vt.repeat_interleave(hq // hkv, 1)
                ms = _graph_time_ms([lambda ke=ke, ve=ve: F.scaled_dot_product_attention(qt, ke, ve,
                                                                                          attn_mask=mask)])
        except Exception:  # noqa: BLE001 - a variant this torch cannot run: skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, variant)
    if best is not None:
        row["sdpa_ms"], row["sdpa_variant"] = best
    for name in ("fastattn", "decode", "forward", "paged", "sdpa"):
        if f"{name}_ms" in row:
            row[f"{name}_tflops"] = 4 * D * pairs / (row[f"{name}_ms"] * 1e-3) / 1e12
    return row


def _forced_ms(fn: Callable[[], Any], route: str) -> float:
    """Device ms of a call served by one kernel ("decode" or "forward": ``_decode.LONG_ROUTE``)."""
    from fastattn import _kvcache
    from fastattn.backends.cuda import _decode

    _decode.LONG_ROUTE = route
    _kvcache._FAST.clear()  # a remembered repeat state would keep the routed plan
    try:
        return _graph_time_ms([fn])
    finally:
        _decode.LONG_ROUTE = "auto"
        _kvcache._FAST.clear()


def _overhead_rows(n: int = 1000, rounds: int = 5) -> list[dict]:
    import fastattn

    torch = _torch()
    F = torch.nn.functional
    dev = "cuda"
    cache, hq, hkv = 256, 32, 8
    kc = torch.randn(1, cache, hkv, D, device=dev, dtype=torch.float16)
    vc = torch.randn_like(kc)
    q = torch.randn(1, 1, hq, D, device=dev, dtype=torch.float16)
    k = torch.randn(1, 1, hkv, D, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    lens = torch.full((1,), cache - 1, dtype=torch.int32, device=dev)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    calls = {
        "fastattn (int cache_seqlens)": lambda: fastattn.flash_attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=cache - 1),
        "fastattn (device cache_seqlens: checked, one sync)": lambda: fastattn.flash_attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lens),
        "torch SDPA": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
    }
    for fn in calls.values():  # warm-up: compiles, the checked call, the repeat state
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    walls: dict[str, list[float]] = {name: [] for name in calls}
    hosts: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):  # the competitors in turns, so that a slow spell of the machine hits all alike
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(n):
                fn()
            host = time.perf_counter() - t
            torch.cuda.synchronize()
            walls[name].append((time.perf_counter() - t) / n * 1e6)
            hosts[name].append(host / n * 1e6)
    rows = [dict(kind="overhead", what=name, us_per_call=statistics.median(walls[name]),
                 host_us_per_call=statistics.median(hosts[name]), rounds=rounds, calls=n) for name in calls]
    graph = torch.cuda.CUDAGraph()
    step = calls["fastattn (device cache_seqlens: checked, one sync)"]
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        graph.replay()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1e6
    rows.append(dict(kind="overhead", what="fastattn, CUDA graph replay", us_per_call=wall,
                     host_us_per_replay=host, calls=n))
    return rows


def run_decode_bench(quick: bool = False, progress: Callable[[dict], None] | None = None,
                     prefill_only: bool = False, crossover: bool = False) -> list[dict]:
    """Every row of the decode benchmark (see the module docstring); ``quick``: caches 4k / 32k / 128k and
    fewer prefill rows; ``prefill_only``: the chunked-prefill rows alone; ``crossover``: also the prefill
    rows of CROSSOVER_SHAPES."""
    torch = _torch()
    rows = [dict(kind="copy", tbps=copy_bandwidth(), device=torch.cuda.get_device_name(0))]
    if progress:
        progress(rows[-1])
    if prefill_only:
        rows += _prefill_rows(quick, progress, crossover)
        return rows
    for batch in BATCHES:
        for hq, hkv in HEADS:
            for cache in (QUICK_CACHES if quick else CACHES):
                row = _decode_row(batch, hq, hkv, cache)
                if row is None:
                    continue
                rows.append(row)
                if progress:
                    progress(row)
    rows += _prefill_rows(quick, progress, crossover)
    rows += _overhead_rows()
    if progress:
        for r in rows[-4:]:
            progress(r)
    return rows


def _prefill_rows(quick: bool, progress: Callable[[dict], None] | None, crossover: bool) -> list[dict]:
    rows = []
    shapes = ((1, 32, 8),) + (CROSSOVER_SHAPES if crossover else ())
    caches = PREFILL_CACHES[:1] if quick else PREFILL_CACHES
    if crossover:
        caches = tuple(sorted(caches + CROSSOVER_CACHES))
    for batch, hq, hkv in shapes:
        for cache in caches:
            for seq_q in PREFILL_SEQ_Q:
                rows.append(_prefill_row(seq_q, cache, hq, hkv, batch))
                _torch().cuda.empty_cache()
                if progress:
                    progress(rows[-1])
    return rows


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def format_decode_table(rows: list[dict]) -> str:
    """The decode, prefill and overhead tables, each competitor beside fastattn with the ratio."""
    copy = next((r["tbps"] for r in rows if r["kind"] == "copy"), None)
    dev = next((r.get("device", "") for r in rows if r["kind"] == "copy"), "")
    lines = [f"decode, float16, head_dim 128, K+V TB/s ({dev}; device-to-device copy {_f(copy)} TB/s)",
             "| batch | heads q/kv | cache | fastattn | paged | SDPA | fastattn/SDPA | paged/contig | "
             "fastattn/copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "decode":
            continue
        ours, paged, sdpa = r.get("fastattn_tbps"), r.get("paged_tbps"), r.get("sdpa_tbps")
        lines.append(
            f"| {r['batch']} | {r['heads_q']}/{r['heads_kv']} | {r['cache'] // 1024}k | {_f(ours)} | {_f(paged)} | "
            f"{_f(sdpa)} | {_f(ours / sdpa if ours and sdpa else None)}x | "
            f"{_f(paged / ours if paged and ours else None)} | {_f(ours / copy if ours and copy else None)} |")
    lines += ["", "chunked prefill, float16, head_dim 128, TFLOP/s over attended pairs (SDPA with the explicit "
                  "bottom-right mask; fastattn as routed, each kernel alone, paged as routed)",
              "| batch | heads q/kv | cache | seq_q | fastattn | decode kernel | forward kernel | paged | SDPA | "
              "fastattn/SDPA | decode/SDPA | forward/SDPA | paged/SDPA |", "|---" * 13 + "|"]
    names = ("fastattn", "decode", "forward", "paged")
    for r in rows:
        if r["kind"] == "prefill":
            sdpa = r.get("sdpa_tflops")
            ours = [r.get(f"{n}_tflops") for n in names]
            ratios = " | ".join(f"{_f(x / sdpa if x and sdpa else None)}x" for x in ours)
            lines.append(f"| {r['batch']} | {r['heads_q']}/{r['heads_kv']} | {r['cache'] // 1024}k | {r['seq_q']} | "
                         + " | ".join(_f(x, '{:.1f}') for x in ours) + f" | {_f(sdpa, '{:.1f}')} | {ratios} |")
    lines += ["", "host overhead per call (loop of 1000, tiny decode step, median of 5 rounds)",
              "| what | wall us per call | host us per call |", "|---|---|---|"]
    for r in rows:
        if r["kind"] == "overhead":
            host = r.get("host_us_per_call", r.get("host_us_per_replay"))
            lines.append(f"| {r['what']} | {r['us_per_call']:.1f} | {_f(host, '{:.1f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="decode benchmark (GPU)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--prefill", action="store_true", help="the chunked-prefill rows alone")
    parser.add_argument("--crossover", action="store_true", help="also the prefill rows of CROSSOVER_SHAPES")
    args = parser.parse_args()
    result = run_decode_bench(args.quick, progress=lambda r: print(r, flush=True), prefill_only=args.prefill,
                              crossover=args.crossover)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print(format_decode_table(result))
