import csv
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.deploy.export import ExportError, export_onnx
from featurestore.deploy.predict import OnnxClassifier, predict
from featurestore.encode.runtime import ProviderError, make_session
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-3, "c_max": 1e2, "c_points": 6, "n_jobs": 1}


@pytest.fixture(scope="module")
def tiny(fashion_folder_master, tmp_path_factory, lite0_small):
    folder = tmp_path_factory.mktemp("export")
    store_path = folder / "lite0.h5"
    extract_features(fashion_folder_master, store_path, model=lite0_small, workers=0, progress=False)
    names = ("logreg", "linear_svm", "svm_rbf")
    heads = {name: train_head(store_path, HeadConfig(head=name, **GRID)) for name in names}
    return folder, FeatureStore(store_path), heads


@pytest.fixture(scope="module")
def exported(tiny):
    folder, _, heads = tiny
    return {name: (folder / f"{name}.onnx", export_onnx(head, folder / f"{name}.onnx")) for name, head in heads.items()}


@pytest.mark.parametrize("name", ["logreg", "linear_svm", "svm_rbf"])
def test_export_is_one_verified_graph(tiny, exported, name):
    folder, store, heads = tiny
    path, report = exported[name]
    assert report["check"]["max_probability_diff"] <= 1e-4 and report["check"]["labels_equal"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(name)) == [f"{name}.onnx",
                                                                                    f"{name}.onnx.report.json"]
    model = onnx.load(str(path))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    domains = [entry.domain or "ai.onnx" for entry in model.opset_import]
    assert len(domains) == len(set(domains))  # each opset domain once
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["featurestore_class_names"]) == store.class_names
    assert meta["featurestore_fingerprint_hash"] == store.fingerprint_hash
    ops = {node.op_type for node in model.graph.node}
    used = {name for node in model.graph.node for name in node.input}
    assert [i.name for i in model.graph.initializer if i.name not in used] == []  # no dead weights in the file
    domains = {node.domain for node in model.graph.node}
    if name != "svm_rbf":  # linear heads: plain operators only, no ai.onnx.ml
        assert domains <= {""} and "Gemm" in ops and ({"Softmax", "Sigmoid"} & ops)
    classifier = OnnxClassifier(path, "cpu")
    for n in (1, 5):  # dynamic batch
        images = np.random.default_rng(n).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        probabilities, labels = classifier(images)
        assert probabilities.shape == (n, 10) and probabilities.dtype == np.float32 and labels.dtype == np.int64
        with torch.inference_mode():
            features = heads[name].predict_proba(_features(images))
        np.testing.assert_allclose(probabilities, features, atol=1e-4)


def _features(images):
    from featurestore.encode.backbones import load_backbone

    model = load_backbone("efficientnet_lite0", image_size=64, crop_pct=1.0)
    return model(torch.from_numpy(images)).numpy()


def test_predictions_agree_with_the_head_on_cached_features(tiny, exported, fashion_folder_master):
    folder, store, heads = tiny
    out = folder / "pred.csv"
    summary = predict(exported["logreg"][0], fashion_folder_master, out, split="test", workers=1,
                             progress=False)
    assert summary.predicted == 10 and summary.provider == "cpu"
    rows = {row["path"]: row for row in csv.DictReader(open(out))}
    X, _, _ = store.load("test")
    expected = heads["logreg"].predict(X)
    for path, label in zip(store.paths("test"), expected, strict=True):
        assert rows[path]["label"] == store.class_names[label]
        assert len(rows[path]["top_k"].split(";")) == 3
    truth = [row["true_label"] == row["label"] for row in rows.values()]
    assert summary.accuracy == pytest.approx(np.mean(truth))


