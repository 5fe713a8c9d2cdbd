"""Context-parallel (ring) attention over ``torch.distributed``: gloo between CPU processes, NCCL between GPUs.

Each of W ranks holds a shard of one sequence: its queries and the keys/values of the same positions.
The K/V shards travel around the ring while every rank attends its queries to the shard in hand; the
partial results merge exactly by their log-sum-exp, so each rank ends with its shard of exact attention
over the whole sequence::

    step 0           step 1           step 2            (W = 3; rank r holds K/V of rank (r - step) mod W)
    r0: Q0·KV0       r0: Q0·KV2       r0: Q0·KV1
    r1: Q1·KV1       r1: Q1·KV0       r1: Q1·KV2        KV shards move r -> r+1 while the step computes
    r2: Q2·KV2       r2: Q2·KV1       r2: Q2·KV0

    out_r = merge over steps:  lse = log Σ_s exp(lse_s),  out = Σ_s exp(lse_s - lse) · out_s

Causal attention with the zigzag split: the sequence is cut into 2W chunks and rank r holds chunks r and
2W-1-r, so that every rank has the same number of visible (query, key) pairs.  Every pair of a query chunk and
a key chunk is classified from the chunks' global positions: fully visible (one unmasked call), partially
visible (one call with the band re-expressed in the block's local coordinates: causal or a window), or hidden
(skipped); no mask is ever materialized.

Backward (``torch.autograd.Function``): the forward's global ``out`` and ``lse`` are saved; each block's
gradients come from ``fastattn.flash_attention_backward`` given the block's q, k, v, the *global* out and lse
and dout.  That is exact: with P = exp(S - lse_global) (the global softmax restricted to the block) and
D = rowsum(dO ∘ O_global), dS = P ∘ (dO·Vᵀ - D) on the block, dQ = Σ_blocks dS·K·scale and
dK_block = dSᵀ·Q·scale, dV_block = Pᵀ·dO.  dQ accumulates locally; dK/dV accumulate in a buffer that travels
the ring with the K/V shard it belongs to and reaches its owner after W hops.

Communication: ``torch.distributed.batch_isend_irecv`` with the next shard in flight while the current one is
computed.  On CUDA the exchanges are issued on a side stream that waits for the compute stream through an event;
the compute stream waits for the exchange through another event: the host never synchronizes (``_CudaRing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import fastattn

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard"]

_LOAD_BALANCES = ("zigzag", "contiguous")
_TAG_KV = 0       # K/V shards moving forward around the ring
_TAG_DKV = 1      # dK/dV accumulators moving with them in the backward


# ----------------------------------------------------------------------------------------------------------------
# Sharding


def _seq_dim(x: Any, seq_dim: int) -> int:
    if not -x.ndim <= seq_dim < x.ndim:
        raise ValueError(f"seq_dim={seq_dim} is out of range for a tensor of rank {x.ndim}")
    return seq_dim % x.ndim


def zigzag_shard(x: torch.Tensor, world_size: int, rank: int, seq_dim: int = -2) -> torch.Tensor:
    """Rank ``rank``'s zigzag shard of the full sequence ``x`` (sequence along ``seq_dim``; -2 suits the
    (batch, heads, seq, dim) layout, 1 the (batch, seq, heads, dim) layout).

    The sequence is cut into ``2 * world_size`` equal chunks; rank r gets chunks r and 2W-1-r, concatenated.
    The length must divide by ``2 * world_size`` (ValueError otherwise: pad the sequence yourself; under a causal
    mask padding at the end changes no earlier token)."""
    _check_world(world_size, rank)
    dim = _seq_dim(x, seq_dim)
    n = x.shape[dim]
    if n % (2 * world_size):
        raise ValueError(f"zigzag_shard: a sequence of {n} tokens does not split into 2 * world_size = "
                         f"{2 * world_size} equal chunks; pad it to a multiple of {2 * world_size}")
    c = n // (2 * world_size)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world_size - 1 - rank) * c, c)], dim=dim)


def zigzag_unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], seq_dim: int = -2) -> torch.Tensor:
    """The full sequence back from the W zigzag shards (in rank order): the inverse of :func:`zigzag_shard`.
    For a log-sum-exp (…, heads, seq) use ``seq_dim=-1``."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError("zigzag_unshard needs a non-empty list of shards, in rank order")
    dim = _seq_dim(shards[0], seq_dim)
    lens = {s.shape[dim] for s in shards}
    if len(lens) != 1 or next(iter(lens)) % 2:
        raise ValueError(f"zigzag_unshard: every shard must have one even length along dim {dim}; "
                         f"got {[s.shape[dim] for s in shards]}")
    c = next(iter(lens)) // 2
    first = [s.narrow(dim, 0, c) for s in shards]
    second = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(first + second, dim=dim)


