"""int8 graphs for CPUs (`export --quantize int8`): real weights, real data, checked against the float graph on the
test split; refused beyond the tolerance; a normal featurestore model for predict."""

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from featurestore import FeatureStore, cli
from featurestore.configs import HeadConfig, Tokenization
from featurestore.data.prepare import prepare_bbc_news, prepare_fashion_mnist
from featurestore.deploy import export as export_module
from featurestore.deploy.export import INT8_MAX_ACCURACY_DROP, INT8_MIN_LABEL_AGREEMENT, export_onnx
from featurestore.deploy.predict import OnnxClassifier, predict, read_model_metadata
from featurestore.errors import ExportError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-3, "c_max": 1e2, "c_points": 6, "n_jobs": 1}


@pytest.fixture(scope="module")
def fashion_head(tmp_path_factory):
    """Real EfficientNet-Lite0 features at the default data's 112 px of 10 classes × (10 train, 5 val, 20 test)
    Fashion-MNIST images and a logistic-regression head: the int8 graph is kept or dropped on the 50 val images, and
    its parity is checked on the 200 test images, enough for a figure that means something. (At 64 px, the other
    tests' size, the head is flat enough that int8 rounding flips near-ties: 94% agreement on test.)"""
    from featurestore.encode.backbones import load_backbone

    folder = tmp_path_factory.mktemp("quantize")
    images = folder / "images"
    prepare_fashion_mnist(images, labels_per_class=10, val_per_class=5, test_per_class=20, seed=2, progress=False)
    store_path = folder / "lite0.h5"
    model = load_backbone("efficientnet_lite0", image_size=112, crop_pct=1.0)
    extract_features(images, store_path, model=model, workers=0, progress=False)
    return folder, images, train_head(store_path, HeadConfig(head="logreg", **GRID))


@pytest.fixture(scope="module")
def tiny_head(fashion_folder_master, tmp_path_factory, lite0_small):
    """The 40-image fixture's store (10 test images) and its logreg head: for the plumbing, not for parity."""
    store_path = tmp_path_factory.mktemp("quantize_tiny") / "lite0.h5"
    extract_features(fashion_folder_master, store_path, model=lite0_small, workers=0, progress=False)
    return train_head(store_path, HeadConfig(head="logreg", **GRID))


def _assert_within_the_bound(entry: dict, n_test: int) -> None:
    test, val = entry["test"], entry["val"]
    assert entry["kept"] and entry["decided_on"] == "val" and val["split"] == "val"
    assert val["reference_accuracy"] - val["accuracy"] <= INT8_MAX_ACCURACY_DROP  # the rule, on the split it reads
    assert val["label_agreement"] >= INT8_MIN_LABEL_AGREEMENT
    # and, on held-out items, the parity it promises
    assert test["split"] == "test" and test["n"] == n_test
    assert test["reference_accuracy"] - test["accuracy"] <= INT8_MAX_ACCURACY_DROP
    assert test["label_agreement"] >= INT8_MIN_LABEL_AGREEMENT
    assert 0.0 <= test["mean_max_probability_diff"] <= test["max_probability_diff"] <= 1.0
    assert entry["tolerance"] == {"max_accuracy_drop": INT8_MAX_ACCURACY_DROP,
                                  "min_label_agreement": INT8_MIN_LABEL_AGREEMENT}


def _assert_a_featurestore_model(float_path: Path, int8_path: Path) -> dict:
    meta, float_meta = read_model_metadata(int8_path), read_model_metadata(float_path)
    assert {key: meta[key] for key in float_meta} == float_meta  # same classes, fingerprint, head, preprocessing
    model = onnx.load(str(int8_path))
    domains = [entry.domain or "ai.onnx" for entry in model.opset_import]
    assert len(domains) == len(set(domains))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    # the head stays float32: its Gemm is not quantised, and the outputs keep their types
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT,
                                                                          onnx.TensorProto.INT64]
    return json.loads(meta["featurestore_quantization"])


@pytest.mark.slow
def test_int8_image_graph_keeps_parity_with_the_float_graph_on_the_test_split(fashion_head):
    folder, images, head = fashion_head
    path = folder / "model.onnx"
    report = export_onnx(head, path, quantize="int8")
    int8 = folder / "model.int8.onnx"
    entry = report["int8"]
    _assert_within_the_bound(entry, n_test=200)
    assert entry["size_bytes"] == int8.stat().st_size < 0.4 * path.stat().st_size
    quantization = _assert_a_featurestore_model(path, int8)
    assert quantization["method"] == "static" and quantization["calibration"]["split"] == "train"
    assert quantization["calibration"]["rows"] == 100  # every train image (fewer than 256)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    on_disk = json.loads(Path(str(path) + ".report.json").read_text())
    assert on_disk["int8"]["test"] == entry["test"]  # the figures are in the export report

    store = FeatureStore(head.store_path)
    X, y, _ = store.load("test")
    float_accuracy = float(np.mean(head.predict(X) == y))
    assert entry["test"]["reference_accuracy"] == pytest.approx(float_accuracy, abs=1e-6)  # the float graph = head
    out = folder / "int8.csv"
    summary = predict(int8, images, out, split="test", workers=0, progress=False)
    assert summary.model == str(int8) and summary.predicted == 200
    assert summary.accuracy == pytest.approx(entry["test"]["accuracy"], abs=1e-6)
    rows = list(csv.DictReader(open(out)))
    assert {row["label"] for row in rows} <= set(store.class_names)


