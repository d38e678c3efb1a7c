"""Corrections files (issue 28's way to act on the audit): extract --exclude and train-head --exclude drop and relabel
items by path, on real Lite0 features, without re-encoding anything."""

import json
import subprocess
import sys

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.errors import BadValueError, DataError
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.records import store_source
from featurestore.heads.train import train_head
from featurestore.store.corrections import CorrectedStore, read_corrections


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "featurestore.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def store_and_folder(fashion_folder_master, lite0_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrections") / "f.h5"
    extract_features(fashion_folder_master, out, model=lite0_small, batch_size=8, workers=0, progress=False,
                     engine="torch")
    return out, fashion_folder_master


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def corrections_for(store):
    """Drop the first train item, relabel the second to the class of the third: (file text, dropped, relabelled)."""
    paths, labels = store.paths("train"), store.labels("train")
    other = next(i for i in range(len(labels)) if labels[i] != labels[1])
    new_label = store.class_names[labels[other]]
    return f"path,label,reason\n{paths[0]},,audit\n{paths[1]},{new_label},audit\n", paths[0], (paths[1], new_label)


def test_a_corrected_store_reads_without_dropped_rows_and_with_new_labels(store_and_folder, tmp_path):
    out, _ = store_and_folder
    store = FeatureStore(out)
    text, dropped, (relabelled, new_label) = corrections_for(store)
    corrected = CorrectedStore(out, read_corrections(write(tmp_path / "c.csv", text)))
    X, y, ids = store.load("train")
    Xc, yc, idsc = corrected.load("train")
    assert corrected.count("train") == len(ids) - 1 == len(idsc)
    assert dropped not in corrected.paths("train") and dropped in store.paths("train")
    row = list(corrected.paths("train")).index(relabelled)
    assert corrected.class_names[yc[row]] == new_label and store.class_names[y[1]] != new_label
    assert np.array_equal(Xc, X[1:]) and np.array_equal(corrected.labels("train"), yc)
    # every way of reading agrees: chunks, shuffled minibatches, rows by index
    Xk = np.concatenate([block for block, _ in corrected.iter_chunks("train", rows=3)])
    assert np.array_equal(Xk, Xc)
    shuffled = list(corrected.iter_shuffled("train", batch_rows=4, seed=0))
    assert sum(len(b) for b, _ in shuffled) == len(yc)
    assert sorted(np.concatenate([labels for _, labels in shuffled]).tolist()) == sorted(yc.tolist())
    assert np.array_equal(corrected.rows("train", np.array([row])), Xc[[row]])
    assert corrected.corrections_record["dropped"] == 1 and corrected.corrections_record["relabelled"] == 1
    assert corrected.count("val") == store.count("val")  # other splits untouched
    # a block whose every row is left out is not yielded (a streamed head would fit on 0 rows)
    first = store.paths("train")[:3]
    gone = CorrectedStore(out, read_corrections(write(tmp_path / "gone.csv", "path\n" + "\n".join(first) + "\n")))
    blocks = list(gone.iter_chunks("train", rows=3))
    assert all(len(labels) for _, labels in blocks) and sum(len(labels) for _, labels in blocks) == len(ids) - 3


def test_train_head_exclude_records_the_corrections_and_changes_the_fit(store_and_folder, tmp_path):
    out, _ = store_and_folder
    text, _, _ = corrections_for(FeatureStore(out))
    corrections = write(tmp_path / "c.csv", text)
    head_file = tmp_path / "h.skops"
    result = run_cli("train-head", "--features", out, "--out", head_file, "--exclude", corrections, "--json",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    head = load_head(head_file)
    assert head.corrections == {"file": "c.csv", "sha256": read_corrections(corrections).sha256, "dropped": 1,
                                "relabelled": 1}
    assert head.n_train == FeatureStore(out).count("train") + FeatureStore(out).count("val") - 1
    plain = train_head(out, HeadConfig())
    assert plain.corrections is None and plain.n_train == head.n_train + 1
    # scored on the store as written, the head says so; through the same file, it does not
    apart = run_cli("evaluate", "--heads", head_file, "--out", tmp_path / "r1", "--split", "val")
    assert apart.returncode == 0 and "was trained through the corrections file c.csv" in apart.stderr
    same = run_cli("evaluate", "--heads", head_file, "--out", tmp_path / "r2", "--split", "val", "--exclude",
                   corrections)
    assert same.returncode == 0 and "was trained through" not in same.stderr


def test_extract_exclude_leaves_items_out_and_relabels_without_encoding(store_and_folder, tmp_path, lite0_small,
                                                                        count_model_images):
    out, folder = store_and_folder
    store = FeatureStore(out)
    text, dropped, (relabelled, new_label) = corrections_for(store)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(out.read_bytes())
    corrections = write(tmp_path / "c.csv", text)
    summary = extract_features(folder, copy, model=lite0_small, batch_size=8, workers=0, progress=False,
                               engine="torch", exclude=corrections)
    assert count_model_images == [] and summary.extracted == 0
    fixed = FeatureStore(copy)
    assert dropped not in fixed.paths("train") and fixed.count("train") == store.count("train") - 1
    assert fixed.class_names[fixed.labels("train")[list(fixed.paths("train")).index(relabelled)]] == new_label
    assert fixed.source_record["corrections"]["dropped"] == 1
    assert fixed.fingerprint_hash == store.fingerprint_hash  # the same features: heads of it still load
    # every reader of the items (fine-tuning, the fine-tuned store, the baselines) sees the store's items and labels
    items = {(r.split, r.rel_path): r.label for r in store_source(fixed).records}
    assert ("train", dropped) not in items and fixed.class_names[items[("train", relabelled)]] == new_label
    assert len(items) == sum(fixed.count(split) for split in fixed.splits)


def test_bad_corrections_files_name_the_file_and_the_problem(store_and_folder, tmp_path):
    out, _ = store_and_folder
    store = FeatureStore(out)
    first = store.paths("train")[0]
    cases = {
        "no-path.csv": ("file,label\na,\n", DataError, "needs a `path` column"),
        "twice.csv": (f"path\n{first}\n{first}\n", DataError, "line 3"),
        "unknown.csv": ("path\ntrain/Nothing/x.png\n", DataError, "none of its 1 paths"),
        "label.csv": (f"path,label\n{first},Dragon\n", BadValueError, "'Dragon', not a class"),
    }
    for name, (text, error, words) in cases.items():
        with pytest.raises(error, match=words) as caught:
            CorrectedStore(out, read_corrections(write(tmp_path / name, text)))
        assert name in str(caught.value)
    with pytest.raises(DataError, match="missing.csv"):
        read_corrections(tmp_path / "missing.csv")
    result = run_cli("train-head", "--features", out, "--out", tmp_path / "h.skops", "--exclude",
                     tmp_path / "label.csv", "--no-progress")
    assert result.returncode != 0 and "Dragon" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(json.dumps(store.info()))["splits"]["train"]["count"] == store.count("train")