def _check_world(world_size: int, rank: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


# ----------------------------------------------------------------------------------------------------------------
# The block plan: which (query range, key range) pairs of one step are computed, and with which mask


@dataclass(frozen=True)
class _Segment:
    """A run of tokens of one shard: ``length`` tokens at local offset ``local``, global positions from ``start``."""

    local: int
    start: int
    length: int


@dataclass(frozen=True)
class _Block:
    """One fastattn call: local query rows [q0, q0+nq) against local keys [k0, k0+nk) of the shard in hand."""

    q0: int
    nq: int
    k0: int
    nk: int
    causal: bool
    window: tuple[int, int] | None


def _segments(load_balance: str, world: int, rank: int, local_len: int) -> tuple[_Segment, ...]:
    if load_balance == "contiguous":
        return (_Segment(0, rank * local_len, local_len),)
    c = local_len // 2
    return (_Segment(0, rank * c, c), _Segment(c, (2 * world - 1 - rank) * c, c))


def _pair_block(qs: _Segment, ks: _Segment, causal: bool, left: int, right: int) -> _Block | None | str:
    """The call for query segment ``qs`` against key segment ``ks``: None if no pair is visible, "full" if every
    pair is, else the block with its band in local coordinates.

    Globally query i sees key j iff  j - i <= 0 (causal),  j - i >= -left,  j - i <= right  (-1 = unbounded).
    With i = qs.start + a, j = ks.start + b and d = qs.start - ks.start that is  lo <= b - a <= hi  with
    lo = d - left, hi = min(d + right, d if causal).  Rows a < -hi see no key of the block and keys b < lo
    (after the row shift) no row: both are cut off, which leaves a band [-wl, wr] with wl, wr >= 0 (or
    unbounded) -- exactly fastattn's ``window`` (``causal=True`` for (-1, 0))."""
    d = qs.start - ks.start
    lo = d - left if left >= 0 else -math.inf
    his = [d + right if right >= 0 else math.inf, d if causal else math.inf]
    hi = min(his)
    nq, nk = qs.length, ks.length
    if nq == 0 or nk == 0 or lo > hi or hi < -(nq - 1) or lo > nk - 1:
        return None
    if lo <= -(nq - 1) and hi >= nk - 1:
        return "full"
    sq = int(max(0, -hi)) if hi != math.inf else 0
    lo, hi = lo + sq, hi + sq
    sk = int(max(0, lo)) if lo != -math.inf else 0
    lo, hi = lo - sk, hi - sk
    nq, nk = nq - sq, nk - sk
    if lo != -math.inf:        # rows past nk - 1 - lo see no key of the block
        nq = min(nq, int(nk - lo))
    if hi != math.inf:         # keys past nq - 1 + hi are seen by no row
        nk = min(nk, int(nq + hi))
    wl = -1 if lo == -math.inf else int(-lo)
    wr = -1 if hi == math.inf else int(hi)
    if wl == -1 and wr == 0:
        return _Block(qs.local + sq, nq, ks.local + sk, nk, True, None)
    window = None if (wl, wr) == (-1, -1) else (wl, wr)
    return _Block(qs.local + sq, nq, ks.local + sk, nk, False, window)


def _plan(q_segs: tuple[_Segment, ...], k_segs: tuple[_Segment, ...], causal: bool,
          window: tuple[int, int]) -> list[_Block]:
    """The calls of one step, fully visible pairs joined into larger calls where they tile a whole shard side
    (the segments of a shard are adjacent and in order, so the whole shard is one range)."""
    left, right = window
    pairs = {(a, b): _pair_block(qa, kb, causal, left, right)
             for a, qa in enumerate(q_segs) for b, kb in enumerate(k_segs)}
    nq_all = sum(s.length for s in q_segs)
    nk_all = sum(s.length for s in k_segs)
    if all(p == "full" for p in pairs.values()):
        return [_Block(0, nq_all, 0, nk_all, False, None)]
    blocks: list[_Block] = []
    done: set[tuple[int, int]] = set()
    for b, kb in enumerate(k_segs):          # a key segment every query segment sees whole
        if len(q_segs) > 1 and all(pairs[(a, b)] == "full" for a in range(len(q_segs))):
            blocks.append(_Block(0, nq_all, kb.local, kb.length, False, None))
            done.update((a, b) for a in range(len(q_segs)))
    for a, qa in enumerate(q_segs):          # a query segment that sees every key segment whole
        row = [(a, b) for b in range(len(k_segs))]
        if len(k_segs) > 1 and not done.intersection(row) and all(pairs[p] == "full" for p in row):
            blocks.append(_Block(qa.local, qa.length, 0, nk_all, False, None))
            done.update(row)
    for (a, b), p in pairs.items():
        if (a, b) in done or p is None:
            continue
        if p == "full":
            blocks.append(_Block(q_segs[a].local, q_segs[a].length, k_segs[b].local, k_segs[b].length, False, None))
        else:
            blocks.append(p)
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Communication: one exchange per step with the ring's neighbours


class _Ring:
    """P2P exchanges with the next and previous rank of the group (CPU / gloo: plain asynchronous work objects)."""

    def __init__(self, group: Any, rank: int, world: int) -> None:
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def _ops(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> list:
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t, tag in recvs]
        return ops

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> Any:
        """Posts the sends to the next rank and the receives from the previous one; returns a handle."""
        works = dist.batch_isend_irecv(self._ops(sends, recvs))
        return works, sends, recvs   # the tensors stay referenced until the exchange is waited for

    def wait(self, handle: Any) -> None:
        for w in handle[0]:
            w.wait()

    def compute(self) -> Any:
        """A context in which fastattn's kernels run on the compute stream (nothing to do on the CPU)."""
        return _nullcontext()


class _CudaRing(_Ring):
    """NCCL: every exchange is issued on a side stream that first waits for the compute stream (an event), and
    the compute stream waits for the exchange's end through another event.  ``work.wait()`` on an NCCL work only
    makes the current (side) stream wait; nothing blocks the host.  fastattn's CuPy kernels are launched on
    torch's current stream (``compute``), so compute and communication order only through these events."""

    def __init__(self, group: Any, rank: int, world: int, device: torch.device) -> None:
        super().__init__(group, rank, world)
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> Any:
        compute = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event()
        ready.record(compute)                 # the send buffers are written, the receive buffers free
        self.side.wait_event(ready)
        with torch.cuda.stream(self.side):
            works = dist.batch_isend_irecv(self._ops(sends, recvs))
            for w in works:
                w.wait()                      # the side stream waits for NCCL's stream, not the host
            finished = torch.cuda.Event()
            finished.record(self.side)
        for t, _ in sends + recvs:            # the caching allocator must not hand these out before the side
            t.record_stream(self.side)        # stream is done with them
        return finished, sends, recvs

    def wait(self, handle: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle[0])

    def compute(self) -> Any:
        import cupy

        return cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Validation: every rank reaches one small all_gather and raises the same error, so nobody hangs


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FIELDS = ("q.shape", "k.shape", "v.shape", "dtype", "device type", "layout", "causal", "window", "softcap",
           "scale", "load_balance")


def _backend_devices(group: Any) -> dict[str, str]:
    """{device type: backend name} the group serves, e.g. {"cpu": "gloo", "cuda": "nccl"}."""
    getter = getattr(dist, "get_backend_config", None)
    try:
        text = str(getter(group)) if getter is not None else str(dist.get_backend(group))
    except (RuntimeError, ValueError, AttributeError):   # a group type without a device map: its backend name
        text = str(dist.get_backend(group))
    found: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip().lower()
        if ":" in part:
            dev, name = part.split(":", 1)
            found[dev] = name
        elif part == "nccl":
            found["cuda"] = part
        elif part:
            found.setdefault("cpu", part)
            found.setdefault("cuda", part)
    return found


def _local_problem(q: Any, k: Any, v: Any, layout: str, load_balance: str, world: int,
                   backends: dict[str, str], causal: Any, window: Any, softcap: Any = 0.0,
                   scale: Any = None) -> str | None:
    """What is wrong with this rank's inputs on their own (None if nothing)."""
    if causal not in (False, True, "top_left", "bottom_right"):
        return f"causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}"
    if window is not None and not (isinstance(window, (tuple, list)) and len(window) == 2
                                   and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                                           for w in window)):
        return f"window must be (left, right) ints >= -1 (-1 = unbounded) or None; got {window!r}"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(x).__name__}"
    if layout not in ("bhsd", "bshd"):
        return f"layout must be 'bhsd' or 'bshd', got {layout!r}"
    if load_balance not in _LOAD_BALANCES:
        return f"load_balance must be one of {_LOAD_BALANCES}, got {load_balance!r}"
    lo = 2 if layout == "bhsd" else 3
    if not (q.ndim == k.ndim == v.ndim and lo <= q.ndim <= 4):
        return (f"q, k and v must share one rank in [{lo}, 4] for layout {layout!r}; got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if len({q.device, k.device, v.device}) != 1:
        return f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}"
    dev = q.device.type
    if dev not in ("cpu", "cuda"):
        return f"ring_attention runs on CPU or CUDA tensors; got device {q.device}"
    want = "gloo" if dev == "cpu" else "nccl"
    if backends.get(dev) != want:
        served = ", ".join(f"{d}: {b}" for d, b in backends.items()) or "nothing"
        return (f"{dev} tensors need a process group with the {want} backend for {dev}; this group serves "
                f"{served} (init_process_group(backend='{want}') or backend='cpu:gloo,cuda:nccl')")
    sd = q.ndim - 2 if layout == "bhsd" else q.ndim - 3
    n = q.shape[sd]
    if k.shape[sd] != n or v.shape[sd] != n:
        return (f"q, k and v must hold the same tokens (one local length); got {n}, {k.shape[sd]}, "
                f"{v.shape[sd]} along the sequence axis")
    hd = q.ndim - 3 if layout == "bhsd" else q.ndim - 2          # the heads axis (absent for 2-D bhsd)
    heads = q.shape[hd] if hd >= 0 else 1
    heads_kv = k.shape[hd] if hd >= 0 else 1
    if k.shape[-1] != q.shape[-1] or (hd >= 0 and v.shape[hd] != heads_kv) or heads % heads_kv \
            or q.shape[:max(hd, 0)] != k.shape[:max(hd, 0)] or v.shape[:max(hd, 0)] != k.shape[:max(hd, 0)]:
        return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together (layout {layout!r}): "
                f"q and k share their head dim, k and v their heads, the batch is shared and heads % heads_kv == 0")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        return f"softcap must be a finite number >= 0 (0 = off); got {softcap!r}"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return f"scale must be a finite number or None; got {scale!r}"
    if load_balance == "zigzag" and world > 1 and n % 2:
        return (f"load_balance='zigzag' needs an even local length (two chunks per rank); got {n}. "
                f"Shard a sequence whose length divides by 2 * world_size with zigzag_shard (pad it), "
                f"or use load_balance='contiguous'")
    return None


