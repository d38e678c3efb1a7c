"""One ONNX graph for backbone + head: uint8 images (or token windows) in, class probabilities and labels out.

The backbone's graph is the one extraction already exported and cached (engines.py, text_engines.py), so
an export after a head change costs no new trace of the network. The head's graph is appended behind it:
linear heads (logreg, linear SVM) are written here as plain operators (Gemm, Softmax/Sigmoid,
ArgMax) with the scaler folded into the weights, which every execution provider runs; the RBF SVM
is converted by skl2onnx. Every export is checked against the Python pipeline (torch backbone +
scikit-learn head) before it is kept.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper

from ..encode.backbones import FeatureModel, get_spec, load_backbone
from ..encode.engines import ONNX_OPSET, cached_feature_graph
from ..errors import ExportError
from ..heads.estimators import fold_scaler
from ..heads.head import TrainedHead, load_head
from ..heads.scaling import FeatureScaler
from ..utils.atomic import atomic_path, write_text_atomic

MAX_PROBABILITY_DIFF = 1e-4
HEAD_IR_VERSION = 10
HEAD_INPUT = "head_features"


@dataclass(frozen=True)
class LinearHeadParams:
    """F linear models on raw (unscaled) features: ``weight`` (F, K, D) and ``bias`` (F, K) float64.

    F=1 for logistic regression: probabilities = softmax of the decisions. For a calibrated SVM the
    F models are the calibration folds and ``calibration`` holds sklearn's sigmoid parameters a, b
    (F, K): per class ``sigmoid(-(a·d + b))``, normalised over classes, averaged over folds, as
    ``CalibratedClassifierCV.predict_proba`` does. ``l2_normalize``: features are L2-normalised first.
    """

    weight: np.ndarray
    bias: np.ndarray
    l2_normalize: bool
    calibration: tuple[np.ndarray, np.ndarray] | None = None


def linear_head_params(head: TrainedHead) -> LinearHeadParams:
    """The decisions of a logreg or calibrated linear-SVM head (3 or more classes) as plain arrays."""
    classify = head.estimator.named_steps["classify"]
    if len(head.class_names) < 3:
        raise ExportError("linear heads are exported for 3 or more classes; use svm_rbf (skl2onnx) for 2")
    if head.config.head == "logreg":
        weight, bias, l2 = fold_scaler(head.estimator, classify.coef_[None], classify.intercept_[None])
        return LinearHeadParams(weight, bias, l2)
    if head.config.head == "sgd_logreg":  # one-vs-rest: sigmoid(d) per class, normalised (a = -1, b = 0)
        weight, bias, l2 = fold_scaler(head.estimator, classify.coef_[None], classify.intercept_[None])
        k = weight.shape[1]
        return LinearHeadParams(weight, bias, l2, calibration=(-np.ones((1, k)), np.zeros((1, k))))
    folds = classify.calibrated_classifiers_
    weight = np.stack([fold.estimator.coef_ for fold in folds])
    bias = np.stack([fold.estimator.intercept_ for fold in folds])
    a = np.array([[c.a_ for c in fold.calibrators] for fold in folds])
    b = np.array([[c.b_ for c in fold.calibrators] for fold in folds])
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


def backbone_for(head: TrainedHead, backbone: str | None = None, weights: str | Path | None = None) -> FeatureModel:
    """Rebuild the backbone that produced the head's training features, and prove it is the same: weights,
    preprocessing, width, the feature path's code and the library versions (the store's fingerprint, less
    the stored dtype and compute precision, which the exported float32 graph does not share)."""
    from ..encode.fingerprint import changed_keys, fingerprint_for

    fp = head.fingerprint
    pre = fp["preprocessing"]
    spec = get_spec(backbone or fp["backbone"], search=(Path(head.store_path).parent,))
    model = load_backbone(spec, weights=weights, image_size=pre["image_size"],
                          crop_pct=pre["crop_pct"])
    if model.weights_sha256 != fp["weights_sha256"]:
        raise ExportError(
            f"the backbone's weights ({model.weights_path}, sha256 {model.weights_sha256[:12]}…) are not the "
            f"ones the head was trained on (sha256 {fp['weights_sha256'][:12]}…): pass --weights with that checkpoint"
        )
    current = fingerprint_for(model, fp.get("dtype", "float32"), fp.get("compute") == "autocast-float16")
    changed = [key for key in changed_keys(fp, current) if key not in ("backbone",)]
    if changed or model.feature_dim != head.feature_dim:
        raise ExportError(
            f"backbone {model.name} would not reproduce the features head {head.name} was trained on "
            f"({', '.join(changed) or 'feature width'} changed since extraction): re-extract and retrain the head"
        )
    return model.cpu().to(memory_format=torch.contiguous_format)


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


def combine(backbone: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """The backbone's ``features`` output fed into the head's input; outputs probabilities and label."""
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
    with torch.inference_mode():
        features = model(torch.from_numpy(images)).numpy()
    return EncoderParts(onnx.load(str(cached_feature_graph(model))), {"images": images}, features,
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
    libraries); its graph takes token windows; the tokenizer file goes into the metadata."""
    from ..configs import Tokenization
    from ..encode.backbones import load_text_backbone
    from ..encode.fingerprint import changed_keys
    from ..encode.text_engines import cached_text_graph
    from ..encode.texts import TextEncoder

    fp = head.fingerprint
    model = load_text_backbone(get_spec(fp["backbone"], search=(Path(head.store_path).parent,)))
    tokenization = Tokenization(**fp["tokenization"])
    encoder = TextEncoder(model, tokenization, fp.get("dtype", "float32"))
    changed = changed_keys(fp, encoder.fingerprint())
    if changed:
        raise ExportError(f"text backbone {model.name} would not reproduce the features head {head.name} was trained "
                          f"on ({', '.join(changed)} changed since extraction): re-extract and retrain the head")
    ids, mask, _ = encoder.tokenizer(list(SAMPLE_TEXTS))
    with torch.inference_mode():
        features = model(ids, mask).numpy()
    tokenizer_json = (model.model_dir / "tokenizer.json").read_text(encoding="utf-8")
    return EncoderParts(onnx.load(str(cached_text_graph(model))), {"input_ids": ids.numpy(),
                                                                  "attention_mask": mask.numpy()}, features,
                        {"featurestore_modality": "text", "featurestore_tokenization": json.dumps(
                            tokenization.as_dict(), sort_keys=True), "featurestore_tokenizer_json": tokenizer_json,
                         "featurestore_tokenizer_sha256": model.tokenizer_sha256})


