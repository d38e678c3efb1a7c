"""Deployment: backbone + head as one verified ONNX graph, batch inference with onnxruntime, and which head a
data set deploys.
"""

from .deployment import deployed_model, export_model
from .export import export_onnx
from .predict import OnnxClassifier, predict

__all__ = [
    "deployed_model",
    "export_model",
    "export_onnx",
    "OnnxClassifier",
    "predict",
]
