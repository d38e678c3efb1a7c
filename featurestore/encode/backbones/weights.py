"""Reading checkpoints: file hashing, unwrapping common containers, strict loading of a trunk, and the note of
which file had which hash (so the checkpoint a store's fingerprint names by its SHA-256 is found again)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ...data.sources import content_id
from ...errors import WeightsMismatchError, WeightsUnavailableError
from ...utils.atomic import atomic_path

log = logging.getLogger("featurestore")

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """featurestore's cache folder on this machine: ``$FEATURESTORE_CACHE`` or ``~/.cache/featurestore``."""
    return Path(os.environ.get("FEATURESTORE_CACHE") or Path.home() / ".cache" / "featurestore")


def _known_file() -> Path:
    return cache_root() / "checkpoints.json"


def _read_known() -> dict[str, str]:
    try:
        known = json.loads(_known_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: nothing known
        return {}
    return known if isinstance(known, dict) else {}


def remember_checkpoint(path: str | Path, sha256: str) -> None:
    """Note that ``path`` held the checkpoint whose SHA-256 is ``sha256`` (the hash a store's fingerprint keeps), in
    ``<cache>/checkpoints.json``, so that a later command finds it by that hash (:func:`known_checkpoint`). Loading
    never fails for the note: a cache that cannot be written is logged and skipped."""
    path = str(Path(path).resolve())
    known = _read_known()
    if known.get(sha256) == path:
        return
    known[sha256] = path
    try:
        with atomic_path(_known_file(), fsync=False) as tmp:
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    except OSError as exc:
        log.debug("could not note checkpoint %s in %s: %s", path, _known_file(), exc)


def known_checkpoint(sha256: str) -> Path | None:
    """The file last loaded on this machine with SHA-256 ``sha256`` (None: none noted). It may since have moved or
    changed: check it with :func:`file_sha256`."""
    path = _read_known().get(sha256)
    return Path(path) if path else None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, memoised on (path, size, mtime) for this process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = content_id(path)
    return _HASH_CACHE[key]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file and return its tensor state dict.

    Accepts a safetensors file (``*.safetensors``, as the Hugging Face Hub holds timm's weights), or a PyTorch file
    with a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``, and strips a
    DataParallel ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        if "Weights only load failed" in str(exc):  # a pickled model, or a training checkpoint with other objects
            raise WeightsMismatchError(
                f"{path}: holds objects besides tensors (a whole model, training arguments), which featurestore does "
                f"not unpickle; if you trust the file, save its state dict alone (torch.save(model.state_dict() or "
                f"checkpoint['state_dict'], PATH)) and pass that") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsMismatchError(f"{path}: not a readable {kind} checkpoint ({reason})") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a state dict of tensors")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, classifier: str | None = None
) -> None:
    """Load ``state`` into ``model`` so that every trunk weight comes from the checkpoint.

    Every key of the model must be present with the same shape and the checkpoint may hold no
    other key, except under the ``classifier`` prefix: a checkpoint fine-tuned for other classes
    may carry a classifier of another shape (or none), since feature extraction drops it.
    """
    expected = model.state_dict()

    def is_classifier(key: str) -> bool:
        return classifier is not None and key.startswith(classifier + ".")

    missing = [k for k in expected if k not in state and not is_classifier(k)]
    unexpected = [k for k in state if k not in expected and not is_classifier(k)]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape and not is_classifier(k)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsMismatchError(f"{source}: checkpoint does not fit the architecture; " + "; ".join(parts))
    usable = {
        k: v for k, v in state.items() if not (is_classifier(k) and (k not in expected or v.shape != expected[k].shape))
    }
    model.load_state_dict(usable, strict=False)  # completeness was checked above
