"""The kNN head (issue 28): a weighted vote of the cosine neighbours, k and T chosen on validation, used like any head
(reports, verdict, curve) and exported as one ONNX graph; real Lite0 features of real Fashion-MNIST images, real
MiniLM embeddings of real BBC articles."""

import numpy as np
import onnx
import pytest
import torch

from featurestore import FeatureStore
from featurestore.configs import CurveOptions, FinetuneConfig, HeadConfig
from featurestore.deploy import knn_export
from featurestore.deploy.export import ExportError, export_onnx
from featurestore.deploy.predict import OnnxClassifier, predict
from featurestore.encode.texts import read_text
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.knn import TEMPERATURES, KNNClassifier, candidate_ks, choose_knn, nearest
from featurestore.heads.records import store_records
from featurestore.heads.reports import evaluate_head, write_reports
from featurestore.heads.train import train_head

from .conftest import bbc_store_and_head

KNN = HeadConfig(head="knn", n_jobs=1)


def brute_force_proba(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, temperature: float,
                      n_classes: int) -> np.ndarray:
    """DINOv2's kNN vote written out, float64: cosine, the k most similar rows (ties: the lower row), exp(s / T)."""
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    similarity = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    proba = np.zeros((len(queries), n_classes))
    for i, row in enumerate(similarity):
        for j in sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]:
            proba[i, labels[j]] += np.exp(row[j] / temperature)
    return proba / proba.sum(axis=1, keepdims=True)


def test_neighbours_are_ranked_as_onnx_topk_ranks_them():
    rng = np.random.default_rng(0)
    similarity = rng.integers(0, 4, (6, 30)).astype(np.float32)  # many ties
    values, indices = nearest(similarity, 7)
    for row, found in zip(similarity, indices, strict=True):
        assert found.tolist() == sorted(range(30), key=lambda c: (-row[c], c))[:7]
    assert np.array_equal(values, np.take_along_axis(similarity, indices, axis=1))
    assert nearest(similarity, 50)[1].shape == (6, 30)  # k capped by the rows
    X, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    knn = KNNClassifier(k=9, temperature=0.05).fit(X, y)
    np.testing.assert_allclose(knn.predict_proba(queries), brute_force_proba(X, y, queries, 9, 0.05, 3), atol=1e-5)


@pytest.fixture(scope="module")
def image(fashion_folder_master, tmp_path_factory, lite0_small):
    """The tiny Fashion-MNIST store (2 train, 1 val, 1 test per class), a kNN head and a logreg head on it."""
    folder = tmp_path_factory.mktemp("knn")
    store_path = folder / "lite0.h5"
    extract_features(fashion_folder_master, store_path, model=lite0_small, workers=0, progress=False)
    knn = train_head(store_path, KNN)
    logreg = train_head(store_path, HeadConfig(c_min=1e-2, c_max=1e2, c_points=5, n_jobs=1))
    return folder, FeatureStore(store_path), knn, logreg


def test_k_and_temperature_are_chosen_on_validation_and_saved_in_a_model_file(image):
    folder, store, head, _ = image
    X, y, _ = store.load("train")
    Xv, yv, _ = store.load("val")
    assert set(head.settings) == {"k", "temperature"} and head.n_train == len(y) + len(yv)
    assert len(head.sweep) == len(candidate_ks(len(y))) * len(TEMPERATURES) and max(candidate_ks(len(y))) == len(y)
    assert head.settings == choose_knn(head.sweep)
    # the protocol: the chosen settings fitted on train alone score on val what the sweep recorded
    alone = KNNClassifier(**head.settings).fit(X, y)
    assert head.val_accuracy == pytest.approx(np.mean(alone.predict(Xv) == yv))
    Xt, _, _ = store.load("test")
    both = np.concatenate([X, Xv]), np.concatenate([y, yv])
    np.testing.assert_allclose(head.predict_proba(Xt), brute_force_proba(*both, Xt, head.settings["k"],
                                                                         head.settings["temperature"], 10), atol=1e-5)
    loaded = load_head(head.save(folder / "knn.skops"))  # skops with the trusted types: no pickle
    assert loaded.settings == head.settings and loaded.summary()["c_grid"]["temperature"] == list(TEMPERATURES)
    np.testing.assert_array_equal(loaded.predict_proba(Xt), head.predict_proba(Xt))