def verify_export(path: Path, head: TrainedHead, parts: EncoderParts) -> dict:
    """Compare the ONNX graph (onnxruntime, CPU) with the torch encoder + sklearn head on the parts' batch."""
    from ..encode.runtime import make_session

    session, _ = make_session(str(path), "cpu")
    probabilities, labels = session.run(["probabilities", "label"], parts.feed)
    expected = head.predict_proba(parts.reference_features)
    diff = float(np.max(np.abs(probabilities - expected)))
    # A label may differ only where the Python pipeline itself has a tie within the tolerance (two classes with
    # equal probability on a tiny model): the graph's label must be one of the classes at the maximum.
    chosen = expected[np.arange(len(labels)), labels]
    return {
        "n": int(len(expected)),
        "max_probability_diff": diff,
        "labels_equal": bool(np.all(chosen >= expected.max(axis=1) - MAX_PROBABILITY_DIFF)),
        "tolerance": MAX_PROBABILITY_DIFF,
        "output_dtypes": [str(probabilities.dtype), str(labels.dtype)],
    }


def export_onnx(head: TrainedHead | str | Path, out: str | Path, backbone: str | None = None,
                weights: str | Path | None = None, sample_images: np.ndarray | None = None,
                trust_pickle: bool = False) -> dict:
    """Write ``out`` (one self-contained .onnx file) and ``<out>.report.json``; return the report.

    Images: input ``images`` uint8 (N, 3, S, S). Texts: inputs ``input_ids`` and ``attention_mask`` int64
    (N, W, L), token windows made by the tokenizer stored in the metadata (see ``predict.py``). Every axis is
    dynamic. Outputs ``probabilities`` (N, K) float32 and ``label`` (N,) int64. Metadata: class names,
    fingerprint, head summary, and the modality's preprocessing or tokenization.
    Raises :class:`ExportError` (and keeps no file) when the graph disagrees with the Python pipeline.
    """
    started = time.perf_counter()
    head = head if isinstance(head, TrainedHead) else load_head(head, trust_pickle=trust_pickle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = head.fingerprint.get("kind") == "text"
    parts = text_parts(head) if text else image_parts(head, backbone, weights, sample_images)
    if head.config.head in ("logreg", "linear_svm", "sgd_logreg"):
        head_graph = linear_head_graph(linear_head_params(head), head.feature_dim)
    else:
        head_graph = skl2onnx_head_graph(head)
    head_graph = spread_to_classes(head_graph, head.classes, len(head.class_names))
    graph = combine(parts.graph, head_graph)
    metadata = {
        "featurestore_class_names": json.dumps(head.class_names),
        "featurestore_fingerprint": json.dumps(head.fingerprint, sort_keys=True),
        "featurestore_fingerprint_hash": head.fingerprint_hash,
        "featurestore_head": json.dumps(head.summary(), sort_keys=True),
        **parts.metadata,
    }
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)  # every node's types and shapes, not only the structure
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))
        check = verify_export(tmp, head, parts)
        ops = sorted({node.op_type for node in graph.graph.node})
        report = {
            "model": out.name, "modality": metadata["featurestore_modality"], "head": head.summary(), "check": check,
            "operators": ops, "opsets": {d.domain or "ai.onnx": d.version for d in graph.opset_import},
            "ir_version": graph.ir_version, "size_bytes": tmp.stat().st_size,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if check["max_probability_diff"] > MAX_PROBABILITY_DIFF or not check["labels_equal"]:
            raise ExportError(f"{out}: the exported graph disagrees with the Python pipeline: {check}")
    write_text_atomic(Path(str(out) + ".report.json"), json.dumps(report, indent=2) + "\n")
    return report
