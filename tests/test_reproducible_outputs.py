"""Every DVC output is a function of its inputs (issue 26): the seconds a run took go to the git-ignored timings
folder (featurestore.utils.timings), so a stage rerun on the same inputs rewrites the same bytes."""

import json
from pathlib import Path

import numpy as np
import pytest

from featurestore.configs import HeadConfig
from featurestore.heads.estimators import build_estimator
from featurestore.heads.head import TrainedHead, load_head
from featurestore.heads.reports import write_head_report
from featurestore.heads.summary import read_head_metrics, write_summary
from featurestore.store.hdf5 import FeatureStore, SplitArrays, write_store
from featurestore.transfer.curve import write_curve
from featurestore.utils.timings import (
    TIMINGS_VARIABLE,
    is_timing,
    merge_timings,
    read_json,
    split_timings,
    timings_path,
    write_json,
    write_text_routed,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def routed(tmp_path, monkeypatch) -> Path:
    """The working directory is a project folder (tmp_path) whose timings are routed to ``timings/``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(TIMINGS_VARIABLE, "timings")
    return tmp_path


@pytest.fixture
def unrouted(monkeypatch) -> None:
    monkeypatch.delenv(TIMINGS_VARIABLE, raising=False)


# -- what a timing is, and the split --------------------------------------------------------------------------------

def test_the_timing_keys_are_seconds_rates_and_the_host():
    for key in ("seconds", "train_seconds", "trunk_cache_seconds", "seconds_per_epoch", "per_second",
                "images_per_second", "model_only_items_per_s", "hostname", "host"):
        assert is_timing(key), key
    for key in ("C", "n_train", "labels_per_class", "val_accuracy", "secondary", "epochs", "sha256", "store"):
        assert not is_timing(key), key


def test_split_timings_keeps_the_nesting_and_merge_puts_them_back():
    report = {"name": "x__logreg", "n": 5, "seconds": 1.25,
              "head": {"C": 0.1, "train_seconds": 3.5, "sweep": [{"C": 0.1, "val_accuracy": 0.5, "seconds": 0.2},
                                                                 {"C": 1.0, "val_accuracy": 0.6, "seconds": 0.3}]},
              "points": [{"method": "tfidf", "seconds": 0.7}, {"method": "scratch"}, 3],
              "int8": {"test": {"n": 10, "model_only_items_per_s": {"reference": 120.5, "candidate": 300.1}}},
              "grid": [1e-6, 1e5], "host": "box-7"}
    stable, timings = split_timings(report)
    assert stable == {"name": "x__logreg", "n": 5,
                      "head": {"C": 0.1, "sweep": [{"C": 0.1, "val_accuracy": 0.5}, {"C": 1.0, "val_accuracy": 0.6}]},
                      "points": [{"method": "tfidf"}, {"method": "scratch"}, 3],
                      "int8": {"test": {"n": 10}}, "grid": [1e-6, 1e5]}
    assert timings == {"seconds": 1.25, "host": "box-7",
                       "head": {"train_seconds": 3.5, "sweep": [{"seconds": 0.2}, {"seconds": 0.3}]},
                       "points": [{"seconds": 0.7}, None, None],
                       "int8": {"test": {"model_only_items_per_s": {"reference": 120.5, "candidate": 300.1}}}}
    assert report["head"]["sweep"][0]["seconds"] == 0.2  # the report itself is not changed
    assert merge_timings(stable, timings) == report
    assert json.loads(json.dumps(merge_timings(*json.loads(json.dumps([stable, timings]))))) == report
    assert split_timings({"n": 1}) == ({"n": 1}, {}) and split_timings([1, 2]) == ([1, 2], [])
    assert merge_timings({"points": [{"a": 1}]}, {"points": [{"seconds": 1}, None]}) == {"points": [{"a": 1}]}


# -- the writers: routed in a stage, whole outside it ---------------------------------------------------------------

def test_a_routed_report_holds_no_seconds_and_its_timings_mirror_it(routed):
    report = {"n": 3, "seconds": 4.2, "points": [{"C": 1, "seconds": 0.5}]}
    write_json(Path("data/reports/r.json"), report)
    assert json.loads((routed / "data/reports/r.json").read_text()) == {"n": 3, "points": [{"C": 1}]}
    mirror = routed / "timings/data/reports/r.json"
    assert timings_path("data/reports/r.json") == Path("timings/data/reports/r.json")
    assert json.loads(mirror.read_text()) == {"seconds": 4.2, "points": [{"seconds": 0.5}]}
    assert read_json("data/reports/r.json") == report
    write_json(Path("data/reports/r.json"), {"n": 3})  # no timings this time: the stale mirror goes
    assert not mirror.exists()
    write_text_routed(routed / "data/t.md", "stable\n", "with seconds\n")
    assert (routed / "data/t.md").read_text() == "stable\n"
    assert (routed / "timings/data/t.md").read_text() == "with seconds\n"


def test_a_file_outside_the_working_directory_is_written_whole(routed, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "r.json"
    assert timings_path(elsewhere) is None
    write_json(elsewhere, {"n": 3, "seconds": 4.2})
    assert json.loads(elsewhere.read_text()) == {"n": 3, "seconds": 4.2}


def test_outside_the_pipeline_reports_keep_their_seconds(tmp_path, unrouted):
    """The CLI and notebooks route nothing: a head's report and the summary carry its train_seconds."""
    store = tiny_store(tmp_path / "s.h5")
    head = fitted_head(store, train_seconds=2.5)
    metrics = write_head_report(head, store, tmp_path / "reports")
    saved = json.loads((tmp_path / "reports" / "heads" / f"{head.name}.json").read_text())
    assert saved == metrics and saved["train_seconds"] == 2.5
    write_summary({head.name: saved}, tmp_path / "reports")
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())[head.name]["train_seconds"] == 2.5
    assert "| train s |" in (tmp_path / "reports" / "comparison.md").read_text()
    assert read_head_metrics(tmp_path / "reports", [head.name]) == {head.name: metrics}
    head.save(tmp_path / "h.skops")
    assert load_head(tmp_path / "h.skops").train_seconds == 2.5
    assert not (tmp_path / "timings").exists()


