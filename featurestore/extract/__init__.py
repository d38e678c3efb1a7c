"""Extraction: a frozen encoder over a source, once, into an incremental, crash-safe feature store.

:mod:`.launch` is the front door (:func:`extract_features`), :mod:`.phases` the plan / encode / assemble steps
that one process or a torchrun group (:mod:`.distributed`) runs, :mod:`.verify` the check of a store against
its data and today's code.
"""

from .launch import extract_features
from .options import ExtractOptions
from .phases import ExtractSummary, extract_with
from .verify import VerifyReport, verify_store

__all__ = [
    "extract_features",
    "ExtractOptions",
    "ExtractSummary",
    "extract_with",
    "VerifyReport",
    "verify_store",
]
