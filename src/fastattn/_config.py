"""FlashAttentionConfig: the frozen, validated description of one attention layer."""

from __future__ import annotations

import dataclasses
import math

from ._checks import check_dropout, check_positive_int, check_scale


@dataclasses.dataclass(frozen=True)
class FlashAttentionConfig:
    """Immutable attention settings.

    ``block_size_q`` / ``block_size_kv`` of ``None`` let the backend choose cache-sized
    tiles; explicit values are honoured exactly.  ``scale`` of ``None`` means
    ``1 / sqrt(head_dim)``.  ``num_kv_heads`` (None: ``num_heads``) and ``head_dim_v`` (None:
    ``head_dim``) are checked against the inputs; ``causal``, ``window``, ``softcap`` and
    ``layout`` mean what they mean for :func:`fastattn.flash_attention` (``causal`` is stored as
    False, True or "bottom_right").  Configs are immutable: ``with_causal`` and ``with_dropout``
    return new ones.
    """

    head_dim: int
    num_heads: int = 1
    block_size_q: int | None = None
    block_size_kv: int | None = None
    causal: bool | str = False
    scale: float | None = None
    dropout_p: float = 0.0
    num_kv_heads: int | None = None
    head_dim_v: int | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    layout: str = "bhsd"

    def __post_init__(self) -> None:
        from ._validate import check_causal, check_layout, check_softcap, check_window

        set_ = object.__setattr__
        set_(self, "head_dim", check_positive_int("head_dim", self.head_dim, allow_none=False))
        set_(self, "num_heads", check_positive_int("num_heads", self.num_heads, allow_none=False))
        set_(self, "block_size_q", check_positive_int("block_size_q", self.block_size_q))
        set_(self, "block_size_kv", check_positive_int("block_size_kv", self.block_size_kv))
        causal, bottom_right = check_causal(self.causal)
        set_(self, "causal", "bottom_right" if bottom_right else causal)
        set_(self, "scale", check_scale(self.scale))
        set_(self, "dropout_p", check_dropout(self.dropout_p))
        set_(self, "num_kv_heads", check_positive_int("num_kv_heads", self.num_kv_heads))
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        set_(self, "head_dim_v", check_positive_int("head_dim_v", self.head_dim_v))
        set_(self, "window", check_window(self.window))
        set_(self, "softcap", check_softcap(self.softcap))
        set_(self, "layout", check_layout(self.layout))

    @property
    def softmax_scale(self) -> float:
        """The factor applied to Q·Kᵀ: ``scale`` or ``1 / sqrt(head_dim)``."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def with_causal(self, causal: bool | str = True) -> FlashAttentionConfig:
        return dataclasses.replace(self, causal=causal)

    def with_dropout(self, dropout_p: float) -> FlashAttentionConfig:
        return dataclasses.replace(self, dropout_p=dropout_p)
