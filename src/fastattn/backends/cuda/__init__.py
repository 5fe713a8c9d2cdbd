"""CUDA backend (placeholder until its kernel lands)."""
NAME = "cuda"


def availability():
    return "the CUDA backend is not built yet"


def describe():
    return {}
