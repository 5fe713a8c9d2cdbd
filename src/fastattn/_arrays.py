"""Arrays in and out: what the facade accepts as q, k, v and what it gives back.

In (``input_array``), before any check or work:

- NumPy arrays as they are (any strides; subclasses as plain ``ndarray`` views);
- ``numpy.ma`` masked arrays are refused: their mask would be silently ignored;
- PyTorch CPU tensors as zero-copy NumPy views (``torch.bfloat16`` through an ``int16`` view
  read as ``ml_dtypes.bfloat16``); a tensor that requires grad (with grad mode on) is refused:
  these functions are not recorded by autograd (``fastattn.torch.flash_attention`` is);
- other host objects exposing ``__array__``, ``__array_interface__`` or ``__array_struct__``
  through ``numpy.asarray``;
- GPU arrays (CuPy, torch CUDA tensors, anything with ``__cuda_array_interface__`` or a CUDA
  DLPack device) untouched: the cuda backend takes them.

Out (``like_input``): NumPy results go back as torch tensors, zero-copy, when the caller's q was
a torch tensor; otherwise as they are.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._validate import is_gpu_array

_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__array_struct__")


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_no_grad(name: str, x: Any) -> None:
    """A torch tensor that requires grad (with grad mode on) is refused: autograd would not see the call."""
    if is_torch_tensor(x) and x.requires_grad:
        import torch

        if torch.is_grad_enabled():
            raise TypeError(
                f"{name} requires grad, but this function is not recorded by autograd; use "
                f"fastattn.torch.flash_attention (a differentiable PyTorch operator), or call it under "
                f"torch.no_grad() (or pass {name}.detach()) for inference"
            )


def torch_cpu_to_numpy(x: Any) -> np.ndarray:
    torch = sys.modules["torch"]  # imported: x is one of its tensors

    if x.requires_grad:
        x = x.detach()
    if x.is_neg():  # a lazily negated view: NumPy cannot see the sign bit, resolve it
        x = x.resolve_neg()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def input_array(name: str, x: Any) -> Any:
    """``x`` as an array the backends read (see the module docstring), or a TypeError naming it."""
    if type(x) is np.ndarray:  # the common case first
        return x
    check_no_grad(name, x)
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma masked array; fastattn would ignore its mask. Pass "
            f"{name}.filled(value) (or np.asarray({name}) to use the data under the mask as it is)"
        )
    if is_torch_tensor(x):
        if x.is_cpu:
            return torch_cpu_to_numpy(x)
        return x  # GPU (or other device) tensors: the backend decides
    if is_gpu_array(x):
        return x
    if isinstance(x, np.ndarray):
        return x.view(np.ndarray)
    if any(hasattr(x, attr) for attr in _ARRAY_PROTOCOLS):
        try:
            arr = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - a broken protocol is the caller's error, named
            raise TypeError(f"{name} ({type(x).__name__}) could not be read as an array: {exc}") from exc
        if arr.dtype == object:
            raise TypeError(f"{name} ({type(x).__name__}) converts to an object array, not numbers")
        return arr
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def like_input(y: Any, like: Any) -> Any:
    """A host (NumPy) result as the caller's kind: a torch tensor for torch input, zero-copy."""
    if not (isinstance(y, np.ndarray) and is_torch_tensor(like)):
        return y
    import torch

    if y.dtype.kind == "V" and y.dtype.name == "bfloat16":  # (the name is built at each access: kind first)
        return torch.from_numpy(y.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(y)
