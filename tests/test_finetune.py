"""Fine-tuning: what must hold, on real weights and real images (tiny budget, 64 px)."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from featurestore import FeatureStore
from featurestore.extract import extract_features
from featurestore.finetune import FinetuneConfig, build_model, finetune, probe_weights, train_only_probe
from featurestore.heads import HeadConfig, train_head

pytestmark = pytest.mark.slow

CONFIG = FinetuneConfig(unfreeze_blocks=2, epochs=2, batch_size=8, patience=5, workers=0)


@pytest.fixture(scope="module")
def probe(fashion_folder_master, tmp_path_factory, lite0_small):
    store = tmp_path_factory.mktemp("finetune") / "lite0.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    return train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)), store


def test_classifier_starts_as_the_linear_probe(probe, lite0_small):
    head, store = probe
    start = train_only_probe(head)
    assert start.named_steps["classify"].C == head.C  # the head's chosen C, fitted on train only
    model, _ = build_model(head, CONFIG, probe=start)
    weight, bias, l2 = probe_weights(start)
    assert not l2
    assert torch.equal(model.network._fc.linear.weight, torch.tensor(weight, dtype=torch.float32))
    assert torch.equal(model.network._fc.linear.bias, torch.tensor(bias, dtype=torch.float32))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    model.eval()
    with torch.inference_mode():
        logits = model(images)
        expected = start.decision_function(lite0_small(images).numpy())
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_frozen_layers_and_batchnorm_statistics_do_not_move(probe, fashion_folder_master, tmp_path):
    head, _ = probe
    before, trainable = build_model(head, CONFIG)
    start = {k: v.clone() for k, v in before.network.state_dict().items()}
    result = finetune(head, fashion_folder_master, tmp_path / "ft.pth", CONFIG, device="cpu", progress=False,
                      checkpoint_dir=tmp_path / "ckpt", keep_checkpoint=True)
    after = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]  # the last epoch, not the best
    assert result.epochs_run == 2 and len(result.history) == 2
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved, "nothing trained"
    assert all(k.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_fc.")) for k in moved), moved
    assert not any("running_" in k or "_bn" in k for k in moved)  # BN statistics and affine stay frozen
    assert "_blocks.15._depthwise_conv.weight" in trainable and "_blocks.13._depthwise_conv.weight" not in trainable


def test_a_killed_run_resumes_from_its_checkpoint(probe, fashion_folder_master, tmp_path):
    head, _ = probe
    head_path = head.save(tmp_path / "head.skops")
    config = ["--unfreeze-blocks", "1", "--epochs", "4", "--batch-size", "8", "--patience", "9", "--workers", "0"]

    def command(name):
        return [sys.executable, "-m", "featurestore.cli", "finetune", "--head", str(head_path), "--data",
                str(fashion_folder_master), "--out", str(tmp_path / f"{name}.pth"), "--device", "cpu",
                "--no-progress", "--json", *config]

    full = json.loads(subprocess.run(command("full"), capture_output=True, text=True, check=True).stdout)
    process = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed.checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    resumed = json.loads(subprocess.run(command("killed"), capture_output=True, text=True, check=True).stdout)
    assert 1 <= resumed["resumed_from_epoch"] < 4 and resumed["epochs_run"] == 4
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    a, b = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("full", "killed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    for got, want in zip(resumed["history"], full["history"], strict=True):
        assert got["val_accuracy"] == want["val_accuracy"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


def test_finetuned_weights_extract_into_their_own_store(probe, fashion_folder_master, tmp_path):
    head, store = probe
    finetune(head, fashion_folder_master, tmp_path / "ft.pth", CONFIG, device="cpu", progress=False)
    out = tmp_path / "ft.h5"
    extract_features(fashion_folder_master, out, "efficientnet_lite0", weights=tmp_path / "ft.pth",
                     image_size=64, crop_pct=1.0, workers=0, progress=False)
    assert FeatureStore(out).fingerprint_hash != FeatureStore(store).fingerprint_hash


def test_curve_trains_three_methods_per_budget(probe, fashion_folder_master, tmp_path):
    from featurestore.curve import METHODS, run_curve

    _, store = probe
    short = {"epochs": 1, "batch_size": 8, "patience": 2, "workers": 0}
    result = run_curve(store, fashion_folder_master, tmp_path, [1, 2], FinetuneConfig(unfreeze_blocks=1, **short),
                       FinetuneConfig(from_scratch=True, head_lr=2e-3, **short), device="cpu")
    points = {(p["labels_per_class"], p["method"]): p for p in result["points"]}
    assert set(points) == {(b, m) for b in (1, 2) for m in METHODS}
    for point in points.values():
        assert 0.0 <= point["test_accuracy"] <= 1.0 and point["seconds"] >= 0
        assert point["n_train"] == 10 * point["labels_per_class"]
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["points"] == result["points"]
    assert (tmp_path / "curve_labels.png").is_file() and (tmp_path / "curve_seconds.png").is_file()
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob("*.checkpoints"))


def test_scratch_baseline_starts_from_random_weights_and_trains_everything(probe):
    head, _ = probe
    model, trainable = build_model(head, FinetuneConfig(from_scratch=True))
    pretrained, _ = build_model(head, CONFIG)
    assert len(trainable) == len(list(model.network.named_parameters()))
    assert not torch.equal(model.network._conv_stem.weight, pretrained.network._conv_stem.weight)


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(probe, fashion_folder_master, tmp_path):
    """The checkpoint is keyed on everything that shaped the run: a head with another C (so another starting
    probe) starts over instead of resuming stale weights; the same run resumes."""
    from dataclasses import replace

    head, _ = probe
    one_epoch = replace(CONFIG, epochs=1)
    options = {"device": "cpu", "progress": False, "checkpoint_dir": tmp_path / "ckpt", "keep_checkpoint": True}
    finetune(head, fashion_folder_master, tmp_path / "a.pth", one_epoch, **options)
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert {"run", "model", "optimizer", "scheduler", "grad_scaler", "torch_rng", "state"} <= set(saved)
    again = finetune(head, fashion_folder_master, tmp_path / "b.pth", one_epoch, **options)
    assert again.resumed_from_epoch == 1
    other_c = finetune(replace(head, C=head.C * 10), fashion_folder_master, tmp_path / "c.pth", one_epoch, **options)
    assert other_c.resumed_from_epoch == 0


def test_a_head_on_custom_weights_fine_tunes_those_weights(probe, fashion_folder_master, tmp_path):
    from featurestore.backbones import load_classifier
    from featurestore.errors import WeightsMismatchError

    _, network, _ = load_classifier("efficientnet_lite0")
    state = network.state_dict()
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    custom = tmp_path / "custom.pth"
    torch.save(state, custom)
    store = tmp_path / "custom.h5"
    extract_features(fashion_folder_master, store, "efficientnet_lite0", weights=custom, image_size=64,
                     crop_pct=1.0, workers=0, progress=False)
    head = train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=3, n_jobs=1))
    with pytest.raises(WeightsMismatchError, match="pass --weights"):
        build_model(head, CONFIG)  # the registry's ImageNet weights are not what the head was trained on
    model, _ = build_model(head, CONFIG, weights=custom)
    assert torch.equal(model.network._conv_stem.weight, state["_conv_stem.weight"])
