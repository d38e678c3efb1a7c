"""The baselines (and the hybrid head) through the same export as a backbone + head: one ONNX graph, checked against
the Python model before it is kept, read by the same ``predict``.

- TF-IDF + logistic regression: input ``texts``, strings (N, 1), the raw documents. skl2onnx writes the counting
  (lower-casing, RE2 tokenising, word and bigram counts over the fitted vocabulary: ``StringNormalizer``,
  ``com.microsoft.Tokenizer``, ``TfIdfVectorizer``); the sublinear tf (``1 + log(count)`` where count > 0), the idf
  weights and the L2 normalisation are written here (skl2onnx's sublinear tf computes ``log(count + 1)``, not
  scikit-learn's ``1 + log(count)``), then the linear head as for an encoder (``export.linear_head_graph``).
- pixels + logistic regression: input ``images`` uint8 (N, 3, 28, 28), as ``predict`` decodes them; PIL's grey
  formula in integer-exact float32 (every intermediate below 2^24), /255, then the linear head with the
  standardisation folded into its weights.

Outputs, metadata and report are those of ``export.export_onnx``: ``probabilities`` (N, K) float32, ``label`` (N,)
int64; class names, modality and (images) preprocessing in the metadata; ``featurestore_text_input`` says which
inputs a text graph takes (``strings``, or ``strings+tokens`` for the hybrid head).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..encode.engines import ONNX_OPSET
from ..errors import ExportError
from ..heads.baseline import (
    GRAY_WEIGHTS,
    ONNX_TOKEN_PATTERN,
    PIXEL_SIZE,
    BaselineModel,
    load_baseline,
    pixel_preprocessing,
)
from ..utils.atomic import atomic_path
from ..utils.timings import write_json
from .export import (
    MAX_PROBABILITY_DIFF,
    MODEL_KEY,
    MODEL_KIND_KEY,
    SAMPLE_TEXTS,
    _sample_images,
    combine,
    labels_match,
    linear_head_graph,
    logreg_params,
    remove_variants,
    spread_to_classes,
)

TEXT_INPUT_KEY = "featurestore_text_input"  # which inputs a text graph takes: tokens (default), strings, both
TEXT_INPUT = "texts"
# onnxruntime's StringNormalizer needs a locale to lower-case; "en_US.UTF-8", skl2onnx's default, is not installed
# on every machine (it is not on this one), C.UTF-8 is part of glibc.
LOCALE = "C.UTF-8"


def _init(name: str, values) -> TensorProto:
    array = np.asarray(values)
    return numpy_helper.from_array(array.astype(np.int64 if array.dtype.kind == "i" else np.float32), name)


def tfidf_graph(vectorizer, output: str = "features", text_input: str = TEXT_INPUT) -> onnx.ModelProto:
    """``texts`` strings (N, 1) → ``output`` float32 (N, V): the fitted ``TfidfVectorizer``'s rows, exactly."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import CountVectorizer

    if vectorizer.norm not in ("l2", None) or vectorizer.strip_accents is not None or vectorizer.analyzer != "word":
        raise ExportError("the TF-IDF graph supports word n-grams, no accent stripping, l2 or no norm")
    counter = CountVectorizer(ngram_range=vectorizer.ngram_range, vocabulary=vectorizer.vocabulary_,
                              lowercase=vectorizer.lowercase, token_pattern=vectorizer.token_pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = to_onnx(counter, initial_types=[(text_input, StringTensorType([None, 1]))],
                         options={id(counter): {"tokenexp": ONNX_TOKEN_PATTERN, "locale": LOCALE}},
                         target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3})
    graph = counts.graph
    raw = graph.output[0].name
    width = len(vectorizer.vocabulary_)
    nodes, inits = [], [_init("tfidf_zero", 0.0), _init("tfidf_one", 1.0), _init("tfidf_axis1", [1]),
                        _init("tfidf_eps", 1e-30)]
    tf = raw
    if vectorizer.sublinear_tf:  # 1 + log(count) where count > 0, else 0 (scikit-learn's sparse rule)
        nodes += [helper.make_node("Greater", [raw, "tfidf_zero"], ["tfidf_present"]),
                  helper.make_node("Max", [raw, "tfidf_one"], ["tfidf_at_least_one"]),
                  helper.make_node("Log", ["tfidf_at_least_one"], ["tfidf_log"]),
                  helper.make_node("Add", ["tfidf_log", "tfidf_one"], ["tfidf_log1"]),
                  helper.make_node("Where", ["tfidf_present", "tfidf_log1", "tfidf_zero"], ["tfidf_tf"])]
        tf = "tfidf_tf"
    weighted = tf
    if vectorizer.use_idf:
        inits.append(_init("tfidf_idf", vectorizer.idf_[None, :]))
        nodes.append(helper.make_node("Mul", [tf, "tfidf_idf"], ["tfidf_weighted"]))
        weighted = "tfidf_weighted"
    if vectorizer.norm == "l2":  # an empty row stays zero, as in scikit-learn
        nodes += [helper.make_node("ReduceL2", [weighted, "tfidf_axis1"], ["tfidf_norm"], keepdims=1),
                  helper.make_node("Max", ["tfidf_norm", "tfidf_eps"], ["tfidf_norm_safe"]),
                  helper.make_node("Div", [weighted, "tfidf_norm_safe"], [output])]
    else:
        nodes.append(helper.make_node("Identity", [weighted], [output]))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width]))
    return counts


