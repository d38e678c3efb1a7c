"""featurestore: frozen pretrained embeddings in an HDF5 cache, and cheap heads on top.

Notebook entry points::

    from featurestore import FeatureStore, extract_features, load_backbone
"""

__version__ = "0.1.0"

from .errors import FeaturestoreError  # noqa: E402
from .store import FeatureStore  # noqa: E402


def __getattr__(name: str):
    # torch is heavy: import the extraction API only when it is used.
    if name in ("extract_features", "ExtractSummary"):
        from . import extract

        return getattr(extract, name)
    if name in ("load_backbone", "list_backbones", "get_spec"):
        from . import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")


__all__ = ["FeatureStore", "FeaturestoreError", "extract_features", "load_backbone", "list_backbones", "get_spec"]
