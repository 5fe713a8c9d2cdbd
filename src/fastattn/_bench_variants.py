"""The variant benchmark on the CPU: each variant of ``flash_attention`` beside the plain kernel and
beside PyTorch's SDPA given the same call (``python -m fastattn bench --variant NAME``).

A case times three things on the same inputs, in this process, one after the other:

- ``fastattn``: the variant call;
- ``plain``: fastattn's plain kernel on the same shapes (q heads = k/v heads, no mask), whose
  throughput per attended (query, key) pair the variant must keep (``vs plain`` = the variant's
  GFLOP/s over the plain call's, both counting only attended pairs);
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` with the equivalent explicit
  arguments (``enable_gqa=True``, a boolean mask or a float bias built once, outside the timing),
  where PyTorch can express the variant (softcap: it cannot; packed sequences: one call per sequence).

GFLOP/s = 2·(head_dim + head_dim_v) per attended pair / time, the same count for every column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from ._bench import time_call

VARIANTS = ("gqa", "window", "softcap", "alibi", "mask", "varlen", "bshd")


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed call of a variant."""

    variant: str
    label: str
    batch: int
    heads: int
    heads_kv: int
    seq: int
    head_dim: int
    causal: bool | str = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    mask: str = ""  # "", "padding" (bool, keys), "bias" (float, per head)
    varlen: tuple[int, ...] = ()
    layout: str = "bhsd"


CASES: dict[str, tuple[Case, ...]] = {
    "gqa": (Case("gqa", "B1 Hq32 Hkv8 N1024 D128", 1, 32, 8, 1024, 128),
            Case("gqa", "B1 Hq32 Hkv8 N1024 D128 causal", 1, 32, 8, 1024, 128, causal=True),
            Case("gqa", "B1 Hq32 Hkv8 N2048 D128 causal", 1, 32, 8, 2048, 128, causal=True)),
    "window": (Case("window", "B1 H8 N4096 D64 causal, window 512", 1, 8, 8, 4096, 64, causal=True,
                    window=(512, 0)),
               Case("window", "B1 H8 N4096 D64 window (256, 256)", 1, 8, 8, 4096, 64, window=(256, 256))),
    "softcap": (Case("softcap", "B1 H8 N2048 D64 causal, softcap 30", 1, 8, 8, 2048, 64, causal=True,
                     softcap=30.0),),
    "alibi": (Case("alibi", "B1 H8 N2048 D64 causal, ALiBi", 1, 8, 8, 2048, 64, causal=True, alibi=True),),
    "mask": (Case("mask", "B4 H8 N1024 D64, key padding mask", 4, 8, 8, 1024, 64, mask="padding"),
             Case("mask", "B1 H8 N1024 D64, float bias per head", 1, 8, 8, 1024, 64, mask="bias")),
    "varlen": (Case("varlen", "4 sequences (1024, 512, 256, 128) H8 D64 causal", 4, 8, 8, 1024, 64, causal=True,
                    varlen=(1024, 512, 256, 128)),),
    "bshd": (Case("bshd", "B1 H8 N2048 D64 (batch, seq, heads, dim)", 1, 8, 8, 2048, 64, layout="bshd"),
             Case("bshd", "B1 H8 N2048 D64 causal (batch, seq, heads, dim)", 1, 8, 8, 2048, 64, causal=True,
                  layout="bshd"),
             Case("bshd", "B2 H16 N1024 D128 (batch, seq, heads, dim)", 2, 16, 16, 1024, 128, layout="bshd")),
}


def _slopes(heads: int) -> np.ndarray:
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)


