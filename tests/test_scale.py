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
    assert len(head.sweep) == 3 and head.n_train == 8_000 + 400
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

    rng = np.random.default_rng(0)
    splits = {name: SplitArrays(rng.normal(0, 1, (n, 32)).astype(np.float32) + np.repeat(np.eye(4, 32), n // 4, 0),
                                np.repeat(np.arange(4), n // 4), [f"{name}{i:060d}" for i in range(n)],
                                [f"{name}{i}" for i in range(n)]) for name, n in (("train", 400), ("val", 200))}
    path = write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 32}, list("abcd"), splits)
    config = HeadConfig(c_min=1e-3, c_max=1e2, c_points=8, n_jobs=2)
    local = train_head(path, config)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        remote = train_head(path, config, scheduler=cluster.scheduler_address)
    assert remote.C == local.C and remote.sweep == [{**p, "seconds": q["seconds"]} for p, q in
                                                    zip(local.sweep, remote.sweep, strict=True)]
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
