"""Export variants and linear heads on few classes: an int8 graph tied to its float parent and decided on val, stale
variants removed, binary linear heads and heads missing a class exported with parity (real Lite0 features)."""

import json
import shutil

import numpy as np
import onnx
import pytest

from featurestore.configs import HeadConfig
from featurestore.data.sources import scan_source
from featurestore.deploy import export as export_module
from featurestore.deploy.baseline_export import export_baseline_onnx
from featurestore.deploy.export import export_onnx
from featurestore.deploy.predict import FLOAT32_SHA256_KEY, OnnxClassifier, file_sha256, read_model_metadata
from featurestore.errors import ExportError
from featurestore.extract.launch import extract_features
from featurestore.heads.baseline import fit_baseline
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-3, "c_max": 1e2, "c_points": 6, "n_jobs": 1}
SGD = {"c_points": 3, "max_iter": 5, "n_jobs": 1}


def _store_and_heads(folder, images, lite0, heads: dict[str, dict]):
    store_path = folder / "lite0.h5"
    extract_features(images, store_path, model=lite0, workers=0, progress=False)
    return images, {name: train_head(store_path, HeadConfig(head=name, **grid)) for name, grid in heads.items()}


def _keep_classes(images, keep, splits_of=lambda name: ("train", "val", "test")):
    """Drop every class folder not in ``keep``; ``splits_of(class)`` says in which splits a kept class stays."""
    for split in ("train", "val", "test"):
        for class_dir in (images / split).iterdir():
            if class_dir.name not in keep or split not in splits_of(class_dir.name):
                shutil.rmtree(class_dir)


def _first_classes(master, folder, lite0, count: int, heads: dict[str, dict], test_only_last: bool = False):
    """A copy of the fixture keeping its first ``count`` classes (the last with test images only when
    ``test_only_last``), its store and ``heads``."""
    images = folder / "images"
    shutil.copytree(master, images)
    keep = sorted(p.name for p in (images / "train").iterdir())[:count]
    last = keep[-1] if test_only_last else None
    _keep_classes(images, keep, lambda name: ("test",) if name == last else ("train", "val", "test"))
    return _store_and_heads(folder, images, lite0, heads)


@pytest.fixture(scope="module")
def ten_classes(fashion_folder_master, tmp_path_factory, lite0_small):
    """The 40-image fixture (10 classes; 10 val and 10 test images) with a logreg and a linear-SVM head."""
    folder = tmp_path_factory.mktemp("variants")
    return _store_and_heads(folder, fashion_folder_master, lite0_small, {"logreg": GRID, "linear_svm": GRID})


@pytest.fixture(scope="module")
def int8_export(ten_classes, tmp_path_factory):
    """The logreg head exported with its int8 graph, the tolerance opened so that the graph is kept whatever its
    figures on the 10 val images."""
    images, heads = ten_classes
    out = tmp_path_factory.mktemp("int8") / "m.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "INT8_MAX_ACCURACY_DROP", 1.0)
        patch.setattr(export_module, "INT8_MIN_LABEL_AGREEMENT", 0.0)
        report = export_onnx(heads["logreg"], out, quantize="int8", data=images, calibration_rows=8)
    return out, report


def test_the_int8_graph_records_the_sha256_of_its_float_parent(int8_export):
    out, report = int8_export
    int8 = out.with_suffix(".int8.onnx")
    assert report["int8"]["kept"] and int8.is_file()
    assert read_model_metadata(int8)[FLOAT32_SHA256_KEY] == file_sha256(out)


def test_the_int8_choice_is_made_on_val_and_the_test_figures_are_reported_beside_it(int8_export):
    _, report = int8_export
    entry = report["int8"]
    assert entry["decided_on"] == "val"
    assert entry["val"]["split"] == "val" and entry["val"]["n"] == 10
    assert entry["test"]["split"] == "test" and entry["test"]["n"] == 10  # information, not the decision