def _prepare(case: Case, rng: np.random.Generator) -> dict:
    """Inputs, fastattn's keyword arguments, and the pieces PyTorch needs (built once)."""
    b, hq, hkv, n, d = case.batch, case.heads, case.heads_kv, case.seq, case.head_dim
    if case.layout == "bshd":
        q = rng.standard_normal((b, n, hq, d), dtype=np.float32)
        k = rng.standard_normal((b, n, hkv, d), dtype=np.float32)
        v = rng.standard_normal((b, n, hkv, d), dtype=np.float32)
    else:
        q = rng.standard_normal((b, hq, n, d), dtype=np.float32)
        k = rng.standard_normal((b, hkv, n, d), dtype=np.float32)
        v = rng.standard_normal((b, hkv, n, d), dtype=np.float32)
    kw: dict[str, Any] = dict(causal=case.causal, window=case.window, softcap=case.softcap, layout=case.layout)
    if case.alibi:
        kw["alibi_slopes"] = _slopes(hq)
    if case.mask == "padding":
        lengths = np.linspace(n, n // 2, b).astype(int)
        kw["attn_mask"] = (np.arange(n)[None, :] < lengths[:, None])[:, None, None, :]  # (b, 1, 1, n)
    elif case.mask == "bias":
        kw["attn_mask"] = rng.standard_normal((1, hq, n, n)).astype(np.float32)
    return dict(q=q, k=k, v=v, kw=kw)


def _torch_call(case: Case, inp: dict) -> Callable[[], Any] | None:
    """SDPA with the explicit equivalent of the case, or None where PyTorch cannot express it."""
    import torch

    if case.softcap > 0.0:
        return None
    if case.varlen:  # one call per sequence
        seqs = [tuple(torch.from_numpy(rng_x) for rng_x in xs) for xs in inp["singles"]]

        def run_each() -> Any:
            with torch.inference_mode():
                return [torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=bool(case.causal))
                        for xs in seqs]

        return run_each
    q, k, v = (torch.from_numpy(inp[x]) for x in ("q", "k", "v"))
    if case.layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    n = case.seq
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = np.ones((n, n), bool)
    if case.causal:
        allowed &= j <= i
    left, right = case.window
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    mask: Any = None
    is_causal = bool(case.causal) and left < 0 and right < 0 and not case.alibi and not case.mask
    if not is_causal and not allowed.all():
        mask = torch.from_numpy(allowed)
    if case.alibi:
        slopes = _slopes(case.heads)[:, None, None]
        bias = -slopes * np.abs(i - j)[None].astype(np.float32)
        mask = torch.from_numpy(np.where(allowed[None], bias, -np.inf).astype(np.float32))
    if case.mask:
        mask = torch.from_numpy(np.ascontiguousarray(inp["kw"]["attn_mask"]))
    gqa = case.heads != case.heads_kv

    def run() -> Any:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                    enable_gqa=gqa)

    return run


