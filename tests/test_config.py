"""FlashAttentionConfig (frozen, validated) and the FlashAttention object API."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import fastattn
from conftest import assert_close_to_reference, random_array
from fastattn import AttentionResult, FlashAttention, FlashAttentionConfig

RESULT_FIELDS = {"output", "logsumexp", "flops", "peak_sram_bytes", "backend", "seed", "block_size_q",
                 "block_size_kv", "num_threads", "kernel"}


def test_defaults():
    cfg = FlashAttentionConfig(head_dim=64)
    assert (cfg.head_dim, cfg.num_heads, cfg.block_size_q, cfg.block_size_kv) == (64, 1, None, None)
    assert (cfg.causal, cfg.scale, cfg.dropout_p) == (False, None, 0.0)


def test_positional_order():
    cfg = FlashAttentionConfig(32, 4, 16, 8, True, 0.5, 0.25)
    assert cfg == FlashAttentionConfig(head_dim=32, num_heads=4, block_size_q=16, block_size_kv=8, causal=True,
                                       scale=0.5, dropout_p=0.25)


def test_frozen():
    cfg = FlashAttentionConfig(head_dim=64)
    for name, value in [("head_dim", 32), ("causal", True), ("dropout_p", 0.5), ("scale", 1.0)]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, name, value)
    assert cfg == FlashAttentionConfig(head_dim=64)


def test_hashable_and_equal():
    a = FlashAttentionConfig(head_dim=64, causal=True)
    b = FlashAttentionConfig(head_dim=64, causal=True)
    assert a == b and hash(a) == hash(b)
    assert a != a.with_causal(False)
    assert len({a, b, a.with_dropout(0.1)}) == 2


@pytest.mark.parametrize("head_dim", [1, 3, 64, 80, 256])
def test_softmax_scale_default(head_dim):
    assert FlashAttentionConfig(head_dim=head_dim).softmax_scale == pytest.approx(1 / math.sqrt(head_dim), rel=1e-15)


def test_softmax_scale_explicit():
    cfg = FlashAttentionConfig(head_dim=64, scale=0.3)
    assert cfg.softmax_scale == 0.3
    assert isinstance(FlashAttentionConfig(head_dim=64, scale=np.float32(0.5)).scale, float)


def test_with_causal_returns_new_config():
    cfg = FlashAttentionConfig(head_dim=64, num_heads=2, block_size_q=16, dropout_p=0.1, scale=0.2)
    on = cfg.with_causal(True)
    assert on is not cfg and on.causal is True and cfg.causal is False
    assert dataclasses.replace(on, causal=False) == cfg
    assert cfg.with_causal().causal is True  # default argument turns it on
    assert on.with_causal(False) == cfg
    with pytest.raises(ValueError, match="causal"):
        cfg.with_causal("yes")
    with pytest.raises(TypeError, match="causal"):
        cfg.with_causal(1)
    assert cfg.with_causal("bottom_right").causal == "bottom_right"
    assert cfg.with_causal("top_left").causal is True


def test_with_dropout_returns_new_config():
    cfg = FlashAttentionConfig(head_dim=64, causal=True)
    d = cfg.with_dropout(0.3)
    assert d is not cfg and d.dropout_p == 0.3 and cfg.dropout_p == 0.0
    assert d.causal is True and d.head_dim == 64
    assert d.with_dropout(0.0) == cfg
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            cfg.with_dropout(bad)


@pytest.mark.parametrize("field", ["head_dim", "num_heads"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-3, ValueError), (None, TypeError), (2.0, TypeError),
                                       ("8", TypeError), (True, TypeError)])
def test_config_sizes_validated(field, value, exc):
    kw = {"head_dim": 8, field: value}
    with pytest.raises(exc, match=field) as info:
        FlashAttentionConfig(**kw)
    assert repr(value) in str(info.value)


def test_config_normalizes_numpy_scalars():
    cfg = FlashAttentionConfig(head_dim=np.int64(8), num_heads=np.int32(2), block_size_q=np.int64(4),
                               dropout_p=np.float32(0.5), causal=np.bool_(True))
    assert type(cfg.head_dim) is int and type(cfg.num_heads) is int and type(cfg.block_size_q) is int
    assert type(cfg.dropout_p) is float and type(cfg.causal) is bool


def test_flash_attention_constructor():
    cfg = FlashAttentionConfig(head_dim=8)
    assert FlashAttention(cfg).backend == "auto"
    assert FlashAttention(cfg, "reference").config is cfg
    assert "FlashAttention" in repr(FlashAttention(cfg, "reference"))
    with pytest.raises(TypeError, match="FlashAttentionConfig"):
        FlashAttention({"head_dim": 8})
    with pytest.raises(ValueError, match="'gpu'"):
        FlashAttention(cfg, "gpu")


def test_forward_one_head(backend, rng):
    q, k, v = (random_array(rng, (37, 16), "float64") for _ in range(3))
    cfg = FlashAttentionConfig(head_dim=16, causal=True, scale=0.4)
    res = FlashAttention(cfg, backend).forward(q, k, v)
    assert isinstance(res, AttentionResult)
    assert {f.name for f in dataclasses.fields(res)} == RESULT_FIELDS
    assert res.backend == backend and res.seed is None
    # the code path that ran: a SIMD path on the cpu backend, NumPy for the reference
    assert res.kernel == (fastattn.backends.cpu.simd_in_use() if backend == "cpu" else "numpy")
    assert_close_to_reference(res.output, q, k, v, causal=True, scale=0.4, lse=res.logsumexp, rtol=1e-12)
    assert res.flops == 4 * 16 * (37 * 38 // 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.backend = "x"


@pytest.mark.parametrize("causal", [False, True])
def test_forward_multi_head(backend, rng, causal):
    q = random_array(rng, (2, 3, 29, 24))
    k, v = (random_array(rng, (2, 3, 41, 24)) for _ in range(2))
    cfg = FlashAttentionConfig(head_dim=24, num_heads=3, causal=causal)
    res = FlashAttention(cfg, backend).forward_multi_head(q, k, v)
    assert_close_to_reference(res.output, q, k, v, causal=causal, lse=res.logsumexp, rtol=1e-5)
    functional = fastattn.flash_attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    np.testing.assert_array_equal(res.output, functional[0])
    np.testing.assert_array_equal(res.logsumexp, functional[1])


def test_config_block_sizes_and_threads_reach_the_backend(cpu_backend, rng):
    from fastattn.backends.cpu._threads import cpu_limit

    # enough work for two threads (a tiny call runs on one whatever num_threads allows)
    q, k, v = (random_array(rng, (1, 2, 700, 32)) for _ in range(3))
    cfg = FlashAttentionConfig(head_dim=32, num_heads=2, block_size_q=16, block_size_kv=48)
    res = FlashAttention(cfg, cpu_backend).forward_multi_head(q, k, v, num_threads=2)
    assert (res.block_size_q, res.block_size_kv, res.num_threads) == (16, 48, min(2, cpu_limit()))
    res1 = FlashAttention(cfg, cpu_backend).forward_multi_head(q, k, v, num_threads=1)
    assert res1.num_threads == 1


def test_config_dropout_and_seed(backend, rng):
    q, k, v = (random_array(rng, (1, 2, 30, 8)) for _ in range(3))
    cfg = FlashAttentionConfig(head_dim=8, num_heads=2, dropout_p=0.25)
    att = FlashAttention(cfg, backend)
    res = att.forward_multi_head(q, k, v, seed=1234)
    assert res.seed == 1234
    assert_close_to_reference(res.output, q, k, v, dropout_p=0.25, seed=1234, lse=res.logsumexp, rtol=1e-5)
    drawn = att.forward_multi_head(q, k, v)
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**64
    np.testing.assert_array_equal(att.forward_multi_head(q, k, v, seed=drawn.seed).output, drawn.output)
    undropped = FlashAttention(cfg.with_dropout(0.0), backend).forward_multi_head(q, k, v)
    assert undropped.seed is None


def test_config_is_not_mutated_by_calls(backend, rng):
    q, k, v = (random_array(rng, (12, 8)) for _ in range(3))
    cfg = FlashAttentionConfig(head_dim=8, dropout_p=0.5)
    before = dataclasses.asdict(cfg)
    FlashAttention(cfg, backend).forward(q, k, v)
    assert dataclasses.asdict(cfg) == before


def test_result_seed_is_none_without_dropout(backend, rng):
    """AttentionResult.seed is "the dropout seed actually used ... None without dropout"."""
    q, k, v = (random_array(rng, (12, 8)) for _ in range(3))
    att = FlashAttention(FlashAttentionConfig(head_dim=8), backend)
    assert att.forward(q, k, v).seed is None
    res = att.forward(q, k, v, seed=5)  # a seed is accepted (and validated) but no dropout uses it
    assert res.seed is None, f"no dropout ran, yet the result reports seed={res.seed}"
    with pytest.raises(ValueError, match="seed"):
        att.forward(q, k, v, seed=-1)
