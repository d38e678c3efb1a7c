"""The sentence encoder as an ONNX graph on onnxruntime's CPU provider, exported once and cached.

Input ``input_ids`` and ``attention_mask`` int64 (D, W, L), every axis dynamic; output ``features`` float32
(D, H): the whole :class:`TextFeatureModel` (encoder, pooling, normalisation, window mean). The cache key
covers the weights, the code the model's forward runs (transformers' BERT modules included), and the versions of
torch, transformers and the exporter, as for image graphs (``engines.graph_key``); not the tokenizer, which runs
outside the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from ..utils.atomic import atomic_path
from .backbones.text_models import TextFeatureModel
from .engines import ONNX_OPSET, cache_dir, graph_key

log = logging.getLogger("featurestore")


def text_graph_path(model: TextFeatureModel) -> Path:
    """Where the cache keeps ``model``'s graph: keyed by name, weights hash, width (and the layers of a multi-layer
    model) and ``engines.graph_provenance``
    (with this module as code)."""
    identity = [model.name, model.weights_sha256, str(model.feature_dim)]
    if getattr(model, "layers", None):  # a LayeredTextFeatureModel: which layers it emits
        identity.append(str(list(model.layers)))
    digest = graph_key(model, identity, (__name__,))
    return cache_dir() / f"{model.name}-text-{digest}.onnx"


def export_text_model(model: TextFeatureModel, path: Path) -> Path:
    """Export ``model`` with dynamic documents, windows and tokens (see the module docstring)."""
    example = (torch.ones(2, 2, 16, dtype=torch.int64), torch.ones(2, 2, 16, dtype=torch.int64))
    dims = {0: torch.export.Dim("documents"), 1: torch.export.Dim("windows"), 2: torch.export.Dim("tokens", max=512)}
    with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.cpu().eval(), example, str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["features"], dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                          opset_version=ONNX_OPSET, external_data=False)
    return path


def cached_text_graph(model: TextFeatureModel) -> Path:
    """The model's ONNX graph from the cache, exported on first use."""
    path = text_graph_path(model)
    if not path.is_file():
        log.info("exporting %s to ONNX once (%s)", model.name, path)
        export_text_model(model, path)
    return path


def make_text_session(model: TextFeatureModel, engine: str = "auto"):
    """An onnxruntime CPU session of ``model``'s cached graph for ``engine`` "onnxruntime", or None for eager
    torch ("torch", and "auto": on this 2-core CPU eager torch encodes all-MiniLM-L6-v2 at 14.4 texts/s against
    11.8 for its ONNX graph, measured by benchmarks/text.py; images are the other way round)."""
    if engine in ("torch", "auto"):
        return None
    from .runtime import make_session, rank_threads

    session, _ = make_session(str(cached_text_graph(model)), "cpu", intra_op_threads=rank_threads())
    return session
