"""The one model file: every deployable model (a head, a baseline, the hybrid head, and models with torch weights)
is written and read here, in one skops layout with one trust list.

A model file is a skops archive of one dict::

    {"format": "featurestore-model", "version": 1, "kind": "head" | "baseline" | "hybrid" | ...,
     "metadata": "<JSON text of the model's plain fields, keys sorted>",
     "estimator": <a scikit-learn object, or None>,
     "tensors": {name: numpy array}}

``tensors`` holds weights as numpy arrays (a torch state dict through :func:`state_dict_to_tensors`, dtype and
shape kept bit for bit). Loading never runs code from the file: it trusts exactly :data:`TRUSTED_TYPES` (the
scikit-learn estimators featurestore's models are made of, and a few parts of theirs) beside skops's numpy and
builtin types. Writing is atomic and byte-reproducible: the archive is rewritten with skops's object ids
renumbered in order, its entries sorted and stamped 1980-01-01 00:00, so the same model saved twice gives the same
bytes (and DVC does not rerun what reads it). When timings are routed (a DVC stage, ``utils.timings``), the seconds
in its metadata (``train_seconds``, each sweep point's ``seconds``) are left out of the file too (a number at the top
level kept as 0.0) and written beside it in the timings folder, ``<timings>/<path>.json``: the same fit saved by two
runs is the same file. A model loads the same with or without them.

Older files still load: heads (``{"format": 2, "metadata", "estimator"}``), baselines and hybrid heads
(``{"format": "featurestore-baseline" | "featurestore-hybrid", ...}``), and, only with ``trust_pickle``, the
pickled heads of featurestore 0.1 (unpickling runs whatever code the file holds).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..errors import HeadFileError
from ..utils.atomic import atomic_path
from ..utils.timings import split_timings, timings_path, write_timings

log = logging.getLogger("featurestore")

MODEL_FORMAT = "featurestore-model"
MODEL_VERSION = 1
# The ``format`` of the files written before the one model file, and the kind each holds.
LEGACY_FORMATS = {2: "head", "featurestore-baseline": "baseline", "featurestore-hybrid": "hybrid"}
# The scikit-learn estimators a featurestore model is made of (every head family, the baselines, the hybrid head), by
# the names skops records (tests/test_model_file.py checks each is a class of the installed scikit-learn).
MODEL_ESTIMATORS = (
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
)
# Every non-builtin, non-numpy type a featurestore model file may hold: those estimators and parts of theirs.
TRUSTED_TYPES = MODEL_ESTIMATORS + (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "featurestore.heads.scaling.FeatureScaler",
    "featurestore.heads.knn.KNNClassifier",
    "featurestore.heads.multilayer.LayerColumns",
    "featurestore.heads.multilayer.LayerScaler",
)
# Where types of older files live now: their module names are in the files.
MOVED_MODULES = {"featurestore.scaling": "featurestore.heads.scaling"}
# Every entry's time in the archive (the earliest a zip can hold): the bytes do not depend on when it was written.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# Attributes that cache the id() of another object in this process (scikit-learn's vectorizers): left out of the
# file, as they mean nothing in another process and would change its bytes every run.
PROCESS_LOCAL_ATTRIBUTES = frozenset({"_stop_words_id"})
# torch dtypes numpy has no twin for: stored as their raw bits, the dtype named after the tensor's name.
BITS_SEPARATOR = "::"


@dataclass
class ModelDocument:
    """What a model file holds: its ``kind``, its plain fields (``metadata``, JSON-able), a scikit-learn
    ``estimator`` (or None) and ``tensors`` (name → numpy array of any shape and dtype)."""

    kind: str
    metadata: dict
    estimator: Any = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


class SavableModel(Protocol):
    def to_model_document(self) -> ModelDocument: ...


# Where each kind's class lives ("module:Class"), imported on first use: those modules import this one.
_KINDS: dict[str, str | type] = {"head": "featurestore.heads.head:TrainedHead",
                                 "baseline": "featurestore.heads.baseline:BaselineModel",
                                 "hybrid": "featurestore.heads.hybrid:HybridModel",
                                 "small_cnn": "featurestore.heads.cnn:SmallCNNModel"}


def register_kind(kind: str, cls: type) -> None:
    """Let :func:`load_model` build ``cls.from_model_document(document)`` for files of ``kind`` (the head, the
    baseline and the hybrid head are known already)."""
    _KINDS[kind] = cls


def _kind_class(kind: str, path: Path) -> type:
    home = _KINDS.get(kind)
    if home is None:
        raise HeadFileError(f"{path}: a model of kind {kind!r}, which this featurestore does not know "
                            f"(known: {', '.join(sorted(_KINDS))})")
    if isinstance(home, str):
        module, _, name = home.partition(":")
        home = _KINDS[kind] = getattr(importlib.import_module(module), name)
    return home


class EstimatorModel:
    """A dataclass model of an ``estimator`` and plain JSON-able fields, saved as a model file of kind
    ``MODEL_KIND`` (the baseline, the hybrid head; the head adds its config)."""

    MODEL_KIND: ClassVar[str]

    def save(self, path: str | Path) -> Path:
        """Write the model to a model file (skops, no pickle), atomically and byte-reproducibly. Returns ``path``."""
        return save_model(self, path)

    def to_model_document(self) -> ModelDocument:
        from dataclasses import fields

        metadata = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "estimator"}
        return ModelDocument(kind=self.MODEL_KIND, metadata=metadata, estimator=self.estimator)

    @classmethod
    def from_model_document(cls, document: ModelDocument):
        return cls(estimator=document.estimator, **document.metadata)


def skops_io():
    """``skops.io``, imported without its walk of scikit-learn. At import, skops lists every scikit-learn estimator
    to trust by default (``sklearn.utils.all_estimators``): that imports every scikit-learn package (torch with one of
    them), 0.9 s (3.4 s with torch) of every process that reads a model file, and every DVC stage of a head
    experiment is one. featurestore passes its own list (:data:`TRUSTED_TYPES`) on every load, so the walk is skipped:
    for this import alone ``all_estimators`` lists nothing. In a process where featurestore imported skops, skops's
    own default then trusts no scikit-learn estimator: pass ``trusted=`` to ``skops.io.load`` (skops's usual way).
    Where skops was imported first, it is used as it is (its default is wider; featurestore's list is within it)."""
    if "skops.io" in sys.modules:
        return sys.modules["skops.io"]
    import sklearn.utils

    walk = sklearn.utils.all_estimators
    sklearn.utils.all_estimators = lambda *args, **kwargs: []
    try:
        import skops.io
    finally:
        sklearn.utils.all_estimators = walk
    return skops.io


def save_model(model: SavableModel, path: str | Path) -> Path:
    """Write ``model`` (anything with ``to_model_document()``) to ``path`` as a model file, atomically and
    byte-reproducibly; timings routed, its metadata's timings beside it in the timings folder (see the module's
    docstring; ``model`` itself keeps them). Returns ``path``."""
    sio = skops_io()

    path = Path(path)
    document = model.to_model_document()
    mirror = timings_path(path, suffix=".json")
    metadata = document.metadata
    if mirror is not None:
        metadata, timings = stable_metadata(metadata)
        write_timings(mirror, timings, sort_keys=True)
    with vocabularies_as_tensors(document.estimator) as vocabularies:
        archive = sio.dumps({"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": document.kind,
                             "metadata": json.dumps(metadata, sort_keys=True), "estimator": document.estimator,
                             "tensors": {**document.tensors, **vocabularies}})
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_archive(archive))
    return path


# A fitted vectorizer's vocabulary travels as one tensor, ``<VOCABULARY_PREFIX><step>``: its terms in column order,
# UTF-8, one per line. skops keeps a dict as one node per entry, and walking BBC News's 100,000-term TF-IDF
# vocabulary node by node made loading a baseline or hybrid file take 3 s (every verdict, evaluate, export).
VOCABULARY_PREFIX = "vocabulary::"


def _vectorizer_steps(estimator) -> dict[str, Any]:
    """The steps of a pipeline (or the estimator itself, as step ``""``) that hold a fitted ``vocabulary_`` whose
    columns are 0..n-1 and whose terms have no line break: those whose vocabulary can travel as one tensor."""
    steps = dict(getattr(estimator, "named_steps", {}) or {"": estimator})
    found = {}
    for name, step in steps.items():
        vocabulary = getattr(step, "vocabulary_", None)
        if (isinstance(vocabulary, dict) and vocabulary and sorted(vocabulary.values()) == list(range(len(vocabulary)))
                and not any("\n" in term for term in vocabulary)):
            found[name] = step
    return found


@contextmanager
def vocabularies_as_tensors(estimator):
    """While saving: each vectorizer's ``vocabulary_`` taken out of ``estimator`` (put back after) and yielded as
    tensors, name → uint8 (N,) array of the terms in column order joined by line breaks."""
    steps = _vectorizer_steps(estimator) if estimator is not None else {}
    taken = {name: step.__dict__.pop("vocabulary_") for name, step in steps.items()}
    try:
        yield {VOCABULARY_PREFIX + name: np.frombuffer("\n".join(sorted(vocabulary, key=vocabulary.get))
                                                       .encode("utf-8"), dtype=np.uint8)
               for name, vocabulary in taken.items()}
    finally:
        for name, vocabulary in taken.items():
            steps[name].vocabulary_ = vocabulary


def restore_vocabularies(estimator, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reverse of :func:`vocabularies_as_tensors` on a loaded ``estimator``; returns the other tensors."""
    steps = dict(getattr(estimator, "named_steps", {}) or {"": estimator})
    rest = {}
    for name, array in tensors.items():
        if name.startswith(VOCABULARY_PREFIX) and name[len(VOCABULARY_PREFIX):] in steps:
            terms = np.asarray(array, dtype=np.uint8).tobytes().decode("utf-8").split("\n")
            steps[name[len(VOCABULARY_PREFIX):]].vocabulary_ = {term: i for i, term in enumerate(terms)}
        else:
            rest[name] = array
    return rest


def stable_metadata(metadata: dict) -> tuple[dict, dict]:
    """``(metadata without its timings, the timings)`` (``utils.timings.split_timings``); a number at the top level
    (``train_seconds``) stays as 0.0, so that a model class whose field has no default still loads."""
    stable, timings = split_timings(metadata)
    stable.update({key: 0.0 for key, value in timings.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return stable, timings


def model_kind(path: str | Path) -> str | None:
    """The kind of model a file holds (``"head"``, ``"baseline"``, ``"hybrid"``, ...), read without loading it;
    None when it is not a readable featurestore model archive (a pickle, a damaged file: the loader reports)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        header = _header(path)
    except Exception:  # a damaged archive is the loader's to report
        return None
    if header.get("format") == MODEL_FORMAT:
        return header.get("kind")
    return LEGACY_FORMATS.get(header.get("format"))


def _header(path: Path) -> dict:
    """The archive's top-level JSON entries (format, version, kind), read from its schema alone."""
    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
    return {key: json.loads(entry["content"]) for key, entry in schema.get("content", {}).items()
            if isinstance(entry, dict) and entry.get("is_json")}


def load_model(path: str | Path, trust_pickle: bool = False, kind: str | None = None):
    """Read a model file (see the module's docstring) and return the model it holds; ``kind``: refuse any other
    kind. Raises :class:`HeadFileError` naming the file and the problem: missing, corrupt, another format, kind or
    a newer version, untrusted types inside, or a pickle without ``trust_pickle``."""
    sio = skops_io()
    from skops.io.exceptions import UntrustedTypesFoundException

    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"{path}: model file not found (run `featurestore train-head` first)")
    if not zipfile.is_zipfile(path):
        if trust_pickle and kind in (None, "head"):
            return _load_pickle(path)
        raise HeadFileError(
            f"{path}: not a skops model file. If it is a pickled (joblib) head from featurestore 0.1, loading it "
            f"would run any code it holds: pass --trust-pickle only if you trust its origin, or retrain the head"
        )
    try:
        try:  # one walk of the archive's tree, which skops audits against the trusted types
            raw = sio.load(path, trusted=list(TRUSTED_TYPES))
        except UntrustedTypesFoundException:  # an older file (a type under its old module), or one to refuse
            untrusted = sio.get_untrusted_types(file=path)
            unexpected = sorted(set(untrusted) - set(TRUSTED_TYPES) - set(_moved_types(untrusted)))
            if unexpected:
                raise HeadFileError(f"{path}: the model holds types featurestore does not trust: "
                                    f"{', '.join(unexpected)}") from None
            raw = sio.load(path, trusted=list(untrusted))
        document = _document(raw, path)
        if kind is not None and document.kind != kind:
            raise HeadFileError(f"{path}: a {document.kind} model file, not a {kind} one")
        return _kind_class(document.kind, path).from_model_document(document)
    except HeadFileError:
        raise
    except Exception as exc:  # skops, zipfile and json raise many types for a damaged archive
        raise HeadFileError(f"{path}: not a readable model file ({type(exc).__name__}: {exc})") from None


def _document(raw, path: Path) -> ModelDocument:
    """The :class:`ModelDocument` of a loaded archive's dict, of this layout or an older one."""
    file_format = raw.get("format") if isinstance(raw, dict) else None
    if file_format == MODEL_FORMAT:
        if raw.get("version") != MODEL_VERSION:
            raise HeadFileError(f"{path}: model file version {raw.get('version')}, but this featurestore reads "
                                f"version {MODEL_VERSION}: upgrade featurestore")
        return ModelDocument(kind=raw["kind"], metadata=json.loads(raw["metadata"]), estimator=raw["estimator"],
                             tensors=restore_vocabularies(raw["estimator"], dict(raw["tensors"])))
    if file_format in LEGACY_FORMATS:
        return ModelDocument(kind=LEGACY_FORMATS[file_format], metadata=json.loads(raw["metadata"]),
                             estimator=raw["estimator"])
    raise HeadFileError(f"{path}: format {file_format!r} is not a featurestore model file")


def _load_pickle(path: Path):
    import joblib

    log.warning("%s: loading a pickled head because --trust-pickle was given; re-save it with skops "
                "(`featurestore train-head`) so that it can be shared safely", path)
    try:
        head = joblib.load(path)
    except Exception as exc:
        raise HeadFileError(f"{path}: not a readable head file ({type(exc).__name__}: {exc})") from None
    if not isinstance(head, _kind_class("head", path)):
        raise HeadFileError(f"{path}: the pickle holds a {type(head).__name__}, not a featurestore head")
    return head


def _moved_types(type_names: list[str]) -> list[str]:
    """The trusted types among ``type_names`` that a file names by the module they lived in before the package's
    layout changed; their old module is aliased to the new one so that skops finds them."""
    moved = []
    for name in type_names:
        module, _, leaf = name.rpartition(".")
        if module in MOVED_MODULES and f"{MOVED_MODULES[module]}.{leaf}" in TRUSTED_TYPES:
            sys.modules.setdefault(module, importlib.import_module(MOVED_MODULES[module]))
            moved.append(name)
    return moved


def canonical_archive(data: bytes) -> bytes:
    """A skops archive (bytes) rewritten so that its bytes depend only on the object saved: skops's object ids
    (``id()``, different every run) renumbered 1, 2, ... in schema order, the files they name (``<id>.npy``,
    ``<id>.npz``, ``<uuid>.bin``) renamed after them, numpy's inner ``.npz`` archives made canonical too, and
    every entry stored uncompressed, sorted, at :data:`ZIP_TIME`; :data:`PROCESS_LOCAL_ATTRIBUTES` are left out."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        schema = json.loads(source.read("schema.json"))
        ids: dict[int, int] = {}
        files: dict[str, str] = {}

        def renumber(node) -> None:
            if isinstance(node, list):
                for child in node:
                    renumber(child)
            elif isinstance(node, dict):
                if node.get("__loader__") == "DictNode" and isinstance(node.get("content"), dict):
                    for name in PROCESS_LOCAL_ATTRIBUTES & node["content"].keys():
                        del node["key_types"]["content"][list(node["content"]).index(name)]  # keys, in order
                        del node["content"][name]
                if isinstance(node.get("__id__"), int):  # 0 would read as "no id" in skops: start at 1
                    node["__id__"] = ids.setdefault(node["__id__"], len(ids) + 1)
                if "__loader__" in node and isinstance(node.get("file"), str):
                    old = node["file"]
                    node["file"] = files.setdefault(old, f"{len(files) + 1}{Path(old).suffix}")
                for child in node.values():
                    renumber(child)

        renumber(schema)
        unnamed = set(source.namelist()) - set(files) - {"schema.json"}
        if unnamed:
            raise ValueError(f"skops archive entries no schema node names: {sorted(unnamed)}")
        entries = {"schema.json": json.dumps(schema, indent=2).encode()}
        for old, new in files.items():
            content = source.read(old)
            entries[new] = _stamped_zip(_zip_entries(content)) if new.endswith(".npz") else content
    return _stamped_zip(entries)


def _zip_entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _stamped_zip(entries: dict[str, bytes]) -> bytes:
    """A zip of ``entries``, sorted by name, stored, each at :data:`ZIP_TIME` with mode 0644 (as on Unix)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            archive.writestr(info, entries[name])
    return buffer.getvalue()


def _bit_twins() -> dict:
    """torch dtypes without a numpy twin → the unsigned integer dtype of the same width holding their bits."""
    import torch

    names = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    return {getattr(torch, name): torch.uint16 if name == "bfloat16" else torch.uint8
            for name in names if hasattr(torch, name)}


def state_dict_to_tensors(state_dict: dict) -> dict[str, np.ndarray]:
    """A torch state dict → ``tensors`` for a model file: name → a numpy copy of the tensor (same shape and dtype,
    bit for bit; moved to the CPU). A dtype numpy lacks (bfloat16, float8) is kept as its raw bits (uint16/uint8)
    under ``"<name>::<dtype>"``, e.g. ``"top.weight::bfloat16"``. :func:`tensors_to_state_dict` reverses it."""
    import torch

    twins = _bit_twins()
    tensors = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if BITS_SEPARATOR in name:
            raise ValueError(f"state dict entry {name!r}: '{BITS_SEPARATOR}' is reserved in a model file")
        tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        if tensor.dtype in twins:
            name, tensor = f"{name}{BITS_SEPARATOR}{str(tensor.dtype).removeprefix('torch.')}", \
                tensor.view(twins[tensor.dtype])
        tensors[name] = tensor.numpy().copy()
    return tensors


def tensors_to_state_dict(tensors: dict[str, np.ndarray]) -> dict:
    """``tensors`` of a model file → a torch state dict (CPU tensors; names, shapes and dtypes as saved, in the
    order given), the reverse of :func:`state_dict_to_tensors`."""
    import torch

    state_dict = {}
    for name, array in tensors.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        if BITS_SEPARATOR in name:
            name, dtype = name.split(BITS_SEPARATOR, 1)
            tensor = tensor.view(getattr(torch, dtype))
        state_dict[name] = tensor
    return state_dict
