import json
import subprocess
import sys
import zipfile

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.data.prepare import prepare_fashion_mnist
from featurestore.errors import FeaturestoreError, HeadMismatchError
from featurestore.extract.launch import extract_features
from featurestore.heads.estimators import choose_c, sweep_c, sweep_jobs
from featurestore.heads.head import load_head
from featurestore.heads.reports import write_reports
from featurestore.heads.summary import read_head_metrics
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import SplitArrays, write_store

SMALL_GRID = {"c_min": 1e-4, "c_max": 1e2, "c_points": 7, "n_jobs": 2}


@pytest.fixture(scope="module")
def tiny_store(fashion_folder_master, tmp_path_factory, lite0_small):
    out = tmp_path_factory.mktemp("heads") / "lite0.h5"
    extract_features(fashion_folder_master, out, model=lite0_small, batch_size=16, workers=0, progress=False)
    return FeatureStore(out)


@pytest.mark.parametrize("head", ["logreg", "linear_svm", "svm_rbf"])
def test_train_head_sweeps_on_val_and_refits_on_train_plus_val(tiny_store, head, tmp_path, monkeypatch):
    loaded = []
    original = FeatureStore.load
    monkeypatch.setattr(FeatureStore, "load", lambda self, split, **kw: loaded.append(split) or original(self, split,
                                                                                                         **kw))
    trained = train_head(tiny_store, HeadConfig(head=head, **SMALL_GRID))
    assert "test" not in loaded  # C is never chosen on test
    swept = [p["C"] for p in trained.sweep]
    grid = trained.summary()["c_grid"]
    assert [C for C in swept if 1e-4 * (1 - 1e-9) <= C <= 1e2 * (1 + 1e-9)] == pytest.approx(np.logspace(-4, 2, 7))
    assert (grid["min"], grid["max"]) == (min(swept), max(swept))  # beyond the grid only if it was extended
    assert grid["extended"] == ("down" if min(swept) < 1e-4 * 0.99 else "up" if max(swept) > 1e2 * 1.01 else None)
    assert trained.C == choose_c(trained.sweep)
    assert trained.n_train == 30  # refitted on train (20) + val (10)
    assert trained.feature_dim == 1280 and trained.fingerprint_hash == tiny_store.fingerprint_hash
    assert trained.class_names == tiny_store.class_names
    if head != "logreg":
        assert isinstance(trained.estimator.named_steps["classify"], CalibratedClassifierCV)
    X, _, _ = tiny_store.load("test")
    proba = trained.predict_proba(X)
    assert proba.shape == (10, 10) and np.allclose(proba.sum(axis=1), 1)
    path = trained.save(tmp_path / f"{head}.skops")
    assert zipfile.is_zipfile(path)  # a skops archive: loading it runs no code from the file
    again = load_head(path)
    assert np.array_equal(again.predict(X), trained.predict(X)) and again.C == trained.C
    assert again.sweep == trained.sweep and again.fingerprint == trained.fingerprint
    assert again.c_grid == trained.c_grid == trained.summary()["c_grid"]
    assert again.config == trained.config and again.class_names == trained.class_names


def test_choose_c_prefers_the_most_regularised_among_ties():
    sweep = [{"C": 0.01, "val_accuracy": 0.5}, {"C": 0.1, "val_accuracy": 0.9}, {"C": 1.0, "val_accuracy": 0.9}]
    assert choose_c(sweep) == 0.1


def test_precomputed_kernel_sweep_equals_plain_rbf_svc(tiny_store):
    X, y, _ = tiny_store.load("train")
    Xv, yv, _ = tiny_store.load("val")
    config = HeadConfig(head="svm_rbf", **SMALL_GRID)
    fast = sweep_c(config, X, y, Xv, yv)
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    scaler = StandardScaler().fit(X)
    for point in fast:
        plain = SVC(C=point["C"], kernel="rbf", gamma="scale").fit(scaler.transform(X), y)
        assert plain.score(scaler.transform(Xv), yv) == point["val_accuracy"]


def test_logreg_warm_started_sweep_matches_cold_fits(tiny_store):
    X, y, _ = tiny_store.load("train")
    Xv, yv, _ = tiny_store.load("val")
    # Where regularisation shapes the optimum (C <= 1), starting from the previous C must not change the
    # answer. Above that, 20 images in 1280 dimensions are separable and the loss is flat near its minimum.
    warm = [p for p in sweep_c(HeadConfig(head="logreg", **SMALL_GRID), X, y, Xv, yv, extend=False) if p["C"] <= 1]
    cold = [sweep_c(HeadConfig(head="logreg", c_min=p["C"], c_max=p["C"], c_points=1), X, y, Xv, yv)[0] for p in warm]
    assert len(warm) == 5
    assert [p["val_accuracy"] for p in warm] == [p["val_accuracy"] for p in cold]


