"""Past memory and past one process: the streaming head, chunked reads, and sweeps on a Dask cluster."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from featurestore.configs import HeadConfig
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore, SplitArrays, chunk_infos, contiguous_runs, store_writer, write_store


def synthetic(path, rows: int, dim: int = 64, classes: int = 4, seed: int = 0, block: int = 20_000,
              backwards: bool = False):
    """A class-sorted store (the worst order for SGD) with a real signal, written block by block (last block
    first with ``backwards``, so that the file's chunks are out of row order)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    counts = {"train": rows, "val": max(200, rows // 20), "test": 200}
    with store_writer(path, {"backbone": "synthetic", "feature_dim": dim}, [f"c{k}" for k in range(classes)],
                      counts) as writer:
        for split, n in counts.items():
            for start in sorted(range(0, n, block), reverse=backwards):
                size = min(block, n - start)
                labels = np.sort(rng.integers(0, classes, size)) if split == "train" else rng.integers(0, classes, size)
                features = means[labels] + rng.normal(0, 1.5, (size, dim)).astype(np.float32)
                ids = [f"{split}{start + i:060d}" for i in range(size)]
                writer.write(split, start, SplitArrays(features, labels, ids, ids))
    return FeatureStore(path)


def test_the_shuffle_reader_mixes_a_class_sorted_split_with_bounded_buffers(tmp_path):
    store = synthetic(tmp_path / "s.h5", 20_000)
    batches = list(store.iter_shuffled("train", batch_rows=256, seed=0, buffer_chunks=8))
    assert sum(len(y) for _, y in batches) == 20_000
    first = batches[0][1]
    assert len(np.unique(first)) == 4  # the store is class-sorted; a minibatch is not
    X, y, _ = store.load("train")
    assert np.array_equal(np.sort(np.concatenate([b[1] for b in batches])), np.sort(y))
    assert max(len(b[1]) for b in batches) == 256


def test_the_fast_loader_equals_h5py(tmp_path):
    store = synthetic(tmp_path / "s.h5", 5_001)
    with h5py.File(store.path) as handle:
        expected = handle["train/features"][...]
    assert np.array_equal(store.load("train")[0], expected)
    assert np.array_equal(store.rows("train", [5000, 3, 3, 17]), expected[[5000, 3, 3, 17]])


@pytest.mark.parametrize("backwards", [False, True])
def test_the_fast_loader_reads_contiguous_chunks_at_once_and_any_order_right(tmp_path, backwards):
    store = synthetic(tmp_path / "s.h5", 9_001, dim=1024, block=1_000, backwards=backwards)
    with h5py.File(store.path) as handle:
        dataset = handle["train/features"]
        expected = dataset[...]
        chunks = chunk_infos(dataset)
        runs = contiguous_runs(chunks, dataset.chunks[0], 1024 * 4, dataset.shape[0])
    assert len(chunks) == 36  # 256-row chunks of 1 MiB
    assert sum(length for _, _, length in runs) == expected.nbytes
    assert len(runs) <= 10  # at most one read per block written (10 here), not one per chunk
    offsets = [byte_offset for _, byte_offset, _ in runs]
    assert (offsets == sorted(offsets)) != backwards  # the backwards file really is out of row order
    assert np.array_equal(store.load("train")[0], expected)


def test_the_streaming_head_learns_and_exports_like_the_others(tmp_path):
    store = synthetic(tmp_path / "s.h5", 8_000)
    head = train_head(store, HeadConfig(head="sgd_logreg", c_min=1e-3, c_max=1e1, c_points=3, max_iter=2))
    assert [p["C"] for p in head.sweep if 1e-3 * 0.99 <= p["C"] <= 1e1 * 1.01] == pytest.approx([1e-3, 1e-1, 1e1])
    assert len(head.sweep) == 3 + (head.c_grid["extended"] is not None) and head.n_train == 8_000 + 400
    X, y, _ = store.load("test")
    proba = head.predict_proba(X)
    assert proba.shape == (200, 4) and np.allclose(proba.sum(1), 1) and np.mean(head.predict(X) == y) > 0.9
    saved = head.save(tmp_path / "sgd.skops")
    from featurestore.heads.head import load_head

    assert np.array_equal(load_head(saved).predict(X), head.predict(X))
    from featurestore.deploy.export import linear_head_graph, linear_head_params
    from featurestore.encode.runtime import make_session

    graph = linear_head_graph(linear_head_params(head), store.feature_dim)  # the head part of an export
    (tmp_path / "head.onnx").write_bytes(graph.SerializeToString())
    session, _ = make_session(str(tmp_path / "head.onnx"), "cpu")
    onnx_proba = session.run(["probabilities"], {"head_features": X.astype(np.float32)})[0]
    np.testing.assert_allclose(onnx_proba, proba, atol=1e-5)


PEAK = """
import json, resource, sys
from featurestore.configs import HeadConfig
from featurestore.heads.train import train_head
train_head(sys.argv[1], HeadConfig(head="sgd_logreg", c_min=1e-2, c_max=1e0, c_points=2, max_iter=1))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


@pytest.mark.slow
def test_the_streaming_heads_memory_does_not_grow_with_the_rows(tmp_path):
    small = synthetic(tmp_path / "small.h5", 50_000, dim=512)
    large = synthetic(tmp_path / "large.h5", 200_000, dim=512)  # 410 MB of features, 300 MB more than small

    def peak(store):
        result = subprocess.run([sys.executable, "-c", PEAK, str(store.path)], capture_output=True, text=True,
                                check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    grown = peak(large) - peak(small)
    assert grown < 60 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MB for 300 MB more features"


def test_sweeps_on_a_dask_cluster_choose_the_same_c_and_coefficients(tmp_path):
    from distributed import LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class FinishedTasks(SchedulerPlugin):
        def __init__(self):
            self.tasks = []

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory":
                self.tasks.append((str(key), kwargs.get("worker")))

    rng = np.random.default_rng(0)
    splits = {}  # 4 classes, imbalanced train, balanced val: the best C is inside the grid, not on a tie plateau
    for name, labels in (("train", rng.choice(4, 400, p=[0.4, 0.3, 0.2, 0.1])), ("val", np.repeat(np.arange(4), 50))):
        signal = 1.5 * np.eye(4, 32, dtype=np.float32)[labels]
        features = rng.normal(0, 1, (len(labels), 32)).astype(np.float32) + signal
        ids = [f"{name}{i:060d}" for i in range(len(labels))]
        splits[name] = SplitArrays(features, labels.astype(np.int64), ids, ids)
    path = write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 32}, list("abcd"), splits)
    # up to 10: converged fits score 0.625 on val at C = 0.316 and again at C >= 100 (a tie that would put the best C
    # on a larger grid's edge)
    config = HeadConfig(c_min=1e-3, c_max=1e1, c_points=8, n_jobs=1)
    local = train_head(path, config)  # in-process: one segment, warm-started along the whole grid
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        finished = FinishedTasks()
        cluster.scheduler.add_plugin(finished)
        remote = train_head(path, config, scheduler=cluster.scheduler_address)
        workers = set(cluster.scheduler.workers)
    # the sweep really ran on the cluster: its segments as tasks, on both worker processes
    segments = [worker for key, worker in finished.tasks if "sweep_segment" in key]
    assert remote.config.n_jobs == 2 and len(segments) == 2 and set(segments) == workers
    assert local.c_grid["extended"] is None and local.c_grid["on_edge"] is None
    # cut into two segments on two machines, it finds what one local segment finds
    assert [(p["C"], p["val_accuracy"]) for p in remote.sweep] == [(p["C"], p["val_accuracy"]) for p in local.sweep]
    assert remote.C == local.C and 1e-3 < local.C < 1e1
    local_coef = local.estimator.named_steps["classify"].coef_
    assert np.array_equal(remote.estimator.named_steps["classify"].coef_, local_coef)


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    splits = {name: SplitArrays(np.zeros((8, 4), np.float32), np.arange(8) % 2, [f"{name}{i:063d}" for i in range(8)],
                                [str(i) for i in range(8)]) for name in ("train", "val")}
    path = write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 4}, ["a", "b"], splits)
    result = subprocess.run([sys.executable, "-m", "featurestore.cli", "train-head", "--features", str(path), "--out",
                             str(tmp_path / "h.skops"), "--scheduler", "tcp://127.0.0.1:9"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def marked_store(path, train: int = 3_000, val: int = 1_000, dim: int = 16, classes: int = 4, absent: tuple = ()):
    """A store whose rows say where they come from: column 0 is the split (0 train, 1 val), column 1 the row's
    index in it; the rest a class signal. Labels are class-sorted, and the classes in ``absent`` have no rows."""
    rng = np.random.default_rng(0)
    present = [k for k in range(classes) if k not in absent]
    means = rng.normal(0, 2, (classes, dim)).astype(np.float32)
    splits = {}
    for number, (name, n) in enumerate((("train", train), ("val", val), ("test", 200))):
        labels = np.sort(rng.choice(present, n)).astype(np.int64)
        features = means[labels] + rng.normal(0, 1, (n, dim)).astype(np.float32)
        features[:, 0], features[:, 1] = number, np.arange(n)
        ids = [f"{name}{i:060d}" for i in range(n)]
        splits[name] = SplitArrays(features, labels, ids, ids)
    return FeatureStore(write_store(path, {"backbone": "synthetic", "feature_dim": dim},
                                    [f"c{k}" for k in range(classes)], splits))


def test_the_shuffle_reader_mixes_several_splits_in_one_seeded_order(tmp_path):
    store = marked_store(tmp_path / "s.h5", train=30_000, val=10_000, dim=256)  # 1,024-row chunks: 40 of them
    batches = list(store.iter_shuffled(("train", "val"), batch_rows=512, seed=3, buffer_chunks=4))
    rows = np.concatenate([X[:, :2] for X, _ in batches]).astype(np.int64)
    for number, n in ((0, 30_000), (1, 10_000)):  # every row of both splits exactly once
        assert np.array_equal(np.sort(rows[rows[:, 0] == number, 1]), np.arange(n))
    # both splits from the start to the end of the pass, not all of train and then all of val
    val_share = [float(np.mean(X[:, 0] == 1)) for X, _ in batches]
    quarter = len(val_share) // 4
    assert 0 < np.mean(val_share[:quarter]) < 0.5 and 0 < np.mean(val_share[-quarter:]) < 0.5
    again = list(store.iter_shuffled(("train", "val"), batch_rows=512, seed=3, buffer_chunks=4))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # seeded
    other = next(store.iter_shuffled(("train", "val"), batch_rows=512, seed=4, buffer_chunks=4))
    assert not np.array_equal(other[0], batches[0][0])
    assert sum(len(y) for _, y in store.iter_shuffled(["val"], batch_rows=512, seed=0)) == 10_000  # a list works


def counted_passes(monkeypatch) -> list[tuple[tuple[str, ...], list[np.ndarray]]]:
    """Every call of FeatureStore.iter_shuffled (one pass): its splits, and per minibatch the split column."""
    passes, original = [], FeatureStore.iter_shuffled

    def counted(self, splits, *args, **kwargs):
        passes.append(((splits,) if isinstance(splits, str) else tuple(splits), []))
        for X, y in original(self, splits, *args, **kwargs):
            passes[-1][1].append(X[:, 0].copy())
            yield X, y

    monkeypatch.setattr(FeatureStore, "iter_shuffled", counted)
    return passes


def test_the_streaming_sweep_reads_the_store_once_per_pass_for_every_c(tmp_path, monkeypatch):
    store = marked_store(tmp_path / "s.h5", train=30_000, val=10_000, dim=256)
    passes = counted_passes(monkeypatch)
    config = HeadConfig(head="sgd_logreg", c_min=1e-3, c_max=1e1, c_points=5, max_iter=3)
    head = train_head(store, config)
    rounds = 1 + (head.c_grid["extended"] is not None)  # the grid, and its extension round if it had one
    assert len(head.sweep) >= 5
    assert [splits for splits, _ in passes] == [("train",)] * (rounds * 3) + [("train", "val")] * 3
    for splits, marks in passes:  # each a whole pass: passes x rows were read, not passes x rows x C
        assert sum(len(m) for m in marks) == (30_000 if splits == ("train",) else 40_000)
    for _, marks in passes[-3:]:  # every pass of the refit mixes the splits: it does not end on val rows only
        assert len(marks) >= 8
        assert 0 < np.concatenate(marks[-len(marks) // 4:]).mean() < 1
        assert 0 < np.concatenate(marks[:len(marks) // 4]).mean() < 1


def test_the_streaming_head_gives_a_class_without_rows_no_model(tmp_path, caplog):
    store = marked_store(tmp_path / "s.h5", absent=(2,))
    with caplog.at_level("WARNING", logger="featurestore"):
        head = train_head(store, HeadConfig(head="sgd_logreg", c_min=1e-2, c_max=1e0, c_points=3, max_iter=2))
    assert head.missing_classes == ["c2"] and head.classes.tolist() == [0, 1, 3]
    assert head.summary()["missing_classes"] == ["c2"] and "c2" in caplog.text
    X, y, _ = store.load("test")
    proba = head.predict_proba(X)
    assert proba.shape == (200, 4) and np.all(proba[:, 2] == 0) and np.allclose(proba.sum(1), 1)
    assert np.mean(head.predict(X) == y) > 0.9
    from featurestore.deploy.export import linear_head_graph, linear_head_params, spread_to_classes
    from featurestore.encode.runtime import make_session

    graph = spread_to_classes(linear_head_graph(linear_head_params(head), store.feature_dim), head.classes, 4)
    (tmp_path / "head.onnx").write_bytes(graph.SerializeToString())
    session, _ = make_session(str(tmp_path / "head.onnx"), "cpu")
    np.testing.assert_allclose(session.run(["probabilities"], {"head_features": X})[0], proba, atol=1e-5)


def test_the_streaming_head_extends_an_edge_in_one_round_of_passes(tmp_path, monkeypatch):
    store = marked_store(tmp_path / "s.h5")
    passes = counted_passes(monkeypatch)
    # a grid below the useful range (alpha = 1 / (C N) about 30 at C = 1e-5: chance), rising at its top
    config = HeadConfig(head="sgd_logreg", c_min=1e-6, c_max=1e-4, c_points=3, max_iter=2)
    head = train_head(store, config)
    grid = head.summary()["c_grid"]
    assert grid["extended"] == "up" and grid["on_edge"] is None and grid["max"] == pytest.approx(1e-1)
    assert [p["C"] for p in head.sweep] == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])  # to the limit at once
    assert 1e-4 < head.C < 1e-1
    assert [splits for splits, _ in passes].count(("train",)) == 2 * config.max_iter  # one round for the 3 new C
