"""Kernel specializations of the CUDA backend: which template instance serves which call.

Pure Python (no CuPy): ``tools/compile_cuda_kernels.py`` and the tests read the same list.

Tile choice is made here and only here.  ``head_dim`` d is padded up to the next supported
``D`` (the kernel zero-fills columns ``d..D-1``), so every d in 1..256 has a kernel; v's head_dim
likewise (``DV``), with ``DV == D`` or one of the listed pairs (``MMA_PAIRS``, ``SM90_PAIRS``), else
both are padded to the larger.

Mask flags of every kernel: ``interval`` (causal and/or a window: tile skipping, masked-V checks)
and ``mods`` (softcap / ALiBi / attn_mask, switched at run time inside one specialization; a mods
kernel always has ``interval`` on, and on the tensor cores its dropout is switched at run time).
Ragged batches, GQA, the causal alignment and strides are run-time arguments of every kernel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_SOURCE = "flash_fwd.cu"
#: the Hopper kernel (wgmma): compiled for sm_90a only, launched on compute capability 9.0
KERNEL_SOURCE_SM90 = "flash_fwd_sm90.cu"
#: attention against a KV cache (decode, chunked prefill): fa_decode_mma / fa_decode_simt / fa_decode_combine
KERNEL_SOURCE_DECODE = "decode.cu"
#: the backward pass: fa_bwd_prep, fa_bwd_mma, fa_bwd_dq_mma, fa_bwd_dq_convert, fa_bwd_simt_kv, fa_bwd_simt_q
KERNEL_SOURCE_BWD = "flash_bwd.cu"
#: the Hopper backward (wgmma, fa_bwd_sm90): compiled for sm_90a only, launched on compute capability 9.0
KERNEL_SOURCE_SM90_BWD = "flash_bwd_sm90.cu"
KERNEL_HEADERS = ("common.cuh", "elem.cuh", "philox.cuh", "wgmma.cuh", "sm90.cuh", "bwd.cuh")

#: padded head_dim of the tensor-core kernel (float16 / bfloat16)
MMA_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
#: (D, DV) pairs of padded head dims with DV != D that have their own tensor-core kernels
#: (q/k 192 with v 128: latent attention's shapes); any other pair is padded to the larger
MMA_PAIRS = ((192, 128),)
#: padded head_dim of the SIMT kernel (float32 / float64): one D for q/k and v (the larger)
SIMT_HEAD_DIMS = (32, 64, 128, 256)
#: the mask flags a kernel is compiled with: (interval, mods)
MASK_FLAGS = ((False, False), (True, False), (True, True))
#: largest head_dim any kernel serves
MAX_HEAD_DIM = 256

MAX_HEAD_DIM_ERROR = "head_dim {d} is larger than the cuda backend supports ({max})"

_CXX_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_LSE_TYPE = {"float32": "float", "float64": "double"}


@dataclasses.dataclass(frozen=True)
class MmaConfig:
    """Tiles of ``fa_fwd_mma``: block_q = 16 * m_tiles * warps, block_kv; Q fragments in registers?"""

    warps: int
    m_tiles: int
    block_kv: int
    q_in_regs: bool
    stages: int = 2

    @property
    def block_q(self) -> int:
        return 16 * self.m_tiles * self.warps


@dataclasses.dataclass(frozen=True)
class Sm90Config:
    """Tiles of ``fa_fwd_sm90``: ``warpgroups`` x 64 query rows per block, block_kv keys per tile,
    and the blocks per SM its register budget is cut for."""

    warpgroups: int
    block_kv: int
    min_blocks: int = 1

    @property
    def block_q(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups


@dataclasses.dataclass(frozen=True)
class SimtConfig:
    """Tiles of ``fa_fwd_simt``: block_q rows (4 threads each), block_kv keys."""

    block_q: int
    block_kv: int


#: default tiles of the tensor-core kernel per (padded head_dim, causal), from the sweep on an H100
#: (docs/cuda.md): big tiles for full attention, smaller ones where causal leaves warps idle
MMA_CONFIGS: dict[tuple[int, bool], MmaConfig] = {
    (32, False): MmaConfig(4, 2, 64, True),
    (32, True): MmaConfig(4, 2, 64, True),
    (64, False): MmaConfig(4, 2, 64, False),
    (64, True): MmaConfig(4, 2, 64, False),
    (96, False): MmaConfig(4, 2, 32, False),
    (96, True): MmaConfig(4, 2, 32, False),
    (128, False): MmaConfig(4, 2, 32, False),
    (128, True): MmaConfig(4, 2, 32, False),
    (192, False): MmaConfig(4, 1, 64, False),
    (192, True): MmaConfig(4, 1, 64, False),
    (256, False): MmaConfig(4, 1, 32, False),
    (256, True): MmaConfig(4, 1, 32, False),
}

#: padded head_dim of the Hopper kernel (float16 / bfloat16, no dropout, d % 8 == 0, unit stride along d):
#: whole 64-column swizzle panels
SM90_HEAD_DIMS = (64, 128, 192, 256)
SM90_PAIRS = ((192, 128),)

#: tiles of the Hopper kernel per (padded head_dim, causal): (largest seq_kv, config) rules, first
#: match wins.  From the sweep on an H100 (docs/cuda.md): short key sequences (few tiles a block)
#: prefer two 128-thread warpgroups, at head_dim 64 with two blocks sharing an SM; long ones the
#: larger 192-row (d=64) or 64-key (d=128) tiles.
SM90_RULES: dict[tuple[int, bool], tuple[tuple[int, Sm90Config], ...]] = {
    (64, False): ((2048, Sm90Config(2, 64, 2)), (2**31, Sm90Config(3, 128))),
    (64, True): ((8192, Sm90Config(2, 64, 2)), (2**31, Sm90Config(3, 128))),
    (128, False): ((1024, Sm90Config(2, 128)), (2**31, Sm90Config(3, 64))),
    (128, True): ((2**31, Sm90Config(2, 128)),),
    (192, False): ((2**31, Sm90Config(2, 64)),),
    (192, True): ((2**31, Sm90Config(2, 64)),),
    (256, False): ((2**31, Sm90Config(2, 32)),),  # 128 O accumulators a thread: the 32-key tile keeps
    (256, True): ((2**31, Sm90Config(2, 32)),),   # S and P small enough not to spill (ptxas, sm_90a)
}

#: tiles of the Hopper kernel with attn_mask (and any softcap / ALiBi): the mask hook needs registers,
#: so one block per SM with room for it (ptxas: no spills at these tiles, spills at the plain ones).
#: Softcap / ALiBi without attn_mask have their own specialization (MODS_FORM 2: no mask code), on
#: the plain kernel's tiles (SM90_RULES) with the call's own interval flag
SM90_MODS_CONFIGS: dict[int, Sm90Config] = {
    64: Sm90Config(2, 128),
    128: Sm90Config(2, 64),
    192: Sm90Config(2, 64),
    256: Sm90Config(2, 32),
}

#: tiles of the Hopper kernel with attn_mask tiles in shared memory (MODS_FORM 3): each warp's ring
#: of 16 x block_kv mask tiles must fit beside Q, K and V (ptxas, sm_90a: no spills at 128 / 256)
SM90_TILES_CONFIGS: dict[int, Sm90Config] = {
    64: Sm90Config(2, 64),
    128: Sm90Config(2, 64),
    192: Sm90Config(2, 64),
    256: Sm90Config(2, 32),
}

#: extra Hopper tiles the benchmark sweep may try (compiled in CI too)
SM90_SWEEP: dict[int, tuple[Sm90Config, ...]] = {
    64: (Sm90Config(2, 128), Sm90Config(3, 128), Sm90Config(2, 64, 2), Sm90Config(3, 64)),
    128: (Sm90Config(2, 128), Sm90Config(2, 64), Sm90Config(3, 64)),
    256: (Sm90Config(2, 64),),
}


def sm90_mods_form(mods: bool, attn_mask: bool = True, mask_tiles: bool = False) -> str:
    """The Hopper kernel's MODS_FORM template argument: ``false`` no mods; ``true`` attn_mask (with any
    softcap / ALiBi) read from global memory in the hook (any layout); ``3`` the same with attn_mask
    tiles copied into shared memory (``mask_tiles``: rows the launcher found 16-byte aligned, unit key
    stride, elements of up to 4 bytes); ``2`` softcap / ALiBi alone (no attn_mask code)."""
    if not mods:
        return "false"
    if not attn_mask:
        return "2"
    return "3" if mask_tiles else "true"


def sm90_config(head_dim: int, interval: bool, seq_kv: int, mods: bool = False, attn_mask: bool = True,
                mask_tiles: bool = False) -> Sm90Config:
    """The Hopper kernel's tiles for a padded q/k head_dim, interval flag (causal / window), key length,
    mods flag (softcap / ALiBi / attn_mask), whether an attn_mask is given and whether its tiles go
    through shared memory."""
    if mods and attn_mask:
        return (SM90_TILES_CONFIGS if mask_tiles else SM90_MODS_CONFIGS)[head_dim]
    for max_seq, cfg in SM90_RULES[(head_dim, interval)]:
        if seq_kv <= max_seq:
            return cfg
    return SM90_RULES[(head_dim, interval)][-1][1]


#: SIMT tiles per (dtype, padded head_dim); shared memory (BQ + 2 BKV) (D+1) + BQ (BKV+1) elements
SIMT_CONFIGS: dict[tuple[str, int], SimtConfig] = {
    ("float32", 32): SimtConfig(32, 32),
    ("float32", 64): SimtConfig(32, 32),
    ("float32", 128): SimtConfig(32, 32),
    ("float32", 256): SimtConfig(32, 16),
    ("float64", 32): SimtConfig(32, 32),
    ("float64", 64): SimtConfig(32, 32),
    ("float64", 128): SimtConfig(32, 16),
    ("float64", 256): SimtConfig(16, 16),
}

#: extra tensor-core tiles the benchmark sweep may try (compiled in CI too)
MMA_SWEEP: dict[int, tuple[MmaConfig, ...]] = {
    64: (MmaConfig(4, 2, 64, False), MmaConfig(4, 2, 64, False, 3), MmaConfig(4, 2, 64, True),
         MmaConfig(4, 2, 32, False, 3), MmaConfig(8, 2, 64, True)),
    128: (MmaConfig(4, 2, 32, False), MmaConfig(4, 2, 32, False, 3), MmaConfig(4, 2, 48, False),
          MmaConfig(4, 2, 48, False, 3), MmaConfig(8, 2, 48, False)),
}


def padded_head_dim(d: int, dtype: str) -> int:
    dims = MMA_HEAD_DIMS if dtype in ("float16", "bfloat16") else SIMT_HEAD_DIMS
    for dim in dims:
        if d <= dim:
            return dim
    raise ValueError(MAX_HEAD_DIM_ERROR.format(d=d, max=MAX_HEAD_DIM))


def _pair(dp: int, dvp: int, pairs: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    if dp == dvp or (dp, dvp) in pairs:
        return dp, dvp
    top = max(dp, dvp)
    return top, top


def padded_dims(d: int, dv: int, dtype: str) -> tuple[int, int]:
    """(D, DV) of the mma.sync / SIMT kernels for q/k head_dim d and v head_dim dv."""
    dp, dvp = padded_head_dim(d, dtype), padded_head_dim(dv, dtype)
    if not is_mma_dtype(dtype):
        top = max(dp, dvp)
        return top, top
    return _pair(dp, dvp, MMA_PAIRS)


def sm90_padded_dims(d: int, dv: int) -> tuple[int, int]:
    """(D, DV) of the Hopper kernel: multiples of 64 (whole swizzle panels)."""
    for x in (d, dv):
        if x > MAX_HEAD_DIM:
            raise ValueError(MAX_HEAD_DIM_ERROR.format(d=x, max=MAX_HEAD_DIM))
    return _pair(max(64, -(-d // 64) * 64), max(64, -(-dv // 64) * 64), SM90_PAIRS)


def is_mma_dtype(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16")


def _b(x: bool) -> str:
    return "true" if x else "false"


def kernel_flags(interval: bool, mods: bool, dropout: bool) -> tuple[bool, bool, bool]:
    """The (interval, mods, dropout) template flags a call's kernel is compiled with: a mods kernel
    has interval on and (tensor cores) dropout switched at run time."""
    if mods:
        return True, True, True
    return interval, False, dropout


def mma_name(dtype: str, head_dim: int, cfg: MmaConfig, interval: bool, dropout: bool, vec: bool,
             head_dim_v: int | None = None, mods: bool = False) -> str:
    dv = head_dim if head_dim_v is None else head_dim_v
    interval, mods, dropout = kernel_flags(interval, mods, dropout)
    return (f"fa_fwd_mma<{_CXX_TYPE[dtype]}, {head_dim}, {dv}, {cfg.warps}, {cfg.m_tiles}, {cfg.block_kv}, "
            f"{cfg.stages}, {_b(cfg.q_in_regs)}, {_b(interval)}, {_b(mods)}, {_b(dropout)}, {_b(vec)}>")


def sm90_name(dtype: str, head_dim: int, cfg: Sm90Config, interval: bool, head_dim_v: int | None = None,
              mods: bool = False, attn_mask: bool = True, mask_tiles: bool = False) -> str:
    """The Hopper kernel's name expression; with mods, ``attn_mask`` says whether the call has one
    (the full hook, interval on as every mods kernel; ``mask_tiles``: through shared memory) or not
    (softcap / ALiBi alone: MODS_FORM 2, the call's own interval flag)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    form = sm90_mods_form(mods, attn_mask, mask_tiles)
    if form in ("true", "3"):
        interval, _, _ = kernel_flags(interval, mods, False)
    return (f"fa_fwd_sm90<{_b(dtype == 'bfloat16')}, {head_dim}, {dv}, {cfg.warpgroups}, "
            f"{cfg.block_kv}, {cfg.min_blocks}, {_b(interval)}, {form}>")


def simt_name(dtype: str, head_dim: int, cfg: SimtConfig, interval: bool, dropout: bool, mods: bool = False) -> str:
    interval, mods, dropout = kernel_flags(interval, mods, dropout)
    return (f"fa_fwd_simt<{_CXX_TYPE[dtype]}, {_LSE_TYPE[dtype]}, {head_dim}, {cfg.block_q}, {cfg.block_kv}, "
            f"{_b(interval)}, {_b(mods)}, {_b(dropout)}>")


def mma_smem_bytes(head_dim: int, cfg: MmaConfig, itemsize: int = 2, head_dim_v: int | None = None) -> int:
    """Shared memory per block of ``fa_fwd_mma``: Q tile + ``stages`` K and V tiles, rows padded by 8."""
    dv = head_dim if head_dim_v is None else head_dim_v
    rows_qk = cfg.block_q + cfg.stages * cfg.block_kv
    return (rows_qk * (head_dim + 8) + cfg.stages * cfg.block_kv * (dv + 8)) * itemsize


def sm90_smem_bytes(head_dim: int, cfg: Sm90Config, itemsize: int = 2, head_dim_v: int | None = None,
                    mask_tiles: bool = False) -> int:
    """Shared memory per block of ``fa_fwd_sm90``: Q tile, two K and two V tiles, a 16-row tile of
    zeros (the V operand of a P V that must add nothing: tiles no row of a warpgroup sees),
    1 KB for alignment; with ``mask_tiles`` (MODS_FORM 3) each warp's ring of two or three 16-row
    attn_mask tiles of block_kv elements of up to 4 bytes (rows padded by 16 bytes)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    base = ((cfg.block_q + 2 * cfg.block_kv) * head_dim + (2 * cfg.block_kv + 16) * dv) * itemsize + 1024
    if mask_tiles:
        base += 4 * cfg.warpgroups * sm90_mask_stages(head_dim, dv) * 16 * (4 * cfg.block_kv + 16)
    return base


def sm90_mask_stages(head_dim: int, head_dim_v: int) -> int:
    """attn_mask tiles in each warp's ring (the Hopper kernel's MST): three up to head dims of 128."""
    return 3 if head_dim <= 128 and head_dim_v <= 128 else 2


def simt_smem_bytes(head_dim: int, cfg: SimtConfig, itemsize: int) -> int:
    return ((cfg.block_q + 2 * cfg.block_kv) * (head_dim + 1) + cfg.block_q * (cfg.block_kv + 1)) * itemsize


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def mma_dim_pairs() -> list[tuple[int, int]]:
    return [(d, d) for d in MMA_HEAD_DIMS] + list(MMA_PAIRS)


def sm90_dim_pairs() -> list[tuple[int, int]]:
    return [(d, d) for d in SM90_HEAD_DIMS] + list(SM90_PAIRS)


def all_name_expressions() -> list[str]:
    """Every specialization the backend can launch (CI compiles each one)."""
    names: list[str] = []
    for dtype in ("float16", "bfloat16"):
        for dim, dv in mma_dim_pairs():
            for interval, mods in MASK_FLAGS:
                for dropout in (False, True):
                    for vec in (False, True):
                        names.append(mma_name(dtype, dim, MMA_CONFIGS[(dim, interval)], interval, dropout, vec,
                                              dv, mods))
            if dim != dv:
                continue
            for cfg in MMA_SWEEP.get(dim, ()):  # sweep tiles: the benchmarked case only
                for interval in (False, True):
                    if cfg != MMA_CONFIGS[(dim, interval)]:
                        names.append(mma_name(dtype, dim, cfg, interval, False, True))
    for dtype in ("float32", "float64"):
        for dim in SIMT_HEAD_DIMS:
            for interval, mods in MASK_FLAGS:
                for dropout in (False, True):
                    names.append(simt_name(dtype, dim, SIMT_CONFIGS[(dtype, dim)], interval, dropout, mods))
    return _unique(names)


def all_sm90_name_expressions() -> list[str]:
    """Every specialization of the Hopper kernel (compiled for sm_90a only)."""
    names: list[str] = []
    for dtype in ("float16", "bfloat16"):
        for dim, dv in sm90_dim_pairs():
            for interval, mods in MASK_FLAGS:
                configs = [SM90_MODS_CONFIGS[dim]] if mods else [c for _, c in SM90_RULES[(dim, interval)]]
                if not mods and dim == dv:
                    configs += list(SM90_SWEEP.get(dim, ()))
                for cfg in configs:
                    names.append(sm90_name(dtype, dim, cfg, interval, dv, mods))
                if mods:  # attn_mask tiles through shared memory
                    names.append(sm90_name(dtype, dim, SM90_TILES_CONFIGS[dim], interval, dv, mods, mask_tiles=True))
            for interval in (False, True):  # softcap / ALiBi without attn_mask (MODS_FORM 2)
                for _, cfg in SM90_RULES[(dim, interval)]:
                    names.append(sm90_name(dtype, dim, cfg, interval, dv, True, attn_mask=False))
        names.append(v_scan_name(dtype))
    return _unique(names)


#: the Hopper kernel reading a paged K/V cache through its block table (flash_attention_with_kvcache's long
#: chunks): the same source and names compiled with this define (flash_fwd_sm90.cu: FA_PAGED_KV), so the
#: plain forward's cubins do not change
SM90_PAGED_OPTIONS = ("-DFA_PAGED_KV",)


def all_sm90_paged_name_expressions() -> list[str]:
    """The Hopper kernel's specializations the KV-cache path launches with ``SM90_PAGED_OPTIONS``: every
    head dim pair, causal / window or not, softcap / ALiBi (MODS_FORM 2) or not, no attn_mask."""
    names: list[str] = []
    for dtype in ("float16", "bfloat16"):
        for dim, dv in sm90_dim_pairs():
            for interval in (False, True):
                for mods in (False, True):
                    for _, cfg in SM90_RULES[(dim, interval)]:
                        names.append(sm90_name(dtype, dim, cfg, interval, dv, mods, attn_mask=False))
    return _unique(names)


def v_scan_name(dtype: str) -> str:
    """The V pre-scan of the Hopper kernel (does V hold inf / NaN?)."""
    return f"fa_v_nonfinite<{_b(dtype == 'bfloat16')}>"


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles of ``fa_decode_mma``: ``row_warps`` warps of 16 * ``m_tiles`` rows (the packed (query, head of
    the group) rows), ``key_warps`` warps sharing each ``block_kv``-key tile, ``stages`` key tiles in the
    cp.async ring (``stages - 1`` in flight while one is computed)."""

    m_tiles: int
    row_warps: int
    key_warps: int
    block_kv: int
    stages: int = 2

    @property
    def block_rows(self) -> int:
        return 16 * self.m_tiles * self.row_warps

    @property
    def threads(self) -> int:
        return 32 * self.row_warps * self.key_warps