def test_head_refuses_features_from_another_cache(tiny_store, fashion_folder_master, tmp_path):
    from featurestore.encode.backbones import load_backbone

    trained = train_head(tiny_store, HeadConfig(**SMALL_GRID))
    other_model = load_backbone("efficientnet_lite0", image_size=48, crop_pct=1.0)
    other = tmp_path / "other.h5"
    extract_features(fashion_folder_master, other, model=other_model, workers=0, progress=False)
    with pytest.raises(HeadMismatchError, match="48 px"):
        write_reports([trained], {"efficientnet_lite0": FeatureStore(other)}, tmp_path / "reports")
    with pytest.raises(HeadMismatchError, match=r"\(N, 1280\)"):
        trained.predict(np.zeros((3, 512), dtype=np.float32))


def test_reports_files_and_metrics(tiny_store, tmp_path):
    heads = [train_head(tiny_store, HeadConfig(head=h, **SMALL_GRID)) for h in ("logreg", "svm_rbf")]
    results = write_reports(heads, {"efficientnet_lite0": tiny_store}, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"efficientnet_lite0__logreg", "efficientnet_lite0__svm_rbf"} == set(results)
    m = metrics["efficientnet_lite0__logreg"]
    X, y, _ = tiny_store.load("test")
    assert m["top1"] == pytest.approx(float(np.mean(heads[0].predict(X) == y)))
    assert m["n"] == 10 and m["top5"] >= m["top1"] and m["C"] == heads[0].C
    assert {"mean_per_class_accuracy", "macro_f1", "train_seconds"} <= set(m)
    rows = (tmp_path / "confusion" / "efficientnet_lite0__logreg.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 11
    sweep_rows = (tmp_path / "sweep" / "efficientnet_lite0__svm_rbf.csv").read_text().splitlines()
    assert sweep_rows[0] == "C,log10_C,val_accuracy" and len(sweep_rows) == len(heads[1].sweep) + 1  # extended too
    for name in ("efficientnet_lite0__logreg_confusion.png", "efficientnet_lite0__svm_rbf_sweep.png"):
        with Image.open(tmp_path / "figures" / name) as image:
            assert image.size[0] > 300
    table = (tmp_path / "comparison.md").read_text()
    assert "| efficientnet_lite0 | logreg |" in table and "| efficientnet_lite0 | svm_rbf |" in table
    # the DVC evaluate stage gathers the per-head files into the same summary
    assert read_head_metrics(tmp_path, sorted(metrics)) == metrics
    with pytest.raises(FeaturestoreError, match="efficientnet_lite0__linear_svm.json: no evaluation"):
        read_head_metrics(tmp_path, ["efficientnet_lite0__linear_svm"])


def test_cli_train_head_and_evaluate(tiny_store, tmp_path):
    head_path = tmp_path / "h.skops"
    out = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "train-head", "--features", str(tiny_store.path), "--head",
         "logreg", "--out", str(head_path), "--c-points", "5", "--json", "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(out.stdout)
    assert summary["head"] == "logreg" and head_path.is_file()
    report = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "evaluate", "--heads", str(head_path), "--out",
         str(tmp_path / "reports")],
        capture_output=True, text=True, check=True,
    )
    assert "| efficientnet_lite0 | h |" in report.stdout  # the head experiment is named for its file (or --name)
    assert (tmp_path / "reports" / "metrics.json").is_file()


@pytest.mark.slow
def test_linear_probe_on_real_features_is_accurate(tmp_path, lite0_small):
    """500 real Fashion-MNIST images: a misaligned label or feature would fall to chance (0.1)."""
    root = tmp_path / "images"
    prepare_fashion_mnist(root, labels_per_class=20, val_per_class=10, test_per_class=20, seed=2, progress=False)
    store_path = tmp_path / "f.h5"
    extract_features(root, store_path, model=lite0_small, workers=1, progress=False)
    trained = train_head(store_path, HeadConfig(c_points=12, n_jobs=2))
    X, y, _ = FeatureStore(store_path).load("test")
    assert float(np.mean(trained.predict(X) == y)) > 0.65


