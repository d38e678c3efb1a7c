"""The HDF5 feature store: its layout and reader (:mod:`.hdf5`), the one-writer lock (:mod:`.locking`) and the
crash-safe journal of an unfinished extraction (:mod:`.journal`).
"""

from .hdf5 import SCHEMA_VERSION, FeatureStore, SplitArrays, fingerprint_hash, store_writer, write_store
from .journal import ExtractionJournal
from .locking import store_lock

__all__ = [
    "SCHEMA_VERSION",
    "FeatureStore",
    "SplitArrays",
    "fingerprint_hash",
    "store_writer",
    "write_store",
    "ExtractionJournal",
    "store_lock",
]
