"""fastattn: exact, memory-efficient scaled-dot-product attention (FlashAttention).

Public names only; nothing is computed at import.
"""

from ._api import AttentionResult, FlashAttention, flash_attention, flash_attention_varlen, standard_attention
from ._backward import flash_attention_backward, flash_attention_varlen_backward
from ._config import FlashAttentionConfig
from ._info import available_backends, info
from ._kvcache import flash_attention_with_kvcache, merge_attention
from ._memory import MemoryReport, MemorySavings, memory_report, memory_savings
from ._version import __version__

__all__ = [
    "AttentionResult",
    "FlashAttention",
    "FlashAttentionConfig",
    "MemoryReport",
    "MemorySavings",
    "__version__",
    "available_backends",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_varlen",
    "flash_attention_varlen_backward",
    "flash_attention_with_kvcache",
    "info",
    "memory_report",
    "memory_savings",
    "merge_attention",
    "standard_attention",
]