def _meta(q: Any, k: Any, v: Any, layout: str, causal: Any, window: Any, softcap: Any, scale: Any,
          load_balance: str) -> list[int]:
    """What must agree across ranks, as integers (shapes padded to rank 4 with -1)."""
    def shape(x: Any) -> list[int]:
        s = list(x.shape) if isinstance(x, torch.Tensor) else []
        return [-1] * (4 - len(s)) + s[-4:]

    dt = _DTYPES.index(q.dtype) if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else -1
    devt = ["cpu", "cuda"].index(q.device.type) if isinstance(q, torch.Tensor) and q.device.type in ("cpu", "cuda") \
        else -1
    win = [int(w) for w in window] if isinstance(window, (tuple, list)) and len(window) == 2 \
        and all(isinstance(w, int) for w in window) else [-2, -2]
    fbits = [int(torch.tensor(float(x), dtype=torch.float64).view(torch.int64)) if isinstance(x, (int, float))
             else -1 for x in (softcap, -1.0 if scale is None else scale)]
    return [*shape(q), *shape(k), *shape(v), dt, devt, ["bhsd", "bshd"].index(layout) if layout in
            ("bhsd", "bshd") else -1, 1 if causal in (True, "top_left", "bottom_right") else 0, *win, *fbits,
            _LOAD_BALANCES.index(load_balance) if load_balance in _LOAD_BALANCES else -1]


