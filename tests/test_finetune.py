"""Fine-tuning: what must hold, on real weights and real images (tiny budget, 64 px)."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from featurestore import FeatureStore
from featurestore.configs import FinetuneStageOptions, HeadConfig
from featurestore.data.sources import scan_source
from featurestore.encode.backbones.model import PixelNormalize
from featurestore.encode.preprocess import Preprocessing
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.transfer.augment import ViewRecipe
from featurestore.transfer.finetune import FinetuneConfig, build_model, finetune, trunk_cache_for
from featurestore.transfer.probe import probe_weights, train_only_probe
from featurestore.transfer.trunk import TrunkCache, UpperBlocks

from .conftest import cached_view_images

pytestmark = pytest.mark.slow

CONFIG = FinetuneConfig(unfreeze_blocks=2, epochs=2, batch_size=8, patience=5, workers=0)


@pytest.fixture(scope="module")
def probe(fashion_folder_master, tmp_path_factory, lite0_small):
    store = tmp_path_factory.mktemp("finetune") / "lite0.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    return train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)), store


def whole_network(top: UpperBlocks, head) -> torch.nn.Module:
    """The same network end to end on uint8 images: normalisation, stem, every block, head, classifier."""
    pre = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    return torch.nn.Sequential(PixelNormalize(pre), UpperBlocks(top.network, 0, with_stem=True)).eval()


def test_classifier_starts_as_the_linear_probe(probe, lite0_small):
    head, store = probe
    start = train_only_probe(head)
    assert start.named_steps["classify"].C == head.C  # the head's chosen C, fitted on train only
    model, _ = build_model(head, CONFIG, probe=start)
    weight, bias, l2 = probe_weights(start, len(head.class_names))
    assert not l2
    assert torch.equal(model.network._fc.linear.weight, torch.tensor(weight, dtype=torch.float32))
    assert torch.equal(model.network._fc.linear.bias, torch.tensor(bias, dtype=torch.float32))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        logits = whole_network(model, head)(images)
        expected = start.decision_function(lite0_small(images).numpy())
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, relative", [("float32", False), ("float16", True)])
def test_top_blocks_on_a_cached_view_give_the_whole_networks_logits(probe, fashion_folder_master, tmp_path, dtype,
                                                                    relative):
    """Exactness on the real weights: the top blocks on view k's cached activations equal the whole network on
    view k's image. float32 storage: ≤ 1e-4 absolute (measured 4.1e-5). float16 storage rounds every activation
    to 11 significant bits (relative error up to 4.9e-4), so the bound is relative to the logits' scale: ≤ 1e-3
    of the largest |logit| (measured 2.2e-3 on logits up to 8.4, i.e. 2.6e-4). A wrong view or block is off by
    whole units."""
    head, _ = probe
    config = replace(CONFIG, views=2, cache_dtype=dtype)
    trunk_cache_for(head, fashion_folder_master, tmp_path / "trunk.h5", config, device="cpu", progress=False)
    cache = TrunkCache(tmp_path / "trunk.h5")
    assert cache.views == 2 and cache.train_views.dtype == np.dtype(dtype)
    top, _ = build_model(head, config)
    images = cached_view_images(head, fashion_folder_master, config, view=2)
    top.eval()
    with torch.inference_mode():
        expected = whole_network(top, head)(images)
        cached = top(torch.from_numpy(cache.train_views[2].astype(np.float32)))
    difference = float((expected - cached).abs().max())
    tolerance = 1e-3 * float(expected.abs().max()) if relative else 1e-4
    assert difference <= tolerance, (difference, tolerance)
    with torch.inference_mode():  # a view is not the clean image: the cache really holds augmented views
        assert not torch.allclose(cached, top(torch.from_numpy(cache.train_views[0].astype(np.float32))))


def test_adding_views_reuses_the_cached_ones(probe, fashion_folder_master, tmp_path):
    head, _ = probe
    cache = tmp_path / "trunk.h5"
    first = trunk_cache_for(head, fashion_folder_master, cache, replace(CONFIG, views=1), device="cpu",
                            progress=False)
    assert first.extracted == 40 + 20
    before = TrunkCache(cache).train_views[1]
    second = trunk_cache_for(head, fashion_folder_master, cache, replace(CONFIG, views=3), device="cpu",
                             progress=False)
    assert (second.reused, second.extracted) == (60, 40)  # views 2 and 3 of the 20 train images are new
    assert np.array_equal(TrunkCache(cache).train_views[1], before)  # view 1 is the same pixels
    other_seed = trunk_cache_for(head, fashion_folder_master, cache, replace(CONFIG, views=1, seed=5),
                                 device="cpu", progress=False)
    assert other_seed.reused == 0  # the seed is in the fingerprint


def test_frozen_layers_and_batchnorm_statistics_do_not_move(probe, fashion_folder_master, tmp_path):
    head, _ = probe
    before, trainable = build_model(head, CONFIG)
    start = {k: v.clone() for k, v in before.network.state_dict().items()}
    result = finetune(head, fashion_folder_master, tmp_path / "ft.pth", CONFIG, device="cpu", progress=False,
                      checkpoint_dir=tmp_path / "ckpt", keep_checkpoint=True)
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]  # the last epoch, not the best
    after = {k.removeprefix("network."): v for k, v in saved.items()}
    assert result.epochs_run == 2 and len(result.history) == 2 and result.cache
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved, "nothing trained"
    assert all(k.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_fc.")) for k in moved), moved
    assert not any("running_" in k or "_bn" in k for k in moved)  # BN statistics and affine stay frozen
    assert "_blocks.15._depthwise_conv.weight" in trainable and "_blocks.13._depthwise_conv.weight" not in trainable


def test_gradual_unfreezing_trains_the_top_block_first(probe, fashion_folder_master, tmp_path):
    head, _ = probe
    config = replace(CONFIG, schedule="gradual", epochs=1)
    before, _ = build_model(head, config)
    start = {k: v.clone() for k, v in before.network.state_dict().items()}
    finetune(head, fashion_folder_master, tmp_path / "ft.pth", config, device="cpu", progress=False,
             checkpoint_dir=tmp_path / "ckpt", keep_checkpoint=True)
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]
    moved = {k.removeprefix("network.") for k, v in saved.items() if not torch.equal(start[k[8:]], v)}
    assert any(k.startswith("_blocks.15.") for k in moved) and not any(k.startswith("_blocks.14.") for k in moved)


def test_training_from_images_and_from_the_cache_are_the_same_run(probe, fashion_folder_master, tmp_path):
    """Without augmentation the reference path (decode + frozen trunk every epoch) and the cache (float32)
    give the same batches in the same order, so the same losses and weights, up to float rounding."""
    head, _ = probe
    config = replace(CONFIG, epochs=2, cache_dtype="float32")
    trunk_cache_for(head, fashion_folder_master, tmp_path / "trunk.h5", config, device="cpu", progress=False,
                    engine="torch")  # eager torch like the image path (onnxruntime agrees to ~1e-5)
    cached = finetune(head, fashion_folder_master, tmp_path / "a.pth", config, device="cpu", progress=False,
                      cache=tmp_path / "trunk.h5")
    images = finetune(head, fashion_folder_master, tmp_path / "b.pth", replace(config, source="images"),
                      device="cpu", progress=False)
    assert images.cache is None and cached.cache
    assert images.start_val_predictions == cached.start_val_predictions
    for a, b in zip(images.history, cached.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-4)
    first, second = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("a", "b"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("source", ["cache", "images"])
def test_a_killed_run_resumes_from_its_checkpoint(probe, fashion_folder_master, tmp_path, source):
    head, _ = probe
    head_path = head.save(tmp_path / "head.skops")
    config = ["--unfreeze-blocks", "1", "--epochs", "4", "--batch-size", "8", "--patience", "9", "--workers", "0",
              "--source", source]

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


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(probe, fashion_folder_master, tmp_path):
    """The checkpoint is keyed on everything that shaped the run: a head with another C (so another starting
    probe) starts over instead of resuming stale weights; the same run resumes."""
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
    from featurestore.encode.backbones import load_classifier
    from featurestore.errors import WeightsUnavailableError

    _, network, _ = load_classifier("efficientnet_lite0")
    state = network.state_dict()
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    custom = tmp_path / "custom.pth"
    torch.save(state, custom)
    store = tmp_path / "custom.h5"
    extract_features(fashion_folder_master, store, "efficientnet_lite0", weights=custom, image_size=64,
                     crop_pct=1.0, workers=0, progress=False)
    head = train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=3, n_jobs=1))
    model, _ = build_model(head, CONFIG)  # the checkpoint extraction read, found by the sha256 the head records
    assert torch.equal(model.network._conv_stem.weight, state["_conv_stem.weight"])
    moved = custom.rename(tmp_path / "moved.pth")
    with pytest.raises(WeightsUnavailableError, match="pass --weights"):
        build_model(head, CONFIG)  # the file it was built with is gone; the registry's weights are not those
    model, _ = build_model(head, CONFIG, weights=moved)
    assert torch.equal(model.network._conv_stem.weight, state["_conv_stem.weight"])


def test_a_run_killed_after_its_stopping_epoch_does_not_train_on(probe, fashion_folder_master, tmp_path):
    """The checkpoint of the epoch at which patience ran out says so: rerunning the finished (or killed-after-
    that-epoch) run resumes to the same result instead of training one more epoch."""
    head, _ = probe
    frozen_rate = replace(CONFIG, epochs=6, patience=1, head_lr=1e-12)  # nothing moves: epoch 2 cannot beat 1
    options = {"device": "cpu", "progress": False, "checkpoint_dir": tmp_path / "ckpt", "keep_checkpoint": True}
    first = finetune(head, fashion_folder_master, tmp_path / "a.pth", frozen_rate, **options)
    assert first.stopped_early and first.epochs_run == 2
    again = finetune(head, fashion_folder_master, tmp_path / "b.pth", frozen_rate, **options)
    assert again.resumed_from_epoch == 2 and again.stopped_early and again.epochs_run == 2
    assert [h["epoch"] for h in again.history] == [1, 2]
    a, b = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("a", "b"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def broken(fashion_folder_master, tmp_path_factory, lite0_small):
    """The tiny data set plus one train file that is not an image, named to sort first in its class folder: the
    store skips it, so every later train row sits one place before its file in the folder listing."""
    import shutil

    root = tmp_path_factory.mktemp("broken") / "images"
    shutil.copytree(fashion_folder_master, root)
    first_class = sorted(p.name for p in (root / "train").iterdir())[0]
    (root / "train" / first_class / "0-not-an-image.png").write_bytes(b"this is not a PNG")
    store = root.parent / "lite0.h5"
    summary = extract_features(root, store, model=lite0_small, workers=0, progress=False)
    assert [entry["path"] for entry in summary.skipped] == [f"train/{first_class}/0-not-an-image.png"]
    head = train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1))
    return root, store, head.save(root.parent / "head.skops")


@pytest.mark.parametrize("source", ["cache", "images"])
def test_an_unreadable_image_fine_tunes_on_exactly_the_probes_rows(broken, tmp_path, source):
    data, store, head_path = broken
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "finetune", "--head", str(head_path), "--data", str(data),
         "--out", str(tmp_path / "ft.pth"), "--unfreeze-blocks", "1", "--epochs", "1", "--batch-size", "8",
         "--workers", "0", "--source", source, "--device", "cpu", "--json", "--no-progress"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["train_ids"] == list(FeatureStore(store).ids("train"))


def test_a_nested_budget_fine_tunes_on_the_probes_subset(broken, tmp_path):
    from featurestore.heads import load_head
    from featurestore.transfer.probe import probe_rows

    data, store, head_path = broken
    result = finetune(load_head(head_path), data, tmp_path / "ft.pth", replace(CONFIG, epochs=1), device="cpu",
                      progress=False, train_per_class=1)
    store = FeatureStore(store)
    rows = probe_rows(store.labels("train"), 1, CONFIG.seed)
    assert result.train_ids == list(store.ids("train")[rows]) and len(rows) == 10


def test_the_trunk_cache_records_float16_autocast_compute_on_cuda(probe):
    """CPU- and GPU-built activations differ (float16 autocast on CUDA): their caches must not share a
    fingerprint, or an incremental run would mix them."""
    from featurestore.encode.backbones import load_classifier
    from featurestore.transfer.trunk import TrunkViewsEncoder, activation_shape, trunk_model

    head, _ = probe
    _, network, path = load_classifier("efficientnet_lite0")
    pre = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    trunk = trunk_model(network, pre, 14, "efficientnet_lite0", str(path), "x", ())
    shape = activation_shape(network, 14, pre.image_size)

    def fingerprint(device):
        return TrunkViewsEncoder(trunk, shape, head.fingerprint_hash, 0, ViewRecipe(), 0, "float16",
                                 device=torch.device(device)).fingerprint()

    cpu, cuda = fingerprint("cpu"), fingerprint("cuda")
    assert cpu["compute"] == "float32" and cuda["compute"] == "autocast-float16"
    from featurestore.store.hdf5 import fingerprint_hash

    assert fingerprint_hash(cpu) != fingerprint_hash(cuda)


def test_the_finetune_stage_trains_on_the_probes_rows_despite_an_unreadable_image(broken, tmp_path):
    from featurestore.data.sources import ids_digest
    from featurestore.transfer.decision import run_finetune_stage

    data, store, head_path = broken
    plateau = {"plateaued": False, "reason": "still rising"}
    options = FinetuneStageOptions(mode="always", config=replace(CONFIG, epochs=1), device="cpu",
                                   extract={"image_size": 64, "crop_pct": 1.0, "workers": 0})
    decision = run_finetune_stage("efficientnet_lite0", head_path, data, tmp_path / "stage", plateau, options)
    assert decision["finetuned"]
    assert decision["result"]["train_ids"] == ids_digest(FeatureStore(store).ids("train"))


def _small_top(classes: int) -> torch.nn.Module:
    """A small trainable top with dropout (so a run that drew one more random number than another would differ):
    normalised images (N, 3, 32, 32) float32 → logits (N, classes)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, classes))


