"""Every store records where its items came from (a folder or a manifest, ``source`` in its root attributes) and
every consumer rebuilds its records from that: int8 export of an inline-text manifest store without --data, the
evaluate stage's baseline and hybrid scoring on a CSV manifest store, and a store written before the record (schema
1: only ``source_root``) still read, its items found as before."""

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, Tokenization
from featurestore.extract import extract_features
from featurestore.heads import train_head
from featurestore.store.hdf5 import SplitArrays, write_store

ROOT = Path(__file__).resolve().parent.parent
TOPICS = {"business": "The bank raised rates and shares fell as markets weighed profit and trade figures.",
          "sport": "The team won the match after a late goal, and the coach praised the players' defence."}
SPLITS = ["train", "train", "train", "val", "val", "test"]


def rows() -> list[dict]:
    return [{"text": f"{text} Story {i}.", "label": topic, "split": split}
            for topic, text in TOPICS.items() for i, split in enumerate(SPLITS)]


def extract(data: Path, store: Path):
    return extract_features(data, store, "minilm_l6", tokenization=Tokenization(max_length=32), batch_size=8,
                            workers=0, progress=False)


def head_config() -> HeadConfig:
    return HeadConfig(c_min=1e-1, c_max=1e1, c_points=3, n_jobs=1)


def make_v1(path: Path, source_root: str) -> None:
    """Turn ``path`` into what the previous release wrote: schema 1, ``source_root`` and no ``source``."""
    with h5py.File(path, "r+") as handle:
        handle.attrs["featurestore_schema"] = 1
        handle.attrs["source_root"] = source_root
        if "source" in handle.attrs:
            del handle.attrs["source"]


@pytest.fixture(scope="module")
def inline_store(tmp_path_factory):
    """An all-MiniLM-L6-v2 store (32 tokens) of 12 short documents given inline in a JSON Lines manifest, and a
    logistic-regression head on it."""
    root = tmp_path_factory.mktemp("inline")
    manifest = root / "data" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    store = root / "features" / "minilm.h5"
    store.parent.mkdir()
    extract(manifest, store)
    return manifest, store, train_head(store, head_config())


def test_the_store_records_its_manifest_and_int8_export_finds_its_inline_texts(inline_store):
    from featurestore.deploy.export import split_items

    manifest, store, head = inline_store
    for split in ("train", "test"):  # what --quantize int8 calibrates on and compares on, without --data
        items = split_items(head, split)
        texts = [row["text"] for row in rows() if row["split"] == split]
        assert sorted(r.text for r in items.records) == sorted(texts)
        assert list(items.labels) == list(FeatureStore(store).labels(split))
    with h5py.File(store, "r") as handle:
        record = json.loads(handle.attrs["source"])
    assert record == {"kind": "manifest", "path": "../data/m.jsonl",
                      "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    assert FeatureStore(store).source() == manifest.resolve()


def test_a_schema_1_store_of_an_inline_manifest_still_reads_and_extract_upgrades_it(inline_store, tmp_path):
    from featurestore.heads.records import store_records

    manifest, store, _ = inline_store
    old = tmp_path / "features" / "old.h5"
    old.parent.mkdir()
    shutil.copy(store, old)
    make_v1(old, "../data")
    shutil.copytree(manifest.parent, tmp_path / "data")
    legacy = FeatureStore(old)
    assert legacy.schema_version == 1 and legacy.source() == (tmp_path / "data" / "m.jsonl").resolve()
    assert [r.text for r in store_records(legacy, "test")] == [r["text"] for r in rows() if r["split"] == "test"]
    summary = extract(tmp_path / "data" / "m.jsonl", old)  # every row reused, the file rewritten with its record
    assert summary.written and summary.model_images == 0 and summary.reused == 12
    upgraded = FeatureStore(old)
    assert upgraded.schema_version == 2 and upgraded.source_record["kind"] == "manifest"


def test_a_schema_1_folder_store_falls_back_to_its_recorded_folder(tmp_path):
    """No model needed: rows whose content ids are the files' hashes, written as the previous release did."""
    from featurestore.heads.records import store_records

    data = tmp_path / "data"
    splits = {}
    for split in ("train", "test"):
        paths, ids, labels = [], [], []
        for label, topic in enumerate(TOPICS):
            file = data / split / topic / "a.txt"
            file.parent.mkdir(parents=True)
            file.write_text(f"{TOPICS[topic]} ({split})")
            paths.append(file.relative_to(data).as_posix())
            ids.append(hashlib.sha256(file.read_bytes()).hexdigest())
            labels.append(label)
        splits[split] = SplitArrays(np.zeros((2, 4), np.float32), np.array(labels), ids, paths)
    path = write_store(tmp_path / "features" / "s.h5", {"backbone": "synthetic", "feature_dim": 4}, list(TOPICS),
                       splits)
    make_v1(path, "../data")
    store = FeatureStore(path)
    assert store.schema_version == 1 and store.info()["schema_version"] == 1
    assert store.source_record == {"kind": "folder", "path": "../data", "sha256": None}
    assert store.source() == data.resolve()
    assert [r.rel_path for r in store_records(store, "test")] == splits["test"].paths
    elsewhere = tmp_path / "moved"
    shutil.copytree(data, elsewhere)
    assert store.source(elsewhere) == elsewhere  # --data still wins


@pytest.mark.slow
def test_the_evaluate_stage_scores_baseline_and_hybrid_on_a_csv_manifest_store(tmp_path):
    """The DVC stage script itself, in a project of its own whose params.yaml names a CSV manifest as the data."""
    from featurestore.heads.reports import write_head_report
    from featurestore.transfer.best import run_challenger_stage, run_verdict_stage

    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    for script in ("evaluate.py", "_params.py"):
        shutil.copy(ROOT / "pipelines" / script, project / "pipelines" / script)
    (project / "params.yaml").write_text(json.dumps({"stores": {"minilm_l6": "tickets.csv"},
                                                     "train_head": {"heads": ["logreg"]},
                                                     "evaluate": {"split": "test"}}))
    manifest = project / "data" / "tickets.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label", "split"])
        writer.writeheader()
        writer.writerows(rows())
    store = project / "data" / "features" / "minilm_l6.h5"
    extract(manifest, store)
    head = train_head(store, head_config())
    head_path = head.save(project / "data" / "heads" / "minilm_l6__logreg.skops")
    data = project / "data"
    reports, challengers = data / "reports", data / "challengers" / "minilm_l6"
    write_head_report(head, FeatureStore(store), reports)
    for kind in ("baseline", "hybrid"):  # the pipeline's challenger stages, on the manifest the store records
        assert run_challenger_stage(kind, "minilm_l6", store, challengers / kind, split="test")["fitted"]
    run_verdict_stage([head_path], None, [challengers / "baseline", challengers / "hybrid"],
                      data / "verdict" / "minilm_l6")
    result = subprocess.run([sys.executable, str(project / "pipelines" / "evaluate.py"), "--reports", reports,
                             "--finetune-heads", data / "finetune_heads", "--challengers", data / "challengers",
                             "--verdicts", data / "verdict", "--multilayer", data / "multilayer"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert {"minilm_l6__logreg", "minilm_l6__tfidf_logreg", "minilm_l6__hybrid"} <= set(metrics)