def _time_case(case: Case, rng: np.random.Generator, threads: int | None, repeat: int,
               torch_reason: str | None) -> list[dict]:
    import fastattn

    from ._bench import thread_limit

    inp = _prepare(case, rng)
    q, k, v, kw = inp["q"], inp["k"], inp["v"], inp["kw"]
    if case.varlen:  # the same sequences one by one, for PyTorch
        inp["singles"] = [tuple(rng.standard_normal((1, h, n, case.head_dim), dtype=np.float32)
                                for h in (case.heads, case.heads, case.heads)) for n in case.varlen]
    cfg = fastattn.FlashAttentionConfig(head_dim=case.head_dim, num_heads=case.heads, num_kv_heads=case.heads_kv,
                                        causal=case.causal, window=case.window, softcap=case.softcap,
                                        layout=case.layout if not case.varlen else "bhsd")
    fa = fastattn.FlashAttention(cfg, "cpu")
    if case.varlen:
        cu = np.concatenate([[0], np.cumsum(case.varlen)]).astype(np.int32)
        packed = [rng.standard_normal((int(cu[-1]), h, case.head_dim), dtype=np.float32)
                  for h in (case.heads, case.heads_kv, case.heads_kv)]

        def variant_call() -> Any:
            return fa.forward_varlen(*packed, cu, cu, num_threads=threads)
    else:
        extra = {key: kw[key] for key in ("alibi_slopes", "attn_mask") if key in kw}

        def variant_call() -> Any:
            return fa.forward_multi_head(q, k, v, num_threads=threads, **extra)
    res = variant_call()  # the object API: its result counts the attended pairs
    if case.varlen:
        def timed() -> Any:
            return fastattn.flash_attention_varlen(*packed, cu, cu, causal=case.causal, num_threads=threads)
    else:
        def timed() -> Any:
            return fastattn.flash_attention(q, k, v, causal=case.causal, window=case.window, softcap=case.softcap,
                                            layout=case.layout, num_threads=threads, **extra)
    with thread_limit("fastattn-cpu", threads):
        seconds = time_call(timed, repeat)
    # the plain kernel on the same shapes: as many k/v heads as q heads, no mask, contiguous (packed
    # sequences: one plain call per sequence, what a caller without varlen would do); q, k and v are
    # three arrays, as in the variant's call, so both read the same bytes
    plain = fastattn.FlashAttention(fastattn.FlashAttentionConfig(head_dim=case.head_dim, num_heads=case.heads,
                                                                  causal=bool(case.causal)), "cpu")
    lengths = case.varlen or (case.seq,)
    singles = [tuple(rng.standard_normal((1 if case.varlen else case.batch, case.heads, n, case.head_dim),
                                         dtype=np.float32) for _ in range(3)) for n in lengths]

    plain_flops = sum(plain.forward_multi_head(*x, num_threads=threads).flops for x in singles)

    def plain_call() -> Any:
        return [fastattn.flash_attention(*x, causal=bool(case.causal), num_threads=threads) for x in singles]

    with thread_limit("fastattn-cpu", threads):
        plain_s = time_call(plain_call, repeat)
    base = dict(variant=case.variant, case=case.label, threads=res.num_threads, flops=res.flops)
    rows = [{**base, "impl": "fastattn", "ms": seconds * 1e3, "gflops": res.flops / seconds / 1e9},
            {**base, "impl": "fastattn plain", "ms": plain_s * 1e3, "gflops": plain_flops / plain_s / 1e9,
             "flops": plain_flops}]
    if torch_reason is None:
        call = _torch_call(case, inp)
        if call is None:
            rows.append({**base, "impl": "torch-sdpa", "ms": None, "gflops": None,
                         "note": "PyTorch SDPA cannot express this variant"})
        else:
            with thread_limit("torch-sdpa", threads):
                t_s = time_call(call, repeat)
            rows.append({**base, "impl": "torch-sdpa", "ms": t_s * 1e3, "gflops": res.flops / t_s / 1e9})
    return rows


def run_variant_bench(variant: str, *, threads: int | None = None, repeat: int = 3,
                      compare_torch: bool = True) -> list[dict]:
    """Times the cases of one variant (see the module docstring); one row per (case, implementation)."""
    from ._bench import torch_unavailable

    if variant not in CASES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng(0)
    torch_reason = torch_unavailable() if compare_torch else "not asked for"
    rows: list[dict] = []
    for case in CASES[variant]:
        rows += _time_case(case, rng, threads, repeat, torch_reason)
    return rows


def format_variant_table(rows: list[dict]) -> str:
    """fastattn, the plain kernel and PyTorch side by side, with the two ratios."""
    lines = ["| variant | case | fastattn GFLOP/s | plain GFLOP/s | vs plain | torch SDPA GFLOP/s | vs torch |",
             "|---|---|---|---|---|---|---|"]
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["variant"], r["case"]), {})[r["impl"]] = r
    for (variant, case), impls in by_case.items():
        fa, plain, torch = impls.get("fastattn"), impls.get("fastattn plain"), impls.get("torch-sdpa")
        g = fa["gflops"] if fa else None
        pg = plain["gflops"] if plain else None
        tg = torch["gflops"] if torch and torch.get("gflops") else None
        lines.append(
            f"| {variant} | {case} | {g:.1f} | {pg:.1f} | {g / pg:.2f}x | "
            + (f"{tg:.1f} | {g / tg:.2f}x |" if tg else f"- | {torch.get('note', 'not run') if torch else 'not run'} |")
        )
    return "\n".join(lines)
