"""Every verb on a text store as on an image store, through the command line: verify, finetune (with the text
defaults chosen on validation, and SetFit), curve (methods by modality, tfidf and setfit accepted), extract
--weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from featurestore import FeatureStore
from featurestore.configs import (
    DEFAULT_CURVE_METHODS,
    FINETUNE_DEFAULTS,
    FINETUNE_METHODS,
    SETFIT_DEFAULTS,
    Tokenization,
)
from featurestore.encode.backbones.weights import file_sha256
from featurestore.extract import extract_features

from .conftest import bbc_store_and_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "featurestore.cli", *map(str, args)], capture_output=True,
                            text=True)
    assert not check or result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """4 train, 2 val, 2 test BBC articles per topic, a store at 64 tokens and a logreg head on it."""
    root = tmp_path_factory.mktemp("texts")
    data, store, head = bbc_store_and_head(root, 4, 2, 2, seed=2)
    return data, store, head.save(root / "head.skops")


def test_the_text_fine_tuning_defaults_are_the_ones_params_yaml_runs():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]["minilm_l6"]
    given = {key: value for key, value in params.items() if key not in ("mode", "device", "methods", "setfit")}
    assert given == {key: value for key, value in vars(FINETUNE_DEFAULTS["text"]).items() if key in given}
    assert params["setfit"] == vars(SETFIT_DEFAULTS)  # every SetFit setting, as chosen on validation
    assert tuple(params["methods"]) == FINETUNE_METHODS["text"] == ("probe_finetune", "setfit")
    assert FINETUNE_DEFAULTS["text"].unfreeze_blocks == 2 and FINETUNE_DEFAULTS["image"].unfreeze_blocks == 6


def test_verify_re_encodes_a_text_store_and_finds_an_edited_article(texts, tmp_path):
    data, store, _ = texts
    fresh = cli("verify", store, "--sample", 40, "--json", "--no-progress")
    report = json.loads(fresh.stdout)
    assert report["ok"] and report["sampled"] == 40 and report["max_abs_diff"] < 1e-4, report
    edited = tmp_path / "bbc"
    subprocess.run(["cp", "-r", str(data), str(edited)], check=True)
    target = sorted((edited / "val").rglob("*.txt"))[0]
    target.write_text(target.read_text() + " An added sentence.")
    drifted = cli("verify", store, "--data", edited, "--json", "--no-progress", check=False)
    assert drifted.returncode == 1
    assert json.loads(drifted.stdout)["changed"] == [target.relative_to(edited).as_posix()]


def test_verify_reads_inline_documents_of_a_manifest(tmp_path):
    rows = [{"text": f"The {topic} story number {i}, with details about {topic}.", "label": topic, "split": split}
            for topic in ("business", "sport") for i, split in enumerate(["train", "train", "val", "test"])]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = tmp_path / "inline.h5"
    extract_features(manifest, store, "minilm_l6", tokenization=Tokenization(max_length=32), workers=0,
                     progress=False)
    report = json.loads(cli("verify", store, "--json", "--no-progress").stdout)
    assert report["ok"] and report["rows"] == 8 and report["sampled"] == 8 and not report["missing"]


def test_finetune_on_a_text_head_runs_with_the_text_defaults(texts, tmp_path):
    data, store, head = texts
    result = json.loads(cli("finetune", "--head", head, "--data", data, "--out", tmp_path / "ft.pth", "--epochs", 1,
                            "--device", "cpu", "--json", "--no-progress").stdout)
    expected = FINETUNE_DEFAULTS["text"]
    assert result["config"]["unfreeze_blocks"] == expected.unfreeze_blocks
    assert result["config"]["backbone_lr_factor"] == expected.backbone_lr_factor and result["epochs_run"] == 1
    assert result["train_ids"] == list(FeatureStore(store).ids("train"))
    refused = cli("finetune", "--head", head, "--data", data, "--out", tmp_path / "x.pth", "--cache",
                  tmp_path / "t.h5", check=False)
    assert refused.returncode == 2 and "apply to image heads" in refused.stderr


def test_finetune_runs_setfit_on_a_text_head(texts, tmp_path):
    data, store, head = texts
    out = tmp_path / "setfit.pth"
    result = json.loads(cli("finetune", "--head", head, "--data", data, "--out", out, "--method", "setfit",
                            "--setfit-iterations", 2, "--setfit-max-length", 32, "--device", "cpu", "--json",
                            "--no-progress").stdout)
    assert result["config"] == {**vars(SETFIT_DEFAULTS), "iterations": 2, "max_length": 32}
    assert result["epochs_run"] == 1 and result["history"][0]["pairs"] == 2 * 2 * 20 and out.is_file()
    assert result["train_ids"] == list(FeatureStore(store).ids("train")) and result["C"] > 0
    assert result["history"][0]["separation"] != result["start_separation"]
    refused = cli("finetune", "--head", head, "--data", data, "--out", tmp_path / "x.pth", "--method", "setfit",
                  "--epochs", 2, check=False)
    assert refused.returncode == 2 and "--epochs set probe_finetune" in refused.stderr
    bad = cli("finetune", "--head", head, "--data", data, "--out", tmp_path / "y.pth", "--method", "setfit",
              "--setfit-max-length", 4, check=False)
    assert bad.returncode == 2 and "setfit max_length must be in [8, 512], got 4" in bad.stderr


def test_extract_takes_a_fine_tuned_text_encoder_as_weights(texts, tmp_path):
    from featurestore.encode.backbones import load_text_backbone
    from featurestore.transfer.training import save_atomic

    data, _, _ = texts
    encoder = load_text_backbone("minilm_l6").encoder
    for parameter in encoder.encoder.layer[-1].parameters():
        parameter.data.mul_(0.5)  # a changed top layer: other features than the packaged weights give
    weights = tmp_path / "tuned.pth"
    save_atomic(weights, encoder.state_dict())
    out = tmp_path / "tuned.h5"
    summary = json.loads(cli("extract", "--data", data, "--backbone", "minilm_l6", "--weights", weights, "--out", out,
                             "--max-length", 64, "--workers", 0, "--json", "--no-progress").stdout)
    assert summary["extracted"] == 40
    assert FeatureStore(out).fingerprint["weights_sha256"] == file_sha256(weights)


def test_curve_on_texts_defaults_to_the_text_methods_and_takes_tfidf(texts, tmp_path):
    data, store, _ = texts
    run = cli("curve", "--features", store, "--data", data, "--out", tmp_path / "c", "--budgets", 2, "--epochs", 1,
              "--device", "cpu", "--json", "--no-progress")
    points = json.loads(run.stdout)["points"]
    assert {point["method"] for point in points} == set(DEFAULT_CURVE_METHODS["text"]) == {
        "tfidf", "linear_probe", "probe_finetune"}
    probe, tuned = (next(p for p in points if p["method"] == m) for m in ("linear_probe", "probe_finetune"))
    assert probe["train_ids"] == tuned["train_ids"]  # the fine-tune trained on the probe's articles
    only_tfidf = cli("curve", "--features", store, "--data", data, "--out", tmp_path / "d", "--budgets", 2,
                     "--methods", "tfidf", "--json", "--no-progress")
    assert {point["method"] for point in json.loads(only_tfidf.stdout)["points"]} == {"tfidf"}
    with_setfit = cli("curve", "--features", store, "--data", data, "--out", tmp_path / "s", "--budgets", 2,
                      "--methods", "linear_probe", "setfit", "--setfit-iterations", 2, "--setfit-max-length", 32,
                      "--device", "cpu", "--json", "--no-progress")
    curve = json.loads(with_setfit.stdout)
    probe, setfit = (next(p for p in curve["points"] if p["method"] == m) for m in ("linear_probe", "setfit"))
    assert setfit["train_ids"] == probe["train_ids"] and setfit["val_probe"] == probe["val_accuracy"]
    assert setfit["val_accuracy"] >= setfit["val_probe"] and len(setfit["separation"]) == 2
    assert curve["setfit"]["iterations"] == 2 and (tmp_path / "s" / "curve_labels.png").is_file()
    refused = cli("curve", "--features", store, "--data", data, "--out", tmp_path / "e", "--budgets", 2,
                  "--methods", "pixels", check=False)
    assert refused.returncode == 2 and "do not apply" in refused.stderr
