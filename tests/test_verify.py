"""featurestore verify: re-extract a seeded sample, hash every file; exit 1 when the store drifted."""

import json
import os
import subprocess
import sys

import pytest
from PIL import ImageOps

from featurestore.encode.images import load_rgb
from featurestore.extract.launch import extract_features
from featurestore.extract.verify import verify_store

from .test_extract import BILINEAR_EDIT, edited_copy


def verify_cli(store, *extra, copy=None):
    env = {**os.environ, **({"PYTHONPATH": str(copy)} if copy else {})}
    return subprocess.run([sys.executable, "-m", "featurestore.cli", "verify", str(store), "--no-progress", "--json",
                           *map(str, extra)], capture_output=True, text=True, env=env, cwd=copy)


@pytest.fixture
def store(fashion_folder, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(fashion_folder, out, "efficientnet_lite0", image_size=32, crop_pct=1.0, workers=0,
                     progress=False)
    return out


def test_a_fresh_store_verifies(store):
    report = verify_store(store, sample=12, progress=False)
    assert report.ok and report.rows == 40 and report.sampled == 12
    assert report.max_abs_diff < 1e-4 and not report.fingerprint_changes
    result = verify_cli(store, "--sample", 5)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sampled"] == 5


def test_an_image_edited_on_disk_fails_with_exit_1(store, fashion_folder):
    edited = sorted((fashion_folder / "val" / "Coat").iterdir())[0]
    ImageOps.mirror(load_rgb(edited)).save(edited)
    (sorted((fashion_folder / "test" / "Bag").iterdir())[0]).unlink()
    result = verify_cli(store)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["changed"] == [edited.relative_to(fashion_folder).as_posix()] and len(report["missing"]) == 1
    assert not report["ok"]


@pytest.mark.slow
def test_features_that_moved_since_extraction_fail_with_exit_1(store, tmp_path):
    """Today's code resizes bilinear instead of bicubic: the sample no longer reproduces the stored rows."""
    copy = edited_copy(tmp_path, "encode/preprocess.py", BILINEAR_EDIT)
    result = verify_cli(store, "--sample", 8, copy=copy)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["changed"] == [] and len(report["drifted_rows"]) >= 1
    assert report["max_abs_diff"] > report["atol"] and "code_sha256" in report["fingerprint_changes"]


def test_verify_needs_the_data_folder(store, tmp_path):
    result = verify_cli(store, "--data", tmp_path / "elsewhere")
    assert result.returncode == 2 and "elsewhere" in result.stderr and "--data" in result.stderr
    assert "Traceback" not in result.stderr
