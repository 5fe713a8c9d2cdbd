"""FlashAttentionConfig: the frozen, validated description of one attention layer."""

from __future__ import annotations

import dataclasses
import math

from ._checks import check_bool, check_dropout, check_positive_int, check_scale


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Immutable attention settings.

    ``block_size_q`` / ``block_size_kv`` of ``None`` let the backend choose cache-sized
    tiles; explicit values are honoured exactly.  ``scale`` of ``None`` means
    ``1 / sqrt(head_dim)``.  Configs are immutable: ``with_causal`` and ``with_dropout``
    return new ones.
    """

    head_dim: int
    num_heads: int = 1
    block_size_q: int | None = None
    block_size_kv: int | None = None
    causal: bool = False
    scale: float | None = None
    dropout_p: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "head_dim", check_positive_int("head_dim", self.head_dim, allow_none=False))
        set_(self, "num_heads", check_positive_int("num_heads", self.num_heads, allow_none=False))
        set_(self, "block_size_q", check_positive_int("block_size_q", self.block_size_q))
        set_(self, "block_size_kv", check_positive_int("block_size_kv", self.block_size_kv))
        set_(self, "causal", check_bool("causal", self.causal))
        set_(self, "scale", check_scale(self.scale))
        set_(self, "dropout_p", check_dropout(self.dropout_p))

    @property
    def softmax_scale(self) -> float:
        """The factor applied to Q·Kᵀ: ``scale`` or ``1 / sqrt(head_dim)``."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def with_causal(self, causal: bool = True) -> FlashAttentionConfig:
        return dataclasses.replace(self, causal=causal)

    def with_dropout(self, dropout_p: float) -> FlashAttentionConfig:
        return dataclasses.replace(self, dropout_p=dropout_p)
