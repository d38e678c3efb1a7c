"""Near-duplicates: pairs of items, in one split or across two, that one rule per modality calls the same item; a
train/test pair (train/val when val is what is scored) is a leak.

- Images: the *pixel similarity* of :mod:`.copies` (the two files aligned on each other by a zoom and a shift, then
  1 - the root-mean-square difference of their grayscale pixels) reaches :data:`NEAR_DUPLICATE_SIMILARITY`
  ``["image"]``, 0.956, among each image's 40 nearest by thumbnail.
- Texts: the *containment* of :mod:`.texts` (the share of the shorter document's word 5-grams found in the other)
  reaches ``["text"]``, 0.6, among each document's nearest by the features' cosine.
- Where the items cannot be read (no recorded data source, a store moved without its data, a file changed since
  extraction), the features' cosine at :data:`FEATURE_SIMILARITY` (images 0.95, texts 0.92), with a warning: for
  images it finds exact copies, re-saves and upscales only (below).

:func:`store_near_duplicates` gives every pair of a store (the audit), :func:`find_leaks` the leaks of one split
(``featurestore evaluate``), :func:`audit_leaks` the same read back from an audit's files (the pipeline's evaluate
stage). :func:`find_leaks` leaves out items of identical content: ``evaluate`` refuses those already
(``heads.reports.check_no_overlap``).

How the rules and thresholds were chosen (``benchmarks/audit_leaks.py`` prints every figure; the default stores of a
project where ``dvc repro`` ran, every copy extracted with its store's own settings through ``extract_features``):

- Images. Fashion-MNIST (28 px), EfficientNet-Lite0 penultimate features at 112 px. Twenty train images resized by
  ±10 %, cropped by one pixel on each side and saved as JPEG at quality 75 score 0.56-0.86 (cosine) to their
  original, which is their most similar train image for only 13 of 20, while 1 % of the 2,000 test images reach
  0.922 with some distinct train image: at the threshold that flags 1 % of the test images, the features find 0 of
  the 20; centred on the train mean 1, PCA-whitened on the store's rows (64 or 256 dimensions) 1, less the query's
  cosine with its 10th neighbour in the val split (score normalisation) 2, a ratio test (1 - best) / (1 - second) 1;
  the average-pooled outputs of blocks 4, 6, 9, 12 and 16 0 (the original the best match for 2-15 of 20);
  ``imagehash``'s phash 1 (distinct train images within 2 bits of 1 % of the test images, copies 0-14 bits from
  their original). Fashion-MNIST's garments are so alike at 28 px (plain trousers, sneakers, T-shirts) that an edit
  moves an image further than the gap between two garments in every representation but the pixels once aligned.
  The pixel similarity's settings were chosen on 600 other copies (300 train images at ×0.9 and at ×1.1, seed 100)
  and the val split against train, never the test split, by the gap between the copies' lowest similarity and the
  val images' 99th percentile: a 48 px frame (32 px: no gap, 0.955 against 0.957; 64 px: no wider, at 1.8 times
  the work) blurred by 1 px (0.8-1.0 px: gaps of 0.008-0.011; 1.1 px 0.005; 1.2 px none), zooms 0.86-1.16 in steps
  of 0.02 (steps of 0.03 lost copies; 0.01 gained nothing), shifts of -1, 0 and 1 px (half-pixel steps raised
  distinct pairs more than copies), 40 candidates by thumbnail (20 missed the original of 2 of the 600 copies). The
  copies' lowest similarity is then 0.961 (also 0.961 over 1,200 copies at ×0.93-×1.07), the val images' 99th
  percentile 0.951: the threshold, 0.956, is the middle. On the test split (seeds 0-3 of
  the benchmark) it finds 20 of 20 copies each time and flags 10 of the 2,000 other test images (0.5 %): garments a
  few grey levels from a train garment (the data set holds many near-identical product photos).
- Texts. BBC News, all-MiniLM-L6-v2 at 256 tokens. Ten train articles copied with their whitespace changed and one
  sentence replaced by a sentence of an article on another topic: the features' cosine with the original is
  0.84-1.00 (1.00 where the sentence lay beyond the 256 tokens read); at 0.92 (the former rule, a milder edit's
  threshold) it finds 7-10 of 10 (benchmark seeds 0-3), and at its 1 % level (0.880) 9-10. The containment of word
  5-grams is 0.80-0.98 for the copies, while a val article's most contained train article (of its 10 nearest by
  cosine) is below 0.28 but for two near-identical articles the corpus holds twice (0.99): chosen on 100 other copies
  (seeds 100-109, lowest 0.80) and val, 0.6 leaves a copy 0.2 to lose and a distinct article 0.3. On the test split
  it finds 10 of 10 (seeds 0-3) and flags 4 of 500 other articles (0.8 %), the corpus's near-identical pairs
  (containment 0.78-0.98), which the features' cosine flags as well.

Pairs come from neighbour lists (the candidates, or the features' graph), so an item with more near-duplicates than
its list holds lists only the nearest.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, FeaturestoreError
from ..store.hdf5 import FeatureStore
from .graph import NeighbourGraph

log = logging.getLogger("featurestore")

NEAR_DUPLICATE_SIMILARITY = {"image": 0.956, "text": 0.6}  # pixel similarity (images), shingle containment (texts)
FEATURE_SIMILARITY = {"image": 0.95, "text": 0.92}  # the features' cosine, where the items cannot be read
RULES = {"image": "pixels", "text": "shingles"}
MEASURES = {"pixels": "pixel similarity", "shingles": "shared word 5-grams", "features": "features' cosine"}
REFERENCE_SPLITS = ("train", "val")  # what a head learns from or is tuned on: a scored item close to one leaks
EXAMPLES = 3  # paths a leak's line names


@dataclass
class NearDuplicates:
    """``pairs`` (P, 2) int64 row indices, the smaller first, most similar first; ``similarities`` (P,) float32;
    ``rule`` ``"pixels"``, ``"shingles"`` or ``"features"``; ``threshold`` the similarity they reach."""

    pairs: np.ndarray
    similarities: np.ndarray
    rule: str
    threshold: float


@dataclass
class Leaks:
    """The near-duplicates between ``split`` and ``references``: one row per item of ``split`` that has any,
    ``(path, reference path, reference split, similarity)`` with its most similar reference, most similar first;
    ``checked`` the items of ``split``; ``unit`` ``"images"``, ``"texts"`` or ``"items"``."""

    split: str
    references: tuple[str, ...]
    rows: list[tuple[str, str, str, float]] = field(default_factory=list)
    checked: int = 0
    rule: str = "pixels"
    threshold: float = NEAR_DUPLICATE_SIMILARITY["image"]
    unit: str = "images"

    def line(self) -> str:
        """One line: how many, of how many, by which rule, and the first few paths with their reference."""
        examples = ", ".join(f"{path} ~ {reference}" for path, reference, _, _ in self.rows[:EXAMPLES])
        more = f" (and {len(self.rows) - EXAMPLES} more)" if len(self.rows) > EXAMPLES else ""
        return (f"{len(self.rows)} of {self.checked} {self.split} {self.unit} are near-duplicates of "
                f"{'/'.join(self.references)} items ({MEASURES.get(self.rule, self.rule)} >= {self.threshold:g}): "
                f"{examples}{more}")


def modality(store: FeatureStore) -> str:
    """``"text"`` or ``"image"``: the store's fingerprint ``kind`` (``image`` when absent)."""
    return "text" if store.fingerprint.get("kind") == "text" else "image"