def _field_slices() -> list[tuple[str, slice]]:
    sizes = (4, 4, 4, 1, 1, 1, 1, 2, 1, 1, 1)
    out, at = [], 0
    for name, n in zip(_FIELDS, sizes, strict=True):
        out.append((name, slice(at, at + n)))
        at += n
    return out


def _agree(group: Any, world: int, backends: dict[str, str], problem: str | None, meta: list[int]) -> None:
    """One all_gather of (ok, meta) on the device the group's backend serves; raises the same ValueError on every
    rank if any rank's inputs are bad or if the ranks' shapes/options differ."""
    dev = torch.device("cpu") if "cpu" in backends else torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([0 if problem else 1, *meta], dtype=torch.int64, device=dev)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [t.tolist() for t in everyone]          # one host read of a few integers, before any work
    bad = [r for r, row in enumerate(rows) if row[0] == 0]
    if problem:
        raise ValueError(f"ring_attention: {problem}")
    if bad:
        raise ValueError(f"ring_attention: rank(s) {bad} rejected their inputs (see the error there); no rank "
                         f"did any work")
    for name, sl in _field_slices():
        vals = [tuple(row[1:][sl]) for row in rows]
        if len(set(vals)) > 1:
            if name in ("q.shape", "k.shape", "v.shape"):
                shown = [tuple(x for x in v if x != -1) for v in vals]
                raise ValueError(f"ring_attention: {name} differs across ranks: {shown} (rank order); every rank "
                                 f"must pass a shard of the same local length and shape (zigzag_shard splits a "
                                 f"sequence evenly)")
            raise ValueError(f"ring_attention: {name} differs across ranks; every rank must call with the same "
                             f"dtype, device type and options")


