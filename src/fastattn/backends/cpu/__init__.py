"""CPU backend (placeholder while the kernel is written)."""
NAME = "cpu"


def availability():
    return "the compiled extension is not built yet"


def describe():
    return {}