def test_predict_skips_bad_images_and_checks_api_input(tiny, exported, tmp_path):
    from PIL import Image

    Image.new("L", (28, 28), 200).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "pred.jsonl"
    summary = predict(exported["logreg"][0], tmp_path, out, workers=0, progress=False)
    assert summary.predicted == 1 and summary.skipped[0]["path"] == "broken.png"
    assert "not an image" in summary.skipped[0]["reason"] or "corrupt" in summary.skipped[0]["reason"]
    assert json.loads(out.read_text().splitlines()[0])["path"] == "ok.png"
    classifier = OnnxClassifier(exported["logreg"][0], "cpu")
    with pytest.raises(TypeError, match="uint8"):
        classifier(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        classifier(np.zeros((1, 3, 32, 32), dtype=np.uint8))


def test_provider_is_checked_not_assumed(exported):
    path = exported["logreg"][0]
    _, used = make_session(str(path), "auto")
    if torch.cuda.is_available():
        assert make_session(str(path), "cuda")[1] == "cuda"
    else:
        assert used == "cpu"
        with pytest.raises(ProviderError, match="CUDA execution provider is not active"):
            make_session(str(path), "cuda")
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "predict", "--model", str(path), "--data", str(path.parent),
         "--out", str(path.parent / "x.csv"), "--provider", "cuda", "--no-progress"],
        capture_output=True, text=True,
    )
    if not torch.cuda.is_available():
        assert result.returncode == 2 and "CUDA execution provider is not active" in result.stderr
        assert "Failed to load library" not in result.stderr and "Traceback" not in result.stderr