def test_params_sections_make_a_head_config():
    from featurestore.configs import config_from_params
    from featurestore.errors import FeaturestoreError

    params = {"heads": ["logreg"], "sweep": {"c_min": "1e-3", "c_points": 5}, "logreg": {"normalize": "l2"}}
    config = config_from_params(params, "logreg")
    assert (config.head, config.c_min, config.c_points, config.normalize) == ("logreg", 1e-3, 5, "l2")
    with pytest.raises(FeaturestoreError, match="typo_key"):
        config_from_params({"sweep": {}, "logreg": {"typo_key": 1}}, "logreg")


def test_small_sweeps_run_in_process_and_large_ones_on_every_core():
    cores = joblib.cpu_count()
    assert sweep_jobs(HeadConfig(head="logreg"), 1000, 1280) == 1  # worker start-up would cost more than the sweep
    assert sweep_jobs(HeadConfig(head="logreg"), 10000, 1280) == cores
    assert sweep_jobs(HeadConfig(head="svm_rbf"), 1500, 1280) == 1
    assert sweep_jobs(HeadConfig(head="svm_rbf"), 6000, 1280) == cores
    assert sweep_jobs(HeadConfig(head="linear_svm"), 1000, 1280) == 1  # warm-started like logreg (issue 26)
    assert sweep_jobs(HeadConfig(head="linear_svm"), 10000, 1280) == cores
    assert sweep_jobs(HeadConfig(head="logreg", n_jobs=3), 100, 10) == 3  # an explicit count is obeyed


def test_the_feature_scaler_treats_float_noise_as_constant():
    from featurestore.heads.scaling import FeatureScaler

    rng = np.random.default_rng(0)
    X = rng.normal(0, 0.05, (200, 4)).astype(np.float32)
    X[:, 1] = rng.normal(0, 1e-33, 200)  # rounding noise around zero
    X[:, 2] = 0.5  # exactly constant: scikit-learn's own rule
    scaler = FeatureScaler().fit(X)
    assert scaler.scale_[1] == 1.0 and scaler.scale_[2] == 1.0
    assert scaler.scale_[[0, 3]] == pytest.approx(X[:, [0, 3]].std(axis=0), rel=1e-5)
    streamed = FeatureScaler()
    for block in np.array_split(X, 5):
        streamed.partial_fit(block)
    assert np.allclose(streamed.scale_, scaler.scale_)