def pixel_graph(size: int = PIXEL_SIZE) -> onnx.ModelProto:
    """``images`` uint8 (N, 3, S, S) → ``features`` float32 (N, S·S): PIL's grey level / 255."""
    nodes = [
        helper.make_node("Cast", ["images"], ["px_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["px_float", "px_weights"], ["px_weighted"]),
        helper.make_node("ReduceSum", ["px_weighted", "px_axis1"], ["px_sum"], keepdims=0),
        helper.make_node("Add", ["px_sum", "px_half"], ["px_rounded"]),
        helper.make_node("Div", ["px_rounded", "px_unit"], ["px_scaled"]),
        helper.make_node("Floor", ["px_scaled"], ["px_gray"]),
        helper.make_node("Div", ["px_gray", "px_255"], ["px_unit_range"]),
        helper.make_node("Reshape", ["px_unit_range", "px_shape"], ["features"]),
    ]
    inits = [_init("px_weights", np.array(GRAY_WEIGHTS, dtype=np.float32).reshape(1, 3, 1, 1)),
             _init("px_axis1", [1]), _init("px_half", 32768.0), _init("px_unit", 65536.0), _init("px_255", 255.0),
             _init("px_shape", [-1, size * size])]
    graph = helper.make_graph(nodes, "featurestore_pixels",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", size * size])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=10)


def head_behind(front: onnx.ModelProto, estimator, class_names: list[str], width: int) -> onnx.ModelProto:
    """``front`` (output ``features`` (N, width)) followed by the pipeline's logistic regression over all classes."""
    classes = np.asarray(estimator.named_steps["classify"].classes_, dtype=np.int64)
    head = linear_head_graph(logreg_params(estimator), width)
    return combine(front, spread_to_classes(head, classes, len(class_names)))


def check_against_python(path: Path, feed: dict[str, np.ndarray], expected: np.ndarray) -> dict:
    """onnxruntime (CPU) on ``feed`` against the Python model's probabilities ``expected`` (N, K)."""
    from ..encode.runtime import make_session

    session, _ = make_session(str(path), "cpu")
    probabilities, labels = session.run(["probabilities", "label"], feed)
    return {"n": int(len(expected)), "max_probability_diff": float(np.max(np.abs(probabilities - expected))),
            "labels_equal": bool(np.all(labels_match(expected, labels, MAX_PROBABILITY_DIFF))),
            "tolerance": MAX_PROBABILITY_DIFF, "output_dtypes": [str(probabilities.dtype), str(labels.dtype)]}


def strings(texts) -> np.ndarray:
    """A list of N documents as the graph's ``texts`` input: object array (N, 1)."""
    return np.array(list(texts), dtype=object).reshape(-1, 1)


def write_checked(graph: onnx.ModelProto, out: Path, metadata: dict[str, str], feed: dict[str, np.ndarray],
                  expected: np.ndarray, summary: dict, started: float) -> dict:
    """Set the metadata, check the graph (onnx checker, then onnxruntime against ``expected``), write ``out`` and
    its report, and remove the variants an earlier export left beside ``out`` (``export.remove_variants``: these
    graphs have none); a disagreement keeps no file and raises :class:`ExportError`."""
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))
        check = check_against_python(tmp, feed, expected)
        report = {"model": out.name, "name": metadata[MODEL_KEY], "kind": metadata[MODEL_KIND_KEY],
                  "modality": metadata["featurestore_modality"], "head": summary, "check": check,
                  "operators": sorted({node.op_type for node in graph.graph.node}),
                  "opsets": {d.domain or "ai.onnx": d.version for d in graph.opset_import},
                  "ir_version": graph.ir_version, "size_bytes": tmp.stat().st_size,
                  "seconds": round(time.perf_counter() - started, 2)}
        if check["max_probability_diff"] > MAX_PROBABILITY_DIFF or not check["labels_equal"]:
            raise ExportError(f"{out}: the exported graph disagrees with the Python model: {check}")
    write_json(Path(str(out) + ".report.json"), report)  # timings routed: its seconds go to the timings folder
    remove_variants(out)  # an encoder's fp16/int8 graphs an earlier export left here were made from another graph
    return report


def export_baseline_onnx(model: BaselineModel | str | Path, out: str | Path,
                         sample_inputs: list[str] | np.ndarray | None = None) -> dict:
    """Write ``out`` (one .onnx file) and ``<out>.report.json`` for a baseline model; return the report.

    Texts: input ``texts`` strings (N, 1). Images: input ``images`` uint8 (N, 3, 28, 28). ``sample_inputs``: the
    check batch (default: fixed sample texts, or noise, gradient and flat images)."""
    started = time.perf_counter()
    model = model if isinstance(model, BaselineModel) else load_baseline(model)
    out = Path(out)
    metadata = {"featurestore_class_names": json.dumps(model.class_names),
                "featurestore_fingerprint_hash": model.store_fingerprint_hash,
                "featurestore_head": json.dumps(model.summary(), sort_keys=True), MODEL_KEY: model.name,
                MODEL_KIND_KEY: "baseline",
                "featurestore_modality": model.modality}
    if model.kind == "tfidf":
        vectorizer = model.estimator.named_steps["tfidf"]
        graph = head_behind(tfidf_graph(vectorizer), model.estimator, model.class_names, len(vectorizer.vocabulary_))
        texts = list(sample_inputs) if sample_inputs is not None else list(SAMPLE_TEXTS)
        feed, expected = {TEXT_INPUT: strings(texts)}, model.predict_proba(texts)
        metadata[TEXT_INPUT_KEY] = "strings"
    else:
        graph = head_behind(pixel_graph(), model.estimator, model.class_names, PIXEL_SIZE * PIXEL_SIZE)
        images = sample_inputs if sample_inputs is not None else _sample_images(PIXEL_SIZE)
        feed, expected = {"images": images}, model.predict_proba(images)
        metadata["featurestore_preprocessing"] = json.dumps(pixel_preprocessing().as_dict(), sort_keys=True)
    return write_checked(graph, out, metadata, feed, expected, model.summary(), started)

