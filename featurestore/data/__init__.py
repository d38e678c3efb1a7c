"""Labelled sources (folders, CSV/JSON Lines manifests) and the preparation of the default data sets.

A source never opens an item: decoding lives with its modality in :mod:`featurestore.encode`.
"""

from .prepare import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    PrepareCounts,
    prepare_bbc_news,
    prepare_fashion_mnist,
    read_idx,
)
from .sources import (
    FLAT_SPLIT,
    SPLIT_NAMES,
    Record,
    Source,
    content_id,
    nested_subset,
    read_manifest,
    record_content_id,
    scan_source,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PrepareCounts",
    "prepare_bbc_news",
    "prepare_fashion_mnist",
    "read_idx",
    "FLAT_SPLIT",
    "SPLIT_NAMES",
    "Record",
    "Source",
    "content_id",
    "nested_subset",
    "read_manifest",
    "record_content_id",
    "scan_source",
]
