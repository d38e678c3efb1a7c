"""kill -9 a real extraction subprocess: the store stays readable and the rerun resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import ImageOps

from featurestore import FeatureStore
from featurestore.encode.backbones import load_backbone
from featurestore.encode.images import load_rgb
from featurestore.extract.launch import extract_features
from featurestore.utils.atomic import temp_files_of

pytestmark = pytest.mark.slow

# Eager torch at native resolution with small batches: each batch takes long enough to kill between.
ARGS = ["--image-size", "224", "--crop-pct", "1.0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--engine", "torch"]


def cli(folder, out, *extra):
    return [sys.executable, "-m", "featurestore.cli", "extract", "--data", str(folder), "--out", str(out),
            *ARGS, "--no-progress", *extra]


# One journal part per batch of 4, as the tests below count them (by default a part is ~1 s or 4,096 rows).
PER_BATCH = {**os.environ, "FEATURESTORE_JOURNAL_ROWS": "4"}


def parts(out):
    return sorted((out.parent / (out.name + ".partial")).rglob("part-*.npz"))


def start_and_kill_after_parts(folder, out, min_parts, timeout=120.0, env=PER_BATCH):
    process = subprocess.Popen(cli(folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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
    """Each kill lands while the extraction runs (asserted: a process that finished first would not count),
    after a random number of new journal parts; the store on disk is always the last complete one."""
    out = tmp_path / "features.h5"
    subprocess.run(cli(fashion_folder, out), check=True, capture_output=True)
    last_complete = store_rows(out)
    for source in sorted(fashion_folder.rglob("*.png")):  # 40 new images, 10 parts of 4
        ImageOps.flip(load_rgb(source)).convert("L").save(source.with_name("flip_" + source.name))
    rng = np.random.default_rng(0)
    for attempt in range(3):
        already = len(parts(out))
        start_and_kill_after_parts(fashion_folder, out, min_parts=already + int(rng.integers(1, 4)))
        rows = store_rows(out)  # opens and reads completely
        assert rows[0] == last_complete[0] and rows[1].keys() == last_complete[1].keys(), f"attempt {attempt}"
    result = subprocess.run(cli(fashion_folder, out, "--json"), check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    assert summary["resumed"] >= 12 and summary["resumed"] + summary["extracted"] == 40 and summary["reused"] == 40
    _, rows = store_rows(out)
    assert len(rows) == 80 and not parts(out) and not temp_files_of(out)


# Runs the CLI with os.replace paused before the store is renamed into place, and says so in a marker file:
# the test kills the process exactly between "new store fully written" and "renamed".
PAUSED_RENAME = """
import os, sys, time
real_replace = os.replace
def paused_replace(src, dst):
    if str(dst).endswith(".h5"):
        open(sys.argv[1], "w").close()
        time.sleep(600)
    real_replace(src, dst)
os.replace = paused_replace
from featurestore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_during_the_final_rename_keeps_the_old_store_and_the_rerun_finishes(fashion_folder, tmp_path):
    out = tmp_path / "features.h5"
    subprocess.run(cli(fashion_folder, out), check=True, capture_output=True)
    before = store_rows(out)
    source = sorted(fashion_folder.rglob("*.png"))[0]
    ImageOps.flip(load_rgb(source)).convert("L").save(source.with_name("flip_" + source.name))
    marker = tmp_path / "renaming"
    process = subprocess.Popen([sys.executable, "-c", PAUSED_RENAME, str(marker), *cli(fashion_folder, out)[3:]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the store was never about to be renamed"
        time.sleep(0.01)
    assert len(temp_files_of(out)) == 1  # the new store, complete, not yet in place
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    after = store_rows(out)
    assert after[0] == before[0] and after[1].keys() == before[1].keys()  # the old store, whole
    result = subprocess.run(cli(fashion_folder, out, "--json"), check=True, capture_output=True, text=True)
    summary = json.loads(result.stdout)
    assert summary["resumed"] == 1 and summary["reused"] == 40 and summary["extracted"] == 0
    assert len(store_rows(out)[1]) == 41 and not temp_files_of(out)


def test_kill_while_the_background_journal_writes_loses_only_unwritten_rows(fashion_folder, tmp_path):
    """The default journal: a thread writes a part every second (or 4,096 rows). Killed after its first part,
    the rerun resumes exactly the rows the parts on disk hold and computes only the others."""
    for source in sorted(fashion_folder.rglob("*.png")):  # 160 images: ~5 s at 224 px, eager torch, one thread
        image = load_rgb(source)
        for name, variant in (("flip", ImageOps.flip), ("mirror", ImageOps.mirror),
                              ("both", lambda im: ImageOps.flip(ImageOps.mirror(im)))):
            variant(image).convert("L").save(source.with_name(f"{name}_{source.name}"))
    out = tmp_path / "features.h5"
    # One thread: on an idle machine two threads extract 80 images within the journal's first second, and the
    # first part would hold every row.
    start_and_kill_after_parts(fashion_folder, out, min_parts=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
    journaled = set()
    for part in parts(out):
        with np.load(part) as data:
            journaled |= set(data["ids"].astype(str))
    assert 0 < len(journaled) < 160 and not out.exists()
    summary = json.loads(subprocess.run(cli(fashion_folder, out, "--json"), check=True, capture_output=True,
                                        text=True).stdout)
    assert summary["resumed"] == len(journaled) and summary["extracted"] == 160 - len(journaled)
    assert len(store_rows(out)[1]) == 160 and not parts(out)
