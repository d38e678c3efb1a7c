"""One ONNX graph for backbone + head: uint8 images (or token windows) in, class probabilities and labels out.

The backbone's graph is the one extraction already exported and cached (engines.py, text_engines.py), so
an export after a head change costs no new trace of the network. The head's graph is appended behind it:
linear heads (logreg, linear SVM) are written here as plain operators (Gemm, Softmax/Sigmoid,
ArgMax) with the scaler folded into the weights, which every execution provider runs; so is the kNN head, its train
rows inside the graph up to a stated size (``knn_export.py``); the RBF SVM is converted by skl2onnx. Every export is
checked against the Python pipeline (torch backbone + scikit-learn head) before it is kept.

Two variants may be written beside ``model.onnx``, each a normal featurestore model (same inputs, outputs and
metadata) checked before it is kept: ``model.fp16.onnx`` (``float16=True``: the encoder in float16, the head in
float32; what ``predict`` runs on CUDA) and ``model.int8.onnx`` (``quantize="int8"``: onnxruntime's quantisation
for CPUs, static with calibration images from the train split for image encoders, dynamic for text encoders),
kept or dropped by its comparison with the float graph on the head's val split (the test split's comparison is
reported beside it). Each variant records the sha256 of the float file it was made from; an export removes the
variants beside its output before it writes any, so a variant that is not kept leaves none.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper
from sklearn.pipeline import Pipeline

from ..encode.backbones import FeatureModel, get_spec, load_backbone
from ..encode.engines import ONNX_OPSET, cached_feature_graph
from ..errors import ExportError
from ..heads.estimators import fold_scaler
from ..heads.head import TrainedHead, load_head
from ..heads.scaling import FeatureScaler
from ..utils.atomic import atomic_path
from ..utils.timings import write_json
from .knn_export import knn_head_graph
from .predict import FLOAT32_SHA256_KEY, PRECISION_KEY, VARIANT_NAMES, OnnxClassifier, file_sha256, variant_path

MAX_PROBABILITY_DIFF = 1e-4
HEAD_IR_VERSION = 10
HEAD_INPUT = "head_features"

MODEL_KEY = "featurestore_model"  # the exported model's name (a head's, a baseline's, the hybrid head's)
MODEL_KIND_KEY = "featurestore_model_kind"  # encoder (backbone + head), baseline or hybrid
QUANTIZE_CHOICES = ("none", "int8")
QUANTIZATION_KEY = "featurestore_quantization"
# The float16 graph against the float32 one on the CPU provider: float16 keeps 11 significant bits (relative
# rounding 4.9e-4 per operation), and a head on standardised features magnifies the encoder's rounding in its
# low-variance dimensions. Largest per-item probability difference measured: image 0.012 (default data, 2,000 test
# images; mean 0.0012, labels equal on 1,999), text 5e-4 (500 articles), 0.032 on the tests' 40-image fixture,
# whose head was fitted on 20 images. Labels may differ only where the float32 probabilities tie within it.
FLOAT16_MAX_PROBABILITY_DIFF = 0.05
# The int8 graph against the float one on the val split (the test split is held out from every choice; its figures
# are reported beside): kept when its accuracy is at most 1.5 points below the float graph's and its labels agree
# with the float graph's on at least 95% of the items. Measured on the default data's test split: image -0.55
# points / 96.7%, text -0.6 points / 99.4%; a broken quantisation (the head's softmax and argmax quantised too)
# scored -6.3 points / 88.7% and is refused.
INT8_MAX_ACCURACY_DROP = 0.015
INT8_MIN_LABEL_AGREEMENT = 0.95
INT8_DECISION_SPLIT = "val"
CALIBRATION_ROWS = 256


@dataclass(frozen=True)
class LinearHeadParams:
    """F linear models on raw (unscaled) features: ``weight`` (F, K, D) and ``bias`` (F, K) float64.

    F=1 for logistic regression: probabilities = softmax of the decisions (a binary model's K=2 rows are ``[0, w]``,
    see :func:`sigmoid_as_softmax`, as is a binary calibrated SVM's, per fold). For a calibrated SVM the
    F models are the calibration folds and ``calibration`` holds sklearn's sigmoid parameters a, b
    (F, K): per class ``sigmoid(-(a·d + b))``, normalised over classes, averaged over folds, as
    ``CalibratedClassifierCV.predict_proba`` does. ``l2_normalize``: features are L2-normalised first.
    """

    weight: np.ndarray
    bias: np.ndarray
    l2_normalize: bool
    calibration: tuple[np.ndarray, np.ndarray] | None = None


def sigmoid_as_softmax(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A binary model's decision ``d = x @ w + b`` (weight (..., 1, D), bias (..., 1)) as two rows ``[0, w]``,
    ``[0, b]`` (weight (..., 2, D), bias (..., 2)): softmax over ``[0, d]`` is ``[1 - sigmoid(d), sigmoid(d)]``,
    scikit-learn's binary ``predict_proba`` (``d`` scores ``classes_[1]``)."""
    return (np.concatenate([np.zeros_like(weight), weight], axis=-2),
            np.concatenate([np.zeros_like(bias), bias], axis=-1))


def logreg_params(estimator: Pipeline) -> LinearHeadParams:
    """A pipeline's logistic regression (its ``classify`` step, behind an optional ``scale`` step) as raw-feature
    linear decisions, the scaler folded in: softmax of the decisions, or for a binary model (coef_ (1, D)) the
    two rows of :func:`sigmoid_as_softmax`."""
    classify = estimator.named_steps["classify"]
    weight, bias = classify.coef_[None], classify.intercept_[None]
    if weight.shape[1] == 1:
        weight, bias = sigmoid_as_softmax(weight, bias)
    if "scale" not in estimator.named_steps:
        return LinearHeadParams(np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64), False)
    return LinearHeadParams(*fold_scaler(estimator, weight, bias))