def _per_step_reference(train_records, val_records, pre, recipe, workers, epochs, batch_size, seed, warmup):
    """The loop as it was before issue 19: a new DataLoader every epoch over the epoch's seeded order, with
    augmentation seeded by (seed × 1000 + epoch, index) and its own per-epoch generator, the loss and hits read
    after every step, validation copied back batch by batch. Returns ((train loss, train accuracy, val accuracy)
    per epoch, val predictions per epoch, the final weights)."""
    from torch.utils.data import DataLoader

    from featurestore.transfer.training import TrainImages, warmup_cosine

    top, lower = _small_top(10), PixelNormalize(pre).eval()
    optimizer = torch.optim.AdamW([{"params": list(top.parameters()), "lr": 1e-2}], weight_decay=1e-4)
    total = epochs * -(-len(train_records) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    history, predictions = [], []
    for epoch in range(1, epochs + 1):
        top.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train_records))
        loader = DataLoader(TrainImages(train_records, pre, recipe, seed=seed * 1000 + epoch), batch_size=batch_size,
                            sampler=order.tolist(), num_workers=workers,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        losses, correct, seen = [], 0, 0
        for images, labels in loader:
            with torch.no_grad():
                x = lower(images)
            logits = top(x)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        top.eval()
        predicted, truth = [], []
        with torch.inference_mode():
            for images, labels in DataLoader(TrainImages(val_records, pre), batch_size=256, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed * 1000)):
                predicted.append(top(lower(images)).argmax(1).cpu())
                truth.append(labels.cpu())
        predicted, truth = torch.cat(predicted).numpy(), torch.cat(truth).numpy()
        history.append((float(np.mean(losses)), correct / max(seen, 1), float(np.mean(predicted == truth))))
        predictions.append(predicted.tolist())
    return history, predictions, top.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cpu_run_is_exactly_the_run_of_the_per_step_loop(fashion_folder_master, workers):
    """Issue 19 moved the loss and hits onto the device (read once per epoch), the validation answers into one
    copy, and the image loaders into one persistent loader per run; on the CPU the run must not change at all:
    the same losses, accuracies and validation answers to the last bit, and the same weights, as the loop before
    it (inline above), with augmentation and dropout drawing their random numbers. With workers, the loader's
    processes are the same ones in every epoch."""
    from featurestore.encode.backbones import get_spec
    from featurestore.transfer.training import ImageBatches, adamw, train

    records = scan_source(fashion_folder_master).records
    train_records = [r for r in records if r.split == "train"]
    val_records = [r for r in records if r.split == "val"]
    pre = get_spec("efficientnet_lite0").preprocessing.with_overrides(image_size=32, crop_pct=1.0)
    settings = {"epochs": 3, "batch_size": 8, "seed": 3, "warmup": 2}
    expected, expected_predictions, expected_weights = _per_step_reference(
        train_records, val_records, pre, ViewRecipe(), workers, **settings)

    top = _small_top(10)
    batches = ImageBatches(train_records, {"val": val_records}, pre, PixelNormalize(pre), torch.device("cpu"),
                           recipe=ViewRecipe(), workers=workers, seed=settings["seed"])
    worker_pids = []

    def on_epoch(epoch: int) -> None:
        top.train()
        loader = batches.loaders.get("train")
        if workers and loader is not None:
            worker_pids.append(tuple(worker.pid for worker in loader._iterator._workers))

    result, _ = train(top, top.state_dict, adamw([{"params": list(top.parameters()), "lr": 1e-2}], 1e-4), batches,
                      epochs=settings["epochs"], batch_size=settings["batch_size"], patience=None,
                      device=torch.device("cpu"), run_key="reference", warmup_steps=settings["warmup"],
                      on_epoch=on_epoch, progress=False)
    assert [(h["train_loss"], h["train_accuracy"], h["val_accuracy"]) for h in result.history] == expected
    assert result.epoch_val_predictions == expected_predictions
    weights = top.state_dict()
    assert all(torch.equal(weights[key], value) for key, value in expected_weights.items())
    if workers:  # epochs 2 and 3 found the processes that epoch 1 started
        assert len(worker_pids) == 2 and len(set(worker_pids)) == 1, worker_pids


