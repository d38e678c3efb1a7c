import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore import FeatureStore
from featurestore.encode.images import load_rgb
from featurestore.errors import ImageDecodeError
from featurestore.extract.launch import extract_features

from .conftest import TEST_IMAGE_SIZE


def run_cli(*args, check=False):
    return subprocess.run([sys.executable, "-m", "featurestore.cli", *map(str, args)], capture_output=True, text=True,
                          check=check)


def extract(folder, out, model, engine="torch", **kwargs):
    """The torch engine, so that a forward hook can count the images the model sees."""
    options = {"batch_size": 8, "workers": 0, "progress": False, "engine": engine, **kwargs}
    return extract_features(folder, out, model=model, **options)


def test_store_holds_what_the_model_computes(fashion_folder, tmp_path, lite0_small):
    out = tmp_path / "f.h5"
    summary = extract(fashion_folder, out, lite0_small)
    assert (summary.extracted, summary.reused, summary.skipped) == (40, 0, [])
    store = FeatureStore(out)
    assert store.splits == ["train", "val", "test"]
    X, y, ids = store.load("train")
    assert X.shape == (20, 1280) and X.dtype == np.float32
    paths = store.paths("train")
    first = fashion_folder / paths[0]
    assert ids[0] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert store.class_names[y[0]] == first.parent.name
    with torch.inference_mode():
        direct = lite0_small(lite0_small.preprocessing(load_rgb(first)).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(X[0], direct, rtol=1e-4, atol=1e-4)
    fp = store.fingerprint
    assert fp["backbone"] == "efficientnet_lite0" and fp["weights_sha256"] == lite0_small.weights_sha256
    assert fp["preprocessing"]["image_size"] == TEST_IMAGE_SIZE and fp["dtype"] == "float32"
    assert {"layer", "schema_version", "compute", "rgb_conversion"} <= set(fp)


def test_rerun_is_incremental(fashion_folder, tmp_path, lite0_small, count_model_images):
    out = tmp_path / "f.h5"
    extract(fashion_folder, out, lite0_small)
    first_train = FeatureStore(out).load("train")
    assert sum(count_model_images) == 40
    count_model_images.clear()

    mtime = out.stat().st_mtime_ns
    again = extract(fashion_folder, out, lite0_small)
    assert (again.extracted, again.reused, again.written) == (0, 40, False)
    assert count_model_images == [] and out.stat().st_mtime_ns == mtime

    train = sorted((fashion_folder / "train").rglob("*.png"))
    removed = train[0]
    removed.unlink()
    shutil.copy(fashion_folder / "test" / train[5].parent.name / next(
        (fashion_folder / "test" / train[5].parent.name).iterdir()).name, train[5].parent / "copy_of_test.png")
    other_class = fashion_folder / "val" / train[9].parent.name
    new_image = other_class / "new.png"
    img = load_rgb(train[9]).convert("L").transpose(0)  # a mirrored image: new content
    img.save(new_image)
    third = extract(fashion_folder, out, lite0_small)
    assert sum(count_model_images) == 1  # only the mirrored image is new content; the copy reuses its twin
    assert (third.extracted, third.reused) == (1, 40)
    store = FeatureStore(out)
    assert removed.relative_to(fashion_folder).as_posix() not in list(store.paths("train"))
    X, _, ids = store.load("train")
    kept = dict(zip(first_train[2], first_train[0], strict=True))
    for row, cid in zip(X, ids, strict=True):
        if cid in kept:
            assert np.array_equal(row, kept[cid])


def test_another_fingerprint_never_mixes(fashion_folder, tmp_path, lite0_small, count_model_images):
    from featurestore.encode.backbones import load_backbone

    out = tmp_path / "f.h5"
    extract(fashion_folder, out, lite0_small)
    old = FeatureStore(out)
    bigger = load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE + 16, crop_pct=1.0)
    summary = extract(fashion_folder, out, bigger)
    assert (summary.extracted, summary.reused) == (40, 0)
    new = FeatureStore(out)
    assert new.fingerprint_hash != old.fingerprint_hash
    assert new.fingerprint["preprocessing"]["image_size"] == TEST_IMAGE_SIZE + 16
    half = extract(fashion_folder, out, lite0_small, dtype="float16")
    assert (half.extracted, half.reused) == (40, 0)
    assert FeatureStore(out).load("val")[0].dtype == np.float16


