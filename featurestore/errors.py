"""Exceptions with messages meant for the person at the terminal: each names the file and the problem.

The CLI prints any :class:`FeaturestoreError` as one line, without a traceback, and exits with 2.
"""


class FeaturestoreError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class BadValueError(FeaturestoreError, ValueError):
    """A setting or argument has a value it may not have (not one of its choices, or out of its range)."""


class UnknownBackboneError(FeaturestoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsUnavailableError(FeaturestoreError):
    """Pretrained weights are neither installed nor cached, and nothing is downloaded at run time."""


class WeightsMismatchError(FeaturestoreError):
    """A checkpoint does not fit the architecture (missing or unexpected keys, wrong shapes), or is not the
    checkpoint that something was trained on."""


class DataError(FeaturestoreError):
    """The data source is unusable as a whole: missing folder, empty class, malformed manifest."""


class ImageDecodeError(FeaturestoreError):
    """One item (an image, a text) could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DuplicateItemsError(DataError):
    """The same content appears in two splits or under two labels, and the policy says to stop."""


class StoreError(FeaturestoreError):
    """An HDF5 feature store is missing, unreadable or incompatible with what is asked of it."""


class StoreLockedError(StoreError):
    """Another process is writing the store, and the caller asked not to wait."""


class LeakError(StoreError):
    """The evaluation split shares items with the splits the model was trained or tuned on."""


class HeadMismatchError(FeaturestoreError):
    """A head was asked to score features it was not trained on."""


class HeadFileError(FeaturestoreError):
    """A head file is missing, corrupt, of an unknown format, or holds types that are not trusted."""


class ExportError(FeaturestoreError):
    """The exported graph does not reproduce the Python pipeline, or cannot be built."""


class ProviderError(FeaturestoreError):
    """The requested onnxruntime execution provider is not active in the session."""
