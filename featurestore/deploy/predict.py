"""Batch inference with an exported model: images or texts in, one CSV (or JSONL) row per item out."""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ..data.sources import (
    Record,
    Source,
    _visible_dirs,
    _visible_files,
    content_id,
    scan_flat_folder,
    scan_folder,
    scan_source,
    unread_files,
)
from ..encode.images import DecodedImages, collate_decoded, lower_worker_priority
from ..encode.preprocess import Preprocessing
from ..encode.runtime import make_session
from ..errors import FeaturestoreError
from ..utils.atomic import atomic_path
from ..utils.console import progress_bar
from ..utils.validation import check_choice

log = logging.getLogger("featurestore")

OUTPUTS = ("probabilities", "label")
MAX_LOGGED_SKIPS = 20  # warnings for the first skipped items; the summary lists every one
PRECISION_KEY = "featurestore_precision"  # "float16" in the float16 graph export writes for CUDA
FLOAT32_SHA256_KEY = "featurestore_float32_sha256"  # the float32 file a variant (fp16, int8) was made from
# The graphs an export may write beside MODEL.onnx (MODEL.<variant>.onnx); each records the sha256 of the float32
# file it was made from in its metadata (FLOAT32_SHA256_KEY), so that a variant of an older MODEL.onnx is told apart.
VARIANT_NAMES = ("fp16", "int8")