def test_a_graph_that_disagrees_fails_the_export(tiny, monkeypatch, tmp_path):
    from featurestore.deploy import export as export_module

    _, _, heads = tiny
    real = export_module.linear_head_params

    def broken(head):
        params = real(head)
        return replace(params, bias=params.bias + 5 * np.arange(params.bias.shape[-1]))

    monkeypatch.setattr(export_module, "linear_head_params", broken)
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(heads["logreg"], tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_onnxruntime_gpu_is_the_only_onnxruntime():
    from importlib.metadata import PackageNotFoundError, distribution

    assert distribution("onnxruntime-gpu").version
    with pytest.raises(PackageNotFoundError):
        distribution("onnxruntime")  # same import name: installing it beside onnxruntime-gpu breaks one of them


def test_l2_normalised_heads_export_with_the_normalisation_in_the_graph(tiny, tmp_path):
    folder, store, _ = tiny
    head = train_head(store, HeadConfig(head="linear_svm", normalize="l2", **GRID))
    report = export_onnx(head, tmp_path / "l2.onnx")
    assert report["check"]["max_probability_diff"] <= 1e-4 and report["check"]["labels_equal"]
    assert {"ReduceL2", "Sigmoid", "Mean"} <= set(report["operators"])


@pytest.mark.parametrize("name", ["logreg", "svm_rbf"])
def test_a_class_missing_from_training_keeps_its_column_through_export_and_predict(fashion_folder, tmp_path,
                                                                                  lite0_small, name):
    """Column k of the exported probabilities is the store's class k, and predict names labels by it, also when
    a class had no training rows (the estimator's classes_ then skip it)."""
    import shutil

    for split in ("train", "val"):
        shutil.rmtree(fashion_folder / split / "Sandal")
    store_path = tmp_path / "f.h5"
    extract_features(fashion_folder, store_path, model=lite0_small, workers=0, progress=False)
    store = FeatureStore(store_path)
    head = train_head(store, HeadConfig(head=name, **GRID))
    report = export_onnx(head, tmp_path / "m.onnx")
    assert report["check"]["labels_equal"] and "MatMul" in report["operators"]
    classifier = OnnxClassifier(tmp_path / "m.onnx", "cpu")
    assert classifier.class_names == store.class_names
    out = tmp_path / "pred.csv"
    predict(tmp_path / "m.onnx", fashion_folder, out, split="test", workers=0, progress=False)
    rows = {row["path"]: row for row in csv.DictReader(open(out))}
    X, _, _ = store.load("test")
    expected = head.predict(X)
    for path, label in zip(store.paths("test"), expected, strict=True):
        assert rows[path]["label"] == store.class_names[label]
        assert "Sandal:" not in rows[path]["top_k"].split(";")[0]
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    probabilities, _ = classifier(images)
    assert probabilities.shape == (3, 10) and np.all(probabilities[:, store.class_names.index("Sandal")] == 0)


def test_export_refuses_a_head_whose_feature_code_changed(tiny, tmp_path):
    from dataclasses import replace as copy_with

    _, _, heads = tiny
    stale = copy_with(heads["logreg"], fingerprint={**heads["logreg"].fingerprint, "code_sha256": "0" * 64})
    with pytest.raises(ExportError, match="code_sha256 changed since extraction"):
        export_onnx(stale, tmp_path / "stale.onnx")
    assert not list(tmp_path.iterdir())


def test_io_binding_gives_what_session_run_gives(exported):
    """The IOBinding path (CUDA's, here on the CPU provider) returns session.run's outputs bit for bit, also with
    the inputs copied into reused device-style buffers, across batch shapes."""
    path = exported["logreg"][0]
    plain = OnnxClassifier(path, "cpu", io_binding=False)
    bound = OnnxClassifier(path, "cpu", io_binding=True)
    assert not plain.io_binding and bound.io_binding  # default on the CPU provider: session.run (measured)
    assert not OnnxClassifier(path, "cpu").io_binding
    rng = np.random.default_rng(0)
    for copy_inputs in (False, True):
        bound.copy_inputs = copy_inputs
        for n in (4, 4, 1):  # the same shape twice reuses the input buffer; a new shape makes a new one
            images = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
            expected = plain.session.run(["probabilities", "label"], {"images": images})
            probabilities, labels = bound(images)
            assert probabilities.dtype == np.float32 and labels.dtype == np.int64
            np.testing.assert_array_equal(probabilities, expected[0])
            np.testing.assert_array_equal(labels, expected[1])
            values = bound.run_on_device(bound.feed(images))
            assert [value.device_name() for value in values] == ["cpu", "cpu"]
            np.testing.assert_array_equal(values[0].numpy(), expected[0])
    assert sorted(bound._device_inputs) == ["images"]


def test_the_cuda_provider_gets_its_options(exported, monkeypatch):
    """make_session hands CUDA_PROVIDER_OPTIONS (with overrides) to onnxruntime when it asks for CUDA, and nothing
    to the CPU provider; the CPU-only session is the one it always was."""
    import onnxruntime as ort

    from featurestore.encode import runtime

    seen = []
    real = ort.InferenceSession

    def spy(path, options=None, providers=None, **kwargs):
        seen.append(providers)
        return real(path, options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    path = str(exported["logreg"][0])
    runtime.make_session(path, "auto", cuda_options={"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"})
    runtime.make_session(path, "cpu")
    (cuda, options), cpu = seen[0]
    assert cuda == runtime.CUDA and cpu == runtime.CPU
    assert options == {**runtime.CUDA_PROVIDER_OPTIONS, "device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert {"cudnn_conv_algo_search", "do_copy_in_default_stream", "arena_extend_strategy"} <= set(options)
    assert seen[1] == [runtime.CPU]


def test_float16_graph_agrees_with_float32_and_is_the_cuda_sibling(tiny, fashion_folder_master, tmp_path):
    """export --float16 writes model.fp16.onnx (the encoder in float16, same inputs, outputs and metadata), checked
    against the float32 graph on the CPU provider; on real images the probabilities stay within float16 rounding
    and the labels are equal except where the float32 graph has a tie. predict uses it only on CUDA, and only the
    one made from this very float32 file."""
    from featurestore.deploy.export import FLOAT16_MAX_PROBABILITY_DIFF, labels_match
    from featurestore.deploy.predict import float16_sibling, read_model_metadata

    _, store, heads = tiny
    path = tmp_path / "m.onnx"
    report = export_onnx(heads["logreg"], path, float16=True)
    fp16 = tmp_path / "m.fp16.onnx"
    assert report["float16"]["kept"] and report["float16"]["check"]["labels_equal"]
    assert report["float16"]["check"]["max_probability_diff"] <= FLOAT16_MAX_PROBABILITY_DIFF
    assert report["float16"]["size_bytes"] < 0.6 * report["size_bytes"]
    model = onnx.load(str(fp16))
    assert {onnx.TensorProto.FLOAT16} <= {init.data_type for init in model.graph.initializer}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8]
    meta, float_meta = read_model_metadata(fp16), read_model_metadata(path)
    assert meta["featurestore_precision"] == "float16"
    assert {k: v for k, v in meta.items() if k in float_meta} == float_meta
    assert float16_sibling(path) == fp16

    float32 = OnnxClassifier(path, "cpu")
    images = np.stack([float32.preprocessing(_load(fashion_folder_master / p)).numpy()
                       for split in store.splits for p in store.paths(split)])  # all 40 real images
    p32, _ = float32(images)
    p16, l16 = OnnxClassifier(fp16, "cpu")(images)  # any exported file runs as it is given
    assert p16.dtype == np.float32 and l16.dtype == np.int64
    assert np.abs(p16 - p32).max() <= FLOAT16_MAX_PROBABILITY_DIFF
    assert labels_match(p32, l16, FLOAT16_MAX_PROBABILITY_DIFF).all()

    summary = predict(path, fashion_folder_master, tmp_path / "p.csv", workers=0, progress=False)
    assert summary.provider == "cpu" and summary.model == str(path)  # the CPU runs the float32 graph

    export_onnx(heads["svm_rbf"], path)  # a new graph without --float16: the old sibling goes
    assert not fp16.exists() and float16_sibling(path) is None
    export_onnx(heads["logreg"], path, float16=True)
    export_onnx(heads["svm_rbf"], tmp_path / "other.onnx")
    (tmp_path / "other.onnx").replace(path)  # a float32 file the sibling was not made from
    assert float16_sibling(path) is None


def _load(path):
    from featurestore.encode.images import load_image

    return load_image(path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")
def test_cuda_session_options_iobinding_and_float16(tiny, tmp_path):
    """On a GPU: the CUDA provider runs with CUDA_PROVIDER_OPTIONS, predict's IOBinding keeps outputs on the device
    until read, and the float16 sibling runs there within float16 rounding of the float32 graph on the CPU."""
    from featurestore.deploy.export import FLOAT16_MAX_PROBABILITY_DIFF
    from featurestore.encode.runtime import CUDA_PROVIDER_OPTIONS

    _, _, heads = tiny
    path = tmp_path / "m.onnx"
    export_onnx(heads["logreg"], path, float16=True)
    try:
        session, used = make_session(str(path), "cuda")
    except ProviderError as exc:
        pytest.skip(f"onnxruntime's CUDA provider is not usable here: {exc}")
    options = session.get_provider_options()["CUDAExecutionProvider"]
    assert {k: options[k] for k in CUDA_PROVIDER_OPTIONS} == CUDA_PROVIDER_OPTIONS
    gpu = OnnxClassifier(path, "cuda")
    assert gpu.provider == "cuda" and gpu.io_binding and gpu.model_path == tmp_path / "m.fp16.onnx"
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
    values = gpu.run_on_device(gpu.feed(images))
    assert all(value.device_name().lower() == "cuda" for value in values)
    expected, _ = OnnxClassifier(path, "cpu")(images)
    assert np.abs(values[0].numpy() - expected).max() <= FLOAT16_MAX_PROBABILITY_DIFF
    exact = OnnxClassifier(path, "cuda", float16=False)
    assert exact.model_path == path
    probabilities, _ = exact(images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-3)  # TF32 convolutions on the GPU