def test_quantize_int8_through_the_cli(tiny_head, monkeypatch, tmp_path, capsys):
    """The CLI's plumbing on 10 test images, where one flipped label is 10 points: the tolerance is opened here
    (the parity bound itself is held by the slow tests on 200 images and 100 articles)."""
    monkeypatch.setattr(export_module, "INT8_MAX_ACCURACY_DROP", 1.0)
    monkeypatch.setattr(export_module, "INT8_MIN_LABEL_AGREEMENT", 0.0)
    head_path = tmp_path / "head.skops"
    tiny_head.save(head_path)
    out = tmp_path / "cli.onnx"
    argv = ["export", "--head", str(head_path), "--out", str(out), "--quantize", "int8", "--calibration-rows", "8"]
    assert cli.main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["int8"]
    assert entry["kept"] and entry["quantization"]["calibration"]["rows"] == 8 and entry["test"]["n"] == 10
    assert json.loads(Path(str(out) + ".report.json").read_text())["int8"]["test"] == entry["test"]
    int8 = tmp_path / "cli.int8.onnx"
    assert entry["size_bytes"] == int8.stat().st_size < 0.4 * out.stat().st_size
    quantization = _assert_a_featurestore_model(out, int8)
    assert quantization["method"] == "static" and quantization["calibration"]["split"] == "train"
    assert cli.main(argv) == 0  # the text summary names the int8 file and its figures
    printed = capsys.readouterr().out
    assert "cli.int8.onnx" in printed and "labels agree on" in printed and "10 test images" in printed

    assert cli.main(["export", "--head", str(head_path), "--out", str(out)]) == 0  # no --quantize: the stale one goes
    assert not int8.exists()
    capsys.readouterr()
    assert cli.main(argv + ["--data", str(tmp_path / "nowhere")]) == 2
    assert "pass --data" in capsys.readouterr().err and out.is_file() and not int8.exists()


def test_an_int8_graph_beyond_the_tolerance_is_refused(tiny_head, monkeypatch, tmp_path):
    """The float graph and its report are kept (the report says why the int8 graph was not); no int8 file."""
    monkeypatch.setattr(export_module, "INT8_MIN_LABEL_AGREEMENT", 1.01)  # no int8 graph can agree on 101%
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="int8 graph is not kept"):
        export_onnx(tiny_head, out, quantize="int8", calibration_rows=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.report.json"]
    report = json.loads((tmp_path / "m.onnx.report.json").read_text())
    assert report["check"]["labels_equal"] and report["int8"]["kept"] is False
    assert "at least 101% required" in report["int8"]["problem"] and report["int8"]["test"]["n"] == 10
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(tiny_head, out, quantize="int4")


@pytest.mark.slow
def test_int8_text_graph_keeps_parity_with_the_float_graph_on_the_test_split(tmp_path):
    """all-MiniLM-L6-v2 (real weights), dynamic quantisation, on 100 real BBC News test articles."""
    bbc = tmp_path / "bbc"
    prepare_bbc_news(bbc, labels_per_class=6, val_per_class=2, test_per_class=20, seed=1)
    store_path = tmp_path / "minilm.h5"
    extract_features(bbc, store_path, "minilm_l6", tokenization=Tokenization(max_length=128), batch_size=16,
                     workers=0, progress=False)
    head = train_head(store_path, HeadConfig(c_min=1e-2, c_max=1e2, c_points=5, n_jobs=1))
    path = tmp_path / "text.onnx"
    report = export_onnx(head, path, quantize="int8")
    int8 = tmp_path / "text.int8.onnx"
    _assert_within_the_bound(report["int8"], n_test=100)
    assert report["int8"]["size_bytes"] < 0.3 * report["size_bytes"]  # 91.6 MB → about 24 MB
    quantization = _assert_a_featurestore_model(path, int8)
    assert quantization["method"] == "dynamic"
    assert "MatMulInteger" in {node.op_type for node in onnx.load(str(int8)).graph.node}
    float_labels = OnnxClassifier(path, "cpu")(["Shares fell as the bank cut its forecast."])[1]
    int8_labels = OnnxClassifier(int8, "cpu")(["Shares fell as the bank cut its forecast."])[1]
    assert float_labels.tolist() == int8_labels.tolist()
