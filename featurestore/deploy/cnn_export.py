"""The small CNN from scratch (``heads.cnn``) through the same export as every model: one ONNX graph, checked
against the Python model before it is kept, read by the same ``predict``.

Input ``images`` uint8 (N, 3, S, S) as ``predict`` decodes them (S = 28 by default); the pixel baseline's front end
(``baseline_export.pixel_graph``: PIL's grey formula, /255), then the network exported by torch (the reshape to
(N, 1, S, S), its standardisation, convolutions and classifier, a softmax and the argmax). Outputs, metadata and
report are ``export.export_onnx``'s: ``probabilities`` (N, K) float32, ``label`` (N,) int64.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..encode.engines import ONNX_OPSET
from ..heads.baseline import pixel_preprocessing
from ..heads.cnn import SmallCNNModel, load_small_cnn
from .baseline_export import pixel_graph, write_checked
from .export import HEAD_INPUT, MODEL_KEY, MODEL_KIND_KEY, _sample_images, combine


class PixelsToClasses(nn.Module):
    """Grey pixels (N, S·S) float32 in [0, 1] → (probabilities (N, K) float32, label (N,) int64)."""

    def __init__(self, network: nn.Module, size: int):
        super().__init__()
        self.network, self.size = network, size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.network(pixels.view(-1, 1, self.size, self.size)), dim=1)
        return probabilities, probabilities.argmax(dim=1)


def network_graph(model: SmallCNNModel) -> onnx.ModelProto:
    """The network as ONNX: input ``head_features`` (the front end's output), outputs probabilities and label."""
    size = model.image_size
    wrapper = PixelsToClasses(model.network(), size).eval()
    example = torch.rand(2, size * size)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(folder) / "cnn.onnx"
        torch.onnx.export(wrapper, (example,), str(path), input_names=[HEAD_INPUT],
                          output_names=["probabilities", "label"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, opset_version=ONNX_OPSET,
                          external_data=False)
        return onnx.load(str(path))


def export_small_cnn_onnx(model: SmallCNNModel | str | Path, out: str | Path) -> dict:
    """Write ``out`` (one .onnx file) and ``<out>.report.json`` for a small CNN model file; return the report.
    The check batch: noise, gradient and flat images (``export._sample_images``)."""
    started = time.perf_counter()
    model = model if isinstance(model, SmallCNNModel) else load_small_cnn(model)
    graph = combine(pixel_graph(model.image_size), network_graph(model))
    images = _sample_images(model.image_size)
    metadata = {"featurestore_class_names": json.dumps(model.class_names),
                "featurestore_fingerprint_hash": model.store_fingerprint_hash,
                "featurestore_head": json.dumps(model.summary(), sort_keys=True), MODEL_KEY: model.name,
                MODEL_KIND_KEY: "small_cnn", "featurestore_modality": "image",
                "featurestore_preprocessing": json.dumps(pixel_preprocessing(model.image_size).as_dict(),
                                                         sort_keys=True)}
    return write_checked(graph, Path(out), metadata, {"images": images}, model.predict_proba(images),
                         model.summary(), started)