def threshold_for(fingerprint: dict) -> float:
    """The near-duplicate threshold for a store of this fingerprint (its ``kind``; ``image`` when absent)."""
    return NEAR_DUPLICATE_SIMILARITY.get(fingerprint.get("kind", "image"), NEAR_DUPLICATE_SIMILARITY["image"])


def unique_pairs(neighbours: np.ndarray, similarities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (row i, ``neighbours[i, j]``) of (N, k) neighbour lists whose ``similarities`` (N, k) reach
    ``threshold`` (index -1: none), each pair once: (P, 2) int64, the smaller index first, and (P,) float32, most
    similar first (ties by indices). A pair found from both ends keeps its larger similarity."""
    rows = np.repeat(np.arange(neighbours.shape[0], dtype=np.int64), neighbours.shape[1])
    neighbours, similarities = neighbours.ravel(), similarities.ravel()
    close = (neighbours >= 0) & (neighbours != rows) & (similarities >= threshold)
    pairs = np.stack([np.minimum(rows[close], neighbours[close]), np.maximum(rows[close], neighbours[close])], axis=1)
    similarities = similarities[close]
    if not len(pairs):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    order = np.lexsort((-similarities, pairs[:, 1], pairs[:, 0]))
    pairs, similarities = pairs[order], similarities[order]
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    pairs, similarities = pairs[first], similarities[first]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -similarities))
    return pairs[order], similarities[order].astype(np.float32)


def near_duplicates(graph: NeighbourGraph, threshold: float = FEATURE_SIMILARITY["image"]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows at cosine similarity >= ``threshold`` in the features' ``graph``, each pair once: (P, 2) int64
    row indices, the smaller first, and (P,) float32 similarities; most similar first (ties by row indices)."""
    return unique_pairs(graph.indices, graph.similarities, threshold)


def image_near_duplicates(files: Sequence[str | Path], threshold: float = NEAR_DUPLICATE_SIMILARITY["image"]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of the image ``files`` at pixel similarity >= ``threshold`` (:mod:`.copies`), as
    :func:`near_duplicates` gives them. Raises :class:`~featurestore.errors.ImageDecodeError` for a file that
    cannot be read."""
    from .copies import candidates, pixel_similarity, read_frames

    frames = read_frames(files)
    if len(frames) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    neighbours = candidates(frames)
    return unique_pairs(neighbours, pixel_similarity(frames, frames, neighbours), threshold)


def text_near_duplicates(texts: Sequence[str], graph: NeighbourGraph,
                         threshold: float = NEAR_DUPLICATE_SIMILARITY["text"]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of the documents ``texts`` (the rows of the features' ``graph``, whose neighbours are the candidates)
    whose shingle containment reaches ``threshold`` (:mod:`.texts`), as :func:`near_duplicates` gives them."""
    from .texts import shingles, text_similarity

    sets = [shingles(text) for text in texts]
    return unique_pairs(graph.indices, text_similarity(sets, sets, graph.indices), threshold)


def best_matches(indices: np.ndarray, similarities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (Q, k) candidate ``indices`` (-1: none) and their ``similarities``: the most similar candidate where
    it reaches ``threshold`` (else -1), and its similarity (-1 for a row without candidates)."""
    if not indices.shape[1]:
        return np.full(len(indices), -1, np.int64), np.full(len(indices), -1, np.float32)
    similarities = np.where(indices >= 0, similarities, -1.0)
    best = similarities.argmax(axis=1)[:, None]
    found = np.take_along_axis(similarities, best, axis=1)[:, 0].astype(np.float32)
    return np.where(found >= threshold, np.take_along_axis(indices, best, axis=1)[:, 0], -1), found


def feature_candidates(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's ``k`` most cosine-similar reference rows (queries (Q, D), references (R, D) float): (Q, k')
    int64 indices, k' = min(k, R), and float32 cosines."""
    import faiss

    from .graph import unit_rows

    index = faiss.IndexFlatIP(references.shape[1])
    index.add(unit_rows(references))
    similarities, indices = index.search(unit_rows(queries), max(0, min(k, len(references))))
    return indices.astype(np.int64), similarities


def image_matches(query_files: Sequence[str | Path], reference_files: Sequence[str | Path],
                  threshold: float = NEAR_DUPLICATE_SIMILARITY["image"]) -> tuple[np.ndarray, np.ndarray]:
    """Each query image's most similar reference image by pixel similarity (:mod:`.copies`): (Q,) int64 reference
    indices, -1 where none reaches ``threshold``, and (Q,) float32 similarities (-1 without a reference)."""
    from .copies import candidates, pixel_similarity, read_frames

    queries, references = read_frames(query_files), read_frames(reference_files)
    lists = candidates(queries, references)
    return best_matches(lists, pixel_similarity(queries, references, lists), threshold)


def text_matches(query_texts: Sequence[str], reference_texts: Sequence[str], queries: np.ndarray,
                 references: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY["text"]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each query document's most similar reference document by shingle containment (:mod:`.texts`), among its
    nearest by the features' cosine (``queries`` (Q, D), ``references`` (R, D)); as :func:`image_matches`."""
    from .texts import CANDIDATES, shingles, text_similarity

    lists, _ = feature_candidates(queries, references, CANDIDATES)
    similarities = text_similarity([shingles(t) for t in query_texts], [shingles(t) for t in reference_texts], lists)
    return best_matches(lists, similarities, threshold)


def feature_matches(queries: np.ndarray, references: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's most cosine-similar reference row; as :func:`image_matches`."""
    return best_matches(*feature_candidates(queries, references, 1), threshold)


def item_files(store: FeatureStore, splits: Sequence[str], data: str | Path | None = None) -> list[Path]:
    """The files behind the rows of ``splits`` of ``store``, split after split in row order, from its recorded source
    (``data`` instead when given), each checked against its content id as every reader of a store's items checks them
    (``heads.records.store_records``, as :func:`.texts.store_texts` reads documents). Raises
    :class:`FeaturestoreError` saying why they cannot be read (no recorded source, a file missing or changed)."""
    from ..heads.records import store_records

    return [record.path for split in splits for record in store_records(store, split, data)]


def fallback_warning(problem: Exception, kind: str) -> None:
    log.warning("%s; near-duplicates by the features' cosine >= %g instead%s", problem, FEATURE_SIMILARITY[kind],
                ", which finds exact copies, re-saves and upscales only" if kind == "image" else "")


def store_near_duplicates(store: FeatureStore, graph: NeighbourGraph, threshold: float | None = None,
                          data: str | Path | None = None) -> NearDuplicates:
    """Every near-duplicate pair among the rows of ``store`` (all splits, in the store's order: the rows of the
    features' neighbour ``graph``), by its modality's rule (module docstring):
    the items read under ``data``, else where the store records its source; where they cannot be read, the
    features' cosine (a warning says why). ``threshold``: the rule's (default: the modality's)."""
    kind = modality(store)
    limit = NEAR_DUPLICATE_SIMILARITY[kind] if threshold is None else threshold
    try:
        if kind == "image":
            return NearDuplicates(*image_near_duplicates(item_files(store, store.splits, data), limit), "pixels",
                                  limit)
        from .texts import store_texts

        texts = [text for split in store.splits for text in store_texts(store, split, data)]
        return NearDuplicates(*text_near_duplicates(texts, graph, limit), "shingles", limit)
    except FeaturestoreError as exc:
        fallback_warning(exc, kind)
    limit = FEATURE_SIMILARITY[kind]
    return NearDuplicates(*near_duplicates(graph, limit), "features", limit)


def reference_splits(store_splits: Sequence[str], split: str) -> tuple[str, ...]:
    """The splits ``split`` is checked against: the train and val splits the store has, but ``split`` itself."""
    return tuple(s for s in REFERENCE_SPLITS if s in store_splits and s != split)


def find_leaks(store: FeatureStore, split: str = "test", data: str | Path | None = None,
               threshold: float | None = None) -> Leaks:
    """The items of ``split`` that are near-duplicates of a train or val item (but ``split`` itself) of ``store``, by
    its modality's rule (module docstring; the items read under ``data``, else where the store records its source;
    where they cannot be read, the features' cosine, and a warning says why). Items of identical content are left
    out: ``heads.reports.check_no_overlap`` refuses those."""
    kind = modality(store)
    references = reference_splits(store.splits, split)
    leaks = Leaks(split, references, checked=store.count(split), rule=RULES[kind],
                  threshold=NEAR_DUPLICATE_SIMILARITY[kind] if threshold is None else threshold, unit=f"{kind}s")
    if not references or not store.count(split):
        return leaks
    ref_paths = np.concatenate([store.paths(s) for s in references])
    ref_splits = np.concatenate([np.full(store.count(s), s, dtype=object) for s in references])
    ref_ids = np.concatenate([store.ids(s) for s in references])
    paths, ids = store.paths(split), store.ids(split)
    try:
        matched, similarities = rule_matches(store, split, references, data, leaks.threshold)
    except FeaturestoreError as exc:
        fallback_warning(exc, kind)
        leaks.rule, leaks.threshold = "features", FEATURE_SIMILARITY[kind]
        matched, similarities = feature_matches(split_rows(store, [split]), split_rows(store, references),
                                                leaks.threshold)
    found = np.flatnonzero((matched >= 0) & (ids != ref_ids[np.maximum(matched, 0)]))
    found = found[np.argsort(-similarities[found], kind="stable")]
    leaks.rows = [(str(paths[i]), str(ref_paths[matched[i]]), str(ref_splits[matched[i]]),
                   round(float(similarities[i]), 4)) for i in found]
    return leaks


def rule_matches(store: FeatureStore, split: str, references: Sequence[str], data: str | Path | None,
                 threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_matches` or :func:`text_matches` of the items of ``split`` with those of ``references``, in
    their order. Raises :class:`FeaturestoreError` when the items cannot be read."""
    if modality(store) == "image":
        return image_matches(item_files(store, [split], data), item_files(store, references, data), threshold)
    from .texts import store_texts

    return text_matches(store_texts(store, split, data), [t for s in references for t in store_texts(store, s, data)],
                        split_rows(store, [split]), split_rows(store, references), threshold)


def split_rows(store: FeatureStore, splits: Sequence[str]) -> np.ndarray:
    """The features of ``splits`` of ``store``, one after the other: (N, D) float32."""
    return np.concatenate([store.load(split, np.float32)[0] for split in splits])


def audit_leaks(audit_dir: str | Path, split: str = "test") -> Leaks:
    """The leaks of ``split`` as an audit found them: its ``near_duplicates.csv`` (pairs between ``split`` and train
    or val) and ``summary.json`` (the rule and its threshold) in ``audit_dir``; identical files included (the CSV
    holds no content ids). Raises :class:`DataError` when they are not there."""
    from ..utils.timings import read_json
    from .reports import NEAR_DUPLICATES, SUMMARY

    audit_dir = Path(audit_dir)
    try:
        summary = read_json(audit_dir / SUMMARY)
        with open(audit_dir / NEAR_DUPLICATES, newline="", encoding="utf-8") as handle:
            pairs = list(csv.DictReader(handle))
    except (OSError, ValueError) as exc:
        raise DataError(f"{audit_dir}: no readable audit ({exc})") from None
    counts = summary.get("rows", {})
    references = reference_splits(list(counts), split)
    best: dict[str, tuple[str, str, str, float]] = {}
    for pair in pairs:
        for side, other in (("", "duplicate_"), ("duplicate_", "")):
            if pair[f"{side}split"] == split and pair[f"{other}split"] in references:
                row = (pair[f"{side}path"], pair[f"{other}path"], pair[f"{other}split"], float(pair["similarity"]))
                if row[0] not in best or row[3] > best[row[0]][3]:
                    best[row[0]] = row
    found = summary.get("near_duplicates", {})
    rule = found.get("rule", "similarity")  # an audit that did not record its rule
    unit = {"pixels": "images", "shingles": "texts"}.get(rule, "items")
    return Leaks(split, references, sorted(best.values(), key=lambda row: -row[3]), checked=int(counts.get(split, 0)),
                 rule=rule, threshold=float(found.get("threshold", NEAR_DUPLICATE_SIMILARITY["image"])), unit=unit)