def test_the_knn_head_stands_in_the_comparison_and_the_verdict(image, tmp_path):
    from featurestore.transfer.best import verdict

    folder, store, knn, logreg = image
    results = write_reports([logreg, knn], {knn.backbone: store}, tmp_path)
    name = knn.name
    assert results[name]["C"] is None and results[name]["settings"] == knn.settings
    table = (tmp_path / "comparison.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
    assert f"k={knn.settings['k']}, temperature={knn.settings['temperature']:.3g}" in row
    sweep = (tmp_path / "sweep" / f"{name}.csv").read_text().splitlines()
    assert sweep[0] == "k,temperature,val_accuracy" and len(sweep) == len(knn.sweep) + 1
    assert (tmp_path / "figures" / f"{name}_sweep.png").is_file()
    files = [logreg.save(tmp_path / "logreg.skops"), knn.save(tmp_path / "knn.skops")]
    result = verdict(files)
    assert result["candidates"][name]["kind"] == "encoder"
    assert result["candidates"][name]["val"] == pytest.approx(knn.val_accuracy)
    assert result["deployed"]["test"]["paired"]  # the kNN head's per-item answers, refitted on train alone


def _real_images(store, head):
    from featurestore.encode.images import DecodedImages
    from featurestore.encode.preprocess import Preprocessing

    records = store_records(store, "val") + store_records(store, "test")
    decoded = DecodedImages([r.path for r in records], Preprocessing.from_dict(head.fingerprint["preprocessing"]))
    return np.stack([decoded[i][1].expand(3, -1, -1).numpy() for i in range(len(records))])


def test_the_knn_head_exports_as_one_graph_that_votes_as_the_head_does(image, lite0_small, fashion_folder_master):
    folder, store, head, _ = image
    images = _real_images(store, head)
    path = folder / "knn.onnx"
    report = export_onnx(head, path, sample_images=images)
    assert report["check"]["n"] == len(images) == 20
    assert report["check"]["max_probability_diff"] <= 1e-4 and report["check"]["labels_equal"]
    model = onnx.load(str(path))
    assert {"TopK", "MatMul", "Exp", "Gather"} <= set(report["operators"])
    assert {node.domain for node in model.graph.node} <= {""}  # plain operators: every provider runs them
    probabilities, labels = OnnxClassifier(path, "cpu")(images)
    with torch.inference_mode():
        expected = head.predict_proba(lite0_small(torch.from_numpy(images)).numpy())
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    assert np.array_equal(labels, expected.argmax(axis=1))
    summary = predict(path, fashion_folder_master, folder / "pred.csv", split="test", workers=0, progress=False)
    X, y, _ = store.load("test")
    assert summary.predicted == 10 and summary.accuracy == pytest.approx(np.mean(head.predict(X) == y))


def test_an_export_refuses_a_knn_head_past_its_stated_size_in_one_line(image, monkeypatch):
    folder, _, head, _ = image
    monkeypatch.setattr(knn_export, "KNN_EXPORT_MAX_BYTES", 1000)
    with pytest.raises(ExportError) as refused:
        export_onnx(head, folder / "too_large.onnx")
    message = str(refused.value)
    assert "\n" not in message and f"{head.n_train} train rows" in message and "KNN_EXPORT_MAX_BYTES" in message
    assert not (folder / "too_large.onnx").exists()
    # an int8 graph is judged on val, which the head holds: refused, not judged on its own training rows
    with pytest.raises(ExportError, match="--quantize int8 is judged on the val split"):
        export_onnx(head, folder / "int8.onnx", quantize="int8")


def test_the_curve_draws_a_knn_line_beside_the_probe(image, fashion_folder_master, tmp_path):
    from featurestore.transfer.curve import run_curve

    _, store, _, _ = image
    options = CurveOptions(budgets=[1, 2], methods=("linear_probe", "knn"), finetune=FinetuneConfig(workers=0))
    result = run_curve(store, fashion_folder_master, tmp_path, options)
    points = {(p["labels_per_class"], p["method"]): p for p in result["points"]}
    assert set(points) == {(b, m) for b in (1, 2) for m in ("linear_probe", "knn")}
    for budget in (1, 2):
        line, probe = points[(budget, "knn")], points[(budget, "linear_probe")]
        assert line["train_ids"] == probe["train_ids"] and line["n_train"] == 10 * budget
        assert line["k"] <= 10 * budget and line["temperature"] in TEMPERATURES  # k capped by the budget's rows
        assert 0 <= line["test_accuracy"] <= 1 and 0 <= line["val_accuracy"] <= 1
    assert "knn" in (tmp_path / "curve.csv").read_text()


def test_a_knn_head_on_a_text_store_trains_evaluates_and_exports(tmp_path):
    data, store_path, _ = bbc_store_and_head(tmp_path, train=3, val=2, test=2, seed=1)
    store = FeatureStore(store_path)
    head = train_head(store, KNN)
    metrics, _, _ = evaluate_head(head, store)
    assert metrics["n"] == 10 and metrics["settings"] == head.settings and head.settings["k"] <= 15
    report = export_onnx(head, tmp_path / "knn.onnx")
    assert report["modality"] == "text" and report["check"]["labels_equal"]
    assert report["check"]["max_probability_diff"] <= 1e-4
    texts = [record.text or read_text(record.path) for record in store_records(store, "test", data)]
    probabilities, labels = OnnxClassifier(tmp_path / "knn.onnx", "cpu")(texts)
    np.testing.assert_allclose(probabilities, head.predict_proba(store.load("test")[0]), atol=1e-4)
    assert np.array_equal(labels, head.predict(store.load("test")[0]))