# ----------------------------------------------------------------------------------------------------------------
# Forward and backward on one rank


@dataclass
class _Call:
    """Everything one ring call needs besides the tensors; built once, shared by forward and backward."""

    ring: _Ring | None
    rank: int
    world: int
    layout: str
    seq_dim: int
    causal: bool
    window: tuple[int, int]
    softcap: float
    scale: float
    load_balance: str
    num_threads: int | None

    def segments(self, owner: int, n: int) -> tuple[_Segment, ...]:
        lb = "contiguous" if self.world == 1 else self.load_balance
        return _segments(lb, self.world, owner, n)

    def blocks(self, src: int, n: int) -> list[_Block]:
        return _plan(self.segments(self.rank, n), self.segments(src, n), self.causal, self.window)

    def options(self, b: _Block) -> dict:
        opts: dict = dict(causal=b.causal, window=b.window, softcap=self.softcap, scale=self.scale,
                          layout=self.layout)
        if self.num_threads is not None:
            opts["num_threads"] = self.num_threads
        return opts

    def rows(self, x: torch.Tensor, at: int, n: int) -> torch.Tensor:
        return x.narrow(self.seq_dim, at, n)

    def lse_as_out(self, lse: torch.Tensor) -> torch.Tensor:
        """lse (…, heads, seq) broadcast against an output in the call's layout."""
        if self.layout == "bshd":
            lse = lse.transpose(-1, -2)
        return lse.unsqueeze(-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pack(*xs: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _unpack(buf: torch.Tensor, likes: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out, at = [], 0
    for like in likes:
        out.append(buf[at:at + like.numel()].view(like.shape))
        at += like.numel()
    return out


def _merge_into(call: _Call, acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """acc ← exact merge of acc and a partial result over disjoint keys (in place, in the accumulator dtype):
    lse = log(e^lse_acc + e^lse_new), out = e^(lse_acc - lse)·out_acc + e^(lse_new - lse)·out_new."""
    lse = lse.to(acc_lse.dtype)
    new = torch.logaddexp(acc_lse, lse)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)   # rows with no key yet: weights 0, not NaN
    w_acc = torch.exp(acc_lse - ref)
    w_new = torch.exp(lse - ref)
    acc_out.mul_(call.lse_as_out(w_acc)).addcmul_(out, call.lse_as_out(w_new))
    acc_lse.copy_(new)


def _take_fresh(fresh: list[tuple[int, int]], a: int, b: int) -> bool:
    """Whether rows [a, b) lie in one never-written interval of ``fresh`` (then they are taken out of it): a
    block's first result there is copied, not merged (a merge into the zero / -inf start would give the same)."""
    for i, (lo, hi) in enumerate(fresh):
        if lo <= a and b <= hi:
            fresh[i:i + 1] = [iv for iv in ((lo, a), (b, hi)) if iv[0] < iv[1]]
            return True
    return False


def _forward(call: _Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = q.shape[call.seq_dim]
    acc = _acc_dtype(q.dtype)
    out_shape = list(q.shape)
    out_shape[-1] = v.shape[-1]
    acc_out = torch.zeros(out_shape, dtype=acc, device=q.device)
    lse_shape = list(q.shape[:-1])
    if call.layout == "bshd":
        lse_shape[-1], lse_shape[-2] = lse_shape[-2], lse_shape[-1]
    acc_lse = torch.full(lse_shape, -math.inf, dtype=acc, device=q.device)
    buf = _pack(k, v) if call.world > 1 else None
    fresh = [(0, n)]                               # rows no block has written yet
    for step in range(call.world):
        src = (call.rank - step) % call.world
        handle = nxt = None
        if step + 1 < call.world:
            nxt = torch.empty_like(buf)
            handle = call.ring.start([(buf, _TAG_KV)], [(nxt, _TAG_KV)])
        kc, vc = (k, v) if step == 0 else _unpack(buf, (k, v))
        with call.ring.compute() if call.ring is not None else _nullcontext():
            for b in call.blocks(src, n):
                o, l_ = fastattn.flash_attention(call.rows(q, b.q0, b.nq), call.rows(kc, b.k0, b.nk),
                                                 call.rows(vc, b.k0, b.nk), return_lse=True, **call.options(b))
                if _take_fresh(fresh, b.q0, b.q0 + b.nq):
                    call.rows(acc_out, b.q0, b.nq).copy_(o)
                    acc_lse.narrow(-1, b.q0, b.nq).copy_(l_)
                else:
                    _merge_into(call, call.rows(acc_out, b.q0, b.nq), acc_lse.narrow(-1, b.q0, b.nq), o, l_)
        if handle is not None:
            call.ring.wait(handle)
            buf = nxt
    return acc_out.to(q.dtype), acc_lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _backward(call: _Call, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ accumulates here; the dK/dV accumulator of the shard in hand is received from the previous rank (the
    sum of its earlier holders' blocks), this rank's blocks are added, and it is sent on with the next exchange.
    Every exchange is symmetric (all ranks send and receive the same messages), which NCCL's grouped P2P needs:

        exchange t (before step t's compute):  send dKV(step t-1) -> next, recv dKV(for step t) <- prev,
                                                send KV(step t)     -> next, recv KV(step t+1)     <- prev
        exchange W (after the last step):       send dKV(step W-1) -> next (its owner), recv own dKV <- prev
    """
    n = q.shape[call.seq_dim]
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    world = call.world
    buf = _pack(k, v) if world > 1 else None
    dkv_out: torch.Tensor | None = None            # the accumulator finished at the previous step
    dkv_in: torch.Tensor | None = None             # the accumulator arriving for this step
    for step in range(world + (1 if world > 1 else 0)):
        sends, recvs = [], []
        if dkv_out is not None:
            sends.append((dkv_out, _TAG_DKV))
            dkv_in = torch.empty_like(dkv_out)
            recvs.append((dkv_in, _TAG_DKV))
        nxt = None
        if step + 1 < world:
            nxt = torch.empty_like(buf)
            sends.append((buf, _TAG_KV))
            recvs.append((nxt, _TAG_KV))
        handle = call.ring.start(sends, recvs) if sends else None
        if step == world:                          # the last exchange: the owner's own dK/dV comes home
            call.ring.wait(handle)
            dk, dv = _unpack(dkv_in, (k, v))
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        src = (call.rank - step) % world
        kc, vc = (k, v) if step == 0 else _unpack(buf, (k, v))
        dkv_here = torch.zeros(k.numel() + v.numel(), dtype=acc, device=k.device)   # sent as it is: no packing
        dk_here, dv_here = _unpack(dkv_here, (k, v))
        with call.ring.compute() if call.ring is not None else _nullcontext():
            for b in call.blocks(src, n):
                gq, gk, gv = fastattn.flash_attention_backward(
                    call.rows(dout, b.q0, b.nq), call.rows(q, b.q0, b.nq), call.rows(kc, b.k0, b.nk),
                    call.rows(vc, b.k0, b.nk), call.rows(out, b.q0, b.nq), lse.narrow(-1, b.q0, b.nq),
                    **call.options(b))
                call.rows(dq, b.q0, b.nq).add_(gq)
                call.rows(dk_here, b.k0, b.nk).add_(gk)
                call.rows(dv_here, b.k0, b.nk).add_(gv)
        if world == 1:
            return dq.to(q.dtype), dk_here.to(k.dtype), dv_here.to(v.dtype)
        if handle is not None:
            call.ring.wait(handle)
        dkv_out = dkv_here
        if step > 0:
            dkv_out.add_(dkv_in)
        if nxt is not None:
            buf = nxt
    raise AssertionError("unreachable")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _Call) -> tuple:
        out, lse = _forward(call, q.detach(), k.detach(), v.detach())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor, _dlse: Any) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.call, dout.contiguous(), q.detach(), k.detach(), v.detach(), out.detach(), lse)
        return dq, dk, dv, None


# ----------------------------------------------------------------------------------------------------------------
# The public function


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    causal: bool | str = False,
    layout: str = "bhsd",
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    load_balance: str = "zigzag",
    num_threads: int | None = None,
    check: bool = True,
) -> Any:
    """This rank's shard of exact attention over a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` (default: the default process group) calls it with its local shard: q, k, v of one
    local length ``n`` (the same on every rank), in the layout ``"bhsd"`` ((batch, heads, n, dim), or 3-D / 2-D
    without the leading axes) or ``"bshd"`` ((batch, n, heads, dim) or (n, heads, dim)); k/v may have fewer heads
    (GQA: ``heads % heads_kv == 0``) and v its own head dim.  The global sequence has ``world_size * n`` tokens:

    - ``load_balance="zigzag"`` (default): rank r holds chunks r and 2W-1-r of 2W equal chunks
      (:func:`zigzag_shard`); ``n`` must be even.  Under a causal mask every rank then does the same work.
    - ``load_balance="contiguous"``: rank r holds tokens [r·n, (r+1)·n).

    ``causal`` (True, "top_left" or "bottom_right": one meaning for a square sequence), ``window=(left, right)``
    (-1 = unbounded), ``softcap`` and ``scale`` (default 1/sqrt(dim)) mean what they mean in
    :func:`fastattn.flash_attention`, applied to the global positions.  Returns ``out`` in q's shape (last axis
    v's dim), dtype and layout, or ``(out, lse)`` with lse (…, heads, n) float32 (float64 for float64 input),
    not differentiable.  Differentiable in q, k, v: ``out.backward(...)`` runs the ring backward (every rank
    must call it, as for any collective).

    ``check=True`` (default) runs one small all_gather first so that bad input on any rank (local lengths that
    differ, a group whose backend cannot carry these tensors -- NCCL for CPU tensors, gloo for CUDA tensors --,
    shapes or options that differ) raises the same ValueError on every rank instead of hanging; ``check=False``
    skips it (on CUDA it is the call's one host synchronization).  ``num_threads`` is passed to the CPU kernels.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs torch.distributed initialized (init_process_group) on every rank")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("ring_attention: this process is not a member of the group it was given")
    backends = _backend_devices(group) if world > 1 else {"cpu": "gloo", "cuda": "nccl"}
    problem = _local_problem(q, k, v, layout, load_balance, world, backends, causal, window, softcap, scale)
    if world > 1 and check:
        _agree(group, world, backends, problem, _meta(q, k, v, layout, causal, window, softcap, scale, load_balance))
    elif problem:
        raise ValueError(f"ring_attention: {problem}")
    win = (-1, -1) if window is None else window
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seq_dim = q.ndim - 2 if layout == "bhsd" else q.ndim - 3
    ring: _Ring | None = None
    if world > 1:
        ring = _CudaRing(group, rank, world, q.device) if q.device.type == "cuda" else _Ring(group, rank, world)
    call = _Call(ring, rank, world, layout, seq_dim, bool(causal), (int(win[0]), int(win[1])), float(softcap),
                 float(scale), load_balance, num_threads)
    out, lse = _RingAttention.apply(q, k, v, call)
    return (out, lse) if return_lse else out
