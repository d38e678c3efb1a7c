"""Your own data without a val split (issue 26): `extract --val-fraction` makes one, stratified and seeded, recorded in
the store, and every reader that rebuilds the store's records makes the same one again."""

import json
import shutil
from collections import Counter

import pytest

from featurestore import FeatureStore
from featurestore.cli import main
from featurestore.configs import SplitRule
from featurestore.data.sources import scan_source
from featurestore.data.splits import make_splits
from featurestore.errors import BadValueError, DataError
from featurestore.heads.records import store_records


@pytest.fixture
def classes_only(fashion_folder_master, tmp_path):
    """The fixture's 40 images as a folder of classes (``root/<class>/<file>``): no train, val or test."""
    root = tmp_path / "mine"
    for image in fashion_folder_master.glob("*/*/*.png"):
        target = root / image.parent.name / f"{image.parent.parent.name}_{image.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    return root


def test_a_folder_of_classes_gets_a_val_and_test_split_recorded_in_the_store(classes_only, tmp_path, capsys):
    out = tmp_path / "mine.h5"
    common = ["extract", "--data", str(classes_only), "--out", str(out), "--image-size", "64", "--crop-pct", "1",
              "--workers", "0", "--no-progress", "--engine", "torch"]
    assert main(common) == 0
    # without a val split no head can be trained, and the error says how to make one
    assert main(["train-head", "--features", str(out), "--out", str(tmp_path / "h.skops"), "--no-progress"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert main(common + ["--val-fraction", "0.25", "--test-fraction", "0.25", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["extracted"] == 0 and summary["reused"] == 40  # the same rows, regrouped: nothing re-encoded
    store = FeatureStore(out)
    assert store.splits == ["train", "val", "test"]
    assert store.source_record["splits"] == {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}
    for split in ("val", "test"):  # stratified: each of the 10 classes (4 images each) gives one item
        assert Counter(store.labels(split).tolist()) == {label: 1 for label in range(10)}
    assert store.count("train") == 20
    # the readers that rebuild records from the store's source (evaluate, baselines, fine-tuning) draw the same splits
    val = store_records(store, "val")
    assert [r.rel_path for r in val] == store.paths("val").tolist() and {r.split for r in val} == {"val"}
    assert main(["train-head", "--features", str(out), "--out", str(tmp_path / "h.skops"), "--no-progress",
                 "--c-points", "3"]) == 0


def test_the_draw_is_seeded_and_an_added_file_moves_no_other_item(classes_only):
    rule = SplitRule(val_fraction=0.25)
    first = {r.rel_path: r.split for r in make_splits(scan_source(classes_only), rule).records}
    assert first == {r.rel_path: r.split for r in make_splits(scan_source(classes_only), rule).records}
    other_seed = {r.rel_path: r.split for r in make_splits(scan_source(classes_only), SplitRule(0.25, 0, 1)).records}
    assert other_seed != first and Counter(other_seed.values()) == Counter(first.values())
    extra = next(classes_only.glob("*/*.png"))
    shutil.copy(extra, extra.with_name("added.png"))
    after = {r.rel_path: r.split for r in make_splits(scan_source(classes_only), rule).records}
    moved = {path for path in first if after[path] != first[path]}
    assert len(moved) <= 1  # the new file's class may hand its val place to it, no other class changes


def test_a_train_test_manifest_draws_val_from_train_and_keeps_its_test(fashion_folder_master, tmp_path):
    rows = ["path,label,split"]
    for image in sorted(fashion_folder_master.glob("*/*/*.png")):
        split = "test" if image.parent.parent.name == "test" else "train"
        rows.append(f"{image.relative_to(fashion_folder_master).as_posix()},{image.parent.name},{split}")
    manifest = fashion_folder_master / "train_test.csv"
    manifest.write_text("\n".join(rows) + "\n")
    try:
        source = scan_source(manifest)
        made = make_splits(source, SplitRule(val_fraction=0.4))
        before = Counter(r.split for r in source.records)
        after = Counter(r.split for r in made.records)
        assert after["test"] == before["test"] and after["val"] + after["train"] == before["train"]
        assert after["val"] == 10 and made.split_rule["val_fraction"] == 0.4
        with pytest.raises(DataError, match="already has a 'test' split"):
            make_splits(source, SplitRule(test_fraction=0.2))
    finally:
        manifest.unlink()


def test_bad_fractions_are_one_clear_line():
    with pytest.raises(BadValueError, match="val_fraction"):
        SplitRule(val_fraction=1.5)
    with pytest.raises(BadValueError, match="leave no training items"):
        SplitRule(val_fraction=0.5, test_fraction=0.5)


def test_a_budget_larger_than_a_class_is_said_aloud(caplog):
    import numpy as np

    from featurestore.data.sources import budget_shortfall
    from featurestore.transfer.probe import probe_rows

    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    assert budget_shortfall(labels, 4) == {1: 2}
    with caplog.at_level("WARNING", logger="featurestore"):
        rows = probe_rows(labels, 4, seed=0)
    assert len(rows) == 4 + 2 + 4
    assert "capped" in caplog.text and "class 1: 2" in caplog.text
