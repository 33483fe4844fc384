"""What every method's ONNX key transform shares (``Method.onnx_transform``, ``keyshard export``).

A key transform in ONNX is a graph with one input, ``pixels`` (uint8, N×H×W×3, the batch axis
named ``batch``), and one output, ``keyed`` (N×H×W×3 in the method's storage dtype).  A method
builds its few nodes from its compiled plan's arrays — the very arrays numpy and torch use — so
the ONNX file, ``encrypt_image`` and the shards cannot disagree.  ``onnx`` is imported here only
when a graph is built: it is an optional dependency (the ``onnx`` extra).
"""

from __future__ import annotations

import numpy as np

OPSET = 18                    # the ONNX operator set keyshard's exported files use
INPUT, OUTPUT = "pixels", "keyed"
BATCH = "batch"               # the name of the dynamic batch axis


def transform_graph(name: str, nodes: list, initializers: dict[str, np.ndarray], height: int, width: int,
                    out_dtype) -> "onnx.GraphProto":  # noqa: F821 - onnx is imported lazily
    """The graph ``pixels`` → ``keyed`` from a method's ``nodes`` (``onnx.helper.make_node``) and
    its constant arrays (``initializers``: name → numpy array, stored inline in the graph)."""
    from onnx import TensorProto, helper, numpy_helper

    shape = [BATCH, height, width, 3]
    return helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info(OUTPUT, helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype)), shape)],
        [numpy_helper.from_array(np.ascontiguousarray(array), name=n) for n, array in initializers.items()])


def flat_gather(name: str, index: np.ndarray, height: int, width: int, out_dtype) -> "onnx.GraphProto":  # noqa: F821
    """``keyed = pixels.reshape(N, -1)[:, index].reshape(N, H, W, 3)``: one Gather on each
    flattened image (int32 indices where they fit: half the file of int64)."""
    from onnx import helper

    index = index.astype(np.int32 if index.size < 2**31 else np.int64)
    nodes = [helper.make_node("Reshape", [INPUT, "flat_shape"], ["flat"]),
             helper.make_node("Gather", ["flat", "gather_index"], ["gathered"], axis=1),
             helper.make_node("Reshape", ["gathered", "image_shape"], [OUTPUT])]
    consts = {"flat_shape": np.array([0, -1], dtype=np.int64),  # 0 keeps the batch axis
              "image_shape": np.array([0, height, width, 3], dtype=np.int64),
              "gather_index": index.reshape(-1)}
    return transform_graph(name, nodes, consts, height, width, out_dtype)