#: decode tiles by the rows a k/v head serves (heads of the group x seq_q), first match wins: a decode
#: step (<= 16 rows) puts all four warps on the keys of one row tile; chunked prefill puts them on rows.
#: Measured on the H100 (fp16, head_dim 128, tools/gpu_decode_tune.py): 64-key tiles, two stages (three
#: blocks per multiprocessor) stream contiguous and paged caches alike; 128-key tiles over eight warps (one
#: block per multiprocessor) were within 2% on contiguous caches (8-10% faster only at batch 1, 8 k/v
#: heads, 4k keys) and 2-7% slower on paged ones; three stages of 64-key tiles (two blocks per
#: multiprocessor) within -4% to +3% on contiguous caches, slower on paged ones
DECODE_RULES: tuple[tuple[int, DecodeConfig], ...] = (
    (16, DecodeConfig(1, 1, 4, 64, 2)),
    (32, DecodeConfig(1, 2, 2, 64, 3)),
    (2**31, DecodeConfig(1, 4, 1, 64, 3)),
)
#: the same for a paged cache (kept apart so that either can be tuned alone)
DECODE_PAGED_RULES: tuple[tuple[int, DecodeConfig], ...] = DECODE_RULES
#: the SIMT decode kernel's rows per block and keys per tile (float32 / float64)
DECODE_SIMT_ROWS = 8
DECODE_SIMT_BLOCK_KV = 32
#: shared memory a decode block may take when it has more than two stages (two blocks per multiprocessor)
DECODE_SMEM_LIMIT = 113 * 1024
#: shared memory a block may take at all (sm_80 / sm_90: 227 KB); larger key tiles are halved to fit
DECODE_SMEM_MAX = 227 * 1024


