"""Scalar argument checks shared by the config and the functional API (one rule each)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def check_positive_int(name: str, value: object, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(value)


def check_scale(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"scale must be finite and positive, got {value!r}")
    return value


def check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {value!r}")
    return value


def check_seed(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**64) or None, got {value!r}")
    if not (0 <= value < 2**64):
        raise ValueError(f"seed must be in [0, 2**64), got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """A Python bool or a NumPy bool scalar; anything else (arrays included) is a TypeError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")
