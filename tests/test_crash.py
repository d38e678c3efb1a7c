"""kill -9 a real extraction subprocess: the store stays readable and the rerun resumes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import ImageOps

from featurestore import FeatureStore
from featurestore.backbones import load_backbone
from featurestore.data import load_rgb
from featurestore.extract import extract_features

pytestmark = pytest.mark.slow

# Eager torch at native resolution with small batches: each batch takes long enough to kill between.
ARGS = ["--image-size", "224", "--crop-pct", "1.0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--engine", "torch"]


def cli(folder, out, *extra):
    return [sys.executable, "-m", "featurestore.cli", "extract", "--data", str(folder), "--out", str(out),
            *ARGS, "--no-progress", *extra]


def parts(out):
    return sorted((out.parent / (out.name + ".partial")).rglob("part-*.npz"))


def start_and_kill_after_parts(folder, out, min_parts, timeout=120.0):
    process = subprocess.Popen(cli(folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while len(parts(out)) < min_parts:
        if process.poll() is not None:
            pytest.fail(f"extraction ended before it could be killed: {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no journal part appeared in time")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def store_rows(path):
    store = FeatureStore(path)
    rows = {}
    for split in store.splits:
        X, y, ids = store.load(split)
        for feature, label, cid, rel in zip(X, y, ids, store.paths(split), strict=True):
            rows[rel] = (cid, int(label), feature)
    return store.fingerprint_hash, rows


def test_kill_minus_nine_keeps_the_last_store_and_the_rerun_resumes(fashion_folder, tmp_path):
    out = tmp_path / "features.h5"
    subprocess.run(cli(fashion_folder, out), check=True, capture_output=True)
    before = store_rows(out)

    for source in sorted(fashion_folder.rglob("train_*.png"))[:24]:  # 24 images with new content
        ImageOps.mirror(load_rgb(source)).convert("L").save(source.with_name("mirror_" + source.name))

    start_and_kill_after_parts(fashion_folder, out, min_parts=2)
    after_kill = store_rows(out)  # opens, and is exactly the last complete store
    assert after_kill[0] == before[0] and after_kill[1].keys() == before[1].keys()
    for rel, (cid, _label, feature) in before[1].items():
        assert after_kill[1][rel][0] == cid and np.array_equal(after_kill[1][rel][2], feature)
    journaled = 4 * len(parts(out))
    assert 8 <= journaled < 24

    result = subprocess.run(cli(fashion_folder, out, "--json"), check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    assert summary["resumed"] == journaled  # finished batches are not run again
    assert summary["extracted"] == 24 - journaled and summary["reused"] == 40
    assert not parts(out)

    reference = tmp_path / "reference.h5"
    model = load_backbone("efficientnet_lite0", image_size=224, crop_pct=1.0)
    extract_features(fashion_folder, reference, model=model, batch_size=4, workers=0, progress=False, engine="torch")
    fp_resumed, resumed_rows = store_rows(out)
    fp_reference, reference_rows = store_rows(reference)
    assert fp_resumed == fp_reference and resumed_rows.keys() == reference_rows.keys()
    for rel, (cid, label, feature) in reference_rows.items():
        assert resumed_rows[rel][:2] == (cid, label)
        np.testing.assert_allclose(resumed_rows[rel][2], feature, rtol=1e-4, atol=1e-5)


def test_kill_at_random_moments_never_leaves_an_unreadable_file(fashion_folder, tmp_path):
    out = tmp_path / "features.h5"
    rng = np.random.default_rng(0)
    for attempt in range(4):
        process = subprocess.Popen(cli(fashion_folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(1.0, 5.0)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode in (0, -signal.SIGKILL), f"attempt {attempt} failed: {process.returncode}"
        if out.exists():
            store_rows(out)  # must open and read completely
    subprocess.run(cli(fashion_folder, out), check=True, capture_output=True)
    _, rows = store_rows(out)
    assert len(rows) == 40 and not parts(out)
    assert not (tmp_path / "features.h5.tmp").exists()
