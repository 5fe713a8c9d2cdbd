"""The decode kernel's fused split merge against the combine launch, by rows per unit (GPU).

    python tools/gpu_decode_fuse_probe.py [--json OUT]

For float16, head_dim 128, batch 1, a contiguous cache of 4k / 16k tokens (no append), heads 32/8 and
32/32, seq_q 1, 4, 16, 64: the device time of one call (a captured CUDA graph replayed 50 times between
two events, best of 5) with ``_decode._FUSED_MAX_ROWS`` (a unit's rows up to which its last block merges
the splits) at 0 (never: the combine launch), 8 (the rule) and unbounded (always, the rule before), in one
process, each twice in both orders, beside the splits and the rows of a unit the plan picked.
"""

from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, "src")

BOUNDS = (0, 8, 1 << 30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    import fastattn
    from fastattn import _kvcache
    from fastattn.backends.cuda import _decode

    rule = _decode._FUSED_MAX_ROWS
    rows_out = []
    torch.manual_seed(0)
    for cache in (4096, 16384):
        for hq, hkv in ((32, 8), (32, 32)):
            kc = torch.randn(1, cache, hkv, 128, device="cuda", dtype=torch.float16)
            vc = torch.randn_like(kc)
            for sq in (1, 4, 16, 64):
                q = torch.randn(1, sq, hq, 128, device="cuda", dtype=torch.float16)
                lens = torch.full((1,), cache, device="cuda", dtype=torch.int32)

                def call(q=q, kc=kc, vc=vc, lens=lens) -> None:  # this shape's arrays
                    fastattn.flash_attention_with_kvcache(q, kc, vc, cache_seqlens=lens)

                times: dict[int, list[float]] = {}
                for bound in BOUNDS + BOUNDS[::-1]:
                    _decode._FUSED_MAX_ROWS = bound
                    _decode._PLANS.clear()
                    _kvcache._FAST.clear()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        call()
                        call()
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        call()
                    best = float("inf")
                    for _ in range(5):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(50):
                            graph.replay()
                        end.record()
                        end.synchronize()
                        best = min(best, start.elapsed_time(end) * 1e3 / 50)
                    times.setdefault(bound, []).append(best)
                    del graph
                plan = next(iter(_decode._PLANS.values()), None)
                splits = plan.splits(cache, None) if plan is not None else -1
                unit_rows = plan.unit_rows if plan is not None else -1
                row = dict(cache=cache, hq=hq, hkv=hkv, seq_q=sq, splits=splits, unit_rows=unit_rows,
                           us={str(b): min(ts) for b, ts in times.items()})
                rows_out.append(row)
                cells = "  ".join(f"bound {b}: {min(ts):7.1f} us" for b, ts in times.items())
                print(f"cache {cache:6d} H{hq}/{hkv} seq_q {sq:3d} splits {splits:3d} unit rows {unit_rows:3d}",
                      cells, flush=True)
            del kc, vc
    _decode._FUSED_MAX_ROWS = rule
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
