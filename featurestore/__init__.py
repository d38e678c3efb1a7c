"""featurestore: frozen pretrained embeddings in an HDF5 cache, and cheap heads on top.

Notebook entry points::

    from featurestore import FeatureStore, extract_features, load_backbone, train_head, HeadConfig

The layers, from the bottom: ``errors``, ``utils``, ``configs``, ``data`` | ``store``, ``encode``,
``extract`` | ``heads``, ``transfer`` | ``deploy``, ``commands``, ``cli`` (docs/architecture.md).
"""

__version__ = "0.1.0"

from .configs import FinetuneConfig, HeadConfig  # noqa: E402
from .errors import FeaturestoreError  # noqa: E402
from .store import FeatureStore  # noqa: E402

# torch and scikit-learn are heavy: these names are imported when first used.
_LAZY = {
    "extract_features": "featurestore.extract", "ExtractSummary": "featurestore.extract",
    "load_backbone": "featurestore.encode.backbones", "list_backbones": "featurestore.encode.backbones",
    "get_spec": "featurestore.encode.backbones",
    "train_head": "featurestore.heads", "load_head": "featurestore.heads", "TrainedHead": "featurestore.heads",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")


__all__ = ["FeatureStore", "FeaturestoreError", "FinetuneConfig", "HeadConfig", *_LAZY]
