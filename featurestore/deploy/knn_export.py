"""The kNN head (``heads.knn``) as plain ONNX operators, which ``export.export_onnx`` appends behind the encoder:

    features → L2-normalised → MatMul with the stored unit train rows (D, M) → TopK k (similarities, rows)
    → weights exp((s - s_max) / T) → each neighbour's one-hot class row (Gather) × its weight, summed → / their sum

The graph holds the head's train rows, so it grows with them: an export refuses a head whose rows exceed
:data:`KNN_EXPORT_MAX_BYTES` (:func:`check_knn_size`), in one line, before the encoder is even loaded. ``TopK`` ranks
equal similarities by row, lower first, as ``heads.knn.nearest`` does, so graph and head pick the same neighbours.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError

# The most train rows an exported kNN head holds, in bytes of float32 (rows x width x 4): 256 MiB, i.e. 52,428 rows
# of EfficientNet-Lite0's 1,280 features or 174,762 of MiniLM's 384. The graph is one file onnxruntime holds whole in
# memory (the protobuf itself stops at 2 GiB), and every prediction multiplies by all the rows: at the limit 67 M
# multiply-adds per item, a sixth of what EfficientNet-Lite0 costs at 224 px. A head past it is refused, with one
# line that says so; a linear head has no such limit.
KNN_EXPORT_MAX_BYTES = 256 * 2**20


def knn_rows_bytes(head) -> int:
    """Bytes of the kNN ``head``'s stored train rows as float32."""
    rows = head.estimator.rows_
    return int(rows.shape[0]) * int(rows.shape[1]) * 4


def check_knn_size(head) -> None:
    """Refuse (:class:`ExportError`, one line) a kNN head whose train rows exceed :data:`KNN_EXPORT_MAX_BYTES`."""
    size = knn_rows_bytes(head)
    if size > KNN_EXPORT_MAX_BYTES:
        rows, width = head.estimator.rows_.shape
        limit = KNN_EXPORT_MAX_BYTES / 2**20
        raise ExportError(f"{head.name}: a kNN head's graph holds its {rows:,} train rows of {width} features "
                          f"({size / 2**20:,.0f} MiB of float32), more than the {limit:,.0f} MiB an export ships "
                          f"(deploy.knn_export.KNN_EXPORT_MAX_BYTES): export a linear head instead")


def _constant(name: str, values) -> TensorProto:
    array = np.asarray(values)
    return numpy_helper.from_array(array.astype(np.int64 if array.dtype.kind in "iu" else np.float32), name)


def knn_head_graph(head, input_name: str, opset: int, ir_version: int) -> onnx.ModelProto:
    """``input_name`` float32 (N, D) → ``probabilities`` float32 (N, K') over the classes the head saw
    (``head.classes``; ``export.spread_to_classes`` places them among all classes) and ``label`` int64 (N,).
    Raises :class:`ExportError` past :data:`KNN_EXPORT_MAX_BYTES`."""
    check_knn_size(head)
    knn = head.estimator
    rows, labels = np.asarray(knn.rows_, dtype=np.float32), np.asarray(knn.labels_, dtype=np.int64)
    k, classes = min(int(knn.k), len(rows)), len(knn.classes_)
    one_hot = np.zeros((len(rows), classes), dtype=np.float32)
    one_hot[np.arange(len(rows)), labels] = 1.0
    inits = [_constant("knn_axis1", [1]), _constant("knn_axis2", [2]), _constant("knn_eps", 1e-12),
             _constant("knn_rows_t", np.ascontiguousarray(rows.T)), _constant("knn_k", [k]),
             _constant("knn_temperature", float(knn.temperature)), _constant("knn_classes", one_hot),
             _constant("knn_first_start", [0]), _constant("knn_first_end", [1])]
    node = helper.make_node
    nodes = [
        node("ReduceL2", [input_name, "knn_axis1"], ["knn_norm"], keepdims=1),
        node("Max", ["knn_norm", "knn_eps"], ["knn_norm_safe"]),
        node("Div", [input_name, "knn_norm_safe"], ["knn_unit"]),
        node("MatMul", ["knn_unit", "knn_rows_t"], ["knn_similarity"]),  # (N, M) cosine similarities
        node("TopK", ["knn_similarity", "knn_k"], ["knn_top", "knn_rows"], axis=1, largest=1, sorted=1),
        node("Slice", ["knn_top", "knn_first_start", "knn_first_end", "knn_axis1"], ["knn_nearest"]),
        node("Sub", ["knn_top", "knn_nearest"], ["knn_shifted"]),
        node("Div", ["knn_shifted", "knn_temperature"], ["knn_scaled"]),
        node("Exp", ["knn_scaled"], ["knn_weight"]),  # (N, k)
        node("Gather", ["knn_classes", "knn_rows"], ["knn_neighbour_classes"], axis=0),  # (N, k, K')
        node("Unsqueeze", ["knn_weight", "knn_axis2"], ["knn_weight3"]),
        node("Mul", ["knn_neighbour_classes", "knn_weight3"], ["knn_weighted"]),
        node("ReduceSum", ["knn_weighted", "knn_axis1"], ["knn_votes"], keepdims=0),  # (N, K')
        node("ReduceSum", ["knn_votes", "knn_axis1"], ["knn_total"], keepdims=1),
        node("Div", ["knn_votes", "knn_total"], ["probabilities"]),
        node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "featurestore_knn_head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", rows.shape[1]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