def variant_path(model: str | Path, variant: str) -> Path:
    """Where export writes a variant of ``model``: ``model.onnx`` → ``model.<variant>.onnx`` (fp16, int8)."""
    return Path(model).with_suffix(f".{variant}.onnx")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (``data.sources.content_id``, the one file hash)."""
    return content_id(Path(path))


def float16_sibling(model: str | Path) -> Path | None:
    """The float16 graph export wrote beside ``model`` (``--float16``), if it is there and was made from this very
    file (its metadata holds the float32 file's sha256: a graph left by an older export is not used)."""
    sibling = variant_path(model, "fp16")
    if not sibling.is_file():
        return None
    try:
        meta = read_model_metadata(sibling)
    except FeaturestoreError as exc:
        log.warning("ignoring %s: %s", sibling, exc)
        return None
    if meta.get(PRECISION_KEY) != "float16" or meta.get(FLOAT32_SHA256_KEY) != file_sha256(model):
        log.warning("ignoring %s: not made from %s by its export (export again with --float16)", sibling, model)
        return None
    return sibling


def check_variant_parent(model: str | Path, meta: dict[str, str]) -> None:
    """Refuse a variant (``model.int8.onnx``, ``model.fp16.onnx``) whose float parent ``model.onnx`` lies beside it
    but is not the file it was made from (its metadata records the parent's sha256): it would serve another head."""
    model = Path(model)
    parent_sha = meta.get(FLOAT32_SHA256_KEY)
    stem, _, variant = model.stem.rpartition(".")
    if parent_sha is None or variant not in VARIANT_NAMES:
        return
    parent = model.with_name(f"{stem}.onnx")
    if parent.is_file() and file_sha256(parent) != parent_sha:
        raise FeaturestoreError(f"{model}: made from another {parent.name} (sha256 {parent_sha[:12]}…), not the one "
                                f"beside it: export again to write a variant of the current model")


@dataclass
class PredictSummary:
    out: str
    provider: str
    model: str = ""  # the graph that ran: the file given, or its float16 sibling on CUDA
    layout: str = ""  # how the data was read: tree (labelled class folders), flat (new items) or manifest
    predicted: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    accuracy: float | None = None  # when the source has labels that match the model's classes

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _preprocessing_of(meta: dict) -> Preprocessing:
    return Preprocessing.from_dict(json.loads(meta["featurestore_preprocessing"]))


def read_model_metadata(path: str | Path) -> dict[str, str]:
    """The featurestore metadata of an exported model, read without starting a session."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FeaturestoreError(f"{path}: model file not found (run `featurestore export` first)")
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:
        raise FeaturestoreError(f"{path}: not a readable ONNX model ({exc})") from exc
    if "featurestore_class_names" not in meta:
        raise FeaturestoreError(f"{path}: not a featurestore model (no class names in its metadata)")
    return meta


class OnnxClassifier:
    """An exported featurestore model in an onnxruntime session.

    Images: call with uint8 images (N, 3, S, S). Texts: call with a list of N strings (tokenised with the
    tokenizer stored in the model). Returns probabilities (N, K) float32, labels (N,) int64.

    On CUDA the float16 graph export wrote beside the file (``model.fp16.onnx``, ``export --float16``) runs instead
    when it is there and was made from this file (``float16=False``: never); ``model_path`` is the file that runs.
    Batches go through an IOBinding on CUDA (``io_binding``; default: on CUDA only, see :meth:`run_on_device`).
    """

    def __init__(self, path: str | Path, provider: str = "auto", meta: dict[str, str] | None = None,
                 float16: bool = True, io_binding: bool | None = None,
                 cuda_options: dict[str, object] | None = None):
        meta = meta if meta is not None else read_model_metadata(path)
        self.model_path = Path(path)
        self.session, self.provider = make_session(str(path), provider, cuda_options=cuda_options)
        if self.provider == "cuda" and float16:
            sibling = float16_sibling(path)
            if sibling is not None:
                self.session, self.provider = make_session(str(sibling), "cuda", cuda_options=cuda_options)
                self.model_path = sibling
                log.info("onnxruntime runs the float16 graph %s on cuda", sibling)
        # On the CPU provider the binding costs what session.run costs (measured: benchmarks/inference.py) and
        # buys nothing (the output is in host memory either way): session.run stays the CPU path.
        self.io_binding = self.provider == "cuda" if io_binding is None else io_binding
        self.device_id = int(self.session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))
        # inputs copied into device buffers reused while the batch shape repeats (CUDA), else bound in place
        self.copy_inputs = self.provider == "cuda"
        self._device_inputs: dict[str, tuple] = {}  # name → (shape, dtype, OrtValue on the device)
        self.class_names: list[str] = json.loads(meta["featurestore_class_names"])
        self.fingerprint_hash = meta.get("featurestore_fingerprint_hash")
        self.modality = meta.get("featurestore_modality", "image")
        self.preprocessing = _preprocessing_of(meta) if self.modality == "image" else None
        self.tokenizer = None
        # which inputs a text graph takes (baseline_export.TEXT_INPUT_KEY): token windows (an encoder), the raw
        # strings (TF-IDF), or both (the hybrid head)
        self.text_input = meta.get("featurestore_text_input", "tokens") if self.modality == "text" else None
        if self.text_input in ("tokens", "strings+tokens"):
            from ..configs import Tokenization
            from ..encode.texts import Tokenizer

            self.tokenizer = Tokenizer(None, Tokenization(**json.loads(meta["featurestore_tokenization"])),
                                       tokenizer_json=meta["featurestore_tokenizer_json"])

    def __call__(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        if self.modality == "text":
            if isinstance(inputs, str) or not all(isinstance(text, str) for text in inputs):
                raise TypeError("a text model takes a list of strings")
            return self.run_batch(TextBatchCollate(self.tokenizer, self.text_input).batch(list(inputs)))
        size = self.preprocessing.image_size
        if not isinstance(inputs, np.ndarray) or inputs.dtype != np.uint8:
            raise TypeError(f"images must be a uint8 numpy array (N, 3, {size}, {size}), "
                            f"got {type(inputs).__name__} {getattr(inputs, 'dtype', '')}")
        if inputs.ndim != 4 or inputs.shape[1:] != (3, size, size):
            raise ValueError(f"images must have shape (N, 3, {size}, {size}), got {inputs.shape}")
        return self.run_batch(inputs)

    @staticmethod
    def feed(batch) -> dict[str, np.ndarray]:
        """A batch as the data loader makes it (uint8 images (N, 3, S, S), or a dict of the tokenizer's int64
        (N, W, L) ``input_ids`` and ``attention_mask`` and/or the raw ``texts``, strings (N, 1)) as the graph's
        inputs, C-contiguous numpy arrays."""
        if isinstance(batch, dict):
            return {name: np.ascontiguousarray(batch[name]) for name in ("texts", "input_ids", "attention_mask")
                    if name in batch}
        return {"images": np.ascontiguousarray(batch)}

    def run_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """A batch as the data loader makes it: uint8 images, or the tokenizer's dict.
        Returns probabilities (N, K) float32 and labels (N,) int64, in host memory."""
        feed = self.feed(batch)
        if not self.io_binding:
            probabilities, labels = self.session.run(list(OUTPUTS), feed)
            return probabilities, labels
        probabilities, labels = (value.numpy() for value in self.run_on_device(feed))
        return probabilities, labels

    def run_on_device(self, feed: dict[str, np.ndarray]) -> list:
        """Run ``feed`` through an IOBinding; returns the outputs as onnxruntime ``OrtValue`` s (probabilities
        (N, K) float32, labels (N,) int64) where the session computed them: on CUDA they stay in device memory
        until read (``value.numpy()``). On CUDA each numeric input is copied once, host to device, into a device
        buffer that is reused while the batch shape repeats; on the CPU the inputs are bound in place (no copy).

        A feed with strings (a TF-IDF or hybrid graph's ``texts`` (N, 1)) runs through ``session.run`` instead, with
        the strings from host memory (the string operators run on the CPU) and the numeric inputs placed as above;
        its outputs come back in host memory. onnxruntime (1.31) can neither bind a string tensor nor make an
        ``OrtValue`` of one, on any device."""
        import onnxruntime as ort

        placed = {name: self._placed(name, array) for name, array in feed.items()}
        if any(array.dtype.kind in "OUS" for array in feed.values()):  # object, str, bytes: strings
            return [ort.OrtValue.ortvalue_from_numpy(value) for value in self.session.run(list(OUTPUTS), placed)]
        binding = self.session.io_binding()
        for name, value in placed.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in OUTPUTS:
            binding.bind_output(name, self.provider, self.device_id)  # provider: cuda or cpu
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()

    def _placed(self, name: str, array: np.ndarray):
        """``array`` as run_on_device feeds it: itself (bound in place; always for strings), or with
        ``copy_inputs`` copied into this input's device buffer (an ``OrtValue``, remade when the shape changes)."""
        import onnxruntime as ort

        if not self.copy_inputs or array.dtype.kind in "OUS":
            return array
        shape, dtype, value = self._device_inputs.get(name, (None, None, None))
        if shape != array.shape or dtype != array.dtype:
            value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.provider,
                                                               self.device_id)
            self._device_inputs[name] = (array.shape, array.dtype, value)
        value.update_inplace(array)  # the one host → device copy
        return value

    def loader(self, records: list[Record], batch_size: int, workers: int) -> DataLoader:
        """Decoding (or reading and tokenising) in DataLoader workers: batches of (indices, batch, failures)."""
        if self.modality == "text":
            from ..encode.texts import TextDocuments

            dataset, collate = TextDocuments(records), TextBatchCollate(self.tokenizer, self.text_input)
        else:
            dataset, collate = DecodedImages([r.path for r in records], self.preprocessing), collate_decoded
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                          prefetch_factor=4 if workers else None, worker_init_fn=lower_worker_priority)


