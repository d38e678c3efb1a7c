"""Inference engines that run a :class:`FeatureModel` over uint8 batches.

- ``torch``: eager PyTorch under ``inference_mode``; channels-last; float16 autocast on CUDA.
- ``onnxruntime``: the same model exported once to ONNX (cached by weights hash, input size and
  torch version) and run by onnxruntime's CPU provider: several times faster than eager on a
  small CPU (``benchmarks/extract.py``), features equal to eager within 1e-5.

``auto`` picks onnxruntime on the CPU and torch on CUDA. Float32 engines agree to float
rounding, so the engine is recorded with the store but is not part of the fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..configs import ENGINE_CHOICES
from ..errors import BadValueError
from ..utils.atomic import atomic_path
from ..utils.provenance import COMMON_FEATURE_MODULES, code_digest
from ..utils.validation import check_choice
from .backbones import FeatureModel

log = logging.getLogger("featurestore")

ONNX_OPSET = 18


def cache_dir() -> Path:
    """Where exported ONNX graphs are kept: ``$FEATURESTORE_CACHE`` or ``~/.cache/featurestore``."""
    root = os.environ.get("FEATURESTORE_CACHE") or Path.home() / ".cache" / "featurestore"
    return Path(root) / "onnx"


class TorchEngine:
    """Eager PyTorch. Call: uint8 (B, C, S, S), C = 3, or 1 for grayscale (expanded on the device by the model's
    normalisation, bit-identical to three equal channels) → float32 numpy (B, D).

    On CUDA: float16 autocast (``autocast``, default on), channels-last under autocast and NCHW without it (in
    float32, channels-last sends every depthwise convolution to cuDNN's slow grouped kernels), cuDNN's autotuner
    on, and every batch padded to the first one's size (``pad``) so that the tail is not a second shape whose
    plans are built inside the run; eval-mode BatchNorm makes the padded rows irrelevant to the real ones."""

    name = "torch"

    def __init__(self, model: FeatureModel, device: torch.device, autocast: bool | None = None,
                 pad: bool | None = None):
        cuda = device.type == "cuda"
        self.device = device
        self.autocast = cuda if autocast is None else autocast
        self.pad = cuda if pad is None else pad
        self.layout = torch.contiguous_format if cuda and not self.autocast else torch.channels_last
        self.model = model.to(device).to(memory_format=self.layout)
        self.full: int | None = None
        if cuda:
            torch.backends.cudnn.benchmark = True

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        count = len(batch)
        if self.pad:
            self.full = self.full or count
            if count < self.full:  # repeat the last image: one batch shape for the whole run
                batch = torch.cat([batch, batch[-1:].expand(self.full - count, *batch.shape[1:])])
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            return self.model(batch)[:count].float().cpu().numpy()


def export_feature_model(model: FeatureModel, path: Path) -> Path:
    """Export ``model`` as ONNX with a dynamic batch axis: input ``images`` uint8 (N, 3, S, S),
    output ``features`` float32 (N, D). Written to a temporary file and renamed into place."""
    size = model.preprocessing.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    # The exporter narrates every step on stdout; keep stdout for the command's own output.
    with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=ONNX_OPSET,
            external_data=False,
        )
    return path


def model_code_digest(model: FeatureModel) -> str:
    """SHA-256 of the source that defines what ``model``'s exported graph computes (its architecture's
    modules, the common feature path and this module): editing any of it must not reuse an old graph."""
    return code_digest(tuple(model.code_modules) + COMMON_FEATURE_MODULES + (__name__,))


def onnx_path_for(model: FeatureModel) -> Path:
    """Where the cache keeps ``model``'s graph: keyed by name, weights hash, preprocessing, width, torch
    version and :func:`model_code_digest`."""
    key = "|".join([model.name, model.weights_sha256, model.preprocessing.as_json(), str(model.feature_dim),
                    torch.__version__, model_code_digest(model)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{model.name.replace(':', '_')}-{model.preprocessing.image_size}px-{digest}.onnx"


def cached_feature_graph(model: FeatureModel) -> Path:
    """The model's ONNX graph (see :func:`export_feature_model`) from the cache, exported on first use."""
    path = onnx_path_for(model)
    if not path.is_file():
        log.info("exporting %s to ONNX once (%s)", model.name, path)
        export_feature_model(model, path)
    return path


class OnnxRuntimeEngine:
    """onnxruntime on the CPU provider. Call: uint8 (B, C, S, S), C = 3 or 1 (grayscale, expanded here to the
    graph's three channels) → float32 numpy (B, D)."""

    name = "onnxruntime"

    def __init__(self, model: FeatureModel):
        from .runtime import make_session, rank_threads

        path = cached_feature_graph(model)
        # No spinning threads (make_session): they starve the DataLoader workers on a small CPU.
        self.session, _ = make_session(str(path), "cpu", intra_op_threads=rank_threads())
        self.path = path

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        images = batch.numpy()
        if images.shape[1] == 1:
            images = np.ascontiguousarray(np.broadcast_to(images, (len(images), 3, *images.shape[2:])))
        return self.session.run(None, {"images": images})[0]


def make_engine(model: FeatureModel, device: torch.device, engine: str = "auto",
                autocast: bool | None = None) -> TorchEngine | OnnxRuntimeEngine:
    """The engine to run ``model`` on ``device``; ``auto`` falls back to torch if export fails. ``autocast``:
    float16 autocast of the torch engine (default: on CUDA)."""
    check_choice("engine", engine, ENGINE_CHOICES)
    if engine == "torch" or (engine == "auto" and device.type != "cpu"):
        return TorchEngine(model, device, autocast)
    if device.type != "cpu":
        raise BadValueError("the onnxruntime engine runs on the CPU here; use --engine torch (or auto) for CUDA")
    try:
        return OnnxRuntimeEngine(model)
    except Exception as exc:
        if engine == "onnxruntime":
            raise
        log.warning("ONNX export of %s failed (%s); using eager torch", model.name, exc)
        return TorchEngine(model, device)
