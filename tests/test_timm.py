"""timm models as backbones (``timm:<model>``): the entry from the model's ``pretrained_cfg``, the block split from
timm's own grouping and its exactness, the offline refusal without weights, and the plumbing through extract, head,
fine-tune (CLI), the trunk cache and export.

timm ships no weights and no timm checkpoint is on this machine (no PyPI package carries one), so every test here
uses random weights, and says so: the structural checks need none (the split must reproduce the model's own forward
whatever the weights), and the plumbing runs on a checkpoint the test writes (``torch.manual_seed(0)``) in the
safetensors format the Hugging Face Hub holds timm's weights in. What the weights are worth is not tested here; the
pretrained tv: backbone's tests (test_tv_finetune.py) measure that.
"""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.encode.backbones import get_spec, load_backbone
from featurestore.encode.backbones.model import PixelNormalize
from featurestore.encode.backbones.timm_models import grouped_split
from featurestore.encode.preprocess import Preprocessing
from featurestore.errors import UnknownBackboneError, WeightsUnavailableError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head
from featurestore.transfer.finetune import FinetuneConfig, build_model, trunk_cache_for
from featurestore.transfer.trunk import LowerBlocks, TrunkCache, UpperBlocks

from .conftest import cached_view_images

MODEL = "mobilenetv3_small_050"  # the smallest timm CNN with a split: 6 blocks, 1,024 features, 1.6 M parameters
SIZE = 64
HEAD = HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)
CONFIG = FinetuneConfig(unfreeze_blocks=2, epochs=1, batch_size=8, patience=5, workers=0)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A random-weights timm:mobilenetv3_small_050 checkpoint written by this test, as a safetensors file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / f"{MODEL}.safetensors"
    save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def timm_probe(fashion_folder_master, tmp_path_factory, timm_checkpoint):
    """Its store of the tiny data set at 64 px and a logreg head."""
    store = tmp_path_factory.mktemp("timm_store") / "timm.h5"
    extract_features(fashion_folder_master, store, f"timm:{MODEL}", weights=timm_checkpoint, image_size=SIZE,
                     crop_pct=1.0, workers=0, progress=False)
    return train_head(store, HEAD), store


def test_the_entry_takes_the_models_pretrained_cfg():
    """Preprocessing, classifier and feature width come from timm's own config (ResNet-18's a1 recipe: 224 px,
    crop 0.95, bicubic, ImageNet mean and std; classifier ``fc`` over 512 features). The resize is timm's own,
    floor(224 / 0.95) = 235 (rounding would give 236), and the normalised pixels equal timm's own eval transform's
    (torchvision's Resize and CenterCrop) on landscape, portrait and square images, odd crop offsets included."""
    import numpy as np
    from PIL import Image

    spec = get_spec("timm:resnet18")
    config = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    assert config["crop_pct"] == 0.95 and spec.preprocessing.resize_size == 235
    assert (spec.preprocessing.image_size, spec.preprocessing.interpolation) == (224, "bicubic")
    assert (spec.preprocessing.mean, spec.preprocessing.std) == (tuple(config["mean"]), tuple(config["std"]))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=config))
    for shape in ((300, 400, 3), (235, 300, 3), (500, 333, 3), (236, 236, 3), (28, 28, 3)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
        theirs = transform(image)  # normalised float (3, 224, 224)
        ours = PixelNormalize(spec.preprocessing)(spec.preprocessing(image)[None].float())[0]
        assert float((ours - theirs).abs().max()) < 1e-4, shape  # noise: a one-pixel shift would be off by units
    assert spec.classifier == "fc" and spec.feature_dim == 512
    assert "timm.models.resnet" in spec.code_modules  # timm's architecture source enters the fingerprint


@pytest.mark.parametrize("name, blocks", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("efficientnet_b0", [f"blocks.{i}" for i in range(7)]),
    (MODEL, [f"blocks.{i}" for i in range(6)]),
    ("convnext_atto", [f"stages.{i}" for i in range(4)]),
    ("regnetx_002", ["s1", "s2", "s3", "s4"]),
])
def test_timms_grouping_splits_the_network_and_reproduces_its_forward(name, blocks):
    """Structure only (random weights): the blocks are timm's coarse groups, every parameter sits in exactly one of
    stem, blocks and head, and stem → blocks → head gives the model's own logits."""
    torch.manual_seed(0)
    spec = get_spec(f"timm:{name}")
    split = spec.blocks
    assert split is not None and list(split.blocks) == blocks
    network = spec.build().eval()
    parts = [{p for p, _ in network.get_submodule(m).named_parameters(prefix=m)}
             for m in split.stem + split.blocks + split.head]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(list(network.parameters()))
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        for first in (0, len(blocks) - 1, len(blocks)):
            top = UpperBlocks(network, first, split=split)
            torch.testing.assert_close(top(LowerBlocks(network, first, split).activations(x)), network(x),
                                       rtol=0, atol=1e-4)


def test_a_model_whose_forward_is_not_its_modules_in_order_declares_no_split():
    """A ViT adds its class token and position embedding between its modules: timm's grouping names them, but they
    are parameters of the network itself, so no split is declared (and fine-tuning refuses it in one line)."""
    network = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="parameters of its own"):
        grouped_split(network, "head")
    assert get_spec("timm:vit_tiny_patch16_224").blocks is None