def linear_head_params(head: TrainedHead) -> LinearHeadParams:
    """The decisions of a logreg, sgd_logreg or calibrated linear-SVM head as plain arrays, over the classes the
    estimator saw (``head.classes``; :func:`spread_to_classes` places them among all classes).

    A binary estimator has one decision (coef_ (1, D)) scoring its second class; it becomes a two-column softmax
    (:func:`sigmoid_as_softmax`), which is exactly scikit-learn's sigmoid for logreg and sgd_logreg, and for a
    calibrated SVM the fold's one calibrator ``p1 = sigmoid(-(a·d + b))``, ``p0 = 1 - p1``, folded into the rows.
    """
    classify = head.estimator.named_steps["classify"]
    if head.config.head in ("logreg", "sgd_logreg", "multilayer"):
        params = logreg_params(head.estimator)
        if head.config.head in ("logreg", "multilayer") or classify.coef_.shape[0] == 1:
            return params
        k = params.weight.shape[1]  # sgd one-vs-rest: sigmoid(d) per class, normalised (a = -1, b = 0)
        return replace(params, calibration=(-np.ones((1, k)), np.zeros((1, k))))
    folds = classify.calibrated_classifiers_
    weight = np.stack([fold.estimator.coef_ for fold in folds])
    bias = np.stack([fold.estimator.intercept_ for fold in folds])
    a = np.array([[c.a_ for c in fold.calibrators] for fold in folds])
    b = np.array([[c.b_ for c in fold.calibrators] for fold in folds])
    if weight.shape[1] == 1:  # the calibrated decision -(a·d + b), per fold
        weight, bias = sigmoid_as_softmax(-a[..., None] * weight, -(a * bias + b))
        return LinearHeadParams(*fold_scaler(head.estimator, weight, bias))
    weight, bias, l2 = fold_scaler(head.estimator, weight, bias)
    return LinearHeadParams(weight, bias, l2, calibration=(a, b))


def _initializer(name: str, values: np.ndarray | list) -> TensorProto:
    array = np.asarray(values)
    return numpy_helper.from_array(array.astype(np.int64 if array.dtype.kind == "i" else np.float32), name)


