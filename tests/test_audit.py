"""The data audit (issue 28): the neighbour graph, label issues, near-duplicates across splits, the files it writes,
their reuse, and the command's errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.audit import NEAR_DUPLICATE_SIMILARITY, audit_store, near_duplicates, neighbour_graph
from featurestore.audit import graph as graph_module
from featurestore.audit import labels as labels_module
from featurestore.audit import outliers as outliers_module
from featurestore.audit.graph import NeighbourGraph, measure_recall, rerank, unit_rows
from featurestore.audit.labels import audit_labels, c_path, fold_count, out_of_fold_probabilities
from featurestore.audit.projection import sample_neighbours
from featurestore.cli import main
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.errors import BadValueError
from featurestore.extract.launch import extract_features
from featurestore.store import FeatureStore, SplitArrays, write_store
from featurestore.store.corrections import read_corrections

COLUMNS = {
    "label_issues.csv": ["path", "split", "given", "suggested", "score", "is_issue"],
    "near_duplicates.csv": ["path", "split", "duplicate_path", "duplicate_split", "similarity"],
    "outliers.csv": ["path", "split", "score"],
}
# Train items given a label of a far-off class: (true class, given class).
FLIPS = {"Trouser": "Sneaker", "Bag": "Dress", "Ankle_boot": "T-shirt_top"}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def synthetic_store(path: Path, splits: dict[str, np.ndarray], class_names: list[str], dim: int = 8,
                    seed: int = 0) -> Path:
    """A store of random features whose splits hold the given labels (N,) int."""
    rng = np.random.default_rng(seed)
    arrays = {name: SplitArrays(rng.normal(size=(len(y), dim)).astype(np.float32), np.asarray(y, np.int64),
                                [f"{name}{i:060d}"[-64:] for i in range(len(y))],
                                [f"{name}/{class_names[c]}/{i}.png" for i, c in enumerate(y)])
              for name, y in splits.items()}
    return write_store(path, {"backbone": "synthetic", "feature_dim": dim}, class_names, arrays)


# --- the graph and its parts, on synthetic rows -------------------------------------------------------------------

def test_the_exact_graph_is_every_rows_nearest_cosine_neighbours_without_itself():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 16)).astype(np.float32)
    X[7] = X[3] * 2.5  # the same direction: cosine 1
    graph = neighbour_graph(X, k=5)
    units = unit_rows(X)
    similarities = units @ units.T
    np.fill_diagonal(similarities, -np.inf)
    expected = -np.sort(-similarities, axis=1)[:, :5]
    assert graph.kind == "exact" and graph.recall == 1.0
    assert graph.indices.shape == (120, 5) and graph.indices.dtype == np.int64
    assert graph.similarities.dtype == np.float32
    assert not (graph.indices == np.arange(120)[:, None]).any()
    np.testing.assert_allclose(graph.similarities, expected, atol=1e-5)
    assert graph.indices[3, 0] == 7 and graph.indices[7, 0] == 3


def test_the_approximate_graph_measures_its_recall_against_exact_search():
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(8, 32))[rng.integers(0, 8, 600)] + 0.3 * rng.normal(size=(600, 32))).astype(np.float32)
    graph = neighbour_graph(X, k=10, exact_max_rows=100, recall_queries=200)
    assert graph.kind == "hnsw"
    assert 0.9 <= graph.recall <= 1.0
    assert not (graph.indices == np.arange(600)[:, None]).any()
    # The measurement can fail: a graph of random neighbours has a recall near k / N.
    scrambled = rng.integers(0, 600, size=graph.indices.shape)
    units = unit_rows(X)
    scrambled_similarities = np.einsum("nd,nkd->nk", units, units[scrambled]).astype(np.float32)
    assert measure_recall(units, scrambled, scrambled_similarities, 200, seed=0) < 0.2


def test_near_duplicates_are_the_pairs_at_the_threshold_each_listed_once():
    indices = np.array([[1, 2], [0, 2], [0, 1], [2, 0]])
    similarities = np.array([[0.99, 0.5], [0.99, 0.96], [0.5, 0.96], [0.951, 0.2]], dtype=np.float32)
    pairs, found = near_duplicates(NeighbourGraph(indices, similarities, "exact", 1.0), threshold=0.95)
    assert pairs.tolist() == [[0, 1], [1, 2], [2, 3]]
    np.testing.assert_allclose(found, [0.99, 0.96, 0.951], rtol=1e-6)


def test_a_class_with_fewer_items_than_folds_reduces_them_and_one_with_a_single_item_is_refused():
    names = ["cat", "dog", "owl"]
    assert fold_count(np.array([0] * 9 + [1] * 9 + [2] * 3), names, 5) == 3
    assert fold_count(np.array([0] * 9 + [1] * 9 + [2] * 9), names, 5) == 5
    with pytest.raises(BadValueError, match="class 'owl' has 1 labelled item"):
        fold_count(np.array([0] * 9 + [1] * 9 + [2]), names, 5)


def clustered(rows: int, dim: int, clusters: int = 8, seed: int = 1,
              latent: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, dim) float32 rows around ``clusters`` random centres, and each row's cluster (N,) int64; with
    ``latent``, the rows vary about their centre in that many directions only."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, rows)
    spread = 0.3 * rng.normal(size=(rows, dim))
    if latent is not None:
        spread = 0.3 * rng.normal(size=(rows, latent)) @ rng.normal(size=(latent, dim)) / np.sqrt(latent)
    return (rng.normal(size=(clusters, dim))[labels] + spread).astype(np.float32), labels


def test_beyond_the_exact_limit_principal_components_find_candidates_and_exact_similarities_rank_them(
        monkeypatch, caplog):
    monkeypatch.setattr(graph_module, "REDUCED_DIMS", 10)  # the 48-d rows are searched on 10 components
    X, _ = clustered(600, 48, latent=4)
    graph = neighbour_graph(X, k=10, exact_max_rows=100, recall_queries=200)
    units = unit_rows(X)
    assert graph.kind == "hnsw" and 0.95 <= graph.recall <= 1.0 and "all 48 dimensions" not in caplog.text
    assert (graph.indices >= 0).all() and not (graph.indices == np.arange(600)[:, None]).any()
    exact = np.einsum("nd,nkd->nk", units, units[graph.indices])
    np.testing.assert_allclose(graph.similarities, exact, atol=1e-5)  # exact cosine, not the components'
    assert (np.diff(graph.similarities, axis=1) <= 1e-6).all()


def test_a_graph_on_too_few_components_is_rebuilt_on_all_dimensions(monkeypatch, caplog):
    monkeypatch.setattr(graph_module, "REDUCED_DIMS", 8)  # rows spread alike in all 48 directions
    X, _ = clustered(600, 48)
    with caplog.at_level("WARNING", logger="featurestore"):
        graph = neighbour_graph(X, k=10, exact_max_rows=100, recall_queries=200)
    assert "on 8 principal components, below 0.95: searching all 48 dimensions" in caplog.text
    assert graph.recall >= 0.95


def test_reranking_leaves_out_the_row_itself_and_missing_candidates():
    units = unit_rows(np.array([[1, 0], [1, 0.1], [1, 1], [0, 1]], np.float32))
    candidates = np.array([[0, 2, 1, -1], [3, 1, -1, -1], [2, 3, 0, 1], [-1, -1, -1, 3]])
    indices, similarities = rerank(units, candidates, 3)
    assert indices.tolist() == [[1, 2, -1], [3, -1, -1], [1, 3, 0], [-1, -1, -1]]  # 3 and 0 tie: candidate order
    assert indices.dtype == np.int64 and similarities.dtype == np.float32
    np.testing.assert_allclose(similarities[0], [units[0] @ units[1], units[0] @ units[2], -1.0], rtol=1e-6)
    assert (similarities[indices < 0] == -1.0).all()


def test_rows_normalised_in_place_are_the_array_itself_with_the_same_values():
    X = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    X[3] = 0
    copied = unit_rows(X)
    assert copied is not X
    assert unit_rows(X, in_place=True) is X
    np.testing.assert_array_equal(X, copied)
    assert (X[3] == 0).all()


def test_class_similarity_taken_in_blocks_is_the_cosine_to_the_class_centroid(monkeypatch):
    monkeypatch.setattr(outliers_module, "BLOCK_ROWS", 7)
    X, labels = clustered(50, 6, clusters=3)
    units = unit_rows(X)
    centroids = np.stack([units[labels == c].sum(axis=0) for c in range(3)]).astype(np.float64)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.testing.assert_allclose(outliers_module.class_similarity(units, labels),
                               np.einsum("nd,nd->n", units, centroids[labels]), atol=1e-6)


def test_the_c_path_stops_past_the_best_c_with_the_probabilities_of_the_whole_path():
    X, labels = clustered(150, 12, clusters=3, seed=4)
    X += np.random.default_rng(5).normal(scale=1.5, size=X.shape).astype(np.float32)  # not separable: C matters
    grid = labels_module.C_GRID
    whole, whole_losses = c_path(X, labels, 3, 3, grid, patience=None)
    stopped, losses = c_path(X, labels, 3, 3, grid, patience=2)
    best = min(whole_losses, key=lambda C: (round(whole_losses[C], 12), C))
    assert list(stopped) == list(grid[:grid.index(best) + 3]) and len(stopped) < len(grid)  # the best, two more
    assert all(np.array_equal(stopped[C], whole[C]) and losses[C] == whole_losses[C] for C in stopped)
    per_fold = out_of_fold_probabilities(X, labels, 3, 3, grid)  # fold after fold: the same numbers
    assert all(np.array_equal(per_fold[C], whole[C]) for C in grid)


def test_beyond_fit_max_rows_each_fold_fits_a_sample_and_predicts_all_its_held_out_rows(monkeypatch):
    from featurestore.heads.estimators import PathClassifier

    fitted = []
    fit = PathClassifier.fit
    monkeypatch.setattr(PathClassifier, "fit", lambda self, X, y: fitted.append(len(y)) or fit(self, X, y))
    monkeypatch.setattr(labels_module, "PREDICT_ROWS", 16)
    X, labels = clustered(300, 10, clusters=3, seed=6)
    probabilities = out_of_fold_probabilities(X, labels, 3, 5, (1.0,), fit_max_rows=90)[1.0]
    assert fitted == [90] * 5
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.95


@pytest.mark.parametrize("exact_rows", [4_096, 10])
def test_the_map_is_given_each_rows_neighbours_itself_first(monkeypatch, exact_rows):
    import featurestore.audit.projection as projection

    monkeypatch.setattr(projection, "EXACT_MAP_ROWS", exact_rows)  # 10: the approximate search
    X, _ = clustered(80, 16)
    indices, distances = sample_neighbours(X, 6)
    graph = neighbour_graph(X, 5)
    assert indices.shape == distances.shape == (80, 6) and distances.dtype == np.float32
    assert (indices[:, 0] == np.arange(80)).all() and (distances[:, 0] == 0).all()
    np.testing.assert_allclose(distances[:, 1:], 1 - graph.similarities, atol=1e-5)


# --- the command's errors ------------------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["-q", "audit", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_names_the_file_and_the_problem_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    code, _, err = run_cli(capsys, "--features", missing, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and f"{missing}: feature store not found" in err

    text = tmp_path / "notes.txt"
    text.write_text("not a store\n")
    code, _, err = run_cli(capsys, "--features", text, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and f"{text}: not a readable HDF5 file" in err

    no_train = synthetic_store(tmp_path / "no_train.h5", {"val": [0, 1, 0, 1], "test": [1, 0]}, ["a", "b"])
    code, _, err = run_cli(capsys, "--features", no_train, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and f"{no_train}: no 'train' split to audit" in err

    lonely = synthetic_store(tmp_path / "lonely.h5", {"train": [0] * 6 + [1] * 6 + [2]}, ["a", "b", "c"])
    code, _, err = run_cli(capsys, "--features", lonely, "--out", tmp_path / "a")
    assert code == 2 and err.count("\n") == 1 and f"{lonely}: class 'c' has 1 labelled item" in err
    assert not (tmp_path / "a" / "summary.json").exists()


# --- a real store: Lite0 features of Fashion-MNIST images ----------------------------------------------------------

@pytest.fixture(scope="module")
def audited(tmp_path_factory, lite0_small):
    """10 classes × (10 train, 3 val, 3 test) real Fashion-MNIST images, a train image upscaled 2× into test, the
    Lite0 store, a copy of it with three train labels flipped (:data:`FLIPS`), and the audit of that copy."""
    root = tmp_path_factory.mktemp("audit")
    images = root / "images"
    prepare_fashion_mnist(images, labels_per_class=10, val_per_class=3, test_per_class=3, seed=3, progress=False)
    original = sorted((images / "train" / "Coat").iterdir())[0]
    with Image.open(original) as image:
        image.resize((image.width * 2, image.height * 2), Image.BICUBIC).save(images / "test" / "Coat" / "copy.png")
    extract_features(images, root / "clean.h5", model=lite0_small, workers=0, progress=False)
    store = FeatureStore(root / "clean.h5")
    names, splits, flipped = store.class_names, {}, {}
    for split in store.splits:
        X, y, ids = store.load(split)
        paths = store.paths(split)
        if split == "train":
            y = y.copy()
            for true, given in FLIPS.items():
                row = int(np.flatnonzero(y == names.index(true))[0])
                y[row] = names.index(given)
                flipped[paths[row]] = (true, given)
        splits[split] = SplitArrays(X, y, list(ids), list(paths))
    noisy = write_store(root / "noisy.h5", store.fingerprint, names, splits, source=store.source_record)
    summary = audit_store(noisy, root / "out")
    return {"root": root, "store": noisy, "clean": root / "clean.h5", "out": root / "out", "summary": summary,
            "flipped": flipped, "original": f"train/Coat/{original.name}", "copy": "test/Coat/copy.png"}


@pytest.mark.slow
def test_a_resized_copy_of_a_train_image_in_test_is_a_cross_split_near_duplicate(audited):
    _, rows = read_csv(audited["out"] / "near_duplicates.csv")
    leaks = [r for r in rows if {r["path"], r["duplicate_path"]} == {audited["original"], audited["copy"]}]
    assert len(leaks) == 1
    leak = leaks[0]
    assert {leak["split"], leak["duplicate_split"]} == {"train", "test"}
    assert float(leak["similarity"]) >= NEAR_DUPLICATE_SIMILARITY["image"]
    assert audited["summary"]["near_duplicates"]["by_splits"].get("test/train", 0) >= 1
    pairs = [tuple(sorted((r["path"], r["duplicate_path"]))) for r in rows]
    assert len(pairs) == len(set(pairs))  # each pair once


@pytest.mark.slow
def test_flipped_train_labels_rank_at_the_top_with_their_true_class_suggested(audited):
    _, rows = read_csv(audited["out"] / "label_issues.csv")
    train = [r for r in rows if r["split"] == "train"]
    ranks = {r["path"]: i for i, r in enumerate(train)}
    for path, (true, given) in audited["flipped"].items():
        row = train[ranks[path]]
        assert ranks[path] < 5, (path, ranks[path])
        assert row["given"] == given and row["suggested"] == true and row["is_issue"] == "true"


@pytest.mark.slow
def test_the_files_have_exactly_their_columns_and_every_item(audited):
    store = FeatureStore(audited["store"])
    recorded = {(str(p), split) for split in store.splits for p in store.paths(split)}
    for name, columns in COLUMNS.items():
        header, rows = read_csv(audited["out"] / name)
        assert header == columns, name
    _, issues = read_csv(audited["out"] / "label_issues.csv")
    assert {(r["path"], r["split"]) for r in issues} == recorded and len(issues) == len(recorded)
    assert {(str(p), "train") for p in store.paths("train")} <= {(r["path"], r["split"]) for r in issues}
    scores = [float(r["score"]) for r in issues]
    assert scores == sorted(scores)
    assert {r["is_issue"] for r in issues} <= {"true", "false"}
    flagged = [r["is_issue"] == "true" for r in issues]
    assert sum(flagged) == audited["summary"]["label_issues"]["flagged"] > 0
    assert flagged == sorted(flagged, reverse=True)  # the flagged items are the top of the ranking
    assert {r["given"] for r in issues} <= set(store.class_names)
    _, outliers = read_csv(audited["out"] / "outliers.csv")
    assert {(r["path"], r["split"]) for r in outliers} == recorded and len(outliers) == len(recorded)
    outlier_scores = [float(r["score"]) for r in outliers]
    assert outlier_scores == sorted(outlier_scores, reverse=True)
    summary = json.loads((audited["out"] / "summary.json").read_text())
    assert summary["key"]["fingerprint_hash"] == store.fingerprint_hash
    assert summary["graph"] == {"kind": "exact", "k": 20, "recall": 1.0}
    assert summary["near_duplicates"]["threshold"] == NEAR_DUPLICATE_SIMILARITY["image"]
    assert summary["rows"] == {split: store.count(split) for split in store.splits}
    assert set(summary["seconds"]) == {"load", "graph", "label_issues", "near_duplicates", "outliers", "map",
                                       "pages"}
    assert summary["reused"] is False
    assert (audited["out"] / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_reuses_the_results_unless_forced_or_the_store_changed(audited, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(audited["out"], out)
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = audit_store(audited["store"], out)
    assert again["reused"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert audit_store(audited["store"], out, force=True)["reused"] is False
    assert (out / "label_issues.csv").stat().st_mtime_ns != written["label_issues.csv"]
    # The clean store has the same fingerprint but other labels: its audit is not the noisy one's.
    clean = audit_store(audited["clean"], out)
    assert clean["reused"] is False and clean["key"]["rows_sha256"] != again["key"]["rows_sha256"]
    _, issues = read_csv(out / "label_issues.csv")
    given = {r["path"]: r["given"] for r in issues}
    assert all(given[path] == true for path, (true, _) in audited["flipped"].items())
    assert audit_store(audited["clean"], out, k=5)["reused"] is False  # another setting: recomputed


@pytest.mark.slow
def test_the_command_prints_one_summary_line(audited, capsys):
    code, out, _ = run_cli(capsys, "--features", audited["store"], "--out", audited["out"])
    assert code == 0 and out.count("\n") == 1
    assert "reused" in out and f"{audited['summary']['label_issues']['flagged']} of" in out
    assert audited["summary"]["key"]["fingerprint_hash"] in out


@pytest.mark.slow
def test_a_text_store_is_audited_like_an_image_store(tmp_path):
    """Real BBC articles embedded by all-MiniLM-L6-v2; a train article copied into test with its whitespace and one
    sentence changed is found as a leak."""
    from featurestore.configs import Tokenization
    from featurestore.data.prepare import prepare_bbc_news

    data = tmp_path / "bbc"
    prepare_bbc_news(data, labels_per_class=4, val_per_class=2, test_per_class=2, seed=0)
    original = sorted((data / "train" / "sports").iterdir())[0]
    sentences = re.split(r"(?<=[.!?])\s+", original.read_text(encoding="utf-8"))
    sentences[1] = "In a changed sentence, " + sentences[1][0].lower() + sentences[1][1:]
    (data / "test" / "sports" / "copy.txt").write_text("  ".join(sentences).replace("\n", "\n\n"), encoding="utf-8")
    extract_features(data, tmp_path / "minilm.h5", "minilm_l6", tokenization=Tokenization(max_length=256),
                     batch_size=8, workers=0, progress=False)
    summary = audit_store(tmp_path / "minilm.h5", tmp_path / "out")
    assert summary["near_duplicates"]["threshold"] == NEAR_DUPLICATE_SIMILARITY["text"]
    _, rows = read_csv(tmp_path / "out" / "near_duplicates.csv")
    assert any({r["path"], r["duplicate_path"]} == {f"train/sports/{original.name}", "test/sports/copy.txt"}
               for r in rows)
    assert summary["label_issues"]["ranked"] == sum(summary["rows"].values())


@pytest.mark.slow
def test_the_audit_suggests_corrections_and_shows_the_items(audited):
    """What to act on is a corrections file (relabel the flagged issues, leave the leaked test copy out); the map page
    shows every mapped item on hover and the gallery the most likely issues."""
    header, rows = read_csv(audited["out"] / "suggested_corrections.csv")
    assert header == ["path", "label", "reason"]
    suggested = {r["path"]: r["label"] for r in rows}
    assert suggested.get(audited["copy"]) == ""  # the test side of the train/test pair: left out
    relabelled = {path: true for path, (true, _) in audited["flipped"].items() if suggested.get(path) == true}
    assert relabelled  # at least one planted flip is suggested back to its true class
    read_corrections(audited["out"] / "suggested_corrections.csv")  # a valid corrections file as written
    page = (audited["out"] / "map.html").read_text(encoding="utf-8")
    assert audited["copy"] in page and "data:image/png;base64," in page and "<svg" in page
    assert page.count("<circle") == sum(audited["summary"]["rows"].values())
    assert (audited["out"] / "label_issues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@pytest.mark.slow
@pytest.mark.parametrize("head", ["knn", "linear_svm"])
def test_another_head_judges_the_labels_at_settings_chosen_once(audited, head):
    """`audit --head`: any in-memory head's out-of-fold probabilities rank the labels; the planted flips stay among
    the most likely issues, and the head and its chosen settings are recorded."""
    store = FeatureStore(audited["store"])
    X = np.concatenate([store.load(split, np.float32)[0] for split in store.splits])
    labels = np.concatenate([store.labels(split) for split in store.splits])
    paths = np.concatenate([store.paths(split) for split in store.splits])
    graph = neighbour_graph(unit_rows(X.copy()), 20)
    issues = audit_labels(X, labels, graph, store.class_names, head=head)
    assert issues.head == head and issues.settings and issues.log_losses == {}
    assert set(issues.settings) == ({"k", "temperature"} if head == "knn" else {"C"})
    top = set(paths[issues.order[:10]].tolist())
    assert sum(path in top for path in audited["flipped"]) >= 2
    with pytest.raises(BadValueError, match="streams from the store"):
        audit_labels(X, labels, graph, store.class_names, head="sgd_logreg")
