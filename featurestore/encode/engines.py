"""Inference engines that run a :class:`FeatureModel` over uint8 batches.

- ``torch``: eager PyTorch under ``inference_mode``; channels-last; float16 autocast on CUDA.
- ``onnxruntime``: the same model exported once to ONNX (cached by weights hash, input size, the
  code its forward runs and the versions of torch, the model's libraries and the exporter) and run
  by onnxruntime's CPU provider: several times faster than eager on a small CPU
  (``benchmarks/extract.py``), features equal to eager within 1e-5.

``auto`` picks onnxruntime on the CPU and torch on CUDA. Float32 engines agree to float
rounding, so the engine is recorded with the store but is not part of the fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..configs import ENGINE_CHOICES
from ..errors import BadValueError
from ..utils.atomic import atomic_path
from ..utils.provenance import COMMON_FEATURE_MODULES, code_digest, forward_modules, module_libraries
from ..utils.validation import check_choice
from .backbones import FeatureModel
from .backbones.weights import cache_root

log = logging.getLogger("featurestore")

ONNX_OPSET = 18
# Packages that translate and write the graph for torch.onnx.export's default (dynamo) exporter.
EXPORTER_PACKAGES = ("onnxscript", "onnx_ir", "onnx")


def cache_dir() -> Path:
    """Where exported ONNX graphs are kept: ``$FEATURESTORE_CACHE`` or ``~/.cache/featurestore``."""
    return cache_root() / "onnx"


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """IEEE float32 for CUDA's float32 convolutions, RNNs and matmuls inside the block, the process's settings back
    after it. cuDNN convolutions default to TF32 (a 10-bit mantissa), so without this a store fingerprinted
    "float32" would hold other features on a GPU than on a CPU. Only torch's current (``fp32_precision``) switches
    are read and written: mixing them with the legacy ``allow_tf32`` ones makes torch refuse to read the latter."""
    switches = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
    before = [switch.fp32_precision for switch in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "ieee"
        yield
    finally:
        for switch, value in zip(switches, before, strict=True):
            switch.fp32_precision = value


class TorchEngine:
    """Eager PyTorch. Call: uint8 (B, C, S, S), C = 3, or 1 for grayscale (expanded on the device by the model's
    normalisation, bit-identical to three equal channels) → float32 numpy (B, D).

    Float32 is exact IEEE float32 (:func:`exact_float32`: no TF32). On CUDA: float16 autocast (``autocast``,
    default on), channels-last under autocast and NCHW without it (in float32, channels-last sends every depthwise
    convolution to cuDNN's slow grouped kernels), cuDNN's autotuner on, and every batch padded to the first one's
    size (``pad``) so that the tail is not a second shape whose plans are built inside the run; eval-mode BatchNorm
    makes the padded rows irrelevant to the real ones."""

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
        with torch.inference_mode(), exact_float32(), \
                torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
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


def graph_provenance(model: torch.nn.Module, code: tuple[str, ...] = ()) -> dict:
    """What decides the graph an export of ``model`` (a frozen image or text feature model) writes, besides its
    identity and weights: ``modules``, the source modules its forward runs (its ``code_modules`` and its classes',
    see :func:`~featurestore.utils.provenance.forward_modules`) and ``code`` (the exporting module, and what else
    shapes the graph); ``code_sha256``, their digest; ``libraries``, the versions of the distributions those modules
    come from (torch; timm or transformers) and of the exporter's (:data:`EXPORTER_PACKAGES`)."""
    modules = forward_modules(model, model.code_modules) + tuple(code)
    return {"modules": modules, "code_sha256": code_digest(modules),
            "libraries": module_libraries(modules + EXPORTER_PACKAGES)}


def graph_key(model: torch.nn.Module, identity: list[str], code: tuple[str, ...] = ()) -> str:
    """16 hex digits naming ``model``'s cached graph: ``identity`` (name, weights hash, …) and
    :func:`graph_provenance`, so an edit or an upgrade of anything that writes the graph never reuses an old one."""
    provenance = graph_provenance(model, code)
    key = json.dumps([identity, provenance["code_sha256"], provenance["libraries"]], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def onnx_path_for(model: FeatureModel) -> Path:
    """Where the cache keeps ``model``'s graph: keyed by name, weights hash, preprocessing, width (and the layers of
    a multi-layer model) and
    :func:`graph_provenance` (with the common feature path and this module as code)."""
    identity = [model.name, model.weights_sha256, model.preprocessing.as_json(), str(model.feature_dim)]
    if getattr(model, "layers", None):  # a LayeredFeatureModel: which layers it emits
        identity.append(json.dumps(model.layers))
    digest = graph_key(model, identity, COMMON_FEATURE_MODULES + (__name__,))
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