def test_a_failed_int8_reexport_leaves_no_int8_graph_of_the_previous_head(ten_classes, int8_export, tmp_path,
                                                                          monkeypatch):
    """A real earlier export (float + int8 of the logreg head) lies at the path; the linear-SVM head is exported over
    it and its int8 graph is refused: no int8 file may remain, and the refusal names the val split."""
    images, heads = ten_classes
    earlier, _ = int8_export
    out = tmp_path / "m.onnx"
    for source in (earlier, earlier.with_suffix(".int8.onnx")):
        shutil.copy(source, tmp_path / source.name)
    monkeypatch.setattr(export_module, "INT8_MIN_LABEL_AGREEMENT", 1.01)  # no int8 graph can agree on 101%
    with pytest.raises(ExportError, match="int8 graph is not kept") as raised:
        export_onnx(heads["linear_svm"], out, quantize="int8", data=images, calibration_rows=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.report.json"]
    assert "10 val items" in str(raised.value)
    assert json.loads(read_model_metadata(out)["featurestore_head"])["head"] == "linear_svm"


def test_a_baseline_export_removes_variants_left_beside_its_output(fashion_folder_master, tmp_path):
    source = scan_source(fashion_folder_master)
    split = {name: [r for r in source.records if r.split == name] for name in ("train", "val")}
    model = fit_baseline("pixels", split["train"], split["val"], source.class_names, "demo")
    out = tmp_path / "pixels.onnx"
    for variant in ("fp16", "int8"):
        out.with_suffix(f".{variant}.onnx").write_bytes(b"an older export's graph")
    export_baseline_onnx(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixels.onnx", "pixels.onnx.report.json"]


@pytest.fixture(scope="module")
def two_classes(fashion_folder_master, tmp_path_factory, lite0_small):
    """Two classes of the fixture (2 train, 1 val, 1 test each) and every linear head on them."""
    return _first_classes(fashion_folder_master, tmp_path_factory.mktemp("binary"), lite0_small, 2,
                          {"logreg": GRID, "linear_svm": GRID, "sgd_logreg": SGD})


@pytest.mark.parametrize("name", ["logreg", "linear_svm", "sgd_logreg"])
def test_a_binary_linear_head_exports_with_parity(two_classes, tmp_path, name):
    _, heads = two_classes
    head = heads[name]
    assert len(head.class_names) == len(head.classes) == 2
    report = export_onnx(head, tmp_path / "m.onnx")
    assert report["check"]["max_probability_diff"] <= 1e-4 and report["check"]["labels_equal"]
    assert {"Gemm"} <= set(report["operators"]) and not {"LinearClassifier", "SVMClassifier"} & set(report["operators"])
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    probabilities, _ = OnnxClassifier(tmp_path / "m.onnx", "cpu")(images)
    assert probabilities.shape == (4, 2)


@pytest.fixture(scope="module")
def missing_class(fashion_folder_master, tmp_path_factory, lite0_small):
    """Three classes of the fixture, the third with test images only: its heads are fitted on two classes."""
    return _first_classes(fashion_folder_master, tmp_path_factory.mktemp("missing"), lite0_small, 3,
                          {"logreg": GRID}, test_only_last=True)


def test_a_logreg_head_trained_on_two_of_three_classes_exports_three_columns(missing_class, tmp_path):
    images, heads = missing_class
    head = heads["logreg"]
    assert len(head.class_names) == 3 and head.classes.tolist() == [0, 1]
    report = export_onnx(head, tmp_path / "m.onnx")
    assert report["check"]["max_probability_diff"] <= 1e-4 and report["check"]["labels_equal"]
    model = onnx.load(str(tmp_path / "m.onnx"))
    probabilities = next(o for o in model.graph.output if o.name == "probabilities")
    assert probabilities.type.tensor_type.shape.dim[1].dim_value == 3
    batch = np.random.default_rng(4).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    p, labels = OnnxClassifier(tmp_path / "m.onnx", "cpu")(batch)
    assert p.shape == (4, 3) and np.all(p[:, 2] == 0) and np.all(labels < 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_predict_refuses_an_int8_graph_of_another_float_parent(int8_export, tmp_path):
    """The real int8 graph copied beside another float graph (a hand copy, the one way left to pair them wrongly):
    predict names the mismatch instead of serving another head's model."""
    from featurestore.deploy.predict import check_variant_parent, predict
    from featurestore.errors import FeaturestoreError

    out, _ = int8_export
    folder = tmp_path / "deploy"
    folder.mkdir()
    shutil.copy(out.with_suffix(".int8.onnx"), folder / "m.int8.onnx")
    other = onnx.load(str(out))
    onnx.helper.set_model_props(other, {**read_model_metadata(out), "featurestore_note": "another export"})
    onnx.save(other, str(folder / "m.onnx"))
    with pytest.raises(FeaturestoreError, match="made from another m.onnx"):
        predict(folder / "m.int8.onnx", tmp_path, tmp_path / "p.csv", progress=False)
    shutil.copy(out, folder / "m.onnx")  # its true parent: the int8 graph is accepted
    check_variant_parent(folder / "m.int8.onnx", read_model_metadata(folder / "m.int8.onnx"))