def linear_head_graph(params: LinearHeadParams, feature_dim: int) -> onnx.ModelProto:
    """``head_features`` float32 (N, D) → ``probabilities`` float32 (N, K), ``label`` int64 (N,)."""
    nodes, inits = [], []
    if params.l2_normalize or params.calibration is not None:  # the reductions run over axis 1
        inits.append(_initializer("head_axis1", [1]))
    features = HEAD_INPUT
    if params.l2_normalize:  # x / max(||x||, 1e-12), as sklearn's Normalizer
        inits.append(_initializer("head_eps", 1e-12))
        nodes += [helper.make_node("ReduceL2", [features, "head_axis1"], ["head_norm"], keepdims=1),
                  helper.make_node("Max", ["head_norm", "head_eps"], ["head_norm_safe"]),
                  helper.make_node("Div", [features, "head_norm_safe"], ["head_unit"])]
        features = "head_unit"
    per_fold = []
    for f in range(len(params.weight)):
        inits += [_initializer(f"head_w{f}", params.weight[f]), _initializer(f"head_b{f}", params.bias[f])]
        nodes.append(helper.make_node("Gemm", [features, f"head_w{f}", f"head_b{f}"], [f"head_d{f}"], transB=1))
        if params.calibration is None:
            nodes.append(helper.make_node("Softmax", [f"head_d{f}"], [f"head_p{f}"], axis=1))
        else:
            a, b = params.calibration
            inits += [_initializer(f"head_neg_a{f}", -a[f]), _initializer(f"head_neg_b{f}", -b[f])]
            nodes += [helper.make_node("Mul", [f"head_d{f}", f"head_neg_a{f}"], [f"head_ad{f}"]),
                      helper.make_node("Add", [f"head_ad{f}", f"head_neg_b{f}"], [f"head_z{f}"]),
                      helper.make_node("Sigmoid", [f"head_z{f}"], [f"head_s{f}"])]
            nodes += [helper.make_node("ReduceSum", [f"head_s{f}", "head_axis1"], [f"head_sum{f}"], keepdims=1),
                      helper.make_node("Div", [f"head_s{f}", f"head_sum{f}"], [f"head_p{f}"])]
        per_fold.append(f"head_p{f}")
    nodes += [helper.make_node("Mean", per_fold, ["probabilities"]),
              helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    classes = params.weight.shape[1]
    graph = helper.make_graph(
        nodes, "featurestore_head",
        [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["N", feature_dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        inits,
    )
    # IR 10 (ONNX 1.16): what onnxruntime loads; onnx's newest default is beyond it.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=HEAD_IR_VERSION)


@functools.cache
def _register_feature_scaler() -> None:
    """Teach skl2onnx the heads' FeatureScaler, once per process. It is a StandardScaler with some scale_ set
    to 1, and skl2onnx's own scaler converter reads mean_ and scale_, so it converts it exactly."""
    from skl2onnx import update_registered_converter
    from skl2onnx.operator_converters.scaler_op import convert_sklearn_scaler
    from skl2onnx.shape_calculators.scaler import calculate_sklearn_scaler_output_shapes

    update_registered_converter(FeatureScaler, "SklearnScaler", calculate_sklearn_scaler_output_shapes,
                                convert_sklearn_scaler, overwrite=True, options={"div": ["std", "div", "div_cast"]})


def skl2onnx_head_graph(head: TrainedHead) -> onnx.ModelProto:
    """The whole sklearn pipeline (scaler + SVM + calibration) as an ONNX graph, by skl2onnx."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    _register_feature_scaler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skl2onnx reads SVC attributes sklearn deprecates
        return to_onnx(
            head.estimator, initial_types=[(HEAD_INPUT, FloatTensorType([None, head.feature_dim]))],
            options={id(head.estimator.named_steps["classify"]): {"zipmap": False}},
            target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
        )


def head_graph_of(head: TrainedHead) -> onnx.ModelProto:
    """The head's graph, ``head_features`` (N, D) → probabilities over the classes it saw, label: plain operators for
    the linear heads and the kNN head, skl2onnx for the RBF SVM."""
    if head.config.head in ("logreg", "linear_svm", "sgd_logreg", "multilayer"):
        params = linear_head_params(head)  # multilayer: on the chosen layers' columns only (the graph emits those)
        return linear_head_graph(params, params.weight.shape[-1])
    if head.config.head == "knn":
        return knn_head_graph(head, HEAD_INPUT, ONNX_OPSET, HEAD_IR_VERSION)
    return skl2onnx_head_graph(head)


def backbone_for(head: TrainedHead, backbone: str | None = None, weights: str | Path | None = None) -> FeatureModel:
    """Rebuild the backbone that produced the head's training features, and prove it is the same: weights,
    preprocessing, width, the feature path's code and the library versions (the store's fingerprint, less
    the stored dtype and compute precision, which the exported float32 graph does not share)."""
    from ..encode.backbones.loading import recorded_weights
    from ..encode.fingerprint import changed_keys, fingerprint_for

    fp = head.fingerprint
    pre = fp["preprocessing"]
    spec = get_spec(backbone or fp["backbone"], search=(Path(head.store_path).parent,))
    checkpoint = recorded_weights(spec, fp["weights_sha256"], weights, built=f"head {head.name}")
    model = load_backbone(spec, weights=checkpoint, image_size=pre["image_size"], crop_pct=pre["crop_pct"],
                          layers=[name for name, _ in fp["layers"]] if "layers" in fp else None)
    current = fingerprint_for(model, fp.get("dtype", "float32"), fp.get("compute") == "autocast-float16")
    changed = [key for key in changed_keys(fp, current) if key not in ("backbone",)]
    if changed or model.feature_dim != head.feature_dim:
        raise ExportError(
            f"backbone {model.name} would not reproduce the features head {head.name} was trained on "
            f"({', '.join(changed) or 'feature width'} changed since extraction): re-extract and retrain the head"
        )
    return model.cpu().to(memory_format=torch.contiguous_format)


def chosen_layers(model) -> list[str] | None:
    """The layers a multilayer head chose (its ``settings["layers"]`` names, in column order); None for any other
    model (a head of another kind, the hybrid head)."""
    config = getattr(model, "config", None)
    if config is None or config.head != "multilayer":
        return None
    return [entry[0] for entry in model.settings["layers"]]


def graph_backbone(head: TrainedHead, model: FeatureModel) -> FeatureModel:
    """The encoder the exported graph runs: ``model`` (:func:`backbone_for`'s), or for a multilayer head the same
    network emitting exactly the layers the head chose, in its columns' order (``settings["layers"]``)."""
    if not chosen_layers(head):
        return model
    pre = model.preprocessing
    chosen = load_backbone(get_spec(model.name), weights=model.weights_path, image_size=pre.image_size,
                           crop_pct=pre.crop_pct, layers=chosen_layers(head))
    return chosen.cpu().to(memory_format=torch.contiguous_format)


def spread_to_classes(head_graph: onnx.ModelProto, classes: np.ndarray, n_classes: int) -> onnx.ModelProto:
    """Make the head graph's ``probabilities`` (N, K') cover all K classes of the store: column k is class k.

    A head trained without some classes (no training rows) has K' < K columns, ordered by ``classes`` (K',)
    int. A (K', K) 0/1 matrix places them; missing classes get probability 0; ``label`` is recomputed as the
    argmax over all K. Returns the graph unchanged when it already covers every class in order.
    """
    if len(classes) == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return head_graph
    graph = head_graph.graph
    renamed = {"probabilities": "present_probabilities", "label": "present_label"}
    for node in list(graph.node):
        if node.op_type == "ArgMax" and list(node.output) == ["label"]:
            graph.node.remove(node)  # recomputed below over all classes
            continue
        node.input[:] = [renamed.get(name, name) for name in node.input]  # skl2onnx's own label path reads it
        node.output[:] = [renamed.get(name, name) for name in node.output]
    placement = np.zeros((len(classes), n_classes), dtype=np.float32)
    placement[np.arange(len(classes)), classes] = 1.0
    graph.initializer.append(numpy_helper.from_array(placement, "class_placement"))
    graph.node.extend([
        helper.make_node("MatMul", ["present_probabilities", "class_placement"], ["probabilities"]),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
                         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])])
    return head_graph


def unique_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each opset domain once (``ai.onnx`` is the default domain ``""``), at the highest version listed.
    ``compose.merge_models`` lists a domain both models import twice, which onnxruntime's quantiser refuses
    ("Failed to find proper ai.onnx domain")."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())
    return model


def name_nodes(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """Give every unnamed node of ``model`` a name (``<prefix>_<index>_<op>``), so that a node of the combined
    graph can be told apart by name (the quantiser selects the encoder's nodes by name)."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{prefix}_{index}_{node.op_type}"
    return model


def combine(backbone: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """The backbone's ``features`` output fed into the head's input; outputs probabilities and label."""
    name_nodes(backbone, "encoder")
    name_nodes(head, "head")
    head.ir_version = backbone.ir_version  # align IR versions before merging
    merged = unique_opsets(compose.merge_models(backbone, head, io_map=[("features", HEAD_INPUT)]))
    names = sorted(o.name for o in merged.graph.output)
    if names != ["label", "probabilities"]:
        raise ExportError(f"the combined graph has outputs {names}, expected label and probabilities")
    return merged


def _sample_images(size: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """A fixed check batch, uint8 (count, 3, size, size): noise, gradients and flat images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images[1] = np.broadcast_to(ramp[None, None, :], (3, size, size)).astype(np.uint8)
    images[2] = np.broadcast_to(ramp[None, :, None], (3, size, size)).astype(np.uint8)
    images[3] = 128
    return images


@dataclass
class EncoderParts:
    """What a modality contributes to an export: the encoder's graph (its output ``features``), a fixed batch
    of its inputs for the check, the torch features of that batch, and its metadata entries."""

    graph: onnx.ModelProto
    feed: dict[str, np.ndarray]
    reference_features: np.ndarray
    metadata: dict[str, str]


def image_parts(head: TrainedHead, backbone: str | None, weights: str | Path | None,
                sample_images: np.ndarray | None) -> EncoderParts:
    model = backbone_for(head, backbone, weights)
    images = sample_images if sample_images is not None else _sample_images(model.preprocessing.image_size)
    with torch.inference_mode():  # the store's features (every layer of a multi-layer store): the head's input
        features = model(torch.from_numpy(images)).numpy()
    return EncoderParts(onnx.load(str(cached_feature_graph(graph_backbone(head, model)))), {"images": images}, features,
                        {"featurestore_modality": "image",
                         "featurestore_preprocessing": json.dumps(model.preprocessing.as_dict(), sort_keys=True)})


SAMPLE_TEXTS = (
    "Quarterly profits at the media giant jumped as advertising sales rose.",
    "The striker scored twice in the second half to win the cup final.",
    "Ministers will publish the bill on Tuesday after weeks of debate in parliament.",
    "The new handset ships with a faster chip, a larger screen and longer battery life. " * 30,
    "x",
)


def text_parts(head: TrainedHead) -> EncoderParts:
    """The sentence encoder a text head was trained on, proven the same (weights, tokenizer, tokenization, code,
    libraries); its graph takes token windows. The metadata holds the tokenizer configured as extraction runs it
    (``featurestore_tokenizer_json``: truncation, stride, padding set) and how its encodings become the windows
    (``featurestore_text_windows``), so onnxruntime and ``tokenizers`` alone reproduce ``predict``."""
    from ..configs import Tokenization
    from ..encode.backbones import load_text_backbone
    from ..encode.fingerprint import changed_keys
    from ..encode.text_engines import cached_text_graph
    from ..encode.text_layers import LayeredTextFeatureModel, sentence_encoder

    fp = head.fingerprint
    model = load_text_backbone(get_spec(fp["backbone"], search=(Path(head.store_path).parent,)))
    tokenization = Tokenization(**fp["tokenization"])
    encoder = sentence_encoder(model, tokenization, fp.get("dtype", "float32"),
                               layers=[name for name, _ in fp["layers"]] if "layers" in fp else None)
    changed = changed_keys(fp, encoder.fingerprint())
    if changed:
        raise ExportError(f"text backbone {model.name} would not reproduce the features head {head.name} was trained "
                          f"on ({', '.join(changed)} changed since extraction): re-extract and retrain the head")
    ids, mask, _ = encoder.tokenizer(list(SAMPLE_TEXTS))
    with torch.inference_mode():  # the store's features (every layer of a multi-layer store): the head's input
        features = encoder.model(ids, mask).numpy()
    graph_model = LayeredTextFeatureModel(model, chosen_layers(head)) if chosen_layers(head) else encoder.model
    return EncoderParts(onnx.load(str(cached_text_graph(graph_model))), {"input_ids": ids.numpy(),
                                                                  "attention_mask": mask.numpy()}, features,
                        {"featurestore_modality": "text",
                         "featurestore_tokenization": json.dumps(tokenization.as_dict(), sort_keys=True),
                         "featurestore_tokenizer_json": encoder.tokenizer.json,
                         "featurestore_text_windows": json.dumps(encoder.tokenizer.windowing, sort_keys=True),
                         "featurestore_tokenizer_sha256": model.tokenizer_sha256})


def labels_match(reference: np.ndarray, labels: np.ndarray, tolerance: float) -> np.ndarray:
    """Per row, whether ``labels`` (N,) int picks a class at the maximum of ``reference`` (N, K) probabilities within
    ``tolerance``: a label may differ from the reference's argmax only where the reference itself has a tie."""
    chosen = reference[np.arange(len(labels)), labels]
    return chosen >= reference.max(axis=1) - tolerance


def verify_export(path: Path, head: TrainedHead, parts: EncoderParts) -> dict:
    """Compare the ONNX graph (onnxruntime, CPU) with the torch encoder + sklearn head on the parts' batch."""
    from ..encode.runtime import make_session

    session, _ = make_session(str(path), "cpu")
    probabilities, labels = session.run(["probabilities", "label"], parts.feed)
    expected = head.predict_proba(parts.reference_features)
    diff = float(np.max(np.abs(probabilities - expected)))
    # A label may differ only where the Python pipeline itself has a tie within the tolerance (two classes with
    # equal probability on a tiny model): the graph's label must be one of the classes at the maximum.
    return {
        "n": int(len(expected)),
        "max_probability_diff": diff,
        "labels_equal": bool(np.all(labels_match(expected, labels, MAX_PROBABILITY_DIFF))),
        "tolerance": MAX_PROBABILITY_DIFF,
        "output_dtypes": [str(probabilities.dtype), str(labels.dtype)],
    }


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def float16_encoder(encoder: onnx.ModelProto) -> onnx.ModelProto:
    """The encoder's graph with its float tensors and operators in float16 (onnxruntime's converter, shipped with
    onnxruntime-gpu); its inputs (uint8 images, int64 tokens) and its ``features`` output keep their types (a Cast
    back to float32 at the end), so the float32 head is appended as in the float graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the model contains values beyond float16": clamped
        return convert_float_to_float16(copy_model(encoder), keep_io_types=True)


def check_float16(float32_path: Path, float16_path: Path, feed: dict[str, np.ndarray]) -> dict:
    """The float16 graph against the float32 one, both on the CPU provider, on the check batch ``feed``: the
    largest probability difference (≤ :data:`FLOAT16_MAX_PROBABILITY_DIFF`) and whether every label is one the
    float32 graph puts at its maximum within that tolerance (ties may go either way)."""
    from ..encode.runtime import make_session

    reference, _ = make_session(str(float32_path), "cpu")
    candidate, _ = make_session(str(float16_path), "cpu")
    expected, _ = reference.run(["probabilities", "label"], feed)
    probabilities, labels = candidate.run(["probabilities", "label"], feed)
    return {
        "n": int(len(expected)),
        "max_probability_diff": float(np.max(np.abs(probabilities - expected))),
        "labels_equal": bool(np.all(labels_match(expected, labels, FLOAT16_MAX_PROBABILITY_DIFF))),
        "tolerance": FLOAT16_MAX_PROBABILITY_DIFF,
        "output_dtypes": [str(probabilities.dtype), str(labels.dtype)],
    }


@dataclass
class SplitItems:
    """The items of one split of the head's store: ``records`` (path, rel_path, label, split, and a document's text
    when given inline) in the store's row order and ``labels`` (N,) int64 indices into the store's class names."""

    records: list
    labels: np.ndarray


def split_items(head: TrainedHead, split: str, data: str | Path | None = None) -> SplitItems:
    """The items of ``split`` in the head's store, in row order, from the folder or manifest the store records as
    its source (``data`` instead when given), each checked against its content id; documents given inline in a
    manifest come with their text. Raises :class:`ExportError` when the store, the split, its source or any of
    its items is missing (or an item changed)."""
    from ..errors import FeaturestoreError
    from ..heads.records import store_records
    from ..store import FeatureStore

    store_path = Path(head.store_path)
    if not store_path.is_file():
        raise ExportError(f"{store_path}: the head's feature store is not there; --quantize int8 reads the items of "
                          f"its train and test splits")
    store = FeatureStore(store_path)
    if split not in store.splits:
        raise ExportError(f"{store_path}: no {split} split (needed for --quantize int8)")
    try:
        records = store_records(store, split, data)
    except FeaturestoreError as exc:  # the int8 graph is then not kept; the float graph and its report are
        raise ExportError(str(exc)) from None
    return SplitItems(records, np.array([record.label for record in records], dtype=np.int64))


def compare_on_split(reference: Path, candidate: Path, items: SplitItems, batch_size: int = 64,
                     workers: int = 1) -> dict:
    """Run both graphs (CPU provider) over the items, decoded once: each graph's accuracy, the share of items on
    which their labels agree, and the probability differences (per item the largest |p_candidate - p_reference| over
    the classes: its maximum and its mean over the items)."""
    first = OnnxClassifier(reference, "cpu", float16=False)
    second = OnnxClassifier(candidate, "cpu", float16=False)
    truth, labels_a, labels_b, diffs, seconds = [], [], [], [], [0.0, 0.0]
    for indices, batch, failed in first.loader(items.records, batch_size, workers):
        if failed:
            raise ExportError(f"cannot read {items.records[failed[0][0]].path}: {failed[0][1]}")
        started = time.perf_counter()
        p_a, l_a = first.run_batch(batch)
        seconds[0] += time.perf_counter() - started
        started = time.perf_counter()
        p_b, l_b = second.run_batch(batch)
        seconds[1] += time.perf_counter() - started
        truth.append(items.labels[indices])
        labels_a.append(l_a)
        labels_b.append(l_b)
        diffs.append(np.abs(p_b - p_a).max(axis=1))
    truth, labels_a, labels_b, diffs = (np.concatenate(x) for x in (truth, labels_a, labels_b, diffs))
    return {
        "split": items.records[0].split, "n": int(len(truth)),
        "reference_accuracy": round(float(np.mean(labels_a == truth)), 6),
        "accuracy": round(float(np.mean(labels_b == truth)), 6),
        "label_agreement": round(float(np.mean(labels_a == labels_b)), 6),
        "max_probability_diff": float(diffs.max()), "mean_max_probability_diff": float(diffs.mean()),
        "model_only_items_per_s": {"reference": round(len(truth) / seconds[0], 1),
                                   "candidate": round(len(truth) / seconds[1], 1)},
    }


class CalibrationImages:
    """onnxruntime's ``CalibrationDataReader`` protocol over images: ``get_next()`` gives ``{"images": uint8
    (B, 3, S, S)}`` batches, decoded in a DataLoader worker with the model's preprocessing, then None."""

    def __init__(self, classifier: OnnxClassifier, records: list, batch_size: int = 32, workers: int = 1):
        self.batches = iter(classifier.loader(records, batch_size, workers))
        self.rows = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        for _, batch, _ in self.batches:  # an undecodable image costs its row, not the calibration
            if batch is not None:
                self.rows += len(batch)
                return {"images": np.ascontiguousarray(batch.numpy())}
        return None