def test_heads_have_their_own_sweep_defaults_and_explicit_values_win():
    from featurestore.configs import HEAD_DEFAULTS, HEAD_SWEEP_DEFAULTS, config_from_params

    sgd = HeadConfig(head="sgd_logreg")
    assert (sgd.max_iter, sgd.c_points) == (HEAD_DEFAULTS["sgd_logreg"]["max_iter"],
                                           HEAD_DEFAULTS["sgd_logreg"]["c_points"])
    assert sgd.max_iter < 300 and sgd.c_points < 34  # its own: not the in-memory solvers' 300 iterations x 34 C
    assert len(sgd.c_grid()) == sgd.c_points
    for head in ("logreg", "linear_svm", "svm_rbf"):
        config = HeadConfig(head=head)
        assert {name: getattr(config, name) for name in HEAD_SWEEP_DEFAULTS} == HEAD_SWEEP_DEFAULTS
    explicit = HeadConfig(head="sgd_logreg", max_iter=300, c_points=34, c_min=1e-6, c_max=1e5)
    assert (explicit.max_iter, explicit.c_points, explicit.c_min, explicit.c_max) == (300, 34, 1e-6, 1e5)
    assert HeadConfig(head="sgd_logreg", max_iter=sgd.max_iter) == sgd  # resolved when made: equal configs
    from_params = config_from_params({"sweep": {"seed": 1}, "sgd_logreg": {"max_iter": 2}}, "sgd_logreg")
    assert (from_params.max_iter, from_params.c_points) == (2, sgd.c_points)
    help_text = subprocess.run([sys.executable, "-m", "featurestore.cli", "train-head", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--max-iter" in help_text and "sgd_logreg" in help_text


def two_class_problem(seed: int = 0, train: int = 60, val: int = 400, dim: int = 50, majority: float = 0.7):
    """A weak signal in one of ``dim`` noisy features; train is imbalanced (``majority`` of class 0), val balanced.

    Logistic regression's intercept is not regularised, so a tiny C predicts the training majority (val accuracy
    0.5) and a large C fits the noise: the best C lies in between."""
    rng = np.random.default_rng(seed)
    y = (rng.random(train) > majority).astype(np.int64)
    yv = np.repeat([0, 1], val // 2)
    X, Xv = (rng.normal(0, 1, (len(labels), dim)) for labels in (y, yv))
    X[:, 0] += 1.5 * y
    Xv[:, 0] += 1.5 * yv
    return X.astype(np.float32), y, Xv.astype(np.float32), yv


def test_a_best_c_below_the_grid_extends_it_down_until_it_is_inside(caplog):
    from featurestore.heads.estimators import grid_report

    X, y, Xv, yv = two_class_problem()
    wide = sweep_c(HeadConfig(c_min=1e-6, c_max=1e4, c_points=31, n_jobs=1), X, y, Xv, yv, extend=False)
    best = choose_c(wide)
    assert 1e-5 < best < 1e3  # the problem's best C is inside the wide grid: a real optimum, not a tie plateau
    # A grid that starts 1.5 decades above it, with steps of half a decade: its floor is its best C
    config = HeadConfig(c_min=best * 10 ** 1.5, c_max=best * 10 ** 4, c_points=6, n_jobs=1)
    plain = sweep_c(config, X, y, Xv, yv, extend=False)
    assert choose_c(plain) == plain[0]["C"] and grid_report(config, plain)["on_edge"] == "down"
    with caplog.at_level("INFO", logger="featurestore"):
        extended = sweep_c(config, X, y, Xv, yv)
    report = grid_report(config, extended)
    chosen = choose_c(extended)
    assert report["extended"] == "down" and report["on_edge"] is None and not report["limit_reached"]
    assert report["min"] < chosen < config.c_min  # now inside the swept range, below the configured floor
    assert max(p["val_accuracy"] for p in extended) > max(p["val_accuracy"] for p in plain)
    steps = np.diff(np.log10([p["C"] for p in extended]))
    assert steps == pytest.approx(np.full(len(steps), 0.5))  # the grid's own log step, continued
    assert report["min"] >= config.c_min / 1e3 * (1 - 1e-9)  # within the stated limit
    assert "extending it down" in caplog.text
    # the mirror image: a grid below the best C extends up
    low = HeadConfig(c_min=best / 10 ** 4, c_max=best / 10 ** 1.5, c_points=6, n_jobs=1)
    up = grid_report(low, sweep_c(low, X, y, Xv, yv))
    assert up["extended"] == "up" and up["on_edge"] is None and up["max"] > low.c_max


def test_a_tie_plateau_on_the_floor_extends_to_the_limit_and_says_so(tmp_path, caplog):
    splits = {}
    for name, n in (("train", 40), ("val", 20)):  # features that say nothing: every C ties
        labels = np.repeat([0, 1], n // 2)
        ids = [f"{name}{i:060d}" for i in range(n)]
        splits[name] = SplitArrays(np.ones((n, 8), np.float32), labels, ids, ids)
    path = write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 8}, ["a", "b"], splits)
    config = HeadConfig(c_min=1e-2, c_max=1e2, c_points=5, n_jobs=1)
    with caplog.at_level("INFO", logger="featurestore"):
        head = train_head(path, config)
    grid = head.summary()["c_grid"]
    assert len({p["val_accuracy"] for p in head.sweep}) == 1  # a plateau: the smallest C is chosen, on the floor
    assert grid["extended"] == "down" and grid["on_edge"] == "down" and grid["limit_reached"] is True
    assert grid["min"] == pytest.approx(1e-5) and head.C == pytest.approx(1e-5)  # 3 decades below the floor
    assert grid["limits"] == pytest.approx([1e-5, 1e5]) and grid["configured"] == pytest.approx([1e-2, 1e2])
    assert [r for r in caplog.records if r.levelname == "WARNING" and "limit" in r.getMessage()]
    saved = load_head(head.save(tmp_path / "h.skops"))  # the head file keeps it (JSON metadata)
    assert saved.summary()["c_grid"] == grid and json.loads(json.dumps(grid)) == grid


def test_a_fixed_c_is_not_a_grid_and_is_never_extended():
    X, y, Xv, yv = two_class_problem()
    config = HeadConfig(c_min=1e-3, c_max=1e-3, c_points=1, n_jobs=1)
    from featurestore.heads.estimators import grid_report

    sweep = sweep_c(config, X, y, Xv, yv)
    assert [p["C"] for p in sweep] == [1e-3]
    assert grid_report(config, sweep) | {"limits": None} == {
        "min": 1e-3, "max": 1e-3, "configured": [1e-3, 1e-3], "limits": None, "extended": None, "on_edge": None,
        "limit_reached": False}
