"""Exceptions with messages meant for the person at the terminal: each names the file and the problem."""


class FeaturestoreError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class UnknownBackboneError(FeaturestoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsUnavailableError(FeaturestoreError):
    """Pretrained weights are neither installed nor cached, and nothing is downloaded at run time."""


class WeightsMismatchError(FeaturestoreError):
    """A checkpoint does not fit the architecture (missing or unexpected keys, wrong shapes)."""


class DataError(FeaturestoreError):
    """The data source is unusable as a whole: missing folder, empty class, malformed manifest."""


class ImageDecodeError(FeaturestoreError):
    """One image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StoreError(FeaturestoreError):
    """An HDF5 feature store is missing, unreadable or incompatible with what is asked of it."""