class TextBatchCollate:
    """DataLoader collate for a text graph: documents → (indices, batch, failures), the batch a dict of what the
    graph takes: ``input_ids``/``attention_mask`` int64 (N, W, L) (``tokens``), ``texts`` strings (N, 1)
    (``strings``), or all three (``strings+tokens``)."""

    def __init__(self, tokenizer, text_input: str = "tokens"):
        self.tokenizer, self.text_input = tokenizer, text_input

    def batch(self, texts: list[str]) -> dict[str, np.ndarray]:
        batch = {}
        if self.text_input in ("tokens", "strings+tokens"):
            ids, mask, _ = self.tokenizer(texts)
            batch.update(input_ids=np.asarray(ids), attention_mask=np.asarray(mask))
        if self.text_input in ("strings", "strings+tokens"):
            batch["texts"] = np.array(texts, dtype=object).reshape(-1, 1)
        return batch

    def __call__(self, items):
        ok = [(index, text) for index, text, _ in items if text is not None]
        failed = [(index, reason) for index, text, reason in items if text is None]
        return [index for index, _ in ok], self.batch([text for _, text in ok]) if ok else None, failed


LAYOUTS = ("auto", "tree", "flat")  # how predict reads a folder (see read_data)
_OUTSIDE_TREE = ("not in a class folder: a class tree is read as <class>/<file> or {train,val,test}/<class>/<file> "
                 "(--layout flat reads a folder of new items)")
_IN_SUBFOLDER = "in a subfolder: a flat folder is read at its top level only (--recursive reads its subfolders too)"


def read_data(data: Path, layout: str = "auto", recursive: bool = False) -> tuple[Source, str]:
    """The items ``predict`` reads from ``data`` and the layout it read them as: ``manifest`` (a CSV/JSONL file),
    ``tree`` (labelled ``<class>/<file>`` or ``{train,val,test}/<class>/<file>``) or ``flat`` (new items: the
    folder's files; with ``recursive`` its subfolders' files too). ``layout="auto"``: a folder whose visible
    entries are all folders is a tree, one with a visible file at its top is flat; hidden files and folders are
    never read. Every visible file a layout does not read is in ``Source.unusable``, with the reason."""
    check_choice("layout", layout, LAYOUTS)
    if data.is_file():
        if layout != "auto" or recursive:
            raise FeaturestoreError(f"{data}: a manifest lists its own items; --layout and --recursive are for "
                                    f"folders")
        return scan_source(data), "manifest"
    if layout == "auto":
        layout = "flat" if _visible_files(data) or not _visible_dirs(data) else "tree"
    if layout == "tree":
        if recursive:
            raise FeaturestoreError(f"{data}: read as a class tree (<class>/<file>), which --recursive does not "
                                    f"apply to; give --layout flat to read its files at any depth as new items")
        source = scan_folder(data)
        reason = _OUTSIDE_TREE
    else:
        source = scan_flat_folder(data, recursive)
        reason = _IN_SUBFOLDER
    source.unusable.extend(unread_files(source, reason))
    return source, layout


