"""Backend registry.

    flash_attention(q, k, v, ...)            (fastattn._api: validate once)
              |
              v
    resolve(name, q, k, v) --- "auto" ----> "cuda" if the arrays live on a GPU
              |                             "cpu"  otherwise (compiled kernel)
              v
    backend.forward(q4, k4, v4, spec) -> ForwardOutput(out, lse, stats)

Every backend is a module with the same few names:

    NAME                       registry name
    availability() -> str|None None when usable, else why not (names what is missing)
    prepare(x) -> array        the input as this backend's native array (no copy where possible)
    restore(y, like) -> array  an output moved back to where the caller's input ``like`` lives
    forward(q, k, v, spec)     4-D (batch, heads, seq, head_dim) arrays + a validated spec
    backward(dout, q, k, v, out, lse, spec, *, want_dbias, deterministic) -> BackwardOutput
                               the gradients (optional: a backend without it is refused by name)
    describe() -> dict         facts for fastattn.info()
    check_spec(spec)           raises (ValueError) for a validated call this backend cannot run

Adding a backend is adding a module and a line in ``_MODULES``.  "auto" is resolved here
and only here.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from .._validate import is_gpu_array

_MODULES = {
    "cpu": "fastattn.backends.cpu",
    "cuda": "fastattn.backends.cuda",
    "reference": "fastattn.backends.reference",
}


@dataclasses.dataclass(frozen=True)
class BackendStats:
    """What a backend reports about the tiles it actually used."""

    block_q: int
    block_kv: int
    peak_sram_bytes: int  # per-thread tile working set (CPU) / shared memory per block (CUDA)
    num_threads: int = 1
    simd: str = ""


@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    out: Any  # (batch, heads, seq_q, head_dim), input dtype
    lse: Any  # (batch, heads, seq_q), float32 (float64 for float64 input)
    stats: BackendStats


@dataclasses.dataclass(frozen=True)
class BackwardOutput:
    """What a backend's ``backward`` returns: 4-D arrays in the input dtype, allocated in the caller's
    memory order (like the forward's output).  dk and dv are summed over the query heads of a k/v group.
    dbias: None, or the full (batch, heads, seq_q, seq_kv) gradient of the logits (float32; float64 for
    float64 input); the facade sums it over the mask's broadcast axes."""

    dq: Any  # (batch, heads, seq_q, head_dim)
    dk: Any  # (batch, heads_kv, seq_kv, head_dim)
    dv: Any  # (batch, heads_kv, seq_kv, head_dim_v)
    dbias: Any
    stats: BackendStats


def features(spec: Any) -> list[str]:
    """The variant features a call uses, by name (for a backend to say which it lacks)."""
    rule = spec.rule
    names = []
    if spec.heads_kv != spec.heads:
        names.append("grouped-query attention (fewer k/v heads than q heads)")
    if spec.head_dim_v != spec.head_dim:
        names.append("a v head_dim different from q/k's")
    if rule.bottom_right:
        names.append("causal='bottom_right'")
    if rule.window_left >= 0 or rule.window_right >= 0:
        names.append("window")
    if rule.softcap > 0.0:
        names.append("softcap")
    if rule.alibi:
        names.append("alibi_slopes")
    if rule.mask != "none":
        names.append("attn_mask")
    if spec.ragged == "padded":
        names.append("seqlens_q / seqlens_kv")
    if spec.ragged == "packed":
        names.append("packed sequences (flash_attention_varlen)")
    return names


def refuse_features(name: str, spec: Any, supported: tuple[str, ...] = ()) -> None:
    """A clear error, before any work, for features backend ``name`` does not implement."""
    missing = [f for f in features(spec) if f not in supported]
    if missing:
        raise ValueError(f"the {name!r} backend does not support {', '.join(missing)} yet; "
                         f"use backend='reference' (materialized, for checking)")


def backend_names() -> list[str]:
    return list(_MODULES)


def get_backend(name: str) -> ModuleType:
    """The backend module for a registry name (not checked for availability)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {name!r}")
    module = _LOADED.get(name)
    if module is not None:
        return module
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_MODULES)}")
    module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


#: the backend modules imported so far, by name (an import each call costs a lookup in sys.modules and more)
_LOADED: dict[str, ModuleType] = {}


def available_backends() -> list[str]:
    """Names of the backends that can run here, now."""
    return [name for name in _MODULES if get_backend(name).availability() is None]


def require(name: str) -> ModuleType:
    backend = get_backend(name)
    reason = backend.availability()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return backend


def resolve(name: str, *arrays: Any) -> ModuleType:
    """Picks the backend: an explicit name, or "auto" by where the data lives."""
    if name != "auto":
        return require(name)
    if _AUTO_HOST and all(type(a) is np.ndarray for a in arrays):  # NumPy arrays: the answer of the first time
        return _AUTO_HOST[0]
    on_gpu = [is_gpu_array(a) for a in arrays]
    if any(on_gpu):
        if not all(on_gpu):
            raise ValueError("q, k and v must all live on the same device (some are GPU arrays, some are not)")
        return require("cuda")
    cpu = get_backend("cpu")
    reason = cpu.availability()
    if reason is None:
        _AUTO_HOST[:] = [cpu]
        return cpu
    _warn_fallback_once(reason)
    return require("reference")


#: the backend "auto" picked for host arrays once the cpu backend answered available (it stays so)
_AUTO_HOST: list[ModuleType] = []

_warned_fallback = False


def _warn_fallback_once(reason: str) -> None:
    """backend="auto" without the compiled cpu kernel: said once per process, never silently."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fastattn: the compiled cpu backend is not available ({reason}); backend='auto' falls back "
            f"to the 'reference' backend, which materializes every (seq_q x seq_kv) score matrix in "
            f"float64: O(N^2) memory and far slower. Install fastattn with its compiled extension "
            f"(pip install .) or pass backend='reference' to choose it knowingly.",
            RuntimeWarning, stacklevel=4,
        )
