"""The hybrid head (``heads.hybrid``) as one ONNX graph: the sentence encoder and the TF-IDF counting side by side,
then ``[w × L2(embedding), TF-IDF row]`` into the logistic regression.

Inputs: ``input_ids`` and ``attention_mask`` int64 (N, W, L), the token windows of the tokenizer stored in the
metadata, as for an encoder + head, and ``texts`` strings (N, 1), the same documents raw (``predict`` feeds both:
metadata ``featurestore_text_input = strings+tokens``). Outputs and check as for every export: probabilities (N, K)
float32 and label (N,) int64, compared with torch encoder + scikit-learn before the file is kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper

from ..heads.hybrid import HybridModel, load_hybrid
from .baseline_export import (
    TEXT_INPUT,
    TEXT_INPUT_KEY,
    _init,
    strings,
    tfidf_graph,
    write_checked,
)
from .export import (
    HEAD_INPUT,
    MODEL_KEY,
    MODEL_KIND_KEY,
    SAMPLE_TEXTS,
    linear_head_graph,
    logreg_params,
    name_nodes,
    spread_to_classes,
    text_parts,
    unique_opsets,
)

TFIDF_OUTPUT = "hybrid_tfidf"


def joined_head(model: HybridModel, width: int) -> onnx.ModelProto:
    """``features`` (N, D) and ``hybrid_tfidf`` (N, V) → probabilities, label: the rows joined as in training
    (``heads.hybrid.hybrid_rows``), then the logistic regression over all classes."""
    classes = model.classes
    head = linear_head_graph(logreg_params(model.estimator), model.feature_dim + width)
    head = spread_to_classes(head, classes, len(model.class_names))
    graph = head.graph
    joining = [
        helper.make_node("ReduceL2", ["features", "hybrid_axis1"], ["hybrid_norm"], keepdims=1),
        helper.make_node("Max", ["hybrid_norm", "hybrid_eps"], ["hybrid_norm_safe"]),
        helper.make_node("Div", ["features", "hybrid_norm_safe"], ["hybrid_unit"]),
        helper.make_node("Mul", ["hybrid_unit", "hybrid_weight"], ["hybrid_weighted"]),
        helper.make_node("Concat", ["hybrid_weighted", TFIDF_OUTPUT], [HEAD_INPUT], axis=1),
    ]
    nodes = joining + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([_init("hybrid_axis1", [1]), _init("hybrid_eps", 1e-12),
                              _init("hybrid_weight", model.weight)])
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", model.feature_dim]),
                        helper.make_tensor_value_info(TFIDF_OUTPUT, TensorProto.FLOAT, ["N", width])])
    return head


def hybrid_graph(model: HybridModel, encoder: onnx.ModelProto) -> onnx.ModelProto:
    """The encoder's graph (tokens → ``features``) and the TF-IDF graph (``texts`` → ``hybrid_tfidf``) side by side,
    merged into :func:`joined_head`."""
    vectorizer = model.estimator.named_steps["tfidf"]
    counting = compose.add_prefix(tfidf_graph(vectorizer, output=TFIDF_OUTPUT), "tfidf_", rename_inputs=False,
                                  rename_outputs=False)
    name_nodes(encoder, "encoder")
    name_nodes(counting, "tfidf")
    for part in (encoder, counting):
        part.ir_version = 10
    side = compose.merge_models(encoder, counting, io_map=[])
    head = joined_head(model, len(vectorizer.vocabulary_))
    name_nodes(head, "head")
    head.ir_version = side.ir_version
    merged = unique_opsets(compose.merge_models(side, head, io_map=[("features", "features"),
                                                                     (TFIDF_OUTPUT, TFIDF_OUTPUT)]))
    return merged


def export_hybrid_onnx(model: HybridModel | str | Path, out: str | Path) -> dict:
    """Write ``out`` (one .onnx file) and ``<out>.report.json`` for a hybrid head; return the report. The encoder is
    rebuilt from the model's store fingerprint and proven the same (``export.text_parts``)."""
    started = time.perf_counter()
    model = model if isinstance(model, HybridModel) else load_hybrid(model)
    parts = text_parts(model)
    graph = hybrid_graph(model, parts.graph)
    texts = list(SAMPLE_TEXTS)
    feed = {**parts.feed, TEXT_INPUT: strings(texts)}
    expected = model.predict_proba(texts, np.asarray(parts.reference_features))
    metadata = {"featurestore_class_names": json.dumps(model.class_names),
                "featurestore_fingerprint": json.dumps(model.fingerprint, sort_keys=True),
                "featurestore_fingerprint_hash": model.fingerprint_hash,
                "featurestore_head": json.dumps(model.summary(), sort_keys=True), MODEL_KEY: model.name,
                MODEL_KIND_KEY: "hybrid",
                **parts.metadata, TEXT_INPUT_KEY: "strings+tokens"}
    return write_checked(graph, Path(out), metadata, feed, expected, model.summary(), started)