def predict(model: str | Path, data: str | Path, out: str | Path, batch_size: int = 64, workers: int = 1,
            provider: str = "auto", top_k: int = 3, split: str | None = None, progress: bool = True,
            float16: bool = True, layout: str = "auto", recursive: bool = False) -> PredictSummary:
    """Classify every image or text of ``data`` (a class tree, a CSV/JSONL manifest, or a flat folder of new items;
    ``layout`` and ``recursive``: see :func:`read_data`) with an exported model and write ``out`` (.csv, or
    .jsonl): path, split, label, probability, top-k (and the true label if known). ``split`` keeps only that split
    of the source. Unreadable items, and files the layout does not read, are skipped with a reason.
    ``model`` is any exported graph (float, or the int8 one ``export --quantize int8`` wrote); on CUDA its float16
    sibling runs when export wrote one (``float16=False``: never)."""
    started = time.perf_counter()
    meta = read_model_metadata(model)
    check_variant_parent(model, meta)
    data, out = Path(data), Path(out)
    if batch_size < 1 or workers < 0 or top_k < 1:
        raise FeaturestoreError(f"batch_size and top_k must be >= 1 and workers >= 0 (got {batch_size}, {top_k}, "
                                f"{workers})")
    if not data.exists():
        raise FeaturestoreError(f"{data}: data folder or manifest not found")
    source, layout = read_data(data, layout, recursive)
    records = [r for r in source.records if split is None or r.split == split]
    if not records:
        skipped = (f" ({len(source.unusable)} files skipped, e.g. {source.unusable[0]['path']}: "
                   f"{source.unusable[0]['reason']})" if source.unusable else "")
        raise FeaturestoreError(f"{data}: nothing to predict{f' in split {split!r}' if split else ''}{skipped}")
    classifier = OnnxClassifier(model, provider, meta, float16=float16)
    batches = iter(classifier.loader(records, batch_size, workers))  # fork the decoders before the session runs
    summary = PredictSummary(out=str(out), provider=classifier.provider, model=str(classifier.model_path),
                             layout=layout, skipped=list(source.unusable))
    names = classifier.class_names
    top_k = max(1, min(top_k, len(names)))
    rows, correct, labelled = [], 0, 0
    unit = "text" if classifier.modality == "text" else "img"
    with progress_bar(len(records), "predict", unit=unit, enabled=progress) as bar:
        for indices, batch, failed in batches:
            for index, reason in failed:
                summary.skipped.append({"path": records[index].rel_path, "reason": reason})
            if batch is not None:
                probabilities, labels = classifier.run_batch(batch)
                best = np.argsort(-probabilities, axis=1)[:, :top_k]
                for row, index in enumerate(indices):
                    record = records[index]
                    truth = source.class_names[record.label] if record.label >= 0 else ""
                    predicted = names[int(labels[row])]
                    if truth:
                        labelled += 1
                        correct += truth == predicted
                    rows.append({
                        "path": record.rel_path, "split": record.split, "label": predicted,
                        "probability": round(float(probabilities[row, labels[row]]), 6),
                        "top_k": ";".join(f"{names[j]}:{probabilities[row, j]:.4f}" for j in best[row]),
                        "true_label": truth,
                    })
            bar.update(len(indices) + len(failed))
    for item in summary.skipped[:MAX_LOGGED_SKIPS]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if len(summary.skipped) > MAX_LOGGED_SKIPS:
        log.warning("… and %d more skipped (the summary lists every one, with its reason; --json prints it)",
                    len(summary.skipped) - MAX_LOGGED_SKIPS)
    with atomic_path(out, fsync=False) as tmp:
        if out.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["path", "split", "label", "probability", "top_k",
                                                            "true_label"])
                writer.writeheader()
                writer.writerows(rows)
    summary.predicted = len(rows)
    summary.accuracy = round(correct / labelled, 6) if labelled and set(source.class_names) <= set(names) else None
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