def test_without_weights_it_says_what_to_fetch_and_never_downloads():
    """No Hub cache and no --weights: one error naming the Hub repository, the file and --weights."""
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("timm:resnet18")
    message = str(info.value)
    assert "timm/resnet18.a1_in1k" in message and "model.safetensors" in message and "--weights" in message


def test_weights_a_connected_machine_put_in_the_hub_cache_are_found(tmp_path):
    """The Hub cache's layout (refs/main → snapshots/<commit>/model.safetensors), filled here by the test as
    `huggingface-cli download` would: the file is found there, without the network."""
    from featurestore.encode.backbones.timm_models import hub_weights

    repository = tmp_path / "models--timm--resnet18.a1_in1k"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text("0" * 40)
    snapshot = repository / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    config = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    assert hub_weights("timm:resnet18", config, cache_dir=tmp_path) == snapshot / "model.safetensors"
    with pytest.raises(WeightsUnavailableError, match="timm/resnet18.a1_in1k"):
        hub_weights("timm:resnet18", config, cache_dir=tmp_path / "empty")


def test_an_unknown_timm_model_is_named():
    with pytest.raises(UnknownBackboneError, match="unknown timm model 'resnet_nope'"):
        get_spec("timm:resnet_nope")
    with pytest.raises(UnknownBackboneError, match="unknown timm model 'resnet18.no_such_tag'"):
        get_spec("timm:resnet18.no_such_tag")


def test_a_model_with_two_classifiers_is_refused_in_one_line():
    """DeiT's distilled models carry two heads (``('head', 'head_dist')``): no single layer to drop."""
    with pytest.raises(UnknownBackboneError, match="2 classifiers"):
        get_spec("timm:deit_tiny_distilled_patch16_224")


def test_a_model_with_a_fixed_input_size_refuses_another_size(tmp_path):
    """A ViT's position embedding fixes its input at 224 px: --image-size 64 is refused before anything runs."""
    from featurestore.errors import BadValueError

    torch.manual_seed(0)
    checkpoint = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), checkpoint)
    assert get_spec("timm:vit_tiny_patch16_224").fixed_input_size
    with pytest.raises(BadValueError, match="takes 224×224 images only"):
        load_backbone("timm:vit_tiny_patch16_224", weights=checkpoint, image_size=64)
    assert load_backbone("timm:vit_tiny_patch16_224", weights=checkpoint, image_size=224).feature_dim == 192


def test_a_training_checkpoint_with_more_than_tensors_says_what_to_save(tmp_path):
    """timm's train.py saves its arguments beside the state dict; featurestore loads tensors only, and says so in
    one line."""
    import argparse

    from featurestore.encode.backbones.weights import read_state_dict
    from featurestore.errors import WeightsMismatchError

    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsMismatchError) as info:
        read_state_dict(path)
    assert len(str(info.value).splitlines()) == 1 and "save its state dict alone" in str(info.value)


@pytest.mark.slow
def test_a_timm_backbone_extracts_fine_tunes_and_exports(timm_probe, fashion_folder_master, tmp_path,
                                                         timm_checkpoint):
    """The plumbing on the written checkpoint: the store records its hash; the top 2 blocks on view 1's cached
    activations equal timm's own forward of the whole network on that view's image; `featurestore finetune` trains
    (one epoch) to other predictions than the probe's; the tuned weights extract again as timm:<model>; the head
    exports to one ONNX graph that agrees with it."""
    head, store = timm_probe
    fingerprint = FeatureStore(store).fingerprint
    assert fingerprint["backbone"] == f"timm:{MODEL}" and FeatureStore(store).load("train")[0].shape[1] == 1024
    config = replace(CONFIG, views=1, cache_dtype="float32")
    trunk_cache_for(head, fashion_folder_master, tmp_path / "trunk.h5", config, weights=timm_checkpoint,
                    device="cpu", progress=False)
    top, _ = build_model(head, config, weights=timm_checkpoint)
    pre = Preprocessing.from_dict(head.fingerprint["preprocessing"])
    images = cached_view_images(head, fashion_folder_master, config, view=1)
    top.eval()
    with torch.inference_mode():
        expected = top.network(PixelNormalize(pre)(images))
        cached = top(torch.from_numpy(TrunkCache(tmp_path / "trunk.h5").train_views[1]))
    assert float((expected - cached).abs().max()) <= 1e-4

    head_path = head.save(tmp_path / "head.skops")
    out = tmp_path / "ft.pth"
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "finetune", "--head", str(head_path), "--data",
         str(fashion_folder_master), "--out", str(out), "--weights", str(timm_checkpoint), "--unfreeze-blocks", "2",
         "--head-lr", "1e-2", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--json",
         "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout)
    assert run["epoch_val_predictions"][0] != run["start_val_predictions"]
    tuned = tmp_path / "tuned.h5"
    extract_features(fashion_folder_master, tuned, f"timm:{MODEL}", weights=out, image_size=SIZE, crop_pct=1.0,
                     workers=0, progress=False)
    assert FeatureStore(tuned).fingerprint["weights_sha256"] != fingerprint["weights_sha256"]

    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "export", "--head", str(head_path), "--weights",
         str(timm_checkpoint), "--out", str(tmp_path / "model.onnx"), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4