def test_bad_files_are_skipped_with_reasons(fashion_folder, tmp_path, lite0_small):
    cls = fashion_folder / "train" / "Bag"
    (cls / "empty.png").write_bytes(b"")
    (cls / "notes.png").write_text("not an image")
    good = next(cls.glob("train_*.png")).read_bytes()
    (cls / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "f.h5"
    summary = extract(fashion_folder, out, lite0_small)
    reasons = {item["path"]: item["reason"] for item in summary.skipped}
    assert set(reasons) == {"train/Bag/empty.png", "train/Bag/notes.png", "train/Bag/truncated.png"}
    assert "empty" in reasons["train/Bag/empty.png"] and "not an image" in reasons["train/Bag/notes.png"]
    assert summary.extracted == 40
    store = FeatureStore(out)
    assert store.skipped == summary.skipped and len(store.paths("train")) == 20


def test_on_error_fail_stops_and_keeps_finished_batches(fashion_folder, tmp_path, lite0_small, count_model_images):
    bad = fashion_folder / "val" / "Trouser" / "zz_broken.png"
    bad.write_text("garbage")
    out = tmp_path / "f.h5"
    with pytest.raises(ImageDecodeError) as info:
        extract(fashion_folder, out, lite0_small, on_error="fail")
    assert info.value.path == str(bad)
    assert not out.exists()
    done = sum(count_model_images)
    assert done >= 8  # at least the train batches before the bad image
    bad.unlink()
    count_model_images.clear()
    summary = extract(fashion_folder, out, lite0_small)
    assert summary.resumed == done and summary.extracted == 40 - done
    assert sum(count_model_images) == 40 - done
    assert not (tmp_path / "f.h5.partial").exists()


def test_cli_extract_json_and_info(fashion_folder, tmp_path):
    out = tmp_path / "cli.h5"
    result = run_cli("extract", "--data", fashion_folder, "--out", out, "--image-size", 32, "--crop-pct", 1.0,
                     "--batch-size", 16, "--workers", 2, "--device", "cpu", "--json", check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"extracted", "reused", "skipped", "seconds"} <= set(summary)
    assert summary["extracted"] == 40 and summary["skipped"] == []
    assert summary["engine"] == "onnxruntime"  # auto on the CPU
    assert "img/s" in result.stderr  # the progress bar shows a rate
    info = json.loads(run_cli("info", out, "--json", check=True).stdout)
    assert info["splits"]["test"]["count"] == 10 and info["fingerprint"]["preprocessing"]["image_size"] == 32
    text = run_cli("info", out, check=True).stdout
    assert "fingerprint" in text and "efficientnet_lite0" in text


def test_cli_errors_are_clear(tmp_path, fashion_folder):
    missing = run_cli("extract", "--data", tmp_path / "nope", "--out", tmp_path / "x.h5")
    assert missing.returncode == 2 and "nope: data folder or manifest not found" in missing.stderr
    (fashion_folder / "test" / "Empty").mkdir()
    empty = run_cli("extract", "--data", fashion_folder, "--out", tmp_path / "x.h5")
    assert empty.returncode == 2 and "Empty: class folder is empty" in empty.stderr
    (fashion_folder / "test" / "Empty").rmdir()
    unknown = run_cli("extract", "--data", fashion_folder, "--out", tmp_path / "x.h5", "--backbone", "resnet")
    assert unknown.returncode == 2 and "efficientnet_lite0" in unknown.stderr
    for item in (unknown, empty, missing):
        assert "Traceback" not in item.stderr


SUBCOMMANDS = ["backbones", "prepare", "prepare-text", "extract", "info", "verify", "train-head", "evaluate",
               "export", "predict", "finetune", "curve"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = run_cli(command, "--help", check=True)
    assert "usage: featurestore " + command in result.stdout


def test_csv_manifest_source(fashion_folder, tmp_path, lite0_small):
    rows = ["path,label,split"]
    for path in sorted(fashion_folder.rglob("*.png"))[:6]:  # absolute paths inside the manifest's folder
        rows.append(f"{path},{path.parent.name},{path.parent.parent.name}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    summary = extract(manifest, tmp_path / "m.h5", lite0_small)
    assert summary.extracted == 6
    store = FeatureStore(tmp_path / "m.h5")
    stored = store.paths(store.splits[0])[0]
    assert stored.startswith("images/") and not os.path.isabs(stored)  # relative to the manifest's folder
    assert store.source_folder() == tmp_path.resolve()


def test_onnxruntime_engine_agrees_with_torch_and_shares_the_cache(fashion_folder, tmp_path, lite0_small, onnx_cache):
    torch_store, ort_store = tmp_path / "torch.h5", tmp_path / "ort.h5"
    extract(fashion_folder, torch_store, lite0_small, engine="torch")
    summary = extract(fashion_folder, ort_store, lite0_small, engine="onnxruntime", workers=1)
    assert summary.engine == "onnxruntime" and list(onnx_cache.rglob("*.onnx"))
    a, b = FeatureStore(torch_store), FeatureStore(ort_store)
    assert a.fingerprint_hash == b.fingerprint_hash
    for split in a.splits:
        np.testing.assert_allclose(b.load(split)[0], a.load(split)[0], rtol=1e-4, atol=1e-4)
    again = extract(fashion_folder, ort_store, lite0_small, engine="onnxruntime")
    assert (again.extracted, again.reused, again.model_images) == (0, 40, 0)


def edited_copy(tmp_path: Path, module: str, edit: tuple[str, str] | None = None) -> Path:
    """A copy of the featurestore package under ``tmp_path``, with ``module`` (e.g. "encode/preprocess.py") edited:
    ``edit`` replaces one string (default: appends a comment, which changes no behaviour)."""
    import featurestore

    copy = tmp_path / "edited" / "featurestore"
    shutil.copytree(Path(featurestore.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    text = target.read_text()
    if edit is None:
        text += "\n# an edit\n"
    else:
        assert edit[0] in text
        text = text.replace(*edit)
    target.write_text(text)
    return copy.parent


def in_copy(copy: Path, code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(copy)}).stdout.strip()


# A behaviour change on the feature path: resize bilinear whatever the backbone asks for.
BILINEAR_EDIT = ("image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])",
                 "image.resize((new_w, new_h), Image.Resampling.BILINEAR)")

FINGERPRINT_CODE = """
import json
from featurestore.encode.backbones import load_backbone
from featurestore.encode.engines import onnx_path_for
from featurestore.encode.fingerprint import fingerprint_for
model = load_backbone("efficientnet_lite0", image_size=32, crop_pct=1.0)
print(json.dumps([fingerprint_for(model, "float32", False)["code_sha256"], onnx_path_for(model).name]))
"""


@pytest.mark.parametrize("module", ["encode/backbones/efficientnet_lite.py", "encode/preprocess.py",
                                    "encode/images.py", "encode/backbones/model.py"])
def test_editing_the_feature_code_changes_the_fingerprint_and_the_cached_graph(tmp_path, module):
    """The store fingerprint and the ONNX cache key cover the code on the feature path."""
    original = json.loads(in_copy(edited_copy(tmp_path / "same", "configs.py"), FINGERPRINT_CODE))
    edited = json.loads(in_copy(edited_copy(tmp_path / "edit", module), FINGERPRINT_CODE))
    assert original[0] != edited[0] and original[1] != edited[1]


def test_code_outside_the_feature_path_keeps_the_fingerprint(tmp_path, lite0_small):
    from featurestore.encode.fingerprint import fingerprint_for

    here = fingerprint_for(lite0_small, "float32", False)
    assert {"torch", "torchvision", "onnxruntime", "pillow"} <= set(here["libraries"])
    assert here["libraries"]["onnxruntime"].startswith("onnxruntime-gpu ")
    code = FINGERPRINT_CODE.replace("image_size=32", "image_size=64")
    copied = json.loads(in_copy(edited_copy(tmp_path, "heads/estimators.py"), code))  # a head edit: not a feature
    assert copied[0] == here["code_sha256"]


@pytest.mark.slow
def test_a_rerun_after_a_code_edit_extracts_everything_again(fashion_folder, tmp_path):
    """Edited preprocessing (bilinear instead of the backbone's bicubic) must not reuse a single row."""
    out = tmp_path / "f.h5"
    args = ["extract", "--data", fashion_folder, "--out", out, "--image-size", 32, "--crop-pct", 1.0,
            "--workers", 0, "--no-progress", "--json"]
    first = json.loads(run_cli(*args, check=True).stdout)
    assert first["extracted"] == 40
    copy = edited_copy(tmp_path, "encode/preprocess.py", BILINEAR_EDIT)
    result = subprocess.run([sys.executable, "-m", "featurestore.cli", *map(str, args)], capture_output=True,
                            text=True, cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, check=True)
    second = json.loads(result.stdout)
    assert (second["extracted"], second["reused"]) == (40, 0)
    assert "code_sha256" in result.stderr  # the warning says what changed
    assert second["fingerprint_hash"] != first["fingerprint_hash"]


def test_renaming_a_class_updates_the_store_without_re_extracting(fashion_folder, tmp_path, lite0_small,
                                                                   count_model_images):
    out = tmp_path / "f.h5"
    extract(fashion_folder, out, lite0_small)
    before = FeatureStore(out)
    assert "Bag" in before.class_names
    count_model_images.clear()
    for split in ("train", "val", "test"):  # "Bag2" sorts where "Bag" did: every label index stays the same
        (fashion_folder / split / "Bag").rename(fashion_folder / split / "Bag2")
    summary = extract(fashion_folder, out, lite0_small)
    after = FeatureStore(out)
    assert summary.written and summary.extracted == 0 and count_model_images == []
    assert after.class_names == [("Bag2" if name == "Bag" else name) for name in before.class_names]
    assert np.array_equal(after.labels("train"), before.labels("train"))