def quantize_int8(float_path: Path, out: Path, head: TrainedHead, encoder_nodes: list[str],
                  data: str | Path | None = None, calibration_rows: int = CALIBRATION_ROWS, seed: int = 0) -> dict:
    """Write the int8 version of the float graph ``float_path`` to ``out``; returns how it was made.

    Only the encoder's nodes (``encoder_nodes``) are quantised: the head (Gemm, softmax, argmax) stays float32, since
    quantising its probabilities made labels tie and cost 6 accuracy points on the default image data.
    Image encoders: static quantisation (QDQ format, int8 weights per output channel, uint8 activations, MinMax
    ranges) calibrated on ``calibration_rows`` images drawn (``seed``) from the head's train split. Text encoders:
    dynamic quantisation (int8 weights per channel; activations quantised at run time), which needs no data.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    text = head.fingerprint.get("kind") == "text"
    if text:
        quantize_dynamic(str(float_path), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=encoder_nodes)
        info = {"method": "dynamic", "weights": "int8 per channel", "activations": "int8 at run time"}
    else:
        train = split_items(head, "train", data)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(train.records), size=min(calibration_rows, len(train.records)), replace=False))
        reader = CalibrationImages(OnnxClassifier(float_path, "cpu", float16=False), [train.records[i] for i in rows])
        # uint8 weights as well as activations (U8U8): with int8 weights (U8S8) an x86 CPU without VNNI saturates
        # its 16-bit accumulations (onnxruntime's quantisation notes); measured on such a CPU (AMD EPYC, AVX2), the
        # tests' 64-px head agreed with the float graph on 77.5% of 200 test images with U8S8, 94% with U8U8. The
        # graph runs on whatever CPU predict finds, so it is made the way that is right on every x86 CPU.
        quantize_static(str(float_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=encoder_nodes)
        info = {"method": "static", "format": "QDQ", "weights": "uint8 per channel", "activations": "uint8",
                "calibration": {"split": "train", "rows": reader.rows, "seed": seed, "ranges": "MinMax"}}
    model = unique_opsets(onnx.load(str(out)))
    float_meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
    onnx.helper.set_model_props(model, {**float_meta, FLOAT32_SHA256_KEY: file_sha256(float_path),
                                        QUANTIZATION_KEY: json.dumps(info, sort_keys=True)})
    onnx.save(model, str(out))
    return info


def remove_variants(out: Path) -> None:
    """Remove the variants (``predict.VARIANT_NAMES``) an earlier export left beside ``out``: they were made from
    another graph. Called once ``out`` is replaced and before a new variant is tried, so a failed try leaves none."""
    for variant in VARIANT_NAMES:
        variant_path(out, variant).unlink(missing_ok=True)


def export_onnx(head: TrainedHead | str | Path, out: str | Path, backbone: str | None = None,
                weights: str | Path | None = None, sample_images: np.ndarray | None = None,
                trust_pickle: bool = False, quantize: str = "none", float16: bool = False,
                data: str | Path | None = None, calibration_rows: int = CALIBRATION_ROWS) -> dict:
    """Write ``out`` (one self-contained .onnx file) and ``<out>.report.json``; return the report.

    Images: input ``images`` uint8 (N, 3, S, S). Texts: inputs ``input_ids`` and ``attention_mask`` int64
    (N, W, L), token windows made by the tokenizer stored in the metadata (see ``predict.py``). Every axis is
    dynamic. Outputs ``probabilities`` (N, K) float32 and ``label`` (N,) int64. Metadata: class names,
    fingerprint, head summary, and the modality's preprocessing or tokenization.
    Raises :class:`ExportError` (and keeps no file) when the graph disagrees with the Python pipeline.

    ``float16``: also write ``<stem>.fp16.onnx`` (the encoder in float16, for ``predict`` on CUDA), checked against
    the float32 graph on the CPU provider (report key ``float16``). ``quantize="int8"``: also write
    ``<stem>.int8.onnx`` for CPUs (see :func:`quantize_int8`; calibration images and the val and test splits are
    read under ``data``, default the source the head's store records), kept or dropped by its comparison with the
    float graph on the head's val split (report key ``int8``: ``decided_on``, then per split ``val`` and ``test``
    both accuracies, label agreement, probability differences; the test figures are information only). Once
    ``out`` is written, the variants an earlier export left beside it are removed, whether asked for again or not;
    a variant that fails its check is then not kept: the report says why, and :class:`ExportError` is raised after
    the float graph and its report are written.
    """
    from ..utils.validation import check_choice

    check_choice("quantize", quantize, QUANTIZE_CHOICES)
    started = time.perf_counter()
    head = head if isinstance(head, TrainedHead) else load_head(head, trust_pickle=trust_pickle)
    if quantize == "int8" and head.config.head == "knn":
        # its graph holds the train+val rows: every val item finds itself, so val cannot judge the int8 graph
        raise ExportError(f"head {head.name}: --quantize int8 is judged on the val split, which a kNN head holds "
                          f"(refitted on train+val); export it in float32 (or --float16)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the head first: a kNN head too large to ship is refused before the encoder is loaded
    head_graph = spread_to_classes(head_graph_of(head), head.classes, len(head.class_names))
    text = head.fingerprint.get("kind") == "text"
    parts = text_parts(head) if text else image_parts(head, backbone, weights, sample_images)
    float16_head = copy_model(head_graph)  # combine() changes the head it is given
    graph = combine(parts.graph, head_graph)
    metadata = {
        "featurestore_class_names": json.dumps(head.class_names),
        "featurestore_fingerprint": json.dumps(head.fingerprint, sort_keys=True),
        "featurestore_fingerprint_hash": head.fingerprint_hash,
        "featurestore_head": json.dumps(head.summary(), sort_keys=True),
        MODEL_KEY: head.name, MODEL_KIND_KEY: "encoder",
        **parts.metadata,
    }
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)  # every node's types and shapes, not only the structure
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))
        check = verify_export(tmp, head, parts)
        ops = sorted({node.op_type for node in graph.graph.node})
        report = {
            "model": out.name, "name": head.name, "kind": "encoder", "modality": metadata["featurestore_modality"],
            "head": head.summary(), "check": check,
            "operators": ops, "opsets": {d.domain or "ai.onnx": d.version for d in graph.opset_import},
            "ir_version": graph.ir_version, "size_bytes": tmp.stat().st_size,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if check["max_probability_diff"] > MAX_PROBABILITY_DIFF or not check["labels_equal"]:
            raise ExportError(f"{out}: the exported graph disagrees with the Python pipeline: {check}")
    problems = []
    remove_variants(out)
    if float16:
        report["float16"], problem = _write_float16(out, variant_path(out, "fp16"), parts, float16_head, metadata)
        problems += [problem] if problem else []
    if quantize == "int8":
        encoder_nodes = [node.name for node in parts.graph.graph.node]  # named by combine()
        report["int8"], problem = _write_int8(out, variant_path(out, "int8"), head, encoder_nodes, data,
                                              calibration_rows)
        problems += [problem] if problem else []
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_json(Path(str(out) + ".report.json"), report)  # timings routed: its seconds go to the timings folder
    if problems:
        raise ExportError("; ".join(problems))
    return report


def _write_float16(out: Path, path: Path, parts: EncoderParts, head_graph: onnx.ModelProto,
                   metadata: dict[str, str]) -> tuple[dict, str | None]:
    """Write and check the float16 graph; returns its report entry and the problem (None when it is kept)."""
    started = time.perf_counter()
    graph = combine(float16_encoder(parts.graph), head_graph)
    onnx.helper.set_model_props(graph, {**metadata, PRECISION_KEY: "float16", FLOAT32_SHA256_KEY: file_sha256(out)})
    onnx.checker.check_model(graph, full_check=True)
    entry: dict = {"model": path.name}
    try:
        with atomic_path(path) as tmp:
            onnx.save(graph, str(tmp))
            entry.update(check=check_float16(out, tmp, parts.feed), size_bytes=tmp.stat().st_size)
            if entry["check"]["max_probability_diff"] > FLOAT16_MAX_PROBABILITY_DIFF or not entry["check"][
                    "labels_equal"]:
                raise ExportError(f"{path}: the float16 graph disagrees with the float32 graph beyond float16 "
                                  f"rounding: {entry['check']}")
    except ExportError as exc:
        return {**entry, "kept": False, "problem": str(exc)}, str(exc)
    return {**entry, "kept": True, "seconds": round(time.perf_counter() - started, 2)}, None


def _write_int8(out: Path, path: Path, head: TrainedHead, encoder_nodes: list[str], data: str | Path | None,
                calibration_rows: int) -> tuple[dict, str | None]:
    """Write the int8 graph and compare it with the float graph on the val split, which decides whether it is kept
    (``decided_on``), and on the test split (reported, not used for the choice); returns its report entry and the
    problem (None when it is kept)."""
    started = time.perf_counter()
    entry: dict = {"model": path.name, "tolerance": {"max_accuracy_drop": INT8_MAX_ACCURACY_DROP,
                                                     "min_label_agreement": INT8_MIN_LABEL_AGREEMENT},
                   "decided_on": INT8_DECISION_SPLIT}
    try:
        with atomic_path(path) as tmp:
            entry["quantization"] = quantize_int8(out, tmp, head, encoder_nodes, data, calibration_rows)
            entry["size_bytes"] = tmp.stat().st_size
            entry["float_size_bytes"] = out.stat().st_size
            batch_size = 16 if head.fingerprint.get("kind") == "text" else 64
            for split in (INT8_DECISION_SPLIT, "test"):
                entry[split] = compare_on_split(out, tmp, split_items(head, split, data), batch_size)
            val = entry[INT8_DECISION_SPLIT]
            drop = val["reference_accuracy"] - val["accuracy"]
            if drop > INT8_MAX_ACCURACY_DROP or val["label_agreement"] < INT8_MIN_LABEL_AGREEMENT:
                raise ExportError(
                    f"{path}: the int8 graph is not kept: on the {val['n']} {INT8_DECISION_SPLIT} items its accuracy "
                    f"is {val['accuracy']:.4f} against the float graph's {val['reference_accuracy']:.4f} (at most "
                    f"{INT8_MAX_ACCURACY_DROP:.3f} lower allowed) and its labels agree with the float graph's on "
                    f"{val['label_agreement']:.1%} (at least {INT8_MIN_LABEL_AGREEMENT:.0%} required)")
    except ExportError as exc:
        return {**entry, "kept": False, "problem": str(exc)}, str(exc)
    return {**entry, "kept": True, "seconds": round(time.perf_counter() - started, 2)}, None