def decode_config(rows: int, head_dim: int, head_dim_v: int, paged: bool = False) -> DecodeConfig:
    """The tiles for ``rows`` query rows per k/v head at these (padded) head dims: the first rule that fits,
    with fewer stages (two at least) where the ring would not fit ``DECODE_SMEM_LIMIT``."""
    rules = DECODE_PAGED_RULES if paged else DECODE_RULES
    cfg = next((c for max_rows, c in rules if rows <= max_rows), rules[-1][1])
    while cfg.stages > 2 and decode_mma_smem_bytes(head_dim, head_dim_v, cfg) > DECODE_SMEM_LIMIT:
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    while cfg.block_kv > 64 and decode_mma_smem_bytes(head_dim, head_dim_v, cfg) > DECODE_SMEM_MAX:
        cfg = dataclasses.replace(cfg, block_kv=cfg.block_kv // 2, key_warps=max(1, cfg.key_warps // 2))
    return cfg


def decode_mma_name(dtype: str, head_dim: int, head_dim_v: int, cfg: DecodeConfig, interval: bool,
                    mods: bool) -> str:
    interval, mods, _ = kernel_flags(interval, mods, False)
    return (f"fa_decode_mma<{_CXX_TYPE[dtype]}, {head_dim}, {head_dim_v}, {cfg.m_tiles}, {cfg.row_warps}, "
            f"{cfg.key_warps}, {cfg.block_kv}, {cfg.stages}, {_b(interval)}, {_b(mods)}>")


def decode_simt_name(dtype: str, head_dim: int, interval: bool, mods: bool) -> str:
    interval, mods, _ = kernel_flags(interval, mods, False)
    return f"fa_decode_simt<{_CXX_TYPE[dtype]}, {_LSE_TYPE[dtype]}, {head_dim}, {_b(interval)}, {_b(mods)}>"


def kv_append_name(dtype: str) -> str:
    """The append alone (decode.cu: fa_kv_append), before the forward kernel attends a long chunk."""
    return f"fa_kv_append<{_CXX_TYPE[dtype]}>"


def decode_combine_name(dtype: str) -> str:
    lse = "double" if dtype == "float64" else "float"
    return f"fa_decode_combine<{_CXX_TYPE[dtype]}, {lse}>"


def decode_mma_smem_bytes(head_dim: int, head_dim_v: int, cfg: DecodeConfig) -> int:
    """Shared memory per block of ``fa_decode_mma``: Q tile + ``stages`` K and V tiles (rows padded by 8), or
    the epilogue's per-key-warp (m, l, O) in float32 if larger."""
    main = (cfg.block_rows * (head_dim + 8) + cfg.stages * cfg.block_kv * (head_dim + 8 + head_dim_v + 8)) * 2
    epilogue = cfg.key_warps * cfg.block_rows * (head_dim_v + 4 + 2) * 4
    return max(main, epilogue)


def decode_simt_smem_bytes(head_dim: int, itemsize: int) -> int:
    return (DECODE_SIMT_ROWS + 2 * DECODE_SIMT_BLOCK_KV) * (head_dim + 1) * itemsize


def all_decode_name_expressions() -> list[str]:
    """Every specialization of the KV-cache kernels (``decode.cu``)."""
    names: list[str] = []
    for dtype in ("float16", "bfloat16"):
        for dim, dv in mma_dim_pairs():
            for interval, mods in MASK_FLAGS:
                for paged in (False, True):
                    for max_rows, _ in DECODE_RULES:
                        cfg = decode_config(max_rows, dim, dv, paged)
                        names.append(decode_mma_name(dtype, dim, dv, cfg, interval, mods))
    for dtype in ("float32", "float64"):
        for dim in SIMT_HEAD_DIMS:
            for interval, mods in MASK_FLAGS:
                names.append(decode_simt_name(dtype, dim, interval, mods))
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        names.append(decode_combine_name(dtype))
    for dtype in ("float16", "bfloat16"):
        names.append(kv_append_name(dtype))
    return _unique(names)


def is_decode_name(name: str) -> bool:
    return name.startswith(("fa_decode_", "fa_kv_append"))


# ---------------------------------------------------------------------------------------------
# the backward pass (flash_bwd.cu)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BwdMmaConfig:
    """Tiles of ``fa_bwd_mma``: ``warps`` warps of 16 * ``m_tiles`` keys (block_kv keys a block), query
    tiles of ``block_q`` rows."""

    warps: int
    m_tiles: int
    block_q: int

    @property
    def block_kv(self) -> int:
        return 16 * self.m_tiles * self.warps


@dataclasses.dataclass(frozen=True)
class BwdDqConfig:
    """Tiles of ``fa_bwd_dq_mma`` (deterministic dQ): ``warps`` warps of 16 * ``m_tiles`` query rows,
    key tiles of ``block_kv``."""

    warps: int
    m_tiles: int
    block_kv: int

    @property
    def block_q(self) -> int:
        return 16 * self.m_tiles * self.warps


#: fa_bwd_mma tiles per padded q/k head_dim: 8 warps of 16 keys (dK and dV of 16 keys stay in registers);
#: 128-row query tiles up to d = 64 (measured on the H100: +10 % over 64 rows at d = 64, N 4k-16k), 64 rows at
#: d = 96 / 128 (S and dP of 128 rows would not fit the registers beside dK and dV); 4 warps and 32-row
#: tiles for 192 / 256
BWD_MMA_CONFIGS: dict[int, BwdMmaConfig] = {
    32: BwdMmaConfig(8, 1, 128), 64: BwdMmaConfig(8, 1, 128), 96: BwdMmaConfig(8, 1, 64),
    128: BwdMmaConfig(8, 1, 64), 192: BwdMmaConfig(4, 1, 32), 256: BwdMmaConfig(4, 1, 32),
}
#: the tiles where a block may not have the shared memory of BWD_MMA_CONFIGS (an A100's 163 KB: d = 64, 128)
BWD_MMA_SMALL_CONFIGS: dict[int, BwdMmaConfig] = {64: BwdMmaConfig(8, 1, 64), 128: BwdMmaConfig(8, 1, 32)}


def bwd_mma_config(head_dim: int, head_dim_v: int, smem_limit: int) -> BwdMmaConfig:
    """The fa_bwd_mma tiles of a padded head_dim on a device whose blocks may take ``smem_limit`` bytes."""
    cfg = BWD_MMA_CONFIGS[head_dim]
    if bwd_mma_smem_bytes(head_dim, head_dim_v, cfg) > smem_limit and head_dim in BWD_MMA_SMALL_CONFIGS:
        cfg = BWD_MMA_SMALL_CONFIGS[head_dim]
    return cfg


@dataclasses.dataclass(frozen=True)
class BwdSplitConfig:
    """Tiles of ``fa_bwd_split_mma`` (FlashAttention-2's warp layouts): ``warps`` warps, key tiles of
    ``block_kv``, query tiles of ``block_q``; S / dP split ``wq_s`` (queries) x warps / wq_s (keys), dK / dV
    ``wk_dkv`` (keys) x warps / wk_dkv (columns), dQ ``wq_dq`` (queries) x warps / wq_dq (columns)."""

    warps: int
    block_q: int
    block_kv: int
    wq_s: int
    wk_dkv: int
    wq_dq: int


#: fa_bwd_split_mma tiles per padded head_dim (q/k and v alike; FlashAttention-2's sm80 choices)
BWD_SPLIT_CONFIGS: dict[int, BwdSplitConfig] = {
    64: BwdSplitConfig(8, 128, 128, 2, 4, 4), 128: BwdSplitConfig(8, 64, 128, 2, 4, 2),
}


def bwd_split_config(head_dim: int, head_dim_v: int, smem_limit: int) -> BwdSplitConfig | None:
    """The fa_bwd_split_mma tiles of padded head dims, or None where fa_bwd_mma serves the call."""
    cfg = BWD_SPLIT_CONFIGS.get(head_dim) if head_dim == head_dim_v else None
    if cfg is None or bwd_split_smem_bytes(head_dim, head_dim_v, cfg) > smem_limit:
        return None
    return cfg


def bwd_split_name(dtype: str, head_dim: int, head_dim_v: int, cfg: BwdSplitConfig, interval: bool, mods: bool,
                   dropout: bool, vec: bool) -> str:
    interval, mods, dropout = kernel_flags(interval, mods, dropout)
    return (f"fa_bwd_split_mma<{_CXX_TYPE[dtype]}, {head_dim}, {head_dim_v}, {cfg.warps}, {cfg.block_q}, "
            f"{cfg.block_kv}, {cfg.wq_s}, {cfg.wk_dkv}, {cfg.wq_dq}, {_b(interval)}, {_b(mods)}, {_b(dropout)}, "
            f"{_b(vec)}>")


def bwd_split_smem_bytes(head_dim: int, head_dim_v: int, cfg: BwdSplitConfig) -> int:
    """K, V of the block, two stages of Q and dO, P and dS', two stages of the tile's lse and D, the tile's
    dQ in float32 (the bulk reductions of sm_90) (rows padded by 8)."""
    bkv, bq = cfg.block_kv, cfg.block_q
    halves = bkv * (head_dim + 8) + bkv * (head_dim_v + 8) + 2 * bq * (head_dim + 8) + 2 * bq * (head_dim_v + 8)
    return (halves + 2 * bq * (bkv + 8)) * 2 + (4 * bq + bq * (head_dim + 8)) * 4


#: fa_bwd_dq_mma tiles per padded q/k head_dim
BWD_DQ_CONFIGS: dict[int, BwdDqConfig] = {
    32: BwdDqConfig(4, 1, 64), 64: BwdDqConfig(4, 1, 64), 96: BwdDqConfig(4, 1, 64),
    128: BwdDqConfig(4, 1, 64), 192: BwdDqConfig(4, 1, 32), 256: BwdDqConfig(4, 1, 32),
}
#: SIMT backward tiles per (dtype, padded head_dim): (rows, cols) = (keys, queries) of fa_bwd_simt_kv and
#: (queries, keys) of fa_bwd_simt_q, four threads a row
BWD_SIMT_CONFIGS: dict[tuple[str, int], tuple[int, int]] = {
    ("float32", 32): (32, 32), ("float32", 64): (32, 32), ("float32", 128): (32, 32), ("float32", 256): (32, 16),
    ("float64", 32): (32, 32), ("float64", 64): (32, 32), ("float64", 128): (32, 16), ("float64", 256): (16, 16),
}


def bwd_mma_name(dtype: str, head_dim: int, head_dim_v: int, cfg: BwdMmaConfig, interval: bool, mods: bool,
                 dropout: bool, vec: bool) -> str:
    interval, mods, dropout = kernel_flags(interval, mods, dropout)
    return (f"fa_bwd_mma<{_CXX_TYPE[dtype]}, {head_dim}, {head_dim_v}, {cfg.warps}, {cfg.m_tiles}, {cfg.block_q}, "
            f"{_b(interval)}, {_b(mods)}, {_b(dropout)}, {_b(vec)}>")


def bwd_dq_name(dtype: str, head_dim: int, head_dim_v: int, cfg: BwdDqConfig, interval: bool, mods: bool,
                dropout: bool, vec: bool) -> str:
    interval, mods, dropout = kernel_flags(interval, mods, dropout)
    return (f"fa_bwd_dq_mma<{_CXX_TYPE[dtype]}, {head_dim}, {head_dim_v}, {cfg.warps}, {cfg.m_tiles}, "
            f"{cfg.block_kv}, {_b(interval)}, {_b(mods)}, {_b(dropout)}, {_b(vec)}>")


def bwd_simt_names(dtype: str, head_dim: int, interval: bool, mods: bool) -> tuple[str, str]:
    """(fa_bwd_simt_kv, fa_bwd_simt_q) of a float32 / float64 call."""
    interval, mods, _ = kernel_flags(interval, mods, False)
    rows, cols = BWD_SIMT_CONFIGS[(dtype, head_dim)]
    t, lt = _CXX_TYPE[dtype], _LSE_TYPE[dtype]
    flags = f"{_b(interval)}, {_b(mods)}"
    return (f"fa_bwd_simt_kv<{t}, {lt}, {head_dim}, {rows}, {cols}, {flags}>",
            f"fa_bwd_simt_q<{t}, {lt}, {head_dim}, {rows}, {cols}, {flags}>")


def bwd_prep_name(dtype: str) -> str:
    return f"fa_bwd_prep<{_CXX_TYPE[dtype]}, {_LSE_TYPE.get(dtype, 'float')}>"


def bwd_convert_name(dtype: str) -> str:
    return f"fa_bwd_dq_convert<{_CXX_TYPE[dtype]}>"


def bwd_mma_smem_bytes(head_dim: int, head_dim_v: int, cfg: BwdMmaConfig) -> int:
    """K, V of the block, two stages of Q and dO, two dS^T buffers, two stages of the tile's lse and D (rows
    padded by 8)."""
    bkv, bq = cfg.block_kv, cfg.block_q
    halves = bkv * (head_dim + 8) + bkv * (head_dim_v + 8) + 2 * bq * (head_dim + 8) + 2 * bq * (head_dim_v + 8)
    return (halves + 2 * bkv * (bq + 8)) * 2 + 4 * bq * 4


def bwd_dq_smem_bytes(head_dim: int, head_dim_v: int, cfg: BwdDqConfig) -> int:
    """Q, dO of the block, two stages of K and V (rows padded by 8)."""
    bq, bkv = cfg.block_q, cfg.block_kv
    return (bq * (head_dim + 8) + bq * (head_dim_v + 8) + 2 * bkv * (head_dim + 8) + 2 * bkv * (head_dim_v + 8)) * 2


def bwd_simt_smem_bytes(dtype: str, head_dim: int) -> tuple[int, int]:
    """Shared memory of (fa_bwd_simt_kv, fa_bwd_simt_q): the four tiles, rows x (cols + 1) of P and dS' (one of
    them in fa_bwd_simt_q), fa_bwd_simt_kv's per-query lse, D and local rows' sum of P."""
    rows, cols = BWD_SIMT_CONFIGS[(dtype, head_dim)]
    itemsize = 8 if dtype == "float64" else 4
    tiles = (2 * rows + 2 * cols) * (head_dim + 1)
    return ((tiles + 2 * rows * (cols + 1) + 3 * cols) * itemsize, (tiles + rows * (cols + 1)) * itemsize)


def all_bwd_name_expressions() -> list[str]:
    """Every specialization of the backward pass (``flash_bwd.cu``; CI compiles each one)."""
    names: list[str] = []
    for dtype in ("float16", "bfloat16"):
        names += [bwd_prep_name(dtype), bwd_convert_name(dtype)]
        for dim, dv in mma_dim_pairs():
            for interval, mods in MASK_FLAGS:
                for dropout in (False, True):
                    for vec in (False, True):
                        for cfg in (BWD_MMA_CONFIGS[dim], BWD_MMA_SMALL_CONFIGS.get(dim)):
                            if cfg is not None:
                                names.append(bwd_mma_name(dtype, dim, dv, cfg, interval, mods, dropout, vec))
                        names.append(bwd_dq_name(dtype, dim, dv, BWD_DQ_CONFIGS[dim], interval, mods, dropout, vec))
                        if dim == dv and dim in BWD_SPLIT_CONFIGS:
                            names.append(bwd_split_name(dtype, dim, dv, BWD_SPLIT_CONFIGS[dim], interval, mods,
                                                        dropout, vec))
    for dtype in ("float32", "float64"):
        names.append(bwd_prep_name(dtype))
        for dim in SIMT_HEAD_DIMS:
            for interval, mods in MASK_FLAGS:
                names += bwd_simt_names(dtype, dim, interval, mods)
    return _unique(names)


def is_bwd_name(name: str) -> bool:
    return name.startswith("fa_bwd_")


#: fa_bwd_sm90 (the Hopper backward): 128 keys a block (two warpgroups of 64), query tiles per padded head
#: dim (q/k and v alike): the dQ product gives each warpgroup 64 x 64 (rows split at 128, columns at 64)
BWD_SM90_BLOCK_KV = 128
BWD_SM90_BLOCK_Q: dict[int, int] = {64: 128, 128: 64}
#: the mask flags (interval, mods) a call may take fa_bwd_sm90 with (each measured against fa_bwd_split_mma)
BWD_SM90_FLAGS: frozenset[tuple[bool, bool]] = frozenset(MASK_FLAGS)


def bwd_sm90_name(dtype: str, head_dim: int, interval: bool, mods: bool) -> str:
    interval, mods, _ = kernel_flags(interval, mods, False)
    return (f"fa_bwd_sm90<{_b(dtype == 'bfloat16')}, {head_dim}, {BWD_SM90_BLOCK_Q[head_dim]}, {_b(interval)}, "
            f"{_b(mods)}>")


def bwd_sm90_smem_bytes(head_dim: int) -> int:
    """K and V, two stages of Q and dO, dS'^T (16-bit, swizzled), the tile's dQ in float32 (rows padded by
    8), two stages of lse and D; 1024 bytes to align the swizzled tiles."""
    bq, bkv = BWD_SM90_BLOCK_Q[head_dim], BWD_SM90_BLOCK_KV
    return 1024 + (2 * bkv * head_dim + 4 * bq * head_dim + bkv * bq) * 2 + bq * (head_dim + 8) * 4 + 4 * bq * 4


def bwd_sm90_serves(head_dim: int, head_dim_v: int, interval: bool, mods: bool) -> bool:
    """Padded head dims and mask flags fa_bwd_sm90 serves (the launcher adds: compute capability 9.0,
    16-byte rows, no dropout, no dbias, dQ through the float32 buffer)."""
    return head_dim == head_dim_v and head_dim in BWD_SM90_BLOCK_Q and kernel_flags(interval, mods, False)[
        :2] in BWD_SM90_FLAGS


def all_sm90_bwd_name_expressions() -> list[str]:
    """Every specialization of the Hopper backward (``flash_bwd_sm90.cu``, compiled for sm_90a only)."""
    return [bwd_sm90_name(dtype, dim, interval, mods) for dtype in ("float16", "bfloat16")
            for dim in BWD_SM90_BLOCK_Q for interval, mods in MASK_FLAGS]


def source_of(name: str) -> str:
    """The kernel source file that holds a name expression."""
    if is_decode_name(name):
        return KERNEL_SOURCE_DECODE
    if name.startswith("fa_bwd_sm90<"):
        return KERNEL_SOURCE_SM90_BWD
    if is_bwd_name(name):
        return KERNEL_SOURCE_BWD
    return KERNEL_SOURCE_SM90 if is_sm90_name(name) else KERNEL_SOURCE


def is_sm90_name(name: str) -> bool:
    return name.startswith(("fa_fwd_sm90<", "fa_v_nonfinite<", "fa_bwd_sm90<"))


def kernel_source(source: str = KERNEL_SOURCE) -> str:
    """A kernel source with its local headers inlined (one string, so caches key on all of it)."""
    text = (KERNEL_DIR / source).read_text()
    for header in KERNEL_HEADERS:
        text = text.replace(f'#include "{header}"', (KERNEL_DIR / header).read_text())
    return text
