"""The CPU peers of ``python -m fastattn bench --compare``: ONNX Runtime and OpenVINO, beside PyTorch.

    onnxruntime-mha   ONNX Runtime's com.microsoft.MultiHeadAttention (inputs (batch, seq, heads·dim),
                      ``unidirectional=1`` for causal), CPU execution provider
    openvino-sdpa     OpenVINO's opset-13 ScaledDotProductAttention, compiled for the CPU with the f32
                      inference precision hint

Each peer is given the call in the layout it takes, prepared once outside the timing, and a model or
session built once per workload; the first result is checked against fastattn's (a peer computing
something else would otherwise be timed as if it were the same work). Threads: ``--threads T`` holds
each to T (ORT ``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``); without it each uses its
own default, as a user gets it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

ONNXRT = "onnxruntime-mha"
OPENVINO = "openvino-sdpa"
PEERS = {"onnxruntime": ONNXRT, "openvino": OPENVINO}
INSTALL = 'pip install ".[bench]" (from the clone)'


def unavailable(impl: str) -> str | None:
    try:
        if impl == ONNXRT:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        elif impl == OPENVINO:
            import openvino  # noqa: F401
        else:
            raise ValueError(f"unknown peer {impl!r}")
    except ImportError as exc:
        return f"{impl} is not installed ({exc.name}; {INSTALL})"
    return None


def _onnx_mha(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> bytes:
    from onnx import TensorProto, helper

    shape = [batch, seq, heads * head_dim]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("q", "k", "v")]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)
    attrs: dict[str, Any] = {"num_heads": heads}
    if causal:
        attrs["unidirectional"] = 1
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "fastattn_bench_mha", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def make_call(impl: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool,
              threads: int | None) -> Callable[[], Any]:
    """A zero-argument callable running the peer on (batch, heads, seq, dim) float32 q, k, v, with
    ``threads_used`` (the threads it was configured for, None: its default) as an attribute."""
    batch, heads, seq, head_dim = q.shape
    if impl == ONNXRT:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(_onnx_mha(batch, heads, seq, head_dim, causal), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {name: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim))
                 for name, x in (("q", q), ("k", k), ("v", v))}

        def run() -> Any:
            return session.run(None, feeds)[0]

        def as_bhsd(out: np.ndarray) -> np.ndarray:
            return out.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    elif impl == OPENVINO:
        import openvino as ov
        import openvino.opset13 as ops

        params = [ops.parameter(list(x.shape), np.float32, name=name) for name, x in (("q", q), ("k", k), ("v", v))]
        model = ov.Model([ops.scaled_dot_product_attention(*params, causal=causal)], params)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        inputs = [np.ascontiguousarray(x) for x in (q, k, v)]

        def run() -> Any:
            return request.infer(inputs)[0]

        def as_bhsd(out: np.ndarray) -> np.ndarray:
            return out
    else:
        raise ValueError(f"unknown peer {impl!r}")
    _check_agrees(impl, as_bhsd(np.asarray(run())), q, k, v, causal)
    run.threads_used = threads  # type: ignore[attr-defined]
    return run


def _check_agrees(impl: str, out: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> None:
    import fastattn

    want = fastattn.flash_attention(q, k, v, causal=causal)
    err = float(np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30))
    if not err < 1e-3:
        raise RuntimeError(f"{impl} disagrees with fastattn on this workload (relative error {err:.2e}, "
                           f"causal={causal}): not timing it")