def test_a_routed_model_file_is_the_same_bytes_whatever_the_fit_took(routed):
    store = tiny_store(routed / "data" / "s.h5")
    first, second = fitted_head(store, train_seconds=1.5), fitted_head(store, train_seconds=9.25)
    second.sweep = [{**point, "seconds": point["seconds"] * 3 + 1} for point in second.sweep]
    first.save("data/heads/a.skops")
    timings = json.loads((routed / "timings/data/heads/a.skops.json").read_text())
    assert timings == {"train_seconds": 1.5, "sweep": [{"seconds": p["seconds"]} for p in first.sweep]}
    second.save("data/heads/b.skops")
    assert (routed / "data/heads/a.skops").read_bytes() == (routed / "data/heads/b.skops").read_bytes()
    assert first.train_seconds == 1.5 and "seconds" in first.sweep[0]  # the model in memory keeps them
    loaded = load_head("data/heads/a.skops")  # a file without timings loads: train_seconds 0.0, sweep without
    assert loaded.train_seconds == 0.0 and all("seconds" not in point for point in loaded.sweep)
    assert loaded.C == first.C and loaded.val_accuracy == first.val_accuracy
    np.testing.assert_array_equal(loaded.predict_proba(store.load("val")[0]), first.predict_proba(store.load("val")[0]))


def test_a_routed_curve_keeps_its_seconds_column_and_figure_in_the_timings(routed):
    result = {"backbone": "demo", "budgets": [1, 2], "trunk_cache_seconds": 3.0, "finetune": {"seed": 0},
              "points": [{"labels_per_class": b, "method": "linear_probe", "test_accuracy": 0.5 + b / 10,
                          "seconds": 0.1 * b} for b in (1, 2)]}
    out = routed / "data" / "reports" / "curve" / "demo"
    out.mkdir(parents=True)
    (out / "curve_seconds.png").write_bytes(b"an earlier run's")
    write_curve(result, out)
    assert "seconds" not in (out / "curve.json").read_text()
    assert (out / "curve.csv").read_text().splitlines()[0] == "method,labels_per_class,test_accuracy"
    mirror = routed / "timings" / "data" / "reports" / "curve" / "demo"
    assert (mirror / "curve.csv").read_text().splitlines()[0] == "method,labels_per_class,test_accuracy,seconds"
    assert json.loads((mirror / "curve.json").read_text())["trunk_cache_seconds"] == 3.0
    assert sorted(p.name for p in out.iterdir()) == ["curve.csv", "curve.json", "curve_labels.png"]
    assert (mirror / "curve_seconds.png").is_file()


def test_the_stage_scripts_route_to_the_variable_this_module_reads():
    assert f'os.environ.setdefault("{TIMINGS_VARIABLE}", "timings")' in (ROOT / "pipelines" / "_params.py").read_text()
    assert "/timings/" in (ROOT / ".gitignore").read_text().splitlines()


# A real stage run twice writes the same bytes: tests/test_pipeline.py reruns train_head (with its report) with
# `dvc repro -f` and finds dvc.lock (the hash of every output) unchanged, and the head's seconds in timings/.


# -- helpers --------------------------------------------------------------------------------------------------------

def tiny_store(path: Path) -> FeatureStore:
    """A 6-class store of 8-dim features (60 train, 30 val, 30 test rows), the class a shift of its mean."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", 60), ("val", 30), ("test", 30)):
        y = np.arange(count) % 6
        X = (np.eye(6, 8)[y] * 2 + rng.standard_normal((count, 8))).astype(np.float32)
        splits[split] = SplitArrays(features=X, labels=y, ids=[f"{split[:2]}{i:062d}" for i in range(count)],
                                    paths=[f"{split}/{i}.png" for i in range(count)])
    path.parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore(write_store(path, {"backbone": "demo", "feature_dim": 8}, list("abcdef"), splits))


def fitted_head(store: FeatureStore, train_seconds: float) -> TrainedHead:
    """A logistic-regression head at C = 1 on the store's train split, with a sweep of two points."""
    config = HeadConfig(c_points=2, n_jobs=1)
    X, y, _ = store.load("train")
    sweep = [{"C": 0.1, "val_accuracy": 0.6, "seconds": 0.01}, {"C": 1.0, "val_accuracy": 0.7, "seconds": 0.02}]
    return TrainedHead.fitted_on(store, build_estimator(config, 1.0).fit(X, y), config, 1.0, sweep=sweep,
                                 train_seconds=train_seconds, n_train=len(y))
