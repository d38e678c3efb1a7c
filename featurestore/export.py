"""One ONNX graph for backbone + head: uint8 images in, class probabilities and labels out.

Linear heads (logreg, linear SVM) become torch modules with the scaler folded into the weights and
are exported together with the backbone, so the graph holds only plain operators (Conv, MatMul,
Add, Softmax/Sigmoid, ArgMax) that every execution provider runs. The RBF SVM is converted by
skl2onnx and merged behind the backbone's graph. Every export is checked against the Python
pipeline (torch backbone + scikit-learn head) before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import FeatureModel, load_backbone
from .engines import ONNX_OPSET, export_feature_model
from .errors import FeaturestoreError
from .heads import TrainedHead, fold_scaler, load_head

log = logging.getLogger("featurestore")

MAX_PROBABILITY_DIFF = 1e-4


class ExportError(FeaturestoreError):
    """The exported graph does not reproduce the Python pipeline, or cannot be built."""


class LinearProbabilities(nn.Module):
    """features (N, D) → probabilities (N, K) float32 and labels (N,) int64, from linear decisions.

    ``weight`` (F, K, D) and ``bias`` (F, K) hold F linear models (the calibration folds of an SVM,
    or F=1 for logistic regression). ``softmax`` heads: softmax of the decisions. Calibrated heads:
    per class ``sigmoid(-(a·d + b))`` (sklearn's sigmoid calibration), normalised over classes, then
    averaged over folds, as ``CalibratedClassifierCV.predict_proba`` does.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, l2_normalize: bool,
                 calibration: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32))
        self.l2_normalize = l2_normalize
        self.calibrated = calibration is not None
        if calibration is not None:
            self.register_buffer("cal_a", torch.tensor(calibration[0], dtype=torch.float32))
            self.register_buffer("cal_b", torch.tensor(calibration[1], dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.l2_normalize:
            features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        decisions = torch.matmul(features, self.weight.transpose(1, 2)) + self.bias[:, None, :]  # (F, N, K)
        if self.calibrated:
            per_class = torch.sigmoid(-(self.cal_a[:, None, :] * decisions + self.cal_b[:, None, :]))
            probabilities = (per_class / per_class.sum(dim=2, keepdim=True)).mean(dim=0)
        else:
            probabilities = torch.softmax(decisions[0], dim=1)
        return probabilities, torch.argmax(probabilities, dim=1)


def linear_head_module(head: TrainedHead) -> LinearProbabilities:
    """The torch equivalent of a logreg or calibrated linear-SVM head (more than 2 classes)."""
    classify = head.estimator.named_steps["classify"]
    if len(head.class_names) < 3:
        raise ExportError("linear heads are exported for 3 or more classes; use svm_rbf (skl2onnx) for 2")
    if head.config.head == "logreg":
        weight, bias, l2 = fold_scaler(head.estimator, classify.coef_[None], classify.intercept_[None])
        return LinearProbabilities(weight, bias, l2)
    folds = classify.calibrated_classifiers_
    weight = np.stack([fold.estimator.coef_ for fold in folds])
    bias = np.stack([fold.estimator.intercept_ for fold in folds])
    a = np.array([[c.a_ for c in fold.calibrators] for fold in folds])
    b = np.array([[c.b_ for c in fold.calibrators] for fold in folds])
    weight, bias, l2 = fold_scaler(head.estimator, weight, bias)
    return LinearProbabilities(weight, bias, l2, calibration=(a, b))


class ImageClassifier(nn.Module):
    """uint8 images (N, 3, S, S) → (probabilities (N, K) float32, label (N,) int64)."""

    def __init__(self, backbone: FeatureModel, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(images))


def backbone_for(head: TrainedHead, backbone: str | None = None, weights: str | Path | None = None) -> FeatureModel:
    """Rebuild the backbone that produced the head's training features, and prove it is the same."""
    fp = head.fingerprint
    pre = fp["preprocessing"]
    model = load_backbone(backbone or fp["backbone"], weights=weights, image_size=pre["image_size"],
                          crop_pct=pre["crop_pct"])
    if model.weights_sha256 != fp["weights_sha256"]:
        raise ExportError(
            f"the backbone's weights ({model.weights_path}, sha256 {model.weights_sha256[:12]}…) are not the "
            f"ones the head was trained on (sha256 {fp['weights_sha256'][:12]}…): pass --weights with that checkpoint"
        )
    if model.preprocessing.as_dict() != pre or model.feature_dim != head.feature_dim:
        raise ExportError(f"backbone {model.name} does not reproduce the head's features (preprocessing or width)")
    return model.cpu().to(memory_format=torch.contiguous_format)


def _export_linear(model: FeatureModel, head: TrainedHead, path: Path) -> None:
    size = model.preprocessing.image_size
    classifier = ImageClassifier(model, linear_head_module(head)).eval()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            classifier, (example,), str(path), input_names=["images"], output_names=["probabilities", "label"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=ONNX_OPSET,
            external_data=False,
        )


def _export_skl2onnx(model: FeatureModel, head: TrainedHead, path: Path) -> None:
    """Backbone graph + skl2onnx graph of the sklearn pipeline, merged on the features tensor."""
    import onnx
    from onnx import compose, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    backbone_path = path.with_name(path.name + ".backbone.tmp")
    export_feature_model(model, backbone_path)
    backbone = onnx.load(str(backbone_path))
    backbone_path.unlink()
    opset = {d.domain: d.version for d in backbone.opset_import}.get("", ONNX_OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skl2onnx reads SVC attributes sklearn deprecates
        head_graph = to_onnx(
            head.estimator, initial_types=[("head_features", FloatTensorType([None, head.feature_dim]))],
            options={id(head.estimator.named_steps["classify"]): {"zipmap": False}},
            target_opset={"": opset, "ai.onnx.ml": 3},
        )
    head_graph.ir_version = backbone.ir_version  # align IR versions before merging
    for imported in head_graph.opset_import:
        if imported.domain not in {d.domain for d in backbone.opset_import}:
            backbone.opset_import.append(helper.make_opsetid(imported.domain, imported.version))
    merged = compose.merge_models(backbone, head_graph, io_map=[("features", "head_features")])
    names = sorted(o.name for o in merged.graph.output)
    if names != ["label", "probabilities"]:
        raise ExportError(f"skl2onnx produced outputs {names}, expected label and probabilities")
    onnx.save(merged, str(path))


def _sample_images(size: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """A fixed check batch, uint8 (count, 3, size, size): noise, gradients and flat images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images[1] = np.broadcast_to(ramp[None, None, :], (3, size, size)).astype(np.uint8)
    images[2] = np.broadcast_to(ramp[None, :, None], (3, size, size)).astype(np.uint8)
    images[3] = 128
    return images


def verify_export(path: Path, model: FeatureModel, head: TrainedHead, images: np.ndarray) -> dict:
    """Compare the ONNX graph (onnxruntime, CPU) with torch backbone + sklearn head on ``images``."""
    from .runtime import make_session

    session, _ = make_session(str(path), "cpu")
    probabilities, labels = session.run(["probabilities", "label"], {"images": images})
    with torch.inference_mode():
        features = model(torch.from_numpy(images)).numpy()
    expected = head.predict_proba(features)
    diff = float(np.max(np.abs(probabilities - expected)))
    return {
        "n": int(len(images)),
        "max_probability_diff": diff,
        "labels_equal": bool(np.array_equal(labels, np.argmax(expected, axis=1))),
        "tolerance": MAX_PROBABILITY_DIFF,
        "output_dtypes": [str(probabilities.dtype), str(labels.dtype)],
    }


def export_onnx(head: TrainedHead | str | Path, out: str | Path, backbone: str | None = None,
                weights: str | Path | None = None, sample_images: np.ndarray | None = None) -> dict:
    """Write ``out`` (one self-contained .onnx file) and ``<out>.report.json``; return the report.

    Input ``images``: uint8 (N, 3, S, S), N dynamic. Outputs ``probabilities`` (N, K) float32 and
    ``label`` (N,) int64. Metadata: class names, fingerprint, head summary, preprocessing.
    Raises :class:`ExportError` (and keeps no file) when the graph disagrees with the Python pipeline.
    """
    import onnx

    started = time.perf_counter()
    head = head if isinstance(head, TrainedHead) else load_head(head)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = backbone_for(head, backbone, weights)
    tmp = out.with_name(out.name + ".tmp")
    if head.config.head in ("logreg", "linear_svm"):
        _export_linear(model, head, tmp)
    else:
        _export_skl2onnx(model, head, tmp)
    graph = onnx.load(str(tmp))
    metadata = {
        "featurestore_class_names": json.dumps(head.class_names),
        "featurestore_fingerprint": json.dumps(head.fingerprint, sort_keys=True),
        "featurestore_fingerprint_hash": head.fingerprint_hash,
        "featurestore_head": json.dumps(head.summary(), sort_keys=True),
        "featurestore_preprocessing": json.dumps(model.preprocessing.as_dict(), sort_keys=True),
    }
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))

    images = sample_images if sample_images is not None else _sample_images(model.preprocessing.image_size)
    check = verify_export(tmp, model, head, images)
    ops = sorted({node.op_type for node in graph.graph.node})
    report = {
        "model": str(out), "head": head.summary(), "check": check, "operators": ops,
        "opsets": {d.domain or "ai.onnx": d.version for d in graph.opset_import}, "ir_version": graph.ir_version,
        "size_bytes": tmp.stat().st_size, "seconds": round(time.perf_counter() - started, 2),
    }
    if check["max_probability_diff"] > MAX_PROBABILITY_DIFF or not check["labels_equal"]:
        tmp.unlink()
        raise ExportError(f"{out}: the exported graph disagrees with the Python pipeline: {check}")
    tmp.replace(out)
    Path(str(out) + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
