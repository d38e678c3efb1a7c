"""Utilities every layer may use: atomic file replacement, the console (logging, progress bars), provenance
(code digests, library versions), the torch device, and the one value validator."""

from .atomic import atomic_path, fsync_path, temp_files_of, write_text_atomic
from .console import progress_bar, setup_logging
from .devices import DEVICE_CHOICES, resolve_device
from .provenance import code_digest, feature_code_digest, library_versions
from .validation import check_choice, check_range

__all__ = ["atomic_path", "fsync_path", "temp_files_of", "write_text_atomic", "progress_bar", "setup_logging",
           "DEVICE_CHOICES", "resolve_device", "code_digest", "feature_code_digest", "library_versions",
           "check_choice", "check_range"]
