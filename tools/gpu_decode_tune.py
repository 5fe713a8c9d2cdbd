"""Tile and pipeline variants of fa_decode_mma on the GPU, side by side (one device session).

    python tools/gpu_decode_tune.py [--configs "BKV,WK,STAGES[,L2[,FUSE]];..."] [--shapes quick|grid] [--profile]

For each decode shape (float16, head_dim 128, one appended token) the K+V TB/s of fastattn with a
contiguous and a paged cache (block_size 64, shuffled blocks) under each decode tile config, beside
PyTorch SDPA (enable_gqa) and the same run's device-to-device copy; every time is the median of CUDA graph
replays over input sets that overflow L2.  ``--profile``: cProfile of 1000 host calls of a tiny step.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys

sys.path.insert(0, "src")

from fastattn import _bench_decode_cuda as bd  # noqa: E402
from fastattn import _kvcache  # noqa: E402
from fastattn.backends.cuda import _decode, _specs  # noqa: E402

QUICK = [(1, 32, 32, 4096), (1, 32, 8, 4096), (8, 32, 32, 4096), (8, 32, 8, 4096), (64, 32, 8, 4096),
         (1, 32, 8, 16384), (1, 32, 8, 32768), (1, 32, 32, 32768), (1, 32, 8, 131072), (8, 32, 8, 32768),
         (64, 32, 8, 16384)]


_GET_KERNEL = _decode.get_kernel
_SMEM_LIMIT = _specs.DECODE_SMEM_LIMIT
_RULES, _PAGED_RULES = _specs.DECODE_RULES, _specs.DECODE_PAGED_RULES


def set_decode_config(bkv: int, wk: int, stages: int, l2: int = 256, fuse: int = 1) -> None:
    """The decode rule (rows <= 16) as (block_kv, key_warps, stages), the cp.async L2 prefetch hint, and
    whether a unit's last block merges the splits (fuse=1) or the combine kernel does (fuse=0)."""
    first = _RULES[0]
    cfg = dataclasses.replace(first[1], block_kv=bkv, key_warps=wk, stages=stages)
    _specs.DECODE_RULES = ((first[0], cfg), *_RULES[1:])
    _specs.DECODE_PAGED_RULES = ((first[0], cfg), *_PAGED_RULES[1:])
    _specs.DECODE_SMEM_LIMIT = 227 * 1024 if stages > 2 and bkv >= 128 else _SMEM_LIMIT  # one block, 3 stages
    opts = () if l2 == 256 else (f"-DFA_DECODE_L2_PREFETCH={l2}",)
    _decode.get_kernel = lambda name, smem: _GET_KERNEL(name, smem, opts)
    _decode._FUSE = bool(fuse)
    _decode._PLANS.clear()
    _kvcache._FAST.clear()  # the repeat states hold plans


def shape_row(b: int, hq: int, hkv: int, cache: int, configs: list[tuple[int, ...]]) -> str | None:
    """One decode shape: SDPA, then fastattn contiguous / paged under each config, as a table row."""
    import torch

    import fastattn

    F = torch.nn.functional
    dev = "cuda"
    kv_bytes = b * cache * hkv * 128 * 4
    if 3 * kv_bytes + (4 << 30) > bd._free_bytes():
        return None
    n_sets = bd._sets(kv_bytes)
    if n_sets * kv_bytes * 2 + (4 << 30) > bd._free_bytes():
        n_sets = 1
    sets = []
    for _ in range(n_sets):
        kc = torch.randn(b, cache, hkv, 128, device=dev, dtype=torch.float16)
        vc = torch.randn_like(kc)
        q = torch.randn(b, 1, hq, 128, device=dev, dtype=torch.float16)
        k = torch.randn(b, 1, hkv, 128, device=dev, dtype=torch.float16)
        sets.append((q, kc, vc, k, torch.randn_like(k)))
    gqa = hkv != hq
    sdpa = bd._graph_time_ms([lambda q=q, kc=kc, vc=vc: F.scaled_dot_product_attention(
        q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=gqa) for q, kc, vc, _, _ in sets])
    per = cache // 64
    perm = torch.randperm(b * per, device=dev)
    table = perm.view(b, per).to(torch.int32)
    q0, kc0, vc0, k0, v0 = sets[0]
    kp = torch.empty(b * per, 64, hkv, 128, device=dev, dtype=torch.float16)
    vp = torch.empty_like(kp)
    kp[perm] = kc0.reshape(b * per, 64, hkv, 128)
    vp[perm] = vc0.reshape(b * per, 64, hkv, 128)
    n = cache - 1
    cells = []
    for cfg in configs:
        set_decode_config(*cfg)
        ms = bd._graph_time_ms([lambda s=s: fastattn.flash_attention_with_kvcache(
            s[0], s[1], s[2], s[3], s[4], cache_seqlens=n) for s in sets])
        pms = bd._graph_time_ms([lambda: fastattn.flash_attention_with_kvcache(
            q0, kp, vp, k0, v0, cache_seqlens=n, block_table=table)])
        cells.append(f"{kv_bytes / ms / 1e9:.2f} / {kv_bytes / pms / 1e9:.2f}")
    torch.cuda.empty_cache()
    return f"| {b} | {hq}/{hkv} | {cache // 1024}k | {kv_bytes / sdpa / 1e9:.2f} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="64,4,2,256,0;64,4,2,256,1;64,4,3,256,0;64,4,3,256,1")
    ap.add_argument("--shapes", default="quick")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import torch

    import fastattn

    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c]
    copy = bd.copy_bandwidth()
    print(f"copy {copy:.2f} TB/s ({torch.cuda.get_device_name(0)})", flush=True)
    shapes = QUICK if args.shapes == "quick" else [
        (b, hq, hkv, c) for b in bd.BATCHES for hq, hkv in bd.HEADS for c in bd.CACHES]
    for cfg in configs:  # compile first; report registers
        set_decode_config(*cfg)
        c = _specs.decode_config(1, 128, 128)
        name = _specs.decode_mma_name("float16", 128, 128, c, True, False)  # causal, as the rows run
        k = _decode.get_kernel(name, _specs.decode_mma_smem_bytes(128, 128, c))  # noqa: F841
        print(cfg, name, "regs", getattr(k, "num_regs", "?"), "smem", _specs.decode_mma_smem_bytes(128, 128, c),
              flush=True)
    hdr = "| B | hq/hkv | cache | SDPA | " + " | ".join(f"{c} contig / paged" for c in configs) + " |"
    lines = [hdr]
    for b, hq, hkv, cache in shapes:
        line = shape_row(b, hq, hkv, cache, configs)
        if line:
            print(line, flush=True)
            lines.append(line)
    print("\n".join(lines))
    if args.profile:
        set_decode_config(*configs[0])
        dev = "cuda"
        kc = torch.randn(1, 256, 8, 128, device=dev, dtype=torch.float16)
        vc = torch.randn_like(kc)
        q = torch.randn(1, 1, 32, 128, device=dev, dtype=torch.float16)
        k = torch.randn(1, 1, 8, 128, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        for _ in range(50):
            fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=255)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(1000):
            fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=255)
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue()[:3500])
        for name, r in (("overhead", bd._overhead_rows()),):
            for row in r:
                print(name, row)


if __name__ == "__main__":
    main()
