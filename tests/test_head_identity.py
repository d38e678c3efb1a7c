"""Head experiments with an identity (issue 26): a name per experiment, its settings in the comparison, and no silent
overwrite of one report by another."""

import json
import shutil

import numpy as np
import pytest

from featurestore.cli import main
from featurestore.store.hdf5 import SplitArrays, write_store


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 60), ("val", 30), ("test", 30)):
        labels = np.repeat([0, 1, 2], n // 3)
        features = rng.normal(0, 1, (n, 6)) + np.eye(3, 6)[labels] * 2
        ids = [f"{name}{i:061d}" for i in range(n)]
        splits[name] = SplitArrays(features.astype(np.float32), labels, ids, ids)
    return write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 6}, ["a", "b", "c"], splits)


def train(store, out, *options) -> int:
    return main(["train-head", "--features", str(store), "--out", str(out), "--c-points", "4", "--n-jobs", "1",
                 "--no-progress", *options])


def test_two_experiments_of_one_head_are_two_rows_with_their_settings(store, tmp_path, capsys):
    assert train(store, tmp_path / "a_logreg.skops") == 0
    assert train(store, tmp_path / "b.skops", "--name", "logreg_l2", "--normalize", "l2") == 0
    assert train(store, tmp_path / "synthetic__logreg.skops") == 0  # the pipeline's file name: just its kind
    capsys.readouterr()
    reports = tmp_path / "reports"
    assert main(["evaluate", "--heads", str(tmp_path / "a_logreg.skops"), str(tmp_path / "b.skops"),
                 str(tmp_path / "synthetic__logreg.skops"), "--out", str(reports)]) == 0
    table = capsys.readouterr().out
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {"synthetic__a_logreg", "synthetic__logreg_l2", "synthetic__logreg"}
    assert metrics["synthetic__logreg_l2"]["config"]["normalize"] == "l2"
    assert set(metrics["synthetic__logreg_l2"]["settings"]) == {"C"}
    row = next(line for line in table.splitlines() if "| logreg_l2 |" in line)
    assert "normalize=l2" in row and "C=" in row and row.startswith("| synthetic__logreg_l2 |")  # the model's name
    assert "normalize" not in next(line for line in table.splitlines() if "| a_logreg |" in line)


def test_two_heads_of_one_name_are_refused_not_overwritten(store, tmp_path, capsys):
    assert train(store, tmp_path / "x.skops") == 0
    shutil.copy(tmp_path / "x.skops", tmp_path / "copy.skops")  # a copied file keeps the name it was trained with
    capsys.readouterr()
    assert main(["evaluate", "--heads", str(tmp_path / "x.skops"), str(tmp_path / "copy.skops"), "--out",
                 str(tmp_path / "reports")]) == 2
    error = capsys.readouterr().err
    assert "synthetic__x" in error and "--name" in error
    assert not (tmp_path / "reports" / "metrics.json").exists()
