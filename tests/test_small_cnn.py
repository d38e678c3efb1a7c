"""The small CNN from scratch (method ``small_cnn``): it learns real Fashion-MNIST images, its learning rate is the one
best on validation, the curve records its line with the evidence that it converged, and texts are refused."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.configs import SmallCNNConfig
from featurestore.data.prepare import prepare_bbc_news, prepare_fashion_mnist
from featurestore.data.sources import Record, ids_digest, scan_source
from featurestore.errors import BadValueError, FeaturestoreError
from featurestore.transfer.curve import merge_curves
from featurestore.transfer.small_cnn import (
    SmallCNN,
    SmallCNNRun,
    augment,
    choose_rate,
    evaluate,
    fit_small_cnn,
    grey_pixels,
    torch_threads,
    train_small_cnn,
)

# Small enough for 2 cores: two narrow blocks, a few rounds of 64 images.
TINY = SmallCNNConfig(lrs=(3e-3,), widths=(8, 16), hidden=32, rounds=6, round_images=64, batch_size=16, threads=1)


@pytest.fixture(scope="module")
def fashion50(tmp_path_factory):
    """10 classes × (5 train, 3 val, 5 test) real Fashion-MNIST PNGs: 130 images."""
    root = tmp_path_factory.mktemp("fashion50") / "images"
    prepare_fashion_mnist(root, labels_per_class=5, val_per_class=3, test_per_class=5, seed=3, progress=False)
    return root


def split(source, name):
    return [r for r in source.records if r.split == name]


def test_the_network_learns_real_images_and_beats_chance(fashion50):
    source = scan_source(fashion50)
    train, val, test = (grey_pixels(split(source, name), 28) for name in ("train", "val", "test"))
    assert train[0].shape == (50, 1, 28, 28) and train[0].dtype == torch.float32 and train[1].dtype == torch.int64
    network, run = fit_small_cnn(train, val, 10, 3e-3, SmallCNNConfig(rounds=8, round_images=200, threads=1))
    losses = [h["train_loss"] for h in run.history]
    assert losses[-1] < 0.5 * losses[0]  # it learns its training images
    _, test_accuracy = evaluate(network, *test)
    assert test_accuracy >= 0.4  # chance is 0.1; on 50 test images by chance alone ≥ 0.4 is about 1e-10
    # the network returned holds the kept round's weights: its val figures are that round's
    val_loss, val_accuracy = evaluate(network, *val)
    kept = run.history[run.best_round - 1]
    assert val_accuracy == kept["val_accuracy"] == run.best_val_accuracy == max(h["val_accuracy"] for h in run.history)
    assert val_loss == pytest.approx(kept["val_loss"], abs=1e-4)


def test_the_rate_choice_picks_the_best_validation_figure(fashion50):
    def run(lr, accuracy, loss):
        return SmallCNNRun(lr=lr, best_val_accuracy=accuracy, best_val_loss=loss, best_round=1, best_epoch=1,
                           rounds_run=1, epochs_run=1, steps=1, seconds=0.0)

    assert choose_rate([run(1e-3, 0.5, 1.0), run(3e-3, 0.7, 1.2), run(1e-2, 0.6, 0.9)]) == 1  # accuracy first
    assert choose_rate([run(1e-3, 0.7, 1.0), run(3e-3, 0.7, 0.8), run(1e-2, 0.7, 0.9)]) == 1  # then the lower loss
    # A real grid whose best rate is in the middle: far too small, reasonable, far too large.
    config = SmallCNNConfig(**{**vars(TINY), "lrs": (1e-6, 3e-3, 3.0)})
    result = train_small_cnn(fashion50, config, device="cpu")
    figures = [(r.best_val_accuracy, -r.best_val_loss) for r in result.runs]
    assert [r.lr for r in result.runs] == [1e-6, 3e-3, 3.0]
    assert result.lr == 3e-3 and figures[1] == max(figures) and figures[1] > figures[0] and figures[1] > figures[2]
    assert result.val_accuracy == result.chosen.best_val_accuracy
    # the test figure is the chosen rate's network, the same as training that rate alone gives (seeded)
    source = scan_source(fashion50)
    train, val, test = (grey_pixels(split(source, name), 28) for name in ("train", "val", "test"))
    network, _ = fit_small_cnn(train, val, 10, 3e-3, config)
    assert result.test_accuracy == evaluate(network, *test)[1]


def test_the_small_cnn_refuses_texts_in_one_line(tmp_path):
    bbc = tmp_path / "bbc"
    prepare_bbc_news(bbc, labels_per_class=2, val_per_class=1, test_per_class=1, seed=1)
    with pytest.raises(FeaturestoreError, match="small_cnn trains on images") as refused:
        train_small_cnn(bbc, TINY, device="cpu")
    assert "\n" not in str(refused.value)
    inline = Record(tmp_path / "m.csv", "m.csv:2", 0, "train", text="a document")
    with pytest.raises(FeaturestoreError, match="small_cnn trains on images"):
        grey_pixels([inline], 28)


def test_images_are_read_at_the_networks_resolution(fashion_folder_master, tmp_path):
    record = split(scan_source(fashion_folder_master), "train")[0]
    original = Image.open(record.path)
    assert original.size == (28, 28) and original.mode == "L"  # the prepared data: Fashion-MNIST's own pixels
    big = tmp_path / "big.png"
    original.resize((56, 56), Image.Resampling.NEAREST).convert("RGB").save(big)
    pixels, labels = grey_pixels([Record(big, "big.png", 3, "train")], 28)
    assert pixels.shape == (1, 1, 28, 28) and labels.tolist() == [3]
    native, _ = grey_pixels([record], 28)
    # 56 px of doubled pixels, downscaled (bilinear, antialiased): the same picture, edges a little blurred
    assert (pixels - native).abs().mean() < 0.05 < (pixels - native.flip(-1)).abs().mean()


def test_augmentation_shifts_and_flips_without_changing_the_pixels(fashion_folder_master):
    pixels, _ = grey_pixels(split(scan_source(fashion_folder_master), "train"), 28)
    moved = augment(pixels, 0, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(m, p.flip(-1))) and not torch.equal(m, p) for m, p in zip(moved, pixels, strict=True)]
    assert all(torch.equal(m, p) or f for m, p, f in zip(moved, pixels, flipped, strict=True)) and 0 < sum(flipped) < 20
    shifted = augment(pixels, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == pixels.shape and not torch.equal(shifted, pixels)
    assert torch.all(shifted.sum((1, 2, 3)) <= pixels.sum((1, 2, 3)) + 1e-4)  # shifted out, never invented


def test_settings_are_checked():
    assert SmallCNNConfig(lrs=[1e-3], widths=[4]).lrs == (1e-3,)  # YAML lists become tuples
    for bad in ({"lrs": ()}, {"lrs": (0.0,)}, {"widths": (8, 8, 8, 8, 8)}, {"dropout": 1.0}, {"rounds": 0}):
        with pytest.raises(BadValueError):
            SmallCNNConfig(**bad)
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before  # restored: the rest of the process keeps its setting
    network = SmallCNN(10, (32, 64), 1, 128)
    assert sum(p.numel() for p in network.parameters()) == 421_738
    assert network(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_a_small_cnn_line_merges_into_a_curve_beside_the_others():
    def curve(methods, accuracy, **extra):
        return {"backbone": "efficientnet_lite0", "budgets": [5, 10], "probe": {"normalize": "standard"},
                "finetune": {"seed": 0}, "scratch": {"steps": 4000}, "trunk_cache_seconds": 9.7, **extra,
                "points": [{"labels_per_class": b, "method": m, "test_accuracy": accuracy, "seconds": 1.0}
                           for b in (5, 10) for m in methods]}

    earlier = curve(["pixels", "linear_probe", "probe_finetune"], 0.5)
    merged = merge_curves(earlier, curve(["small_cnn"], 0.7, small_cnn={"lrs": [1e-3]}))
    assert [(p["labels_per_class"], p["method"], p["test_accuracy"]) for p in merged["points"]] == [
        (b, m, a) for b in (5, 10) for m, a in (("pixels", 0.5), ("linear_probe", 0.5), ("probe_finetune", 0.5),
                                                ("small_cnn", 0.7))]
    assert merged["small_cnn"] == {"lrs": [1e-3]} and merged["scratch"] == earlier["scratch"]
    assert merged["trunk_cache_seconds"] == 9.7


@pytest.mark.slow
def test_the_curve_records_the_line_with_its_convergence_evidence(fashion_folder_master, tmp_path, lite0_small):
    from featurestore.configs import CurveOptions
    from featurestore.extract.launch import extract_features
    from featurestore.transfer.curve import run_curve

    store = tmp_path / "f.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    config = SmallCNNConfig(**{**vars(TINY), "lrs": (1e-3, 3e-3)})
    result = run_curve(store, fashion_folder_master, tmp_path / "curve", CurveOptions(
        budgets=[1, 2], methods=("linear_probe", "small_cnn"), small_cnn=config, device="cpu"))
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert saved["points"] == result["points"] and saved["small_cnn"]["lrs"] == [1e-3, 3e-3]
    points = {(p["labels_per_class"], p["method"]): p for p in saved["points"]}
    assert set(points) == {(b, m) for b in (1, 2) for m in ("linear_probe", "small_cnn")}
    # the pick per budget: the transfer line best on val, here the one transfer line run
    assert [(p["labels_per_class"], p["picked"]) for p in saved["picks"]] == [(1, "linear_probe"), (2, "linear_probe")]
    for budget in (1, 2):
        point, probe = points[(budget, "small_cnn")], points[(budget, "linear_probe")]
        assert point["train_ids"] == probe["train_ids"] and point["n_train"] == 10 * budget  # the probe's images
        assert 0 <= point["test_accuracy"] <= 1 and point["seconds"] > 0
        assert [run["lr"] for run in point["lr_search"]] == [1e-3, 3e-3]
        best = max(point["lr_search"], key=lambda run: (run["best_val_accuracy"], -run["best_val_loss"]))
        assert point["lr"] == best["lr"] and point["val_accuracy"] == best["best_val_accuracy"]
        history = point["history"]
        assert len(history) == point["rounds_run"] == config.rounds and history[-1]["steps"] == point["steps"]
        assert {"val_loss", "val_accuracy", "train_loss", "train_accuracy", "epochs"} <= set(history[0])
        assert history[point["best_round"] - 1]["val_accuracy"] == point["val_accuracy"] == max(
            h["val_accuracy"] for h in history)
        assert point["best_epoch"] == history[point["best_round"] - 1]["epochs"]
        assert point["epochs_run"] == history[-1]["epochs"] and "by" in point["converged"]
    # every rate trained on those same images: the digest is of the files it read
    from featurestore import FeatureStore
    from featurestore.transfer.probe import probe_rows

    opened = FeatureStore(store)
    assert points[(1, "small_cnn")]["train_ids"] == ids_digest(
        opened.ids("train")[probe_rows(opened.labels("train"), 1, 0)])
    assert np.isfinite([p["test_accuracy"] for p in saved["points"]]).all()
    assert (tmp_path / "curve" / "curve_labels.png").is_file()


@pytest.mark.slow
def test_the_curve_command_refuses_small_cnn_on_a_text_store(tmp_path):
    from featurestore.configs import Tokenization
    from featurestore.extract import extract_features

    bbc = tmp_path / "bbc"
    prepare_bbc_news(bbc, labels_per_class=1, val_per_class=1, test_per_class=1, seed=1)
    store = tmp_path / "minilm.h5"
    extract_features(bbc, store, "minilm_l6", tokenization=Tokenization(max_length=32), batch_size=8, workers=0,
                     progress=False)
    refused = subprocess.run([sys.executable, "-m", "featurestore.cli", "curve", "--features", str(store), "--data",
                              str(bbc), "--out", str(tmp_path / "c"), "--budgets", "1", "--methods", "small_cnn"],
                             capture_output=True, text=True)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "small_cnn" in lines[0] and "texts" in lines[0], lines


def test_the_small_cnn_is_a_candidate_saved_exported_and_predicted_like_any_model(fashion_folder_master, tmp_path,
                                                                                 lite0_small):
    """Where it ran, the small CNN is a model file the verdict weighs and export ships: fitted on the store's rows
    (each rate's last round, as the pipeline's stage keeps it), its val answers its own, its graph equal to Python."""
    from featurestore import FeatureStore
    from featurestore.deploy.deployment import export_model
    from featurestore.deploy.predict import predict
    from featurestore.extract.launch import extract_features
    from featurestore.heads.baseline import decode_pixels
    from featurestore.heads.model_file import load_model, model_kind
    from featurestore.heads.train import train_head
    from featurestore.transfer.best import fit_challenger, verdict

    store = tmp_path / "f.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    config = SmallCNNConfig(**{**vars(TINY), "keep_round": "last"})
    model = fit_challenger("small_cnn", store, small_cnn=config, name="demo")
    assert model.name == "demo__small_cnn" and model.n_train == 20 and model.n_val == 10
    assert set(model.val_answers) == set(FeatureStore(store).ids("val").tolist())
    assert model.val_accuracy == np.mean(list(model.val_answers.values()))
    model.save(tmp_path / "cnn.skops")
    assert model_kind(tmp_path / "cnn.skops") == "small_cnn"
    loaded = load_model(tmp_path / "cnn.skops")
    test = [r for r in scan_source(fashion_folder_master).records if r.split == "test"]
    images = decode_pixels(test)
    np.testing.assert_array_equal(loaded.predict_proba(images), model.predict_proba(images))
    report = export_model(tmp_path / "cnn.skops", tmp_path / "cnn.onnx")
    assert report["kind"] == "small_cnn" and report["check"]["labels_equal"]
    assert report["check"]["max_probability_diff"] < 1e-4
    summary = predict(tmp_path / "cnn.onnx", fashion_folder_master, tmp_path / "p.csv", split="test", progress=False,
                      workers=0)
    assert summary.accuracy == pytest.approx(float(np.mean(model.predict(images) == [r.label for r in test])))
    head = train_head(store)
    head.save(tmp_path / "logreg.skops")
    result = verdict([tmp_path / "logreg.skops", tmp_path / "cnn.skops"])
    assert result["candidates"]["demo__small_cnn"]["kind"] == "small_cnn"
    assert result["candidates"]["demo__small_cnn"]["val"] == model.val_accuracy


def test_keep_round_last_keeps_the_last_rounds_weights(fashion50):
    source = scan_source(fashion50)
    train, val = (grey_pixels(split(source, name), 28) for name in ("train", "val"))
    network, run = fit_small_cnn(train, val, 10, 3e-3, SmallCNNConfig(**{**vars(TINY), "keep_round": "last"}))
    assert run.best_round == TINY.rounds
    assert evaluate(network, *val)[1] == run.history[-1]["val_accuracy"]
    with pytest.raises(BadValueError, match="keep_round"):
        SmallCNNConfig(keep_round="first")