def test_the_cpu_optimisers_are_torchs_default_adamw(probe):
    """Fused AdamW is for CUDA (tests/test_cuda.py); on the CPU the images' and the texts' optimisers stay
    torch's default implementation, so CPU runs keep their numbers."""
    from types import SimpleNamespace

    from featurestore.transfer.finetune import optimizer_for
    from featurestore.transfer.text_finetune import text_optimizer

    head, _ = probe
    top, _ = build_model(head, CONFIG)
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    text_top = SimpleNamespace(model=SimpleNamespace(encoder=SimpleNamespace(encoder=SimpleNamespace(layer=layers))),
                               first_layer=1, classifier=torch.nn.Linear(4, 2))
    for optimizer in (optimizer_for(top, CONFIG), text_optimizer(text_top, CONFIG)):
        assert isinstance(optimizer, torch.optim.AdamW)
        assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None


@pytest.fixture(scope="module")
def digits(tmp_path_factory, lite0_small):
    """Far from ImageNet: scikit-learn's 8×8 scans of handwritten digits (bundled with it), upscaled to 32-px grey
    PNGs, 10 classes × (30 train, 20 val, 5 test); the real EfficientNet-Lite0 at 64 px and its logreg head."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits") / "images"
    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        chosen = iter(rng.permutation(np.flatnonzero(digits.target == label)))
        for split, count in (("train", 30), ("val", 20), ("test", 5)):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for _ in range(count):
                index = next(chosen)
                pixels = (digits.images[index] / 16 * 255).astype(np.uint8)
                Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).save(folder / f"{index}.png")
    store = root.parent / "lite0.h5"
    extract_features(root, store, model=lite0_small, workers=0, progress=False)
    return train_head(store, HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)), root


def test_a_rate_ten_times_too_high_backs_off_and_still_beats_the_probe(digits, tmp_path):
    """Issue 27: the default recipe at ten times its rate, on digits. Without the guards (gradient clipping, a
    diverged epoch undone and rerun at half the rate, the starting probe's σ floored) every epoch is at chance;
    with them an epoch ≥ 1 beats the probe on validation, every epoch's loss is finite and the last below the
    first, and the result lists the epochs undone."""
    import math

    head, root = digits
    config = FinetuneConfig(head_lr=1e-2, epochs=8, patience=None, workers=0)
    result = finetune(head, root, tmp_path / "guarded.pth", config, device="cpu", progress=False,
                      cache=tmp_path / "trunk.h5")
    losses = [epoch["train_loss"] for epoch in result.history]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert result.best_epoch >= 1 and result.best_val_accuracy > result.start_val_accuracy
    assert result.diverged_rounds and all(r["why"] for r in result.diverged_rounds)
    assert result.history[-1]["lr_scale"] == 0.5 ** len(result.diverged_rounds)

    unguarded = finetune(head, root, tmp_path / "unguarded.pth",
                         replace(config, backoffs=0, max_grad_norm=0.0, probe_scale_floor=0.0), device="cpu",
                         progress=False, cache=tmp_path / "trunk.h5")
    assert unguarded.best_epoch == 0 and not unguarded.diverged_rounds
    assert max(epoch["val_accuracy"] for epoch in unguarded.history) <= 0.15  # chance, for 10 classes
