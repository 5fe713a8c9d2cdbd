"""fastattn.info() and available_backends(): what this installation can do here."""

from __future__ import annotations

import platform

from . import backends
from ._version import __version__


def available_backends() -> list[str]:
    """Backends that can run on this machine now, e.g. ``["cpu", "reference"]``."""
    return backends.available_backends()


def info() -> dict:
    """Version, backends (with why an unavailable one is not), and each backend's facts."""
    details = {}
    for name in backends.backend_names():
        backend = backends.get_backend(name)
        reason = backend.availability()
        details[name] = {"available": reason is None, **({"reason": reason} if reason else backend.describe())}
    cpu = details.get("cpu", {})
    return {
        "version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "backends": available_backends(),
        "simd": cpu.get("simd"),
        "threads": cpu.get("threads"),
        "cache_bytes": cpu.get("cache_bytes"),
        "details": details,
    }
